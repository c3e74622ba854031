"""Where a model computes and in what precision: `model.device`, `model.dtype`, `trainer.precision`,
`rollout.dtype`, and the autocast context every role runs its forward in."""

from __future__ import annotations

import contextlib
import re
import threading
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from rlpost.settings.model import DTYPES  # the valid model.dtype names, declared with the key
from rlpost.settings.rollout import ROLLOUT_DTYPES  # rollout.dtype: 'auto' is the trainer's (resolved) precision
from rlpost.settings.trainer import PRECISION_CHOICES, PRECISIONS  # trainer.precision: 'auto' resolves at start

TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}  # model.dtype -> its torch dtype
DEVICE_SPEC = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """The torch.device that `model.device` names: 'auto' (CUDA when present, else CPU), 'cpu', 'cuda' or
    'cuda:N'. Asking for CUDA where there is none is an error now, not a silent CPU run."""
    spec = str(spec)
    if not DEVICE_SPEC.match(spec):
        raise ValueError(f"model.device is {spec!r}; valid values: auto, cpu, cuda, cuda:N")
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"model.device={spec} but CUDA is not available (torch {torch.__version__}, "
                               f"CUDA build: {torch.version.cuda or 'none'}); use model.device=cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(f"model.device={spec} but this machine has {torch.cuda.device_count()} CUDA "
                               f"device(s): cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return device


def model_device(model: nn.Module) -> torch.device:
    """The device of a module's parameters: every role computes there and moves its batches there."""
    return next(model.parameters()).device


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively: AMX tiles or AVX512-BF16 instructions, which
    oneDNN's bf16 kernels use. Without them torch converts bf16 on the fly or takes a scalar fallback, which
    on an AVX2 machine measured 15-100x slower than fp32 (benchmarks/grpo_step_vs_trl.py --precision bf16
    prints both)."""
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except (AttributeError, RuntimeError):  # private probes: fall back on oneDNN's own bf16 check
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False


def resolve_precision(precision: str, device: torch.device) -> tuple[str, str]:
    """trainer.precision -> (the precision the run uses, why). 'auto' is bf16 on CUDA and on a CPU with native
    bf16 matmul (`cpu_has_fast_bf16`: AMX or AVX512-BF16), fp32 elsewhere (an AVX2-only CPU runs bf16 many
    times slower than fp32). 'fp32' and 'bf16' are taken as given."""
    if precision not in PRECISION_CHOICES:
        raise ValueError(f"trainer.precision is {precision!r}; valid values: {', '.join(PRECISION_CHOICES)}")
    if precision != "auto":
        return precision, "as configured"
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16", "CUDA device"
    if device.type == "cpu":
        cap = torch.backends.cpu.get_cpu_capability()
        if cpu_has_fast_bf16():
            return "bf16", f"CPU with native bf16 matmul (torch's CPU capability: {cap})"
        return "fp32", f"CPU without native bf16 matmul (torch's CPU capability: {cap}; no AMX or AVX512-BF16)"
    return "fp32", f"device type {device.type}"


def resolve_rollout_dtype(dtype: str, precision: str) -> str:
    """rollout.dtype -> the dtype the rollout engine samples in: 'auto' is the trainer's resolved precision."""
    if dtype not in ROLLOUT_DTYPES:
        raise ValueError(f"rollout.dtype is {dtype!r}; valid values: {', '.join(ROLLOUT_DTYPES)}")
    return precision if dtype == "auto" else dtype


def check_precision(precision: str, device: torch.device) -> None:
    """Fail on an unknown precision now, naming the valid ones; warn when bf16 will be slow on `device`."""
    if precision not in PRECISIONS:
        raise ValueError(f"trainer.precision is {precision!r}; valid values: {', '.join(PRECISIONS)}")
    if precision == "bf16" and torch.device(device).type == "cpu" and not cpu_has_fast_bf16():
        warnings.warn(f"trainer.precision=bf16 on a CPU without native bf16 matmul (torch's CPU capability: "
                      f"{torch.backends.cpu.get_cpu_capability()}; no AVX512-BF16 or AMX): bf16 matmuls take a "
                      "slow fallback path and run many times slower than fp32 here; use trainer.precision=fp32 "
                      "on this machine", stacklevel=3)


def autocast(device: torch.device, precision: str):
    """The context a role runs its model's forward in. 'fp32': nothing. 'bf16': torch.autocast to bfloat16,
    so matmuls and attention run in bf16 while the parameters (the master weights), their gradients and the
    optimizer state stay fp32; log-softmax and every loss run in fp32 (`rlpost.models.logprobs` turns autocast off).
    On a CPU, a forward that records gradients (entered with grad enabled: a training step) also runs its
    attention through `cpu_attention_fp32_backward`: the same bf16 forward, a backward in fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        device_type = torch.device(device).type
        if device_type == "cpu":
            return _cpu_bf16(device_type)
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    raise ValueError(f"trainer.precision is {precision!r}; valid values: {', '.join(PRECISIONS)}")


@contextlib.contextmanager
def _cpu_bf16(device_type: str):
    # grad is checked on entry: the rollout's and the reference's forwards (no grad) skip the mode's per-op cost
    with torch.autocast(device_type=device_type, dtype=torch.bfloat16), \
            (cpu_attention_fp32_backward() if torch.is_grad_enabled() else contextlib.nullcontext()):
        yield


class _AttentionFp32Backward(torch.autograd.Function):
    """scaled_dot_product_attention under CPU bf16 autocast whose forward is the call as made (autocast casts
    q, k, v to bf16: bit for bit what F.scaled_dot_product_attention returns there) and whose backward
    recomputes the attention from the same bf16-rounded inputs in fp32 and differentiates that. torch's CPU
    flash-attention backward in bf16 measured 3-5x slower than in fp32 on an AMX Xeon (47 ms against 12 ms at
    64 rows x 4 heads x 45 tokens x 64, one thread), so the fp32 recompute and backward together cost less than
    the bf16 backward alone, and the gradients skip the bf16 rounding inside the backward."""

    @staticmethod
    def forward(ctx, q, k, v, mask, is_causal, scale):
        ctx.save_for_backward(q, k, v, mask)
        ctx.is_causal, ctx.scale = is_causal, scale
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)

    @staticmethod
    def backward(ctx, grad):
        q, k, v, mask = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]

        def as_computed(t):  # what the forward's kernel read: autocast's bf16 cast of the input, here in fp32
            return t.detach().to(torch.bfloat16).float()

        if mask is not None and mask.is_floating_point():  # an additive mask: autocast cast it too
            mask = as_computed(mask)
        with torch.enable_grad(), torch.autocast("cpu", enabled=False):
            q32, k32, v32 = (as_computed(t).requires_grad_(n) for t, n in zip((q, k, v), needs))
            out = F.scaled_dot_product_attention(q32, k32, v32, attn_mask=mask, is_causal=ctx.is_causal,
                                                 scale=ctx.scale)
            grads = iter(torch.autograd.grad(out, [t for t in (q32, k32, v32) if t.requires_grad], grad.float()))
        return (*(next(grads).to(t.dtype) if n else None for t, n in zip((q, k, v), needs)), None, None, None)


class cpu_attention_fp32_backward(TorchFunctionMode):
    """Within it (and within CPU bf16 autocast), every F.scaled_dot_product_attention call on CPU tensors that
    needs a gradient runs as `_AttentionFp32Backward`: forward unchanged, backward in fp32. Calls it cannot
    take over exactly (autocast off or not bf16, dropout, grouped-query `enable_gqa`, a mask that needs a
    gradient itself, inputs other than fp32 / bf16, no gradient) run as they are."""

    NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
    _active = threading.local()  # how many are entered on this thread (`checkpoint_contexts` asks)

    def __enter__(self):
        out = super().__enter__()
        self._active.depth = getattr(self._active, "depth", 0) + 1
        return out

    def __exit__(self, *exc):
        self._active.depth -= 1
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            call = {**dict(zip(self.NAMES, args)), **kwargs}
            if not call.get("enable_gqa", True):  # enable_gqa=False is the default, spelled out
                del call["enable_gqa"]
            if self._takes_over(call):
                return _AttentionFp32Backward.apply(call["query"], call["key"], call["value"], call.get("attn_mask"),
                                                    bool(call.get("is_causal")), call.get("scale"))
        return func(*args, **kwargs)

    def _takes_over(self, call: dict) -> bool:
        qkv = [call.get(n) for n in self.NAMES[:3]]
        mask = call.get("attn_mask")
        return (set(call) <= set(self.NAMES) and not call.get("dropout_p") and torch.is_grad_enabled()
                and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
                and not (isinstance(mask, torch.Tensor) and mask.requires_grad)
                and all(isinstance(t, torch.Tensor) and t.dtype in (torch.float32, torch.bfloat16)
                        and t.device.type == "cpu" for t in qkv)
                and any(t.requires_grad for t in qkv))


def checkpoint_contexts():
    """torch.utils.checkpoint's `context_fn` for a block recomputed in the backward: the recompute runs under
    `cpu_attention_fp32_backward` when the forward did. The backward runs outside the trainer's forward context
    (checkpoint restores autocast, not a TorchFunctionMode), and a recompute whose attention took the other path
    saves other tensors, which the non-reentrant checkpoint refuses."""
    if getattr(cpu_attention_fp32_backward._active, "depth", 0):
        return contextlib.nullcontext(), cpu_attention_fp32_backward()
    return contextlib.nullcontext(), contextlib.nullcontext()
