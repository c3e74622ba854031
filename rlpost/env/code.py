"""The `code` reward: run the completion's program against row["tests"] in the sandbox (rlpost.sandbox).

    from rlpost.env.verifiers import get_reward
    score = get_reward("code", timeout_s=2)
    score("```python\\nprint(int(input()) * 2)\\n```", {"tests": [{"input": "3", "output": "6"}]})   # 1.0

row["tests"] is either
- a list of stdin/stdout cases [{"input": str, "output": str}, ...]: one sandboxed run per case; a case
  passes when the program exits 0 and its stdout equals "output" up to surrounding whitespace and
  trailing spaces on each line (the comparison happens here, on the host); or
- a string of Python with assert statements. Each top-level `assert` is one case; the other top-level
  statements are set-up (one that raises fails every case after it). So is each call a test runner would
  make of tests that define but never call them: a top-level `test*` function taking no argument (pytest),
  `check(<row["entry_point"]>)` (HumanEval), a top-level `unittest.TestCase` class (its tests, all passing);
  such a case passes only if an assertion ran in it. Tests with neither are one case that passes when they
  all run and ran an assertion. Tests with no assert statement and no TestCase, or that run to their end
  without asking the program for anything (the same verdict for every program), raise a ValueError. The
  tests never enter the program's process. Two sandboxes run per row: the *program* sandbox runs the
  program once, then answers requests for the names it defines; the *checker* sandbox never sees the
  program and runs the tests; a name they read that no scope of theirs binds and that is no builtin (or an
  attribute of the module `solution`) is asked of the program when first read: its plain value, or a proxy
  whose calls become requests: {"call": name, "args": [...], "kwargs": {...}} out, a value or an
  exception back. Both ways carry plain data only (None, bool, int, float, str, list, and tagged tuple,
  dict, set, frozenset, bytes, complex, range, Fraction, Decimal, an iterator's items; a subclass of a
  built-in type is sent as its base type's value, converted by the sender), as length-prefixed JSON on the
  harnesses' stdin and stdout (pipes from this process, which relays and size-caps the frames; no socket,
  so the sandbox's seccomp filter, which refuses AF_UNIX sockets, is no obstacle). A result that is not
  plain data, a request the program does not answer (it exited, crashed, hung past the row's timeout_s,
  sent junk) fails that call, with a RemoteError that is no Exception (a test's `except Exception` never
  takes it for the error it expects); the program's own exception class arrives as its built-in base. So
  the program decides only its own answers, never a verdict, and it never sees an expected value.

The reward is the fraction of cases passed (mode="fraction") or 1.0 only if all pass (mode="all").
extract: "auto" (the last ```python block, else the last ``` block, else the whole text), "fenced" (the
last fenced block; none scores 0), "whole" (the whole completion is the program).
"""

from __future__ import annotations

import ast
import json
import os
import re
import select
import time

from rlpost import sandbox
from rlpost.env.base import Verifier

_FENCE = re.compile(r"```([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)  # what _fences finds, in linear time
_TAG = re.compile(r"[A-Za-z0-9_+-]*")
_PYTHON_TAGS = ("python", "py", "python3")
MAX_ANSWER_BYTES = 1 << 20  # one answer of the program, as JSON; a bigger one fails that call
MAX_FRAME_BYTES = 64 << 20  # anything else on the wire: the tests, the checker's requests

# Both harnesses start with this: framing (4-byte big-endian length, then JSON) on the channel fds, and
# the plain-data codec. Type checks are exact (`type(v) is int`), so subclasses with their own __eq__ are
# refused, and decoding builds only built-in types whatever the bytes say.
_WIRE = """\
import json, os, sys
ANSWER_MAX, FRAME_MAX = %d, %d

def send(fd, obj, cap=FRAME_MAX):
    data = json.dumps(obj).encode()
    if len(data) > cap:
        data = json.dumps({"raised": "RemoteError", "message": "over %%d bytes" %% cap}).encode()
    data = len(data).to_bytes(4, "big") + data
    while data:
        data = data[os.write(fd, data):]

def recv(fd):
    head = _exactly(fd, 4)
    n = int.from_bytes(head, "big")
    if n > FRAME_MAX:
        raise EOFError("frame too big")
    return json.loads(_exactly(fd, n))

def _exactly(fd, n):
    buf = b""
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf

class NotPlain(Exception):  # what encode refuses: the sender's answer is not plain data
    pass

def encode(v, depth=0):
    t = type(v)
    if depth > 200:
        raise NotPlain("nested too deep")
    if t is not bool and t not in _EXACT:
        v = plain(v)
        t = type(v)
    if t is int and v.bit_length() > 10000:  # json writes ints in decimal, refused past 4300 digits
        return {"int": hex(v)}
    if v is None or t is bool or t is int or t is float or t is str:
        return v
    if t is list:
        return [encode(x, depth + 1) for x in v]
    if t is tuple or t is set or t is frozenset:
        return {t.__name__: [encode(x, depth + 1) for x in v]}
    if t is dict:
        return {"dict": [[encode(k, depth + 1), encode(x, depth + 1)] for k, x in v.items()]}
    if t is bytes:
        return {"bytes": v.hex()}
    if t is complex:
        return {"complex": [v.real, v.imag]}
    if t is range:
        return {"range": [encode(v.start), encode(v.stop), encode(v.step)]}
    if t is _Iterated:
        return {"iter": [encode(x, depth + 1) for x in v.items]}
    if t.__module__ == "fractions" and t.__name__ == "Fraction":
        return {"fraction": [encode(int.__int__(v.numerator)), encode(int.__int__(v.denominator))]}
    if t.__module__ == "decimal" and t.__name__ == "Decimal":
        return {"decimal": str(v)}
    raise NotPlain("not plain data: " + t.__name__)

_EXACT = (type(None), int, float, str, list, tuple, set, frozenset, dict, bytes, complex, range)
# A subclass of a built-in type (Counter, defaultdict, OrderedDict, namedtuple, IntEnum, a str Enum, numpy's
# float64) is sent as its base type's value, converted here, by the base type's own code: the process that
# sends it can only change its own answer this way, and the other side receives exact built-in types only.
_BASES = ((int, int.__int__), (float, float.__float__), (complex, complex), (str, str.__str__),
          (bytes, lambda v: b"".join([v])), (list, list.copy), (tuple, tuple), (dict, dict.copy), (set, set),
          (frozenset, frozenset))
ITER_MAX = 1 << 20

class _Iterated:  # an iterator's items, taken in the sending process; it arrives as an iterator over them
    def __init__(self, items):
        self.items = items

def plain(v):
    t = type(v)
    for base, convert in _BASES:
        if isinstance(v, base):
            return convert(v)
    if t.__module__ == "numpy" and getattr(v, "shape", None) == () and hasattr(v, "item"):  # a numpy scalar
        return v.item()
    if t.__module__ in ("fractions", "decimal"):
        return v
    if hasattr(t, "__next__") and hasattr(t, "__iter__"):  # a generator, map, filter, zip, an iterator
        items = []
        for x in v:
            if len(items) >= ITER_MAX:
                raise NotPlain("an iterator of over %%d items" %% ITER_MAX)
            items.append(x)
        return _Iterated(items)
    return v

_TAGS = {"tuple": tuple, "set": set, "frozenset": frozenset}

def decode(v):
    t = type(v)
    if v is None or t is bool or t is int or t is float or t is str:
        return v
    if t is list:
        return [decode(x) for x in v]
    if t is dict and len(v) == 1:
        (tag, body), = v.items()
        if tag in _TAGS and type(body) is list:
            return _TAGS[tag](decode(x) for x in body)
        if tag == "dict" and type(body) is list and all(type(p) is list and len(p) == 2 for p in body):
            return {decode(k): decode(x) for k, x in body}
        if tag == "bytes" and type(body) is str:
            return bytes.fromhex(body)
        if tag == "int" and type(body) is str:
            return int(body, 16)
        if tag == "iter" and type(body) is list:
            return iter([decode(x) for x in body])
        if tag in _NUMBERS and type(body) is list and len(body) == len(_NUMBERS[tag][1]):
            parts = [decode(x) for x in body]
            if all(type(x) is k for x, k in zip(parts, _NUMBERS[tag][1])):
                return _NUMBERS[tag][0](*parts)
        if tag == "decimal" and type(body) is str:
            import decimal
            return decimal.Decimal(body)
    raise ValueError("not plain data")

def _fraction(n, d):
    import fractions
    return fractions.Fraction(n, d)

_NUMBERS = {"complex": (complex, (float, float)), "range": (range, (int, int, int)),
            "fraction": (_fraction, (int, int))}

def private_channel():
    # The harness keeps the pipes to the host; the code it runs gets /dev/null as stdin and stderr as
    # stdout, so nothing it prints or reads touches the channel.
    rd, wr = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(2, 1)
    os.close(null)
    return rd, wr
""" % (MAX_ANSWER_BYTES, MAX_FRAME_BYTES)

# The program sandbox: run the program once, then answer {"get": name} and {"call": name, "args", "kwargs"}
# until the host closes the pipe. A program that raises at its top level (sys.exit included) ends the run.
_PROGRAM_SERVER = _WIRE + """
import builtins, types

def kind(e):  # the exception's nearest built-in class: NegError(ValueError) is sent as a ValueError
    for c in type(e).__mro__:
        if getattr(builtins, c.__name__, None) is c:
            return c.__name__
    return "RemoteError"

def answer(ns, req):
    try:
        if "get" in req:
            if req["get"] not in ns:
                return {"missing": True}
            value = ns[req["get"]]
            if isinstance(value, types.ModuleType):
                return {"module": value.__name__}
            return {"callable": True} if callable(value) else {"value": encode(value)}
        args = [decode(a) for a in req["args"]]
        kwargs = {k: decode(v) for k, v in req["kwargs"].items()}
        return {"value": encode(ns[req["call"]](*args, **kwargs))}
    except NotPlain as e:  # no answer: in Python the call would have returned, not raised
        return {"raised": "RemoteError", "message": str(e)[:1000]}
    except BaseException as e:
        try:
            return {"raised": kind(e), "message": str(e)[:1000]}
        except BaseException:
            return {"raised": "RemoteError", "message": "an exception that cannot be shown"}

def main():
    rd, wr = private_channel()
    ns = {"__name__": "__main__", "__builtins__": __builtins__}
    exec(compile(recv(rd)["program"], "solution.py", "exec"), ns)
    while True:
        try:
            req = recv(rd)
        except EOFError:
            return
        try:
            send(wr, answer(ns, req), ANSWER_MAX)
        except (TypeError, ValueError, RecursionError, OverflowError) as e:
            send(wr, {"raised": "RemoteError", "message": "answer is not JSON: " + type(e).__name__})

main()
"""

# The checker sandbox: never imports the program. It runs the tests statement by statement and reports
# {"stmt": i, "ok": bool, "asked": requests so far} for each, then runs the conventional calls the host found
# ({"conv": j, "ok": bool, "asked": n}),
# then {"done": True, "asserts": how many assert statements and unittest assertions ran, "asked": how many
# requests went to the program}. Its requests for the program go out on the same channel.
_CHECKER = _WIRE + """
import ast, builtins, importlib, types

class RemoteError(BaseException):
    \"\"\"A call of the program's that gave no answer: none in time, not plain data, StopIteration, SystemExit.
    Not an Exception, so that `except Exception`, assertRaises(Exception) or pytest.raises(Exception) in the
    tests never take it for the exception they expect (returning junk would pass them).\"\"\"

COUNT = {"asserts": 0, "asked": 0}

def assert_ran():
    COUNT["asserts"] += 1

class CountAsserts(ast.NodeTransformer):  # `assert x` becomes `__rlpost_assert_ran__(); assert x`, at any depth
    def visit_Assert(self, node):
        call = ast.Expr(ast.Call(ast.Name("__rlpost_assert_ran__", ast.Load()), [], []))
        return [ast.copy_location(call, node), node]

def count_unittest_assertions():
    import unittest

    def counted(method):
        def wrapper(*args, **kwargs):
            assert_ran()
            return method(*args, **kwargs)
        return wrapper
    for name, value in list(vars(unittest.TestCase).items()):
        if name.startswith(("assert", "fail")) and isinstance(value, types.FunctionType):
            setattr(unittest.TestCase, name, counted(value))
    unittest.main = lambda *args, **kwargs: None  # the host runs the TestCase classes, one case each

def main():
    rd, wr = private_channel()

    def ask(request):
        COUNT["asked"] += 1
        send(wr, request)
        return recv(rd)

    class Remote:  # what the tests see of a callable the program defines
        def __init__(self, name):
            self.__name__ = self.__qualname__ = name

        def __repr__(self):
            return "<the program's " + self.__name__ + ">"

        def __call__(self, *args, **kwargs):
            reply = ask({"call": self.__name__, "args": [encode(a) for a in args],
                         "kwargs": {k: encode(v) for k, v in kwargs.items()}})
            if type(reply) is dict and "value" in reply:
                try:
                    return decode(reply["value"])
                except Exception:  # junk, or a number that cannot be built (Fraction(1, 0)): not an answer
                    raise RemoteError("an answer that is not plain data") from None
            kind = reply.get("raised") if type(reply) is dict else None
            message = str(reply.get("message", ""))[:1000] if type(reply) is dict else ""
            cls = getattr(builtins, kind, None) if type(kind) is str else None
            # StopIteration would end the caller's loop quietly (all(map(f, xs)) is True): never re-raised
            if isinstance(cls, type) and issubclass(cls, Exception) and cls not in (StopIteration,
                                                                                     StopAsyncIteration):
                try:
                    error = cls(message)
                except Exception:  # a built-in exception that takes other arguments
                    error = None
                if error is not None:
                    raise error
            raise RemoteError((kind or "no answer") + ": " + message)

    def fetch(name):  # a name the tests read and do not bind: the program's, asked for when first read
        reply = ask({"get": name})
        if type(reply) is dict:
            if reply.get("callable") is True:
                return Remote(name)
            if "value" in reply:
                try:
                    return decode(reply["value"])
                except Exception:
                    pass
            elif reply.get("module") == name and name in sys.stdlib_module_names:  # `math` not imported
                try:
                    return importlib.import_module(name)
                except BaseException:
                    pass
        raise KeyError(name)

    class Names(dict):
        # The tests' builtins. Python looks a name up here after the tests' own globals, and only where no
        # scope of the tests binds it, so a miss is a name the tests take from the program: fetched then.
        def __missing__(self, name):
            if name.startswith("__"):
                raise KeyError(name)
            self[name] = value = fetch(name)
            return value

    class Solution(types.ModuleType):  # `from solution import f` and `solution.f`: the program's names
        def __getattr__(self, name):
            try:
                return names[name]
            except KeyError:
                raise AttributeError(name) from None

    request = recv(rd)
    tree = ast.parse(request["tests"], "tests.py")
    names = Names(vars(builtins))
    names["__rlpost_assert_ran__"] = assert_ran
    sys.modules["solution"] = Solution("solution")
    if "unittest" in request["tests"]:
        count_unittest_assertions()
    ns = {"__name__": "__main__", "__builtins__": names}
    broken = False
    for i, stmt in enumerate(tree.body):
        module = ast.fix_missing_locations(CountAsserts().visit(ast.Module(body=[stmt], type_ignores=[])))
        try:
            exec(compile(module, "tests.py", "exec"), ns)
            ok = True
        except BaseException:
            ok = False
        send(wr, {"stmt": i, "ok": ok, "asked": COUNT["asked"]})
        if not ok and not isinstance(stmt, ast.Assert):
            broken = True
            break
    for j, (kind, name) in enumerate([] if broken else request["calls"]):
        before = COUNT["asserts"]
        try:
            if kind == "function":
                ns[name]()
            elif kind == "check":
                ns["check"](eval(name, ns))
            else:
                import unittest
                result = unittest.TestResult()
                unittest.defaultTestLoader.loadTestsFromTestCase(ns[name]).run(result)
                if not (result.wasSuccessful() and result.testsRun):
                    raise AssertionError(name)
            passed = True
        except BaseException:
            passed = False
        # a case passes only if it checked something
        send(wr, {"conv": j, "ok": passed and COUNT["asserts"] > before, "asked": COUNT["asked"]})
    send(wr, {"done": True, "asserts": COUNT["asserts"], "asked": COUNT["asked"]})

main()
"""


def extract_program(completion: str, extract: str = "auto") -> str | None:
    """The program in `completion` (see the module docstring for `extract`); None if there is none."""
    if extract == "whole":
        return completion
    blocks = _fences(completion)
    python = [body for tag, body in blocks if tag.lower() in _PYTHON_TAGS]
    if python or blocks:
        return (python or [body for _, body in blocks])[-1]
    return completion if extract == "auto" else None


def _fences(text: str) -> list[tuple[str, str]]:
    """_FENCE.findall(text): the (tag, body) of each fenced block. The regular expression takes time quadratic in
    the text where many "```" have no newline after them (each start scans to the end: 7 s for 120,000
    characters, holding the GIL, which task.reward_timeout_s cannot cut short); this finds the same blocks in
    one pass. A start whose line never ends, or that no later "```" closes, means no later start can match."""
    blocks, pos = [], 0
    while (start := text.find("```", pos)) >= 0:
        line_end = text.find("\n", start + 3)
        if line_end < 0:
            break
        close = text.find("```", line_end + 1)
        if close < 0:
            break
        blocks.append((_TAG.match(text, start + 3).group(), text[line_end + 1:close]))
        pos = close + 3
    return blocks


def normalize_output(text: str) -> str:
    """Surrounding whitespace and each line's trailing whitespace dropped; \\r\\n as \\n."""
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


class CodeReward(Verifier):
    """`(completion, row) -> float`: the completion's program against row["tests"], in the sandbox."""

    def __init__(self, *, timeout_s: float = 5.0, memory_mb: int = 512, mode: str = "fraction",
                 extract: str = "auto"):
        if mode not in ("fraction", "all"):
            raise ValueError(f"code reward: mode must be 'fraction' or 'all', got {mode!r}")
        if extract not in ("auto", "fenced", "whole"):
            raise ValueError(f"code reward: extract must be 'auto', 'fenced' or 'whole', got {extract!r}")
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < float("inf"):
            raise ValueError(f"code reward: timeout_s must be a finite number of seconds > 0, got {timeout_s!r}")
        if isinstance(memory_mb, bool) or not isinstance(memory_mb, int) or memory_mb < 1:
            raise ValueError(f"code reward: memory_mb must be a whole number >= 1, got {memory_mb!r}")
        self.timeout_s, self.memory_mb, self.mode, self.extract = timeout_s, memory_mb, mode, extract

    def _run(self, code: str, stdin: str) -> sandbox.SandboxResult:
        result = sandbox.run(code, stdin=stdin, timeout_s=self.timeout_s, memory_mb=self.memory_mb)
        _raise_on_sandbox_error(result)
        return result

    def __call__(self, completion: str, row: dict) -> float:
        tests = _check_tests(row)
        program = extract_program(completion, self.extract)
        if program is None:
            return 0.0
        if isinstance(tests, str):
            passed = self.assert_cases(program, tests, row.get("entry_point"))
        else:
            passed = []
            for case in tests:
                result = self._run(program, case["input"])
                passed.append(result.ok and normalize_output(result.stdout) == normalize_output(case["output"]))
                if not passed[-1] and self.mode == "all":
                    break
        if self.mode == "all":
            return float(all(passed))
        return sum(passed) / len(passed)

    def assert_cases(self, program: str, tests: str, entry_point: str | None = None) -> list[bool]:
        """Which cases of the assert-style `tests` the `program` passes: one bool per top-level assert and per
        conventional call (a `test_*` function, `check(<entry_point>)`, a `unittest.TestCase` class), or one
        for tests with neither, decided in the checker sandbox from the program sandbox's plain-data answers
        (see the module docstring). The whole exchange shares `timeout_s`. Tests that could pass without
        checking the program raise a ValueError."""
        tree = _parse_tests(tests)
        calls = _conventional_calls(tree, entry_point)
        _check_assertions(tests, tree, calls)
        body = tree.body
        asserts = [i for i, stmt in enumerate(body) if isinstance(stmt, ast.Assert)]
        opts = {"timeout_s": self.timeout_s, "memory_mb": self.memory_mb}
        with sandbox.start(_PROGRAM_SERVER, **opts) as served, sandbox.start(_CHECKER, **opts) as checker:
            outcomes, done = _relay(checker, served, program, {"tests": tests, "calls": calls})
            _raise_on_sandbox_error(checker.close(stop=done is None))
            # The program sandbox's own end is not looked at: it is stopped here, whatever the program did,
            # and a broken host shows in the checker's sandbox, set up the same way.
            served.close(stop=True)
        ran, broken = [], False  # a set-up statement that did not run fails every statement after it
        for i, stmt in enumerate(body):
            ran.append(not broken and outcomes.get(("stmt", i)) is True)
            broken = broken or not (ran[-1] or isinstance(stmt, ast.Assert))
        cases = [ran[i] for i in asserts] + [outcomes.get(("conv", j)) is True for j in range(len(calls))]
        if not (asserts or calls):
            cases = [all(ran) and done is not None and done["asserts"] > 0]
        if done is not None and done["asked"] == 0 and (all(ran) or any(cases)):
            # Nothing came from the program, so every program gets these same verdicts: tests that ran to their
            # end that way check nothing of it
            raise ValueError(f"code reward: row['tests'] passed without using anything the program defines "
                             f"({_head(tests)}), so it would pay any completion. Call the function that holds the "
                             "asserts (check(f)), or use a convention that runs by itself: test_* functions, "
                             "check(candidate) with row['entry_point'], unittest.TestCase classes "
                             "(docs/verifiers.md)")
        if done is not None and done["asserts"] == 0:
            return [False] * len(cases)  # no assertion ran, for this program: nothing was checked
        return cases


def _head(tests: str) -> str:
    return f"{tests[:80]!r}" + ("..." if len(tests) > 80 else "")


def _conventional_calls(tree: ast.Module, entry_point: str | None) -> list[list[str]]:
    """The calls that tests which define, but never call, their test functions expect a test runner to make,
    as [kind, name]: ["function", "test_x"] for a top-level `test*` function that takes no argument (pytest's
    convention), ["check", entry_point] for a top-level `check` when the row names its entry point (HumanEval's
    `check(candidate)`), ["testcase", "T"] for a top-level class derived from `TestCase` (unittest's)."""
    loaded = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}
    calls, testcases, seen = [], set(), set()
    for stmt in tree.body:
        if isinstance(stmt, ast.ClassDef):
            bases = {b.id if isinstance(b, ast.Name) else b.attr for b in stmt.bases
                     if isinstance(b, (ast.Name, ast.Attribute))}
            if bases & (testcases | {"TestCase"}):
                testcases.add(stmt.name)
                call = ["testcase", stmt.name]
            else:
                continue
        elif isinstance(stmt, ast.FunctionDef) and stmt.name not in loaded:
            a = stmt.args
            positional = len(a.posonlyargs) + len(a.args)
            required = positional - len(a.defaults) + sum(d is None for d in a.kw_defaults)
            if stmt.name.startswith("test") and required == 0:
                call = ["function", stmt.name]
            elif stmt.name == "check" and entry_point is not None and positional >= 1 and required <= 1:
                call = ["check", _entry_point(entry_point)]
            else:
                continue
        else:
            continue
        if tuple(call) not in seen:
            seen.add(tuple(call))
            calls.append(call)
    return calls


def _entry_point(name):
    if name is not None and not (isinstance(name, str) and name.isidentifier()):
        raise ValueError(f"code reward: row['entry_point'] must be the name of the program's function the tests' "
                         f"check(candidate) is called with, got {str(name)[:80]!r}")
    return name


def _check_assertions(tests: str, tree: ast.Module, calls: list) -> None:
    if not any(isinstance(node, ast.Assert) for node in ast.walk(tree)) and not any(c[0] == "testcase" for c in calls):
        raise ValueError(f"code reward: row['tests'] has no assert statement and no unittest.TestCase class "
                         f"({_head(tests)}): it checks nothing; write assert statements")


def _raise_on_sandbox_error(result: sandbox.SandboxResult) -> None:
    if result.reason == "sandbox_error":  # the host's fault, not the program's: say so, do not score 0
        raise RuntimeError(f"code reward: the sandbox failed: {result.stderr[-2000:]}")


def _parse_tests(tests: str) -> ast.Module:
    try:
        return ast.parse(tests, "tests.py")
    except SyntaxError as e:
        raise ValueError(f"code reward: row['tests'] is not valid Python (line {e.lineno}: {e.msg}); assert-style "
                         "tests must parse on their own") from None


def _relay(checker: sandbox.SandboxProcess, served: sandbox.SandboxProcess, program: str,
           request: dict) -> tuple[dict[tuple[str, int], bool], dict | None]:
    """Pass the checker's requests to the program sandbox and its answers back, as opaque frames, until the
    checker is done or the row's time is up. Returns ({("stmt" or "conv", index): passed}, the checker's
    {"asserts": n, "asked": n} when it got to its end, else None). A checker that did not get to its end
    before asking the program anything decided nothing about the program: no verdict of it passes."""
    deadline = min(checker.deadline, served.deadline)
    outcomes: dict[tuple[str, int], bool] = {}
    asked = 0  # the checker's requests to the program, as its last verdict counted them
    alive = _send(served.stdin, {"program": program}, deadline)
    if not _send(checker.stdin, request, deadline):
        return {}, None
    while (frame := _recv(checker.stdout, deadline, MAX_FRAME_BYTES)) is not None:
        try:
            msg = json.loads(frame)
        except ValueError:
            return (outcomes if asked else {}), None
        if not isinstance(msg, dict):
            return (outcomes if asked else {}), None
        if "done" in msg:
            counts = {key: msg.get(key) for key in ("asserts", "asked")}
            return outcomes, counts if all(type(n) is int for n in counts.values()) else None
        if "stmt" in msg or "conv" in msg:
            kind = "stmt" if "stmt" in msg else "conv"
            outcomes[(kind, msg[kind])] = msg.get("ok") is True
            asked = max(asked, msg["asked"]) if type(msg.get("asked")) is int else asked
            continue
        alive = alive and _send(served.stdin, frame, deadline)
        answer = _recv(served.stdout, deadline, MAX_ANSWER_BYTES) if alive else None
        alive = answer is not None  # once it failed to answer, the rest of its answers fail at once
        if not _send(checker.stdin, answer if alive else {"raised": "RemoteError", "message": "no answer"},
                     deadline):
            break
    return (outcomes if asked else {}), None


def _send(pipe, message, deadline: float) -> bool:
    """Write one frame (a dict, or the bytes of one already encoded) before `deadline`; False if the reader
    is gone or too slow."""
    data = message if isinstance(message, bytes) else json.dumps(message).encode()
    return sandbox._write_before(pipe, len(data).to_bytes(4, "big") + data, deadline)


def _recv(pipe, deadline: float, cap: int) -> bytes | None:
    """Read one frame before `deadline`; None on end of file, timeout, or a length over `cap`."""
    head = _read_exactly(pipe.fileno(), 4, deadline)
    if head is None or int.from_bytes(head, "big") > cap:
        return None
    return _read_exactly(pipe.fileno(), int.from_bytes(head, "big"), deadline)


def _read_exactly(fd: int, n: int, deadline: float) -> bytes | None:
    buf, poll = bytearray(), select.poll()
    poll.register(fd, select.POLLIN)
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0 or not poll.poll(left * 1000):
            return None
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _check_tests(row: dict):
    if not isinstance(row, dict) or "tests" not in row:
        keys = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise ValueError(f"code reward: the row has no 'tests' (keys: {keys}); give a list of "
                         "{'input', 'output'} cases or a string of assert code")
    tests = row["tests"]
    if isinstance(tests, str):
        if not tests.strip():
            raise ValueError("code reward: row['tests'] is an empty string of assert code")
        # a row's broken or vacuous tests raise whatever the completion, even one with no program
        tree = _parse_tests(tests)
        _check_assertions(tests, tree, _conventional_calls(tree, row.get("entry_point")))
        return tests
    if not isinstance(tests, list) or not tests:
        raise ValueError(f"code reward: row['tests'] must be a non-empty list of {{'input', 'output'}} cases or a "
                         f"string of assert code, got {type(tests).__name__} {str(tests)[:80]!r}")
    for i, case in enumerate(tests):
        if not (isinstance(case, dict) and isinstance(case.get("input"), str) and isinstance(case.get("output"), str)):
            raise ValueError(f"code reward: row['tests'][{i}] must be {{'input': str, 'output': str}}, "
                             f"got {str(case)[:80]!r}")
    return tests
