"""DPO: Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a
Reward Model" (arXiv:2305.18290), eq. 7:

    L = -log sigma( beta * [ (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)) ] )

Log-probs are sums over the completion's tokens, as in the paper. The implicit reward of a completion
is beta * (log pi(y|x) - log pi_ref(y|x)) (section 5). `label_smoothing` eps > 0 gives conservative DPO
(Mitchell 2023): -(1 - eps) log sigma(beta h) - eps log sigma(-beta h); 0 (default) is the paper's loss.
No deviation from the paper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn.functional as F

from rlpost.preference.base import PreferenceLoss, SeqLogps, pair_metrics, register
from rlpost.schema import Range, above, between


@register("dpo")
class DPO(PreferenceLoss):
    description = "Direct Preference Optimization: -log sigma(beta * log-ratio margin vs the reference)"

    @dataclass
    class Config:
        beta: float = 0.1             # strength of the implicit KL anchor to the reference
        label_smoothing: float = 0.0  # conservative DPO: assumed fraction of flipped labels

        ranges: ClassVar[dict[str, Range]] = {"beta": above(0),
                                              "label_smoothing": between(0, 0.5, "0: plain DPO", high_open=True)}

    def compute(self, policy: SeqLogps, reference: SeqLogps):
        beta, eps = self.cfg.beta, self.cfg.label_smoothing
        reward_c = beta * (policy.chosen(policy.logp) - reference.chosen(reference.logp))
        reward_r = beta * (policy.rejected(policy.logp) - reference.rejected(reference.logp))
        margin = reward_c - reward_r
        loss = (-(1 - eps) * F.logsigmoid(margin) - eps * F.logsigmoid(-margin)).mean()
        return loss, pair_metrics(policy, reward_c, reward_r, reference)
