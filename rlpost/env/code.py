"""The `code` reward: run the completion's program against row["tests"] in the sandbox (rlpost.sandbox).

    from rlpost.rewards import get_reward
    score = get_reward("code", timeout_s=2)
    score("```python\\nprint(int(input()) * 2)\\n```", {"tests": [{"input": "3", "output": "6"}]})   # 1.0

row["tests"] is either
- a list of stdin/stdout cases [{"input": str, "output": str}, ...]: one sandboxed run per case; a case
  passes when the program exits 0 and its stdout equals "output" up to surrounding whitespace and
  trailing spaces on each line; or
- a string of Python (asserts) run after the program in the same namespace, as one case: it passes when
  the program and the asserts run to the end. The harness reads a random nonce from stdin before the
  program runs and prints it after the last assert; the case passes only if the last line of stdout is
  that nonce, so a program that ends the process early (sys.exit(0), os._exit(0)) before the asserts ran
  does not pass.

The reward is the fraction of cases passed (mode="fraction") or 1.0 only if all pass (mode="all").
extract: "auto" (the last ```python block, else the last ``` block, else the whole text), "fenced" (the
last fenced block; none scores 0), "whole" (the whole completion is the program).
"""

from __future__ import annotations

import json
import re
import secrets

from rlpost import sandbox

_FENCE = re.compile(r"```([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)
_PYTHON_TAGS = ("python", "py", "python3")

# Runs as main.py; its input is one JSON line {"nonce", "program", "tests"}, so neither the tests nor the
# nonce is in a file, on the command line or in a module global the program could read.
_HARNESS = """\
import json, os, sys
def _main():
    job = json.loads(sys.stdin.readline())
    nonce = job.pop("nonce")
    ns = {"__name__": "__main__", "__builtins__": __builtins__}
    exec(compile(job.pop("program"), "solution.py", "exec"), ns)
    exec(compile(job.pop("tests"), "tests.py", "exec"), ns)
    sys.stdout.flush()
    os.write(1, ("\\n" + nonce + "\\n").encode())
_main()
"""


def extract_program(completion: str, extract: str = "auto") -> str | None:
    """The program in `completion` (see the module docstring for `extract`); None if there is none."""
    if extract == "whole":
        return completion
    blocks = _FENCE.findall(completion)
    python = [body for tag, body in blocks if tag.lower() in _PYTHON_TAGS]
    if python or blocks:
        return (python or [body for _, body in blocks])[-1]
    return completion if extract == "auto" else None


def normalize_output(text: str) -> str:
    """Surrounding whitespace and each line's trailing whitespace dropped; \\r\\n as \\n."""
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


class CodeReward:
    """`(completion, row) -> float`: the completion's program against row["tests"], in the sandbox."""

    def __init__(self, *, timeout_s: float = 5.0, memory_mb: int = 512, mode: str = "fraction",
                 extract: str = "auto"):
        if mode not in ("fraction", "all"):
            raise ValueError(f"code reward: mode must be 'fraction' or 'all', got {mode!r}")
        if extract not in ("auto", "fenced", "whole"):
            raise ValueError(f"code reward: extract must be 'auto', 'fenced' or 'whole', got {extract!r}")
        self.timeout_s, self.memory_mb, self.mode, self.extract = timeout_s, memory_mb, mode, extract

    def _run(self, code: str, stdin: str) -> sandbox.SandboxResult:
        result = sandbox.run(code, stdin=stdin, timeout_s=self.timeout_s, memory_mb=self.memory_mb)
        if result.reason == "sandbox_error":  # the host's fault, not the program's: say so, do not score 0
            raise RuntimeError(f"code reward: the sandbox failed: {result.stderr[-2000:]}")
        return result

    def __call__(self, completion: str, row: dict) -> float:
        tests = _check_tests(row)
        program = extract_program(completion, self.extract)
        if program is None:
            return 0.0
        if isinstance(tests, str):
            nonce = secrets.token_hex(16)
            job = json.dumps({"nonce": nonce, "program": program, "tests": tests}) + "\n"
            result = self._run(_HARNESS, job)
            lines = result.stdout.rstrip("\n").rsplit("\n", 1)
            return float(result.ok and lines[-1] == nonce)
        passed = 0
        for case in tests:
            result = self._run(program, case["input"])
            ok = result.ok and normalize_output(result.stdout) == normalize_output(case["output"])
            passed += ok
            if not ok and self.mode == "all":
                return 0.0
        return passed / len(tests) if self.mode == "fraction" else 1.0


def _check_tests(row: dict):
    if not isinstance(row, dict) or "tests" not in row:
        keys = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise ValueError(f"code reward: the row has no 'tests' (keys: {keys}); give a list of "
                         "{'input', 'output'} cases or a string of assert code")
    tests = row["tests"]
    if isinstance(tests, str):
        if not tests.strip():
            raise ValueError("code reward: row['tests'] is an empty string of assert code")
        return tests
    if not isinstance(tests, list) or not tests:
        raise ValueError(f"code reward: row['tests'] must be a non-empty list of {{'input', 'output'}} cases or a "
                         f"string of assert code, got {type(tests).__name__} {str(tests)[:80]!r}")
    for i, case in enumerate(tests):
        if not (isinstance(case, dict) and isinstance(case.get("input"), str) and isinstance(case.get("output"), str)):
            raise ValueError(f"code reward: row['tests'][{i}] must be {{'input': str, 'output': str}}, "
                             f"got {str(case)[:80]!r}")
    return tests
