"""Kill what a process started when that process is SIGKILLed: a small watcher process beside it.

    reaper = Reaper.start()     # from now on, the caller's descendants are recorded
    ...                         # e.g. ray.init(): gcs_server, raylet, agents, workers
    reaper.stop()               # a normal end: nothing is killed

A SIGKILLed process runs no cleanup, and not every process it started goes down with it: a local Ray's
dashboard and runtime-env agents outlive their driver by about a minute (their code retries reporting the
raylet's death to the GCS, which is gone too). The reaper is a separate process (this file run as a script,
standard library only, in a session of its own so that Ctrl-C and a process-group kill do not reach it).
Every `POLL_S` seconds it lists the caller's descendants from /proc and remembers them with their start
times (pids are reused); when the caller dies without `stop()` (its parent pid changes, or its end of the
reaper's stdin closes without a "stop" on it) it SIGKILLs every remembered process still alive and exits.
`stop()` says "stop", and the reaper exits without killing anything. Linux only (/proc): elsewhere
`start()` returns None.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys

POLL_S = 0.5


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time) of `pid` from /proc/PID/stat, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    return fields[0], int(fields[1]), int(fields[19])


def _children() -> dict[int, list[tuple[int, int]]]:
    """{ppid: [(pid, start time), ...]} of every process (parent links in /proc)."""
    children: dict[int, list[tuple[int, int]]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (st := _stat(int(name))) is not None:
            children.setdefault(st[1], []).append((int(name), st[2]))
    return children


def descendants(roots: list[int], children: dict[int, list[tuple[int, int]]] | None = None) -> dict[int, int]:
    """{pid: start time} of every process below `roots`."""
    children = _children() if children is None else children
    found, todo = {}, list(roots)
    while todo:
        for pid, start in children.get(todo.pop(), []):
            if pid not in found:
                found[pid] = start
                todo.append(pid)
    return found


def _alive(pid: int, start: int) -> bool:
    st = _stat(pid)
    return st is not None and st[2] == start and st[0] not in ("Z", "X")


def watch(parent: int, stop_fd: int = 0) -> int:
    """The reaper's loop (in the reaper process): record `parent`'s descendants until `parent` says "stop" on
    `stop_fd` (return 0, nothing killed) or dies (kill every recorded process still alive, return how many)."""
    me, seen = os.getpid(), {}
    while os.getppid() == parent:
        seen = {pid: start for pid, start in seen.items() if _alive(pid, start)}
        seen.update(descendants([parent]))
        seen.pop(me, None)
        ready, _, _ = select.select([stop_fd], [], [], POLL_S)
        if ready:
            said = os.read(stop_fd, 64)
            if said.startswith(b"stop"):
                return 0
            if not said:  # closed without a stop: the parent is exiting, or was killed
                break
    # and what started since the last look, below a process seen
    late = {pid: start for pid, start in descendants(list(seen)).items() if pid != me}
    killed = 0
    for pid, start in {**seen, **late}.items():
        if _alive(pid, start):
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
    return killed


class Reaper:
    """Handle on a running reaper process (see the module docstring)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc

    @classmethod
    def start(cls) -> Reaper | None:
        """Start a reaper for this process; None where /proc is missing (not Linux)."""
        if not os.path.isdir(f"/proc/{os.getpid()}"):
            return None
        proc = subprocess.Popen([sys.executable, "-I", "-S", os.path.abspath(__file__), str(os.getpid())],
                                stdin=subprocess.PIPE, start_new_session=True, close_fds=True)
        return cls(proc)

    def stop(self) -> None:
        """End the reaper without killing anything (this process shuts down what it started itself)."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(b"stop\n")
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a stray Ctrl-C or SIGTERM must not leave the caller unguarded
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    watch(int(sys.argv[1]))
