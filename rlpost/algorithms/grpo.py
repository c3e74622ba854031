"""GRPO: Group Relative Policy Optimization (Shao et al., 2024, DeepSeekMath, arXiv:2402.03300).

For each prompt, K completions form a group; a completion's advantage is its reward standardised
within the group, broadcast to all its tokens:

    A_i = (r_i - mean(r_group)) / (std(r_group) + eps)          (std: unbiased, as torch.std)
    loss = token-mean over response tokens of
           -( min(rho * A, clip(rho, 1 - clip_low, 1 + clip_high) * A) - beta * k3(pi, pi_ref) )

with rho = pi_theta / pi_old per token. This is the reference step of the seed lesson
(shared/seeds/002_e8bd019fa090e190.txt) and is tested against it to 1e-6. Deviations from the paper:

1. asymmetric clipping ("clip-higher", from DAPO, arXiv:2503.14476); clip_high = clip_low gives the
   paper's symmetric clip;
2. the loss is a token mean over the whole batch (the seed's and DAPO's choice), not the paper's
   mean over sequences of per-sequence token means;
3. a group of one sample, or a group whose rewards are all equal, gets advantage 0 (no NaN).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlpost.algorithms import register
from rlpost.algorithms.base import Algorithm, kl_estimate, masked_mean_value, token_mean
from rlpost.batch import Batch


def group_normalise(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float, divide_std: bool = True):
    """(r - group mean) / (group std + eps) for every row; rows of one-sample groups get 0. Returns [B]."""
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    r = rewards.float()
    n = counts.to(r.dtype)
    mean = torch.zeros_like(n).index_add_(0, inverse, r) / n
    centred = r - mean[inverse]
    if not divide_std:
        return torch.where(counts[inverse] > 1, centred, torch.zeros_like(centred))
    var = torch.zeros_like(n).index_add_(0, inverse, centred**2) / (n - 1).clamp(min=1)
    adv = centred / (var.sqrt()[inverse] + eps)
    return torch.where(counts[inverse] > 1, adv, torch.zeros_like(adv))


@register("grpo")
class GRPO(Algorithm):
    description = "group-normalised advantage, asymmetric PPO clip, k3 KL to the reference in the loss"

    @dataclass
    class Config:
        clip_low: float = 0.2
        """ratio lower clip: rho >= 1 - clip_low (paper: 0.2)"""
        clip_high: float = 0.28
        """ratio upper clip: rho <= 1 + clip_high (paper: 0.2; DAPO's clip-higher: 0.28)"""
        beta: float = 0.04
        """weight of the k3 KL-to-reference penalty (paper: 0.04); 0 skips the reference"""
        eps: float = 1e-6
        """added to the group std before dividing"""

    @property
    def uses_reference(self) -> bool:
        return self.cfg.beta > 0

    def compute_advantages(self, batch: Batch) -> Batch:
        if batch.rewards is None or batch.group_ids is None:
            raise ValueError("GRPO.compute_advantages needs batch.rewards [B] and batch.group_ids [B]")
        if batch.rewards.dim() != 1:
            raise ValueError("GRPO takes one outcome reward per sequence (rewards [B])")
        adv = group_normalise(batch.rewards, batch.group_ids, self.cfg.eps)  # [B]
        return batch.replace(advantages=adv[:, None] * batch.response_mask)  # same A_i on every token

    def compute_loss(self, logp: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        mask = batch.response_mask.bool()
        adv = batch.advantages
        # log rho is zeroed off the response so exp() of padding garbage cannot make inf * 0 = NaN.
        log_ratio = torch.where(mask, logp - batch.old_logp, torch.zeros_like(logp))
        ratio = torch.exp(log_ratio)
        clipped = torch.clamp(ratio, 1 - self.cfg.clip_low, 1 + self.cfg.clip_high)
        surrogate = torch.min(ratio * adv, clipped * adv)
        per_token = -surrogate
        kl = None
        if self.cfg.beta > 0:
            if batch.ref_logp is None:
                raise ValueError("GRPO with beta > 0 needs batch.ref_logp (run the reference role)")
            kl = kl_estimate(logp, torch.where(mask, batch.ref_logp, logp), "k3")
            per_token = per_token + self.cfg.beta * kl
        loss = token_mean(per_token, batch)

        with torch.no_grad():
            metrics = {
                "loss/clip_frac_low": masked_mean_value(((ratio < 1 - self.cfg.clip_low) & (adv < 0)).float(), mask),
                "loss/clip_frac_high": masked_mean_value(((ratio > 1 + self.cfg.clip_high) & (adv > 0)).float(), mask),
                "loss/approx_kl_old": masked_mean_value((ratio - 1) - log_ratio, mask),
                "loss/ratio_mean": masked_mean_value(ratio, mask),
            }
            if kl is not None:
                metrics["loss/kl_ref"] = masked_mean_value(kl, mask)
        return loss, metrics
