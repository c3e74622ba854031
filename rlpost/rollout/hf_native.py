"""The native rollout engine for Hugging Face Llama / Qwen2 models (`rlpost.models.HFCausalLM`).

`transformers.generate` spends most of a small model's decode step in Python: mask construction,
cache bookkeeping, logits processors, a module call per sub-layer. This engine runs the same
weights (read from the wrapped `.hf` module at every call, so pointer weight sync just works)
through a short functional decoder written for sampling:

1. All prompts are left-padded and prefilled in one forward pass; only the last position goes
   through the LM head.
2. Prefix sharing: each prompt is prefilled once and its KV rows repeated for its K samples.
3. A preallocated KV cache: every response starts in the same column (prompts are left-padded), so
   decode step s writes column P + s of every live row; no per-step concatenation.
4. Continuous batching: a row that emits eos or a stop token leaves the batch at once (its cache
   rows are dropped), so no compute is spent on finished rows.
5. old_logp = log softmax(logits / temperature) at the sampled token, recorded as it is drawn.

The math is the Hugging Face modules' own (RMSNorm in fp32, rotate-half RoPE from the model's own
rotary embedding, grouped-query attention, SiLU-gated MLP); tests check greedy output against
`transformers` greedy `generate`, cached logits against a full forward, and old_logp against the
trainer's `token_logprobs`. q/k/v and gate/up weights are concatenated into one matmul each; the
concatenation is cached and rebuilt only when a parameter changed (an optimizer step bumps its
version counter).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlpost.batch import Batch
from rlpost.rollout import SamplingParams, assemble, sample_next

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
_STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # cos/sin depend on the position only


def _unsupported_reason(model) -> str | None:
    hf = getattr(model, "hf", None)
    cfg = getattr(hf, "config", None)
    if cfg is None:
        return "not a Hugging Face model wrapped as rlpost.models.HFCausalLM"
    if cfg.model_type not in SUPPORTED_MODEL_TYPES:
        return f"model_type {cfg.model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
    rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope not in _STATIC_ROPE:
        return f"rope_type {rope!r}"
    if getattr(cfg, "pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp > 1"
    if getattr(cfg, "use_sliding_window", False) and "sliding_attention" in (getattr(cfg, "layer_types", None) or []):
        return "sliding-window attention"
    return None


class _Weights:
    """The decoder's weights as plain tensors, with q/k/v and gate/up concatenated."""

    def __init__(self, hf):
        m, cfg = hf.model, hf.config
        self.embed = m.embed_tokens.weight
        self.norm, self.norm_eps = m.norm.weight, m.norm.variance_epsilon
        self.lm_head = hf.lm_head.weight
        self.layers = []
        for layer in m.layers:
            a, mlp = layer.self_attn, layer.mlp
            cat_bias = (lambda *ls: None if ls[0].bias is None else torch.cat([l.bias for l in ls]))
            self.layers.append((
                layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon,
                torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
                cat_bias(a.q_proj, a.k_proj, a.v_proj),
                a.o_proj.weight, a.o_proj.bias,
                layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon,
                torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
                cat_bias(mlp.gate_proj, mlp.up_proj),
                mlp.down_proj.weight, mlp.down_proj.bias, mlp.act_fn,
            ))
        self.n_head = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scaling = self.head_dim ** -0.5


def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm / Qwen2RMSNorm, op for op."""
    dt = x.dtype
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(dt)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class HFNativeEngine:
    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.policy_version = 0
        self._weights: _Weights | None = None
        self._weights_key: tuple | None = None

    @staticmethod
    def supports(model) -> bool:
        return _unsupported_reason(model) is None

    # ------------------------------------------------------------------ weights

    def _current_weights(self) -> _Weights:
        hf = self.model.hf
        key = tuple((id(p), p._version) for p in hf.parameters())  # an in-place update bumps _version
        if self._weights is None or key != self._weights_key:
            self._weights, self._weights_key = _Weights(hf), key
        return self._weights

    # ------------------------------------------------------------------ the decoder

    def _forward(self, w: _Weights, ids, cos, sin, kcache, vcache, start: int, mask) -> torch.Tensor:
        """Run tokens ids [L, t] (positions start..start+t-1 of the cache) through the decoder.

        cos/sin: [L, 1, t, D]; kcache/vcache: per layer [L, Hkv, S, D], written in place;
        mask: bool [L, 1, t, start+t] (True = attend) or None. Returns the final hidden states [L, t, H].
        """
        L, t = ids.shape
        H, Hkv, D = w.n_head, w.n_kv, w.head_dim
        end = start + t
        x = F.embedding(ids, w.embed)
        for i, (ln1, eps1, wqkv, bqkv, wo, bo, ln2, eps2, wgu, bgu, wd, bd, act) in enumerate(w.layers):
            h = _rms_norm(x, ln1, eps1)
            q, k, v = F.linear(h, wqkv, bqkv).split([H * D, Hkv * D, Hkv * D], dim=-1)
            q = q.view(L, t, H, D).transpose(1, 2)
            k = k.view(L, t, Hkv, D).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            kc, vc = kcache[i], vcache[i]
            kc[:, :, start:end] = k
            vc[:, :, start:end] = v.view(L, t, Hkv, D).transpose(1, 2)
            a = F.scaled_dot_product_attention(q, kc[:, :, :end], vc[:, :, :end], attn_mask=mask,
                                               scale=w.scaling, enable_gqa=H != Hkv)
            x = x + F.linear(a.transpose(1, 2).reshape(L, t, H * D), wo, bo)
            h = _rms_norm(x, ln2, eps2)
            g, u = F.linear(h, wgu, bgu).chunk(2, dim=-1)
            x = x + F.linear(act(g) * u, wd, bd)
        return x

    def _logits(self, w: _Weights, x_last: torch.Tensor) -> torch.Tensor:
        return F.linear(_rms_norm(x_last, w.norm, w.norm_eps), w.lm_head)

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], k: int, params: SamplingParams, seed: int = 0) -> Batch:
        hf, tok = self.model.hf, self.tokenizer
        w = self._current_weights()
        gen = torch.Generator().manual_seed(seed)
        device, dtype = w.embed.device, w.embed.dtype
        N, P, R = len(prompts), max(len(p) for p in prompts), params.max_new_tokens
        S, B = P + R, N * k
        Hkv, D = w.n_kv, w.head_dim

        ids = torch.full((N, P), tok.pad_token_id, dtype=torch.long)
        kmask = torch.ones((N, S), dtype=torch.bool)                  # key validity: False on left padding
        for i, p in enumerate(prompts):
            ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
            kmask[i, :P - len(p)] = False
        ids, kmask = ids.to(device), kmask.to(device)
        pos = (kmask[:, :P].long().cumsum(-1) - 1).clamp(min=0)       # rlpost.models.position_ids_for

        # RoPE table from the model's own rotary embedding (handles its rope scaling type)
        table_pos = torch.arange(S, device=device)[None]
        cos_t, sin_t = hf.model.rotary_emb(w.embed[:1], table_pos)   # [1, S, D]
        cos_t, sin_t = cos_t[0], sin_t[0]

        # 1. prefill each unique prompt once
        causal = torch.ones((P, P), dtype=torch.bool, device=device).tril()
        pmask = causal[None] & kmask[:, None, :P]
        pmask |= torch.eye(P, dtype=torch.bool, device=device)[None]  # pad queries see themselves (no NaN)
        kc = [torch.empty((N, Hkv, P, D), dtype=dtype, device=device) for _ in w.layers]
        vc = [torch.empty((N, Hkv, P, D), dtype=dtype, device=device) for _ in w.layers]
        x = self._forward(w, ids, cos_t[pos][:, None], sin_t[pos][:, None], kc, vc, 0, pmask[:, None])
        logits = self._logits(w, x[:, -1])                            # (N, V)

        # 2. share each prompt's KV with its K samples: one copy into the preallocated cache
        kcache = [torch.empty((B, Hkv, S, D), dtype=dtype, device=device) for _ in w.layers]
        vcache = [torch.empty((B, Hkv, S, D), dtype=dtype, device=device) for _ in w.layers]
        for big, small in zip(kcache + vcache, kc + vc):
            big.view(N, k, Hkv, S, D)[:, :, :, :P] = small[:, None]
        del kc, vc
        rows = torch.arange(N, device=device).repeat_interleave(k)
        logits, kmask, next_pos = logits[rows], kmask[rows], pos[rows, -1] + 1
        all_valid = bool(kmask.all())

        tokens = torch.full((B, R), tok.pad_token_id, dtype=torch.long)
        logps = torch.zeros((B, R))
        lengths = torch.zeros(B, dtype=torch.long)
        stopped = torch.zeros(B, dtype=torch.bool)
        stop_ids = torch.tensor([tok.eos_token_id, *params.stop_token_ids], device=device)
        live = torch.arange(B)                                        # batch row of each live cache row
        for step in range(R):
            flogits = logits.float()
            draw_from = flogits
            if step < params.min_new_tokens:                          # no stop before min_new_tokens
                draw_from = flogits.index_fill(-1, stop_ids, float("-inf"))
            tok_next = sample_next(draw_from, params, gen)            # (L,)
            scaled = flogits / params.logp_temperature
            lp = scaled.gather(-1, tok_next[:, None]).squeeze(-1) - torch.logsumexp(scaled, -1)
            tokens[live, step] = tok_next.cpu()
            logps[live, step] = lp.cpu()
            lengths[live] += 1
            done = torch.isin(tok_next, stop_ids)
            if step == R - 1:
                stopped[live[done.cpu()]] = True
                break
            if bool(done.any()):                                      # finished rows leave the batch
                stopped[live[done.cpu()]] = True
                if bool(done.all()):
                    break
                keep = (~done).nonzero().squeeze(-1)
                live = live[keep.cpu()]
                kcache = [c.index_select(0, keep) for c in kcache]
                vcache = [c.index_select(0, keep) for c in vcache]
                tok_next, next_pos, kmask = tok_next[keep], next_pos[keep], kmask[keep]
            col = P + step
            mask = None if all_valid else kmask[:, None, None, :col + 1]
            x = self._forward(w, tok_next[:, None], cos_t[next_pos][:, None, None], sin_t[next_pos][:, None, None],
                              kcache, vcache, col, mask)
            logits = self._logits(w, x[:, -1])
            next_pos = next_pos + 1
        return assemble(prompts, k, tokens, logps, lengths, stopped, tok.pad_token_id, self.policy_version)
