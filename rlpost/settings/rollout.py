"""rollout.*: what the rollout engine samples, and which engine (rlpost/rollout/ reads them)."""

from __future__ import annotations

from dataclasses import dataclass

from rlpost.schema import ConfigError, Section, at_least, between, opt
from rlpost.settings.trainer import PRECISIONS

ENGINES = ("auto", "native", "hf", "vllm")  # the valid rollout.engine names (rlpost/rollout/: build_engine)
ROLLOUT_DTYPES = ("auto",) + PRECISIONS     # rollout.dtype: 'auto' is the trainer's (resolved) precision


@dataclass
class RolloutConfig(Section):
    engine: str = opt("auto", "'auto' (says which it picks and why) | 'native' (KV cache: gpt_mini, Llama, Mistral, "
                              "Qwen2/3, Gemma 2/3, Phi-3) | 'hf' (transformers.generate) | "
                              "'vllm' (needs vLLM and rl.weight_sync=vllm)", choices=ENGINES)
    prompts_per_step: int = opt(32, "prompts sampled per RL step", at_least(1))
    k: int = opt(8, "samples per prompt (the GRPO group size)", at_least(1))
    max_new_tokens: int = opt(6, "longest response in tokens", at_least(1))
    temperature: float = opt(1.0, "sampling temperature; the trainer and the reference score tokens at the same one "
                                  "(0: greedy, whose tokens they score at temperature 1)",
                             at_least(0, "0: greedy, scored at temperature 1"))
    top_k: int = opt(0, "keep the k most likely tokens (0: off)", at_least(0, "0: off"))
    top_p: float = opt(1.0, "nucleus sampling mass (1.0: off)", between(0, 1, "1: off", low_open=True))
    max_refill_rounds: int = opt(4, "extra rollout rounds to refill groups an algorithm drops (DAPO)",
                                 at_least(0, "0: no refill"))
    max_num_seqs: int = opt(0, "native engines: at most this many sequences decode at once, the rest wait (0: all)",
                            at_least(0, "0: no cap"), layout=True)
    stop: list[str] = opt([], "stop strings: a response ends with the token that completes one (native and hf "
                              "engines)")
    dtype: str = opt("auto", "what the rollout engine samples in: auto (the trainer's precision) | fp32 | bf16 (bf16 "
                             "autocast over the fp32 weights, bf16 KV cache; not vllm, which uses model.dtype)",
                  choices=ROLLOUT_DTYPES)
    vllm_gpu_memory_utilization: float = opt(
        0.3, "rollout.engine=vllm: the fraction of the GPU's memory vLLM reserves for its weights and KV cache when "
             "it starts (vLLM's gpu_memory_utilization; its own default, 0.92, leaves a trainer beside it no room)",
        between(0, 1, low_open=True), layout=True)
    vllm_sleep: bool = opt(False, "rollout.engine=vllm, rl.topology=colocated: vLLM sleeps (KV cache freed, weights "
                                  "offloaded to CPU memory) whenever it is not sampling, so the trainer has the GPU; "
                                  "needs vLLM's sleep mode (CUDA, ROCm, XPU; not CPU)", layout=True)

    def check(self, prefix: str) -> None:
        if not all(isinstance(x, str) and x for x in self.stop):
            raise ConfigError(f"config key '{prefix}stop' must be a list of non-empty strings, got {self.stop!r}")
