"""RLOO: REINFORCE Leave-One-Out ("Back to Basics", Ahmadian et al., 2024, arXiv:2402.14740;
Kool et al., 2019, "Buy 4 REINFORCE samples, get a baseline for free").

Each sample's baseline is the mean reward of the *other* K-1 samples of its prompt, which makes the
baseline independent of the sample and the estimator unbiased:

    A_i = r_i - (sum_j r_j - r_i) / (K - 1)  =  K/(K-1) * (r_i - mean(r_group))

The loss is the plain REINFORCE estimator -A * log pi, token mean, as in the paper (no ratio, no
clipping: with one update per batch the two coincide). Deviation: beta (KL in the loss) is available;
the paper folds a KL penalty into the reward (kl_in=reward).
"""

from __future__ import annotations

import torch

from rlpost.algorithms.base import PolicyGradient, group_normalise, register
from rlpost.algorithms.reinforce import reinforce_loss


@register("rloo")
class RLOO(PolicyGradient):
    description = "leave-one-out group baseline, plain REINFORCE loss (unbiased)"

    def sequence_advantages(self, rewards, batch):
        _, inverse, counts = torch.unique(batch.group_ids, return_inverse=True, return_counts=True)
        k = counts[inverse].float()
        centred = group_normalise(rewards, batch.group_ids, self.cfg.eps, divide_std=False)
        return centred * k / (k - 1).clamp(min=1)

    policy_loss = reinforce_loss
