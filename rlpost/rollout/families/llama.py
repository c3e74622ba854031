"""Llama (2 and 3: rope_type llama3 is the model's own rotary embedding), Mistral (a sliding window on every
layer), Qwen2 (q/k/v biases; sliding layers from `layer_types` when use_sliding_window) and Qwen3 (RMSNorm on
each head's query and key before RoPE). Separate q/k/v and gate/up projections, concatenated here."""

from __future__ import annotations

from rlpost.models.lora import effective_weight
from rlpost.rollout.families.base import Layer, Weights, check_rope, head_dim, norm_of, split_projections

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def unsupported(cfg) -> str | None:
    if getattr(cfg, "pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp > 1"
    return check_rope(cfg)


def windows(cfg) -> list[int | None]:
    """Each layer's sliding window, as the HF attention module sets it."""
    n, w = cfg.num_hidden_layers, getattr(cfg, "sliding_window", None)
    if cfg.model_type == "mistral":
        return [w] * n
    if cfg.model_type in ("qwen2", "qwen3"):
        types = getattr(cfg, "layer_types", None) or ["full_attention"] * n
        return [w if t == "sliding_attention" else None for t in types]
    return [None] * n


def read(hf) -> Weights:
    m, cfg = hf.model, hf.config
    layers = []
    for layer, window in zip(m.layers, windows(cfg)):
        layers.append(Layer(ln_attn=norm_of(layer.input_layernorm), post_attn=None,
                            ln_mlp=norm_of(layer.post_attention_layernorm), post_mlp=None, window=window,
                            **split_projections(layer)))
    D = head_dim(cfg)
    return Weights(family=cfg.model_type, embed=m.embed_tokens.weight, embed_scale=None, norm=norm_of(m.norm),
                   lm_head=effective_weight(hf.lm_head), layers=layers, n_head=cfg.num_attention_heads,
                   n_kv=cfg.num_key_value_heads, head_dim=D, scaling=D ** -0.5)


def rope(hf, x, positions) -> dict:
    """{None: (cos, sin)} [S, rotary_dim] each, from the model's own rotary embedding."""
    cos, sin = hf.model.rotary_emb(x, positions[None])
    return {None: (cos[0], sin[0])}
