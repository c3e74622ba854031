"""Tool-use environments: the model calls a tool, the environment runs it and answers, the last turn is scored.

    task: {env: calculator, max_turns: 3, reward: exact}

A turn that holds a call (`call_open` expression `call_close`) gets the tool's answer appended as an
observation, `result_open` value `result_close`, and the episode goes on; a turn without a call (or
past `max_calls`) is the final answer, scored by `reward(turn, row)` (task.reward: the final turn
alone is the completion it reads). The syntax is configurable (env_options), so a tiny character
model can use short markers: `{call_open: "?", call_close: "", result_open: "=", result_close: ";"}`
reads a whole turn "?123*456" as a call and answers "=56088;".

- CalculatorEnv evaluates arithmetic with a whitelist over Python's syntax tree (numbers, + - * / // %
  **, parentheses; no names, no calls), with bounds on exponents and result size: nothing runs.
- PythonToolEnv runs the call's code in the sandbox (rlpost.sandbox.run) and answers its stdout (or
  the reason it failed), cut to `max_result_chars`.

A tool's answer keeps to the env's `alphabet` (PRINTABLE when it declares none), whatever the call makes it
print: another character is written as its Python escape ("\\t", "\\xe9"), or, where the alphabet cannot
spell that either, the answer is `error_text`.
"""

from __future__ import annotations

import ast
import operator
import re
from fractions import Fraction
from typing import Callable

from rlpost import sandbox
from rlpost.env.base import PRINTABLE, Env, Step
from rlpost.tasks import answer_match_reward

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
MAX_DIGITS = 60  # results longer than this are refused (a policy must not make the environment compute 9**9**9)


class CalculatorError(ValueError):
    """An expression the calculator refuses (not arithmetic, too large, division by zero)."""


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression exactly (fractions) and format the result: an integer when whole,
    else a decimal with up to 10 digits. Raises CalculatorError on anything that is not plain arithmetic."""
    expression = re.sub(r"(?<![\d._])0+(?=\d)", "", expression.strip())  # "045" is 45 (Python rejects it)
    try:
        tree = ast.parse(expression, mode="eval")
    except (SyntaxError, ValueError):  # ValueError: a null character
        raise CalculatorError(f"not an expression: {expression[:80]!r}") from None
    except (RecursionError, MemoryError):  # "1+1+...+1" or "---...-1", nested past the parser's depth
        raise CalculatorError("expression nested too deep") from None

    def bounded(value: Fraction) -> Fraction:
        # compared, not written out: str() of an int past 4300 digits raises ValueError ("9"*4000 + "**64")
        if abs(value.numerator) >= 10 ** MAX_DIGITS or value.denominator >= 10 ** MAX_DIGITS:
            raise CalculatorError("result too large")
        return value

    def ev(node) -> Fraction:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        number = isinstance(node, ast.Constant) and type(node.value) in (int, float)  # bool is not a number here
        if number:
            if node.value != node.value or node.value in (float("inf"), float("-inf")):  # "1e999"
                raise CalculatorError(f"not a finite number: {node.value}")
            return bounded(Fraction(node.value))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow):
                if b.denominator != 1 or abs(b) > 64:
                    raise CalculatorError("exponents must be whole numbers of at most 64")
            if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and b == 0 or isinstance(node.op, ast.Pow) \
                    and a == 0 and b < 0:  # 0 ** -1 is a division by zero too
                raise CalculatorError("division by zero")
            return bounded(Fraction(_BINARY[type(node.op)](a, b)))
        raise CalculatorError(f"only numbers and + - * / // % ** are allowed, got {type(node).__name__}")

    try:
        value = ev(tree)
    except RecursionError:  # deeper than this interpreter's stack, though the parser took it
        raise CalculatorError("expression nested too deep") from None
    if value.denominator == 1:
        return str(value.numerator)
    return f"{float(value):.10g}"


class ToolEnv(Env):
    """Shared loop of the tool environments; subclasses implement `run_tool(call) -> str`."""

    def __init__(self, reward: Callable[[str, dict], float] | None = None, *, call_open: str = "<calc>",
                 call_close: str = "</calc>", result_open: str = "<result>", result_close: str = "</result>",
                 max_calls: int = 4, max_result_chars: int = 200, error_text: str = "error",
                 alphabet: str | None = None):
        if reward is None:
            reward = answer_match_reward
        if not call_open:
            raise ValueError("call_open must be a non-empty marker")
        for name, value, least in (("max_calls", max_calls, 0), ("max_result_chars", max_result_chars, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:  # -1 would cut a character
                raise ValueError(f"{name} must be a whole number >= {least}, got {value!r}")
        self.reward, self.max_calls, self.max_result_chars = reward, max_calls, max_result_chars
        self.call_open, self.call_close = call_open, call_close
        self.result_open, self.result_close = result_open, result_close
        self.error_text, self.calls = error_text, 0
        self.observation_tokens = len(result_open) + self.max_result_chars + len(result_close)
        self.alphabet = alphabet  # the characters an answer may hold (rlpost.env.base.Env.alphabet); None: any

    def reset(self, row: dict) -> str | list[dict]:
        self.row, self.calls = row, 0
        return row["messages"] if "messages" in row and "prompt" not in row else row["prompt"]

    def find_call(self, turn: str) -> str | None:
        """The text of the turn's last call, or None when the turn makes none."""
        start = turn.rfind(self.call_open)
        if start < 0:
            return None
        body = turn[start + len(self.call_open):]
        if self.call_close:
            end = body.find(self.call_close)
            if end < 0:
                return None
            body = body[:end]
        return body

    def run_tool(self, call: str) -> str:
        raise NotImplementedError

    def step(self, turn: str) -> Step:
        call = self.find_call(turn)
        if call is None or self.calls >= self.max_calls:
            return Step(reward=float(self.reward(turn, self.row)), done=True, info={"calls": self.calls})
        self.calls += 1
        result = self.spelled(self.run_tool(call))[: self.max_result_chars]
        return Step(observation=f"{self.result_open}{result}{self.result_close}", info={"calls": self.calls})

    def spelled(self, result: str) -> str:
        """`result` in the characters this env may answer with (`alphabet`, else PRINTABLE): any other one written
        as its Python escape ("\\t", "\\xe9", "\\u4e2d") where the alphabet spells that, else the whole result
        is `error_text`. The policy's call decides what a tool prints, and an observation the tokenizer cannot
        encode (gpt_mini's characters) would stop the run."""
        allowed = set(PRINTABLE if self.alphabet is None else self.alphabet)
        if allowed.issuperset(result):
            return result
        out = []
        for char in result:
            if char not in allowed:
                char = char.encode("unicode_escape").decode("ascii")
                if not allowed.issuperset(char):
                    return self.error_text
            out.append(char)
        return "".join(out)


class CalculatorEnv(ToolEnv):
    """Arithmetic by `calculate` (exact, nothing executed); a refused expression answers `error_text`."""

    def __init__(self, reward=None, **kwargs):
        super().__init__(reward, **kwargs)
        # a result is at most MAX_DIGITS digits and a sign (a fraction's 10 significant digits are shorter)
        longest = min(self.max_result_chars, max(MAX_DIGITS + 1, len(self.error_text)))
        self.observation_tokens = len(self.result_open) + longest + len(self.result_close)
        if self.alphabet is None:  # what `calculate` writes: digits, a sign, a decimal point, an exponent ("1.5e+61")
            self.alphabet = "".join(dict.fromkeys("0123456789-.e+" + self.result_open + self.result_close
                                                  + self.error_text))

    def run_tool(self, call: str) -> str:
        try:
            return calculate(call)
        except CalculatorError:
            return self.error_text


class PythonToolEnv(ToolEnv):
    """The call's code runs in the sandbox; the answer is its stdout, or 'error: <reason>'."""

    def __init__(self, reward=None, *, call_open: str = "<python>", call_close: str = "</python>",
                 result_open: str = "<output>", result_close: str = "</output>", timeout_s: float = 5.0,
                 memory_mb: int = 256, **kwargs):
        super().__init__(reward, call_open=call_open, call_close=call_close, result_open=result_open,
                         result_close=result_close, **kwargs)
        self.timeout_s, self.memory_mb = timeout_s, memory_mb

    def run_tool(self, call: str) -> str:
        result = sandbox.run(call, timeout_s=self.timeout_s, memory_mb=self.memory_mb)
        return result.stdout.strip() if result.ok else f"error: {result.reason}"
