"""DAPO: Decoupled Clip and Dynamic sAmpling Policy Optimization (Yu et al., 2025, arXiv:2503.14476).

GRPO with four fixes:
1. clip-higher: clip_high (0.28) > clip_low (0.2), so low-probability tokens can still grow (entropy
   collapse);
2. dynamic sampling: groups whose rewards are all equal carry no signal; compute_advantages drops
   them and the controller refills the batch from new prompts (rollout.max_refill_rounds);
3. token-level loss: token mean over the batch, so long responses weigh by their tokens;
4. overlong soft penalty: with max_response_len L and overlong_buffer C, a response of length n gets
   an extra reward of 0 for n <= L - C, (L - C - n) / C for L - C < n <= L, and -1 beyond.
No KL term (beta = 0), as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from rlpost.algorithms.base import PGConfig, PolicyGradient, group_normalise, register, varied_groups
from rlpost.batch import Batch
from rlpost.schema import Range, at_least


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int) -> torch.Tensor:
    """DAPO's soft length penalty for response lengths [B]."""
    over = lengths.float() - (max_len - buffer)
    return torch.where(over <= 0, torch.zeros_like(over), torch.clamp(-over / buffer, min=-1.0))


@register("dapo")
class DAPO(PolicyGradient):
    description = "clip-higher, dynamic sampling (drops degenerate groups), token-level loss, overlong penalty"

    @dataclass
    class Config(PGConfig):
        clip_high: float = 0.28
        """clip-higher (paper: 0.28)"""
        max_response_len: int | None = None
        """overlong penalty: the length budget L (None: no penalty)"""
        overlong_buffer: int = 4
        """overlong penalty: the soft zone C before L"""
        dynamic_sampling: bool = True
        """drop groups whose rewards are all equal"""

        ranges: ClassVar[dict[str, Range]] = {"max_response_len": at_least(1), "overlong_buffer": at_least(1)}

    def sequence_rewards(self, batch: Batch) -> torch.Tensor:
        r = super().sequence_rewards(batch)
        if self.cfg.max_response_len:
            r = r + overlong_penalty(batch.response_mask.sum(1), self.cfg.max_response_len, self.cfg.overlong_buffer)
        return r

    def sequence_advantages(self, rewards, batch):
        return group_normalise(rewards, batch.group_ids, self.cfg.eps)

    def compute_advantages(self, batch: Batch) -> Batch:
        batch = super().compute_advantages(batch)
        if not self.cfg.dynamic_sampling:
            return batch
        keep = varied_groups(self.sequence_rewards(batch), batch.group_ids)
        return batch.select(keep.nonzero().squeeze(-1))
