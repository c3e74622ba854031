"""The native rollout engine for Hugging Face decoder models (`rlpost.models.HFCausalLM`): Llama 2 / 3,
Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 (text) and Phi-3 (rlpost/rollout/families/ says what differs).

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

The math is the Hugging Face modules' own (the family's RMSNorm in fp32, rotate-half RoPE from the model's
own rotary embedding, grouped-query attention, gated MLP, the family's extra norms, soft-caps and sliding
windows); tests check greedy output against `transformers` greedy `generate`, cached logits against a full
forward, and old_logp against the trainer's `token_logprobs`, per family. q/k/v and gate/up weights are
concatenated into one matmul each; the concatenation is cached and rebuilt only when a parameter changed
(an optimizer step or update_weights' in-place copy_ bumps its version counter). A LoRA layer (peft,
model.lora) is read as its merged weight, base + adapter delta (`rlpost.models.lora.effective_weight`),
rebuilt when the adapters change or are switched off or on.

Sliding windows: a layer with window W lets a query attend to the keys fewer than W positions back
(HF's `kv_idx > q_idx - W`). In a row's cache a token's position is its column minus the row's left
padding, so the window is a column distance, and under shared-prompt attention the prompt table's
columns are masked the same way (`attend`'s prompt_mask).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlpost.batch import Batch
from rlpost.models.lora import lora_layers
from rlpost.rollout import scheduler
from rlpost.rollout.engine import ModuleEngine, SamplingParams
from rlpost.rollout.families import family, supported_model_types
from rlpost.rollout.families.base import Weights, cast_matmuls
from rlpost.rollout.scheduler import attend, write_kv


def _unsupported_reason(model) -> str | None:
    """Why the native engine cannot run `model` (None: it can)."""
    hf = getattr(model, "hf", None)
    cfg = getattr(hf, "config", None)
    if cfg is None:
        return "not a Hugging Face model wrapped as rlpost.models.HFCausalLM"
    fam = family(cfg.model_type)
    if fam is None:
        return (f"model_type {cfg.model_type!r} has no native implementation (native: "
                f"{', '.join(supported_model_types())})")
    reason = fam.unsupported(cfg)
    return None if reason is None else f"model_type {cfg.model_type!r}: {reason}"


def _signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin with its first half negated: rotate_half(x) * sin == x.roll(h, -1) * _signed_sin(sin), bit for bit
    (rotate_half(x) is [-x2, x1], the roll is [x2, x1], and a sign moves exactly between the factors), in one op
    where rotate_half takes four."""
    h = sin.shape[-1] // 2
    return torch.cat([-sin[..., :h], sin[..., h:]], dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, ssin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (HF's x * cos + rotate_half(x) * sin, with ssin = _signed_sin(sin)) on the first
    cos.shape[-1] features of each head (all of them but for Phi-3's partial rotary), the rest passed through."""
    rd = cos.shape[-1]
    if rd == x.shape[-1]:
        return x * cos + x.roll(rd // 2, -1) * ssin
    rot, rest = x[..., :rd], x[..., rd:]
    return torch.cat([rot * cos + rot.roll(rd // 2, -1) * ssin, rest], dim=-1)


def _window_masks(window: int, cols, t: int, end: int, mask, shared, device):
    """The masks of a sliding-window layer: (mask over cache columns :end [., 1, t, end], mask over the
    shared prompt table's P columns [., 1, 1, P] or None). Query column qc sees key column c when
    c > qc - window; in the prompt table (decode, response column qc) prompt column c sits P - qc columns
    further back, so it is seen when c > qc + P - window."""
    col = torch.arange(end, device=device)
    if isinstance(cols, int):
        qc = (cols + torch.arange(t, device=device))[None, None, :, None]          # [1, 1, t, 1]
    else:
        qc = cols.to(device)[:, None, None, None]                                  # [L, 1, 1, 1]
    m = col > qc - window
    if mask is not None:
        m = m & mask
    pm = None
    if shared is not None:
        P = shared.table.shape[4]
        pm = torch.arange(P, device=device) > qc + P - window
    return m, pm


class HFNativeEngine(ModuleEngine):
    prefix_block = 16  # tokens per block of the cross-prompt prefix cache (0: off)
    shared_attention_min = 64  # prompts this long (or longer) are read once per prompt in decode (scheduler.attend)

    def __init__(self, model, tokenizer, share_weights: bool = True, dtype: str = "fp32"):
        super().__init__(model, tokenizer, share_weights, dtype)
        self._weights: Weights | None = None
        self._weights_key: tuple | None = None

    @staticmethod
    def supports(model) -> bool:
        return _unsupported_reason(model) is None

    def generate(self, prompts: list[list[int]], k: int, params: SamplingParams, seed: int = 0) -> Batch:
        self._open()
        # the matmul weights are pre-cast (cast_matmuls): autocast casts activations only
        with self._autocast(self.device):
            return scheduler.generate(self, self.tokenizer, prompts, k, params, seed, self._policy_version,
                                      self.prefix_block, self.shared_attention_min)

    def _current_weights(self) -> Weights:
        hf = self._model.hf
        key = (tuple((id(p), p._version) for p in hf.parameters()),  # an in-place update bumps _version
               # LoRA adapters switched off or on (adapters_disabled, peft's set_adapter) change the merged
               # weights without touching a parameter
               tuple((m.disable_adapters, m.merged, tuple(m.active_adapters)) for m in lora_layers(hf)))
        if self._weights is None or key != self._weights_key:
            # the matmul weights cast once per update when sampling in bf16 (rollout.dtype)
            self._weights = cast_matmuls(family(hf.config.model_type).read(hf), self.cache_dtype)
            self._weights_key = key
        return self._weights

    def release_weights(self) -> bool:
        """The module copy's parameters freed, and with them the fused (and cast) matrices read from them."""
        released = super().release_weights()
        if released:
            self._weights = self._weights_key = None
        return released

    def close(self) -> None:
        super().close()
        self._weights = self._weights_key = None

    # ------------------------------------------------------------------ the runner (scheduler.py)

    @property
    def device(self) -> torch.device:
        return self._model.hf.model.embed_tokens.weight.device

    def prepare(self, S: int):
        """The weights and the RoPE tables of positions :S ({layer kind: (cos, signed sin) [S, rotary_dim]}),
        from the model's own rotary embedding."""
        w, hf = self._current_weights(), self._model.hf
        tables = family(hf.config.model_type).rope(hf, w.embed[:1], torch.arange(S, device=w.embed.device))
        return w, {kind: (cos, _signed_sin(sin)) for kind, (cos, sin) in tables.items()}

    def new_cache(self, rows: int, S: int) -> torch.Tensor:
        w = self._current_weights()
        return torch.zeros((2, len(w.layers), rows, w.n_kv, S, w.head_dim),
                           dtype=self.cache_dtype or w.embed.dtype,
                           device=w.embed.device)

    def forward(self, ctx, ids, pos, kv, cols, end, mask, shared=None) -> torch.Tensor:
        w, tables = ctx
        L, t = ids.shape
        H, Hkv, D, rms = w.n_head, w.n_kv, w.head_dim, w.rms
        rot = {kind: (cos[pos][:, None], sin[pos][:, None]) for kind, (cos, sin) in tables.items()}  # [L, 1, t, .]
        windowed = {}                                                  # window -> its masks, built once per call
        x = F.embedding(ids, w.embed)
        if w.embed_scale is not None:
            x = x * w.embed_scale
        for i, layer in enumerate(w.layers):
            h = rms(x, *layer.ln_attn)
            qk, v = F.linear(h, layer.wqkv, layer.bqkv).split([(H + Hkv) * D, Hkv * D], dim=-1)
            cos, sin = rot[layer.rope]
            if layer.q_norm is None:  # the queries' and keys' heads rotated together, in one pass
                qk = _rope(qk.view(L, t, H + Hkv, D).transpose(1, 2), cos, sin)
                q, k = qk[:, :H], qk[:, H:]
            else:
                q, k = qk.view(L, t, H + Hkv, D).split([H, Hkv], dim=2)
                q, k = rms(q, *layer.q_norm), rms(k, *layer.k_norm)
                q, k = _rope(q.transpose(1, 2), cos, sin), _rope(k.transpose(1, 2), cos, sin)
            keys, values = write_kv(kv[0, i], kv[1, i], k, v.view(L, t, Hkv, D).transpose(1, 2), cols, end)
            layer_mask, prompt_mask = mask, None
            if layer.window is not None:
                if layer.window not in windowed:
                    windowed[layer.window] = _window_masks(layer.window, cols, t, end, mask, shared, x.device)
                layer_mask, prompt_mask = windowed[layer.window]
            a = attend(q, keys, values, layer_mask, w.scaling, shared, i, w.attn_softcap, prompt_mask)
            a = F.linear(a.transpose(1, 2).reshape(L, t, H * D), layer.wo, layer.bo)
            x = x + (a if layer.post_attn is None else rms(a, *layer.post_attn))
            g, u = F.linear(rms(x, *layer.ln_mlp), layer.wgu, layer.bgu).chunk(2, dim=-1)
            m = F.linear(layer.act(g) * u, layer.wd, layer.bd)
            x = x + (m if layer.post_mlp is None else rms(m, *layer.post_mlp))
        return x

    def logits(self, ctx, x_last: torch.Tensor) -> torch.Tensor:
        w = ctx[0]
        out = F.linear(w.rms(x_last, *w.norm), w.lm_head)
        if w.final_softcap is not None:
            out = torch.tanh(out / w.final_softcap) * w.final_softcap
        return out
