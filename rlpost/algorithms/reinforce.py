"""REINFORCE (Williams, 1992): the policy-gradient theorem, sample by sample.

    grad J = E[ (R - b) * grad log pi(y) ],  loss = -(R - b) * log pi(y_t | y_<t), token mean

with a baseline b that does not depend on the sample:
    none           b = 0
    batch_mean     b = mean reward of this batch (the textbook version)
    moving_average b = exponential moving average of past batch means (momentum `ema`); it is read
                   *before* this batch updates it; the first batch starts it at its own mean.
No ratio and no clipping: this is the estimator every other algorithm here patches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from rlpost.algorithms.base import PGConfig, PolicyGradient, register
from rlpost.batch import Batch
from rlpost.schema import Range, between

BASELINES = ("none", "batch_mean", "moving_average")


def reinforce_loss(self, logp: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
    """-A * log pi per token (the REINFORCE estimator; gradient A * grad log pi)."""
    mask = batch.response_mask.bool()
    return -torch.where(mask, batch.advantages * logp, torch.zeros_like(logp)), {}


@register("reinforce")
class REINFORCE(PolicyGradient):
    description = "R * grad log pi with a baseline: none, batch mean or moving average"

    @dataclass
    class Config(PGConfig):
        baseline: str = "batch_mean"
        """none | batch_mean | moving_average"""
        ema: float = 0.9
        """moving_average: weight of the past in the baseline"""

        # 1 would freeze the baseline at the first batch's mean forever
        ranges: ClassVar[dict[str, Range]] = {"ema": between(0, 1, "0: the previous batch's mean", high_open=True)}

    def __init__(self, **params):
        super().__init__(**params)
        if self.cfg.baseline not in BASELINES:
            raise ValueError(f"reinforce: baseline={self.cfg.baseline!r}; valid: {', '.join(BASELINES)}")
        self.running: float | None = None

    def state_dict(self) -> dict:
        return {"running": self.running}

    def load_state_dict(self, state: dict) -> None:
        self.running = state["running"]

    def sequence_advantages(self, rewards, batch):
        if self.cfg.baseline == "none":
            return rewards.float()
        if self.cfg.baseline == "batch_mean":
            return rewards.float() - rewards.float().mean()
        b = float(rewards.mean()) if self.running is None else self.running
        self.running = float(rewards.mean()) if self.running is None else \
            self.cfg.ema * self.running + (1 - self.cfg.ema) * float(rewards.mean())
        return rewards.float() - b

    policy_loss = reinforce_loss
