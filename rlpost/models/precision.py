"""Where a model computes and in what precision: `model.device`, `model.dtype`, `trainer.precision`,
`rollout.dtype`, and the autocast context every role runs its forward in."""

from __future__ import annotations

import contextlib
import re
import warnings

import torch
import torch.nn as nn

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
    optimizer state stay fp32; log-softmax and every loss run in fp32 (`rlpost.models.logprobs` turns autocast off)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    raise ValueError(f"trainer.precision is {precision!r}; valid values: {', '.join(PRECISIONS)}")
