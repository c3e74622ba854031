"""PPO: Proximal Policy Optimization (Schulman et al., 2017, arXiv:1707.06347) as used for RLHF
(Ouyang et al., 2022, InstructGPT): a learned critic, GAE, a clipped surrogate, several epochs.

    r_t     = outcome reward on the last token, - beta * KL_t folded in (kl_in = reward, InstructGPT)
    delta_t = r_t + gamma * V(t+1) - V(t);   A_t = delta_t + gamma * lambda * A_(t+1)    (GAE, per response)
    R_t     = A_t + V(t)                                                    (value targets, batch.returns)
    loss    = PPO clipped surrogate on whitened A  +  vf_coef * 0.5 * max((V - R)^2, (V_clip - R)^2)

with V_clip = V_old + clip(V - V_old, -vf_clip, vf_clip). values[b, t] is the critic's estimate before
token t is emitted (it reads the hidden state at t-1), aligned with input_ids like log-probs. The critic
(a value head on the policy, or a separate copy: `critic.type`) is built by the RL stage
(rlpost/stages/rl.py); several epochs and minibatches per rollout batch are the trainer's `epochs` /
`minibatches`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from rlpost import distributed as dist
from rlpost.algorithms.base import PGConfig, PolicyGradient, aggregate, register
from rlpost.batch import Batch
from rlpost.ops import masked_mean_value, masked_whiten
from rlpost.schema import Range, above, at_least, between


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over the masked (response) positions. Returns (advantages, returns) [B, T].

    Positions off the mask are skipped: a response's last token bootstraps from 0 (the episode ends).
    """
    m = mask.float()
    values = values * m
    adv = torch.zeros_like(rewards)
    next_adv = torch.zeros(rewards.shape[0], device=rewards.device)
    next_value = torch.zeros(rewards.shape[0], device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        live = m[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_adv
        adv[:, t] = a * live
        # carry the recursion only through response positions
        next_adv = torch.where(live.bool(), a, next_adv)
        next_value = torch.where(live.bool(), values[:, t], next_value)
    return adv, (adv + values) * m


@register("ppo")
class PPO(PolicyGradient):
    description = "learned critic, GAE(gamma, lambda), clipped surrogate and value loss, epochs x minibatches"

    @dataclass
    class Config(PGConfig):
        beta: float = 0.05
        """KL weight, folded into the reward as in InstructGPT"""
        kl_in: str = "reward"
        """where the KL goes (InstructGPT: in the reward)"""
        kl_estimator: str = "k1"
        """InstructGPT's per-token log-ratio"""
        gamma: float = 1.0
        """discount"""
        lam: float = 0.95
        """GAE lambda (1: Monte-Carlo returns, 0: one-step TD)"""
        vf_coef: float = 0.5
        """weight of the value loss"""
        vf_clip: float = 0.2
        """value clipping range around the rollout-time value"""
        whiten_advantages: bool = True
        """standardise advantages over the batch's response tokens"""

        ranges: ClassVar[dict[str, Range]] = {
            "gamma": between(0, 1, "0: each token's own reward; 1: no discount"),
            "lam": between(0, 1, "0: one-step TD; 1: Monte-Carlo returns"),
            "vf_coef": at_least(0, "0: no value loss, the critic stays as it is"), "vf_clip": above(0)}

    @property
    def uses_critic(self) -> bool:
        return True

    def compute_advantages(self, batch: Batch) -> Batch:
        if batch.values is None:
            raise ValueError("ppo needs batch.values from the critic (rollout-time values)")
        adv, returns = gae(self.token_rewards(batch), batch.values.float(), batch.response_mask, self.cfg.gamma,
                           self.cfg.lam)
        if self.cfg.whiten_advantages:
            # sharded (fsdp2, each rank its rows): over every rank's, as one process whitens the whole batch
            adv = (dist.whiten_over_ranks if dist.world_size() > 1 else masked_whiten)(adv, batch.response_mask,
                                                                                   self.cfg.eps)
        return batch.replace(advantages=self.clip_advantages(adv), returns=returns)

    def compute_loss(self, logp: torch.Tensor, batch: Batch):
        loss, metrics = super().compute_loss(logp, batch)
        if batch.new_values is None:
            raise ValueError("ppo.compute_loss needs batch.new_values (the trainer sets them from the critic)")
        mask = batch.response_mask.bool()
        v, v_old, ret = batch.new_values, batch.values, batch.returns
        v_clipped = v_old + torch.clamp(v - v_old, -self.cfg.vf_clip, self.cfg.vf_clip)
        vf_per_token = 0.5 * torch.max((v - ret) ** 2, (v_clipped - ret) ** 2)
        vf_loss = aggregate(vf_per_token, batch, self.cfg.loss_agg, self.cfg.norm_length)
        with torch.no_grad():  # (value/explained_variance is the step batch's: rlpost.controller.advantage_metrics)
            metrics["value/loss"] = masked_mean_value(vf_per_token, mask)
            metrics["value/clip_frac"] = masked_mean_value(((v - v_old).abs() > self.cfg.vf_clip).float(), mask)
            metrics["value/mean"] = masked_mean_value(v, mask)
        return loss + self.cfg.vf_coef * vf_loss, metrics
