"""critic.*: PPO's value function (rlpost/critic.py)."""

from __future__ import annotations

from dataclasses import dataclass

from rlpost.schema import LEARNING_RATE, Section, opt

CRITIC_TYPES = ("separate", "head")  # the valid critic.type names


@dataclass
class CriticConfig(Section):
    type: str = opt("separate", "PPO's critic: 'separate' (a copy of the policy + value head) | 'head' (shared trunk)",
                    choices=CRITIC_TYPES)
    lr: float | None = opt(None, "critic learning rate (None: trainer.lr)", LEARNING_RATE)
