"""log.*: where metrics and sampled completions go besides metrics.jsonl (rlpost/sinks.py)."""

from __future__ import annotations

from dataclasses import dataclass

from rlpost.schema import Section, at_least, opt


@dataclass
class LogConfig(Section):
    tensorboard: bool = opt(False, "also write every metric to TensorBoard event files (run directory's tensorboard/)")
    wandb: bool = opt(False, "also log every metric to Weights & Biases (offline mode when no API key is configured)")
    wandb_project: str = opt("rlpost", "the W&B project")
    rollouts_every: int = opt(0, "keep sampled completions (prompt, completion, reward, log-prob statistics) every "
                                 "this many RL steps in the run directory's rollouts.jsonl (0: never)",
                              at_least(0, "0: never"))
