"""The HF native engine's RoPE (rlpost/rollout/hf_native.py `_rope`: a roll and a sign-folded sine table,
queries and keys rotated together) against transformers' own `apply_rotary_pos_emb`, bit for bit: full rotary
(Llama) and partial rotary (Phi-3: only the first rotary_dim features of a head turn, rotary_dim / 2 odd too),
more query heads than key/value heads (GQA), fp32 and bf16."""

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_rope
from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb as phi3_rope

from rlpost.rollout.hf_native import _rope, _signed_sin


def tables(S, rotary_dim, dtype):
    """cos / sin [S, rotary_dim] as an HF rotary embedding builds them (the frequencies repeated twice)."""
    inv = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
    ang = torch.arange(S, dtype=torch.float32)[:, None] * inv[None]
    emb = torch.cat([ang, ang], -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim, rotary_dim", [(16, 16), (24, 24), (16, 8), (16, 6), (32, 12), (64, 32)])
def test_rope_by_roll_is_bit_identical_to_transformers(head_dim, rotary_dim, dtype):
    torch.manual_seed(0)
    L, t, H, Hkv, S = 3, 5, 4, 2, 20
    q, k = torch.randn(L, H, t, head_dim).to(dtype), torch.randn(L, Hkv, t, head_dim).to(dtype)
    pos = torch.randint(0, S, (L, t))
    cos, sin = tables(S, rotary_dim, dtype)
    reference = llama_rope if rotary_dim == head_dim else phi3_rope
    want_q, want_k = reference(q, k, cos[pos], sin[pos])                     # [L, t, rd] -> unsqueezed at dim 1
    ssin = _signed_sin(sin)
    got = _rope(torch.cat([q, k], 1), cos[pos][:, None], ssin[pos][:, None])  # both in one pass, as the engine
    assert torch.equal(got[:, :H], want_q) and torch.equal(got[:, H:], want_k)
    # and one at a time, as the q/k-norm families (Qwen3, Gemma 3) rotate them
    assert torch.equal(_rope(q, cos[pos][:, None], ssin[pos][:, None]), want_q)
    assert torch.equal(_rope(k, cos[pos][:, None], ssin[pos][:, None]), want_k)
