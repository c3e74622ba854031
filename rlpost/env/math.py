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
     agreeing to 6 decimal places is enough (0.333333 == 1/3). Plain means: an integer, a decimal, 1,000-style
     commas, a/b, \\frac{a}{b}, a leading \\$, a trailing %, trailing unit words ("42 dollars", "5 \\text{cm}").
     Steps 1-3 run in this process, in microseconds.
  4. anything else goes to math-verify (parse + verify, gold first) in a worker process: LaTeX
     (\\frac{1}{2}, 2\\sqrt{2} == \\sqrt{8}), sets ({1,2} == {2,1}), intervals ([0,1) != [0,1]), equations
     (x=3 == 3), expressions ((x+1)^2 == x^2+2x+1). An answer without $-signs is wrapped in $...$ so that it is
     read as LaTeX, unless it is prose (two or more words), which math-verify searches for its last expression.
A percentage matches both readings: 50% == 0.5 and 50% == 50 (and 12.5% == 12.5).

Timeouts: sympy can take minutes (\\boxed{9^{9^{9}}}). math-verify's own timeouts use signal.alarm, which fails
outside a main thread, counts whole seconds per parse and per comparison, turns a timeout into a silent False,
and (like any signal) cannot stop a long call into C. So parse+verify runs in a pool of `workers` spawned
processes with math-verify's timeouts off, and the caller waits at most `timeout_s` seconds per call (timed
from when a worker takes it: at most `workers` calls are in flight). A call that runs out scores 0.0, adds
one to `reward.timeouts`, and the pool's processes are killed; calls that were running beside it are retried
on the fresh pool. The pool starts on first use (about 3 s: each worker imports sympy, math-verify and the
`rlpost` package); `close()` stops it, and so does interpreter exit. Like any spawned process, a worker
re-imports the script that started it, so a script must keep its work under `if __name__ == "__main__":`.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import re
import threading
import weakref
from concurrent.futures import ProcessPoolExecutor, wait
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from fractions import Fraction

METHODS = ("boxed", "hash", "answer_is", "last_line", "last_number")
AUTO = ("boxed", "hash", "answer_is", "last_line")
STARTUP_TIMEOUT_S = 120.0  # a fresh worker imports sympy and math-verify; generous on a busy machine

# ---------------------------------------------------------------------------------------------- extraction

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_HASH = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER_IS = re.compile(r"\banswer(?:\s+is\b\s*:?|\s*:)(?:\s|\*)*", re.IGNORECASE)
_HOPE = re.compile(r"\s*I hope it is correct\.?\s*$", re.IGNORECASE)
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
    line = text[last.end():].split("\n", 1)[0]
    return _clean(_HOPE.sub("", line))  # Minerva's "The final answer is $5$. I hope it is correct."


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
_UNIT = re.compile(r"(?<=\d)(?:\s*\\(?:text|mbox|mathrm)\{\s*[A-Za-z][A-Za-z ]*\}|\s+[A-Za-z]{2,}(?:\s+[A-Za-z]+)*)$")
_NUM = re.compile(r"(?P<sign>[-+]?)(?:(?P<int>\d{1,3}(?:,\d{3})+|\d+)(?:\.(?P<dec>\d+))?|\.(?P<dec2>\d+)"
                  r"|(?P<num>\d+)/(?P<den>\d+)|\\frac\{(?P<fnum>\d+)\}\{(?P<fden>\d+)\}|\\frac(?P<n1>\d)(?P<d1>\d))")


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
    s = _norm(_UNIT.sub("", _unwrap(s).rstrip(".").rstrip()))
    s = s.removeprefix("\\$")  # a currency sign
    pct = bool(_PERCENT.search(s))
    if pct:
        s = _PERCENT.sub("", s)
    m = _NUM.fullmatch(s) if len(s) < 4000 else None  # Python refuses int("...") past 4300 digits
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
    if g["sign"] == "-":
        value = -value
    return ([value / 100, value] if pct else [value]), decimal


def _numbers_equal(a: tuple[list[Fraction], bool], b: tuple[list[Fraction], bool]) -> bool:
    rounded = a[1] or b[1]  # a decimal may be a rounded fraction: compare at 6 places, as math-verify does
    return any(x == y or rounded and round(x, 6) == round(y, 6) for x in a[0] for y in b[0])


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
    p, g = _as_number(pred), _as_number(gold)
    if p is not None and g is not None:
        return _numbers_equal(p, g)
    return None


def verify_pairs(pred: str, gold: str) -> list[tuple[str, str]]:
    """The (pred, gold) inputs for math-verify: as written, and without the % signs when either has one."""
    pairs = [(_mv_input(pred), _mv_input(gold))]
    p, g = _unwrap(pred), _unwrap(gold)
    if _PERCENT.search(p) or _PERCENT.search(g):
        pairs.append((_mv_input(_PERCENT.sub("", p)), _mv_input(_PERCENT.sub("", g))))
    return pairs


# ------------------------------------------------------------------------------------- the worker processes

def _init_worker() -> None:
    # math-verify warns once that its timeouts are off: here they are, on purpose (the parent times the call)
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    _verify([("$\\frac{1}{2}$", "$0.5$")])  # import sympy and load the LaTeX grammar now, not in a call's timeout


def _ready() -> bool:
    return True


def _verify(pairs: list[tuple[str, str]]) -> bool:
    """In a worker: does any (pred, gold) pair verify? math-verify's signal timeouts are off (see module doc)."""
    from math_verify import parse, verify

    for pred, gold in pairs:
        g = parse(gold, parsing_timeout=None)
        p = parse(pred, parsing_timeout=None)
        if g and p and verify(g, p, timeout_seconds=None):
            return True
    return False


_POOLS: weakref.WeakSet[VerifierPool] = weakref.WeakSet()
_EXITING = False


def _close_pools() -> None:
    global _EXITING
    _EXITING = True
    for pool in list(_POOLS):
        pool.close()


# Registered like concurrent.futures' own exit hook, and after it, so this one runs first: that hook waits for
# running calls to finish, which for a stuck call is its whole timeout
getattr(threading, "_register_atexit", atexit.register)(_close_pools)


class VerifierPool:
    """Runs `verify_fn(pairs)` in `workers` spawned processes; a call gets at most `timeout_s` seconds.

    `verify_fn` is `_verify`; it is an attribute so that a test can give the workers a slower module-level
    function and watch the timeout path. Thread-safe: the reward may be called from several threads.
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
        self._executor: ProcessPoolExecutor | None = None
        _POOLS.add(self)

    def _get(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._executor is None:
                if _EXITING:
                    raise RuntimeError("math reward: called while the interpreter exits")
                ex = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_init_worker)
                # one task per worker starts them all (3.11 spawns a process per submit while none is idle),
                # so their imports happen here and not inside a call's timeout
                done, pending = wait([ex.submit(_ready) for _ in range(self.workers)], timeout=STARTUP_TIMEOUT_S)
                if pending:
                    _kill(ex)
                    raise RuntimeError(f"math reward: {self.workers} verifier worker process(es) did not start "
                                       f"within {STARTUP_TIMEOUT_S:.0f} s")
                for f in done:
                    f.result()
                self._executor = ex
            return self._executor

    def _drop(self, ex: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._executor is ex:
                self._executor = None
        _kill(ex)

    def run(self, pairs: list[tuple[str, str]], timeout_s: float) -> bool:
        """Whether any pair verifies; False when the call times out (counted) or its worker keeps dying."""
        with self._slots:
            for _attempt in range(2):
                ex = self._get()
                try:
                    future = ex.submit(self.verify_fn, pairs)
                    return bool(future.result(timeout=timeout_s))
                except FutureTimeout:
                    # the worker may be stuck in C code for minutes: kill the whole pool, a fresh one starts next call
                    self._drop(ex)
                    with self._lock:
                        self.timeouts += 1
                    return False
                except BrokenProcessPool:
                    # another call's timeout killed this pool under us (or a worker died): once more on a fresh one
                    self._drop(ex)
                    if _EXITING:  # killed by the exit hook: no new pool
                        return False
            with self._lock:
                self.crashes += 1
            return False

    def close(self) -> None:
        """Stop the worker processes (a later call starts new ones)."""
        with self._lock:
            ex, self._executor = self._executor, None
        if ex is not None:
            _kill(ex)


def _kill(ex: ProcessPoolExecutor) -> None:
    # ProcessPoolExecutor cannot stop a running task (terminate_workers() comes in Python 3.14); its process
    # table is the only handle on the workers
    procs = list((getattr(ex, "_processes", None) or {}).values())
    for p in procs:
        p.kill()
    ex.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        p.join(timeout=5)


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
    """row["answer"] as an answer string: a number as written, or the boxed / #### part of a full solution."""
    s = str(value).strip()
    if _BOXED.search(s):
        s = _boxed(s) or s
    elif "####" in s:
        s = _hash(s) or s
    return s


class MathReward:
    """(completion, row) -> 1.0 when the completion's extracted answer is equivalent to row[answer_key], else 0.0.

    extract:  "auto" (boxed, hash, answer_is, last_line), one method, or a list tried in order
    timeout_s:  seconds one math-verify call may take; a timeout scores 0.0 and counts in `self.timeouts`
    workers:  processes for math-verify (started on first use)
    answer_key:  the row's field with the gold answer
    max_answer_chars:  a longer extracted answer scores 0.0 (and never reaches sympy)
    fast_path:  decide exact matches, words and plain numbers without math-verify (False: always math-verify)
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
            raise ValueError(f"math reward: row[{self.answer_key!r}] is empty")
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
