"""What every algorithm shares: the plug-in base class and the math helpers the losses reuse.

An algorithm is a class with a nested `Config` dataclass (its knobs, one help line each) and exactly
two methods:

    batch = algo.compute_advantages(batch)          # fills batch.advantages [B, T]
    loss, metrics = algo.compute_loss(logp, batch)  # logp [B, T]: current policy, with grad

It owns no model and no optimizer. Metrics are floats computed without grad, with namespaced keys.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from rlpost.batch import Batch


class Algorithm:
    """Base class: builds `self.cfg` from keyword parameters, naming any unknown one."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    @dataclasses.dataclass
    class Config:
        pass

    def __init__(self, **params: Any):
        valid = [f.name for f in dataclasses.fields(self.Config)]
        unknown = [k for k in params if k not in valid]
        if unknown:
            raise ValueError(f"unknown parameter(s) {', '.join(map(repr, unknown))} for algorithm "
                             f"'{self.name}'; valid parameters: {', '.join(valid) or '(none)'}")
        self.cfg = self.Config(**params)

    @property
    def uses_reference(self) -> bool:
        """True when compute_loss reads batch.ref_logp (the controller then runs the reference role)."""
        return False

    def compute_advantages(self, batch: Batch) -> Batch:
        raise NotImplementedError

    def compute_loss(self, logp: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman, "Approximating KL divergence").

    k1 = log(pi/pi_ref)                 unbiased, can be negative
    k2 = 0.5 * log(pi/pi_ref)^2         biased, low variance
    k3 = pi_ref/pi - log(pi_ref/pi) - 1 unbiased, always >= 0
    """
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        return torch.exp(-log_ratio) + log_ratio - 1.0
    raise ValueError(f"unknown KL estimator {kind!r}; valid: k1, k2, k3")


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of x over mask, with masked entries replaced (not multiplied) so inf/NaN there cannot leak in."""
    return torch.where(mask.bool(), x, torch.zeros_like(x)).sum()


def token_mean(per_token: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Sum over response tokens / response tokens in the whole batch (micro-batches sum to the batch mean)."""
    denom = batch.global_tokens if batch.global_tokens is not None else batch.response_mask.sum().item()
    return masked_sum(per_token, batch.response_mask) / max(float(denom), 1.0)


@torch.no_grad()
def masked_mean_value(x: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of x over mask as a float (for metrics)."""
    n = mask.sum().item()
    return masked_sum(x.float(), mask).item() / n if n else 0.0
