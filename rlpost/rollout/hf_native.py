"""The native rollout engine for Hugging Face Llama / Qwen2 models (`rlpost.models.HFCausalLM`).

`transformers.generate` spends most of a small model's decode step in Python: mask construction,
cache bookkeeping, logits processors, a module call per sub-layer. This engine runs the same
weights (read from the wrapped `.hf` module at every call: the trainer's own under pointer weight
sync, the engine's copy, refreshed in place by update_weights, otherwise)
through a short functional decoder written for sampling. The scheduling is scheduler.py's, shared
with gpt_mini's engine: prefix-shared prefill (only the last position goes through the LM head),
shared-prompt attention for long prompts, a cross-prompt prefix cache, a preallocated KV cache,
continuous batching under `max_num_seqs` (a finished row leaves at once and a waiting sequence takes
its place), stop tokens and stop strings, seeded sampling independent of the schedule, old_logp
recorded as each token is drawn.

The math is the Hugging Face modules' own (RMSNorm in fp32, rotate-half RoPE from the model's own
rotary embedding, grouped-query attention, SiLU-gated MLP); tests check greedy output against
`transformers` greedy `generate`, cached logits against a full forward, and old_logp against the
trainer's `token_logprobs`. q/k/v and gate/up weights are concatenated into one matmul each; the
concatenation is cached and rebuilt only when a parameter changed (an optimizer step or
update_weights' in-place copy_ bumps its version counter). A LoRA layer (peft, model.lora) is read as its
merged weight, base + adapter delta (`rlpost.models.lora.effective_weight`), rebuilt when the adapters change.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlpost.batch import Batch
from rlpost.models.lora import effective_weight
from rlpost.rollout import SamplingParams, scheduler
from rlpost.rollout.engine import ModuleEngine
from rlpost.rollout.scheduler import attend, write_kv

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
    """The decoder's weights as plain tensors, with q/k/v and gate/up concatenated (LoRA layers merged)."""

    def __init__(self, hf, dtype: torch.dtype | None = None):
        """dtype: the matmul weights (q/k/v, o, gate/up, down, LM head) cast to it once here (bf16 sampling);
        embedding and norms stay as they are, as under autocast."""
        def cast(t):
            return t if t is None or dtype is None else t.to(dtype)

        def W(linear):
            return cast(effective_weight(linear))

        def cat_bias(*linears):
            return None if linears[0].bias is None else cast(torch.cat([x.bias for x in linears]))

        m, cfg = hf.model, hf.config
        self.embed = m.embed_tokens.weight
        self.norm, self.norm_eps = m.norm.weight, m.norm.variance_epsilon
        self.lm_head = cast(hf.lm_head.weight)
        self.layers = []
        for layer in m.layers:
            a, mlp = layer.self_attn, layer.mlp
            self.layers.append((
                layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon,
                torch.cat([W(a.q_proj), W(a.k_proj), W(a.v_proj)]),
                cat_bias(a.q_proj, a.k_proj, a.v_proj),
                W(a.o_proj), cast(a.o_proj.bias),
                layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon,
                torch.cat([W(mlp.gate_proj), W(mlp.up_proj)]),
                cat_bias(mlp.gate_proj, mlp.up_proj),
                W(mlp.down_proj), cast(mlp.down_proj.bias), mlp.act_fn,
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


class HFNativeEngine(ModuleEngine):
    prefix_block = 16  # tokens per block of the cross-prompt prefix cache (0: off)
    shared_attention_min = 64  # prompts this long (or longer) are read once per prompt in decode (scheduler.attend)

    def __init__(self, model, tokenizer, share_weights: bool = True, dtype: str = "fp32"):
        super().__init__(model, tokenizer, share_weights, dtype)
        self._weights: _Weights | None = None
        self._weights_key: tuple | None = None

    @staticmethod
    def supports(model) -> bool:
        return _unsupported_reason(model) is None

    def generate(self, prompts: list[list[int]], k: int, params: SamplingParams, seed: int = 0) -> Batch:
        self._open()
        with self._autocast(self.device):  # the weights are pre-cast (_Weights): autocast casts activations only
            return scheduler.generate(self, self.tokenizer, prompts, k, params, seed, self._policy_version,
                                      self.prefix_block, self.shared_attention_min)

    def _current_weights(self) -> _Weights:
        hf = self._model.hf
        key = tuple((id(p), p._version) for p in hf.parameters())  # an in-place update bumps _version
        if self._weights is None or key != self._weights_key:
            self._weights, self._weights_key = _Weights(hf, self.cache_dtype), key
        return self._weights

    def close(self) -> None:
        super().close()
        self._weights = self._weights_key = None

    # ------------------------------------------------------------------ the runner (scheduler.py)

    @property
    def device(self) -> torch.device:
        return self._model.hf.model.embed_tokens.weight.device

    def prepare(self, S: int):
        """The weights and the RoPE table of positions :S, from the model's own rotary embedding."""
        w = self._current_weights()
        cos, sin = self._model.hf.model.rotary_emb(w.embed[:1], torch.arange(S, device=w.embed.device)[None])
        return w, cos[0], sin[0]                                      # [S, D] each

    def new_cache(self, rows: int, S: int) -> torch.Tensor:
        w = self._current_weights()
        return torch.zeros((2, len(w.layers), rows, w.n_kv, S, w.head_dim),
                           dtype=self.cache_dtype or w.embed.dtype,
                           device=w.embed.device)

    def forward(self, ctx, ids, pos, kv, cols, end, mask, shared=None) -> torch.Tensor:
        w, cos_t, sin_t = ctx
        L, t = ids.shape
        H, Hkv, D = w.n_head, w.n_kv, w.head_dim
        cos, sin = cos_t[pos][:, None], sin_t[pos][:, None]           # [L, 1, t, D]
        x = F.embedding(ids, w.embed)
        for i, (ln1, eps1, wqkv, bqkv, wo, bo, ln2, eps2, wgu, bgu, wd, bd, act) in enumerate(w.layers):
            h = _rms_norm(x, ln1, eps1)
            q, k, v = F.linear(h, wqkv, bqkv).split([H * D, Hkv * D, Hkv * D], dim=-1)
            q = q.view(L, t, H, D).transpose(1, 2)
            k = k.view(L, t, Hkv, D).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            keys, values = write_kv(kv[0, i], kv[1, i], k, v.view(L, t, Hkv, D).transpose(1, 2), cols, end)
            a = attend(q, keys, values, mask, w.scaling, shared, i)
            x = x + F.linear(a.transpose(1, 2).reshape(L, t, H * D), wo, bo)
            h = _rms_norm(x, ln2, eps2)
            g, u = F.linear(h, wgu, bgu).chunk(2, dim=-1)
            x = x + F.linear(act(g) * u, wd, bd)
        return x

    def logits(self, ctx, x_last: torch.Tensor) -> torch.Tensor:
        w = ctx[0]
        return F.linear(_rms_norm(x_last, w.norm, w.norm_eps), w.lm_head)
