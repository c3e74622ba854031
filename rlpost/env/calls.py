"""Run many calls of user code (environment steps, reward functions) at once, each with a time limit.

    results = call_all([lambda: env.step(text), ...], timeout_s=30, workers=8)
    for r in results: r.value | r.error | r.timed_out

Each call runs in a daemon thread; at most `workers` run at a time. A call that is still running
`timeout_s` after it started is abandoned: its result says `timed_out`, and a fresh thread takes its
place, so one hung call cannot starve the others. Python cannot kill a thread, so an abandoned call
keeps its thread until it returns (if ever); code that may hang for real belongs in a process (the
sandbox) with its own limit. Threads suit calls that wait (a subprocess, an HTTP request); CPU-bound
pure-Python calls still share the interpreter lock.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class CallResult:
    value: Any = None
    error: BaseException | None = None
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and not self.timed_out


def call_all(calls: list[Callable[[], Any]], timeout_s: float | None, workers: int = 8) -> list[CallResult]:
    """Run `calls` (each with no arguments) with at most `workers` at once; results in call order."""
    if workers <= 1 and timeout_s is None:  # nothing to wait for: run inline, in order
        out = []
        for call in calls:
            try:
                out.append(CallResult(value=call()))
            except Exception as e:  # noqa: BLE001 - user code; the caller decides what a failure means
                out.append(CallResult(error=e))
        return out
    results: list[CallResult | None] = [None] * len(calls)
    finished: queue.Queue[int] = queue.Queue()
    started: dict[int, float] = {}

    def work(i: int) -> None:
        try:
            r = CallResult(value=calls[i]())
        except Exception as e:  # noqa: BLE001
            r = CallResult(error=e)
        if results[i] is None:  # not already given up on
            results[i] = r
        finished.put(i)

    next_call, running = 0, set()
    while next_call < len(calls) or running:
        while next_call < len(calls) and len(running) < max(workers, 1):
            started[next_call] = time.monotonic()
            running.add(next_call)
            threading.Thread(target=work, args=(next_call,), daemon=True, name=f"rlpost-call-{next_call}").start()
            next_call += 1
        if timeout_s is None:
            wait = None
        else:
            wait = max(min(started[i] for i in running) + timeout_s - time.monotonic(), 0.0)
        try:
            running.discard(finished.get(timeout=wait))
        except queue.Empty:
            pass
        now = time.monotonic()
        for i in [i for i in running if timeout_s is not None and now - started[i] >= timeout_s]:
            if results[i] is None:
                results[i] = CallResult(timed_out=True)
            running.discard(i)
    return results  # type: ignore[return-value]
