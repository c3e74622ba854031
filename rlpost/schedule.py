"""The learning-rate schedule: a multiplier of the base learning rate at each optimizer step.

    schedule = LRSchedule("cosine", warmup_steps=10, total_steps=150, min_lr_ratio=0.1)
    schedule.factor(step)     # step = optimizer steps already taken (0 for the first)

Linear warm-up first: step s < warmup_steps gets (s + 1) / warmup_steps, so the first step does not run
at lr 0. Then `constant` stays at 1; `linear` and `cosine` decay from 1 at the end of warm-up to
`min_lr_ratio` at `total_steps` and stay there. The Trainer owns one and applies it to every param
group before each optimizer step; it is a pure function of the step, so resuming needs only the step
count and these settings (`state_dict`).
"""

from __future__ import annotations

import math

from rlpost.settings.trainer import SCHEDULES  # the valid trainer.lr_schedule names, declared with the key


class LRSchedule:
    def __init__(self, kind: str = "constant", warmup_steps: int = 0, total_steps: int | None = None,
                 min_lr_ratio: float = 0.0):
        if kind not in SCHEDULES:
            raise ValueError(f"trainer.lr_schedule is {kind!r}; valid values: {', '.join(SCHEDULES)}")
        if warmup_steps < 0:
            raise ValueError(f"trainer.warmup_steps must be >= 0, got {warmup_steps}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"trainer.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        if kind != "constant" and not total_steps:
            raise ValueError(f"trainer.lr_schedule={kind} decays over the run: it needs total_steps, the run's "
                             "optimizer steps (rl.steps x trainer.epochs x trainer.minibatches)")
        self.kind, self.warmup_steps = kind, warmup_steps
        self.total_steps, self.min_lr_ratio = total_steps, min_lr_ratio

    def factor(self, step: int) -> float:
        """The multiplier of the base learning rate for optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        frac = min((step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1), 1.0)
        decay = 1.0 - frac if self.kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * decay

    def state_dict(self) -> dict:
        return {"kind": self.kind, "warmup_steps": self.warmup_steps, "total_steps": self.total_steps,
                "min_lr_ratio": self.min_lr_ratio}

    def load_state_dict(self, state: dict) -> None:
        """The saved settings replace these, as torch's LR schedulers do: a resumed run follows its own curve."""
        self.__init__(**state)

    def __repr__(self) -> str:
        return (f"LRSchedule({self.kind!r}, warmup_steps={self.warmup_steps}, total_steps={self.total_steps}, "
                f"min_lr_ratio={self.min_lr_ratio})")
