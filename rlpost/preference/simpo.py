"""SimPO: Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward"
(arXiv:2405.14734), eq. 6. No reference model:

    L = -log sigma( beta/|y_w| * log pi(y_w|x) - beta/|y_l| * log pi(y_l|x) - gamma )

The implicit reward is the length-normalised log-prob beta/|y| * log pi(y|x); gamma is the target
reward margin. Defaults beta = 2.0, gamma = 1.0 (gamma/beta = 0.5, inside the paper's tuned range).
No deviation from the paper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn.functional as F

from rlpost.preference.base import PreferenceLoss, SeqLogps, pair_metrics, register
from rlpost.schema import Range, above, at_least


@register("simpo")
class SimPO(PreferenceLoss):
    description = "Simple Preference Optimization: length-normalised log-prob margin minus gamma, no reference"
    uses_reference = False

    @dataclass
    class Config:
        beta: float = 2.0   # scale of the length-normalised reward
        gamma: float = 1.0  # target reward margin

        ranges: ClassVar[dict[str, Range]] = {"beta": above(0), "gamma": at_least(0, "0: no target margin")}

    def compute(self, policy: SeqLogps, reference: SeqLogps | None = None):
        reward = self.cfg.beta * policy.logp / policy.length
        reward_c, reward_r = policy.chosen(reward), policy.rejected(reward)
        loss = -F.logsigmoid(reward_c - reward_r - self.cfg.gamma).mean()
        return loss, pair_metrics(policy, reward_c.detach(), reward_r.detach())
