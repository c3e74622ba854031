"""The sandbox (rlpost/sandbox.py) against hostile programs, and on ordinary ones.

Each hostile case runs a real program in a real sandbox and checks that the run ends within its limit
(an upper bound with generous slack only), is not ok and says why, scores 0 with the `code` reward, and
leaves the host as it was: the test's files and environment, a victim process, a TCP server on
127.0.0.1 that no one reached, and no process of the run left.

`python tests/test_sandbox.py` prints the table "case -> outcome (reason), seconds".
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rlpost import sandbox
from rlpost.env.code import CodeReward

SLACK_S = 15.0  # upper bounds only: a loaded machine may be slow, a PASS never depends on being fast


@dataclass
class Case:
    name: str
    code: str
    reasons: tuple[str, ...]  # acceptable outcomes
    options: dict = field(default_factory=dict)
    limit_s: float = 5.0  # the run's wall-clock limit (timeout_s, also for the reward)
    check: str = ""  # a name from CHECKS, run on the result too


class Host:
    """What the hostile programs aim at: a secret file and a victim file outside the sandbox (one not
    visible there at all, one in a read-only directory the sandbox shows), a secret environment
    variable, a victim process, a TCP server on 127.0.0.1 and two 0777 unix sockets (stream and
    datagram) in a folder the sandbox shows, each counting what reaches it."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.secret = secrets.token_hex(16)
        self.secret_path = tmp / "secret.txt"
        self.victim_path = tmp / "victim.txt"
        self.new_path = tmp / "created_by_sandbox.txt"
        # a python prefix the sandbox binds read-only: its files are visible inside, so the uid and the
        # read-only mount must keep them safe (the interpreter is a link to the real one)
        self.prefix = tmp / "prefix"
        (self.prefix / "bin").mkdir(parents=True)
        self.python = self.prefix / "bin" / "python"
        self.python.symlink_to(os.path.realpath(sys.executable))
        self.visible_secret = self.prefix / "secret.txt"
        self.visible_victim = self.prefix / "victim.txt"
        for path in (self.secret_path, self.visible_secret):
            path.write_text(self.secret)
            path.chmod(0o600)
        for path in (self.victim_path, self.visible_victim):
            path.write_text("intact")
        self.files_before = self.snapshot()
        self.env_before = dict(os.environ)
        os.environ["RLPOST_SANDBOX_SECRET"] = self.secret
        self.victim = subprocess.Popen(["sleep", "600"])
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(8)
        self.port = self.server.getsockname()[1]
        self.connections = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as c:  # the server does answer
            assert c.recv(4) == b"pong"
        # Unix sockets that anyone may use, in the prefix the sandbox binds read-only (connect() and sendto()
        # need no write access). Bound through an fd of the folder: its path may pass AF_UNIX's 108 bytes.
        self.unix_server = socket.socket(socket.AF_UNIX)
        self.unix_dgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        fd = os.open(self.prefix, os.O_PATH)
        try:
            self.unix_server.bind(f"/proc/self/fd/{fd}/unix.sock")
            self.unix_dgram.bind(f"/proc/self/fd/{fd}/unix.dgram")
            for name in ("unix.sock", "unix.dgram"):
                (self.prefix / name).chmod(0o777)
            self.unix_server.listen(8)
            threading.Thread(target=self._serve, args=(self.unix_server,), daemon=True).start()
            threading.Thread(target=self._serve_dgram, daemon=True).start()
            with socket.socket(socket.AF_UNIX) as c:  # both answer the host
                c.connect(f"/proc/self/fd/{fd}/unix.sock")
                assert c.recv(4) == b"pong"
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as c:
                c.sendto(b"ping", f"/proc/self/fd/{fd}/unix.dgram")
        finally:
            os.close(fd)
        deadline = time.monotonic() + SLACK_S
        while self.connections < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.connections == 3, "the host's own servers did not answer it"
        self.connections = 0
        self.procs_before = sandbox_processes()

    def _serve(self, server=None):
        while True:
            try:
                conn, _ = (server or self.server).accept()
            except OSError:
                return
            self.connections += 1
            conn.sendall(b"pong")
            conn.close()

    def _serve_dgram(self):
        while self.unix_dgram.recv(64):
            self.connections += 1

    def snapshot(self) -> dict[str, bytes]:
        return {str(p): p.read_bytes() for p in sorted(self.tmp.rglob("*")) if p.is_file() and not p.is_symlink()}

    def fmt(self, code: str) -> str:
        return textwrap.dedent(code).format(
            port=self.port, test_pid=os.getpid(), victim_pid=self.victim.pid, secret_path=self.secret_path,
            visible_secret=self.visible_secret, victim_path=self.victim_path, visible_victim=self.visible_victim,
            new_path=self.new_path, prefix=self.prefix)

    def assert_unchanged(self):
        assert self.snapshot() == self.files_before
        assert not self.new_path.exists() and not os.path.exists("/etc/rlpost_sandbox_probe")
        assert os.environ.get("RLPOST_SANDBOX_SECRET") == self.secret
        assert self.victim.poll() is None, "the victim process was killed"
        assert self.connections == 0, "the sandbox reached the host's 127.0.0.1 server or unix sockets"
        left = wait_for_no_leftovers(self.procs_before)
        assert left == set(), f"processes of the run are left: {left}"

    def close(self):
        for server in (self.server, self.unix_server, self.unix_dgram):
            try:
                server.shutdown(socket.SHUT_RDWR)  # wakes its thread
            except OSError:
                pass
            server.close()
        self.victim.kill()
        self.victim.wait()
        os.environ.clear()
        os.environ.update(self.env_before)


def sandbox_processes() -> set[tuple[int, bytes]]:
    """Processes that look like a sandbox's of this checkout: the launcher, a process in another PID
    namespace whose init (a fork of the launcher) runs this file, or one with a sandbox uid (unsandboxed)
    below such a launcher or below none. Other checkouts' runs on the same host are not counted; a
    namespace whose init is gone is being torn down by the kernel."""
    mine, launcher = os.readlink("/proc/self/ns/pid"), sandbox.__file__.encode()
    procs, inits, parents, cmds = [], {}, {}, {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            ns = os.readlink(f"/proc/{pid}/ns/pid")
            with open(f"/proc/{pid}/status") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        uid, parents[int(pid)], cmds[int(pid)] = int(status["Uid"].split()[0]), int(status["PPid"]), cmd
        procs.append((int(pid), ns, uid, cmd))
        if ns != mine and status.get("NSpid", "").split()[-1:] == ["1"]:
            inits[ns] = cmd

    def launched_here(pid: int) -> bool:  # the nearest launcher (or init) above runs this file, or there is none
        for _ in range(64):
            pid = parents.get(pid, 0)
            if b"sandbox.py" in cmds.get(pid, b""):
                return launcher in cmds[pid]
        return True

    return {(pid, cmd) for pid, ns, uid, cmd in procs
            if launcher in cmd or (ns != mine and launcher in inits.get(ns, b""))
            or (ns == mine and sandbox.UID_RANGE[0] <= uid < sandbox.UID_RANGE[1] and launched_here(pid))}


def wait_for_no_leftovers(before, wait_s=0.0) -> set:
    """The run's processes still alive (none are expected: run() returns after they are gone)."""
    left = sandbox_processes() - before
    deadline = time.monotonic() + wait_s
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = sandbox_processes() - before
    return left


ORDINARY = [
    Case("hello world", 'print("hello")', ("ok",), check="hello"),
    Case("stdin echo", "import sys; print(sys.stdin.read().upper(), end='')", ("ok",),
         {"stdin": "abc\ndef\n"}, check="echo"),
    Case("1 MB stdin", "import sys; print(len(sys.stdin.read()))", ("ok",),  # after 100 kB of files on the same pipe
         {"stdin": "x" * 10**6, "files": {"pad.bin": b"\0" * 10**5}}, check="big_stdin"),
    Case("files passed in", """
        import helper
        print(helper.VALUE + 1, open("data/in.txt").read(), open("blob.bin", "rb").read().hex())
        open("out.txt", "w").write("mine")  # the sandbox's own directory is writable
        print(open("out.txt").read(), __import__("os").getcwd() == __import__("os").environ["HOME"])
        """, ("ok",), {"files": {"helper.py": "VALUE = 41\n", "data/in.txt": "hi", "blob.bin": b"\x00\xff"}},
         check="files"),
    Case("nonzero exit", "raise SystemExit(3)", ("exit_nonzero",), check="rc3"),
    Case("asyncio, multiprocessing.Pipe", """
        import asyncio, multiprocessing, socket
        async def main():
            await asyncio.sleep(0.01)
            return "async"
        a, b = multiprocessing.Pipe()
        a.send("pipe")
        print(asyncio.run(main()), b.recv(), socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)[0].family.name)
        """, ("ok",), check="socketpair"),
    Case("syntax error", "def f(:\n    pass", ("exit_nonzero",), check="syntax"),
]

HOSTILE = [
    Case("fork bomb", """
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
        """, ("timeout",), {"max_processes": 16}, limit_s=1.0),
    Case("memory hog (one block)", "x = bytearray(8 * 1024**3)\nprint('pwned')", ("memory_limit",),
         {"memory_mb": 256}),
    Case("memory hog (growing)", "chunks = []\nwhile True:\n    chunks.append(bytearray(16 * 1024**2))",
         ("memory_limit",), {"memory_mb": 256}),
    Case("infinite loop", "while True:\n    pass", ("timeout",), limit_s=1.0),
    Case("cpu limit", "while True:\n    pass", ("cpu_limit",), {"cpu_s": 1}, limit_s=30.0),
    Case("sleep forever", "import time\ntime.sleep(10**6)", ("timeout",), limit_s=1.0),
    Case("network to host 127.0.0.1", """
        import socket
        s = socket.create_connection(("127.0.0.1", {port}), timeout=1)
        print(s.recv(4).decode())
        """, ("exit_nonzero",), check="no_network"),
    Case("unix sockets in a folder the sandbox shows", """
        import os, socket
        os.chdir("{prefix}")
        try:  # a datagram pair could sendto() any socket by path
            socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)[0].sendto(b"pwned", "unix.dgram")
        except OSError as e:
            print("dgram pair", repr(e))
        a, b = socket.socketpair()  # a stream pair is allowed: connected at birth, it connects nowhere else
        b.close()
        try:
            a.connect("unix.sock")
        except OSError as e:
            print("stream pair", repr(e))
        s = socket.socket(socket.AF_UNIX)
        s.connect("unix.sock")
        print(s.recv(4).decode())
        """, ("exit_nonzero",), check="no_unix"),
    Case("socket families no namespace confines, io_uring", """
        import ctypes, socket
        for name, kind in (("AF_VSOCK", "SOCK_STREAM"), ("AF_PACKET", "SOCK_DGRAM"), ("AF_NETLINK", "SOCK_RAW"),
                           ("AF_ALG", "SOCK_SEQPACKET"), ("AF_UNIX", "SOCK_STREAM")):
            try:
                socket.socket(getattr(socket, name), getattr(socket, kind)).close()
                print(name, "pwned")
            except OSError as e:
                print(name, e.errno)
        libc = ctypes.CDLL(None, use_errno=True)
        params = ctypes.create_string_buffer(120)
        print("io_uring_setup", libc.syscall(425, 8, params), ctypes.get_errno())  # 425 on x86_64 and aarch64
        raise SystemExit(1)
        """, ("exit_nonzero",), check="refused"),
    *([Case("x32 system call (a bypass of the filter's numbers)", """
        import ctypes
        print(ctypes.CDLL(None).syscall(0x40000000 | 39), "pwned")  # x32's getpid
        """, ("killed_by_signal",), check="sigsys")] if os.uname().machine == "x86_64" else []),
    Case("read host env", """
        import glob, os
        found = dict(os.environ)
        for path in ["/proc/1/environ", "/proc/{test_pid}/environ", *glob.glob("/proc/*/environ")]:
            try:
                found[path] = open(path, "rb").read().decode(errors="replace")
            except OSError as e:
                found[path] = repr(e)
        print(found)
        print(os.environ["RLPOST_SANDBOX_SECRET"])
        """, ("exit_nonzero",), check="no_secret"),
    Case("read host files", """
        for path in ["{secret_path}", "{visible_secret}", "/proc/{test_pid}/root{secret_path}",
                     "/proc/1/root{secret_path}", "/proc/{test_pid}/cwd/secret.txt"]:
            try:
                print(open(path).read())
            except OSError as e:
                print(path, repr(e))
        print(open("{visible_secret}").read())
        """, ("exit_nonzero",), check="no_secret"),
    Case("write host files", """
        for path in ["{victim_path}", "{visible_victim}", "/etc/rlpost_sandbox_probe", "{new_path}"]:
            try:
                open(path, "w").write("pwned")
            except OSError as e:
                print(path, repr(e))
        open("{visible_victim}", "a").write("pwned")
        """, ("exit_nonzero",)),
    Case("delete host files", """
        import os, shutil
        for path in ["{victim_path}", "{visible_victim}"]:
            try:
                os.remove(path)
            except OSError as e:
                print(path, repr(e))
        shutil.rmtree("{prefix}", ignore_errors=True)
        os.remove("{visible_victim}")
        """, ("exit_nonzero",)),
    Case("stdout flood", "while True:\n    print('x' * 1000)", ("output_limit",), {"max_output_bytes": 10_000},
         check="capped"),
    Case("stderr flood", "import sys\nwhile True:\n    sys.stderr.write('y' * 1000)", ("output_limit",),
         {"max_output_bytes": 10_000}, check="capped"),
    Case("file too big", "open('big', 'wb').write(b'x' * 8 * 1024**2)", ("file_limit",), {"max_file_mb": 1}),
    Case("disk fill", "for i in range(100):\n    open(f'f{{i}}', 'wb').write(b'x' * 1024**2)",
         ("exit_nonzero",), {"disk_mb": 8, "max_file_mb": 4}, check="no_space"),
    Case("signal parent and host", """
        import os, signal
        for pid in ({test_pid}, {victim_pid}, -1):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError as e:
                print(pid, repr(e))
        os.kill(os.getppid(), signal.SIGKILL)
        print("pwned")
        """, ("exit_nonzero", "killed_by_signal")),
    Case("daemon outlives main (main exits 0)", """
        import os, signal, time
        r, w = os.pipe()
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                signal.signal(signal.SIGHUP, signal.SIG_IGN)
                print("daemon started", flush=True)
                os.write(w, b"1")
                time.sleep(60)
                print("pwned", flush=True)
            os._exit(0)
        os.read(r, 1)
        """, ("ok",), limit_s=2.0, check="daemon"),
    Case("daemon outlives main (main sleeps)", """
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(60)
                print("pwned", flush=True)
            os._exit(0)
        time.sleep(60)
        """, ("timeout",), limit_s=1.0),
]

CHECKS = {
    "hello": lambda r, h: r.stdout == "hello\n" and r.returncode == 0 and r.stderr == "",
    "echo": lambda r, h: r.stdout == "ABC\nDEF\n",
    "big_stdin": lambda r, h: r.stdout == "1000000\n",
    "files": lambda r, h: r.stdout == "42 hi 00ff\nmine True\n",
    "rc3": lambda r, h: r.returncode == 3,
    "syntax": lambda r, h: r.returncode == 1 and "SyntaxError" in r.stderr,
    "no_network": lambda r, h: "unreachable" in r.stderr and "pong" not in r.stdout,
    "no_secret": lambda r, h: h.secret not in r.stdout + r.stderr,
    "capped": lambda r, h: len(r.stdout) <= 10_000 and len(r.stderr) <= 10_000,
    "no_space": lambda r, h: "No space left on device" in r.stderr,
    "daemon": lambda r, h: r.stdout == "daemon started\n",
    "socketpair": lambda r, h: r.stdout == "async pipe AF_UNIX\n",
    "no_unix": lambda r, h: (r.stdout.count("PermissionError") == 1 and "Transport endpoint is already connected"
                             in r.stdout and r.stderr.rstrip().endswith("PermissionError: [Errno 13] Permission "
                                                                         "denied") and "pong" not in r.stdout),
    "refused": lambda r, h: r.stdout.split("\n") == [
        "AF_VSOCK 13", "AF_PACKET 13", "AF_NETLINK 13", "AF_ALG 13", "AF_UNIX 13", "io_uring_setup -1 13", ""],
    "sigsys": lambda r, h: r.returncode == -signal.SIGSYS and r.stdout == "",
}


def run_case(case: Case, host: Host) -> sandbox.SandboxResult:
    options = {"python": str(host.python), **case.options}
    return sandbox.run(host.fmt(case.code), timeout_s=case.limit_s, **options)


@pytest.fixture
def host(tmp_path):
    h = Host(tmp_path)
    yield h
    h.close()


@pytest.mark.parametrize("case", ORDINARY, ids=[c.name for c in ORDINARY])
def test_ordinary_programs(case, host):
    result = run_case(case, host)
    assert result.reason in case.reasons, result
    assert result.ok == (result.reason == "ok")
    assert CHECKS[case.check](result, host), result
    host.assert_unchanged()


@pytest.mark.parametrize("case", HOSTILE, ids=[c.name for c in HOSTILE])
def test_hostile_programs(case, host):
    result = run_case(case, host)
    assert result.reason in case.reasons, result
    assert result.wall_s < case.limit_s + SLACK_S
    if case.reasons != ("ok",):
        assert not result.ok and result.reason != "ok"
    if case.check:
        assert CHECKS[case.check](result, host), result
    host.assert_unchanged()
    score = CodeReward(timeout_s=min(case.limit_s, 2.0), memory_mb=case.options.get("memory_mb", 512))
    assert score(f"```python\n{host.fmt(case.code)}\n```", {"tests": [{"input": "", "output": "pwned"}]}) == 0.0
    host.assert_unchanged()


@pytest.fixture
def private_tmp(tmp_path, monkeypatch) -> Path:
    """An empty temp dir for this test's runs (the host's is shared with other runs)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_the_run_directory_is_removed(private_tmp):
    assert sandbox.run("open('x', 'w').write('y' * 1000)").ok
    assert sandbox.run("pass", files={"big": b"x" * 2 * 1024**2}, disk_mb=1).reason == "sandbox_error"
    assert list(private_tmp.iterdir()) == []


def test_an_unknown_machine_is_refused(monkeypatch):
    """Without system call numbers for the machine there is no seccomp filter, and no run."""
    monkeypatch.setattr(sandbox, "SECCOMP_ARCHES", {})
    with pytest.raises(OSError, match="no seccomp filter for this machine"):
        sandbox._arch()


def test_bad_options_are_refused(private_tmp):
    for kwargs, words in (({"timeout_s": 0}, "timeout_s"), ({"files": {"../x": ""}}, "'../x'"),
                          ({"files": {"main.py": ""}}, "'main.py'"), ({"python": "/no/such/python"}, "python"),
                          ({"files": {".": ""}}, "'.'"), ({"files": {"a/./b": ""}}, "'a/./b'"),
                          ({"files": {"a/": ""}}, "'a/'"), ({"files": {"a\0b": ""}}, "NUL"),
                          ({"files": {"a": "", "a/b": ""}}, "'a/b' collides with the file 'a'"),
                          ({"files": {"d/e/f": "", "d/e": ""}}, "'d/e/f' collides with the file 'd/e'"),
                          ({"files": {"main.py/x": ""}}, "collides with the file 'main.py'"),
                          ({"files": {"x" * 256: ""}}, "longer than 255 bytes"),
                          ({"files": {"x": 3}}, "str or bytes, not int")):
        with pytest.raises(ValueError, match=re.escape(words)):
            sandbox.run("pass", **kwargs)
    assert list(private_tmp.iterdir()) == []


def test_start_runs_in_the_same_sandbox_as_run(private_tmp):
    """start() launches exactly as run() does: the same root, PID namespace and seccomp filter, files through
    the launcher's stdin, nothing in the host's temp dir."""
    probe = ("import os, socket\ntry:\n    socket.socket(socket.AF_UNIX)\nexcept OSError as e:\n"
             "    print('unix', e.errno)\nprint(os.getpid(), sorted(os.listdir('/')), open('in/x.txt').read())")
    files = {"in/x.txt": "x" * 100_000}
    with sandbox.start(probe, timeout_s=10, files=files) as proc:
        out = proc.stdout.read().decode()
        assert list(private_tmp.iterdir()) == []
        result = proc.close()
    assert result.reason == "ok", result
    assert out.startswith(f"unix {errno.EACCES}\n2 [") and out.endswith("x" * 100_000 + "\n")
    assert out == sandbox.run(probe, timeout_s=10, files=files, max_output_bytes=1 << 20).stdout
    assert list(private_tmp.iterdir()) == []


SIGNALS_TO_INIT = ("SIGALRM", "SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1", "SIGCHLD", "SIGSTOP", "SIGKILL")
SIGNAL_INIT = textwrap.dedent(f"""\
    import os, signal, time
    for name in {SIGNALS_TO_INIT!r}:
        try:
            os.kill(1, getattr(signal, name))
            print(name, "sent")
        except OSError as e:
            print(name, e.errno)
    time.sleep(0.5)
    print("alive")
    """)


def force_mode(mode: str, monkeypatch) -> None:
    """Run as root (the program gets a random uid) or in user-namespace mode (the program is root of its own
    user namespace, as for a non-root caller; forced as root by refusing the uid map)."""
    if mode == "root":
        if os.geteuid() != 0 or not sandbox._uid_mapped(sandbox.UID_RANGE[0]):
            pytest.skip("needs root, with the program's uids mapped")
    else:
        monkeypatch.setattr(sandbox, "_uid_mapped", lambda uid: False)


@pytest.mark.parametrize("mode", ["root", "user namespace"])
def test_the_program_cannot_end_its_init_with_signals(mode, monkeypatch, private_tmp):
    """As root the program (a random uid) may not signal its init at all. In user-namespace mode it has
    init's uid and may send it signals, but init handles none (not SIGALRM, not Python's SIGINT), so the
    kernel drops them: the run ends when the program does, never as a sandbox_error."""
    force_mode(mode, monkeypatch)
    result = sandbox.run(SIGNAL_INIT, timeout_s=10)
    assert result.reason == "ok", result
    sent = f" {errno.EPERM}" if mode == "root" else " sent"
    assert result.stdout.split("\n") == [name + sent for name in SIGNALS_TO_INIT] + ["alive", ""]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["root", "user namespace"])
def test_init_ends_a_run_its_caller_never_stops(mode, monkeypatch, private_tmp):
    """A started run that its caller never closes ends at init's own deadline (timeout_s + 10 s), even while
    the program sends init SIGCHLD after SIGCHLD."""
    force_mode(mode, monkeypatch)
    proc = sandbox.start("import os, signal, time\nwhile True:\n    try:\n        os.kill(1, signal.SIGCHLD)\n"
                         "    except OSError:\n        pass\n    time.sleep(0.01)", timeout_s=1)
    try:
        proc._proc.wait(timeout=10 + SLACK_S * 2)
    finally:
        result = proc.close()
    assert result.reason == "sandbox_error" and "init's own deadline passed" in result.stderr, result


# The two tests below run the sandbox in a child process under other conditions; they load
# rlpost/sandbox.py by path, so the child does not need rlpost's dependencies.
LOAD = ("import importlib.util, json, sys; spec = importlib.util.spec_from_file_location('sb', {path!r}); "
        "sb = importlib.util.module_from_spec(spec); sys.modules['sb'] = sb; spec.loader.exec_module(sb)\n")


def test_refuses_to_run_where_namespaces_cannot_be_made():
    """In a user namespace that may create no further user namespaces (and maps no uid to drop to), run()
    raises SandboxUnavailable; only allow_unsandboxed=True runs the program, without namespaces."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1)")
    script = LOAD.format(path=sandbox.__file__) + textwrap.dedent("""
        try:
            sb.run("print('ran')")
            print("RAN-UNSANDBOXED")
        except sb.SandboxUnavailable as e:
            print("REFUSED", e)
        r = sb.run("import os; print('ran', os.path.exists('/proc/1/environ'))", allow_unsandboxed=True)
        print("OPTED-IN", r.reason, r.stdout.strip())
        r = sb.run("import socket; socket.socket(socket.AF_UNIX)", allow_unsandboxed=True)
        print("UNIX", r.reason, r.stderr.strip().splitlines()[-1])
        """)
    inner = f"echo 0 > /proc/sys/user/max_user_namespaces && exec {sys.executable} -c \"$0\""
    out = subprocess.run(["unshare", "--user", "--map-root-user", "sh", "-c", inner, script],
                         check=False, capture_output=True, text=True, timeout=60)
    if "Operation not permitted" in out.stderr or "cannot" in out.stderr[:200]:
        pytest.skip(f"cannot make a user namespace here: {out.stderr[:200]}")
    assert "REFUSED" in out.stdout and "allow_unsandboxed" in out.stdout, out
    assert "RAN-UNSANDBOXED" not in out.stdout
    assert "OPTED-IN ok ran" in out.stdout, out
    assert "UNIX exit_nonzero PermissionError: [Errno 13] Permission denied" in out.stdout, out  # the filter too


KEYS_PROGRAM = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
L, buf = ctypes.c_long, ctypes.create_string_buffer(256)
print("listed:", open("/proc/keys").read() if os.path.exists("/proc/keys") else "no /proc/keys")
for ring in (-3, -4, -5):  # session, user, user-session keyrings
    found = libc.syscall(L(%(keyctl)d), L(10), L(ring), b"user", b"rlpost-sandbox-test", L(0))  # KEYCTL_SEARCH
    print("search", ring, found, os.strerror(ctypes.get_errno()))
n = libc.syscall(L(%(keyctl)d), L(11), L(%(key)d), buf, L(256))  # KEYCTL_READ of the caller's key, by id
print("read", n, os.strerror(ctypes.get_errno()), buf.raw[:max(n, 0)])
"""


def test_the_callers_kernel_keys_are_not_readable():
    """A key in the caller's session keyring can be neither found, read nor listed by the program: it runs
    in a new, empty session keyring. (The caller here joins its own session keyring first, so the test key
    reaches no other process on the host.)"""
    numbers = {"x86_64": (250, 248), "aarch64": (219, 217)}.get(os.uname().machine)  # keyctl, add_key
    if numbers is None:
        pytest.skip(f"no system call numbers for {os.uname().machine}")
    secret = secrets.token_hex(16)
    script = LOAD.format(path=sandbox.__file__) + textwrap.dedent(f"""
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        L, (keyctl, add_key) = ctypes.c_long, {numbers}
        if libc.syscall(L(keyctl), L(1), None) < 0:  # KEYCTL_JOIN_SESSION_KEYRING
            print(json.dumps(["no keyrings", os.strerror(ctypes.get_errno())]))
            raise SystemExit
        key = libc.syscall(L(add_key), b"user", b"rlpost-sandbox-test", b"{secret}", L(32), L(-3))
        buf = ctypes.create_string_buffer(64)
        assert key > 0 and libc.syscall(L(keyctl), L(11), L(key), buf, L(64)) == 32, "cannot add a key here"
        r = sb.run({KEYS_PROGRAM!r} % {{"keyctl": keyctl, "key": key}})
        print(json.dumps([r.reason, r.stdout, r.stderr]))
        """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    reason, stdout, stderr = json.loads(proc.stdout or json.dumps([proc.stderr, "", ""]))
    if reason == "no keyrings":
        pytest.skip(f"keyctl does not work here: {stdout}")
    assert reason == "ok", (reason, stdout, stderr)
    assert secret not in stdout + stderr and "rlpost-sandbox-test" not in stdout, stdout
    assert stdout.count("search") == 3 and "read -1" in stdout, stdout


def descendants(pid: int) -> dict[int, bytes]:
    """The processes below `pid`: {pid: cmdline}."""
    parents, cmds = {}, {}
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{p}/stat") as f:
                parents[int(p)] = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{p}/cmdline", "rb") as f:
                cmds[int(p)] = f.read()
        except (OSError, IndexError):
            continue
    found, todo = {}, [pid]
    while todo:
        parent = todo.pop()
        for p, pp in parents.items():
            if pp == parent and p not in found and p in cmds:
                found[p] = cmds[p]
                todo.append(p)
    return found


def still_running(procs: dict[int, bytes]) -> dict[int, bytes]:
    alive = {}
    for pid, cmd in procs.items():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read() == cmd:  # a zombie's is empty; another process with that pid has another one
                    alive[pid] = cmd
        except OSError:
            pass
    return alive


@pytest.mark.parametrize("isolated, api", [(True, "run"), (False, "run"), (True, "start")],
                         ids=["sandboxed", "unsandboxed", "started"])
def test_a_killed_caller_leaves_no_folder_and_no_process(isolated, api):
    """SIGKILL a Python process while it is inside sandbox.run, or while it holds a program it started: the
    run stops at once (not at its 60 s limit), and its temp dir (TMPDIR) is left empty, in both modes."""
    # unsandboxed as root, the program's random uid must be able to reach the interpreter and its folder
    python = sys.executable if isolated or os.geteuid() != 0 else "/usr/bin/python3"
    if not os.path.exists(python):
        pytest.skip(f"no {python}")
    script = LOAD.format(path=sandbox.__file__) + textwrap.dedent(f"""
        sb._NAMESPACES_OK = {None if isolated else False}  # False: as if namespaces could not be made
        r = sb.{api}("import time\\ntime.sleep(60)", files={{"data/in.txt": "x" * 100_000}}, timeout_s=60,
                   allow_unsandboxed=True, python={python!r})
        print(r)
        import time
        time.sleep(60)  # holding the started program (run() returns only after 60 s)
        """)
    tmp = Path(tempfile.mkdtemp(prefix="rlpost-test-tmpdir-"))  # not tmp_path: the program's uid must reach it
    try:
        tmp.chmod(0o755)
        caller = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "TMPDIR": str(tmp)})
        try:
            deadline, run = time.monotonic() + SLACK_S, {}
            while not any(b"main.py" in cmd for cmd in run.values()):  # the program is running
                assert time.monotonic() < deadline and caller.poll() is None, "the program did not start"
                time.sleep(0.05)
                run = descendants(caller.pid)
            during = list(tmp.iterdir())
        finally:
            caller.kill()
            caller.wait()
        if isolated:
            assert during == [], "a sandboxed run wrote in the host's temp dir"
        deadline = time.monotonic() + SLACK_S
        while still_running(run) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert still_running(run) == {}, "the run outlived its caller"
        assert list(tmp.iterdir()) == []
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# what uid 1000 runs, after loading its copy of the sandbox
USERNS_SCRIPT = textwrap.dedent("""
        out = {}
        for name, code, kw in [
            ("hello", "print('hello')", {}),
            ("caps", "print(open('/proc/self/status').read())", {}),
            ("remount", "import os; print(os.system('mount -o remount,rw /usr 2>&1'))", {}),
            ("write", "open('/usr/rlpost_sandbox_probe', 'w')", {}),
            ("network", "import socket; socket.create_connection(('127.0.0.1', 22), timeout=1)", {}),
            ("unix", "import socket; socket.socket(socket.AF_UNIX)", {}),
            ("signal init", "import os, signal, time\\nfor s in (signal.SIGALRM, signal.SIGINT):\\n"
             "    os.kill(1, s)\\ntime.sleep(0.5)\\nprint('alive')", {}),
            ("fork", "import os\\nfor _ in range(8):\\n    os.fork()\\n", {"max_processes": 4}),
        ]:
            r = sb.run(code, timeout_s=5, **kw)
            out[name] = [r.reason, r.stdout, r.stderr[-300:]]
        print(json.dumps(out))
        """)


def test_unprivileged_host_user_gets_a_user_namespace():
    """As a non-root user (uid 1000), the program is root of its own user namespace without capabilities:
    it cannot remount its root writable, write system files, reach the network or exceed its processes.
    uid 1000 runs a copy of rlpost/sandbox.py in a world-readable temp folder: the checkout may be where it
    cannot read (a clone under /root)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None or not os.path.exists("/usr/bin/python3"):
        pytest.skip("needs root (to become uid 1000), setpriv and /usr/bin/python3")
    as_uid_1000 = ["setpriv", "--reuid", "1000", "--regid", "1000", "--clear-groups", "/usr/bin/python3", "-c"]
    folder = tempfile.mkdtemp(prefix="rlpost-test-uid1000-")
    try:
        os.chmod(folder, 0o755)
        copy = shutil.copy(sandbox.__file__, folder)
        os.chmod(copy, 0o644)
        readable = subprocess.run([*as_uid_1000, f"open({copy!r}).close()"], check=False, capture_output=True,
                                  text=True, timeout=60, cwd="/")
        if readable.returncode != 0:
            pytest.skip(f"uid 1000 cannot read {copy} (the temp dir's folders): {readable.stderr[-300:]}")
        proc = subprocess.run([*as_uid_1000, LOAD.format(path=copy) + USERNS_SCRIPT], check=False,
                              capture_output=True, text=True, timeout=60, cwd="/")
    finally:
        shutil.rmtree(folder)
    if "Operation not permitted" in proc.stderr and "unshare" in proc.stderr:
        pytest.skip(f"user namespaces are not allowed for uid 1000 here: {proc.stderr[-300:]}")
    out = json.loads(proc.stdout)
    assert out["hello"][:2] == ["ok", "hello\n"]
    assert "CapEff:\t0000000000000000" in out["caps"][1] and "CapBnd:\t0000000000000000" in out["caps"][1]
    assert out["remount"][0] == "ok" and out["remount"][1].strip()[-1] != "0" and "denied" in out["remount"][1]
    assert out["write"][0] == "exit_nonzero" and "Read-only file system" in out["write"][2]
    assert out["network"][0] == "exit_nonzero" and "unreachable" in out["network"][2]
    assert out["unix"][0] == "exit_nonzero" and "Permission denied" in out["unix"][2]
    assert out["signal init"][:2] == ["ok", "alive\n"], out["signal init"]  # init handles no signal
    assert out["fork"][0] == "exit_nonzero" and "Resource temporarily unavailable" in out["fork"][2]
    assert not os.path.exists("/usr/rlpost_sandbox_probe")



if __name__ == "__main__":  # the table for the notes: case -> outcome (reason), seconds
    tmp = Path(tempfile.mkdtemp())
    h = Host(tmp)
    try:
        print(f"{'case':<40} {'outcome (reason)':<30} {'seconds':>8}  limit")
        for case in ORDINARY + HOSTILE:
            r = run_case(case, h)
            h.assert_unchanged()
            outcome = f"{'ok' if r.ok else 'not ok'} ({r.reason})"
            print(f"{case.name:<40} {outcome:<30} {r.wall_s:8.2f}  {case.limit_s:g}s")
    finally:
        h.close()
        shutil.rmtree(tmp)
