"""What a role does to a policy's transformer blocks, for gpt_mini and `HFCausalLM` alike: recompute their
activations in the backward (gradient checkpointing), compile them, list them for sharding; and whether a module
is sharded."""

from __future__ import annotations

import torch.nn as nn

from rlpost.models.gpt_mini import GPT
from rlpost.models.hf import HFCausalLM
from rlpost.models.precision import checkpoint_contexts


def set_gradient_checkpointing(model: nn.Module, on: bool) -> None:
    """Recompute each transformer block's activations in the backward pass instead of keeping them
    (`trainer.gradient_checkpointing`): memory for one block's activations instead of all, for about one
    more forward. HF models through their own switch; gpt_mini with torch.utils.checkpoint per block.
    Either way it applies only in training mode with grad, and it turns shared-prompt scoring off then."""
    if isinstance(model, HFCausalLM):
        hf = model.hf
        if on and not getattr(hf, "supports_gradient_checkpointing", False):
            raise ValueError(f"trainer.gradient_checkpointing: {type(hf).__name__} does not support it")
        # transformers >= 5.20 names it activation checkpointing; older versions only have the old name
        if on:
            enable = getattr(hf, "activation_checkpointing_enable", None)
            kwargs = {"use_reentrant": False, "context_fn": checkpoint_contexts}  # see checkpoint_contexts
            if enable is not None:
                enable(kwargs)
            else:
                hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            (getattr(hf, "activation_checkpointing_disable", None) or hf.gradient_checkpointing_disable)()
    elif isinstance(model, GPT):
        model.gradient_checkpointing = on
    elif on:
        raise TypeError(f"gradient checkpointing supports HFCausalLM and gpt_mini, not {type(model).__name__}")


def compile_model(model: nn.Module) -> nn.Module:
    """torch.compile the model's transformer blocks in place, with dynamic shapes (batch and length vary
    from step to step). The module tree, parameter names and checkpoints are unchanged. An HF model's
    trunk (`.hf.model`) is compiled; gpt_mini's blocks one by one. The first forward and backward of each
    new kind of call (plain, shared-prompt, with or without grad) compile, which takes tens of seconds;
    later calls reuse the kernels."""
    if isinstance(model, HFCausalLM):
        model.hf.model.compile(dynamic=True)
    elif isinstance(model, GPT):
        for block in model.transformer.h:
            block.compile(dynamic=True)
    else:
        raise TypeError(f"compile_model supports HFCausalLM and gpt_mini, not {type(model).__name__}")
    return model


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a policy, the unit FSDP2 shards (rlpost.distributed.shard_model): gpt_mini's
    `transformer.h`, an HF decoder's layers (`.hf.base_model.layers`: Llama, Qwen2, Mistral, ...)."""
    if isinstance(model, GPT):
        return list(model.transformer.h)
    if isinstance(model, HFCausalLM):
        layers = getattr(model.hf.base_model, "layers", None)
        if layers is None:
            raise TypeError(f"{type(model.hf).__name__} has no `.layers` on its base model to shard")
        return list(layers)
    raise TypeError(f"transformer_blocks supports HFCausalLM and gpt_mini, not {type(model).__name__}")


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` is an FSDP2 module (sharded by rlpost.distributed.shard_model / shard_module). Defined here,
    below rlpost.distributed (which imports this package and offers it as `distributed.is_sharded`), so that the
    loading code can ask too."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)
