"""ORPO: Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model"
(arXiv:2403.07691), eqs. 2-7. No reference model, no separate SFT stage needed:

    log P(y|x) = (1/|y|) * sum_t log pi(y_t | x, y_<t)            (length-averaged, eq. 2)
    odds(y|x)  = P(y|x) / (1 - P(y|x))
    L_OR       = -log sigma( log odds(y_w|x) - log odds(y_l|x) )
    L          = L_SFT + lambda * L_OR,   L_SFT = -log P(y_w|x)     (NLL of the chosen completion)

`beta` is the paper's lambda (TRL's name for it). log(1 - P) is computed stably as log(-expm1(log P)),
with log P clamped to <= -1e-12 so that a completion of probability exactly 1 gives a large finite
odds instead of inf (the only deviation). The implicit reward reported is beta * log P(y|x) (as TRL).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from rlpost.preference.base import PreferenceLoss, SeqLogps, pair_metrics, register
from rlpost.schema import Range, at_least


def log_odds(avg_logp: torch.Tensor) -> torch.Tensor:
    """log(P / (1 - P)) from log P."""
    x = avg_logp.clamp(max=-1e-12)
    return x - torch.log(-torch.expm1(x))


@register("orpo")
class ORPO(PreferenceLoss):
    description = "Odds-Ratio Preference Optimization: NLL on chosen + lambda * odds-ratio loss, no reference"
    uses_reference = False

    @dataclass
    class Config:
        beta: float = 0.1  # lambda in the paper: weight of the odds-ratio term

        ranges: ClassVar[dict[str, Range]] = {"beta": at_least(0, "0: SFT on the chosen completions alone")}

    def compute(self, policy: SeqLogps, reference: SeqLogps | None = None):
        avg = policy.logp / policy.length
        avg_c, avg_r = policy.chosen(avg), policy.rejected(avg)
        ratio = log_odds(avg_c) - log_odds(avg_r)
        or_loss = -F.logsigmoid(ratio)
        nll = -avg_c
        loss = (nll + self.cfg.beta * or_loss).mean()
        m = pair_metrics(policy, self.cfg.beta * avg_c.detach(), self.cfg.beta * avg_r.detach())
        m.update({"pref/nll_chosen": nll.mean().item(), "pref/odds_ratio_loss": or_loss.mean().item(),
                  "pref/log_odds_ratio": ratio.mean().item()})
        return loss, m
