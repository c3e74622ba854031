"""REINFORCE++ (Hu, 2025, arXiv:2501.03262): REINFORCE with PPO's tricks and no critic.

The KL penalty is folded into a per-token reward (k1 estimator, as the paper), returns-to-go are
summed with gamma = 1, and the advantages are whitened over *all response tokens of the batch*
(global normalisation, instead of GRPO's per-group statistics):

    r_t = -beta * KL_t (+ outcome reward on the last token),  G_t = sum_{t' >= t} r_t',
    A   = (G - mean_batch(G)) / std_batch(G),   loss = PPO clipped surrogate, token mean
"""

from __future__ import annotations

from dataclasses import dataclass

from rlpost.algorithms import register
from rlpost.algorithms.base import PGConfig, PolicyGradient, masked_whiten
from rlpost.batch import Batch


@register("reinforce_pp")
class REINFORCEPlusPlus(PolicyGradient):
    description = "KL-shaped token rewards, returns-to-go, advantages whitened over the whole batch"

    @dataclass
    class Config(PGConfig):
        beta: float = 0.01
        """KL weight in the reward (paper: 0.01)"""
        kl_in: str = "reward"
        """the paper folds the KL into the token rewards"""
        kl_estimator: str = "k1"
        """the paper's estimator"""

    def compute_advantages(self, batch: Batch) -> Batch:
        r = self.token_rewards(batch)                          # [B, T]
        returns = r.flip(1).cumsum(1).flip(1)                  # G_t = sum_{t' >= t} r_t'
        adv = masked_whiten(returns, batch.response_mask, self.cfg.eps)
        return batch.replace(advantages=self.clip_advantages(adv))
