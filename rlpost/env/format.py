"""The `format` reward: 1.0 when the whole completion has the shape a regular expression describes, else 0.0.
It checks the form, never the answer: DeepSeek-R1-Zero's format reward, beside an accuracy reward.

    from rlpost.env.verifiers import get_reward
    fmt = get_reward("format")                          # reasoning, then "#### <number>" at the end
    fmt("57+32=089;089+18=107;#### 107", {})            # 1.0
    fmt("#### 107", {})                                 # 0.0: no reasoning before the answer
    fmt("57+32=089;089+18=107;107", {})                 # 0.0: no "####"
    get_reward("format", pattern=r"<think>.+</think>\\s*<answer>.+</answer>")   # R1-Zero's tags

The pattern must match the whole completion (fullmatch, surrounding whitespace stripped first); `.` also
matches newlines (DOTALL).

A pattern can backtrack for a time that grows with the power of the completion's length (".*\\S.*####" on
"#### 1." repeated), and Python's `re` holds the GIL while it does, so task.reward_timeout_s could not cut
it short: the whole process would stall. So the default shape is checked in linear time without a regular
expression, and a user's pattern runs in the `regex` module (the `re` syntax) with a time limit per call
(`timeout_s`, default 1 s) and the GIL released: a completion it cannot decide in time scores 0.0 and is
counted in `format/timeouts`.
"""

from __future__ import annotations

import re
import threading

import regex

from rlpost.env.base import Verifier

REASONING_THEN_ANSWER = r".*\S.*#### ?-?\d+(?:\.\d+)?"  # some reasoning, then "#### <number>" and nothing after
_FINAL_ANSWER = re.compile(r"#### ?-?\d+(?:\.\d+)?\Z")   # linear: one "####" run can start a match


def reasoning_then_answer(completion: str) -> bool:
    """re.fullmatch(REASONING_THEN_ANSWER, completion, re.DOTALL) in linear time: the text ends with "#### <n>"
    and has a non-space character before it. At most one "####" can start a match reaching the end (the match
    holds no other "####"), so the leftmost match found by search is the only one."""
    m = _FINAL_ANSWER.search(completion)
    return m is not None and bool(completion[:m.start()].strip())


class FormatReward(Verifier):
    reward_range = (0.0, 1.0)

    def __init__(self, pattern: str = REASONING_THEN_ANSWER, timeout_s: float = 1.0):
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < float("inf"):
            raise ValueError(f"format reward: timeout_s must be a number of seconds > 0, got {timeout_s!r}")
        try:
            self.regex = regex.compile(pattern, regex.DOTALL)
        except (regex.error, TypeError) as e:
            raise ValueError(f"format reward: pattern {pattern!r} is not a regular expression: {e}") from None
        self.pattern, self.timeout_s = pattern, float(timeout_s)
        self.timeouts = 0
        self._lock = threading.Lock()

    def __call__(self, completion: str, row: dict) -> float:
        text = completion.strip()
        if self.pattern == REASONING_THEN_ANSWER:
            return 1.0 if reasoning_then_answer(text) else 0.0
        try:
            return 1.0 if self.regex.fullmatch(text, timeout=self.timeout_s, concurrent=True) else 0.0
        except TimeoutError:
            with self._lock:
                self.timeouts += 1
            return 0.0

    def metrics(self) -> dict[str, float]:
        """Calls whose pattern could not decide within timeout_s (scored 0.0)."""
        return {"format/timeouts": float(self.timeouts)}
