"""REFERENCE: the frozen policy that anchors the KL term. It never receives a gradient.

    ref = Reference(policy, cfg, params)  # a frozen copy of the policy as it is now (the SFT checkpoint)
    batch = ref(batch)                    # fills batch.ref_logp [B, T]

`cfg` is the `trainer.*` section (rlpost.config.TrainerConfig), `params` the rollout's SamplingParams.

With LoRA (model.lora) there is no copy: the reference is the policy's own module with its adapters off
(peft's enable_adapters(False), `rlpost.models.lora.adapters_disabled`), i.e. its frozen base, which every
stage's end folds the adapters into, so it is the policy as the stage started. That saves one whole set of
base weights (`shares_policy` says which). Under `trainer.strategy=fsdp2` that module is the policy the trainer
sharded, base and adapters alike: scoring with it gathers its blocks as the trainer's forwards do, so every rank
runs as many forwards (see `__call__`), and nothing is copied.

Under `precision="bf16"` the copy's parameters are stored in bf16 (half an fp32 copy's memory): it only ever
runs under bf16 autocast, whose matmuls would cast fp32 weights to bf16 anyway (docs/models.md has the measured
log-prob difference from an fp32 copy). An fp32 run's copy is the policy's own dtype.

Under `trainer.strategy=fsdp2` the copy is sharded like the policy (forward-only FSDP2: `fully_shard` on each
block and the root, rlpost.distributed.shard_model), so each rank holds 1/ranks of it instead of a whole copy;
its forwards gather each block's weights in turn, so every rank runs as many forwards (see `__call__`). A
sharded policy's copy is made shard by shard (rlpost.distributed.sharded_copy: each rank copies its own shards
into a sharded skeleton), so no rank ever holds the whole policy to copy it.

With `offload=True` (`reference.offload`) the copy lives in CPU memory and is streamed to the policy's device
one transformer block at a time for each forward (`Offload`): the device holds its root and one block.

The copy lives on the policy's device (unless offloaded); a batch from any device is scored there and its
ref_logp comes back on the batch's device. It scores as the trainer does, from the same `trainer.*` section
(`cfg`) and the same sampling parameters (`params`): with precision="bf16" under bf16 autocast, at the
temperature the engine reports old_logp at (`params.logp_temperature`), so that the KL term compares log-probs
computed alike; and in the trainer's micro-batches (rows `micro_batch_size` at a time, at most
`micro_batch_tokens` positions each, packed with `packing`: see rlpost.packing), so no forward holds more than
one micro-batch's activations.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn

from rlpost import distributed as dist
from rlpost.batch import Batch
from rlpost.config import TrainerConfig
from rlpost.models import (autocast, check_precision, load_weights, model_device, resolve_packing,
                           set_gradient_checkpointing, token_logprobs, transformer_blocks)
from rlpost.models.lora import adapters_disabled, is_lora
from rlpost.packing import even_forwards, micro_batches, scatter_rows
from rlpost.rollout.engine import SamplingParams


class Reference:
    def __init__(self, policy: nn.Module, cfg: TrainerConfig | None = None, params: SamplingParams | None = None,
                 offload: bool = False):
        """`cfg`: the `trainer.*` section, whose precision, log-prob chunk and micro-batching (micro_batch_size,
        micro_batch_tokens, packing: rlpost.packing.micro_batches) the reference scores with (None: the
        defaults); `params`: the rollout's sampling parameters, scored at their log-prob temperature, the one
        the engine reports old_logp at (None: temperature 1). `offload` (`reference.offload`): the copy lives
        in CPU memory and is streamed to the policy's device block by block for each forward (`Offload`)."""
        cfg = cfg or TrainerConfig()
        temperature = (params or SamplingParams()).logp_temperature
        check_precision(cfg.precision, model_device(policy))
        packing = resolve_packing(cfg.packing, policy)  # true fails now on a model that cannot pack; auto is off there
        self.shares_policy = is_lora(policy)
        if self.shares_policy:
            self.model = policy
        elif cfg.strategy == "fsdp2" and dist.is_sharded(policy):
            # each rank copies its own shards of the policy into a copy sharded alike: nothing is gathered
            # (in bf16 under precision="bf16", as below; the buffers keep the policy's)
            self.model = dist.sharded_copy(policy, torch.bfloat16 if cfg.precision == "bf16" else None).eval()
            set_gradient_checkpointing(self.model, False)  # never trains; keeps shared-prompt scoring on
        else:
            # a whole copy (of a policy sharded without trainer.strategy=fsdp2, a caller's own: its full weights)
            self.model = (dist.plain_copy(policy) if dist.is_sharded(policy) else copy.deepcopy(policy)).eval()
            self.model.requires_grad_(False)
            set_gradient_checkpointing(self.model, False)  # never trains; keeps shared-prompt scoring on
            if cfg.precision == "bf16":  # it only runs under bf16 autocast: fp32 weights would be cast there anyway
                for p in self.model.parameters():  # the parameters only: buffers such as the rotary embedding's
                    p.data = p.data.to(torch.bfloat16)  # inverse frequencies keep their precision at long positions
        if cfg.strategy == "fsdp2" and not self.shares_policy:
            if offload:
                raise ValueError("reference.offload with trainer.strategy=fsdp2: the sharded reference already holds "
                                 "1/ranks of the copy on each rank; set reference.offload=false")
            dist.shard_model(self.model)  # forward-only FSDP2, as the policy's: each rank holds 1/ranks of the copy
        if offload and self.shares_policy:
            raise ValueError("reference.offload: under model.lora the reference is the policy's own base (adapters "
                             "off), not a copy: there is nothing to offload; set reference.offload=false")
        self.device = model_device(policy)  # where it computes (an offloaded copy lives on the CPU)
        self.offload = Offload(self.model, self.device) if offload else None
        self.temperature, self.precision, self.logprob_chunk = temperature, cfg.precision, cfg.logprob_chunk
        self.micro_batch_size, self.micro_batch_tokens = cfg.micro_batch_size, cfg.micro_batch_tokens
        self.packing = packing  # False, True or 'auto' (rlpost.packing.micro_batches: per batch)

    @torch.no_grad()
    def __call__(self, batch: Batch) -> Batch:
        device = self.device
        # sharded (FSDP2: the copy under trainer.strategy=fsdp2, or a LoRA policy sharded by the trainer), every
        # forward gathers weights from all ranks, so every rank must run as many (rlpost.packing.even_forwards),
        # and prompts are not shared (the shared-prompt path calls the model outside its forward)
        sharded = dist.is_sharded(self.model)
        share = not sharded and getattr(self.model, "can_share_prompt", False)  # as token_logprobs will
        batch_here = batch.to(device)
        plan = micro_batches(batch_here, self.micro_batch_size, self.micro_batch_tokens, self.packing,
                             share) if len(batch) else []
        parts = []
        with autocast(device, self.precision), base_model(self.model) if self.shares_policy else nullcontext(), \
                self.offload.streaming() if self.offload is not None else nullcontext():
            for rows, mb, packed, real in even_forwards(batch_here, plan, dist.reduce_max if sharded else None):
                logp = token_logprobs(self.model, mb, self.temperature, share_prompt=not sharded,
                                      chunk=self.logprob_chunk, packed=packed)
                if real:
                    parts.append((rows, logp))
        if sharded:  # FSDP2 keeps the root gathered after a forward, for a backward that never comes here
            self.model.reshard()
        if not parts:
            return batch.replace(ref_logp=torch.zeros(batch.input_ids.shape, device=batch.input_ids.device))
        ref_logp = scatter_rows(parts, len(batch))
        return batch.replace(ref_logp=ref_logp.to(batch.input_ids.device) * batch.response_mask)

    def load(self, folder: str) -> None:
        """Put the weights saved in `folder` back into the copy (a resume; sharded: a collective)."""
        load_weights(self.model, folder)

    def unsharded(self) -> nn.Module | None:
        """The copy as a plain module, to save: itself, or when sharded the gathered copy on rank 0 (None on the
        others; a collective: every rank calls it)."""
        return dist.unsharded(self.model)


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


class Offload:
    """A frozen model kept in CPU memory and streamed to `device` for its forwards (`reference.offload`).

    Inside `streaming()` the root's weights (embeddings, final norm, head: whatever is outside the transformer
    blocks) are on `device`; each block's weights are copied there just before the block runs (a forward
    pre-hook) and dropped right after it (a forward hook), so the device holds the root and one block, never
    the whole copy. The weights never change, so nothing is copied back: the CPU tensors are put back in place.
    On a CUDA device the CPU copies are pinned, so each block's transfer is one DMA. Moves are generic
    (`Tensor.to(device)`), so on a CPU-only machine the same path runs with both places on the CPU (how the
    tests check it); a run refuses `reference.offload` there, where it would gain nothing."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.device = torch.device(device)
        self.blocks = transformer_blocks(model)
        in_blocks = {id(t) for b in self.blocks for t in (*b.parameters(), *b.buffers())}
        model.to("cpu")
        pin = self.device.type == "cuda"
        for t in (*model.parameters(), *model.buffers()):
            if pin:
                t.data = t.data.pin_memory()
        self.root = [t for t in (*model.parameters(), *model.buffers()) if id(t) not in in_blocks]
        self.home: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (tensor, its CPU data) while on device
        for block in self.blocks:
            block.register_forward_pre_hook(lambda m, args: self._load(self._tensors(m)))
            block.register_forward_hook(lambda m, args, out: self._unload(self._tensors(m)))

    @staticmethod
    def _tensors(module: nn.Module) -> list[torch.Tensor]:
        return [*module.parameters(), *module.buffers()]

    def _load(self, tensors: list[torch.Tensor]) -> None:
        for t in tensors:
            if id(t) not in self.home:
                self.home[id(t)] = (t, t.data)
                t.data = t.data.to(self.device, non_blocking=True)

    def _unload(self, tensors: list[torch.Tensor]) -> None:
        for t in tensors:
            kept = self.home.pop(id(t), None)
            if kept is not None:
                t.data = kept[1]

    @contextmanager
    def streaming(self):
        """The model ready to run on `device`: the root there, each block brought in by its own forward."""
        self._load(self.root)
        try:
            yield
        finally:  # everything back on the CPU, also after a failed forward that left a block on the device
            self._unload([t for t, _ in self.home.values()])

    def device_bytes(self) -> int:
        """Bytes of the copy's tensors on the device now (outside a forward: 0)."""
        return sum(t.numel() * t.element_size() for t, _ in self.home.values())
