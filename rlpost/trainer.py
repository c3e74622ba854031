"""TRAINER: forward, backward, optimizer step. It does not know which algorithm it runs.

    trainer = Trainer(model, lr=2e-4)
    metrics = trainer.step(batch, loss_fn)   # loss_fn(logp [B, T], batch) -> (loss, metrics)

One call trains on one rollout batch: `epochs` passes, each split into `minibatches` (one optimizer
step each; rows shuffled after the first epoch), each cut into micro-batches of `micro_batch_size`
rows whose losses are normalised by the minibatch's counts (Batch.micro_batches), so gradient
accumulation equals one large batch. On every micro-batch the trainer attaches the policy's entropy
(`batch.entropy`, with grad) and, when a critic is given, its current values (`batch.new_values`).

A loss or gradient that is not finite skips that optimizer step (nothing is applied), is reported,
and after `max_nonfinite_steps` in a row stops training with NonFiniteLossError.

Device and precision: batches may arrive on any device; the trainer moves each one to the model's device.
`precision="bf16"` runs the forward under bf16 autocast while the parameters, gradients and AdamW state
stay fp32 and the log-softmax and the loss are computed in fp32 (rlpost.models.autocast).
`gradient_checkpointing=True` recomputes block activations in the backward (rlpost.models.
set_gradient_checkpointing). `schedule` (rlpost.schedule.LRSchedule) scales every param group's learning
rate at each optimizer step. `state_dict()` holds what a resumed run needs besides the weights.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn

from rlpost.algorithms.base import masked_mean_value
from rlpost.batch import Batch
from rlpost.models import autocast, check_precision, model_device, set_gradient_checkpointing, token_logprobs
from rlpost.schedule import LRSchedule

LossFn = Callable[[torch.Tensor, Batch], tuple[torch.Tensor, dict[str, float]]]


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses or gradients in a row."""


class Trainer:
    def __init__(self, model: nn.Module, lr: float, weight_decay: float = 0.0, grad_clip: float = 1.0,
                 micro_batch_size: int | None = None, max_nonfinite_steps: int = 3, temperature: float = 1.0,
                 betas: tuple[float, float] = (0.9, 0.999), epochs: int = 1, minibatches: int = 1,
                 critic: nn.Module | None = None, critic_lr: float | None = None, seed: int = 0,
                 precision: str = "fp32", gradient_checkpointing: bool = False, schedule: LRSchedule | None = None):
        check_precision(precision, model_device(model))
        self.model, self.critic, self.precision = model, critic, precision
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]
        if critic is not None:
            groups.append({"params": [p for p in critic.parameters() if p.requires_grad], "lr": critic_lr or lr})
        self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay)
        self.base_lrs = [g["lr"] for g in groups]  # the schedule scales these
        self.schedule = schedule or LRSchedule()
        if gradient_checkpointing:  # the policy, and a separate critic's own trunk (a shared one is the policy)
            for m in (model, getattr(critic, "trunk", None)):
                if m is not None:
                    set_gradient_checkpointing(m, True)
        self.grad_clip, self.micro_batch_size = grad_clip, micro_batch_size
        self.max_nonfinite_steps, self.temperature = max_nonfinite_steps, temperature
        self.epochs, self.minibatches = epochs, minibatches
        self.generator = torch.Generator().manual_seed(seed)  # on the CPU whatever the model's device
        self.nonfinite_in_a_row = 0
        self.steps = 0

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
    def state_dict(self) -> dict:
        """Everything a rebuilt Trainer on the same weights needs to continue bit-identically: AdamW's state,
        the base learning rates and the schedule, the step counters and the shuffling generator. Not the
        weights: the run saves the model (and a separate critic, an nn.Module) on its own. Tensors are
        shared with the optimizer, so save it (torch.save) before training on."""
        return {"optimizer": self.optimizer.state_dict(), "base_lrs": list(self.base_lrs),
                "schedule": self.schedule.state_dict(), "steps": self.steps,
                "nonfinite_in_a_row": self.nonfinite_in_a_row, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        missing = {"optimizer", "base_lrs", "schedule", "steps", "nonfinite_in_a_row", "generator"} - set(state)
        if missing:
            raise ValueError(f"trainer state lacks {', '.join(sorted(missing))}; was it saved by Trainer.state_dict?")
        try:
            self.optimizer.load_state_dict(state["optimizer"])  # moves AdamW's state to the parameters' device
        except ValueError as e:
            raise ValueError(f"the saved trainer state does not fit this model and critic: {e}") from None
        self.base_lrs = list(state["base_lrs"])
        self.schedule.load_state_dict(state["schedule"])
        self.steps, self.nonfinite_in_a_row = state["steps"], state["nonfinite_in_a_row"]
        self.generator.set_state(state["generator"])

    @torch.no_grad()
    def logprobs(self, batch: Batch) -> torch.Tensor:
        """log pi(token) of every response token under the current weights, [B, T] on the batch's device (0 off
        the response): the proximal log-probs of an importance-sampling correction. Scored as the training
        forward is (micro-batches of micro_batch_size rows, the trainer's precision and temperature), in eval
        mode (no dropout: the policy itself, not a noisy sample of it); the model's mode is restored after."""
        was_training = self.model.training
        self.model.eval()
        try:
            parts = []
            for mb in batch.micro_batches(self.micro_batch_size):
                mb = mb.to(self.device)
                with autocast(self.device, self.precision):
                    logp = token_logprobs(self.model, mb, self.temperature)
                parts.append((logp * mb.response_mask).to(batch.input_ids.device))
        finally:
            self.model.train(was_training)
        return torch.cat(parts) if parts else torch.zeros(batch.input_ids.shape, device=batch.input_ids.device)

    def step(self, batch: Batch, loss_fn: LossFn) -> dict[str, float]:
        """Train on one batch (epochs x minibatches optimizer steps). Returns metrics averaged over the
        optimizer steps; the engine/trainer log-prob mismatch is measured before the first update."""
        if len(batch) == 0:
            return {"train/skipped_empty": 1.0}
        batch = batch.to(self.device)
        totals: dict[str, float] = {}
        n = 0
        for epoch in range(self.epochs):
            # row indices live on the CPU with the generator; Batch.select moves them to the batch's device
            order = torch.arange(len(batch), device="cpu") if epoch == 0 else \
                torch.randperm(len(batch), generator=self.generator, device="cpu")
            for rows in order.chunk(min(self.minibatches, len(batch))):
                first = epoch == 0 and n == 0
                m = self._optimizer_step(batch.select(rows), loss_fn, measure_mismatch=first)
                for k, v in m.items():
                    if first or not k.startswith("rollout/"):
                        totals[k] = totals.get(k, 0.0) + v
                n += 1
        return {k: v if k.startswith("rollout/") else v / n for k, v in totals.items()}

    def _optimizer_step(self, batch: Batch, loss_fn: LossFn, measure_mismatch: bool) -> dict[str, float]:
        self.model.train()
        self._apply_schedule()
        self.optimizer.zero_grad(set_to_none=True)
        total_loss, finite = 0.0, True
        sums: dict[str, float] = {}
        weight_total = 0.0
        mismatch_max, mismatch_sum, entropy_sum = 0.0, 0.0, 0.0
        for mb in batch.micro_batches(self.micro_batch_size):
            with autocast(self.device, self.precision):  # the forward only: the loss below runs in fp32
                logp, entropy = token_logprobs(self.model, mb, self.temperature, with_entropy=True)
            mb = mb.replace(entropy=entropy, new_values=self.critic(mb) if self.critic is not None else None)
            loss, metrics = loss_fn(logp, mb)
            if not torch.isfinite(loss):
                finite = False
                break
            loss.backward()
            total_loss += loss.item()
            w = float(mb.response_mask.sum().item())
            weight_total += w
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v * w
            entropy_sum += masked_mean_value(entropy.detach(), mb.response_mask) * w
            # sample-time vs trainer log-probs, same weights; under a rollout correction old_logp is the trainer's
            # own (proximal) log-probs and the engine's are in rollout_logp
            sampled = mb.rollout_logp if mb.rollout_logp is not None else mb.old_logp
            if measure_mismatch and sampled is not None:
                delta = (logp.detach() - sampled).abs() * mb.response_mask
                mismatch_max = max(mismatch_max, float(delta.max()))
                mismatch_sum += float(delta.sum())

        grad_norm = float("nan")
        if finite:
            params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
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
        out = {k: v / max(weight_total, 1.0) for k, v in sums.items()}
        out.update({"train/loss": total_loss, "train/grad_norm": grad_norm, "train/skipped_nonfinite": 0.0,
                    "train/entropy": entropy_sum / max(weight_total, 1.0),
                    "train/lr": self.optimizer.param_groups[0]["lr"]})
        if measure_mismatch and batch.old_logp is not None:
            out["rollout/logp_mismatch_max"] = mismatch_max
            out["rollout/logp_mismatch_mean"] = mismatch_sum / max(weight_total, 1.0)
        return out
