"""The `code` reward (rlpost/env/code.py): programs run for real in the sandbox against stdin/stdout cases
and assert-style tests; scores are hand-counted passed cases."""

import pytest

from rlpost.env.code import CodeReward, extract_program, normalize_output
from rlpost.rewards import get_reward

DOUBLE_TESTS = [{"input": "3\n", "output": "6\n"}, {"input": "10", "output": "20"}, {"input": "-4\n", "output": "-8"}]
ADD_TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0\n"


def fenced(code: str, tag: str = "python") -> str:
    return f"Here is my solution.\n```{tag}\n{code}\n```\nDone."


@pytest.fixture(scope="module")
def score():
    return get_reward("code", timeout_s=2)


def test_correct_program_scores_one(score):
    # trailing spaces on a line and surrounding blank lines are not the program's fault
    program = "n = int(input())\nprint(f'{2 * n}   ')\nprint()"
    assert score(fenced(program), {"tests": DOUBLE_TESTS}) == 1.0


def test_wrong_program_scores_zero(score):
    assert score(fenced("print(int(input()) + 2)"), {"tests": DOUBLE_TESTS}) == 0.0


def test_partial_fraction_and_all_mode(score):
    # right for 3 and 10, wrong for -4 (abs): 2 of 3 cases
    program = "print(2 * abs(int(input())))"
    assert score(fenced(program), {"tests": DOUBLE_TESTS}) == pytest.approx(2 / 3)
    assert CodeReward(timeout_s=2, mode="all")(fenced(program), {"tests": DOUBLE_TESTS}) == 0.0
    assert CodeReward(timeout_s=2, mode="all")(fenced("print(2 * int(input()))"), {"tests": DOUBLE_TESTS}) == 1.0


def test_a_case_that_crashes_after_the_right_output_fails(score):
    program = "print(2 * int(input()))\nraise SystemExit(1)"
    assert score(fenced(program), {"tests": DOUBLE_TESTS}) == 0.0


@pytest.mark.parametrize("program", [
    "while True:\n    pass",                                     # never answers
    "import os\nwhile True:\n    os.fork()",                    # fork bomb
    "import os\nprint(open('/proc/1/environ').read())",          # pokes at the host
    "import os\nfor d, _, fs in os.walk('/'):\n    [print(f) for f in fs if 'test' in f]",  # looks for the tests
])
def test_hostile_program_scores_zero(program):
    assert CodeReward(timeout_s=1)(fenced(program), {"tests": [{"input": "3", "output": "6"}]}) == 0.0


def test_extraction():
    two = "```python\nprint(1)\n```\ntext\n```python\nprint(2)\n```\n"
    assert extract_program(two) == "print(2)\n"  # the last python block
    assert extract_program("```py\nx = 1\n```") == "x = 1\n"
    assert extract_program("```python3 title\nx = 1\n```") == "x = 1\n"
    mixed = "```python\nprint(1)\n```\n```text\nsample output\n```"
    assert extract_program(mixed) == "print(1)\n"  # a python block wins over a later non-python one
    assert extract_program("```\nprint(3)\n```") == "print(3)\n"  # else the last bare block
    assert extract_program("print(4)") == "print(4)"  # auto: no block, the whole text
    assert extract_program("print(4)", "fenced") is None
    assert extract_program(two, "whole") == two
    with pytest.raises(ValueError, match="extract"):
        CodeReward(extract="first")
    with pytest.raises(ValueError, match="mode"):
        CodeReward(mode="mean")


def test_extract_modes_score(score):
    row = {"tests": [{"input": "5", "output": "10"}]}
    assert score("print(2 * int(input()))", row) == 1.0  # auto: unfenced text is the program
    assert CodeReward(timeout_s=2, extract="fenced")("print(2 * int(input()))", row) == 0.0
    assert score(fenced("print(2 * int(input()))", tag="py"), row) == 1.0


def test_normalize_output():
    assert normalize_output("\n 1 2  \r\n3\t\n\n") == "1 2\n3"
    assert normalize_output("a\n b") == "a\n b"  # leading spaces of a line count


def test_assert_style_tests(score):
    assert score(fenced("def add(a, b):\n    return a + b"), {"tests": ADD_TESTS}) == 1.0
    assert score(fenced("def add(a, b):\n    return a - b"), {"tests": ADD_TESTS}) == 0.0
    assert score(fenced("def add(a, b):\n    return a +"), {"tests": ADD_TESTS}) == 0.0  # syntax error
    # the program's own prints and stdin reads do not disturb the verdict; stdin holds nothing for it
    noisy = "import sys\nassert sys.stdin.read() == ''\nprint('hi')\ndef add(a, b):\n    return a + b"
    assert score(fenced(noisy), {"tests": ADD_TESTS}) == 1.0


@pytest.mark.parametrize("escape", [
    "import sys; sys.exit(0)",
    "import os; os._exit(0)",
    "raise SystemExit",
    "import os, sys; sys.stdout.flush(); os.close(1)",
    "import __main__; print(getattr(__main__, '_nonce', 'no nonce'))",
])
def test_ending_early_does_not_skip_the_asserts(score, escape):
    """A program that exits 0 before the appended asserts run (they would fail) scores 0."""
    program = f"def add(a, b):\n    return 7\n{escape}"
    assert score(fenced(program), {"tests": ADD_TESTS}) == 0.0


@pytest.mark.parametrize("row, words", [
    ({"prompt": "p"}, "no 'tests'"),
    ({"tests": 3}, "int"),
    ({"tests": []}, "non-empty list"),
    ({"tests": "  "}, "empty string"),
    ({"tests": [{"input": "1", "output": "2"}, {"input": "1"}]}, r"tests'\]\[1\]"),
    ({"tests": [{"input": 1, "output": "2"}]}, r"tests'\]\[0\]"),
])
def test_malformed_rows_are_named(score, row, words):
    with pytest.raises(ValueError, match=words):
        score(fenced("print(1)"), row)


def test_registered_as_code():
    fn = get_reward("code", timeout_s=2, memory_mb=256, mode="all", extract="fenced")
    assert isinstance(fn, CodeReward)
    assert (fn.timeout_s, fn.memory_mb, fn.mode, fn.extract) == (2, 256, "all", "fenced")
    with pytest.raises(ValueError, match="bad options"):
        get_reward("code", timeout=2)
