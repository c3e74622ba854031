"""ROLLOUT: sample K completions per prompt and capture old_logp at sample time.

An engine turns prompt token lists into a `Batch` (see rlpost/batch.py for the row layout):

    batch = engine.generate(prompt_ids, k=8, params=SamplingParams(...), seed=step)
    batch.old_logp        # [B, T] log-prob of each sampled token under the sampling distribution
    batch.group_ids       # [B]   which prompt a row came from (rows of a group are adjacent)
    batch.policy_version  # [B]   the weight version that sampled it
    batch.meta["finish_reason"]  # per sample: "stop" (eos, a stop token or a stop string) or "length"

`old_logp` is log softmax(logits / temperature) at the sampled token: the distribution the trainer
recomputes. top-k / top-p truncation (off by default) is not folded into it, as in TRL. An engine that can
only report the truncated distribution's log-probs (vLLM with top-k / top-p / min_new_tokens) returns them
as `batch.rollout_logp` (the behaviour policy's), and the RL controller then recomputes old_logp itself.
The engine knows nothing about losses.

Every engine implements the `Engine` protocol (engine.py: generate, update_weights, close, version):
weights reach an engine through update_weights only. The native engines (native.py: gpt_mini,
hf_native.py: HF Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3) share one continuous-batching scheduler
(scheduler.py); hf_generate.py wraps `transformers.generate` for any other causal LM; vllm_engine.py runs vLLM.
"""

from __future__ import annotations

import torch

from rlpost.batch import Batch
from rlpost.rollout.engine import Engine, SamplingParams

__all__ = ["Engine", "SamplingParams", "StopStrings", "assemble", "build_engine", "engine_choice", "sample_next"]


def sample_next(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None = None,
                uniform: torch.Tensor | None = None) -> torch.Tensor:
    """Draw one token per row from logits [N, V] under temperature / top-k / top-p. Returns [N].

    With `uniform` ([N], values in (0, 1]) the draw is by inverse CDF: row n takes the first token whose
    cumulative probability reaches uniform[n], so the caller decides which random number each row uses
    (the native engines index it by (sequence, step)). Otherwise torch.multinomial draws from `generator`.
    """
    if p.temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / p.temperature
    if p.top_k > 0:
        kth = torch.topk(logits, min(p.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > p.top_p  # keep the smallest prefix with mass >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    if uniform is None:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    cdf = probs.double().cumsum(-1)  # a token of probability 0 never strictly raises the cdf: never drawn
    target = uniform.to(cdf)[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, target).squeeze(-1).clamp(max=logits.shape[-1] - 1)


class StopStrings:
    """Stop strings over a growing response. `hit(ids)` is True when the decoded text of the response's last
    tokens contains a stop string; checked after every token, it fires on the token that completes the first
    occurrence, and the response ends with that token (the string is kept, as the policy generated it)."""

    def __init__(self, stops: list[str], decode):
        self.stops, self.decode = [s for s in stops if s], decode
        self.window = max(map(len, self.stops), default=0) + 4  # tokens: any occurrence ending at the last one fits

    def hit(self, ids: list[int]) -> bool:
        text = self.decode(ids[-self.window:])
        return any(s in text for s in self.stops)

    def end(self, ids: list[int], min_len: int = 1) -> int | None:
        """Length (>= min_len) of the shortest prefix of a response that contains a stop string (None: none)."""
        return next((n for n in range(max(min_len, 1), len(ids) + 1) if self.hit(ids[:n])), None)


def assemble(prompts: list[list[int]], k: int, tokens: torch.Tensor, logps: torch.Tensor, lengths: torch.Tensor,
             stopped: torch.Tensor, pad_id: int, version: int) -> Batch:
    """Left-padded prompts + right-padded responses -> Batch. tokens/logps: [N*k, R], lengths/stopped: [N*k]."""
    N, P = len(prompts), max(len(p) for p in prompts)
    prompt_ids = torch.full((N, P), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((N, P), dtype=torch.long)
    for i, p in enumerate(prompts):
        prompt_ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
        prompt_mask[i, P - len(p):] = 1
    rows = torch.arange(N).repeat_interleave(k)
    R = max(int(lengths.max()), 1)
    resp_mask = (torch.arange(R)[None, :] < lengths[:, None]).long()       # (B, R)
    resp_ids = torch.where(resp_mask.bool(), tokens[:, :R], torch.full_like(tokens[:, :R], pad_id))
    B = N * k
    return Batch(
        input_ids=torch.cat([prompt_ids[rows], resp_ids], 1),
        attention_mask=torch.cat([prompt_mask[rows], resp_mask], 1),
        response_mask=torch.cat([torch.zeros((B, P), dtype=torch.long), resp_mask], 1),
        old_logp=torch.cat([torch.zeros((B, P)), logps[:, :R].float() * resp_mask], 1),
        group_ids=rows.clone(),
        policy_version=torch.full((B,), version, dtype=torch.long),
        meta={"finish_reason": ["stop" if s else "length" for s in stopped.tolist()]},
    )


ENGINES = ("auto", "native", "hf", "vllm")  # the valid rollout.engine names (build_engine)


def engine_choice(model) -> tuple[str, str]:
    """What rollout.engine=auto runs for `model`, and why: ("native", "native (qwen3)") or
    ("hf", "hf: model_type 'gpt2' has no native implementation (native: ...)")."""
    from rlpost.rollout.hf_native import _unsupported_reason
    from rlpost.rollout.native import NativeEngine

    if NativeEngine.supports(model):
        return "native", "native (gpt_mini)"
    reason = _unsupported_reason(model)
    if reason is None:
        return "native", f"native ({model.hf.config.model_type})"
    return "hf", f"hf: {reason}"


def build_engine(kind: str, model, tokenizer, share_weights: bool = True, dtype: str = "fp32",
                 vllm_sleep: bool = False) -> Engine:
    """'native' (KV cache, continuous batching: gpt_mini, and the HF families of rlpost/rollout/families/:
    Llama, Mistral, Qwen2, Qwen3, Gemma 2 / 3, Phi-3), 'hf' (transformers.generate, any HF causal LM), 'vllm'
    (vLLM, an optional extra: rlpost/rollout/vllm_engine.py), or 'auto' (native when the model is supported,
    else hf; it prints which it chose and why, e.g. "rollout.engine=auto: native (qwen3)").

    share_weights: the engine runs the trainer's own module (weight sync "pointer": zero copy), or, False,
    a private copy refreshed by update_weights ("copy"). vLLM always holds its own weights ("vllm").

    dtype: 'fp32' or 'bf16', what an in-process engine samples in (rollout.dtype; engine.ModuleEngine says how).
    vLLM samples in its own dtype, the model's (model.dtype). vllm_sleep: vLLM sleeps between rollouts
    (rollout.vllm_sleep, vllm_engine.py)."""
    if kind == "vllm":
        from rlpost.rollout.vllm_engine import VLLMEngine, vllm_unavailable_reason

        reason = vllm_unavailable_reason()
        if reason:
            raise ValueError(f"rollout.engine=vllm: {reason}")
        return VLLMEngine(model, tokenizer, sleep=vllm_sleep)
    from rlpost.rollout.hf_generate import HFGenerateEngine
    from rlpost.rollout.hf_native import HFNativeEngine, _unsupported_reason
    from rlpost.rollout.native import NativeEngine

    if kind == "auto":
        kind, why = engine_choice(model)
        print(f"rlpost: rollout.engine=auto: {why}", flush=True)
    if kind == "native":
        if NativeEngine.supports(model):
            return NativeEngine(model, tokenizer, share_weights, dtype)
        reason = _unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"rollout.engine=native supports gpt_mini and the Hugging Face families listed in "
                             f"docs/models.md, not this model ({reason}); use rollout.engine=hf for this model")
        return HFNativeEngine(model, tokenizer, share_weights, dtype)
    if kind != "hf":
        raise ValueError(f"rollout.engine must be one of {', '.join(ENGINES)}, got {kind!r}")
    return HFGenerateEngine(model, tokenizer, share_weights, dtype)
