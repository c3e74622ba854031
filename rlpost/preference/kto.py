"""KTO: Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization"
(arXiv:2402.01306), eq. 8. Unpaired data: each completion is labelled desirable or undesirable.

    r(x, y) = log pi(y|x) - log pi_ref(y|x)                 (sums over tokens)
    z_ref   = max(0, mean_batch[ log pi(y'|x) - log pi_ref(y'|x) ])   y' a mismatched completion
    L       = lambda_D * (1 - sigma(beta * (r - z_ref)))   for desirable y
              lambda_U * (1 - sigma(beta * (z_ref - r)))   for undesirable y
    loss    = mean over the batch's rows

z_ref is the paper's reference point: a biased but clamped estimate of KL(pi || pi_ref) over the
batch, from each prompt paired with another row's completion (a fixed shift over the dataset, as
TRL's KL dataset does), and no gradient flows through it (as in the paper). The implicit reward
reported is beta * r. Deviation: none in the loss; `pref/accuracy` is not reported (rows are
unpaired), `pref/reward_margin` is mean desirable reward - mean undesirable reward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from rlpost.preference.base import PreferenceLoss, SeqLogps, register
from rlpost.schema import Range, above


@register("kto")
class KTO(PreferenceLoss):
    description = "Kahneman-Tversky Optimization: unpaired desirable/undesirable rows, reference point z_ref"
    paired = False

    @dataclass
    class Config:
        beta: float = 0.1
        desirable_weight: float = 1.0    # lambda_D
        undesirable_weight: float = 1.0  # lambda_U

        ranges: ClassVar[dict[str, Range]] = {"beta": above(0), "desirable_weight": above(0),
                                              "undesirable_weight": above(0)}

    @staticmethod
    def reference_point(policy: SeqLogps, reference: SeqLogps) -> torch.Tensor:
        """z_ref = max(0, mean KL estimate on mismatched pairs), detached."""
        if policy.kl_logp is None or reference.kl_logp is None or policy.kl_logp.numel() == 0:
            raise ValueError("KTO needs log-probs of mismatched (prompt, completion) pairs for its reference point")
        return (policy.kl_logp - reference.kl_logp).mean().clamp(min=0).detach()

    def compute(self, policy: SeqLogps, reference: SeqLogps):
        beta, c = self.cfg.beta, self.cfg
        z = self.reference_point(policy, reference)
        r = policy.logp - reference.logp
        good = policy.label == 1.0
        per_row = torch.where(good, c.desirable_weight * (1 - torch.sigmoid(beta * (r - z))),
                              c.undesirable_weight * (1 - torch.sigmoid(beta * (z - r))))
        loss = per_row.mean()
        with torch.no_grad():
            def mean(x, m):
                return x[m].mean().item() if m.any() else float("nan")

            reward = beta * r
            m = {"pref/kl_ref": z.item(),
                 "pref/reward_chosen": mean(reward, good), "pref/reward_rejected": mean(reward, ~good),
                 "pref/logp_chosen": mean(policy.logp, good), "pref/logp_rejected": mean(policy.logp, ~good),
                 "pref/logp_chosen_vs_ref": mean(r, good), "pref/logp_rejected_vs_ref": mean(r, ~good),
                 "pref/desirable_frac": good.float().mean().item()}
            m["pref/reward_margin"] = m["pref/reward_chosen"] - m["pref/reward_rejected"]
        return loss, m
