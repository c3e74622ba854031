"""CISPO: Clipped IS-weight Policy Optimization (MiniMax-M1 technical report, arXiv:2506.13585).

GRPO's group-normalised advantage, but the importance-sampling weight is clipped and detached instead of
the update being clipped, so every token keeps its gradient through log pi:

    rho_t   = pi_theta(y_t) / pi_old(y_t)
    w_t     = sg(clip(rho_t, 1 - clip_low, 1 + clip_high))               sg: stop-gradient (a constant)
    loss    = -(1 / sum_i |y_i|) * sum_i sum_t  w_t * A_i * log pi_theta(y_t)
    d loss / d log pi_theta(y_t) = -w_t * A_i / N                       (N: response tokens in the batch)

PPO/GRPO's min(rho * A, clip(rho) * A) has zero gradient for a token whose ratio has left the clip range
in the direction of its advantage (the rare "fork" tokens the paper is about); here such a token only gets
its weight capped. The normalisation is the paper's: a token mean over the whole batch (loss_agg=token-mean).

Defaults: the paper "did not impose a lower bound on the IS weight by setting eps_low to a large value" and
tuned only eps_high; clip_low = 1 makes the lower bound 0, which a ratio never goes below. No value of the
tuned eps_high is taken from the paper, so clip_high keeps the clip-higher value of the grpo and dapo entries
(0.28): a choice of rlpost, not the paper's number. The paper's objective has no KL term (beta = 0).

Deviations from the paper:

1. clip_high = 0.28 is not sourced from the paper (see above);
2. the paper's unified form with a token mask M (which recovers PPO's trust region) is not implemented;
3. only the objective and its group-normalised advantage are implemented, none of the report's other
   training-recipe choices; a group of one sample, or of equal rewards, gets advantage 0;
4. the family's KL, entropy and rollout-correction options remain available (off by default).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlpost.algorithms.base import register
from rlpost.algorithms.grpo import GRPO
from rlpost.batch import Batch
from rlpost.ops import masked_mean_value


@register("cispo")
class CISPO(GRPO):  # GRPO's group-normalised advantage; its own policy loss
    description = "clipped, detached importance weight on log pi: no token loses its gradient (MiniMax-M1)"

    @dataclass
    class Config(GRPO.Config):
        clip_low: float = 1.0
        """IS-weight lower clip: w >= 1 - clip_low (paper: eps_low 'large', no lower bound; 1.0 gives bound 0)"""
        clip_high: float = 0.28
        """IS-weight upper clip: w <= 1 + clip_high (paper: tuned, no value sourced; rlpost's clip-higher)"""
        beta: float = 0.0
        """KL-to-reference weight (the paper's objective has none); 0 skips the reference model"""

    def policy_loss(self, logp: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Per token: -sg(clip(rho, 1 - clip_low, 1 + clip_high)) * A * log pi_theta."""
        mask = batch.response_mask.bool()
        adv = batch.advantages
        with torch.no_grad():  # the weight is a constant: the gradient flows through log pi only
            # log rho is zeroed off the response so exp() of padding garbage cannot make inf * 0 = NaN.
            log_ratio = torch.where(mask, logp - batch.old_logp, torch.zeros_like(logp))
            ratio = torch.exp(log_ratio)
            weight = torch.clamp(ratio, 1 - self.cfg.clip_low, 1 + self.cfg.clip_high)
        # log pi off the response is never read; zeroing it keeps garbage there out of the product.
        per_token = -weight * adv * torch.where(mask, logp, torch.zeros_like(logp))
        with torch.no_grad():
            metrics = {
                "loss/clip_frac_low": masked_mean_value((ratio < 1 - self.cfg.clip_low).float(), mask),
                "loss/clip_frac_high": masked_mean_value((ratio > 1 + self.cfg.clip_high).float(), mask),
                "loss/approx_kl_old": masked_mean_value((ratio - 1) - log_ratio, mask),
                "loss/ratio_mean": masked_mean_value(ratio, mask),
                "loss/is_weight_mean": masked_mean_value(weight, mask),
            }
        return per_token, metrics
