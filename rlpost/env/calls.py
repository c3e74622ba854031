"""Run many calls of user code (environment steps, reward functions) at once, each with a time limit.

    results = call_all([lambda: env.step(text), ...], timeout_s=30, workers=8)
    for r in results: r.value | r.error | r.timed_out

`workers` daemon threads take the calls in order. A call that is still running `timeout_s` after it
started is abandoned: its result says `timed_out`, and a fresh thread takes its worker's place, so one
hung call cannot starve the others. Python cannot kill a thread, so an abandoned call keeps its thread
until it returns (if ever); what it returns then is dropped, never written into these results or any
later ones, and the thread ends. The threads are daemons, so one that never returns does not keep the
interpreter from exiting (a ThreadPoolExecutor's exit hook would wait for it forever). Code that may
hang for real belongs in a process (the sandbox) with its own limit. Threads suit calls that wait (a
subprocess, an HTTP request); CPU-bound pure-Python calls still share the interpreter lock.

With `stop_on_failure`, the first call that raises or times out ends the lot: no further call starts,
calls still running are abandoned, and every call without a result says `cancelled`. For callers that
stop at the first failure anyway (on_error=raise), so that they stop one timeout after it, not after
every remaining call has had its own.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable


_hung = 0                        # abandoned calls whose threads are still running, in this process
_hung_lock = threading.Lock()


def hung_calls() -> int:
    """How many abandoned calls (timed out, or cancelled while running) have not returned yet: each holds a
    thread that nothing can stop, so a caller that keeps abandoning calls can watch this grow."""
    return _hung


def _count_hung(n: int) -> None:
    global _hung
    with _hung_lock:
        _hung += n


@dataclass
class CallResult:
    value: Any = None
    error: BaseException | None = None
    timed_out: bool = False
    cancelled: bool = False   # never run to the end: another call failed first (stop_on_failure)

    @property
    def ok(self) -> bool:
        return self.error is None and not self.timed_out and not self.cancelled


class _Worker:
    """One thread's state, guarded by call_all's lock: the call it runs (None: idle) and since when."""

    def __init__(self):
        self.index: int | None = None
        self.started = 0.0
        self.abandoned = False


def call_all(calls: list[Callable[[], Any]], timeout_s: float | None, workers: int = 8,
             stop_on_failure: bool = False) -> list[CallResult]:
    """Run `calls` (each with no arguments) with at most `workers` at once; results in call order."""
    if workers <= 1 and timeout_s is None:  # nothing to wait for: run inline, in order
        out = []
        for call in calls:
            if stop_on_failure and out and not out[-1].ok:
                out.append(CallResult(cancelled=True))
                continue
            try:
                out.append(CallResult(value=call()))
            except Exception as e:  # noqa: BLE001 - user code; the caller decides what a failure means
                out.append(CallResult(error=e))
        return out
    results: list[CallResult | None] = [None] * len(calls)
    todo = deque(range(len(calls)))
    lock = threading.Lock()          # guards results, todo, each _Worker and `stopped`
    finished: queue.Queue[None] = queue.Queue()   # wakes the waiting caller after each call
    stopped = False

    def work(me: _Worker) -> None:
        nonlocal stopped
        while True:
            i = me.index
            try:
                r = CallResult(value=calls[i]())
            except Exception as e:  # noqa: BLE001
                r = CallResult(error=e)
            with lock:
                if me.abandoned:  # given up on: the late result goes nowhere, and this thread ends
                    _count_hung(-1)
                    return
                results[i] = r
                stopped = stopped or (stop_on_failure and not r.ok)
                take(me)  # in the same locked step, so a live worker is never seen idle with calls left
            finished.put(None)
            if me.index is None:
                return

    def take(w: _Worker) -> None:
        w.index, w.started = (None, 0.0) if stopped or not todo else (todo.popleft(), time.monotonic())

    def start() -> _Worker:
        w = _Worker()
        take(w)
        threading.Thread(target=work, args=(w,), daemon=True, name=f"rlpost-call-{w.index}").start()
        return w

    with lock:
        live = [start() for _ in range(min(max(workers, 1), len(calls)))]
    while True:
        with lock:
            now = time.monotonic()
            for w in [w for w in live if w.index is not None and timeout_s is not None
                      and now - w.started >= timeout_s]:
                results[w.index], w.abandoned = CallResult(timed_out=True), True
                _count_hung(1)
                live.remove(w)
                stopped = stopped or stop_on_failure
                if todo and not stopped:
                    live.append(start())
            if stopped:  # nothing more starts; what is running is given up on
                for w in live:
                    if w.index is not None and not w.abandoned:
                        _count_hung(1)
                    w.abandoned = True
                for i, r in enumerate(results):
                    results[i] = r or CallResult(cancelled=True)
            if all(r is not None for r in results):
                return results  # type: ignore[return-value]
            busy = [w.started + timeout_s for w in live if w.index is not None] if timeout_s is not None else []
            wait = max(min(busy) - now, 0.0) if busy else None
        try:
            finished.get(timeout=wait)
        except queue.Empty:
            pass
