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
row)` and ends the episode. At run time the verifier role (rlpost.env.reward.Reward) is that environment
stepped for a whole batch at once, without an Env object per sample.

`Verifier` is what a verifier `fn(completion, row) -> float` offers the reward role beyond the call (its
range, a weighted sum's parts, batched scoring, counters, answer extraction, close), each with a default;
the shipped verifiers subclass it and `as_verifier` wraps a user's function or object in one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

VerifierFn = Callable[[str, dict], float]
PRINTABLE = "".join(map(chr, range(32, 127))) + "\n"  # an env's alphabet when it declares none


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


class Verifier:
    """A verifier `(completion, row) -> float` and the hooks the reward role calls, with their defaults.
    Subclasses implement `__call__` and override what they have."""

    reward_range: tuple[float, float] | None = None
    """(lowest, highest) the verifier returns; None: not declared (a failure then scores the batch's lowest)"""
    call_limit_s: float | None = None
    """the longest one call may legitimately take (an HTTP judge's retries); None: not declared"""
    batched: bool = False
    """True: the role scores the whole batch in one `score_batch` call (a local judge: one generation)"""

    def __call__(self, completion: str, row: dict) -> float:
        raise NotImplementedError

    def scored(self, completion: str, row: dict) -> tuple[float, dict[str, float]]:
        """The reward and its named parts, logged as reward/<name> (a weighted sum's terms, unweighted);
        one verifier has none."""
        return self(completion, row), {}

    def score_batch(self, completions: list[str], rows: list[dict]) -> list[float]:
        """Every sample's reward in one call (used when `batched`)."""
        return [self(c, r) for c, r in zip(completions, rows)]

    def metrics(self) -> dict[str, float]:
        """Counters to log (a judge's calls and failures); keys without a '/' are logged as reward/<key>."""
        return {}

    def final_answer(self, completion: str) -> Any:
        """The answer maj@k votes on: by default the completion's first line (None when it is empty)."""
        line = completion.strip().split("\n")[0].strip()
        return line or None

    def final_answer_of(self, completion: str, row: dict) -> Any:
        """The answer maj@k votes on for a sample of `row`: `final_answer`, unless the row picks the verifier
        (task.sources: its source's)."""
        return self.final_answer(completion)

    def close(self) -> None:
        """Free what the verifier holds (worker processes, a judge's engine); called once, at the end of a run."""


class FunctionVerifier(Verifier):
    """A user's verifier, a function or any callable object, as a `Verifier`. The hooks it declares under the
    same names (`fn.reward_range = (-1, 0)`, a class with `metrics()` or `close()`) are read here, once."""

    def __init__(self, fn: VerifierFn):
        if not callable(fn):
            raise ValueError(f"a reward must be callable (completion, row) -> float, got {fn!r}")
        self.fn = fn
        self.__qualname__ = getattr(fn, "__qualname__", repr(fn))
        for hook in ("reward_range", "call_limit_s"):
            if getattr(fn, hook, None) is not None:
                setattr(self, hook, getattr(fn, hook))
        self.batched = getattr(fn, "batched", False) is True and callable(getattr(fn, "score_batch", None))
        own = {name: getattr(fn, name) for name in ("score_batch", "metrics", "final_answer", "close")
               if callable(getattr(fn, name, None))}
        self.__dict__.update(own)  # the instance's own methods shadow the defaults
        components = getattr(fn, "components", None)
        if callable(components) and callable(getattr(fn, "combine", None)):
            self.scored = lambda completion, row: self._parts(components(completion, row))

    def _parts(self, value: Any) -> tuple[float, dict[str, float]]:
        if not isinstance(value, dict):  # what components returned is the reward itself
            return value, {}
        return self.fn.combine(value), value

    def __call__(self, completion: str, row: dict) -> float:
        return self.fn(completion, row)


def as_verifier(fn: VerifierFn | Verifier) -> Verifier:
    """`fn` as a `Verifier`: itself when it is one, else wrapped (`FunctionVerifier`)."""
    return fn if isinstance(fn, Verifier) else FunctionVerifier(fn)


def reward_value(value: Any) -> float:
    """A reward a user's function or environment returned, as a float: a number (an int, a bool, a NumPy or
    one-element torch scalar); TypeError for anything else, a string included ("1" is a label the function
    meant to compute, not a score to take on trust: float() would parse it and "nan", "inf" alike), ValueError
    for NaN or ±inf."""
    if value is None or isinstance(value, (str, bytes, bytearray)):
        raise TypeError(f"returned {type(value).__name__} {value!r}, not a number")
    r = float(value)
    if not math.isfinite(r):
        raise ValueError(f"returned a non-finite reward {r}")
    return r
