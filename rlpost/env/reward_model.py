"""A learned REWARD: a Bradley–Terry reward model, and the reward role that scores rollouts with it.

Where no verifier exists, the reward comes from human preferences. Given a
prompt x and two completions with y_w preferred over y_l, the Bradley–Terry model says

    P(y_w > y_l | x) = sigmoid(r(x, y_w) - r(x, y_l))

so the reward model r is fitted by maximising the log-likelihood of the observed preferences:

    loss = -log sigmoid(r(x, y_w) - r(x, y_l))        averaged over pairs

r is a language model's trunk with a scalar head read at the last real token of prompt + completion
(+ eos, exactly as a rollout ends). Only differences of r are identified, so its offset is arbitrary.

    rm = RewardModel.from_policy(policy)                   # trunk copied from the policy, head at zero
    fit_reward_model(rm, train, held_out, pad_id=tok.pad_token_id, epochs=2, batch_size=64, lr=1e-4)
                                                           # train, held_out: rlpost.preference.data.PreferenceData
    rm.save(folder, tokenizer); rm = RewardModel.load(folder)
    reward = LearnedReward(rm, tokenizer, gold=task.verify)   # the RL loop's reward role

With `LearnedReward` as the reward role, `reward/mean` is the proxy (reward-model) reward; when a
verifier is given, every sample is also scored by it and `reward/gold_mean` is logged beside it every
step, so over-optimisation of the reward model is visible as it happens.
"""

from __future__ import annotations

import copy
import os
import random
from collections.abc import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from rlpost import distributed as dist
from rlpost.batch import Batch
from rlpost.config import ModelConfig
from rlpost.env.source import RewardSource, SourceInputs, episode_reward, over_episodes, register
from rlpost.models import (ModelLoadError, encode_prompt, load_model, model_device, position_ids_for, resolve_packing,
                           rebuild, save_model, trunk_hidden_states)
from rlpost.ops import last_token_index
from rlpost.packing import Packed, even_forwards, micro_batches, scatter_rows
from rlpost.preference.data import PreferenceData
from rlpost.progress import progress
from rlpost.env.reward import decode_responses
from rlpost.env.role import RewardRole
from rlpost.tasks.arithmetic import slip

HEAD_FILE = "reward_head.safetensors"


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """-log sigmoid(r_w - r_l), mean over pairs; with pair accuracy and mean margin."""
    margin = r_chosen - r_rejected
    loss = -F.logsigmoid(margin).mean()
    return loss, {"rm/loss": loss.item(), "rm/accuracy": (margin > 0).float().mean().item(),
                  "rm/margin": margin.mean().item()}


class RewardModel(nn.Module):
    """A causal-LM trunk and a linear head: score(prompt + completion) -> one scalar per row."""

    head_file = HEAD_FILE  # where `save` writes the head beside the trunk (a subclass's head has its own name)
    kind, command = "reward model", "rm"  # for the error that a folder is not one

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.trunk = trunk
        self.head = nn.Linear(trunk.hidden_size, 1, device=model_device(trunk))
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_policy(cls, policy: nn.Module) -> RewardModel:
        """A reward model whose trunk starts as a copy of `policy` (e.g. the SFT checkpoint); of a sharded policy
        (trainer.strategy=fsdp2), a plain copy of its full weights (a collective: every rank calls it)."""
        trunk = dist.plain_copy(policy) if dist.is_sharded(policy) else copy.deepcopy(policy)
        return cls(trunk.requires_grad_(True))

    def shard(self) -> RewardModel:
        """FSDP2 in place for fitting (trainer.strategy=fsdp2): the trunk like a policy, the head as one more group;
        `score` gathers what it needs as `forward` does."""
        dist.shard_model(self.trunk)
        dist.shard_module(self, methods=("score",))
        return self

    def unsharded(self) -> RewardModel:
        """A plain reward model with this one's full weights, on every rank and on its device (itself when it is
        not sharded): what a fitted sharded model scores rollouts and is saved as. A collective when sharded."""
        if not dist.is_sharded(self):
            return self
        full = dist.full_state_dict(self)
        trunk = rebuild(self.trunk, {k.removeprefix("trunk."): v for k, v in full.items() if k.startswith("trunk.")})
        plain = type(self)(trunk.to(model_device(self)))
        plain.head.load_state_dict({k.removeprefix("head."): v for k, v in full.items() if k.startswith("head.")})
        return plain.train(self.training)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B] rewards, read from the hidden state of each row's last real token."""
        return self._read(self.trunk.hidden_states(input_ids, attention_mask, position_ids_for(attention_mask)),
                          attention_mask)

    def score(self, batch: Batch, micro_batch_size: int | None = None, micro_batch_tokens: int | None = None,
              packing: bool | str = False) -> torch.Tensor:
        """[B] rewards of a batch, as `forward`, on the model's device (a batch from elsewhere is moved there);
        rows that share a prompt (a pair, K samples) compute it once. With `micro_batch_size` /
        `micro_batch_tokens` / `packing` (the trainer's: rlpost.packing.micro_batches) the trunk runs one
        micro-batch at a time, so a forward holds one micro-batch's activations; the rewards are the same.

        Sharded (trainer.strategy=fsdp2), prompts are not shared (the shared-prompt path calls the trunk outside
        its forward) and, micro-batched, every rank runs as many forwards as the rank with the most
        (rlpost.packing.even_forwards, as the reference and the critic): each forward all-gathers the shards, so
        ranks with different rows, or packing=auto choosing differently, would otherwise hang. A collective then:
        every rank calls it."""
        batch = batch.to(self.head.weight.device)
        sharded = dist.is_sharded(self)
        if not (micro_batch_size or micro_batch_tokens or packing):  # one forward, on every rank alike
            return self._read(trunk_hidden_states(self.trunk, batch, share_prompt=not sharded), batch.attention_mask)
        share = not sharded and getattr(self.trunk, "can_share_prompt", False)  # as head_values' trunk pass will
        plan = micro_batches(batch, micro_batch_size, micro_batch_tokens, packing, share) if len(batch) else []
        parts = []  # sharded: the padding forwards' rewards (real False) are dropped
        for rows, mb, packed, real in even_forwards(batch, plan, dist.reduce_max if sharded else None):
            rewards = self._read(self.head_values(mb, packed), mb.attention_mask, head=False)
            if real:
                parts.append((rows, rewards))
        if not parts:  # (a rank without rows)
            return torch.zeros(0, device=batch.input_ids.device)
        return scatter_rows(parts, len(batch))

    def head_values(self, batch: Batch, packed: Packed | None = None) -> torch.Tensor:
        """The head at every position of `batch` [B, T] (fp32); `packed`: the packing of its rows, whose packed
        hidden states are read and put back in the padded layout (zero off the real tokens). Sharded, prompts
        are not shared, as in `score`."""
        h = trunk_hidden_states(self.trunk, batch, share_prompt=not dist.is_sharded(self), packed=packed)
        values = self.head(h.float()).squeeze(-1)
        return values if packed is None else packed.unpack(values, shifted=False)

    def _read(self, h: torch.Tensor, attention_mask: torch.Tensor, head: bool = True) -> torch.Tensor:
        """Each row's value at its last real token: of the head on hidden states `h` [B, T, C], or, with
        head=False, of head values [B, T] already computed."""
        last = last_token_index(attention_mask)
        at = h[torch.arange(len(h), device=h.device), last]
        return self.head(at.float()).squeeze(-1) if head else at

    def save(self, folder: str, tokenizer) -> None:
        """The trunk as an ordinary checkpoint (loads in transformers) plus the head in reward_head.safetensors."""
        save_model(self.trunk, tokenizer, folder)
        save_file({k: v.detach().contiguous() for k, v in self.head.state_dict().items()},
                  os.path.join(folder, self.head_file))

    @classmethod
    def load(cls, folder: str) -> tuple[RewardModel, object]:
        if not os.path.isfile(os.path.join(folder, cls.head_file)):
            raise ModelLoadError(f"{folder!r} is not a {cls.kind}: it has no {cls.head_file} "
                                 f"(train one with `rlpost {cls.command}`)")
        trunk, tokenizer = load_model(ModelConfig(name=folder))
        rm = cls(trunk)
        rm.head.load_state_dict(load_file(os.path.join(folder, cls.head_file)))
        return rm.eval(), tokenizer


# ---------------------------------------------------------------------------- fitting

def pair_rewards(rm: RewardModel, data: PreferenceData, examples: list[int], pad_id: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected) of pairs `examples`, scored in one forward (rows alternate chosen, rejected)."""
    r = rm.score(data.batch(data.sequences(examples), pad_id))
    return r[0::2], r[1::2]


@torch.no_grad()
def evaluate_pairs(rm: RewardModel, data: PreferenceData, pad_id: int, batch_size: int = 256) -> dict[str, float]:
    """Held-out pair accuracy (r_w > r_l), mean margin and Bradley–Terry loss."""
    rm.eval()
    margins = []
    for i in range(0, len(data), batch_size):
        rc, rr = pair_rewards(rm, data, list(range(i, min(i + batch_size, len(data)))), pad_id)
        margins.append(rc - rr)
    m = torch.cat(margins)
    return {"rm/eval_accuracy": (m > 0).float().mean().item(), "rm/eval_margin": m.mean().item(),
            "rm/eval_loss": -F.logsigmoid(m).mean().item()}


def fit_epochs(model: nn.Module, n: int, loss_of: Callable[[list[int]], tuple[torch.Tensor, dict[str, float]]],
               evaluate_fn: Callable[[], dict[str, float]] | None, *, name: str, epochs: int, batch_size: int,
               lr: float, seed: int = 0, log: Callable[[dict], None] | None = None,
               desc: str | None = None) -> dict[str, float]:
    """The loop a reward model (outcome or process) is fitted by: AdamW, `epochs` passes over `n` examples in
    shuffled batches (`loss_of(indices) -> (loss, metrics)`, the metrics named `<name>/...`), gradients clipped
    to norm 1, a non-finite loss an error; `evaluate_fn()` after every epoch, logged as `<name>_eval`; the
    progress bar says `desc` (default: name). Returns the last epoch's evaluation.

    A sharded `model` (trainer.strategy=fsdp2: every rank walks the same order) takes its share of each batch
    (`distributed.share`), its loss scaled by that share and the gradients summed, so that a step is one
    process's on the whole batch; a non-finite loss on any rank stops every rank."""
    sharded = dist.is_sharded(model)
    if sharded and batch_size < dist.world_size():
        raise ValueError(f"{name}: batch_size={batch_size} is smaller than the {dist.world_size()} ranks of "
                         f"trainer.strategy=fsdp2, which each fit a share of every batch; set reward_model.batch_size "
                         f"to at least {dist.world_size()}")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    order = list(range(n))
    steps_per_epoch = max(n // batch_size, 1)
    result: dict[str, float] = {}
    step = 0
    bar = progress(total=epochs * steps_per_epoch, desc=desc or name)
    for epoch in range(1, epochs + 1):
        model.train()
        rng.shuffle(order)
        for i in range(steps_per_epoch):
            batch = order[i * batch_size:(i + 1) * batch_size]
            if sharded:  # this rank's share: its mean loss weighted by its part of the batch
                mine = [batch[j] for j in dist.share(len(batch))]
                loss, metrics = loss_of(mine)
                loss = loss * (len(mine) / len(batch))
                metrics = dist.reduce_metrics(metrics)
                finite = dist.reduce_min(float(torch.isfinite(loss))) > 0
            else:
                loss, metrics = loss_of(batch)
                finite = bool(torch.isfinite(loss))
            if not finite:
                raise FloatingPointError(f"{name} loss is {loss.item()} at epoch {epoch}, step {i}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            bar.update()
            bar.set_postfix(epoch=epoch, **{k.split("/")[-1]: f"{v:.3f}" for k, v in metrics.items()})
            if log is not None and step % 20 == 0:
                log({"stage": name, "step": step, **metrics})
        result = {"epoch": epoch, **(evaluate_fn() if evaluate_fn is not None else {})}
        if log is not None:
            log({"stage": f"{name}_eval", "step": step, **result})
        if dist.is_main():
            tqdm.write(f"{name} epoch {epoch}: "
                       + ", ".join(f"{k} {v:.3f}" for k, v in result.items() if k != "epoch"))
    bar.close()
    model.eval()
    return result


def fit_reward_model(rm: RewardModel, train: PreferenceData, held_out: PreferenceData | None, *, pad_id: int,
                     epochs: int, batch_size: int, lr: float, seed: int = 0,
                     log: Callable[[dict], None] | None = None) -> dict[str, float]:
    """Bradley–Terry training with AdamW on paired data (rlpost.preference.data); held-out accuracy and margin
    after every epoch. Returns the last epoch's."""
    if not train.paired or len(train) == 0:
        raise ValueError("the reward model trains on pairs {prompt, chosen, rejected}; got "
                         + ("unpaired rows" if not train.paired else "no pairs"))
    return fit_epochs(rm, len(train), lambda idx: bradley_terry_loss(*pair_rewards(rm, train, idx, pad_id)),
                      (lambda: evaluate_pairs(rm, held_out, pad_id)) if held_out is not None else None,
                      name="rm", desc="reward_model", epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, log=log)


# ---------------------------------------------------------------------------- the reward role

class LearnedReward(RewardRole):
    """Reward role backed by a reward model: rewards[b] = r(prompt + response). Never touches the policy.

    With `gold` (a verifier `fn(completion, row) -> float`), it also scores every sample with it and
    reports `reward/gold_mean` next to `reward/mean` (the proxy): the proxy rising while the gold falls is
    reward-model over-optimisation.

    `micro_batch_size`, `micro_batch_tokens`, `packing` (the run's `trainer.*`): the model scores a batch in
    the trainer's micro-batches (`RewardModel.score`), so no forward of a step holds more than one
    micro-batch's activations.
    """

    def __init__(self, rm: RewardModel, tokenizer, gold: Callable[[str, dict], float] | None = None,
                 micro_batch_size: int | None = None, micro_batch_tokens: int | None = None,
                 packing: bool | str = False):
        self.rm, self.tokenizer, self.gold = rm.eval().requires_grad_(False), tokenizer, gold
        packing = resolve_packing(packing, rm.trunk)  # true fails now on a trunk that cannot pack; auto is off there
        self.micro_batch_size, self.micro_batch_tokens, self.packing = micro_batch_size, micro_batch_tokens, packing

    def check_tokenizer(self, policy_tokenizer, texts: list) -> None:
        """The reward model reads the policy's token ids directly, so both must tokenise alike (`texts`:
        prompts, strings or chat messages)."""
        for t in texts:
            if encode_prompt(self.tokenizer, t) != encode_prompt(policy_tokenizer, t):
                raise ValueError(f"the reward model's tokenizer encodes {t!r} differently from the policy's; "
                                 "train the reward model from the policy's own checkpoint")

    @torch.no_grad()
    def __call__(self, batch: Batch) -> tuple[Batch, dict[str, float]]:
        rewards = self.rm.score(batch, self.micro_batch_size, self.micro_batch_tokens,
                                self.packing).float().to(batch.input_ids.device)
        texts = decode_responses(batch, self.tokenizer)
        meta = {**batch.meta, "completion": texts}
        if self.gold is not None:  # the controller reports it as reward/gold_mean beside reward/mean (the proxy)
            meta["gold_reward"] = [float(self.gold(t, row)) for t, row in zip(texts, batch.meta["row"])]
        return batch.replace(rewards=rewards, meta=meta), {"reward/errors": 0.0}


@register("reward_model")
class RewardModelSource(RewardSource):
    """`rl.reward: {name: reward_model}`; alias: a reward_model stage in the run. The stage trains or loads the
    model (`reward_model.*`) and builds the reward with it; RL stages before it are rewarded by the verifier.
    With task.env the model scores each episode's whole text (the policy's turns and the observations)."""

    description = "the Bradley-Terry reward model of the run's reward_model stage (the verifier logged as gold)"
    alias_stage = "reward_model"

    def check(self, cfg, stages: list[str]) -> None:
        if "reward_model" not in stages:
            raise ValueError("rl.reward.name=reward_model rewards RL with the model of the run's reward_model stage, "
                             "which this run does not have: set reward_model.train=true or reward_model.path, or "
                             "put reward_model in 'stages'")

    def build(self, inputs: SourceInputs):
        if inputs.reward_model is None:  # the stage has not run yet: the stages before it use the verifier
            return inputs.verifier
        rm, rm_tokenizer = inputs.reward_model
        reward = LearnedReward(rm, rm_tokenizer, gold=episode_reward(inputs.verifier), **inputs.micro_batching())
        reward.check_tokenizer(inputs.tokenizer, inputs.prompts)
        return over_episodes(inputs.verifier, reward)


# ---------------------------------------------------------------------------- pairs for the embedded task

def task_pairs(rows: list[dict], rng: random.Random, label_noise: float = 0.0) -> list[dict]:
    """Preference pairs from a verifiable task: chosen = the right answer, rejected = a one-digit slip
    (the demonstrator's kind of mistake). A fraction `label_noise` of pairs is swapped, as noisy human
    labels would be."""
    pairs = []
    for i, r in enumerate(rows):
        good, bad = r["answer"], slip(r["answer"], rng)
        if rng.random() < label_noise:
            good, bad = bad, good
        pairs.append({"prompt": r["prompt"], "chosen": good, "rejected": bad, "where": f"task pair {i}"})
    return pairs
