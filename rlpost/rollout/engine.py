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
    in bf16, norms, residual stream and sampling in fp32) and the KV cache is bf16. The weights themselves stay
    the trainer's fp32 ones (pointer sync stays zero-copy); their bf16 casts are made once per generate call
    (autocast's cache, for parameters that require grad, i.e. the trainer's own) or once per weight update
    (the HF native engine's concatenated weights), never kept between syncs."""

    def __init__(self, model: nn.Module, tokenizer, share_weights: bool = True, dtype: str = "fp32"):
        if dtype not in PRECISIONS:
            raise ValueError(f"rollout.dtype is {dtype!r}; an engine samples in one of {', '.join(PRECISIONS)}")
        self._model = model if share_weights else copy.deepcopy(model).requires_grad_(False)
        self.tokenizer = tokenizer
        self._shares = share_weights
        self._policy_version = 0
        self.dtype = dtype

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
        return self._model

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Copy each tensor in place into the engine's tensor of that name, unless it already is that
        tensor's storage (a pointer engine given the trainer's own weights: nothing moves). In place, so
        the parameters keep their identity and any cache keyed on (id, _version) sees the change.
        A LoRA model may be given its adapter tensors alone (all of them: only they train)."""
        own = weights_module(self._open()).state_dict(keep_vars=True)
        given = dict(named_tensors)
        adapters = {n for n in own if is_adapter_name(n)}
        required = adapters if adapters and given.keys() <= adapters else own.keys()  # adapter-only, or everything
        unexpected = sorted(given.keys() - own.keys())
        mismatched = [f"{n} {tuple(t.shape)} (engine: {tuple(own[n].shape)})" for n, t in given.items()
                      if n in own and t.shape != own[n].shape]
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
            if src.device == dst.device and src.data_ptr() == dst.data_ptr():
                continue  # already the engine's own storage
            dst.copy_(src)
        self._policy_version = version

    def close(self) -> None:
        self._model = None
