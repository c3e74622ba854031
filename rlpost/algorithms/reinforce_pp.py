"""REINFORCE++ (Hu, 2025, arXiv:2501.03262): REINFORCE with PPO's tricks and no critic.

The KL penalty is folded into a per-token reward (k1 estimator, as the paper), returns-to-go are
summed with gamma = 1, and the advantages are whitened over *all response tokens of the batch*
(global normalisation, instead of GRPO's per-group statistics):

    r_t = -beta * KL_t (+ outcome reward on the last token),  G_t = sum_{t' >= t} r_t',
    A   = (G - mean_batch(G)) / std_batch(G),   loss = PPO clipped surrogate, token mean

`gamma` < 1 discounts the returns-to-go, G_t = sum_{t' >= t} gamma^(t' - t) r_t'; gamma = 0 gives each token
its own reward alone (what on-policy distillation's per-token reverse KL is usually trained with:
rlpost/env/teacher.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from rlpost import distributed as dist
from rlpost.algorithms.base import PGConfig, PolicyGradient, register
from rlpost.batch import Batch
from rlpost.ops import masked_whiten
from rlpost.schema import Range, between


def discounted_returns(rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """[B, T] returns-to-go G_t = sum_{t' >= t} gamma^(t' - t) r_t' (off-response rewards are 0)."""
    if gamma == 1.0:
        return rewards.flip(1).cumsum(1).flip(1)
    if gamma == 0.0:
        return rewards.clone()
    returns, running = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return returns


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
        gamma: float = 1.0
        """discount of the returns-to-go (the paper: 1; 0: each token's own reward)"""

        ranges: ClassVar[dict[str, Range]] = {"gamma": between(0, 1, "0: each token's own reward; 1: no discount")}

    def compute_advantages(self, batch: Batch) -> Batch:
        r = self.token_rewards(batch)                          # [B, T]
        returns = discounted_returns(r, self.cfg.gamma)        # G_t = sum_{t' >= t} gamma^(t' - t) r_t'
        # sharded (fsdp2, each rank its rows): over every rank's, as one process whitens the whole batch
        adv = (dist.whiten_over_ranks if dist.world_size() > 1 else masked_whiten)(returns, batch.response_mask,
                                                                               self.cfg.eps)
        return batch.replace(advantages=self.clip_advantages(adv))
