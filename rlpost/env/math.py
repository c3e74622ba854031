"""The `math` reward: pull the final answer out of a completion, check it against row["answer"] with math-verify.

    from rlpost.env.math import MathReward
    reward = MathReward(extract="boxed")                  # or get_reward("math", extract="boxed")
    reward("... so we get \\boxed{\\frac{1}{2}}", {"answer": "0.5"})   # 1.0
    reward("... so we get \\boxed{2}", {"answer": "0.5"})               # 0.0

Extraction (`extract`: one method, a list tried in order, or "auto" = boxed, hash, answer_is, last_line;
the first method that finds something wins, so an answer it finds is never second-guessed by a later one):

    boxed      the last \\boxed{...} (or \\fbox{...}), braces balanced:  "\\boxed{\\frac{1}{2}}" -> "\\frac{1}{2}";
               "\\boxed{3} no, \\boxed{4}" -> "4"; an unclosed last "\\boxed{4" finds nothing
    hash       GSM8K style, the rest of the line after the last "####":  "#### 1,000" -> "1,000"
    answer_is  the rest of the line after the last "answer is" / "answer:" (any case):
               "The answer is $\\frac12$." -> "\\frac12"; "**Answer:** 42" -> "42";
               "Answer: 5. No, the answer is 6." -> "6"; "The final answer is $5$. I hope it is correct." -> "5"
    last_line  the last non-empty line:  "...\\n42 apples\\n" -> "42 apples"
    last_number  the last number:  "so 3 + 4 = 7." -> "7"; "-1,234.5", "3/4" and "50%" are numbers

Every method strips surrounding $ / \\( \\) / ** and a trailing period. An answer longer than
`max_answer_chars` counts as no answer (a policy must not win by writing every candidate).

Equivalence (`is_equivalent(pred, gold)`), in order:
  1. the same string once $-signs, spacing, \\left/\\right and \\dfrac/\\tfrac are normalised away
  2. a gold made of letters only ("Paris", "even", "New York", not a single letter: that is a variable) is
     compared as text, ignoring case and \\text{}: math-verify would read "Pairs" as p*a*i*r*s == "Paris"
  3. two plain numbers are equal as fractions (0.5 == 1/2 == \\frac{1}{2}); when one is written as a decimal,
     it may be a rounded value: agreeing to 6 decimal places and to 4 significant digits (a relative difference
     of at most 1e-4) is enough (0.333333 == 1/3, 0.003333 == 1/300), but a tiny number is not rounded to
     another, nor to 0 (0 != 0.0000001, 0.000001 != 0.0000014). Plain means: an integer, a decimal, 1,000-style
     commas, a/b, \\frac{a}{b}, a leading \\$, a trailing %, trailing unit words ("42 dollars", "5 \\text{cm}",
     "30^\\circ"), dressed as "x = 5", "\\approx 5", "\\text{5}", "1{,}000" or "1.2 \\times 10^{5}".
     A gold that is a plain number is answered only by a plain number: arithmetic that evaluates to it is no
     answer ("57+32+18", "17 \\cdot 23", "\\sqrt{49}", "5!", a fraction not in lowest terms such as "84/12"),
     with fast_path off too: where math-verify reads the answer (prose, "\\boxed{18}"), what it reads must be one.
     Else a policy copies the problem's own expression after "####" and sympy does the work it is rewarded for.
     Steps 1-3 run in this process, in microseconds.
  4. anything else goes to math-verify (parse + verify, gold first) in a worker process: LaTeX
     (\\frac{1}{2}, 2\\sqrt{2} == \\sqrt{8}), sets ({1,2} == {2,1}), intervals ([0,1) != [0,1]), equations
     (x=3 == 3), expressions ((x+1)^2 == x^2+2x+1). An answer without $-signs is wrapped in $...$ so that it is
     read as LaTeX, unless it is prose (two or more words), which math-verify searches for its last expression.
A percentage matches both readings: 50% == 0.5 and 50% == 50 (and 12.5% == 12.5).

Timeouts: sympy can take minutes (\\boxed{9^{9^{9}}}). math-verify's own timeouts use signal.alarm, which fails
outside a main thread, counts whole seconds per parse and per comparison, turns a timeout into a silent False,
and (like any signal) cannot stop a long call into C. So parse+verify runs in a pool of up to `workers`
processes with math-verify's timeouts off, and the caller waits at most `timeout_s` seconds per call (timed
from when a worker takes it: at most `workers` calls are in flight). A call that runs out scores 0.0, adds
one to `reward.timeouts`, and its worker is killed; a call that finds no idle worker starts one (seconds:
it imports sympy, math-verify and the `rlpost` package, outside the call's time). `close()` stops them, and
so does interpreter exit. A worker is a fresh `python -c` that imports `rlpost` (no multiprocessing), so it
never re-imports the script that started it (no `if __name__ == "__main__":` guard needed, `python -`
works), and it dies with the process that started it even when that is SIGKILLed (see _die_with_parent).
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import math
import os
import pickle
import queue
import re
import select
import signal
import subprocess
import sys
import threading
import time
import weakref
from concurrent.futures import TimeoutError as FutureTimeout
from fractions import Fraction

from rlpost.env.base import Verifier

METHODS = ("boxed", "hash", "answer_is", "last_line", "last_number")
AUTO = ("boxed", "hash", "answer_is", "last_line")
STARTUP_TIMEOUT_S = 120.0  # a fresh worker imports sympy and math-verify; generous on a busy machine

# ---------------------------------------------------------------------------------------------- extraction

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_HASH = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER_IS = re.compile(r"\banswer(?:\s+is\b\s*:?|\s*:)(?:\s|\*)*", re.IGNORECASE)
_HOPE = ("i hope it is correct.", "i hope it is correct")  # Minerva's sign-off, dropped from the end of a line
# a sign only where it cannot be a minus between two terms ("x-3" -> "3"); 1,000-style commas, decimals, a/b, %
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?%?|(?<![\w.])-?\.\d+")


def _clean(ans: str) -> str | None:
    """Strip what surrounds an answer: spaces, markdown bold, $ and \\( \\) delimiters, a trailing period."""
    s = ans.strip()
    for _ in range(3):  # "**$42$**." needs a few rounds
        before = s
        s = s.strip().strip("*").strip()
        s = s.removesuffix(".")
        if s.startswith("\\(") and s.endswith("\\)") or s.startswith("\\[") and s.endswith("\\]"):
            s = s[2:-2]
        s = s.strip().strip("$")
        if s == before:
            break
    return s.strip() or None


def _boxed(text: str) -> str | None:
    starts = [m.end() - 1 for m in _BOXED.finditer(text)]  # index of the "{"
    if not starts:
        return None
    i = starts[-1]
    depth, j = 0, i
    while j < len(text):
        c = text[j]
        if c == "\\":  # \{ and \} are literal braces (sets), not grouping
            j += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return _clean(text[i + 1:j])
        j += 1
    return None  # the last \boxed is never closed (a cut-off completion): no answer, not an earlier box


def _hash(text: str) -> str | None:
    found = _HASH.findall(text)
    return _clean(found[-1]) if found else None


def _answer_is(text: str) -> str | None:
    last = None
    for last in _ANSWER_IS.finditer(text):  # the last anchor, even on one line: "Answer: 5. No, the answer is 6"
        pass
    if last is None:
        return None
    line = text[last.end():].split("\n", 1)[0].rstrip()
    for hope in _HOPE:  # Minerva's "The final answer is $5$. I hope it is correct." (no regular expression: a
        if line[-len(hope):].lower() == hope:  # leading \s* took time quadratic in a line of spaces, GIL held)
            line = line[:-len(hope)]
            break
    return _clean(line)


def _last_line(text: str) -> str | None:
    lines = [line for line in text.splitlines() if line.strip()]
    return _clean(lines[-1]) if lines else None


def _last_number(text: str) -> str | None:
    found = _NUMBER.findall(text)
    return found[-1] if found else None


EXTRACTORS = {"boxed": _boxed, "hash": _hash, "answer_is": _answer_is, "last_line": _last_line,
              "last_number": _last_number}


def resolve_methods(extract: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """`extract` as a tuple of method names: "auto", one name, or a list of names; unknown names are an error."""
    if extract == "auto":
        return AUTO
    methods = (extract,) if isinstance(extract, str) else tuple(extract)
    bad = [m for m in methods if m not in EXTRACTORS]
    if not methods or bad:
        raise ValueError(f"math reward: extract={extract!r}: expected 'auto', one of {list(METHODS)}, "
                         f"or a non-empty list of them" + (f"; unknown: {bad}" if bad else ""))
    return methods


def extract_answer(text: str, methods: str | list[str] | tuple[str, ...] = "auto") -> str | None:
    """The answer the first of `methods` finds in `text` (see the module docstring), or None."""
    for m in resolve_methods(methods):
        found = EXTRACTORS[m](text)
        if found:
            return found
    return None


# --------------------------------------------------------------------------------- in-process equivalence

_DELIMITED = re.compile(r"^(?:\$+(.*?)\$+|\\\((.*)\\\)|\\\[(.*)\\\])$", re.DOTALL)
_TEXT_WRAP = re.compile(r"^\\(?:text|textbf|textrm|mathrm|mbox)\{(.*)\}$", re.DOTALL)
_WORDS = re.compile(r"[A-Za-z]+(?:[ '\-]+[A-Za-z]+)*")
_NOT_TEXT = {"pi", "oo", "inf", "infty", "infinity", "nan"}  # letters, but math: leave them to math-verify
_SPACING = re.compile(r"\\[,;:! ]|\\left|\\right|\s+")
_PERCENT = re.compile(r"\\?%$")
# words after a number are its unit: "42 dollars", "5 \text{cm}" (not "3 or 4": the words must end the answer)
_UNIT = re.compile(r"(?<=\d)(?:\s*\\(?:text|mbox|mathrm)\{\s*[A-Za-z][A-Za-z /]*\}(?:\^\{?\d\}?)?"
                   r"|\s+[A-Za-z]{2,}(?:\s+[A-Za-z]+)*|\s*(?:\^\{?\\circ\}?|°))$")
_NUM = re.compile(r"(?P<sign>[-+]?)(?:(?P<int>\d{1,3}(?:,\d{3})+|\d+)(?:\.(?P<dec>\d+))?|\.(?P<dec2>\d+)"
                  r"|(?P<num>\d+)/(?P<den>\d+)|\\frac\{(?P<fsign>-?)(?P<fnum>\d+)\}\{(?P<fden>\d+)\}"
                  r"|\\frac(?P<n1>\d)(?P<d1>\d))")
# how a number may be written around its digits: "x = 5", "\approx 5", "\textbf{5}", "1{,}000", a Unicode minus,
# "1.2 \times 10^{5}" / "1.2e5" (an exponent of at most MAX_EXPONENT)
_ASSIGNED = re.compile(r"^(?:[A-Za-z](?:_\{?\w+\}?)?\s*=|\\approx)\s*")
_WRAPPED = re.compile(r"^\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\{([^{}]*)\}$")
_LATEX_SPACE = re.compile(r"\\[,;:! ]|\\q?quad\b|~")
_SCIENTIFIC = re.compile(r"^(?P<m>.+?)(?:\s*(?:\\times|\\cdot)\s*10\s*\^\s*\{?\s*(?P<e>[-+]?\d+)\s*\}?"
                         r"|[eE](?P<e2>[-+]?\d+))$")
MAX_EXPONENT = 300


def _unwrap(s: str) -> str:
    s = s.strip()
    m = _DELIMITED.match(s)
    if m:
        s = next(g for g in m.groups() if g is not None).strip()
    return s


def _norm(s: str) -> str:
    """A canonical spelling for exact comparison: no $ delimiters, spacing, \\left/\\right or trailing period."""
    s = _unwrap(s).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\%", "%")
    return _SPACING.sub("", s).rstrip(".")


def _as_text(s: str) -> str | None:
    """A words-only answer ("Paris", "\\text{New York}") in lower case with single spaces, else None."""
    s = _unwrap(s).rstrip(".").strip()
    m = _TEXT_WRAP.match(s)
    if m:
        s = m.group(1).strip()
    if not _WORDS.fullmatch(s):
        return None
    s = " ".join(s.lower().split())
    if sum(c.isalpha() for c in s) < 2 or s in _NOT_TEXT:
        return None
    return s


def _as_number(s: str) -> tuple[list[Fraction], bool] | None:
    """The values a plain number may mean (two for a percentage: x/100 and x) and whether it is a decimal."""
    if len(s) >= 4000:  # Python refuses int("...") past 4300 digits
        return None
    s = _LATEX_SPACE.sub(" ", _unwrap(s).rstrip(".").strip()).replace("{,}", ",").replace("\u2212", "-")
    s = _ASSIGNED.sub("", s)
    if m := _WRAPPED.match(s):
        s = m.group(1).strip()
    if s.startswith("(") and s.endswith(")") and "," not in s:  # "(18)", not the point "(1,234)"
        s = s[1:-1].strip()
    exponent = 0
    if (m := _SCIENTIFIC.match(s)) and "/" not in m.group("m") and "frac" not in m.group("m"):
        exponent = int(m.group("e") or m.group("e2"))
        if abs(exponent) > MAX_EXPONENT:
            return None
        s = m.group("m")
    s = _norm(_UNIT.sub("", s.rstrip()))
    s = s.removeprefix("\\$")  # a currency sign
    pct = bool(_PERCENT.search(s))
    if pct:
        s = _PERCENT.sub("", s)
    m = _NUM.fullmatch(s)
    if not m:
        return None
    g = m.groupdict()
    decimal = False
    if g["int"] is not None or g["dec2"] is not None:
        dec = g["dec"] if g["int"] is not None else g["dec2"]
        decimal = dec is not None
        value = Fraction((g["int"] or "0").replace(",", "") + ("." + dec if dec else ""))
    else:
        num, den = next((g[a], g[b]) for a, b in (("num", "den"), ("fnum", "fden"), ("n1", "d1")) if g[a])
        if int(den) == 0:
            return None
        value = Fraction(int(num), int(den))
        if g["fsign"] == "-":
            value = -value
    if g["sign"] == "-":
        value = -value
    value *= Fraction(10) ** exponent
    return ([value / 100, value] if pct else [value]), decimal or exponent != 0


def _as_value(s: str) -> tuple[list[Fraction], bool] | None:
    """`_as_number(s)` when `s` is a number written as a value, None when it is arithmetic that a solver would
    have finished: a fraction that is not in lowest terms ("84/12", "\\frac{10}{2}", "7/1"), or anything that is
    not a plain number ("2+3", "17 \\cdot 23", "\\sqrt{49}", "5!")."""
    number = _as_number(s)
    if number is None:
        return None
    fraction = re.search(r"(\d+)/(\d+)|\\frac\{-?(\d+)\}\{(\d+)\}|\\frac(\d)(\d)", _norm(s))
    if fraction:
        num, den = (int(x) for x in fraction.groups() if x is not None)
        if den == 1 or math.gcd(num, den) != 1:
            return None
    return number


REL_TOL = Fraction(1, 10_000)   # a rounded decimal keeps 4 significant digits at least


def _numbers_equal(a: tuple[list[Fraction], bool], b: tuple[list[Fraction], bool]) -> bool:
    """Equal as fractions, or (a decimal may be a rounded fraction) at 6 places, as math-verify compares, and
    within REL_TOL of each other: 6 places alone would take 0 for 0.0000001 (an absolute tolerance)."""
    rounded = a[1] or b[1]
    return any(x == y or rounded and round(x, 6) == round(y, 6) and abs(x - y) <= REL_TOL * max(abs(x), abs(y))
               for x in a[0] for y in b[0])


def _looks_like_prose(s: str) -> bool:
    bare = re.sub(r"\\[A-Za-z]+(?:\{[^{}]*\})?", " ", s)  # LaTeX commands and \text{...} arguments
    return len(re.findall(r"[A-Za-z]{2,}", bare)) >= 2


def _mv_input(s: str) -> str:
    """What math-verify's parse gets: LaTeX in $...$, or prose as is (parse then finds its last expression)."""
    s = _unwrap(s)
    if "$" in s or "\\(" in s or "\\[" in s or _looks_like_prose(s):
        return s
    return f"${s}$"


def fast_equivalent(pred: str, gold: str) -> bool | None:
    """Steps 1-3 of the module docstring: True/False when decided without sympy, None when math-verify must."""
    if _norm(pred) and _norm(pred) == _norm(gold):
        return True
    gold_text = _as_text(gold)
    if gold_text is not None:
        return _as_text(pred) == gold_text
    g = _as_number(gold)
    if g is not None:  # a number is answered by a number, never by arithmetic that evaluates to it
        p = _as_value(pred)
        if p is not None:
            return _numbers_equal(p, g)
        return None  # math-verify reads it ("\\boxed{18}", prose): what it reads must be a number (_verify)
    return None


def verify_pairs(pred: str, gold: str) -> list[tuple[str, str, bool]]:
    """The (pred, gold, value_only) inputs for math-verify: as written, and without the % signs when either has
    one. value_only: the gold is a plain number, so what math-verify reads as the answer must be one too."""
    value_only = _as_number(gold) is not None
    pairs = [(_mv_input(pred), _mv_input(gold), value_only)]
    p, g = _unwrap(pred), _unwrap(gold)
    if _PERCENT.search(p) or _PERCENT.search(g):
        pairs.append((_mv_input(_PERCENT.sub("", p)), _mv_input(_PERCENT.sub("", g)), value_only))
    return pairs


# ------------------------------------------------------------------------------------- the worker processes

def _init_worker() -> None:
    # math-verify warns once that its timeouts are off: here they are, on purpose (the parent times the call)
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    _verify([("$\\frac{1}{2}$", "$0.5$")])  # import sympy and load the LaTeX grammar now, not in a call's timeout


def _verify(pairs: list[tuple]) -> bool:
    """In a worker: does any (pred, gold[, value_only]) pair verify? math-verify's signal timeouts are off (see
    module doc). value_only: the text math-verify extracts as the answer must be a plain number (_as_value),
    not arithmetic it would evaluate ("so the total is 57+32+18")."""
    from math_verify import parse, verify

    for pred, gold, *value_only in pairs:
        g = parse(gold, parsing_timeout=None)
        p = parse(pred, parsing_timeout=None)
        if value_only and value_only[0] and _norm(pred) != _norm(gold):
            read = [x for x in p if isinstance(x, str)]
            if not read or any(_as_value(x) is None for x in read):
                continue
        if g and p and verify(g, p, timeout_seconds=None):
            return True
    return False


def _die_with_parent(parent: int) -> None:
    """In a worker: end when the process that started it ends, even by SIGKILL, even inside a long C call."""
    try:  # the kernel's parent-death signal needs no GIL, so it also stops a worker stuck in sympy's C code
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the watchdog below alone
        pass
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(0)

    def watchdog() -> None:  # where prctl is missing (and a second line where it is not)
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watchdog, daemon=True, name="rlpost-math-watchdog").start()


def _serve(parent: int, calls, replies) -> None:
    """A worker's loop: (fn, args) in from the parent, (ok, result or exception) back, until the pipe closes."""
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in a terminal reaches the whole group: the parent decides
    _init_worker()
    pickle.dump("ready", replies)
    replies.flush()
    while True:
        try:
            fn, args = pickle.load(calls)
        except EOFError:  # the parent closed the pool
            return
        try:
            reply = (True, fn(*args))
        except Exception as e:  # noqa: BLE001 - raised again in the caller
            reply = (False, e)
        try:
            data = pickle.dumps(reply)
        except Exception:  # noqa: BLE001 - an exception that does not pickle goes back as text
            data = pickle.dumps((False, RuntimeError(repr(reply[1]))))
        replies.write(data)
        replies.flush()


# A worker is `python -c` with this code, not a multiprocessing child: it never re-imports the script that
# started it, so a script without an `if __name__ == "__main__":` guard works, and so does `python -`
_BOOT = ("import os, pickle, sys; calls = os.fdopen({calls}, 'rb'); sys.path[:] = pickle.load(calls); "
         "from rlpost.env.math import _serve; _serve({parent}, calls, os.fdopen({replies}, 'wb'))")


class _Spawner:
    """Starts processes from one thread that lives as long as this process. A worker's parent-death signal
    fires when the *thread* that started it ends, and rewards are called from short-lived threads too."""

    def __init__(self):
        self._requests: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        os.register_at_fork(after_in_child=self._forget)  # a forked child has no copy of the thread

    def _forget(self) -> None:
        self._requests, self._thread, self._lock = queue.Queue(), None, threading.Lock()

    def _serve(self) -> None:
        while True:
            args, kwargs, out, done = self._requests.get()
            try:
                out.append(subprocess.Popen(*args, **kwargs))
            except BaseException as e:  # noqa: BLE001 - raised again in the caller
                out.append(e)
            done.set()

    def popen(self, *args, **kwargs) -> subprocess.Popen:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, daemon=True, name="rlpost-math-spawner")
                self._thread.start()
        out, done = [], threading.Event()
        self._requests.put((args, kwargs, out, done))
        done.wait()
        if isinstance(out[0], BaseException):
            raise out[0]
        return out[0]


_SPAWNER = _Spawner()


class _WorkerDied(Exception):
    pass


class _Worker:
    """One verifier process and its two pipes; `call` sends a function and its arguments, waits for the reply."""

    def __init__(self):
        calls_r, calls_w = os.pipe()
        replies_r, replies_w = os.pipe()
        code = _BOOT.format(calls=calls_r, replies=replies_w, parent=os.getpid())
        try:
            self.proc = _SPAWNER.popen([sys.executable, "-c", code], pass_fds=(calls_r, replies_w))
        finally:
            os.close(calls_r)
            os.close(replies_w)
        self._calls, self._replies = os.fdopen(calls_w, "wb"), os.fdopen(replies_r, "rb")
        self._send(list(sys.path))  # what this process imports from, the verify function's module included

    def _send(self, obj) -> None:
        try:
            pickle.dump(obj, self._calls)
            self._calls.flush()
        except (BrokenPipeError, OSError, ValueError) as e:
            raise _WorkerDied(f"verifier worker {self.proc.pid} is gone ({e})") from None

    def _receive(self, timeout_s: float):
        try:  # a ValueError here: close() in another thread closed the pipe under this call
            ready, _, _ = select.select([self._replies], [], [], timeout_s)
            reply = pickle.load(self._replies) if ready else None
        except (EOFError, OSError, ValueError, pickle.UnpicklingError) as e:
            raise _WorkerDied(f"verifier worker {self.proc.pid} died (exit code {self.proc.poll()}): {e!r}") from None
        if not ready:  # (outside the try: TimeoutError is an OSError)
            raise FutureTimeout
        return reply

    def ready(self, timeout_s: float) -> None:
        """Wait until the worker has imported math-verify (raises FutureTimeout, _WorkerDied)."""
        if self._receive(timeout_s) != "ready":
            raise _WorkerDied(f"verifier worker {self.proc.pid} sent something other than 'ready'")

    def call(self, fn, args: tuple, timeout_s: float) -> tuple[bool, object]:
        """(True, fn(*args)) or (False, the exception it raised), from the worker."""
        self._send((fn, args))
        return self._receive(timeout_s)

    def kill(self) -> None:
        self.proc.kill()
        for f in (self._calls, self._replies):
            try:
                f.close()
            except OSError:  # a write buffer that cannot be flushed any more
                pass
        self.proc.wait()


_POOLS: weakref.WeakSet[VerifierPool] = weakref.WeakSet()
_EXITING = False


def _close_pools() -> None:
    global _EXITING
    _EXITING = True
    for pool in list(_POOLS):
        pool.close()


# Registered with threading, so that it runs before the interpreter waits for non-daemon threads: one stuck in
# a call gets its answer (False) when its worker is killed here, instead of after the call's whole timeout
getattr(threading, "_register_atexit", atexit.register)(_close_pools)


class VerifierPool:
    """Runs `verify_fn(pairs)` in up to `workers` processes; a call gets at most `timeout_s` seconds.

    `verify_fn` is `_verify`; it is an attribute so that a test can give the workers a slower module-level
    function and watch the timeout path. Thread-safe: the reward may be called from several threads. A worker
    starts when a call finds none idle (its imports do not count against the call's time) and ends with this
    process, however that ends.
    """

    def __init__(self, workers: int = 2):
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise ValueError(f"math reward: workers must be an integer >= 1, got {workers!r}")
        self.workers = workers
        self.verify_fn = _verify
        self.timeouts = 0
        """calls that ran out of time (scored 0.0)"""
        self.crashes = 0
        """calls whose worker died twice in a row (scored 0.0)"""
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(workers)  # in flight <= workers: timeouts time work, not queueing
        self._idle: list[_Worker] = []
        self._all: set[_Worker] = set()  # idle and busy: what close() kills
        _POOLS.add(self)

    def pids(self) -> list[int]:
        """The worker processes' pids, idle and busy."""
        with self._lock:
            return sorted(w.proc.pid for w in self._all)

    def start(self) -> None:
        """Start the missing workers now, side by side (otherwise each starts when a call first needs it)."""
        for _ in range(self.workers):  # all slots: no call runs meanwhile, so there are never too many workers
            self._slots.acquire()
        try:
            with self._lock:
                if _EXITING:
                    raise RuntimeError("math reward: started while the interpreter exits")
                missing = self.workers - len(self._all)
            started = [self._spawn() for _ in range(missing)]
            for i, worker in enumerate(started):
                try:
                    self._ready(worker)
                except RuntimeError:
                    for other in started[i + 1:]:
                        self._drop(other)
                    raise
                self._give_back(worker)
        finally:
            for _ in range(self.workers):
                self._slots.release()

    def _spawn(self) -> _Worker:
        worker = _Worker()
        with self._lock:
            self._all.add(worker)
        return worker

    def _take(self) -> _Worker:
        with self._lock:
            if _EXITING:
                raise RuntimeError("math reward: called while the interpreter exits")
            if self._idle:
                return self._idle.pop()
        worker = self._spawn()  # every live worker is busy with another slot's call: at most `workers` of them
        self._ready(worker)
        return worker

    def _ready(self, worker: _Worker) -> None:
        try:
            worker.ready(STARTUP_TIMEOUT_S)
        except FutureTimeout:
            self._drop(worker)
            raise RuntimeError(f"math reward: a verifier worker process did not start within "
                               f"{STARTUP_TIMEOUT_S:.0f} s") from None
        except _WorkerDied as e:
            self._drop(worker)
            raise RuntimeError(f"math reward: a verifier worker process failed to start: {e}; its error "
                               f"is printed above") from None

    def _give_back(self, worker: _Worker) -> None:
        with self._lock:
            if worker in self._all:  # not closed while it worked
                self._idle.append(worker)
                return
        worker.kill()

    def _drop(self, worker: _Worker) -> None:
        with self._lock:
            self._all.discard(worker)
        worker.kill()

    def run(self, pairs: list[tuple[str, str]], timeout_s: float) -> bool:
        """Whether any pair verifies; False when the call times out (counted) or its worker keeps dying."""
        with self._slots:
            for _attempt in range(2):
                worker = self._take()
                try:
                    ok, value = worker.call(self.verify_fn, (pairs,), timeout_s)
                except FutureTimeout:
                    # the worker may be stuck in C code for minutes: kill it, a fresh one starts for a later call
                    self._drop(worker)
                    with self._lock:
                        self.timeouts += 1
                    return False
                except _WorkerDied:
                    # close() killed it under us (or it crashed): once more on a fresh one
                    self._drop(worker)
                    if _EXITING:  # killed by the exit hook: no new worker
                        return False
                    continue
                except BaseException:  # interrupted (Ctrl-C) while the worker may still be busy with the call
                    self._drop(worker)
                    raise
                self._give_back(worker)
                if not ok:  # verify_fn raised in the worker (which is fine for more calls)
                    raise value
                return bool(value)
            with self._lock:
                self.crashes += 1
            return False

    def close(self) -> None:
        """Stop the worker processes (a later call starts new ones)."""
        with self._lock:
            workers, self._all, self._idle = list(self._all), set(), []
        for w in workers:
            w.kill()


_default_pool: VerifierPool | None = None
_default_lock = threading.Lock()


def is_equivalent(pred: str, gold: str, timeout_s: float = 5.0) -> bool:
    """Whether the answer `pred` means the same as `gold` (see the module docstring). Cheap cases are decided
    here; the rest in a shared one-process pool, at most `timeout_s` seconds (a timeout is False)."""
    fast = fast_equivalent(pred, gold)
    if fast is not None:
        return fast
    global _default_pool
    with _default_lock:
        if _default_pool is None:
            _default_pool = VerifierPool(workers=1)
    return _default_pool.run(verify_pairs(pred, gold), timeout_s)


# ------------------------------------------------------------------------------------------------- reward

def gold_answer(value) -> str:
    """row["answer"] as an answer string: a number as written, or the boxed / #### part of a full solution.
    "" when there is no answer: an empty value, or a \\boxed{} / "####" marker with nothing in or after it
    (the whole worked solution is no gold a policy could match; `gold_problem` says what is wrong)."""
    s = str(value).strip()
    boxed = _boxed(s) if _BOXED.search(s) else None
    if boxed:
        return boxed
    if "####" in s:
        return _hash(s) or ""
    return "" if _BOXED.search(s) else s


def gold_problem(value) -> str | None:
    """What makes `value` unusable as a gold answer (None: nothing): it is empty, or its last "####" has nothing
    after it on its line, or its \\boxed{} is empty or never closed (and no "####" gives the answer instead)."""
    s = str(value).strip()
    if gold_answer(s):
        return None
    if not s:
        return "is empty"
    if "####" in s:
        return (f"has nothing after its last '####' ({_tail(s)}); GSM8K's form is a worked solution ending in "
                "'#### <answer>': write the answer after it, or drop the row")
    return f"has an empty or unclosed \\boxed{{}} ({_tail(s)}); put the answer in it, or drop the row"


def _tail(s: str, n: int = 40) -> str:
    """The end of a long value, for an error message."""
    return repr(s if len(s) <= n else "..." + s[-n:])


class MathReward(Verifier):
    """(completion, row) -> 1.0 when the completion's extracted answer is equivalent to row[answer_key], else 0.0.

    extract:  "auto" (boxed, hash, answer_is, last_line), one method, or a list tried in order
    timeout_s:  seconds one math-verify call may take; a timeout scores 0.0 and counts in `self.timeouts`
    workers:  processes for math-verify (started on first use)
    answer_key:  the row's field with the gold answer
    max_answer_chars:  a longer extracted answer scores 0.0 (and never reaches sympy)
    fast_path:  decide exact matches, words and plain numbers without math-verify (False: math-verify, except
                that arithmetic answering a plain number is still no answer)
    """

    def __init__(self, *, extract: str | list[str] = "auto", timeout_s: float = 5.0, workers: int = 2,
                 answer_key: str = "answer", max_answer_chars: int = 300, fast_path: bool = True):
        self.methods = resolve_methods(extract)
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
            raise ValueError(f"math reward: timeout_s must be a number > 0, got {timeout_s!r}")
        if not isinstance(max_answer_chars, int) or max_answer_chars < 1:
            raise ValueError(f"math reward: max_answer_chars must be an integer >= 1, got {max_answer_chars!r}")
        self.timeout_s, self.answer_key = float(timeout_s), answer_key
        self.max_answer_chars, self.fast_path = max_answer_chars, bool(fast_path)
        self._pool = VerifierPool(workers)
        self.__qualname__ = "math"  # the name the Reward role reports failures under

    @staticmethod
    def gold_key(answer_key: str = "answer", **_options) -> str:
        """The row's key that holds the gold answer this reward reads (`answer_key`): see verifiers.gold_check."""
        return answer_key

    gold_problem = staticmethod(gold_problem)

    @property
    def timeouts(self) -> int:
        """math-verify calls that ran out of time (each scored 0.0)."""
        return self._pool.timeouts

    def final_answer(self, completion: str) -> str | None:
        """The final answer this reward would read from `completion` (what maj@k votes on)."""
        return extract_answer(completion, self.methods)

    def metrics(self) -> dict[str, float]:
        """Logged by the Reward role each step: math-verify calls that timed out so far."""
        return {"math/timeouts": float(self.timeouts)}

    def __call__(self, completion: str, row: dict) -> float:
        if self.answer_key not in row:
            raise KeyError(f"math reward: the row has no {self.answer_key!r} (answer_key); its keys: {sorted(row)}")
        gold = gold_answer(row[self.answer_key])
        if not gold:
            raise ValueError(f"math reward: row[{self.answer_key!r}] {gold_problem(row[self.answer_key])}")
        pred = extract_answer(completion, self.methods)
        if pred is None or len(pred) > self.max_answer_chars:
            return 0.0
        return float(self.equivalent(pred, gold))

    def equivalent(self, pred: str, gold: str) -> bool:
        """`is_equivalent(pred, gold)` with this reward's options and worker processes."""
        if self.fast_path:
            fast = fast_equivalent(pred, gold)
            if fast is not None:
                return fast
        return self._pool.run(verify_pairs(pred, gold), self.timeout_s)

    def close(self) -> None:
        """Stop the worker processes (a later call starts new ones)."""
        self._pool.close()

    def __repr__(self) -> str:
        return (f"MathReward(extract={list(self.methods)}, timeout_s={self.timeout_s}, workers={self._pool.workers}, "
                f"answer_key={self.answer_key!r})")

    # a pickled reward (sent to another process) carries its options, not the worker processes
    def __getstate__(self) -> dict:
        return {"extract": list(self.methods), "timeout_s": self.timeout_s, "workers": self._pool.workers,
                "answer_key": self.answer_key, "max_answer_chars": self.max_answer_chars,
                "fast_path": self.fast_path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)
