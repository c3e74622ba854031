"""sft.*: supervised fine-tuning on the task's demonstrations (rlpost/stages/sft.py)."""

from __future__ import annotations

from dataclasses import dataclass

from rlpost.schema import LEARNING_RATE, Section, at_least, opt


@dataclass
class SFTConfig(Section):
    steps: int = opt(1000, "supervised steps on the demonstrations before RL (0 skips SFT)",
                     at_least(0, "0: no SFT stage"))
    batch_size: int = opt(128, "sequences per SFT step", at_least(1))
    lr: float = opt(3e-3, "peak learning rate (linear warm-up, cosine decay to lr/10)", LEARNING_RATE)
    warmup_steps: int = opt(50, "warm-up steps", at_least(0, "0: no warm-up"))
    save_every: int = opt(250, "write a resumable checkpoint every this many steps (0: only at the end); "
                               "removed once checkpoints/sft is written", at_least(0, "0: only at the end"))
