"""SAPO: Soft Adaptive Policy Optimization (Gao et al., Qwen team, 2025, arXiv:2511.20347).

GRPO's group-normalised advantage, but PPO's hard clip is replaced by a smooth, temperature-controlled
gate on the token ratio rho = pi_theta / pi_old, with one temperature for positive advantages and another
for negative ones:

    tau_t     = tau_pos if A_i > 0 else tau_neg
    f(rho)    = (4 / tau) * sigmoid(tau * (rho - 1))                    the soft gate
    loss      = -(1 / G) * sum_i (1 / |y_i|) * sum_t f(rho_t) * A_i     (loss_agg=seq-mean-token-mean)

Its gradient with respect to log pi_theta(y_t) is the on-policy one times a smooth weight:

    d f(rho) / d log pi = w(rho) * rho,    w(rho) = 4 p (1 - p) = sech^2(tau (rho - 1) / 2),
    p = sigmoid(tau (rho - 1))

so w(1) = 1 for every temperature (at rho = 1 the gradient is exactly REINFORCE's / GRPO's), w decays
smoothly and never reaches 0 as rho leaves 1 (no zero-gradient plateau where PPO clips), faster for a
larger tau; as tau -> 0, w -> 1 everywhere and the loss becomes the unclipped surrogate -rho * A (up to a
constant). The paper sets tau_neg > tau_pos because negative-advantage updates raise the logits of many
unsampled tokens and destabilise training; its defaults are tau_pos = 1.0, tau_neg = 1.05. Its objective has
no KL term (beta = 0) and normalises as above: a mean over sequences of per-sequence token means.

Deviations from the paper:

1. log rho is clamped to [-20, 20] before exp() so that an extreme token cannot overflow into inf * 0 = NaN
   in the backward pass (for |log rho| that large the gate is saturated and w is 0 in float32 anyway);
2. a group of one sample, or of equal rewards, gets advantage 0 (its tokens then carry no loss);
3. the family's clip_low / clip_high are not used; its KL, entropy and rollout-correction options remain
   available (off by default).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from rlpost.algorithms.base import register
from rlpost.algorithms.grpo import GRPO
from rlpost.batch import Batch
from rlpost.ops import masked_mean_value
from rlpost.schema import Range, above

LOG_RATIO_LIMIT = 20.0


@register("sapo")
class SAPO(GRPO):  # GRPO's group-normalised advantage; its own policy loss
    description = "smooth sigmoid gate on the ratio instead of PPO's clip, a temperature per advantage sign"

    @dataclass
    class Config(GRPO.Config):
        tau_pos: float = 1.0
        """gate temperature for tokens with a positive advantage (paper: 1.0)"""
        tau_neg: float = 1.05
        """gate temperature for tokens with a zero or negative advantage (paper: 1.05; > tau_pos)"""
        beta: float = 0.0
        """KL-to-reference weight (the paper's objective has none); 0 skips the reference model"""
        loss_agg: str = "seq-mean-token-mean"
        """the paper's normalisation: mean over sequences of per-sequence token means"""

        ranges: ClassVar[dict[str, Range]] = {"tau_pos": above(0), "tau_neg": above(0)}

    def policy_loss(self, logp: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Per token: -(4 / tau) * sigmoid(tau * (rho - 1)) * A, tau chosen by the sign of A."""
        mask = batch.response_mask.bool()
        adv = batch.advantages
        # log rho is zeroed off the response so exp() of padding garbage cannot make inf * 0 = NaN.
        log_ratio = torch.where(mask, logp - batch.old_logp, torch.zeros_like(logp))
        ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
        tau = torch.where(adv > 0, torch.full_like(ratio, self.cfg.tau_pos), torch.full_like(ratio, self.cfg.tau_neg))
        p = torch.sigmoid(tau * (ratio - 1))
        per_token = -(4 / tau) * p * adv
        with torch.no_grad():
            metrics = {
                "loss/gate_weight_mean": masked_mean_value(4 * p * (1 - p), mask),  # w(rho); 1 on-policy
                "loss/approx_kl_old": masked_mean_value((ratio - 1) - log_ratio, mask),
                "loss/ratio_mean": masked_mean_value(ratio, mask),
            }
        return per_token, metrics
