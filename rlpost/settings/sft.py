"""sft.*: supervised fine-tuning on the task's demonstrations (rlpost/stages/sft.py)."""

from __future__ import annotations

from dataclasses import dataclass

from rlpost.schema import ADAM_BETA, LEARNING_RATE, Section, at_least, between, opt


@dataclass
class SFTConfig(Section):
    steps: int = opt(1000, "supervised steps on the demonstrations before RL (0 skips SFT)",
                     at_least(0, "0: no SFT stage"))
    batch_size: int = opt(128, "sequences per SFT step", at_least(1))
    lr: float = opt(3e-3, "peak learning rate (linear warm-up, cosine decay to lr * min_lr_ratio)", LEARNING_RATE)
    warmup_steps: int = opt(50, "warm-up steps", at_least(0, "0: no warm-up"))
    min_lr_ratio: float = opt(0.1, "the cosine decay ends at lr * min_lr_ratio",
                              between(0, 1, "0: decay to 0; 1: no decay"))
    weight_decay: float = opt(0.1, "AdamW weight decay", at_least(0, "0: none"))
    adam_beta1: float = opt(0.9, "AdamW beta1 (decay of the gradient's running mean)", ADAM_BETA)
    adam_beta2: float = opt(0.95, "AdamW beta2 (decay of the squared gradient's running mean)", ADAM_BETA)
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0: off)", at_least(0, "0: off"))
    save_every: int = opt(250, "write a resumable checkpoint every this many steps (0: only at the end); "
                               "removed once checkpoints/sft is written", at_least(0, "0: only at the end"))
