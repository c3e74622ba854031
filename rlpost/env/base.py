"""ENV: what answers the policy. `reset(row)` gives the first prompt; `step(turn)` answers one assistant turn.

    class MyEnv(Env):
        def reset(self, row):              # -> str, or chat messages [{"role": ..., "content": ...}]
            self.row = row
            return row["prompt"]
        def step(self, turn: str) -> Step: # the assistant's turn, decoded
            return Step(observation="...", reward=0.0, done=False)

One instance serves one episode: the episode function builds a fresh one per sample (`cls(**options)`)
and calls `reset` once, then `step` after every assistant turn until `done`, `task.max_turns` or the
token budget. An observation is appended after the turn: a string is tokenised bare (it must carry
its own separators; for gpt_mini, its characters must be in `alphabet`), a list of chat messages
through the tokenizer's chat template (only the glue between the turns, so earlier turns are never
re-tokenised). Tokens the environment adds get response_mask = 0: the policy is never trained on them.
`observation_tokens` sizes the default token budget (task.max_episode_tokens).

A reward returned by a step is that turn's; the episode's reward is their sum. With
`per_turn_rewards = True` each turn's reward stays on that turn's last token (batch.rewards [B, T]),
for credit assignment across turns by the token-level estimators (PPO's GAE).

The single-turn verifier is the one-turn case: `VerifierEnv(fn)` scores the turn with `fn(completion,
row)` and ends the episode.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Step:
    """What the environment says after an assistant turn."""

    observation: str | list[dict] | None = None
    """text (appended bare) or chat messages (through the chat template) to append; None: nothing"""
    reward: float = 0.0
    """this turn's reward"""
    done: bool = False
    """the episode ends after this turn"""
    info: dict[str, Any] = field(default_factory=dict)
    """anything to keep with the episode (batch.meta["env_info"], the last step's)"""


class Env:
    """Base class of environments (see the module docstring). Subclasses implement `reset` and `step`."""

    per_turn_rewards: bool = False
    observation_tokens: int | None = None
    """tokens one observation takes at most (an allowance; characters bound it for gpt_mini, and for a
    byte-level tokenizer on ASCII text): the default task.max_episode_tokens leaves this much room after
    every turn but the last. None: rollout.max_new_tokens. Set it on the class or, when it depends on
    the constructor's options, on the instance."""
    alphabet: str | None = None
    """every character a text observation may contain. A fresh gpt_mini (a character vocabulary) adds
    them to its vocabulary, and a saved one must have them, checked before training starts. None:
    printable ASCII and newline (rlpost.env.PRINTABLE). Class or instance, as observation_tokens."""

    def reset(self, row: dict) -> str | list[dict]:
        raise NotImplementedError

    def step(self, turn: str) -> Step:
        raise NotImplementedError

    def close(self) -> None:
        """Free what the episode holds (called once the episode ends, also after an error)."""


class VerifierEnv(Env):
    """One turn, scored by a verifier `fn(completion, row) -> float`: the single-turn case as an environment."""

    def __init__(self, fn: Callable[[str, dict], float]):
        self.fn = fn

    def reset(self, row: dict) -> str | list[dict]:
        self.row = row
        return row["messages"] if "messages" in row and "prompt" not in row else row["prompt"]

    def step(self, turn: str) -> Step:
        return Step(reward=float(self.fn(turn, self.row)), done=True)
