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
(scheduler.py, drawing tokens with sampling.py); hf_generate.py wraps `transformers.generate` for any other
causal LM; vllm_engine.py runs vLLM (an optional extra, which it imports only when that engine is built). The
engine files import engine.py and sampling.py, never this package, which imports them.
"""

from __future__ import annotations

from rlpost.rollout.engine import Engine, SamplingParams
from rlpost.settings.rollout import ENGINES  # the valid rollout.engine names (build_engine), declared with the key
from rlpost.rollout.hf_generate import HFGenerateEngine
from rlpost.rollout.hf_native import HFNativeEngine, _unsupported_reason
from rlpost.rollout.native import NativeEngine
from rlpost.rollout.sampling import StopStrings, sample_next
from rlpost.rollout.vllm_engine import VLLMEngine, vllm_unavailable_reason

__all__ = ["Engine", "SamplingParams", "StopStrings", "build_engine", "engine_choice", "sample_next"]


def engine_choice(model) -> tuple[str, str]:
    """What rollout.engine=auto runs for `model`, and why: ("native", "native (qwen3)") or
    ("hf", "hf: model_type 'gpt2' has no native implementation (native: ...)")."""
    if NativeEngine.supports(model):
        return "native", "native (gpt_mini)"
    reason = _unsupported_reason(model)
    if reason is None:
        return "native", f"native ({model.hf.config.model_type})"
    return "hf", f"hf: {reason}"


def build_engine(kind: str, model, tokenizer, share_weights: bool = True, dtype: str = "fp32",
                 vllm_sleep: bool = False, vllm_gpu_memory_utilization: float = 0.3) -> Engine:
    """'native' (KV cache, continuous batching: gpt_mini, and the HF families of rlpost/rollout/families/:
    Llama, Mistral, Qwen2, Qwen3, Gemma 2 / 3, Phi-3), 'hf' (transformers.generate, any HF causal LM), 'vllm'
    (vLLM, an optional extra: rlpost/rollout/vllm_engine.py), or 'auto' (native when the model is supported,
    else hf; it prints which it chose and why, e.g. "rollout.engine=auto: native (qwen3)").

    share_weights: the engine runs the trainer's own module (weight sync "pointer": zero copy), or, False,
    a private copy refreshed by update_weights ("copy"). vLLM always holds its own weights ("vllm").

    dtype: 'fp32' or 'bf16', what an in-process engine samples in (rollout.dtype; engine.ModuleEngine says how).
    vLLM samples in its own dtype, the model's (model.dtype). vllm_sleep: vLLM sleeps between rollouts
    (rollout.vllm_sleep, vllm_engine.py); vllm_gpu_memory_utilization: the fraction of the GPU it reserves
    (rollout.vllm_gpu_memory_utilization)."""
    if kind == "vllm":

        reason = vllm_unavailable_reason()
        if reason:
            raise ValueError(f"rollout.engine=vllm: {reason}")
        return VLLMEngine(model, tokenizer, sleep=vllm_sleep, gpu_memory_utilization=vllm_gpu_memory_utilization)
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
