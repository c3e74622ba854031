"""rejection.*: rejection-sampling SFT after RL (rlpost/stages/rejection.py)."""

from __future__ import annotations

from dataclasses import dataclass

from rlpost.schema import FINITE, LEARNING_RATE, Section, at_least, opt


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
    lr: float = opt(3e-4, "peak fine-tuning learning rate (linear warm-up, cosine decay to lr/10)", LEARNING_RATE)
    warmup_steps: int = opt(20, "fine-tuning warm-up steps", at_least(0, "0: no warm-up"))
