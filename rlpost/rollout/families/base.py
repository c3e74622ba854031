"""What every model family shares (rlpost/rollout/families/__init__.py says what a family is): the decoder's
weights as plain tensors (`Weights`, `Layer`), the RMSNorm variants, the helpers that read an HF layer into
them, and the RoPE checks. A family file imports this module, never the package's __init__ (which imports
every family file).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from rlpost.models.lora import effective_weight

STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # cos/sin depend on the position only


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm (and Mistral's, Qwen2/3's, Phi-3's), op for op: normalised in fp32, cast, times w."""
    dt = x.dtype
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(dt)


def gemma_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma2RMSNorm / Gemma3RMSNorm: the weight is stored as an offset from 1 and applied in fp32."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * (1.0 + w.float())).type_as(x)


def norm_of(module) -> tuple[torch.Tensor, float]:
    """(weight, eps) of an HF RMSNorm module (Llama-style `variance_epsilon` or Gemma-style `eps`)."""
    eps = getattr(module, "variance_epsilon", None)
    return module.weight, getattr(module, "eps", 1e-6) if eps is None else eps


def cat_weights(*linears) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weights (LoRA merged) and biases of linear layers that read the same input, as one matmul."""
    w = torch.cat([effective_weight(m) for m in linears]) if len(linears) > 1 else effective_weight(linears[0])
    b = None if linears[0].bias is None else torch.cat([m.bias for m in linears])
    return w, b


def split_projections(layer) -> dict:
    """The Layer fields of a decoder layer with separate q/k/v and gate/up projections (Llama, Mistral, Qwen2/3,
    Gemma 2/3): q/k/v and gate/up concatenated into one matmul each, the optional q/k norms, o and down."""
    a, mlp = layer.self_attn, layer.mlp
    wqkv, bqkv = cat_weights(a.q_proj, a.k_proj, a.v_proj)
    wgu, bgu = cat_weights(mlp.gate_proj, mlp.up_proj)
    qn, kn = getattr(a, "q_norm", None), getattr(a, "k_norm", None)
    return dict(wqkv=wqkv, bqkv=bqkv, q_norm=None if qn is None else norm_of(qn),
                k_norm=None if kn is None else norm_of(kn), wo=effective_weight(a.o_proj), bo=a.o_proj.bias,
                wgu=wgu, bgu=bgu, wd=effective_weight(mlp.down_proj), bd=mlp.down_proj.bias, act=mlp.act_fn)


@dataclass
class Layer:
    """One decoder layer. Norms are (weight, eps) pairs; None: the family has no such norm."""

    ln_attn: tuple                # before attention
    wqkv: torch.Tensor            # q, k, v projections concatenated
    bqkv: torch.Tensor | None
    q_norm: tuple | None          # on each head's query / key, before RoPE (Qwen3, Gemma 3)
    k_norm: tuple | None
    wo: torch.Tensor
    bo: torch.Tensor | None
    post_attn: tuple | None       # on the attention output, before the residual (Gemma)
    ln_mlp: tuple                 # before the MLP
    wgu: torch.Tensor             # gate, up projections concatenated
    bgu: torch.Tensor | None
    wd: torch.Tensor
    bd: torch.Tensor | None
    act: object
    post_mlp: tuple | None        # on the MLP output, before the residual (Gemma)
    window: int | None = None     # sliding window: a query attends to the last `window` positions, itself included
    rope: str | None = None       # which RoPE table (Gemma 3: local and global layers have their own)


@dataclass
class Weights:
    """The decoder's weights as plain tensors, and the family's constants."""

    family: str
    embed: torch.Tensor
    embed_scale: torch.Tensor | None   # Gemma: sqrt(hidden_size), in the embedding's dtype
    norm: tuple
    lm_head: torch.Tensor
    layers: list[Layer]
    n_head: int
    n_kv: int
    head_dim: int
    scaling: float
    rms: object = rms_norm             # the family's RMSNorm (rms_norm or gemma_rms_norm)
    attn_softcap: float | None = None  # scores -> cap * tanh(scores / cap) before the mask (Gemma 2)
    final_softcap: float | None = None  # the same on the logits (Gemma 2 and 3)


def cast_matmuls(w: Weights, dtype: torch.dtype | None) -> Weights:
    """`w` with its matmul weights (q/k/v, o, gate/up, down, LM head, and their biases) cast to `dtype` once, for
    sampling in bf16 (rollout.dtype); embedding and norms stay as they are, as under autocast. None: `w` itself."""
    if dtype is None:
        return w

    def cast(t):
        return None if t is None else t.to(dtype)

    layers = [dataclasses.replace(x, wqkv=cast(x.wqkv), bqkv=cast(x.bqkv), wo=cast(x.wo), bo=cast(x.bo),
                                  wgu=cast(x.wgu), bgu=cast(x.bgu), wd=cast(x.wd), bd=cast(x.bd)) for x in w.layers]
    return dataclasses.replace(w, lm_head=cast(w.lm_head), layers=layers)


def head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def rope_types(cfg) -> list[str]:
    """The rope_type of every RoPE table the config describes (Gemma 3 has one per layer type)."""
    params = getattr(cfg, "rope_parameters", None) or {}
    if params and all(isinstance(v, dict) for v in params.values()):
        return [v.get("rope_type", "default") for v in params.values()]
    return [params.get("rope_type", "default")]


def check_rope(cfg) -> str | None:
    bad = [r for r in rope_types(cfg) if r not in STATIC_ROPE]
    return f"rope_type {bad[0]!r} (the native engine supports {', '.join(STATIC_ROPE)})" if bad else None
