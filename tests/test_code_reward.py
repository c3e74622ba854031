"""The `code` reward (rlpost/env/code.py): programs run for real in the sandbox against stdin/stdout cases
and assert-style tests; scores are hand-counted passed cases."""

import pytest

from rlpost.env.code import CodeReward, extract_program, normalize_output
from rlpost.env.verifiers import get_reward

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


def test_extraction_is_linear_in_the_completion():
    """Many "```" with no newline after them made the fence expression scan to the end from each one: 7 s
    for 120,000 characters, holding the GIL (task.reward_timeout_s could not cut it short). The blocks found
    are the expression's, in one pass."""
    import random
    import re

    fence = re.compile(r"```([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)  # what extraction finds
    rng = random.Random(0)
    pieces = ["`", "```", "\n", "py", "python", " x", "```python\n", "```\n"]
    for _ in range(2000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 20)))
        bodies = fence.findall(text)
        python = [b for tag, b in bodies if tag.lower() in ("python", "py", "python3")]
        assert extract_program(text, "fenced") == ((python or [b for _, b in bodies])[-1] if bodies else None), text
    assert extract_program("```x" * 250_000, "fenced") is None   # the expression: minutes
    assert extract_program("```python\nprint(1)\n```" + "```x" * 250_000) == "print(1)\n"


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
    """A program that ends its process or closes its stdout at its top level, before any assert could
    reach it, scores 0: every case fails."""
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


# ---- assert tests cannot be gamed: the tests and the verdict never enter the program's process ----

# Finds, in the frames above the program, the nonce that an in-process harness would print after the
# last assert (the design these tricks beat): None where there is none.
FIND_NONCE = """\
import os, sys
def find_nonce():
    f = sys._getframe(0)
    while f is not None:
        if isinstance(f.f_locals.get("nonce"), str):
            return f.f_locals["nonce"]
        f = f.f_back
NONCE = find_nonce()
"""
# Each trick still defines add() wrong for both ADD_TESTS asserts and never crashes where it finds nothing
# to exploit, so its 0.0 means the trick failed, not the program.
TRICKS = {
    "__eq__ always true": "class Yes:\n    def __eq__(self, other):\n        return True\n    __hash__ = None\n"
                          "def add(a, b):\n    return Yes()",
    "int subclass whose __eq__ is true": "class Yes(int):\n    def __eq__(self, other):\n        return True\n"
                                         "    __hash__ = int.__hash__\ndef add(a, b):\n    return Yes(7)",
    "rebinds builtins.exec and compile": "import builtins\nbuiltins.exec = lambda *a, **k: None\n"
                                         "builtins.compile = lambda *a, **k: None\ndef add(a, b):\n    return 7",
    "prints the nonce read from frames": FIND_NONCE + "if NONCE:\n    print('\\n' + NONCE, flush=True)\n"
                                         "    os._exit(0)\ndef add(a, b):\n    return 7",
    "answers from the tests read from frames": (
        "import re, sys\nANSWERS = {}\nf = sys._getframe(0)\nwhile f is not None:\n"
        "    for v in list(f.f_locals.values()):\n"
        "        if isinstance(v, dict) and isinstance(v.get('tests'), str):\n"
        "            for args, want in re.findall(r'add\\((.*?)\\) == (.*)', v['tests']):\n"
        "                ANSWERS[args.replace(' ', '')] = int(want)\n"
        "    f = f.f_back\ndef add(a, b):\n    return ANSWERS.get(f'{a},{b}', 7)"),
    "prints the nonce read from /proc/self/mem": (
        "import os, re\ndef scan():\n"
        "    with open('/proc/self/maps') as maps, open('/proc/self/mem', 'rb', 0) as mem:\n"
        "        for line in maps:\n"
        "            span, perms = line.split()[:2]\n"
        "            lo, hi = (int(x, 16) for x in span.split('-'))\n"
        "            if perms[0] != 'r' or hi - lo > 1 << 26:\n"
        "                continue\n"
        "            try:\n"
        "                mem.seek(lo)\n"
        "                found = re.search(rb'.nonce.: .([0-9a-f]{32}).', mem.read(hi - lo))\n"
        "            except (OSError, ValueError, OverflowError):\n"
        "                continue\n"
        "            if found:\n"
        "                return found.group(1).decode()\n"
        "NONCE = scan()\nif NONCE:\n    print('\\n' + NONCE, flush=True)\n    os._exit(0)\n"
        "def add(a, b):\n    return 7"),
    "atexit prints the nonce": FIND_NONCE + "import atexit\ndef last_word():\n    if NONCE:\n"
                               "        os.write(1, ('\\n' + NONCE + '\\n').encode())\n        os._exit(0)\n"
                               "atexit.register(last_word)\ndef add(a, b):\n    return 7",
    "sys.excepthook prints the nonce": FIND_NONCE + "def hook(*exc):\n    if NONCE:\n"
                                       "        os.write(1, ('\\n' + NONCE + '\\n').encode())\n        os._exit(0)\n"
                                       "sys.excepthook = hook\ndef add(a, b):\n    return 7",
    "__del__ prints the nonce": FIND_NONCE + "import builtins\nclass Late:\n    def __del__(self):\n"
                                "        if NONCE:\n            os.write(1, ('\\n' + NONCE + '\\n').encode())\n"
                                "            os._exit(0)\nbuiltins.late = Late()\ndef add(a, b):\n    return 7",
    "a signal handler prints the nonce": FIND_NONCE + "import signal, time\ndef on_alarm(*_):\n    if NONCE:\n"
                                         "        os.write(1, ('\\n' + NONCE + '\\n').encode())\n"
                                         "        os._exit(0)\nsignal.signal(signal.SIGALRM, on_alarm)\n"
                                         "def add(a, b):\n    signal.setitimer(signal.ITIMER_REAL, 0.05)\n"
                                         "    time.sleep(0.3)\n    return 7",
    "forges the checker's messages on every fd": (
        "import json, os\nfor fd in range(3, 64):\n    for msg in ({'stmt': 0, 'ok': True}, {'stmt': 1, 'ok': True},"
        " {'done': True}):\n        data = json.dumps(msg).encode()\n        try:\n"
        "            os.write(fd, len(data).to_bytes(4, 'big') + data)\n        except OSError:\n"
        "            pass\ndef add(a, b):\n    return 7"),
}


@pytest.mark.parametrize("trick", TRICKS, ids=list(TRICKS))
def test_tricks_against_assert_tests_score_zero(score, trick):
    assert score(fenced(TRICKS[trick]), {"tests": ADD_TESTS}) == 0.0


def test_each_assert_is_a_case():
    tests = "assert add(1, 2) == 3\nassert add(2, 2) == 4\nassert add(5, 1) == 6\nassert add(0, 0) == 0\n"
    half = "def add(a, b):\n    return a * 2"  # right for (2, 2) and (0, 0) only
    assert CodeReward(timeout_s=3)(half, {"tests": tests}) == 0.5
    assert CodeReward(timeout_s=3, mode="all")(half, {"tests": tests}) == 0.0
    assert CodeReward(timeout_s=3, mode="all")("def add(a, b):\n    return a + b", {"tests": tests}) == 1.0
    # set-up statements are not cases; one that raises fails every case after it, not those before
    setup = "assert add(2, 2) == 4\nx = add(1, 2) + 'a'\nassert add(0, 0) == 0\n"
    assert CodeReward(timeout_s=3)(half, {"tests": setup}) == 0.5
    # tests without a top-level assert are one case: they pass when they all run
    check = "def check(f):\n    assert f(1, 2) == 3\n    assert f(0, 0) == 0\ncheck(add)\n"
    assert CodeReward(timeout_s=3)(half, {"tests": check}) == 0.0
    assert CodeReward(timeout_s=3)("def add(a, b):\n    return a + b", {"tests": check}) == 1.0


@pytest.mark.parametrize("program, tests, expected", [
    # plain data keeps its type: a tuple is not a list, as in Python
    ("def f(x):\n    return (x, [x], {x: {x}}, b'a', frozenset({x}))",
     "assert f(1) == (1, [1], {1: {1}}, b'a', frozenset({1}))\nassert f(1) != [1, [1], {1: {1}}, b'a', {1}]\n"
     "assert type(f(1)[2]) is dict", 1.0),
    ("def f():\n    return float('inf'), -0.0", "import math\nassert f() == (math.inf, 0.0)", 1.0),
    ("import math\ndef f(n):\n    return -math.factorial(n)", "import math\nassert f(3000) == -math.factorial(3000)",
     1.0),  # past json's 4300 digits
    ("def f():\n    return float('nan')", "assert f() != f()\nassert f() == f()", 0.5),  # NaN is never equal
    ("N = 5\ndef f(x):\n    return x * N", "assert N == 5\nassert f(N) == 25", 1.0),  # values by name
    ("def f(*a, k=0):\n    return sum(a) + k", "assert f(1, 2, k=3) == 6", 1.0),
    # built-in exceptions raised by the program reach the tests as themselves
    ("def f(x):\n    if x < 0:\n        raise ValueError(x)\n    return x",
     "try:\n    f(-1)\n    raised = False\nexcept ValueError:\n    raised = True\nassert raised\n"
     "assert f(2) == 2", 1.0),
    ("def f(x):\n    return x + 1",
     "try:\n    f('a')\n    raised = None\nexcept TypeError:\n    raised = 'TypeError'\n"
     "assert raised == 'TypeError'", 1.0),
    # an iterator's items are taken in the program's process and arrive as an iterator over them
    ("def f(x):\n    return (i for i in range(x)) if x else 0",
     "assert list(f(3)) == [0, 1, 2]\nassert f(0) == 0\nassert next(f(2)) == 0\nassert f(3) != [0, 1, 2]", 1.0),
    ("def f():\n    while True:\n        yield 1", "assert next(f()) == 1", 0.0),  # endless: no answer
    # not plain data, or no answer: that call fails, the others still count
    ("def f(x):\n    return f(x) if x else 1", "assert f(1) == 1\nassert f(0) == 1", 0.5),  # recursion
    ("def f(x):\n    return 'x' * x", "assert len(f(2_000_000)) == 2_000_000\nassert f(2) == 'xx'", 0.5),  # size cap
    ("def f(x):\n    return x\nclass C:\n    pass\ndef g():\n    return C()",
     "assert g() is not None\nassert f(1) == 1", 0.5),
    ("import os\ndef f(x):\n    if x == 2:\n        os._exit(0)\n    return x",  # the program dies: the rest fails
     "assert f(1) == 1\nassert f(2) == 2\nassert f(3) == 3", 1 / 3),
    ("def f(x):\n    return x\ndef g(h):\n    return h(1)", "assert f(1) == 1\nassert g(lambda v: v) == 1", 0.5),
    # a builtin the program redefines is still the tests' own
    ("def len(x):\n    return 3\ndef f():\n    return [1]", "assert len(f()) == 1", 1.0),
    ("import math\ndef f():\n    return 2.0", "assert math.isclose(f(), 2.0)", 1.0),  # its stdlib imports
    ("import sys\nprint('junk ' * 1000)\nsys.stdout.write('\\x00\\x00\\x00\\x05{}')\ndef f():\n    return 1",
     "assert f() == 1", 1.0),
    ("import sys\nsys.stdout.close()\ndef f():\n    return 1", "assert f() == 1", 1.0),  # not the channel
    ("def f():\n    return 1\nwhile True:\n    pass", "assert f() == 1", 0.0),  # its top level never ends
    ("def f():\n    return 1\nraise SystemExit(0)", "assert f() == 1", 0.0),  # it must run to its end
])
def test_assert_results_are_plain_data(program, tests, expected):
    assert CodeReward(timeout_s=3)(program, {"tests": tests}) == pytest.approx(expected)


def test_a_hung_call_fails_the_rest_within_timeout_s():
    import time

    program = "def f(x):\n    while x == 2:\n        pass\n    return x"
    t0 = time.monotonic()
    assert CodeReward(timeout_s=2)(program, {"tests": "assert f(1) == 1\nassert f(2) == 2\nassert f(3) == 3"}) == \
        pytest.approx(1 / 3)
    assert time.monotonic() - t0 < 2 + 10  # the row's one timeout_s, plus generous slack for a loaded machine


def test_tests_that_do_not_parse_are_named(score):
    with pytest.raises(ValueError, match=r"row\['tests'\] is not valid Python \(line 2"):
        score(fenced("def add(a, b):\n    return a + b"), {"tests": "assert add(1, 2) == 3\nassert add(("})
    with pytest.raises(ValueError, match="not valid Python"):
        CodeReward(extract="fenced")("no program here", {"tests": "assert ("})


def test_sandbox_start_talks_to_a_running_program(tmp_path, monkeypatch):
    """sandbox.start(), which the assert mode is built on: live pipes, files, the wall clock, stop, and
    nothing written in the host's temp dir (main.py and files reach the sandbox through its stdin)."""
    import tempfile

    from rlpost import sandbox

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    echo = ("import sys\nprint(open('data/prefix.txt').read(), end='', flush=True)\n"
            "for line in sys.stdin:\n    print(line.upper(), end='', flush=True)\nprint('bye', file=sys.stderr)")
    with sandbox.start(echo, timeout_s=5, files={"data/prefix.txt": "ready\n"}) as proc:
        assert proc.stdout.readline() == b"ready\n"
        assert list(tmp_path.iterdir()) == []
        proc.stdin.write(b"hello\n")
        assert proc.stdout.readline() == b"HELLO\n"  # answered while it still runs
        proc.stdin.write(b"again\n")
        assert proc.stdout.readline() == b"AGAIN\n"
        result = proc.close()  # stdin closed: it ends by itself
    assert (result.ok, result.reason, result.stderr) == (True, "ok", "bye\n")
    assert list(tmp_path.iterdir()) == []
    assert sandbox.start("while True:\n    pass", timeout_s=1).close().reason == "timeout"
    assert sandbox.start("import time\ntime.sleep(30)", timeout_s=20).close(stop=True).reason == "stopped"
    assert sandbox.start("import os\nos.kill(os.getpid(), 9)").close().reason == "killed_by_signal"
    assert sandbox.start("x = bytearray(1 << 30)", memory_mb=256).close().reason == "memory_limit"
    with pytest.raises(ValueError, match=r"sandbox.start: files key '\.\./x'"):
        sandbox.start("pass", files={"../x": ""})


def test_a_program_cannot_end_the_loop_of_the_tests_with_stop_iteration(score):
    program = "def is_prime(n):\n    raise StopIteration"  # all() of an emptied map() would be True
    assert score(fenced(program), {"tests": "assert all(map(is_prime, [2, 3, 5]))"}) == 0.0


@pytest.mark.parametrize("sig", ["SIGALRM", "SIGINT"])
def test_signalling_its_init_changes_nothing(score, monkeypatch, sig):
    """Where the program is root of its own user namespace (a non-root caller), it may send signals to the init
    of its sandbox; init handles none of them, so the run goes on and neither mode raises a sandbox_error
    (SIGALRM and SIGINT once ended init, with a sandbox_error that stopped the caller's run)."""
    from rlpost import sandbox

    monkeypatch.setattr(sandbox, "_uid_mapped", lambda uid: False)  # user-namespace mode even as root
    kill = f"import os, signal, time\nos.kill(1, signal.{sig})\ntime.sleep(0.5)\n"
    assert score(fenced(kill + "def add(a, b):\n    return a + b"), {"tests": ADD_TESTS}) == 1.0
    assert score(fenced(kill + "print(2 * int(input()))"), {"tests": DOUBLE_TESTS}) == 1.0


# ---- tests that check nothing never pay; test runners' conventions run by themselves ----

ADD = "def add(a, b):\n    return a + b"
ZERO = "def add(a, b):\n    return 0"


@pytest.mark.parametrize("tests", [
    "def check(candidate):\n    assert candidate(1, 2) == 3\n",  # HumanEval's check, never called, no entry_point
    "def test_add(fixture):\n    assert add(1, 2) == 3\n",        # a pytest test that needs a fixture: not run
    "def helper():\n    assert add(1, 2) == 3\n",                 # asserts in a function nobody calls
    "assert 1 + 1 == 2\n",                                        # asserts that never look at the program
    "import unittest\nclass T(unittest.TestCase):\n    def test_add(self):\n        self.assertEqual(1 + 2, 3)\n",
])
@pytest.mark.parametrize("program", [ADD, ZERO, "", "this is prose, not Python"])
def test_tests_that_never_use_the_program_raise_naming_the_row(score, tests, program):
    with pytest.raises(ValueError, match=r"row\['tests'\] passed without using anything the program defines"):
        score(fenced(program), {"tests": tests})


@pytest.mark.parametrize("tests", ["x = add(1, 2)\n", "def check(candidate):\n    candidate(1, 2)\ncheck(add)\n"])
def test_tests_without_any_assertion_raise_for_any_completion(tests):
    for completion in (fenced(ADD), "no program at all"):
        with pytest.raises(ValueError, match=r"row\['tests'\] has no assert statement"):
            CodeReward(timeout_s=3, extract="fenced")(completion, {"tests": tests})


@pytest.mark.parametrize("tests, entry_point, right, wrong", [
    # pytest: top-level test* functions without arguments, one case each
    ("def test_add():\n    assert add(1, 2) == 3\ndef test_zero():\n    assert add(0, 0) == 0\n", None, 1.0, 0.5),
    # HumanEval: check(candidate) called with the row's entry point
    ("METADATA = {}\n\ndef check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(2, 2) == 4\n",
     "add", 1.0, 0.0),
    # unittest: each TestCase class is a case, with or without unittest.main()
    ("import unittest\nclass T(unittest.TestCase):\n    def test_add(self):\n        self.assertEqual(add(1, 2), 3)\n"
     "class U(T):\n    def test_zero(self):\n        self.assertEqual(add(0, 0), 0)\n", None, 1.0, 0.0),
    ("import unittest\nclass T(unittest.TestCase):\n    def test_add(self):\n        self.assertEqual(add(1, 2), 3)\n"
     "if __name__ == '__main__':\n    unittest.main()\n", None, 1.0, 0.0),
    # a top-level assert and a test function are two cases; a function the tests call is not run again
    ("assert add(0, 0) == 0\ndef test_add():\n    assert add(1, 2) == 3\n", None, 1.0, 0.5),
    ("def test_add(a=1):\n    assert add(a, 2) == 3\ntest_add()\n", None, 1.0, 0.0),
])
def test_test_runner_conventions(tests, entry_point, right, wrong):
    row = {"tests": tests, "entry_point": entry_point} if entry_point else {"tests": tests}
    assert CodeReward(timeout_s=3)(ADD, row) == right
    assert CodeReward(timeout_s=3)(ZERO, row) == wrong


def test_a_case_that_ran_no_assertion_fails():
    # the program decides how many asserts run: one that makes them all be skipped has checked nothing
    tests = "for x in pos(3):\n    assert x > 0\n"
    assert CodeReward(timeout_s=3)("def pos(n):\n    return list(range(1, n + 1))", {"tests": tests}) == 1.0
    assert CodeReward(timeout_s=3)("def pos(n):\n    return []", {"tests": tests}) == 0.0
    # a test function that asserts nothing is a case that fails; the other one still counts
    tests = "def test_nothing():\n    add(1, 2)\ndef test_add():\n    assert add(1, 2) == 3\n"
    assert CodeReward(timeout_s=3)(ADD, {"tests": tests}) == 0.5


def test_a_checker_that_never_asked_the_program_passes_nothing():
    # it ran out of time before its end, so its refusal of such tests never came: no case of it passes
    hang = "while True:\n    pass\n"
    assert CodeReward(timeout_s=1)(ADD, {"tests": "assert 1 + 1 == 2\n" + hang}) == 0.0
    assert CodeReward(timeout_s=1)(ADD, {"tests": "assert add(1, 2) == 3\n" + hang}) == 1.0  # decided: it counts


def test_an_answer_the_checker_cannot_decode_is_no_exception_of_the_tests():
    # a frame written straight on the program's channel is its answer; one that does not decode (here, a
    # Fraction with denominator 0 would raise ZeroDivisionError) is a failed call, not an exception to expect
    forge = ("import json, os\ndef f():\n    d = json.dumps({'value': %r}).encode()\n    for fd in range(3, 10):\n"
             "        try:\n            os.write(fd, len(d).to_bytes(4, 'big') + d)\n        except OSError:\n"
             "            pass\n    return 0\n")
    for value, error in (({"nonsense": 1}, "ValueError"), ({"fraction": [1, 0]}, "ZeroDivisionError")):
        tests = f"try:\n    f()\n    raised = False\nexcept {error}:\n    raised = True\nassert raised\n"
        assert CodeReward(timeout_s=3)(forge % (value,), {"tests": tests}) == 0.0


def test_a_call_that_gives_no_answer_is_never_the_exception_the_tests_expect():
    """A call that returned junk (not plain data) raised an Exception in the tests, so `except Exception` and
    assertRaises(Exception) took it for the error they expected: returning object() for bad input passed, where
    Python would have returned it. A program's own exception class reaches the tests as its built-in base."""
    caught = ("try:\n    root(-1)\n    raised = False\nexcept Exception:\n    raised = True\nassert raised\n"
              "assert root(4) == 2\n")
    unit = ("import unittest\nclass T(unittest.TestCase):\n    def test_neg(self):\n"
            "        self.assertRaises(%s, root, -1)\n")
    ok = "def root(x):\n    return 0 if x < 0 else int(x ** 0.5)\n"
    junk = "def root(x):\n    if x < 0:\n        return object()\n    return int(x ** 0.5)\n"
    own = "class NegError(ValueError):\n    pass\ndef root(x):\n    if x < 0:\n        raise NegError(x)\n" \
          "    return int(x ** 0.5)\n"
    score = CodeReward(timeout_s=3)
    # the set-up statement holding the try fails, and with it every assert after it (as a crash would)
    assert score(junk, {"tests": caught}) == 0.0 and score(junk, {"tests": unit % "Exception"}) == 0.0
    assert score(own, {"tests": caught}) == 1.0 and score(own, {"tests": unit % "ValueError"}) == 1.0
    assert score(ok, {"tests": unit % "Exception"}) == 0.0   # no exception at all


def test_entry_point_must_be_a_name(score):
    with pytest.raises(ValueError, match=r"row\['entry_point'\] must be the name"):
        score(fenced(ADD), {"tests": "def check(c):\n    assert c(1, 2) == 3\n", "entry_point": "add(1)"})
    # tests that do not use it leave it alone (a LeetCode-style row may have another kind of entry point)
    assert score(fenced(ADD), {"tests": ADD_TESTS, "entry_point": "Solution().add"}) == 1.0


# ---- names follow Python's scopes; values cross as their built-in type ----

@pytest.mark.parametrize("tests", [
    "def check(add):\n    assert add(1, 2) == 3\ncheck(add)\n",           # a parameter named like the function
    "assert add(1, 2) == 3\nxs = [add for add in range(3)]\n",  # a comprehension variable elsewhere
    "assert add(1, 2) == 3\nadd = None\n",                                  # rebound after use
    "from solution import add\nassert add(1, 2) == 3\n",                    # the program as module `solution`
    "import solution\nassert solution.add(1, 2) == 3\n",
    "class T:\n    x = add(1, 2)\nassert T.x == 3\n",
])
def test_names_the_tests_take_from_the_program_follow_scopes(tests):
    assert CodeReward(timeout_s=3)(ADD, {"tests": tests}) == 1.0
    assert CodeReward(timeout_s=3)(ZERO, {"tests": tests}) == 0.0


@pytest.mark.parametrize("program, tests", [
    ("from collections import Counter\ndef f(s):\n    return Counter(s)",
     "assert f('aab') == {'a': 2, 'b': 1}\nassert type(f('a')) is dict"),
    ("from collections import defaultdict\ndef f(s):\n    d = defaultdict(int)\n    for c in s:\n        d[c] += 1\n"
     "    return d", "assert f('aab') == {'a': 2, 'b': 1}"),
    ("from collections import OrderedDict\ndef f():\n    return OrderedDict(a=1)", "assert f() == {'a': 1}"),
    ("from collections import namedtuple\nP = namedtuple('P', 'x y')\ndef f():\n    return P(1, 2)",
     "assert f() == (1, 2)\nassert type(f()) is tuple"),
    ("import enum\nclass C(enum.IntEnum):\n    A = 3\ndef f():\n    return C.A",
     "assert f() == 3\nassert type(f()) is int"),
    ("class S(str):\n    pass\ndef f():\n    return [S('a'), {S('b'): b'x'}]", "assert f() == ['a', {'b': b'x'}]"),
    ("def f(n):\n    return range(n)", "assert list(f(3)) == [0, 1, 2]\nassert f(3) == range(3)"),
    ("def f(xs):\n    return map(str, xs)", "assert list(f([1])) == ['1']"),
    ("from fractions import Fraction\ndef f():\n    return Fraction(1, 3)",
     "from fractions import Fraction\nassert f() == Fraction(1, 3)\nassert f() != 0.3333333333333333"),
    ("from decimal import Decimal\ndef f():\n    return Decimal('1.50')",
     "assert f() == 1.5\nassert str(f()) == '1.50'"),
    ("def f(z):\n    return z * 1j", "assert f(2 + 1j) == -1 + 2j"),
    ("import numpy as np\ndef f():\n    return np.int64(3), np.float64(0.5), np.bool_(True)",
     "assert f() == (3, 0.5, True)\nassert [type(x) for x in f()] == [int, float, bool]"),
])
def test_values_of_built_in_subclasses_and_numbers_pass(program, tests):
    """A correct program that returns a Counter, a namedtuple, an IntEnum, an iterator or a Fraction passes as it
    would run directly; the tests receive the base built-in type's value (or a number the checker builds)."""
    if "numpy" in program:
        pytest.importorskip("numpy")
    assert CodeReward(timeout_s=3)(program, {"tests": tests}) == 1.0
