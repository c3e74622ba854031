"""REFERENCE: the frozen policy that anchors the KL term. It never receives a gradient.

    ref = Reference(policy)          # a frozen copy of the policy as it is now (the SFT checkpoint)
    batch = ref(batch)               # fills batch.ref_logp [B, T]
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from rlpost.batch import Batch
from rlpost.models import token_logprobs


class Reference:
    def __init__(self, policy: nn.Module, temperature: float = 1.0):
        self.model = copy.deepcopy(policy).eval()
        self.model.requires_grad_(False)
        self.temperature = temperature

    @torch.no_grad()
    def __call__(self, batch: Batch) -> Batch:
        ref_logp = token_logprobs(self.model, batch, self.temperature)
        return batch.replace(ref_logp=ref_logp * batch.response_mask)
