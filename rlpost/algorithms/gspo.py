"""GSPO: Group Sequence Policy Optimization (Zheng et al., 2025, arXiv:2507.18071).

GRPO's group-normalised advantage, but the importance ratio and its clipping act on whole sequences:

    s_i  = exp( mean_t (log pi(y_it) - log pi_old(y_it)) )       length-normalised sequence ratio
    loss = mean over sequences of -min(s_i * A_i, clip(s_i, 1 - clip_low, 1 + clip_high) * A_i)

so one outlier token cannot dominate the update. The paper's clip range is tiny (3e-4 / 4e-4) because
s_i is a geometric mean. Deviation: the KL and entropy options of the family remain available (off).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlpost.algorithms.base import PGConfig, PolicyGradient, group_normalise, register
from rlpost.batch import Batch
from rlpost.ops import masked_mean


@register("gspo")
class GSPO(PolicyGradient):
    description = "sequence-level importance ratio and clipping, group-normalised advantage"

    @dataclass
    class Config(PGConfig):
        clip_low: float = 3e-4
        """sequence-ratio lower clip (paper: 3e-4)"""
        clip_high: float = 4e-4
        """sequence-ratio upper clip (paper: 4e-4)"""
        loss_agg: str = "seq-mean-token-mean"
        """the loss is a mean over sequences"""

    def sequence_advantages(self, rewards, batch):
        return group_normalise(rewards, batch.group_ids, self.cfg.eps)

    def policy_loss(self, logp: torch.Tensor, batch: Batch):
        mask = batch.response_mask.bool()
        log_ratio = torch.where(mask, logp - batch.old_logp, torch.zeros_like(logp))
        seq_log_ratio = masked_mean(log_ratio, mask, 1)                      # [B]
        s = torch.exp(seq_log_ratio)
        first = mask.float().argmax(1)                                        # each row's first response token
        adv = batch.advantages[torch.arange(len(batch), device=mask.device), first]  # A_i (same on every token)
        clipped = torch.clamp(s, 1 - self.cfg.clip_low, 1 + self.cfg.clip_high)
        per_seq = -torch.min(s * adv, clipped * adv)                          # [B]
        with torch.no_grad():
            rows = mask.any(1)
            n = max(int(rows.sum()), 1)
            metrics = {"loss/clip_frac_low": float(((s < 1 - self.cfg.clip_low) & (adv < 0) & rows).sum()) / n,
                       "loss/clip_frac_high": float(((s > 1 + self.cfg.clip_high) & (adv > 0) & rows).sum()) / n,
                       "loss/approx_kl_old": float((((s - 1) - seq_log_ratio) * rows).sum()) / n,
                       "loss/ratio_mean": float((s * rows).sum()) / n}
        # Spread each sequence's loss over its tokens; seq-mean-token-mean then gives the mean over sequences.
        return per_seq[:, None].expand_as(logp), metrics
