"""The rollout engine interface: what the controller, the evaluation and WeightSync may call.

    class Engine(Protocol):
        def generate(self, prompts: list[list[int]], k: int, params: SamplingParams, seed: int) -> Batch: ...
        def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]], version: int) -> None: ...
        def close(self) -> None: ...
        version: int            # read-only: the weight version generate() stamps on its rows
        weight_sync_mode: str   # read-only: "pointer" | "copy" | "vllm", how weights reach it

Every engine implements it: NativeEngine (gpt_mini), HFNativeEngine (HF Llama / Qwen2), HFGenerateEngine
(transformers.generate) and VLLMEngine. Nothing else touches an engine's model or version: weights get in
through `update_weights` only, so an engine in another process (a Ray actor, a vLLM server) fits unchanged.
That is why arguments and results are plain picklable data (token id lists, a SamplingParams dataclass,
a list of (name, tensor) pairs, a Batch) and nothing is a callback or a shared module.

Weight names are the checkpoint's: the state_dict names of the module that `save_model` writes, i.e.
the wrapped Hugging Face model's own names (`model.hf`, as vLLM and `save_pretrained` use them) for an HF
model, and gpt_mini's own module names for gpt_mini (`named_weights` gives them). Tied weights may come
under both names or under one. A LoRA model's names are those of its peft layers: `<name>.base_layer.weight`
for a frozen base weight, `<name>.lora_A.default.weight` and `<name>.lora_B.default.weight` for its adapters.

Ordering contract (the caller, e.g. WeightSync, keeps it; a remote engine serves calls in order):

1. `update_weights(w, v)` returns once the engine samples with w: every `generate` after it samples
   with w and stamps v on every row's `policy_version`; a generate that returned before it used the
   previous weights and carries the previous version. The caller may change its tensors again once
   the call returns (a copying engine copied them).
2. An engine built on the trainer's own module ("pointer") sees an optimizer step the moment it
   happens, so the trainer keeps the order step -> update_weights -> generate: between the step and
   the update the rows would carry the old version.
3. `close()` frees what the engine holds (a model copy, a vLLM engine and its folder); calling it
   again does nothing, and a closed engine does not generate.

How weights reach the engine is fixed when it is built (`build_engine(..., share_weights=)`):
"pointer" shares the trainer's module (zero copy: update_weights finds the given tensors ARE its own
and only stamps the version), "copy" owns a deep copy refreshed in place with copy_ (names and shapes
checked: a missing, unexpected or mis-shaped name is an error that names it), "vllm" is vLLM's own
copy (reload_weights, then its prefix cache is dropped). A LoRA model (rlpost/models/lora.py) trains only
its adapters, so after an optimizer step WeightSync sends those alone; a copy engine accepts exactly the
full set or every adapter tensor.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn

from rlpost.batch import Batch
from rlpost.models import PRECISIONS, autocast
from rlpost.models.lora import is_adapter_name


@dataclass
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0            # 0: off
    top_p: float = 1.0        # 1.0: off
    stop_token_ids: list[int] = field(default_factory=list)  # besides the tokenizer's eos
    min_new_tokens: int = 0   # eos / stop tokens cannot be drawn before this many tokens (old_logp stays unmasked)
    stop: list[str] = field(default_factory=list)  # stop strings: the response ends with the token completing one
    max_num_seqs: int = 0     # native engines: at most this many sequences decode at once, the rest wait (0: all)

    @property
    def logp_temperature(self) -> float:
        """The temperature old_logp is measured at (greedy decoding reports the untempered policy)."""
        return logp_temperature(self.temperature)


def logp_temperature(temperature: float) -> float:
    """The temperature an engine sampling at `temperature` reports old_logp at, and so the one every scorer
    (the trainer, the reference, a distillation teacher) scores at: the same, except greedy decoding (0), whose
    tokens have no tempered distribution (logits / 0), which reports the untempered policy's (1). A negative or
    non-finite temperature has no such distribution either: a ValueError."""
    if temperature == 0:
        return 1.0
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"sampling temperature {temperature!r}: log-probs are scored at SamplingParams."
                         "logp_temperature, which needs a finite temperature > 0 (or 0: greedy, scored at 1)")
    return temperature


@runtime_checkable
class Engine(Protocol):
    """A rollout engine; see the module docstring for the contract."""

    def generate(self, prompts: list[list[int]], k: int, params: SamplingParams, seed: int = 0) -> Batch:
        """k samples of each prompt (token ids) -> Batch, rows prompt-major, old_logp captured as drawn."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """From now on sample with these weights (checkpoint names) and stamp `version` on the rows."""
        ...

    def close(self) -> None:
        """Free what the engine holds; idempotent."""
        ...

    @property
    def version(self) -> int:
        """The weight version stamped on the rows of the next generate."""
        ...

    @property
    def weight_sync_mode(self) -> str:
        """'pointer' (shares the trainer's module), 'copy' (its own copy) or 'vllm' (vLLM's own weights)."""
        ...


def _empty_parameters(model: nn.Module) -> dict[int, torch.Size]:
    """A skeleton's meta parameters replaced, in place, by empty ones (no storage; a meta tensor cannot be
    given storage later) on the device of its buffers, a tied one by one shared replacement: {id(new parameter):
    the shape it stands for}, as a released engine records them."""
    device = next((b.device for b in model.buffers() if not b.is_meta), torch.device("cpu"))
    new: dict[int, tuple[nn.Parameter, torch.Size]] = {}
    for m in model.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and p.is_meta:
                if id(p) not in new:
                    new[id(p)] = (nn.Parameter(torch.empty(0, dtype=p.dtype, device=device), requires_grad=False),
                                  p.shape)
                m._parameters[name] = new[id(p)][0]
    return {id(q): shape for q, shape in new.values()}


def hold_matmuls(model: nn.Module, dtype: torch.dtype) -> None:
    """Keep the weights and biases of `model`'s nn.Linear layers in `dtype`, in place (a copy engine sampling
    under `dtype` autocast: the values autocast would cast them to, held once). A layer's weight tied to an
    nn.Embedding (gpt_mini's head, a tied LM head) stays as it is: the embedding lookup reads it uncast."""
    embedded = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    for m in model.modules():
        if isinstance(m, nn.Linear):
            for p in m.parameters(recurse=False):
                if id(p) not in embedded and p.is_floating_point():
                    p.data = p.data.to(dtype)


def weights_module(model: nn.Module) -> nn.Module:
    """The module whose state_dict names the weights: a wrapped Hugging Face model (`.hf`), else the model."""
    return getattr(model, "hf", model)


def named_weights(model: nn.Module, adapters_only: bool = False) -> list[tuple[str, torch.Tensor]]:
    """A model's weights under the protocol's names, as update_weights takes them: a list (picklable,
    unlike a generator) of detached tensors that share the model's storage (nothing is copied here).
    `adapters_only`: a LoRA model's adapter tensors alone (what an optimizer step changes)."""
    items = weights_module(model).state_dict().items()
    return [(n, t) for n, t in items if is_adapter_name(n)] if adapters_only else list(items)


class ModuleEngine:
    """Weight handling of the engines that run a torch module in this process (native, hf_native,
    hf_generate): shared with the trainer ("pointer") or a private deep copy ("copy").

    dtype: what the engine samples in. 'fp32': the weights as they are. 'bf16': the forward runs under bf16
    autocast (`rlpost.models.autocast`, the trainer's trainer.precision=bf16 numerics: matmuls and attention
    in bf16, norms, residual stream and sampling in fp32) and the KV cache is bf16. A pointer engine's weights
    stay the trainer's fp32 ones (zero-copy); their bf16 casts are made once per generate call (autocast's
    cache, for parameters that require grad, i.e. the trainer's own) or once per weight update (the HF native
    engine's concatenated weights), never kept between syncs. A copy engine holds its matmul weights (those of
    its nn.Linear layers not tied to an embedding) in bf16 already: the very values autocast would cast them
    to, in half the bytes; embeddings and norms stay fp32, as autocast reads them.

    A copy engine may `release_weights()` between rollouts (a sharded run's engine, while the trainer works):
    its parameters are freed until the next update_weights, which must then bring every weight; a copy built
    from a model whose parameters are on the meta device (a skeleton, rlpost.models.parameters_on_meta) starts
    released."""

    def __init__(self, model: nn.Module, tokenizer, share_weights: bool = True, dtype: str = "fp32"):
        if dtype not in PRECISIONS:
            raise ValueError(f"rollout.dtype is {dtype!r}; an engine samples in one of {', '.join(PRECISIONS)}")
        self._model = model if share_weights else copy.deepcopy(model).requires_grad_(False)
        if not share_weights and dtype == "bf16":
            hold_matmuls(self._model, torch.bfloat16)
        self.tokenizer = tokenizer
        self._shares = share_weights
        self._policy_version = 0
        self.dtype = dtype
        # released: {id(parameter): its shape} while the parameters are freed (or never filled: a meta skeleton)
        self._released: dict[int, torch.Size] | None = None
        if not share_weights and any(p.is_meta for p in self._model.parameters()):
            self._released = _empty_parameters(self._model)

    @contextlib.contextmanager
    def _autocast(self, device: torch.device):
        """The context the engine's forward runs in: bf16 autocast for dtype 'bf16', nothing for 'fp32'; always
        without autograd (sampling is never differentiated, and rlpost.models.autocast then leaves out what only
        a training forward needs)."""
        with torch.no_grad(), autocast(device, self.dtype):
            yield

    @property
    def cache_dtype(self) -> torch.dtype | None:
        """The KV cache's dtype: bf16 when sampling in bf16, else None (the weights')."""
        return torch.bfloat16 if self.dtype == "bf16" else None

    @property
    def version(self) -> int:
        return self._policy_version

    @property
    def weight_sync_mode(self) -> str:
        return "pointer" if self._shares else "copy"

    def _open(self) -> nn.Module:
        if self._model is None:
            raise RuntimeError(f"this {type(self).__name__} is closed")
        if self._released is not None:
            raise RuntimeError(f"this {type(self).__name__}'s weights are released (between rollouts, or not "
                               "loaded yet): update_weights with every weight (WeightSync.sync or push) first")
        return self._model

    @property
    def released(self) -> bool:
        """Whether the copy's parameters are freed (`release_weights`) until the next full update_weights."""
        return self._released is not None

    def release_weights(self) -> bool:
        """Free a copy engine's parameters (their storage; the module, its buffers and the parameters' shapes and
        dtypes stay) until the next update_weights, which must bring every weight. Returns whether anything is
        released: a pointer engine shares the trainer's module and keeps it."""
        if self._shares or self._model is None:
            return False
        if self._released is None:
            params = list(self._model.parameters())
            self._released = {id(p): p.shape for p in params}
            for p in params:
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        return True

    def weight_dtypes(self) -> dict[str, torch.dtype]:
        """The dtype the engine holds each weight in (the protocol's names): what a sender may cast to first."""
        return {n: t.dtype for n, t in weights_module(self._model).state_dict(keep_vars=True).items()}

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int, *,
                       take: bool = False) -> None:
        """Copy each tensor in place into the engine's tensor of that name, unless it already is that
        tensor's storage (a pointer engine given the trainer's own weights: nothing moves). In place, so
        the parameters keep their identity and any cache keyed on (id, _version) sees the change.
        A LoRA model may be given its adapter tensors alone (all of them: only they train).
        A released engine needs every weight; `take`: the tensors are the caller's to give away (gathered for
        this call), so a released engine keeps them as its parameters (cast to its dtype) instead of copying."""
        if self._model is None:
            raise RuntimeError(f"this {type(self).__name__} is closed")
        own = weights_module(self._model).state_dict(keep_vars=True)
        released = self._released or {}

        def shape(n):
            return released.get(id(own[n]), own[n].shape)

        given = dict(named_tensors)
        adapters = {n for n in own if is_adapter_name(n)}
        # adapter-only, or everything (a released engine: everything)
        required = adapters if adapters and given.keys() <= adapters and not released else own.keys()
        unexpected = sorted(given.keys() - own.keys())
        mismatched = [f"{n} {tuple(t.shape)} (engine: {tuple(shape(n))})" for n, t in given.items()
                      if n in own and t.shape != shape(n)]
        covered = {id(own[n]) for n in given if n in own}   # a tied weight is covered by either name
        missing = sorted(n for n in required if id(own[n]) not in covered)
        if unexpected or missing or mismatched:
            problems = [f"{what}: {', '.join(names)}" for what, names in
                        (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)) if names]
            raise ValueError(f"update_weights on {type(self).__name__}: " + "; ".join(problems))
        done: set[int] = set()
        for name, src in given.items():
            dst = own[name]
            if id(dst) in done:
                continue
            done.add(id(dst))
            if id(dst) in released:  # freed: the given tensor (or a copy of it) becomes the parameter's storage
                dst.data = src.detach().to(dst.dtype, copy=not take)
            elif not (src.device == dst.device and src.data_ptr() == dst.data_ptr()):  # else: its own storage
                dst.copy_(src)
        self._released = None
        self._policy_version = version

    def close(self) -> None:
        self._model = None
