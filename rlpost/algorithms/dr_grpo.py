"""Dr. GRPO: "Understanding R1-Zero-Like Training: A Critical Perspective" (Liu et al., 2025, arXiv:2503.20783).

GRPO with its two biased divisors deleted:

    A_i  = r_i - mean(r_group)                        no division by the group std (difficulty bias)
    loss = sum over response tokens / (sequences * norm_length)
                                                      no division by each response's length (length bias)

norm_length is a constant (the paper uses the generation budget); None uses the batch's response
width. Everything else is GRPO. Deviations: clip-higher is kept available but off (clip_high = 0.2);
beta defaults to 0 as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlpost.algorithms.base import PGConfig, PolicyGradient, group_normalise, register


@register("dr_grpo")
class DrGRPO(PolicyGradient):
    description = "GRPO without the std and per-length divisors (unbiased group baseline)"

    @dataclass
    class Config(PGConfig):
        loss_agg: str = "seq-mean-token-sum-norm"
        """sum over tokens / (sequences * norm_length): no per-sequence length normalisation"""

    def sequence_advantages(self, rewards, batch):
        return group_normalise(rewards, batch.group_ids, self.cfg.eps, divide_std=False)
