"""Run untrusted Python in a throwaway sandbox: `run(code, ...) -> SandboxResult`.

    from rlpost.sandbox import run
    r = run("print(input()[::-1])", stdin="abc", timeout_s=2)
    r.ok, r.reason, r.stdout          # True, 'ok', 'cba\\n'

`start(code, ...) -> SandboxProcess` launches the same sandbox but returns at once, with pipes to the
program's stdin and stdout, for a caller that talks to the program while it runs. Both launch through
SandboxProcess; run() then feeds the program its stdin and reads its output to the end.

How it isolates, layer by layer (each closes what the others leave open):

1. Namespaces. A launcher (this file, run as a script by the host's Python) unshares new mount, PID,
   network, IPC and UTS namespaces, plus a user namespace when it is not root, and forks the new PID
   namespace's init (pid 1). The new network namespace has only a loopback that is down: nothing can be
   reached, not even the host's 127.0.0.1. The program sees and can signal only its own namespace's
   processes; when pid 1 exits the kernel kills every process left in the namespace, so a daemon that
   double-forks and setsid()s dies with the run, and run() returns only once all of them are gone. init
   handles no signal once the program runs, so the kernel drops any the program sends it (without root
   the program has init's uid and could otherwise end it, making the run a sandbox_error).
2. A private root. init mounts a tmpfs (over /tmp, in its own mount namespace only), binds into it
   read-only /usr, /bin, /sbin, /lib*, /etc and the interpreter's prefix (and venv),
   /dev/{null,zero,random,urandom}, a /proc of the new PID namespace, and a size-limited tmpfs at /sandbox
   holding main.py and `files`, then chroots there. /sandbox is the cwd, HOME and the only writable place;
   the rest of the host (homes, /tmp, /var, ...) is not there. main.py and `files` travel through the
   launcher's stdin (before the program's stdin): the run writes nothing on the host's disk.
3. Another identity. As root, the program runs as a random uid/gid far above any account's, without
   supplementary groups: it cannot touch what that uid may not, and RLIMIT_NPROC (counted per uid)
   counts this run's processes only. Without root, it is root of its own user namespace with every
   capability dropped (empty bounding set, SECBIT_NOROOT), so it cannot undo the mounts. Both set
   no_new_privs and join a new, empty session keyring (the caller's keys stay out of reach).
4. A seccomp filter (_install_seccomp_filter): sockets only of AF_INET/AF_INET6 (a unix socket file in
   a bound folder is reachable by path, whatever the mounts and the uid) and stream socketpair()s, no
   io_uring, no system call of another ABI. x86_64 and aarch64 only: elsewhere a run is a sandbox_error.
5. Limits: RLIMIT_CPU, RLIMIT_AS (memory_mb), RLIMIT_NPROC, RLIMIT_FSIZE and RLIMIT_CORE=0 in the
   program's process; the /sandbox tmpfs bounds its disk; the parent enforces the wall clock and reads
   at most max_output_bytes of stdout and of stderr, stopping the run on overflow.
6. An empty environment: PATH, HOME, TMPDIR, LANG and thread-count variables only; nothing of the host's
   environment reaches the launcher, init or the program.

The caller's death stops the run: the launcher has PDEATHSIG (SIGTERM, its stop request).

Where namespaces cannot be made (no root and no user namespaces, or a seccomp filter forbids unshare)
run() raises SandboxUnavailable. It runs without layers 1-2 only when asked: allow_unsandboxed=True or
RLPOST_SANDBOX_UNSAFE=1 (then: a temp cwd that the caller and the launcher remove, layers 3-6, and a
process-group kill).

`reason` is one of REASONS: ok (exit 0), exit_nonzero, timeout (wall clock), cpu_limit (SIGXCPU),
memory_limit (ended by MemoryError), file_limit (SIGXFSZ or 'File too large'), output_limit,
killed_by_signal, sandbox_error (the sandbox could not be set up for this run; stderr says why).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

REASONS = ("ok", "exit_nonzero", "timeout", "cpu_limit", "memory_limit", "file_limit", "output_limit",
           "killed_by_signal", "sandbox_error")
UID_RANGE = (1_500_000_000, 1_500_000_000 + 2**24)  # the program's uid/gid when the host runs as root
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32", "/etc")
DEVICES = ("null", "zero", "random", "urandom")
# unshare(2), mount(2) and prctl(2) constants (linux/sched.h, linux/mount.h, linux/prctl.h)
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x20000, 0x4000000, 0x8000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (
    1, 2, 4, 8, 32, 4096, 16384, 1 << 18)
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_SECUREBITS, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 1, 24, 28, 38, 47
SECBITS_NOROOT_LOCKED = 0b11000011  # NOROOT, NOROOT_LOCKED, NO_CAP_AMBIENT_RAISE(+_LOCKED)
# Where init mounts the tmpfs that becomes the program's root: the first of these that exists. The mount is
# made in the run's private mount namespace, so the host never sees it, and nothing is created on its disk.
ROOT_MOUNT_POINTS = ("/tmp", "/var/tmp", "/mnt", "/opt", "/srv", "/home")
# The program's seccomp filter, per machine: (audit arch, system call numbers). linux/audit.h, asm/unistd.h
SECCOMP_ARCHES = {"x86_64": (0xC000003E, {"socket": 41, "socketpair": 53, "keyctl": 250, "io_uring_setup": 425}),
                  "aarch64": (0xC00000B7, {"socket": 198, "socketpair": 199, "keyctl": 219, "io_uring_setup": 425})}
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
KEYCTL_GET_KEYRING_ID, KEYCTL_JOIN_SESSION_KEYRING, KEY_SPEC_SESSION_KEYRING = 0, 1, -3


class SandboxUnavailable(RuntimeError):
    """This host cannot make the namespaces the sandbox needs."""


@dataclass
class SandboxResult:
    ok: bool  # exited 0 within every limit
    returncode: int | None  # exit code, -signal if killed by one, None if the parent stopped it
    stdout: str
    stderr: str
    reason: str  # one of REASONS
    wall_s: float


def run(code: str, *, stdin: str = "", timeout_s: float = 5.0, memory_mb: int = 512,
        files: dict[str, str | bytes] | None = None, cpu_s: float | None = None, max_output_bytes: int = 65536,
        max_processes: int = 32, max_file_mb: int = 16, disk_mb: int = 64, python: str | None = None,
        allow_unsandboxed: bool | None = None) -> SandboxResult:
    """Run the Python program `code` as /sandbox/main.py in a new sandbox (see the module docstring), with
    `stdin` as its standard input and `files` ({relative path: content}) next to it. CPU time defaults to
    the wall-clock limit + 1 s; `disk_mb` bounds all it writes; `python` is the interpreter (default: this
    one). Raises SandboxUnavailable where namespaces cannot be made, unless `allow_unsandboxed` (default:
    env RLPOST_SANDBOX_UNSAFE=1)."""
    cfg, files, allow_unsandboxed = _settings("run", locals())
    isolate = _NAMESPACES_OK is not False or not allow_unsandboxed
    while True:
        result = _run_once(code, stdin, files, cfg, isolate)
        if isinstance(result, SandboxResult):
            return result
        if not allow_unsandboxed:
            raise SandboxUnavailable(f"cannot make the sandbox's namespaces here ({result}); run as root or "
                                     "where user namespaces are allowed, or opt out with allow_unsandboxed=True "
                                     "/ RLPOST_SANDBOX_UNSAFE=1 (no namespaces: far weaker isolation)")
        isolate = False


def start(code: str, *, timeout_s: float = 5.0, memory_mb: int = 512, files: dict[str, str | bytes] | None = None,
          cpu_s: float | None = None, max_output_bytes: int = 65536, max_processes: int = 32, max_file_mb: int = 16,
          disk_mb: int = 64, python: str | None = None, allow_unsandboxed: bool | None = None) -> SandboxProcess:
    """Start the Python program `code` as /sandbox/main.py in a new sandbox, set up, isolated and limited
    exactly as by `run()` (the same launch), and return at once with pipes to its stdin and stdout (a
    SandboxProcess) instead of waiting for it to end. Its wall clock starts now; the caller honours
    `deadline` and calls close(). Raises SandboxUnavailable where namespaces cannot be made, unless
    `allow_unsandboxed`."""
    cfg, files, allow_unsandboxed = _settings("start", locals())
    if _NAMESPACES_OK is None:  # learn it from a throwaway run: a started program cannot be retried unsandboxed
        run("pass", timeout_s=10, python=cfg["python"], allow_unsandboxed=allow_unsandboxed)
    if _NAMESPACES_OK is False and not allow_unsandboxed:
        raise SandboxUnavailable("cannot make the sandbox's namespaces here; opt out with allow_unsandboxed=True "
                                 "/ RLPOST_SANDBOX_UNSAFE=1 (no namespaces: far weaker isolation)")
    proc = SandboxProcess(code, files, cfg, _NAMESPACES_OK is not False)
    try:
        # init reads the program and its files first; a launcher that cannot take them shows in close()
        _write_before(proc.stdin, proc._packed, proc.deadline)
        proc._drain_stderr()
    except BaseException:
        proc._end("stopped", b"", b"")
        raise
    return proc


class SandboxProcess:
    """A program running in its sandbox, made by `start()` (and by `run()`, which feeds and reads it to its
    end). `stdin` and `stdout` are the program's standard input and output (unbuffered binary pipes; the
    caller reads and writes them, within `deadline`, a time.monotonic() value); its stderr is kept up to
    `max_output_bytes`, the rest read and dropped. `close()` ends it; use it as a context manager so the
    run never outlives the caller's use. Its result's reason is one of REASONS, or "stopped" when the
    caller ended it early."""

    def __init__(self, code: str, files: dict, cfg: dict, isolate: bool):
        """Launch the sandbox (launcher, init, program); main.py and `files` wait in `_packed` for whoever
        writes the launcher's stdin first."""
        self._t0 = time.monotonic()
        self.deadline, self._cap, self._isolate = self._t0 + cfg["timeout_s"], cfg["max_output_bytes"], isolate
        self._packed = _pack_files({**files, "main.py": code})
        self._err, self._drain, self._result = bytearray(), None, None
        # An isolated run writes nothing on the host's disk (init writes main.py and `files` into the
        # sandbox's own tmpfs), so nothing of it can be left there, whatever happens to the caller.
        # Unsandboxed, the program needs a real folder (0700: host users cannot look in): removed in _end(),
        # or by the launcher if the caller dies.
        self._workdir = None if isolate else tempfile.mkdtemp(prefix="rlpost-sandbox-")
        self._status_r, status_w = os.pipe()
        uid = secrets.randbelow(UID_RANGE[1] - UID_RANGE[0]) + UID_RANGE[0]
        cfg = dict(cfg, workdir=self._workdir, isolate=isolate, status_fd=status_w, uid=uid, caller=os.getpid(),
                   as_root=os.geteuid() == 0 and _uid_mapped(uid), euid=os.geteuid(), egid=os.getegid())
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", os.path.abspath(__file__), json.dumps(cfg)], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0, pass_fds=(status_w,),
                env={"PATH": "/usr/bin:/bin"}, cwd="/", start_new_session=True)
        except BaseException:
            os.close(self._status_r)
            if self._workdir:
                shutil.rmtree(self._workdir, ignore_errors=True)
            raise
        finally:
            os.close(status_w)
        self.stdin, self.stdout = self._proc.stdin, self._proc.stdout

    def _drain_stderr(self) -> None:
        """Read stderr in a thread, so that a chatty program never blocks on a full pipe."""
        def drain():
            while chunk := os.read(self._proc.stderr.fileno(), 65536):
                self._err += chunk[:max(0, self._cap - len(self._err))]

        self._drain = threading.Thread(target=drain, daemon=True)
        self._drain.start()

    def close(self, stop: bool = False) -> SandboxResult:
        """Close its stdin and wait for every process of the run to exit, at most until `deadline` (then it
        is stopped: reason "timeout"); `stop=True` stops it at once (reason "stopped"). Returns how it ended
        (stdout empty: the caller read it); later calls return the same."""
        if self._result is not None:
            return self._result
        proc, stopped = self._proc, None
        try:
            proc.stdin.close()
        except OSError:  # a write the program never read: nothing to flush
            pass
        try:
            if not stop:
                proc.wait(timeout=max(0.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            stopped = "timeout"
        if stop and proc.poll() is None:
            stopped = "stopped"
        result = self._end(stopped, b"", b"")
        if isinstance(result, str):
            raise SandboxUnavailable(f"cannot make the sandbox's namespaces here ({result})")
        return result

    def __enter__(self) -> SandboxProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close(stop=True)

    def _end(self, stopped: str | None, stdout: bytes, stderr: bytes) -> SandboxResult | str:
        """Stop the run if `stopped` (the reason) or unsandboxed, wait for the launcher, clean up and say how
        it ended; the reason namespaces could not be made (a str) when they could not."""
        global _NAMESPACES_OK
        proc = self._proc
        try:
            if stopped or not self._isolate:  # the launcher kills init (so the whole PID namespace) on SIGTERM
                _stop(proc, self._isolate)
            proc.wait()
        finally:
            if proc.poll() is None:
                _stop(proc, self._isolate)
            if self._drain is not None:
                self._drain.join(timeout=10)  # at once, but for an unsandboxed daemon holding stderr open
            for f in (proc.stdin, proc.stdout, proc.stderr):
                f.close()
            os.set_blocking(self._status_r, False)
            try:
                status = json.loads(os.read(self._status_r, 65536).decode().splitlines()[-1])
            except (BlockingIOError, IndexError, ValueError):
                status = {} if stopped else {"error": "no status from the sandbox (launcher returncode "
                                                      f"{proc.returncode})"}
            os.close(self._status_r)
            if self._workdir:
                shutil.rmtree(self._workdir, ignore_errors=True)
        if "unavailable" in status:
            _NAMESPACES_OK = False
            return status["unavailable"]
        _NAMESPACES_OK = _NAMESPACES_OK or self._isolate
        stdout = stdout.decode(errors="replace")
        stderr = (stderr or bytes(self._err)).decode(errors="replace")
        wall = time.monotonic() - self._t0
        if "error" in status:  # set-up failed: the host's fault, whether or not the caller stopped it since
            result = SandboxResult(False, None, stdout, stderr + status["error"], "sandbox_error", wall)
        elif stopped:
            result = SandboxResult(False, None, stdout, stderr, stopped, wall)
        else:
            rc = os.waitstatus_to_exitcode(status["status"])
            last = stderr.rstrip().rsplit("\n", 1)[-1]
            reason = ("ok" if rc == 0 else "cpu_limit" if rc == -signal.SIGXCPU
                      else "file_limit" if rc == -signal.SIGXFSZ or "File too large" in last
                      else "killed_by_signal" if rc < 0 else "memory_limit" if last.startswith("MemoryError")
                      else "exit_nonzero")
            result = SandboxResult(rc == 0, rc, stdout, stderr, reason, wall)
        self._result = result
        return result


_NAMESPACES_OK: bool | None = None  # learnt on the first run


def _settings(caller: str, args: dict) -> tuple[dict, dict, bool]:
    """run()'s and start()'s arguments checked: (the launcher's config, files, allow_unsandboxed)."""
    for name in ("timeout_s", "memory_mb", "max_output_bytes", "max_processes", "max_file_mb", "disk_mb"):
        if not args[name] > 0:
            raise ValueError(f"sandbox.{caller}: {name} must be > 0, got {args[name]!r}")
    exe = shutil.which(args["python"] or sys.executable)
    if exe is None:
        raise ValueError(f"sandbox.{caller}: python interpreter {args['python']!r} not found")
    files = dict(args["files"] or {})
    _check_files(caller, files)
    allow_unsandboxed = args["allow_unsandboxed"]
    if allow_unsandboxed is None:
        allow_unsandboxed = os.environ.get("RLPOST_SANDBOX_UNSAFE") == "1"
    cfg = {"python": os.path.abspath(exe), "cpu_s": math.ceil(args["cpu_s"] or args["timeout_s"] + 1),
           **{k: args[k] for k in ("timeout_s", "memory_mb", "disk_mb", "max_processes", "max_file_mb",
                                   "max_output_bytes")}}
    return cfg, files, allow_unsandboxed


def _check_files(caller: str, files: dict) -> None:
    """Refuse `files` keys that are not plain relative paths of regular files below /sandbox (each raises a
    ValueError naming the key), before anything is started or written."""
    def bad(path, why):
        raise ValueError(f"sandbox.{caller}: files key {path!r} {why}")

    for path, content in files.items():
        if not isinstance(path, str):
            bad(path, "must be a str path relative to /sandbox")
        if not isinstance(content, (str, bytes)):
            bad(path, f"must map to str or bytes, not {type(content).__name__}")
        if "\0" in path:
            bad(path, "contains a NUL character")
        parts = path.split("/")
        if path == "main.py" or not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
            bad(path, "must be a relative path to a file, without '.', '..' or empty parts (nor '/' at either "
                "end), and not main.py (the program itself)")
        if any(len(p.encode(errors="surrogateescape")) > 255 for p in parts):
            bad(path, "has a part longer than 255 bytes")
    names = {*files, "main.py"}
    for path in files:  # 'a' and 'a/b' cannot both be: a would be a file and a folder
        parts = path.split("/")
        for i in range(1, len(parts)):
            if (folder := "/".join(parts[:i])) in names:
                bad(path, f"collides with the file {folder!r}: {folder!r} cannot be a file and a folder")


def _run_once(code, stdin, files, cfg, isolate) -> SandboxResult | str:
    """run() in one mode: launch, feed main.py, `files` and `stdin`, read to the end, clean up."""
    proc = SandboxProcess(code, files, cfg, isolate)
    try:
        out, err, stopped = _communicate(proc._proc, proc._packed + stdin.encode(), proc.deadline,
                                         cfg["max_output_bytes"])
    except BaseException:
        proc._end("stopped", b"", b"")
        raise
    return proc._end(stopped, out, err)


def _pack_files(files: dict[str, str | bytes]) -> bytes:
    """`files` as init reads them (_unpack_files): the length of a JSON list of [name, size], that list, then
    the contents in its order."""
    contents = [c.encode() if isinstance(c, str) else bytes(c) for c in files.values()]
    header = json.dumps([[name, len(c)] for name, c in zip(files, contents)]).encode()
    return len(header).to_bytes(8, "little") + header + b"".join(contents)


def _uid_mapped(uid: int) -> bool:
    """Whether this user namespace maps `uid` (a root inside a container's user namespace may not)."""
    with open("/proc/self/uid_map") as f:
        return any(int(a) <= uid < int(a) + int(n) for a, _, n in (line.split() for line in f))


def _communicate(proc, data: bytes, deadline: float, cap: int) -> tuple[bytes, bytes, str | None]:
    """Feed stdin and read stdout/stderr until both close (every process of the run has exited), the
    deadline passes ("timeout") or a stream passes `cap` bytes ("output_limit")."""
    bufs = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    sel = selectors.DefaultSelector()
    for f in bufs:
        sel.register(f, selectors.EVENT_READ)
    if data:
        os.set_blocking(proc.stdin.fileno(), False)
        sel.register(proc.stdin, selectors.EVENT_WRITE)
    else:
        proc.stdin.close()
    open_reads = 2
    try:
        while open_reads:
            left = deadline - time.monotonic()
            if left <= 0:
                return bytes(bufs[proc.stdout]), bytes(bufs[proc.stderr]), "timeout"
            for key, _ in sel.select(left):
                if key.fileobj is proc.stdin:
                    try:
                        data = data[os.write(proc.stdin.fileno(), data[:65536]):]
                    except BrokenPipeError:
                        data = b""
                    if not data:
                        sel.unregister(proc.stdin)
                        proc.stdin.close()
                    continue
                chunk = os.read(key.fileobj.fileno(), 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    open_reads -= 1
                buf = bufs[key.fileobj]
                buf += chunk[:cap + 1 - len(buf)]
                if len(buf) > cap:
                    del buf[cap:]
                    return bytes(bufs[proc.stdout]), bytes(bufs[proc.stderr]), "output_limit"
        return bytes(bufs[proc.stdout]), bytes(bufs[proc.stderr]), None
    finally:
        sel.close()
        for f in (proc.stdin, proc.stdout, proc.stderr):
            f.close()


def _write_before(pipe, data: bytes, deadline: float) -> bool:
    """Write all of `data` to `pipe` before `deadline`; False if the reader is gone or too slow. The pipe
    stays in the blocking mode it had."""
    fd, blocking = pipe.fileno(), os.get_blocking(pipe.fileno())
    os.set_blocking(fd, False)
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_WRITE)
    try:
        while data:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                return False
            try:
                data = data[os.write(fd, data[:65536]):]
            except BlockingIOError:
                continue
            except OSError:  # BrokenPipeError: it exited
                return False
        return True
    finally:
        sel.close()
        os.set_blocking(fd, blocking)


def _stop(proc, isolate: bool) -> None:
    """Isolated: SIGTERM makes the launcher SIGKILL the namespace's init and wait until the kernel has
    killed and reaped everything in it. Unsandboxed (or a stuck launcher): SIGKILL the process group."""
    if isolate:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


# ---- what runs in the launcher process (`python -I -S sandbox.py CONFIG`) and the namespace's init ----

def _libc_call(name: str, *args) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    args = [a.encode() if isinstance(a, str) else ctypes.c_ulong(a) if isinstance(a, int) else a for a in args]
    if getattr(libc, name)(*args) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{name}{tuple(args[:2])}: {os.strerror(e)}")


def _launcher(cfg: dict) -> None:
    """Unshare the namespaces, fork init, relay a stop request (SIGTERM) to it as SIGKILL, wait for it. The
    caller's death is a stop request too (PDEATHSIG): a killed caller leaves neither a run nor a folder."""
    status = cfg["status_fd"]
    os.set_inheritable(status, False)
    child, stop = 0, False

    def on_term(*_):
        nonlocal stop
        stop = True
        if child:
            os.kill(child, signal.SIGKILL)

    signal.signal(signal.SIGTERM, on_term)
    _libc_call("prctl", PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    stop = stop or os.getppid() != cfg["caller"]  # the caller died before PDEATHSIG was set
    try:
        if cfg["isolate"]:
            try:
                flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
                _libc_call("unshare", flags | (0 if cfg["as_root"] else CLONE_NEWUSER))
                if not cfg["as_root"]:  # map only ourselves, as root of the new user namespace
                    for name, text in (("setgroups", "deny"), ("uid_map", f"0 {cfg['euid']} 1"),
                                       ("gid_map", f"0 {cfg['egid']} 1")):
                        with open(f"/proc/self/{name}", "w") as f:
                            f.write(text)
            except OSError as e:
                os.write(status, json.dumps({"unavailable": str(e)}).encode() + b"\n")
                os._exit(1)
        child = os.fork()
        if child == 0:
            try:
                _init(cfg, status)
            finally:  # init never returns into the launcher's code
                os._exit(127)
        if stop:
            os.kill(child, signal.SIGKILL)
        # Returns once init, and with it everything in the namespace, has exited. WNOWAIT keeps init a zombie
        # (its pid not reusable) until SIGTERM is blocked, so on_term never kills a stranger with that pid.
        os.waitid(os.P_PID, child, os.WEXITED | os.WNOWAIT)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        os.waitpid(child, 0)
    finally:
        if cfg["workdir"]:  # unsandboxed: the caller removes it too, unless it was killed
            shutil.rmtree(cfg["workdir"], ignore_errors=True)


def _init(cfg: dict, status: int) -> None:
    """pid 1 of the new PID namespace: build the root, start the program, report how it ended, exit."""
    def report(**msg):
        os.write(status, json.dumps(msg).encode() + b"\n")
        os._exit(0)

    # Its own deadline, a backstop should the caller never stop the run. Until the program starts, no one
    # but the launcher can signal init, so an alarm will do.
    deadline = time.monotonic() + int(cfg["timeout_s"]) + 10
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGALRM, lambda *_: report(error="init's own deadline passed"))
    signal.alarm(int(cfg["timeout_s"]) + 10)
    uid = cfg["uid"] if cfg["as_root"] else 0
    try:
        _libc_call("prctl", PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if cfg["isolate"]:
            _build_root(cfg, uid)
        else:
            os.chdir(cfg["workdir"])
            _unpack_files(".")
            if cfg["as_root"]:
                _chown_tree(".", uid)
    except (OSError, ValueError) as e:
        report(error=f"sandbox setup failed: {e}")
    # From here on the program may signal init: in user-namespace mode it has init's uid. The kernel drops a
    # signal sent to a PID namespace's init from inside it unless init handles it, so init handles none
    # (SIGINT's KeyboardInterrupt, which Python installed, and the alarm go) and waits for SIGCHLD blocked,
    # with sigtimedwait: a SIGCHLD the program sends only makes it look for exited children once more.
    signal.alarm(0)
    for sig in signal.valid_signals():
        if callable(signal.getsignal(sig)):
            signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    err_r, err_w = os.pipe()  # close-on-exec: empty at EOF when exec worked
    pid = os.fork()
    if pid == 0:
        try:
            _exec_program(cfg, status, uid)
        except (OSError, ValueError) as e:
            os.write(err_w, f"cannot start {cfg['python']}: {e}".encode())
        os._exit(127)
    os.close(err_w)
    if (msg := os.read(err_r, 4096)):
        report(error=msg.decode(errors="replace"))
    while True:  # reap orphans too: pid 1 adopts them
        while (exited := os.waitpid(-1, os.WNOHANG))[0]:
            if exited[0] == pid:
                report(status=exited[1])
        if (left := deadline - time.monotonic()) <= 0:
            report(error="init's own deadline passed")
        signal.sigtimedwait({signal.SIGCHLD}, left)


def _build_root(cfg: dict, uid: int) -> None:
    _libc_call("mount", None, "/", None, MS_REC | MS_PRIVATE, None)  # nothing we mount reaches the host
    exe = cfg["python"]
    prefixes = {os.path.dirname(os.path.dirname(p)) for p in (exe, os.path.realpath(exe))}
    shown: list[tuple[str, str | int]] = []  # (path, symlink target or O_PATH fd of the folder to bind)
    for src in [*SYSTEM_DIRS, *sorted(prefixes - {"/"})]:
        if not os.path.lexists(src) or any(src.startswith(b + "/") for b, fd in shown if isinstance(fd, int)):
            continue
        # opened now: the root's tmpfs may cover it (a prefix under /tmp, say)
        shown.append((src, os.readlink(src) if os.path.islink(src) else os.open(src, os.O_PATH | os.O_DIRECTORY)))
    root = next((d for d in ROOT_MOUNT_POINTS if os.path.isdir(d)), None)
    if root is None:
        raise OSError(f"no folder to mount the sandbox's root on: none of {', '.join(ROOT_MOUNT_POINTS)} exists")
    _libc_call("mount", "tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    for src, target in shown:
        if isinstance(target, str):
            os.makedirs(os.path.dirname(root + src), exist_ok=True)
            os.symlink(target, root + src)
            continue
        os.makedirs(root + src, exist_ok=True)
        os.fchdir(target)
        _libc_call("mount", ".", root + src, None, MS_BIND, None)
        _libc_call("mount", None, root + src, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, None)
        os.close(target)
    os.makedirs(root + "/dev")
    for dev in DEVICES:
        open(f"{root}/dev/{dev}", "w").close()
        _libc_call("mount", f"/dev/{dev}", f"{root}/dev/{dev}", None, MS_BIND, None)
    for i, name in enumerate(("stdin", "stdout", "stderr")):
        os.symlink(f"/proc/self/fd/{i}", f"{root}/dev/{name}")
    os.symlink("/proc/self/fd", f"{root}/dev/fd")
    os.makedirs(root + "/proc")
    try:  # a /proc of the new PID namespace; some container runtimes forbid it, and no /proc is safe too
        _libc_call("mount", "proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
    except OSError:
        pass
    box = root + "/sandbox"
    os.makedirs(box)
    _libc_call("mount", "tmpfs", box, "tmpfs", MS_NOSUID | MS_NODEV,
               f"size={cfg['disk_mb']}m,nr_inodes=4096,mode=0700,uid={uid},gid={uid}")
    _unpack_files(box)
    _chown_tree(box, uid)
    _libc_call("mount", None, root, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, None)
    os.chdir(root)
    os.chroot(".")
    os.chdir("/sandbox")


def _unpack_files(top: str) -> None:
    """Write the program and its files (_pack_files) from stdin into `top`, leaving the program's stdin."""
    def read(n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            if not (chunk := os.read(0, min(n - len(buf), 1 << 20))):
                raise OSError("stdin closed before the program's files were all read")
            buf += chunk
        return bytes(buf)

    for name, size in json.loads(read(int.from_bytes(read(8), "little"))):
        path = os.path.join(top, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            while size:
                size -= f.write(read(min(size, 1 << 20)))


def _chown_tree(top: str, uid: int) -> None:
    for d, _, names in os.walk(top):
        for p in [d] + [os.path.join(d, n) for n in names]:
            os.chown(p, uid, uid)


def _exec_program(cfg: dict, status: int, uid: int) -> None:
    """In the program's process: drop identity and privileges, set the limits, exec the interpreter."""
    import resource

    os.close(status)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())  # init's blocked SIGCHLD would outlive exec
    if cfg["as_root"]:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    elif os.geteuid() == 0:  # root of a user namespace that maps only us: keep the uid, lose every capability
        _libc_call("prctl", PR_SET_SECUREBITS, SECBITS_NOROOT_LOCKED, 0, 0, 0)
        _libc_call("prctl", PR_CAP_AMBIENT, 4, 0, 0, 0)  # PR_CAP_AMBIENT_CLEAR_ALL
        for cap in range(64):
            try:
                _libc_call("prctl", PR_CAPBSET_DROP, cap, 0, 0, 0)
            except OSError:  # EINVAL past the kernel's last capability
                break
    # after the uid change, which clears it: unsandboxed, the program dies with init (no PID namespace there)
    _libc_call("prctl", PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    _join_new_session_keyring()
    _libc_call("prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    _install_seccomp_filter()
    mb = 1 << 20
    for limit, value in ((resource.RLIMIT_AS, cfg["memory_mb"] * mb), (resource.RLIMIT_FSIZE, cfg["max_file_mb"] * mb),
                         (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(limit, (value, value))
    if cfg["as_root"] or cfg["isolate"]:  # else the uid is the caller's: NPROC would count all its processes
        n = cfg["max_processes"] + (0 if cfg["as_root"] else 1)  # + init, which shares our uid in a user namespace
        resource.setrlimit(resource.RLIMIT_NPROC, (n, n))
    resource.setrlimit(resource.RLIMIT_CPU, (cfg["cpu_s"], cfg["cpu_s"] + 1))  # SIGXCPU, then SIGKILL
    home = "/sandbox" if cfg["isolate"] else cfg["workdir"]
    env = {"PATH": f"{os.path.dirname(cfg['python'])}:/usr/local/bin:/usr/bin:/bin", "HOME": home,
           "TMPDIR": home, "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    os.execve(cfg["python"], [cfg["python"], "-E", "-s", "-B", "-X", "utf8", "main.py"], env)


def _syscall(name: str, *args) -> int:
    """The system call `name` (numbers in SECCOMP_ARCHES); OSError on failure."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    result = libc.syscall(ctypes.c_long(_arch()[1][name]), *(ctypes.c_long(a) for a in args))
    if result < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{name}{tuple(args)}: {os.strerror(e)}")
    return result


def _arch() -> tuple[int, dict[str, int]]:
    """This machine's (audit arch, system call numbers); the sandbox refuses to run a program elsewhere."""
    import struct

    machine = os.uname().machine
    if machine not in SECCOMP_ARCHES or struct.calcsize("P") != 8:
        raise OSError(f"the sandbox has no seccomp filter for this machine ({machine}, {8 * struct.calcsize('P')}"
                      f"-bit Python; it knows 64-bit {' and '.join(SECCOMP_ARCHES)}) and does not run without one")
    return SECCOMP_ARCHES[machine]


def _join_new_session_keyring() -> None:
    """Leave the caller's session keyring (inherited across fork and exec, so its keys were readable by the
    program) for a new, empty one. The other keyrings are already the program's own: the thread and process
    keyrings do not survive fork, and the user keyrings belong to the uid (its own as root) or to the user
    namespace (without root)."""
    _arch()  # an unknown machine is refused here, not mistaken for a kernel without keyrings below
    try:
        _syscall("keyctl", KEYCTL_JOIN_SESSION_KEYRING, 0)
    except OSError as e:
        try:  # where keyctl fails for everyone (a kernel without keys, a container's seccomp profile) it
            _syscall("keyctl", KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0)  # fails for the program too
        except OSError:
            return
        raise e


def _install_seccomp_filter() -> None:
    """The program's seccomp filter (after no_new_privs; inherited by all it starts, never removable):

    - socket() only for AF_INET and AF_INET6 (whose connections the network namespace already stops); any
      other family fails with EACCES. AF_UNIX is the one that matters: a host socket file in a folder the
      sandbox binds (the venv, the prefix) is reachable by path whatever the mount and the uid, since
      connect() needs no write access. The others (AF_VSOCK to a VM's host, AF_ALG, AF_PACKET, ...) are
      not confined by a network namespace either, or are kernel surface no program here needs.
    - socketpair() only as AF_UNIX + SOCK_STREAM (asyncio's and multiprocessing.Pipe's): connected at birth,
      it cannot connect anywhere else. A datagram pair could sendto() a host socket by path: EACCES.
    - io_uring_setup() fails with EACCES: io_uring can open and connect sockets without these calls.
    - a system call of another ABI (i386 via int 0x80, x32) kills the process: it would bypass the numbers.
    """
    import ctypes
    import struct

    arch, nr = _arch()
    allow, deny, kill = 0x7FFF0000, 0x00050000 | 13, 0x80000000  # SECCOMP_RET_ALLOW, _ERRNO | EACCES, _KILL_PROCESS
    af_unix, af_inet, af_inet6, sock_stream, sock_type_mask = 1, 2, 10, 1, 0xF
    nr_at, arch_at, arg0_at, arg1_at = 0, 4, 16, 24  # struct seccomp_data offsets (low 32 bits of the args)
    program = [  # (op, k, jump-if-true label, jump-if-false label); "" falls through; a str labels what follows
        ("ld", arch_at), ("jeq", arch, "", "kill"), ("ld", nr_at), ("jge", 0x40000000, "kill", ""),  # x32 bit
        ("jeq", nr["socket"], "socket", ""), ("jeq", nr["socketpair"], "socketpair", ""),
        ("jeq", nr["io_uring_setup"], "deny", "allow"),
        "socket", ("ld", arg0_at), ("jeq", af_inet, "allow", ""), ("jeq", af_inet6, "allow", "deny"),
        "socketpair", ("ld", arg0_at), ("jeq", af_unix, "", "deny"), ("ld", arg1_at), ("and", sock_type_mask),
        ("jeq", sock_stream, "allow", "deny"),
        "allow", ("ret", allow), "deny", ("ret", deny), "kill", ("ret", kill)]
    labels, ops = {}, []
    for op in program:
        if isinstance(op, str):
            labels[op] = len(ops)
        else:
            ops.append(op)
    codes = {"ld": 0x20, "jeq": 0x15, "jge": 0x35, "and": 0x54, "ret": 0x06}  # BPF_LD|W|ABS, JMP|JEQ|K, ...
    jump = lambda i, label: labels[label] - i - 1 if label else 0  # noqa: E731
    blob = b"".join(struct.pack("=HBBI", codes[op[0]], jump(i, op[2] if len(op) > 2 else ""),
                                jump(i, op[3] if len(op) > 3 else ""), op[1]) for i, op in enumerate(ops))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]

    _libc_call("prctl", PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(SockFprog(len(ops), blob)), 0, 0)


if __name__ == "__main__":
    _launcher(json.loads(sys.argv[1]))
