"""TRAINER: forward, backward, optimizer step. It does not know which algorithm it runs.

    trainer = Trainer(model, TrainerConfig(lr=2e-4), params)   # cfg: the `trainer.*` section
    metrics = trainer.step(batch, loss_fn)   # loss_fn(logp [B, T], batch) -> (loss, metrics)

One call trains on one rollout batch: `epochs` passes, each split into `minibatches` (one optimizer
step each; rows shuffled after the first epoch), each cut into micro-batches of `micro_batch_size`
rows, and of at most `micro_batch_tokens` token positions, whose losses are normalised by the
minibatch's counts (rlpost.packing.micro_batches), so gradient accumulation equals one large batch.
With `packing`, each micro-batch runs its sequences packed end to end without padding (rlpost.packing:
`micro_batch_tokens` positions each, else as many as `micro_batch_size` padded rows hold), and the
log-probs, entropies and values come back in the [B, T] layout the loss reads. On every micro-batch the
trainer attaches the policy's entropy (`batch.entropy`, with grad) and, when a critic is given, its current
values (`batch.new_values`).

A loss or gradient that is not finite skips that optimizer step (nothing is applied), is reported,
and after `max_nonfinite_steps` in a row stops training with NonFiniteLossError.

Every setting comes from `cfg`, the `trainer.*` section (rlpost.config.TrainerConfig); log-probs are scored
at the temperature the rollout engine reports its old_logp at, `params.logp_temperature` (the sampling
temperature; 1 for greedy rollouts), so the loss compares like with like.

Device and precision: batches may arrive on any device; the trainer moves each one to the model's device.
`precision="bf16"` runs the forward under bf16 autocast while the parameters, gradients and AdamW state
stay fp32 and the log-softmax and the loss are computed in fp32 (rlpost.models.autocast).
`gradient_checkpointing=True` recomputes block activations in the backward (rlpost.models.
set_gradient_checkpointing). The schedule (cfg.lr_schedule, warmup_steps, min_lr_ratio over `total_steps`:
rlpost.schedule.LRSchedule) scales every param group's learning rate at each optimizer step. `state_dict()`
holds what a resumed run needs besides the weights.

Sharded training, `strategy="fsdp2"` (rlpost.distributed; launched with torchrun): every rank holds a
shard of each parameter (FSDP2 over each transformer block and the root) and AdamW updates its shard.
Each rank trains on ITS rows of the step, and the result equals one process training on all of them:

- the loss denominators (Batch.global_tokens / global_seqs) are the counts summed over ranks, so each
  rank's loss is its share of the global loss, and FSDP2 sums the gradients (divide factor 1);
- the gradient norm (clipping), the non-finite check and the metrics are global (all-reduced);
- every rank runs the same number of forward/backward passes (collectives must pair up), as the reference
  and the critic do (rlpost.packing.even_forwards): a packed micro-batch is one forward like a padded one, so
  packing=auto may pack on one rank and pad on another, and a rank with fewer micro-batches runs extra ones
  with zero weight; when any rank has no rows, all skip the step,
  unless the caller gives it a `filler` row to run at zero weight (a stage whose last batch has fewer
  examples than there are ranks);
- shared-prompt scoring is off (it calls the model outside its forward, where FSDP2 does not gather);
- `state_dict()` holds the FULL optimizer state (gathered onto rank 0's CPU, keyed by parameter name),
  so a checkpoint resumes under any number of ranks; the run's mid-stage checkpoints instead write each
  rank's shards of it (`state_dict(optimizer=False)` plus rlpost.distributed.save_shards / load_shards), so
  that no rank ever holds the whole;
- a critic (PPO) is sharded too: a separate one's trunk like the policy, its head (or a shared-trunk critic's
  only parameters) as one more FSDP2 group (rlpost.distributed.shard_module); the optimizer state is then
  keyed `policy.<name>` / `critic.<name>`;
- a LoRA policy (model.lora) is sharded whole, its frozen base with its adapters: AdamW holds only the
  adapters' shards (the parameters that require grad), and FSDP2 reduces only their gradients.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
import torch.nn as nn

from rlpost import distributed as dist
from rlpost.batch import Batch
from rlpost.config import TrainerConfig
from rlpost.models import (autocast, check_precision, model_device, resolve_packing, set_gradient_checkpointing,
                           token_logprobs)
from rlpost.ops import masked_mean_value
from rlpost.packing import Packed, even_forwards, micro_batches, scatter_rows
from rlpost.rollout.engine import SamplingParams
from rlpost.schedule import LRSchedule

STRATEGIES = ("single", "fsdp2")  # the valid trainer.strategy names
LossFn = Callable[[torch.Tensor, Batch], tuple[torch.Tensor, dict[str, float]]]


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses or gradients in a row."""


class Trainer:
    def __init__(self, model: nn.Module, cfg: TrainerConfig, params: SamplingParams | None = None, *,
                 critic: nn.Module | None = None, critic_lr: float | None = None, seed: int = 0,
                 total_steps: int | None = None):
        """`cfg`: the `trainer.*` section (optimizer, micro-batching, precision, schedule, strategy); a stage
        that trains with other settings (SFT, preference) passes a TrainerConfig of its own. `params`: the
        rollout's sampling parameters, whose log-prob temperature (`SamplingParams.logp_temperature`: the
        sampling temperature, 1 for greedy) the log-probs are scored at (None: temperature 1). `total_steps`:
        the optimizer steps the schedule decays over (a `linear` / `cosine` cfg.lr_schedule needs it)."""
        check_precision(cfg.precision, model_device(model))
        temperature = (params or SamplingParams()).logp_temperature
        if cfg.strategy not in STRATEGIES:
            raise ValueError(f"trainer.strategy is {cfg.strategy!r}; valid values: {', '.join(STRATEGIES)}")
        self.sharded = cfg.strategy == "fsdp2"
        # true fails now on a model that cannot keep packed sequences apart (before sharding it); auto is off there
        # (a sharded critic trunk is a copy of the sharded policy, which answers for it: run alone, the trunk would
        # become an FSDP2 root before the critic shards over it)
        trunk = getattr(critic, "trunk", None)
        packing = resolve_packing(cfg.packing, model, None if trunk is not None and dist.is_sharded(trunk) else trunk)
        if self.sharded:
            dist.shard_model(model)  # in place: the parameters become DTensor shards, before AdamW sees them
            if critic is not None:
                critic.shard()
        self.model, self.critic, self.precision = model, critic, cfg.precision
        # what the sharded optimizer state is keyed by: the policy's names, or with a critic both modules'
        self._state_module = model if critic is None else nn.ModuleDict({"policy": model, "critic": critic})
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.lr}]
        if critic is not None:
            groups.append({"params": [p for p in critic.parameters() if p.requires_grad], "lr": critic_lr or cfg.lr})
        # fused: one kernel over every parameter instead of torch's default per-parameter loop on a CPU (3.7x less
        # CPU time for the GRPO benchmark's 4.46 M parameters; same update to float rounding). Sharded (DTensor)
        # parameters keep the default. A resumed run's optimizer state brings back the flag it was saved with.
        fused = not self.sharded and all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                           weight_decay=cfg.weight_decay, fused=fused or None)
        self.base_lrs = [g["lr"] for g in groups]  # the schedule scales these
        self.schedule = LRSchedule(cfg.lr_schedule, cfg.warmup_steps, total_steps=total_steps,
                                   min_lr_ratio=cfg.min_lr_ratio)
        if cfg.gradient_checkpointing:  # the policy, and a separate critic's own trunk (a shared one is the policy)
            for m in (model, getattr(critic, "trunk", None)):
                if m is not None:
                    set_gradient_checkpointing(m, True)
        self.grad_clip, self.micro_batch_size = cfg.grad_clip, cfg.micro_batch_size
        self.max_nonfinite_steps, self.temperature = cfg.max_nonfinite_steps, temperature
        self.logprob_chunk = cfg.logprob_chunk  # tokens per chunk of the log-prob head (None: sized from vocabulary)
        self.packing, self.micro_batch_tokens = packing, cfg.micro_batch_tokens  # False, True or 'auto'
        self.epochs, self.minibatches = cfg.epochs, cfg.minibatches
        self.generator = torch.Generator().manual_seed(seed)  # on the CPU whatever the model's device
        self.nonfinite_in_a_row = 0
        self.steps = 0
        self._filling = False

    @property
    def device(self) -> torch.device:
        return model_device(self.model)

    def set_lr(self, lr: float) -> None:
        """Set the policy's base learning rate (the schedule still scales it)."""
        self.base_lrs[0] = lr
        self._apply_schedule()

    def _apply_schedule(self) -> None:
        factor = self.schedule.factor(self.steps)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor

    # ---------------------------------------------------------------- resuming
    def state_dict(self, optimizer: bool = True) -> dict:
        """Everything a rebuilt Trainer on the same weights needs to continue bit-identically: AdamW's state,
        the base learning rates and the schedule, the step counters and the shuffling generator. Not the
        weights: the run saves the model (and a separate critic, an nn.Module) on its own. Tensors are
        shared with the optimizer, so save it (torch.save) before training on. Sharded: a collective (every
        rank calls it); the full optimizer state is on rank 0 (the rank that saves), empty elsewhere.
        `optimizer=False`: all but AdamW's state, for a sharded checkpoint that writes the optimizer's shards
        itself (rlpost.distributed.save_shards); nothing is gathered then."""
        state = {"base_lrs": list(self.base_lrs), "schedule": self.schedule.state_dict(), "steps": self.steps,
                 "nonfinite_in_a_row": self.nonfinite_in_a_row, "generator": self.generator.get_state()}
        return {"optimizer": self._optimizer_state(), **state} if optimizer else state

    def load_state_dict(self, state: dict) -> None:
        """Put back a `state_dict()`; sharded, every rank passes the same full state and keeps its shard. A
        sharded trainer also takes a state without the optimizer's (`state_dict(optimizer=False)`), whose
        shards are loaded on their own (rlpost.distributed.load_shards)."""
        need = {"base_lrs", "schedule", "steps", "nonfinite_in_a_row", "generator"} | (set() if self.sharded
                                                                                        else {"optimizer"})
        missing = need - set(state)
        if missing:
            raise ValueError(f"trainer state lacks {', '.join(sorted(missing))}; was it saved by Trainer.state_dict?")
        try:
            if "optimizer" in state:  # moves AdamW's state to the parameters' device
                self._load_optimizer_state(state["optimizer"])
        except (ValueError, KeyError) as e:
            raise ValueError(f"the saved trainer state does not fit this model and critic: {e!r}") from None
        self.base_lrs = list(state["base_lrs"])
        self.schedule.load_state_dict(state["schedule"])
        self.steps, self.nonfinite_in_a_row = state["steps"], state["nonfinite_in_a_row"]
        self.generator.set_state(state["generator"])

    @torch.no_grad()
    def logprobs(self, batch: Batch) -> torch.Tensor:
        """log pi(token) of every response token under the current weights, [B, T] on the batch's device (0 off
        the response): the proximal log-probs of an importance-sampling correction. Scored as the training
        forward is (the trainer's micro-batches, packed or not, its precision and temperature), in eval
        mode (no dropout: the policy itself, not a noisy sample of it); the model's mode is restored after."""
        was_training = self.model.training
        self.model.eval()
        try:
            parts = []
            for rows, mb, packed, real in self._plan(batch):
                mb = mb.to(self.device)
                with autocast(self.device, self.precision):
                    logp = token_logprobs(self.model, mb, self.temperature, share_prompt=not self.sharded,
                                          chunk=self.logprob_chunk, packed=packed)
                if real:
                    parts.append((rows, (logp * mb.response_mask).to(batch.input_ids.device)))
        finally:
            self.model.train(was_training)
        if not parts:
            return torch.zeros(batch.input_ids.shape, device=batch.input_ids.device)
        return scatter_rows(parts, len(batch))

    def _plan(self, batch: Batch):
        """(batch rows, micro-batch, its packing or None, real) of each of the trainer's forwards of `batch`:
        its micro-batches, and sharded as many as on the rank with the most (rlpost.packing.even_forwards; the
        padding ones, real=False, run at zero weight). Sharded, every rank must call it for the same pass."""
        share = not self.sharded and getattr(self.model, "can_share_prompt", False)  # as token_logprobs will
        # (a rank without rows plans nothing, as the reference and the critic: even_forwards gives it padding)
        plan = micro_batches(batch, self.micro_batch_size, self.micro_batch_tokens, self.packing,
                             share) if len(batch) else []
        return even_forwards(batch, plan, dist.reduce_max if self.sharded else None)

    def _optimizer_state(self) -> dict:
        if not self.sharded:
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self._state_module, self.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _load_optimizer_state(self, state: dict) -> None:
        if not self.sharded:
            self.optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        if not all(isinstance(k, str) for k in state["state"]):
            raise ValueError("this optimizer state was saved by trainer.strategy=single (keyed by parameter "
                             "number); a fsdp2 run resumes from fsdp2 checkpoints (keyed by parameter name)")
        set_optimizer_state_dict(self._state_module, self.optimizer, state,
                                 options=StateDictOptions(full_state_dict=True))

    def step(self, batch: Batch, loss_fn: LossFn, filler: Batch | None = None) -> dict[str, float]:
        """Train on one batch (epochs x minibatches optimizer steps). Returns metrics averaged over the
        optimizer steps; the engine/trainer log-prob mismatch is measured before the first update.
        Sharded: `batch` is this rank's rows; the metrics are global and the same on every rank. A rank
        without rows skips the step on every rank, unless it has a `filler` (any one row of the step, with
        `minibatches=1`): it then runs that row's passes at zero weight, so that the others can train."""
        rows = len(batch) if batch is not None else 0
        self._filling = False
        if self.sharded and filler is not None and self.minibatches == 1 and dist.reduce_max(rows) > 0:
            self._filling = rows == 0
            batch, rows = (filler, len(filler)) if rows == 0 else (batch, rows)
        if (dist.reduce_min(rows) if self.sharded else rows) == 0:
            return {"train/skipped_empty": 1.0}
        batch = batch.to(self.device)
        # every rank must take the same number of optimizer steps: the fewest rows bound the minibatches
        minibatches = min(self.minibatches, int(dist.reduce_min(rows)) if self.sharded else rows)
        totals: dict[str, float] = {}
        n = 0
        for epoch in range(self.epochs):
            # row indices live on the CPU with the generator; Batch.select moves them to the batch's device
            order = torch.arange(len(batch), device="cpu") if epoch == 0 else \
                torch.randperm(len(batch), generator=self.generator, device="cpu")
            parts = order.tensor_split(minibatches) if self.sharded else order.chunk(minibatches)
            for rows in parts:
                first = epoch == 0 and n == 0
                m = self._optimizer_step(batch.select(rows), loss_fn, measure_mismatch=first)
                for k, v in m.items():
                    if first or not k.startswith("rollout/"):
                        totals[k] = totals.get(k, 0.0) + v
                n += 1
        return {k: v if k.startswith("rollout/") else v / n for k, v in totals.items()}

    def _micro_batches(self, batch: Batch) -> Iterable[tuple[Batch, Packed | None, bool]]:
        """(micro-batch, its packing or None, counts) triples. Sharded: the loss denominators become the counts
        over all ranks, and a rank with fewer micro-batches than another repeats its first with counts=False
        (zero weight), so that every rank runs the same forward/backward passes and FSDP2's collectives pair up."""
        if not self.sharded:
            return ((mb, p, True) for _, mb, p, _ in self._plan(batch))
        filling = self._filling  # a filler row (see step): counted nowhere, every pass at zero weight
        counts = dist.reduce_dict({"tokens": 0.0 if filling else batch.num_response_tokens,
                                   "seqs": 0.0 if filling else len(batch)})
        batch = batch.replace(global_tokens=counts["tokens"], global_seqs=counts["seqs"])
        return [(mb, p, real and not filling) for _, mb, p, real in self._plan(batch)]

    def _optimizer_step(self, batch: Batch, loss_fn: LossFn, measure_mismatch: bool) -> dict[str, float]:
        self.model.train()
        self._apply_schedule()
        self.optimizer.zero_grad(set_to_none=True)
        finite = True
        sums: dict[str, float] = {}
        totals = {"loss": 0.0, "weight": 0.0, "entropy": 0.0, "mismatch_sum": 0.0}
        mismatch_max = 0.0
        for mb, packed, counts in self._micro_batches(batch):
            with autocast(self.device, self.precision):  # the forward only: the loss below runs in fp32
                logp, entropy = token_logprobs(self.model, mb, self.temperature, with_entropy=True,
                                               share_prompt=not self.sharded, chunk=self.logprob_chunk, packed=packed)
            values = self.critic(mb, packed=packed, split=False) if self.critic is not None else None
            mb = mb.replace(entropy=entropy, new_values=values)
            loss, metrics = loss_fn(logp, mb)
            if not counts:  # a sharded rank's padding pass: same collectives, no contribution
                (loss * 0.0).backward()
                for k in metrics:  # (the metrics' all-reduce needs the same keys on every rank)
                    sums.setdefault(k, 0.0)
                continue
            if not torch.isfinite(loss):
                finite = False
                if not self.sharded:
                    break
                loss = torch.nan_to_num(loss) * 0.0  # other ranks wait in this backward's collectives
            loss.backward()
            w = float(mb.response_mask.sum().item())
            totals["loss"] += loss.item()
            totals["weight"] += w
            totals["entropy"] += masked_mean_value(entropy.detach(), mb.response_mask) * w
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v * w
            # sample-time vs trainer log-probs, same weights; under a rollout correction old_logp is the trainer's
            # own (proximal) log-probs and the engine's are in rollout_logp
            sampled = mb.rollout_logp if mb.rollout_logp is not None else mb.old_logp
            if measure_mismatch and sampled is not None:
                delta = (logp.detach() - sampled).abs() * mb.response_mask
                mismatch_max = max(mismatch_max, float(delta.max()))
                totals["mismatch_sum"] += float(delta.sum())
        if self.sharded:  # everything global: one rank's non-finite loss skips the step on all
            finite = dist.reduce_min(float(finite)) > 0
            totals, sums = dist.reduce_dict(totals), dist.reduce_dict(sums)
            mismatch_max = dist.reduce_max(mismatch_max)

        grad_norm = float("nan")
        if finite:
            params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)  # over DTensor shards: the global norm
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            finite = math.isfinite(grad_norm)
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)  # skip: nothing of this batch is applied
            self.nonfinite_in_a_row += 1
            if self.nonfinite_in_a_row >= self.max_nonfinite_steps:
                raise NonFiniteLossError(f"{self.nonfinite_in_a_row} non-finite losses/gradients in a row "
                                         f"(trainer.max_nonfinite_steps={self.max_nonfinite_steps}); stopping")
            return {"train/skipped_nonfinite": 1.0, "train/loss": float("nan"), "train/grad_norm": grad_norm}
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_in_a_row = 0
        self.steps += 1
        weight = max(totals["weight"], 1.0)
        out = {k: v / weight for k, v in sums.items()}
        out.update({"train/loss": totals["loss"], "train/grad_norm": grad_norm, "train/skipped_nonfinite": 0.0,
                    "train/entropy": totals["entropy"] / weight, "train/lr": self.optimizer.param_groups[0]["lr"]})
        if measure_mismatch and batch.old_logp is not None:
            out["rollout/logp_mismatch_max"] = mismatch_max
            out["rollout/logp_mismatch_mean"] = totals["mismatch_sum"] / weight
        return out
