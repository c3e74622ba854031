"""Phi-3: q/k/v in one fused `qkv_proj` and gate/up in one `gate_up_proj` (already the engine's layout),
RoPE on the first partial_rotary_factor of each head (the rotary embedding's tables are that wide), and an
optional sliding window on every layer. rope_type longrope (the 128k models) picks its tables by sequence
length, which the engine's per-call table does not model: those stay on transformers.generate."""

from __future__ import annotations

from rlpost.models.lora import effective_weight
from rlpost.rollout.families.base import Layer, Weights, check_rope, head_dim, norm_of

MODEL_TYPES = ("phi3",)


def unsupported(cfg) -> str | None:
    return check_rope(cfg)


def read(hf) -> Weights:
    m, cfg = hf.model, hf.config
    window = getattr(cfg, "sliding_window", None)
    layers = []
    for layer in m.layers:
        a, mlp = layer.self_attn, layer.mlp
        layers.append(Layer(
            ln_attn=norm_of(layer.input_layernorm), wqkv=effective_weight(a.qkv_proj), bqkv=a.qkv_proj.bias,
            q_norm=None, k_norm=None, wo=effective_weight(a.o_proj), bo=a.o_proj.bias, post_attn=None,
            ln_mlp=norm_of(layer.post_attention_layernorm), wgu=effective_weight(mlp.gate_up_proj),
            bgu=mlp.gate_up_proj.bias, wd=effective_weight(mlp.down_proj), bd=mlp.down_proj.bias,
            act=mlp.activation_fn, post_mlp=None, window=window))
    D = head_dim(cfg)
    return Weights(family="phi3", embed=m.embed_tokens.weight, embed_scale=None, norm=norm_of(m.norm),
                   lm_head=effective_weight(hf.lm_head), layers=layers, n_head=cfg.num_attention_heads,
                   n_kv=cfg.num_key_value_heads, head_dim=D, scaling=D ** -0.5)


def rope(hf, x, positions) -> dict:
    cos, sin = hf.model.rotary_emb(x, positions[None])
    return {None: (cos[0], sin[0])}
