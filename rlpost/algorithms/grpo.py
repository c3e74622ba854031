"""GRPO: Group Relative Policy Optimization (Shao et al., 2024, DeepSeekMath, arXiv:2402.03300).

For each prompt, K completions form a group; a completion's advantage is its reward standardised
within the group, broadcast to all its tokens:

    A_i = (r_i - mean(r_group)) / (std(r_group) + eps)          (std: unbiased, as torch.std)
    loss = token-mean over response tokens of
           -( min(rho * A, clip(rho, 1 - clip_low, 1 + clip_high) * A) - beta * k3(pi, pi_ref) )

with rho = pi_theta / pi_old per token. This is the reference GRPO + RLVR step rlpost
follows (re-implemented line for line in tests/test_grpo.py) and is tested against it to 1e-6.
Deviations from the paper:

1. asymmetric clipping ("clip-higher", from DAPO, arXiv:2503.14476); clip_high = clip_low gives the
   paper's symmetric clip;
2. the loss is a token mean over the whole batch (the reference step's and DAPO's choice), not the paper's
   mean over sequences of per-sequence token means (loss_agg=seq-mean-token-mean restores it);
3. a group of one sample, or a group whose rewards are all equal, gets advantage exactly 0 (no NaN,
   and no rounding noise blown up by a near-zero std).
"""

from __future__ import annotations

from dataclasses import dataclass

from rlpost.algorithms.base import PGConfig, PolicyGradient, group_normalise, register


@register("grpo")
class GRPO(PolicyGradient):
    description = "group-normalised advantage, asymmetric PPO clip, k3 KL to the reference in the loss"

    @dataclass
    class Config(PGConfig):
        clip_high: float = 0.28
        """ratio upper clip (paper: 0.2; DAPO's clip-higher: 0.28)"""
        beta: float = 0.04
        """weight of the k3 KL-to-reference penalty (paper: 0.04); 0 skips the reference"""

    def sequence_advantages(self, rewards, batch):
        if batch.group_ids is None:
            raise ValueError(f"{self.name} needs batch.group_ids [B]")
        return group_normalise(rewards, batch.group_ids, self.cfg.eps)
