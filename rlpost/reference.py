"""REFERENCE: the frozen policy that anchors the KL term. It never receives a gradient.

    ref = Reference(policy)          # a frozen copy of the policy as it is now (the SFT checkpoint)
    batch = ref(batch)               # fills batch.ref_logp [B, T]

With LoRA (model.lora) there is no copy: the reference is the policy's own module with its adapters off
(peft's enable_adapters(False), `rlpost.models.lora.adapters_disabled`), i.e. its frozen base, which every
stage's end folds the adapters into, so it is the policy as the stage started. That saves one whole set of
base weights (`shares_policy` says which).

The copy lives on the policy's device; a batch from any device is scored there and its ref_logp comes
back on the batch's device. With precision="bf16" it scores under bf16 autocast, as the trainer does, so
that the KL term compares log-probs computed alike. It scores in the trainer's micro-batches (rows
`micro_batch_size` at a time, at most `micro_batch_tokens` positions each, packed with `packing`: see
rlpost.packing), so no forward holds more than one micro-batch's activations.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn

from rlpost.batch import Batch
from rlpost.models import (autocast, check_packing, check_precision, model_device, set_gradient_checkpointing,
                           token_logprobs)
from rlpost.models.lora import adapters_disabled, is_lora
from rlpost.packing import micro_batches, scatter_rows
from rlpost.trainer import check_scoring_temperature


class Reference:
    def __init__(self, policy: nn.Module, temperature: float = 1.0, precision: str = "fp32",
                 logprob_chunk: int | None = None, micro_batch_size: int | None = None,
                 micro_batch_tokens: int | None = None, packing: bool = False):
        """`temperature`: the one the rollout engine reports old_logp at (SamplingParams.logp_temperature);
        `logprob_chunk`: tokens per chunk of the log-prob head (None: sized from the vocabulary); the batch is
        scored in the trainer's micro-batches (rlpost.packing.micro_batches), packed with `packing`."""
        check_scoring_temperature(temperature)
        check_precision(precision, model_device(policy))
        if packing:
            check_packing(policy)
        self.shares_policy = is_lora(policy)
        if self.shares_policy:
            self.model = policy
        else:
            self.model = copy.deepcopy(policy).eval()
            self.model.requires_grad_(False)
            set_gradient_checkpointing(self.model, False)  # never trains; keeps shared-prompt scoring on
        self.temperature, self.precision, self.logprob_chunk = temperature, precision, logprob_chunk
        self.micro_batch_size, self.micro_batch_tokens, self.packing = micro_batch_size, micro_batch_tokens, packing

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
