"""Process rewards in RL: a process reward model's step scores as token-level rewards at the step ends.

Math-Shepherd (Wang et al. 2024, arXiv:2312.08935) trains its policy by step-by-step PPO: the PRM scores every
reasoning step, and each step's score is the reward of the step's last token. `ProcessReward` is that reward
role (as rlpost/env/teacher.py's `TeacherReward`): for a response with steps ending at tokens e_1 < ... < e_n
(each token that writes `prm.separator`, and the last token; `rlpost.env.process_reward_model.step_ends`) and
PRM scores s_1 ... s_n,

    r[e_j]  += coef * s_j                        (prm.reward = score)
    r[e_j]  += coef * (s_j - s_{j-1}), s_0 = 0   (prm.reward = delta: the sum telescopes to coef * s_n)
    r[last] += outcome                            (the task's verifier, as without a PRM)

and 0 on every other token (prompt, padding, tokens inside a step). `score` pays every step it sees, so a
response with more steps collects more; `delta` pays only for progress, and a response's total is the
outcome plus coef times the PRM's final score, whatever its length.

An algorithm reads the [B, T] rewards through `PolicyGradient.token_rewards`: REINFORCE++ (`reinforce_pp`)
credits token t with the rewards at and after it (returns-to-go, `gamma`), PPO with GAE; GRPO, RLOO and
REINFORCE sum a response's rewards into one. The outcome is reported as `reward/gold_mean` (the same number an
outcome-only run reports as `reward/mean`); metrics `prm/step_score_mean` (mean PRM score over every step of
the batch), `prm/final_score_mean` (the last step's), `prm/steps_per_response`, `prm/process_reward_mean` (the
PRM's part of a response's total, averaged).

    prm, prm_tokenizer = ProcessRewardModel.load("runs/prm/checkpoints/prm")
    reward = ProcessReward(prm, tokenizer, outcome=verifier, coef=1.0, mode="delta")
    scored, metrics = reward(batch)                       # scored.rewards: [B, T]
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

import torch

from rlpost.algorithms.base import last_token_index
from rlpost.batch import Batch
from rlpost.env.process_reward_model import ProcessRewardModel, holds_separator, responses, step_ends
from rlpost.env.role import RewardRole
from rlpost.env.source import RewardSource, SourceInputs, over_episodes, register, runs_episodes
from rlpost.env.teacher import check_same_tokenizer
from rlpost.models import resolve_packing
from rlpost.schema import Range, above
from rlpost.settings.prm import PRM_REWARDS as MODES  # prm.reward: how a step's PRM score becomes its reward


def process_token_rewards(outcome: torch.Tensor, ends: list[list[int]], scores: list[list[float]],
                          response_mask: torch.Tensor, prompt_width: int, coef: float, mode: str) -> torch.Tensor:
    """[B, T]: `outcome` [B] on each row's last response token (or, [B, T], where it is), plus coef * (score or
    score increment) of each step at its last token (`ends` index the response, which starts at column
    `prompt_width`); 0 elsewhere."""
    if mode not in MODES:
        raise ValueError(f"process reward mode {mode!r}; valid: {', '.join(MODES)}")
    mask = response_mask.bool()
    r = torch.zeros(mask.shape, dtype=torch.float32)
    if outcome.dim() == 2:  # an environment's per-turn rewards [B, T], already on each turn's last token
        r += outcome.float().cpu()
    else:
        r[torch.arange(len(mask)), last_token_index(mask).cpu()] = outcome.float().cpu()
    for b, (e, s) in enumerate(zip(ends, scores)):
        previous = 0.0
        for j, score in zip(e, s):
            r[b, prompt_width + j] += coef * (score - previous if mode == "delta" else score)
            previous = score
    return torch.where(mask.cpu(), r, torch.zeros_like(r)).to(response_mask.device)


def prompt_ids(batch: Batch) -> list[list[int]]:
    """Each row's prompt tokens (the left padding dropped)."""
    P = batch.prompt_width
    ids, keep = batch.input_ids[:, :P].tolist(), batch.attention_mask[:, :P].bool().tolist()
    return [[t for t, k in zip(row, m) if k] for row, m in zip(ids, keep)]


def episode_steps(batch: Batch, tokenizer, sep: str) -> tuple[list[list[int]], list[list[int]]]:
    """For an environment's episodes: each row's response region up to its last token (the policy's turns and
    the environment's observations between them: what the PRM reads), and the indices into it of the tokens
    that end a step: the policy's tokens that hold `sep`, and its last one. Observations end no step."""
    P = batch.prompt_width
    lengths = batch.attention_mask[:, P:].sum(1).tolist()
    ids, policy = batch.input_ids[:, P:].tolist(), batch.response_mask[:, P:].tolist()
    regions, ends = [], []
    for row, mask, n in zip(ids, policy, lengths):
        region, mask = row[:n], mask[:n]
        e = [i for i, (t, m) in enumerate(zip(region, mask)) if m and holds_separator(t, tokenizer, sep)]
        last = max((i for i, m in enumerate(mask) if m), default=None)
        if last is not None and (not e or e[-1] != last):
            e.append(last)
        regions.append(region)
        ends.append(e)
    return regions, ends


class ProcessReward(RewardRole):
    """Reward role (see the module docstring): `reward(batch) -> (batch with token rewards [B, T], metrics)`.
    `outcome` is the run's verifier role (`rlpost.env.reward.Reward`), whose [B] rewards are the outcome; None
    for an environment's episodes (`episodes=True`), whose own rewards (batch.rewards) are the outcome, and
    whose observations the PRM reads but never ends a step on. `micro_batch_size`, `micro_batch_tokens`,
    `packing` (the run's `trainer.*`): the PRM scores in the trainer's micro-batches, so no forward of a step
    holds more than one micro-batch's activations."""

    def __init__(self, prm: ProcessRewardModel, tokenizer, outcome, coef: float = 1.0, mode: str = "delta",
                 separator: str = ";", episodes: bool = False, micro_batch_size: int | None = None,
                 micro_batch_tokens: int | None = None, packing: bool | str = False):
        if mode not in MODES:
            raise ValueError(f"prm.reward is {mode!r}; valid: {', '.join(MODES)}")
        packing = resolve_packing(packing, prm.trunk)  # true fails now on a trunk that cannot pack; auto is off there
        self.micro = dict(micro_batch_size=micro_batch_size, micro_batch_tokens=micro_batch_tokens, packing=packing)
        self.prm = prm.eval().requires_grad_(False)
        self.tokenizer, self.outcome, self.coef, self.mode, self.separator = tokenizer, outcome, coef, mode, separator
        self.episodes = episodes

    @torch.no_grad()
    def __call__(self, batch: Batch) -> tuple[Batch, dict[str, float]]:
        scored, metrics = self.outcome(batch) if self.outcome is not None else (batch, {})
        outcome = scored.rewards.float()
        if self.episodes:
            response, ends = episode_steps(batch, self.tokenizer, self.separator)
        else:
            response = responses(batch)
            ends = [step_ends(r, self.tokenizer, self.separator) for r in response]
        scores = self.prm.step_scores(prompt_ids(batch), response, ends, self.tokenizer.pad_token_id, **self.micro)
        rewards = process_token_rewards(outcome, ends, scores, batch.response_mask, batch.prompt_width,
                                        self.coef, self.mode)
        flat = [s for ss in scores for s in ss]
        finals = [ss[-1] for ss in scores if ss]
        total = outcome.sum(1) if outcome.dim() == 2 else outcome  # a response's outcome, per-turn ones summed
        metrics = {**metrics,
                   "prm/step_score_mean": sum(flat) / max(len(flat), 1),
                   "prm/final_score_mean": sum(finals) / max(len(finals), 1),
                   "prm/steps_per_response": len(flat) / max(len(batch), 1),
                   "prm/process_reward_mean": float((rewards.sum(1).cpu() - total.cpu()).mean())}
        meta = {**scored.meta, "gold_reward": total.tolist()}  # the controller reports it as reward/gold_mean
        return scored.replace(rewards=rewards, meta=meta), metrics


def load_process_reward(cfg, tokenizer, outcome, prompts: list, system: str | None = None, key: str = "prm.path",
                        episodes: bool = False, micro: dict | None = None) -> ProcessReward:
    """The PRM folder `cfg.path` loaded, its tokenizer checked against the policy's, as a reward role around
    the run's verifier `outcome` (None with `episodes`: an environment's rewards are the outcome). `key`:
    the config key the folder was given by, for the errors; `micro`: the trainer's micro-batching
    (`rlpost.env.source.micro_batching`)."""
    if not os.path.isdir(cfg.path):
        raise ValueError(f"{key}: no folder at {cfg.path!r} (a process reward model: a `rlpost prm` run's "
                         "checkpoints/prm)")
    prm, prm_tokenizer = ProcessRewardModel.load(cfg.path)
    check_same_tokenizer(tokenizer, prm_tokenizer, prompts, system, where=f"{key} {cfg.path}",
                         why="the PRM scores the policy's token ids as they are")
    return ProcessReward(prm, tokenizer, outcome, coef=cfg.coef, mode=cfg.reward, separator=cfg.separator,
                         episodes=episodes, **(micro or {}))


@register("prm")
class PRMSource(RewardSource):
    """`rl.reward: {name: prm, path, coef, reward, separator}`; alias: `prm.path` (with prm.coef, prm.reward,
    prm.separator)."""

    description = ("the verifier's outcome (or task.env's reward) plus a process reward model's step rewards at "
                   "the step ends")
    alias_switch = "prm.path"
    alias_keys = {"path": "prm.path", "coef": "prm.coef", "reward": "prm.reward", "separator": "prm.separator"}

    @dataclass
    class Config:
        path: str | None = None
        """a PRM folder (a `rlpost prm` run's checkpoints/prm) with the policy's tokenizer"""
        coef: float = 1.0
        """weight of the PRM's step rewards against the outcome"""
        reward: str = "delta"
        """a step's reward: delta (its score minus the previous step's) | score (the score itself)"""
        separator: str = ";"
        """a token holding this text ends a reasoning step"""

        ranges: ClassVar[dict[str, Range]] = {"coef": above(0)}

    def check(self, cfg, stages: list[str]) -> None:
        o = self.options
        if not o.path:
            raise ValueError("rl.reward.name=prm needs rl.reward.path: a PRM folder (a `rlpost prm` run's "
                             "checkpoints/prm)")
        if o.reward not in MODES:
            raise ValueError(f"config key '{self.key('reward')}' is {o.reward!r}; valid values: {', '.join(MODES)}")
        if not o.separator:
            raise ValueError(f"config key '{self.key('separator')}' must be a non-empty string (the text that ends "
                             "a step)")
        if "rl" not in stages:
            raise ValueError(f"{self.key('path')} is the RL stage's reward; it needs an RL stage (rl.steps >= 1)")

    def build(self, inputs: SourceInputs):
        episodes = runs_episodes(inputs.verifier)
        reward = load_process_reward(self.options, inputs.tokenizer, None if episodes else inputs.verifier,
                                     inputs.prompts, system=inputs.system, key=self.key("path"), episodes=episodes,
                                     micro=inputs.micro_batching())
        return over_episodes(inputs.verifier, reward)
