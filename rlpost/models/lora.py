"""LoRA through peft: low-rank adapters on the policy's linear layers; the base weights stay frozen.

    model, tok = load_model(cfg)              # cfg.lora.r > 0: adapters injected here (apply_lora)
    with adapters_disabled(model): ...        # the base model: the reference, with no second copy
    merged_state_dict(model)                  # plain names, adapters folded in: a final checkpoint
    fold_adapters(model)                      # in place: base += adapter delta, adapters reset (a stage's end)

peft injects the adapters in place (`inject_adapter_in_model`): the model keeps its class (gpt_mini's GPT, or
HFCausalLM around the HF model), its forward and its other modules. Each targeted nn.Linear becomes a
peft LoraLinear: its frozen weight is `<name>.base_layer.weight` and its adapters `<name>.lora_A.default.weight`
[r, in] and `<name>.lora_B.default.weight` [out, r]; it computes base(x) + B(A(dropout(x))) * alpha / r. B starts
at zero, so a fresh adapter changes nothing. Only the adapters require grad.

On disk, a LoRA checkpoint is a plain model folder of the *base* weights (under the plain names, so it loads in
`transformers` or as gpt_mini) plus ADAPTER_FILE and CONFIG_FILE; `load_model` finds them and re-applies the
adapters. A merged folder (`save_model(..., merged=True)`, `rlpost export`) has no adapter files: it is the
plain model whose weights are base + delta.

Under trainer.strategy=fsdp2 the same model is sharded in place (rlpost.distributed.shard_model): every parameter,
frozen base and trainable adapter alike, becomes a DTensor shard, and FSDP2 reduces only the adapters' gradients.
The functions here that write parameters (`reset_adapters`, `fold_adapters`, `load_adapters`) then work on shards:
each rank computes the full value (an adapter delta from the gathered A and B, a saved tensor) and keeps its own
part, so they are collectives that every rank calls at the same point. Saving goes through the gathered plain
copy (rlpost.distributed.unsharded), never through shards.
"""

from __future__ import annotations

import contextlib
import json
import os

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor, distribute_tensor

ADAPTER_FILE = "lora_adapter.safetensors"   # not peft's adapter_model.safetensors: transformers would load that
CONFIG_FILE = "lora_config.json"


def _weights_module(model: nn.Module) -> nn.Module:
    return getattr(model, "hf", model)


def is_adapter_name(name: str) -> bool:
    """True for the state-dict name of a LoRA adapter tensor."""
    return ".lora_A." in name or ".lora_B." in name


def plain_name(name: str) -> str:
    """A base weight's name as the model without adapters has it: `x.base_layer.weight` -> `x.weight`."""
    return name.replace(".base_layer.", ".")


def _is_lora_layer(module: nn.Module) -> bool:
    """A peft LoRA layer (told by its attributes, so that a model without LoRA never imports peft)."""
    return hasattr(module, "lora_A") and hasattr(module, "base_layer")


def lora_layers(model: nn.Module) -> list[nn.Module]:
    """The model's peft LoRA layers (empty: not a LoRA model)."""
    return [m for m in _weights_module(model).modules() if _is_lora_layer(m)]


def is_lora(model: nn.Module) -> bool:
    """Whether the model carries LoRA adapters."""
    return any(is_adapter_name(n) for n, _ in _weights_module(model).named_parameters())


def apply_lora(model: nn.Module, r: int, alpha: float, dropout: float, target_modules: list[str]) -> nn.Module:
    """Inject LoRA adapters in place into every linear layer of `model` named in `target_modules` (names of the
    model's own modules, matched on the last part of their path; names it lacks are skipped, none matching is an
    error). Every base parameter is frozen; the adapters train. The adapters' initial values are kept, so that
    `reset_adapters` can start fresh ones. Returns `model`."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:
        raise ImportError("model.lora needs peft: pip install 'rlpost[lora]'") from e
    target = _weights_module(model)
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in target.named_modules() if isinstance(m, nn.Linear)})
    present = [t for t in target_modules if t in linear]
    if not present:
        raise ValueError(f"model.lora.target_modules {target_modules} names none of this model's linear layers: "
                         f"{', '.join(linear)}")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=present, bias="none")
    inject_adapter_in_model(config, target)
    for name, p in target.named_parameters():
        p.requires_grad_(is_adapter_name(name))
    target._rlpost_lora = {"config": {"r": r, "alpha": alpha, "dropout": dropout, "target_modules": present},
                           "init": {n: t.detach().clone() for n, t in adapter_state(model).items()}}
    return model


def lora_config(model: nn.Module) -> dict:
    """{r, alpha, dropout, target_modules} of a model made by apply_lora."""
    return dict(_weights_module(model)._rlpost_lora["config"])


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under their state-dict names (sharing the model's storage)."""
    return {n: t for n, t in _weights_module(model).state_dict().items() if is_adapter_name(n)}


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The frozen base weights under the plain model's names (adapters left out, nothing merged)."""
    return {plain_name(n): t for n, t in _weights_module(model).state_dict().items() if not is_adapter_name(n)}


def _delta(layer: nn.Module) -> torch.Tensor | None:
    """The weight change of a LoRA layer's active adapters (B @ A * alpha / r), or None when they are off.
    Full-sized also for a sharded layer (a collective then)."""
    if layer.disable_adapters or layer.merged:
        return None
    deltas = [_adapter_delta(layer, a) for a in layer.active_adapters if a in layer.lora_A]
    return sum(deltas) if deltas else None


def _adapter_delta(layer: nn.Module, name: str) -> torch.Tensor:
    """One adapter's weight change: peft's own get_delta_weight, or for FSDP2 shards the same product of the
    gathered A and B (so that a sharded fold adds exactly what one process adds)."""
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    if not isinstance(a, DTensor):
        return layer.get_delta_weight(name)
    a, b = a.full_tensor(), b.full_tensor()
    if a.device.type == "cpu" and a.dtype in (torch.float16, torch.bfloat16):  # as peft: no half matmul on CPU
        a, b = a.float(), b.float()
    delta = b @ a
    return (delta.T if layer.fan_in_fan_out else delta) * layer.scaling[name]


def _like(full: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """The full-sized `full` as `dst` holds it: its dtype and device, and for an FSDP2 shard (a DTensor) this
    rank's part (every rank has `full`: each takes its own chunk, nothing is sent)."""
    full = full.to(device=dst.device, dtype=dst.dtype)
    if isinstance(dst, DTensor):
        full = distribute_tensor(full, dst.device_mesh, dst.placements, src_data_rank=None)
    return full


@torch.no_grad()
def _assign(dst: torch.Tensor, full: torch.Tensor) -> None:
    """Copy the full-sized `full` into parameter `dst` in place: whole, or into a shard the part it holds."""
    dst.copy_(_like(full, dst))


def _reshard(model: nn.Module) -> None:
    """Put a sharded model's parameters back to their shards: after a forward without backward FSDP2 may keep a
    group gathered, and a write into the gathered copy would be lost when it is freed."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


@torch.no_grad()
def effective_weight(linear: nn.Module) -> torch.Tensor:
    """The weight a linear layer applies: its own, or for a LoRA layer base + delta, as one tensor (for code
    that reads weight matrices instead of calling the module, such as the HF native rollout engine)."""
    if not _is_lora_layer(linear):
        return linear.weight
    w = linear.get_base_layer().weight
    delta = _delta(linear)
    return w if delta is None else w + delta.to(w.dtype)


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights of the plain model that computes what the LoRA model computes: each base weight + its
    adapters' delta, under the plain names. The model is not changed."""
    state = base_state_dict(model)
    for name, layer in _weights_module(model).named_modules():
        if _is_lora_layer(layer):
            state[f"{name}.weight"] = effective_weight(layer).clone()
    return state


@torch.no_grad()
def reset_adapters(model: nn.Module) -> None:
    """Put every adapter back to its initial value (B = 0: the model is its base again), in place (sharded: each
    rank its part of the initial values, which rlpost.distributed.shard_model made rank 0's on every rank)."""
    init = _weights_module(model)._rlpost_lora["init"]
    _reshard(model)
    for n, t in adapter_state(model).items():
        _assign(t, init[n])


@torch.no_grad()
def fold_adapters(model: nn.Module) -> None:
    """Merge the adapters into the base weights and reset them, in place: the model computes the same function
    (up to float rounding) and its adapter-disabled base is now the model itself. Done at the end of every stage
    that trained the policy, so that the next stage's reference (the base) is the policy as that stage starts.
    Sharded (FSDP2): every rank calls it; each adds its part of the full delta to its shard of the base."""
    _reshard(model)
    for layer in lora_layers(model):
        delta = _delta(layer)
        if delta is not None:
            base = layer.get_base_layer().weight
            base.copy_(base + _like(delta, base))  # sharded: each rank adds its rows of the delta to its rows
    reset_adapters(model)


def initial_adapters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' initial values that `reset_adapters` puts back, by state-dict name (empty without LoRA):
    rlpost.distributed.shard_model broadcasts rank 0's, so that every rank resets to the same adapters."""
    lora = getattr(_weights_module(model), "_rlpost_lora", None)
    return lora["init"] if lora is not None else {}


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Within the block, the model computes its base: every adapter is off (peft's enable_adapters(False)).
    The adapters' requires_grad flags are put back on exit (keyed by name: under FSDP2 a forward swaps the
    parameter objects between their shards and the gathered copies)."""
    layers = lora_layers(model)
    flags = {(i, n): p.requires_grad for i, layer in enumerate(layers) for n, p in layer.named_parameters()}
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for i, layer in enumerate(layers):
            layer.enable_adapters(True)
            for n, p in layer.named_parameters():
                p.requires_grad_(flags[(i, n)])


def save_adapters(model: nn.Module, folder: str) -> None:
    """ADAPTER_FILE (the adapter tensors) and CONFIG_FILE (their LoRA config) in `folder`."""
    os.makedirs(folder, exist_ok=True)
    save_file({n: t.detach().contiguous() for n, t in adapter_state(model).items()},
              os.path.join(folder, ADAPTER_FILE), metadata={"format": "pt"})
    with open(os.path.join(folder, CONFIG_FILE), "w") as f:
        json.dump(lora_config(model), f, indent=2)


def saved_lora_config(folder: str) -> dict | None:
    """The LoRA config saved with a checkpoint folder's adapters, or None when it holds none."""
    path = os.path.join(folder, CONFIG_FILE)
    if not (os.path.isfile(path) and os.path.isfile(os.path.join(folder, ADAPTER_FILE))):
        return None
    try:
        with open(path, "rb") as f:
            config = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}): the LoRA checkpoint is damaged or incomplete (an interrupted "
                         "copy?); copy or save it again") from None
    keys = {"r", "alpha", "dropout", "target_modules"}  # apply_lora's arguments, as save_adapters writes them
    if not isinstance(config, dict) or set(config) != keys:
        raise ValueError(f"{path}: expected an object with the keys {', '.join(sorted(keys))} (as rlpost writes it), "
                         f"got {config!r:.200}")
    return config


@torch.no_grad()
def load_adapters(model: nn.Module, folder: str) -> None:
    """The adapters saved in `folder` into the model, in place; a folder without them (a plain or merged model)
    resets the adapters, so the model is exactly the folder's weights."""
    if saved_lora_config(folder) is None:
        reset_adapters(model)
        return
    state = load_file(os.path.join(folder, ADAPTER_FILE))
    own = adapter_state(model)
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    shapes = [f"{n} {tuple(state[n].shape)} (model: {tuple(t.shape)})" for n, t in own.items()
              if n in state and state[n].shape != t.shape]
    if missing or unexpected or shapes:
        raise ValueError(f"the LoRA adapters in {folder} do not fit this model (model.lora differs from theirs?): "
                         + "; ".join(f"{what}: {', '.join(v[:4])}" for what, v in
                                     (("missing", missing), ("unexpected", unexpected), ("shape", shapes)) if v))
    _reshard(model)
    for n, t in own.items():
        _assign(t, state[n])
