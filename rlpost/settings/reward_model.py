"""reward_model.*: the Bradley-Terry reward model, trained in a run or loaded (rlpost/env/reward_model.py)."""

from __future__ import annotations

from dataclasses import dataclass

from rlpost.schema import LEARNING_RATE, ConfigError, Section, at_least, between, opt


@dataclass
class RewardModelConfig(Section):
    path: str | None = opt(None, "a reward model folder (from `rlpost rm`) to use as the RL reward; the task's "
                                 "verifier is then logged as reward/gold_mean")
    train: bool = opt(False, "train a reward model after SFT (trunk copied from the SFT policy) and use it as the "
                             "RL reward (RLHF)")
    pairs: int = opt(2000, "preference pairs built from the task's training problems (right answer vs a slip)",
                     at_least(1))
    eval_pairs: int = opt(500, "held-out pairs built from the task's held-out problems", at_least(1))
    label_noise: float = opt(0.0, "fraction of training pairs whose preference is flipped (noisy labellers)",
                             between(0, 0.5, "0: clean labels"))
    epochs: int = opt(2, "passes over the training pairs", at_least(1))
    batch_size: int = opt(64, "pairs per step", at_least(1))
    lr: float = opt(1e-4, "AdamW learning rate of the reward model", LEARNING_RATE)

    def check(self, prefix: str) -> None:
        if self.train and self.path:
            raise ConfigError(f"set either {prefix}path (use a trained reward model) or {prefix}train, not both")
