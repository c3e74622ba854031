"""model.*: the policy model and its LoRA adapters (rlpost/models/ reads them)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from rlpost.schema import ConfigError, Section, at_least, above, between, opt

DTYPES = ("float32", "bfloat16")  # the valid model.dtype names (rlpost/models/ maps them to torch dtypes)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",  # Llama / Qwen2
                "c_attn", "c_proj", "c_fc"]                                                    # gpt_mini


@dataclass
class LoRAConfig(Section):
    r: int = opt(0, "LoRA rank (0: off, full fine-tuning; > 0: only low-rank adapters train, through peft)",
                 at_least(0, "0: LoRA off"))
    alpha: float = opt(16.0, "LoRA scaling numerator: the adapter's output is scaled by alpha / r", above(0))
    dropout: float = opt(0.0, "dropout on the adapters' input in training (never in rollout or the reference)",
                         between(0, 1, "0: no dropout", high_open=True))
    target_modules: list[str] = opt(LORA_TARGETS, "names of the linear layers that get adapters (the ones this model "
                                                  "has: attention and MLP projections of Llama / Qwen2 and gpt_mini)")

    def check(self, prefix: str) -> None:
        if self.r > 0 and (not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules)):
            raise ConfigError(f"config key '{prefix}target_modules' must be a non-empty list of module names, got "
                              f"{self.target_modules!r}")


@dataclass
class ModelConfig(Section):
    name: str = opt("gpt_mini", "'gpt_mini' (embedded, trained from scratch), a checkpoint folder, or a hub id")
    n_layer: int = opt(4, "gpt_mini: transformer blocks", at_least(1))
    n_head: int = opt(4, "gpt_mini: attention heads", at_least(1))
    n_embd: int = opt(128, "gpt_mini: embedding width", at_least(1))
    block_size: int | None = opt(None, "gpt_mini: longest sequence (prompt + response) in tokens (None: the longest "
                                       "prompt + rollout.max_new_tokens, or SFT demonstration + eos, of the data, "
                                       "up to 8192)",
                                 at_least(1))
    dtype: str = opt("float32", "parameter dtype: float32 | bfloat16 (every parameter, gradient and AdamW state in "
                                "bf16: pure bf16, unlike trainer.precision=bf16)", choices=DTYPES)
    device: str = opt("auto", "where the model and every role run: auto (CUDA when present, else CPU) | cpu | cuda | "
                              "cuda:N")
    chat_template: bool = opt(False, "wrap prompts in the tokenizer's chat template (HF models that have one)")
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def check(self, prefix: str) -> None:
        if not re.match(r"^(auto|cpu|cuda(:\d+)?)$", self.device):
            raise ConfigError(f"config key '{prefix}device' is {self.device!r}; valid values: auto, cpu, cuda, cuda:N")
        if self.name == "gpt_mini" and self.n_embd % self.n_head:  # each head gets n_embd / n_head dimensions
            fits = [h for h in range(1, self.n_embd + 1) if self.n_embd % h == 0]
            raise ConfigError(f"config key '{prefix}n_head' is {self.n_head}, which does not divide {prefix}n_embd="
                              f"{self.n_embd}: gpt_mini splits the embedding evenly over its heads; with this "
                              f"n_embd choose n_head among {', '.join(map(str, fits[:12]))}"
                              f"{' ...' if len(fits) > 12 else ''}, or change n_embd")
