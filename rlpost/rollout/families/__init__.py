"""What the native HF engine (rlpost/rollout/hf_native.py) needs to know about each model family.

The engine runs one decoder: embed (times a scale) -> per layer [norm, q/k/v (one matmul), optional q/k
norms, RoPE on the first `rotary_dim` of each head, attention (optional sliding window, optional soft-cap
of the scores), output projection, optional post-attention norm, residual, norm, gated MLP (one matmul for
gate and up), optional post-MLP norm, residual] -> final norm -> LM head (optional soft-cap). A family is
a small module that reads a Hugging Face model into that shape (`Weights`) and makes its RoPE tables;
its differences are data (which norms exist, which layers slide, which caps apply), not code paths:

    llama.py  llama (Llama 2 / 3, rope_type llama3 included), mistral, qwen2, qwen3 (q/k norms)
    gemma.py  gemma2, gemma3_text: (1 + weight) RMSNorm, embedding scale, pre/post feedforward norms,
              soft-capping, alternating local (sliding) / global layers, per-layer-type RoPE (Gemma 3)
    phi3.py   phi3: fused qkv and gate_up projections, partial rotary

A family module defines MODEL_TYPES, `read(hf) -> Weights`, `rope(hf, positions) -> {key: (cos, sin)}` and
`unsupported(config) -> str | None` (a configuration this family's file does not cover, e.g. a rope type whose
tables depend on the sequence length), on the shared pieces of base.py; this package imports every family.
Every weight is read from the wrapped module at call time (a LoRA layer as its merged weight), so the engine
samples with the trainer's weights as they are.
"""

from __future__ import annotations

from types import ModuleType

from rlpost.rollout.families import gemma, llama, phi3

# model_type -> the family module that reads it (the shared pieces are in base.py)
FAMILIES: dict[str, ModuleType] = {t: f for f in (llama, gemma, phi3) for t in f.MODEL_TYPES}


def family(model_type: str) -> ModuleType | None:
    """The family module that covers `model_type`, or None."""
    return FAMILIES.get(model_type)


def supported_model_types() -> tuple[str, ...]:
    return tuple(FAMILIES)
