"""Gemma 2 and Gemma 3 (text): RMSNorm with a (1 + weight) scale in fp32, embeddings times sqrt(hidden_size),
norms before and after both attention and MLP, query scale query_pre_attn_scalar ** -0.5, soft-capped
attention scores (Gemma 2 only: Gemma 3's attention never reads attn_logit_softcapping, whatever the config says)
and logits, local (sliding window) and global layers as `layer_types` says. Gemma 3 adds RMSNorm on each head's
query and key, and a RoPE table per layer type (local layers use their own base frequency). A config with
use_bidirectional_attention (an encoder such as EmbeddingGemma) stays on transformers.generate: the engine
decodes causally."""

from __future__ import annotations

from rlpost.models.lora import effective_weight
from rlpost.rollout.families.base import (Layer, Weights, check_rope, gemma_rms_norm, head_dim, norm_of,
                                          split_projections)

MODEL_TYPES = ("gemma2", "gemma3_text")


def unsupported(cfg) -> str | None:
    if getattr(cfg, "use_bidirectional_attention", False):
        return "use_bidirectional_attention (an encoder's attention; the native engine decodes causally)"
    return check_rope(cfg)


def read(hf) -> Weights:
    m, cfg = hf.model, hf.config
    gemma3 = cfg.model_type == "gemma3_text"  # a RoPE table per layer type; no attention soft-cap
    layers = []
    for layer, kind in zip(m.layers, cfg.layer_types):
        layers.append(Layer(
            ln_attn=norm_of(layer.input_layernorm), post_attn=norm_of(layer.post_attention_layernorm),
            ln_mlp=norm_of(layer.pre_feedforward_layernorm), post_mlp=norm_of(layer.post_feedforward_layernorm),
            window=cfg.sliding_window if kind == "sliding_attention" else None,
            rope=kind if gemma3 else None, **split_projections(layer)))
    embed = m.embed_tokens
    return Weights(family=cfg.model_type, embed=embed.weight, embed_scale=embed.embed_scale.to(embed.weight.dtype),
                   norm=norm_of(m.norm), lm_head=effective_weight(hf.lm_head), layers=layers,
                   n_head=cfg.num_attention_heads, n_kv=cfg.num_key_value_heads, head_dim=head_dim(cfg),
                   scaling=cfg.query_pre_attn_scalar ** -0.5, rms=gemma_rms_norm,
                   attn_softcap=None if gemma3 else cfg.attn_logit_softcapping,
                   final_softcap=getattr(cfg, "final_logit_softcapping", None))


def rope(hf, x, positions) -> dict:
    """Gemma 2: one table. Gemma 3: one per layer type (the rotary embedding takes the type)."""
    if hf.config.model_type != "gemma3_text":
        cos, sin = hf.model.rotary_emb(x, positions[None])
        return {None: (cos[0], sin[0])}
    tables = {}
    for kind in set(hf.config.layer_types):
        cos, sin = hf.model.rotary_emb(x, positions[None], kind)
        tables[kind] = (cos[0], sin[0])
    return tables
