"""eval.*: the held-out evaluation (rlpost/stages/evaluate.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rlpost.schema import FINITE, ConfigError, Section, at_least, opt


@dataclass
class EvalConfig(Section):
    samples_per_prompt: int = opt(4, "samples per held-out prompt for pass@1", at_least(1))
    temperature: float = opt(1.0, "sampling temperature of the pass@1 estimate", at_least(0, "0: greedy"))
    batch_prompts: int = opt(256, "held-out prompts per generation call", at_least(1))
    reward: str | None = opt(None, "score pass@1 with this reward instead of the run's (e.g. exact while RL is "
                                   "rewarded by a judge): a shipped name or 'module:function'")
    reward_options: dict[str, Any] = opt({}, "keyword options of eval.reward")
    success_threshold: float = opt(1.0, "a sample passes (pass@k) when its reward is >= this, or when its "
                                        "environment's last step says info['success']; the mean reward is logged "
                                        "beside pass@1", FINITE)

    def check(self, prefix: str) -> None:
        if self.reward_options and not self.reward:
            raise ConfigError(f"{prefix}reward_options are the options of {prefix}reward, which is not set")
