"""On-policy distillation: the student samples, a teacher grades every sampled token.

"On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes" (Agarwal et al., GKD) trains
the student on its own samples against the teacher's distribution; with the reverse KL as the divergence this is
RL whose reward is, per response token y_t of the student's own sample,

    r_t = -coef * (log pi_student(y_t | y_<t) - log pi_teacher(y_t | y_<t))

Its sum over a response is -coef times a one-sample estimate of KL(pi_student || pi_teacher) of that response:
maximising it makes the student put its mass where the teacher does (mode-seeking), on the prefixes the student
itself reaches. `TeacherReward` is a reward role (as rlpost/env/reward_model.py's `LearnedReward`): it scores a batch
and returns it with token rewards [B, T], so the controller and the algorithms are unchanged (an algorithm reads
them through `PolicyGradient.token_rewards`).

- The student's log-probs are the ones the rollout engine sampled with (`batch.old_logp`, at
  `rollout.temperature`); the teacher scores the same tokens at the same temperature (1 when greedy).
- The task's verifier does not add to the reward: distillation alone. It still scores every sample, reported as
  `reward/gold_mean` (and in rollouts.jsonl as `gold_reward`), so a run shows whether the student gets right
  what the teacher gets right. `reward/mean` is the mean of each response's summed token rewards.
- Metrics: `distill/reverse_kl`, the mean of log pi_student - log pi_teacher per response token of the batch.
- Algorithms: every policy-gradient algorithm here reads [B, T] rewards. GRPO, REINFORCE and RLOO sum a
  response's token rewards into one outcome; REINFORCE++ (`reinforce_pp`) takes returns-to-go discounted by its
  `gamma`, whitened over the batch. recipes/distill.yaml uses reinforce_pp with gamma = 0, each token credited
  with its own reverse KL: with a summed one (gamma = 1), a fresh student distilling a sharp teacher learned to
  end its answers after one token (one large penalty instead of several), and beta = 0 (the teacher is the
  anchor; no reference copy).

The teacher must share the student's tokenizer (token ids are scored as they are): `load_teacher_reward`
checks the vocabularies and the encoding of a few prompts and refuses, naming the difference, when they differ.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import ClassVar

import torch

from rlpost.batch import Batch
from rlpost.models import encode_prompt, load_model, model_device, resolve_packing, token_logprobs
from rlpost.ops import masked_mean_value
from rlpost.packing import micro_batches, scatter_rows
from rlpost.env.reward import decode_responses
from rlpost.env.role import RewardRole
from rlpost.env.source import (RewardSource, SourceInputs, micro_batching, over_episodes, register,
                               runs_episodes)
from rlpost.rollout.engine import SamplingParams
from rlpost.schema import Range, above


def distill_token_rewards(student_logp: torch.Tensor, teacher_logp: torch.Tensor, response_mask: torch.Tensor,
                          coef: float) -> torch.Tensor:
    """[B, T]: -coef * (student_logp - teacher_logp) on response tokens, 0 elsewhere."""
    mask = response_mask.bool()
    r = -coef * (student_logp.float() - teacher_logp.float())
    return torch.where(mask, r, torch.zeros_like(r))


class TeacherReward(RewardRole):
    """Reward role of on-policy distillation (see the module docstring): `reward(batch) -> (batch with token
    rewards [B, T], metrics)`. `gold`, a verifier `fn(completion, row) -> float`, is reported beside it."""

    def __init__(self, teacher: torch.nn.Module, tokenizer, coef: float = 1.0, params: SamplingParams | None = None,
                 gold=None, micro_batch_size: int | None = None, micro_batch_tokens: int | None = None,
                 packing: bool | str = False):
        temperature = (params or SamplingParams()).logp_temperature  # the student's old_logp's (1 when greedy)
        self.teacher = teacher.eval().requires_grad_(False)
        packing = resolve_packing(packing, self.teacher)  # true fails now on a model that cannot pack; auto: off there
        self.tokenizer, self.coef, self.temperature, self.gold = tokenizer, coef, temperature, gold
        # scored in micro-batches like the trainer's (rlpost.packing.micro_batches): one micro-batch's activations
        self.micro_batch_size, self.micro_batch_tokens, self.packing = micro_batch_size, micro_batch_tokens, packing

    @torch.no_grad()
    def __call__(self, batch: Batch) -> tuple[Batch, dict[str, float]]:
        if batch.old_logp is None:
            raise ValueError("on-policy distillation needs the sampling log-probs (batch.old_logp) of the student")
        device = batch.input_ids.device
        parts = [(rows, token_logprobs(self.teacher, mb, self.temperature, packed=packed))
                 for rows, mb, packed in micro_batches(batch.to(model_device(self.teacher)), self.micro_batch_size,
                                                       self.micro_batch_tokens, self.packing,
                                                       getattr(self.teacher, "can_share_prompt", False))]
        teacher_logp = scatter_rows(parts, len(batch)).float().to(device)
        mask = batch.response_mask.bool()
        rewards = distill_token_rewards(batch.old_logp, teacher_logp, mask, self.coef)
        reverse_kl = masked_mean_value(batch.old_logp.float() - teacher_logp, mask)
        texts = decode_responses(batch, self.tokenizer)
        meta = {**batch.meta, "completion": texts}
        if self.gold is not None:  # the controller reports it as reward/gold_mean
            meta["gold_reward"] = [float(self.gold(t, row)) for t, row in zip(texts, batch.meta["row"])]
        return batch.replace(rewards=rewards, meta=meta), {"distill/reverse_kl": reverse_kl, "reward/errors": 0.0}


def vocabulary(tokenizer) -> dict[str, int]:
    """token -> id of an rlpost tokenizer (gpt_mini's CharTokenizer or a transformers tokenizer)."""
    if hasattr(tokenizer, "stoi"):  # CharTokenizer: the special tokens, then one id per character
        return {**{t: i for i, t in enumerate(tokenizer.SPECIALS)}, **tokenizer.stoi}
    return dict(tokenizer.tok.get_vocab())


def check_same_tokenizer(student_tok, teacher_tok, prompts: list, system: str | None = None,
                         where: str = "the teacher",
                         why: str = "distillation scores the student's token ids with the teacher") -> None:
    """Raise a ValueError naming the difference when the two tokenizers do not give the same ids (`why`: what
    needs them to)."""
    a, b = vocabulary(student_tok), vocabulary(teacher_tok)
    if a != b:
        only_s = sorted(set(a) - set(b))[:5]
        only_t = sorted(set(b) - set(a))[:5]
        moved = sorted(t for t in set(a) & set(b) if a[t] != b[t])[:5]
        raise ValueError(f"{where} has another vocabulary than the student ({len(b)} tokens against {len(a)}; "
                         f"only the student's: {only_s}, only the teacher's: {only_t}, other ids: {moved}): "
                         f"{why}, so both must share a tokenizer (use a model of the same family, or one made "
                         "from a checkpoint of this task)")
    if student_tok.eos_token_id != teacher_tok.eos_token_id:
        raise ValueError(f"{where} ends responses with token {teacher_tok.eos_token_id}, the student with "
                         f"{student_tok.eos_token_id}: both must share a tokenizer")
    for p in prompts:
        if encode_prompt(student_tok, p, system) != encode_prompt(teacher_tok, p, system):
            raise ValueError(f"{where}'s tokenizer encodes the prompt {p!r} differently from the student's: both "
                             "must share a tokenizer")


def load_teacher_reward(cfg, model_cfg, tokenizer, temperature: float, verifier, prompts: list,
                        system: str | None = None, trainer_cfg=None, key: str = "distill.teacher") -> TeacherReward:
    """`cfg.teacher` (`key`: the config key it was given by), the teacher folder, loaded as the student's model
    config says (dtype, device; no LoRA), checked against the student's tokenizer, as a reward role with
    `cfg.coef`; the verifier's function (when `verifier` has one) is its gold. It scores in the micro-batches
    `trainer_cfg` (the run's `trainer.*`) sets: micro_batch_size, micro_batch_tokens, packing."""
    if not os.path.isdir(cfg.teacher):
        raise ValueError(f"{key}: no model folder at {cfg.teacher!r} (a saved model, e.g. a run's "
                         "checkpoints/final)")
    teacher_cfg = dataclasses.replace(model_cfg, name=cfg.teacher, lora=dataclasses.replace(model_cfg.lora, r=0))
    teacher, teacher_tok = load_model(teacher_cfg)
    check_same_tokenizer(tokenizer, teacher_tok, prompts, system, where=f"{key} {cfg.teacher}")
    # the teacher scores at the temperature the student's old_logp are reported at (1 for greedy rollouts)
    return TeacherReward(teacher, tokenizer, coef=cfg.coef, params=SamplingParams(temperature=temperature),
                         gold=getattr(verifier, "fn", None), **micro_batching(trainer_cfg))


@register("teacher")
class TeacherSource(RewardSource):
    """`rl.reward: {name: teacher, teacher, coef}`; alias: `distill.teacher` (with distill.coef). With task.env
    the teacher grades the policy's tokens of each episode; the environment's observations are masked."""

    description = "on-policy distillation: per token, -coef * (log pi_student - log pi_teacher) of each sampled token"
    alias_switch = "distill.teacher"
    alias_keys = {"teacher": "distill.teacher", "coef": "distill.coef"}

    @dataclass
    class Config:
        teacher: str | None = None
        """a teacher model folder (e.g. a run's checkpoints/final) with the policy's tokenizer"""
        coef: float = 1.0
        """weight of the per-token reverse-KL reward"""

        ranges: ClassVar[dict[str, Range]] = {"coef": above(0)}

    def check(self, cfg, stages: list[str]) -> None:
        if not self.options.teacher:
            raise ValueError("rl.reward.name=teacher needs rl.reward.teacher: a teacher model folder (e.g. a run's "
                             "checkpoints/final)")
        if "rl" not in stages:
            raise ValueError(f"{self.key('teacher')} is the RL stage's reward; it needs an RL stage (rl.steps >= 1)")

    def build(self, inputs: SourceInputs):
        cfg = inputs.cfg
        reward = load_teacher_reward(self.options, cfg.model, inputs.tokenizer, cfg.rollout.temperature,
                                     None if runs_episodes(inputs.verifier) else inputs.verifier, inputs.prompts,
                                     system=inputs.system, trainer_cfg=cfg.trainer, key=self.key("teacher"))
        return over_episodes(inputs.verifier, reward)
