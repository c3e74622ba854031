"""The `format` reward: 1.0 when the whole completion has the shape a regular expression describes, else 0.0.
It checks the form, never the answer: DeepSeek-R1-Zero's format reward, beside an accuracy reward.

    from rlpost.rewards import get_reward
    fmt = get_reward("format")                          # reasoning, then "#### <number>" at the end
    fmt("57+32=089;089+18=107;#### 107", {})            # 1.0
    fmt("#### 107", {})                                 # 0.0: no reasoning before the answer
    fmt("57+32=089;089+18=107;107", {})                 # 0.0: no "####"
    get_reward("format", pattern=r"<think>.+</think>\\s*<answer>.+</answer>")   # R1-Zero's tags

The pattern must match the whole completion (re.fullmatch, surrounding whitespace stripped first);
`.` also matches newlines (re.DOTALL).
"""

from __future__ import annotations

import re

REASONING_THEN_ANSWER = r".*\S.*#### ?-?\d+(?:\.\d+)?"  # some reasoning, then "#### <number>" and nothing after


class FormatReward:
    def __init__(self, pattern: str = REASONING_THEN_ANSWER):
        try:
            self.regex = re.compile(pattern, re.DOTALL)
        except re.error as e:
            raise ValueError(f"format reward: pattern {pattern!r} is not a regular expression: {e}") from None

    def __call__(self, completion: str, row: dict) -> float:
        return 1.0 if self.regex.fullmatch(completion.strip()) else 0.0
