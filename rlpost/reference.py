"""REFERENCE: the frozen policy that anchors the KL term. It never receives a gradient.

    ref = Reference(policy, cfg, params)  # a frozen copy of the policy as it is now (the SFT checkpoint)
    batch = ref(batch)                    # fills batch.ref_logp [B, T]

`cfg` is the `trainer.*` section (rlpost.config.TrainerConfig), `params` the rollout's SamplingParams.

With LoRA (model.lora) there is no copy: the reference is the policy's own module with its adapters off
(peft's enable_adapters(False), `rlpost.models.lora.adapters_disabled`), i.e. its frozen base, which every
stage's end folds the adapters into, so it is the policy as the stage started. That saves one whole set of
base weights (`shares_policy` says which).

The copy lives on the policy's device; a batch from any device is scored there and its ref_logp comes
back on the batch's device. It scores as the trainer does, from the same `trainer.*` section (`cfg`) and
the same sampling parameters (`params`): with precision="bf16" under bf16 autocast, at the temperature the
engine reports old_logp at (`params.logp_temperature`), so that the KL term compares log-probs computed
alike; and in the trainer's micro-batches (rows `micro_batch_size` at a time, at most `micro_batch_tokens`
positions each, packed with `packing`: see rlpost.packing), so no forward holds more than one micro-batch's
activations.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn

from rlpost import distributed as dist
from rlpost.batch import Batch
from rlpost.config import TrainerConfig
from rlpost.models import (autocast, check_packing, check_precision, model_device, set_gradient_checkpointing,
                           token_logprobs)
from rlpost.models.lora import adapters_disabled, is_lora
from rlpost.packing import micro_batches, scatter_rows
from rlpost.rollout.engine import SamplingParams


class Reference:
    def __init__(self, policy: nn.Module, cfg: TrainerConfig | None = None, params: SamplingParams | None = None):
        """`cfg`: the `trainer.*` section, whose precision, log-prob chunk and micro-batching (micro_batch_size,
        micro_batch_tokens, packing: rlpost.packing.micro_batches) the reference scores with (None: the
        defaults); `params`: the rollout's sampling parameters, scored at their log-prob temperature, the one
        the engine reports old_logp at (None: temperature 1)."""
        cfg = cfg or TrainerConfig()
        temperature = (params or SamplingParams()).logp_temperature
        check_precision(cfg.precision, model_device(policy))
        if cfg.packing:
            check_packing(policy)
        self.shares_policy = is_lora(policy)
        if self.shares_policy:
            self.model = policy
        else:
            # a sharded policy (an earlier stage of a fsdp2 run sharded it): a plain copy of its full weights
            self.model = (dist.plain_copy(policy) if dist.is_sharded(policy) else copy.deepcopy(policy)).eval()
            self.model.requires_grad_(False)
            set_gradient_checkpointing(self.model, False)  # never trains; keeps shared-prompt scoring on
        self.temperature, self.precision, self.logprob_chunk = temperature, cfg.precision, cfg.logprob_chunk
        self.micro_batch_size, self.micro_batch_tokens = cfg.micro_batch_size, cfg.micro_batch_tokens
        self.packing = cfg.packing

    @torch.no_grad()
    def __call__(self, batch: Batch) -> Batch:
        device = model_device(self.model)
        parts = []
        with autocast(device, self.precision), base_model(self.model) if self.shares_policy else nullcontext():
            for rows, mb, packed in micro_batches(batch.to(device), self.micro_batch_size, self.micro_batch_tokens,
                                                  self.packing):
                logp = token_logprobs(self.model, mb, self.temperature, chunk=self.logprob_chunk, packed=packed)
                parts.append((rows, logp))
        ref_logp = scatter_rows(parts, len(batch))
        return batch.replace(ref_logp=ref_logp.to(batch.input_ids.device) * batch.response_mask)


@contextmanager
def base_model(model: nn.Module):
    """A LoRA model as its frozen base: adapters off and eval mode (no dropout) inside the block."""
    was_training = model.training
    model.eval()
    try:
        with adapters_disabled(model):
            yield model
    finally:
        model.train(was_training)
