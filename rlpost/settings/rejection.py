"""rejection.*: rejection-sampling SFT after RL (rlpost/stages/rejection.py)."""

from __future__ import annotations

from dataclasses import dataclass

from rlpost.schema import ADAM_BETA, FINITE, LEARNING_RATE, Section, at_least, between, opt


@dataclass
class RejectionConfig(Section):
    enabled: bool = opt(False, "rlpost train: after RL (and its evaluation), sample the policy on training prompts, "
                               "keep the verified samples and fine-tune on them (rejection-sampling SFT)")
    samples_per_prompt: int = opt(8, "samples drawn per training prompt (rollout.temperature, rollout.max_new_tokens)",
                                  at_least(1))
    num_prompts: int = opt(2000, "training prompts sampled", at_least(1))
    max_per_prompt: int = opt(1, "verified samples kept per prompt at most, distinct (the first ones drawn)",
                              at_least(1))
    success_threshold: float = opt(1.0, "a sample is verified when the task's reward is >= this", FINITE)
    steps: int = opt(200, "fine-tuning steps on the kept samples", at_least(1))
    batch_size: int = opt(128, "kept samples per fine-tuning step (drawn with replacement)", at_least(1))
    lr: float = opt(3e-4, "peak fine-tuning learning rate (linear warm-up, cosine decay to lr * min_lr_ratio)",
                    LEARNING_RATE)
    warmup_steps: int = opt(20, "fine-tuning warm-up steps", at_least(0, "0: no warm-up"))
    min_lr_ratio: float = opt(0.1, "the cosine decay ends at lr * min_lr_ratio",
                              between(0, 1, "0: decay to 0; 1: no decay"))
    weight_decay: float = opt(0.1, "AdamW weight decay of the fine-tuning", at_least(0, "0: none"))
    adam_beta1: float = opt(0.9, "AdamW beta1 of the fine-tuning", ADAM_BETA)
    adam_beta2: float = opt(0.95, "AdamW beta2 of the fine-tuning", ADAM_BETA)
    grad_clip: float = opt(1.0, "fine-tuning: clip the global gradient norm to this (0: off)", at_least(0, "0: off"))
