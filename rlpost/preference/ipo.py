"""IPO: Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
Preferences" (arXiv:2310.12036), eq. 17 (the empirical IPO loss):

    h = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))
    L = (h - 1 / (2 * tau))^2          (tau is `beta` here)

A squared loss: the margin is pulled to a finite target instead of pushed to infinity, so IPO does
not overfit deterministic preferences as DPO can.

Convention (stated, configurable): with `average_logprobs=True` (default) every log pi above is the
*length-averaged* log-prob (sum / completion tokens), the convention of TRL's `loss_type="ipo"`
(it divides the sequence log-prob by the completion length for IPO only); `average_logprobs=False`
uses sums over tokens, the paper's sequence probabilities taken literally. The implicit reward reported is
beta * (log pi - log pi_ref) under the same convention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from rlpost.preference.base import PreferenceLoss, SeqLogps, pair_metrics, register
from rlpost.schema import Range, above


@register("ipo")
class IPO(PreferenceLoss):
    description = "Identity Preference Optimization: (log-ratio margin - 1/(2 beta))^2"

    @dataclass
    class Config:
        beta: float = 0.1              # tau in the paper: the target margin is 1 / (2 beta)
        average_logprobs: bool = True  # length-averaged log-probs (True) or sums over tokens (False)

        ranges: ClassVar[dict[str, Range]] = {"beta": above(0)}  # the target margin is 1 / (2 beta)

    def compute(self, policy: SeqLogps, reference: SeqLogps):
        norm_p = policy.length if self.cfg.average_logprobs else 1.0
        norm_r = reference.length if self.cfg.average_logprobs else 1.0
        ratio = policy.logp / norm_p - reference.logp / norm_r  # per sequence, under the chosen convention
        h = policy.chosen(ratio) - policy.rejected(ratio)
        loss = ((h - 1.0 / (2.0 * self.cfg.beta)) ** 2).mean()
        beta = self.cfg.beta
        return loss, pair_metrics(policy, beta * policy.chosen(ratio), beta * policy.rejected(ratio), reference)
