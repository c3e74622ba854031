"""A killed run leaves nothing running: SIGKILL `rlpost train` mid-RL (as the OOM killer and preemption do) and
no process it started (the math reward's verifier workers, a local Ray's head processes, agents and workers)
is alive 10 s later.

The run's processes are listed just before the kill: the driver's descendants (parent links in /proc) and
whatever else is in its session (the driver gets a session of its own here, so that nothing of the test's
is in it). A process counts as the same one only with the same start time (pids are reused), and a zombie
counts as dead (init reaps it).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = str(Path(__file__).resolve().parents[1])
GRACE_S = 10.0


def _stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, session id, start time) of `pid` from /proc/PID/stat, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    return fields[0], int(fields[1]), int(fields[3]), int(fields[19])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def run_processes(root: int, session: bool = True) -> dict[tuple[int, int], str]:
    """{(pid, start time): command line} of `root`, its descendants and (`session`) the rest of its session,
    which must then be one of its own."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (st := _stat(int(name))) is not None:
            table[int(name)] = st
    if root not in table:
        return {}
    sid = table[root][2]
    found, todo = {root}, [root]
    while todo:
        parent = todo.pop()
        for pid, st in table.items():
            if st[1] == parent and pid not in found:
                found.add(pid)
                todo.append(pid)
    if session:
        assert sid == root, f"process {root} does not lead its session: its session is not the run's alone"
        found |= {pid for pid, st in table.items() if st[2] == sid}
    return {(pid, table[pid][3]): _cmdline(pid) for pid in found}


def alive(pid: int, start: int) -> bool:
    st = _stat(pid)
    return st is not None and st[3] == start and st[0] not in ("Z", "X")


def still_alive(keys, grace: float = GRACE_S) -> list[tuple[int, int]]:
    """Those of processes `keys` ((pid, start time) pairs) still alive after up to `grace` seconds' wait for them
    all to end."""
    deadline = time.monotonic() + grace
    while any(alive(*key) for key in keys) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [key for key in keys if alive(*key)]


def kill_left(keys) -> None:
    """SIGKILL those of processes `keys` ((pid, start time) pairs) still alive: a failed test leaves nothing
    running either."""
    for pid, start in keys:
        if alive(pid, start):
            os.kill(pid, signal.SIGKILL)


def rl_steps(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return sum(1 for line in lines if line.strip() and json.loads(line).get("stage") == "rl")


def kill_mid_rl(tmp_path: Path, overrides: list[str], expect: tuple[str, ...] = (), timeout_s: float = 240,
                env: dict | None = None, min_processes: int = 2):
    """Start `rlpost train` with `overrides`, SIGKILL it once it has logged an RL step, has `min_processes`
    processes (itself included) and every command-line fragment in `expect` is among them; {(pid, start):
    command} of those processes still alive after GRACE_S seconds, and the list taken before the kill.
    `env`: the run's environment (default: this one without RAY_ADDRESS)."""
    run_dir = tmp_path / "run"
    if env is None:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env = {**env, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    log = open(tmp_path / "driver.log", "w")
    driver = subprocess.Popen([sys.executable, "-m", "rlpost.cli", "train", *overrides, f"out_dir={tmp_path}",
                               "run_name=run"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    before: dict = {}
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            assert driver.poll() is None, f"the run ended before the kill:\n{(tmp_path / 'driver.log').read_text()}"
            assert time.monotonic() < deadline, (f"no RL step with {expect} running within {timeout_s} s:\n"
                                                 f"{(tmp_path / 'driver.log').read_text()[-3000:]}")
            if rl_steps(run_dir) >= 1:
                before = run_processes(driver.pid)
                if len(before) >= min_processes and all(any(e in cmd for cmd in before.values()) for e in expect):
                    break
            time.sleep(0.2)
        driver.kill()
        driver.wait()
        return {key: before[key] for key in still_alive(list(before))}, before
    finally:
        if driver.poll() is None:
            driver.kill()
        kill_left(list(before))
        log.close()


# a run whose every score goes through math-verify (fast_path off; the last line is an answer whatever the
# policy writes), so the verifier workers surely run
MATH_RUN = ["task.name=multistep", "task.reward=math", "task.reward_options={extract: last_line, fast_path: false}",
            "task.num_eval=4", "model.n_layer=1", "model.n_embd=16", "model.n_head=1", "threads=1",
            "rollout.max_new_tokens=16", "sft.steps=0", "rl.steps=100000", "rl.eval_every=0", "rl.save_every=0",
            "eval.samples_per_prompt=1", "rollout.prompts_per_step=2", "rollout.k=2"]
ASYNC_RUN = ["rl.topology=async", "sft.steps=0", "rl.steps=100000", "rl.eval_every=0", "rl.save_every=0",
             "task.num_eval=4", "model.n_layer=1", "model.n_embd=16", "model.n_head=1", "threads=1",
             "eval.samples_per_prompt=1", "rollout.prompts_per_step=2", "rollout.k=2"]


def test_a_killed_run_leaves_no_math_verifier_running(tmp_path):
    left, before = kill_mid_rl(tmp_path, MATH_RUN)  # once a verifier worker runs beside the driver
    assert not left, f"alive {GRACE_S:.0f} s after the run was killed: {sorted(left.values())}"


@pytest.mark.slow
def test_a_killed_async_run_leaves_no_ray_process_running(tmp_path):
    left, before = kill_mid_rl(tmp_path, ASYNC_RUN, ("raylet", "gcs_server", "ray::RolloutWorker"))
    assert not left, f"alive {GRACE_S:.0f} s after the run was killed: {sorted(left.values())}"


@pytest.mark.slow
def test_an_async_run_that_ends_leaves_nothing_running(tmp_path):
    """The normal end: Ray shut down by the run itself, the reaper stopped without killing anything."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=REPO, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    overrides = [a.replace("rl.steps=100000", "rl.steps=3") for a in ASYNC_RUN]
    driver = subprocess.Popen([sys.executable, "-m", "rlpost.cli", "train", *overrides, f"out_dir={tmp_path}",
                               "run_name=run"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    seen: dict = {}
    try:
        while driver.poll() is None:
            seen.update(run_processes(driver.pid))
            time.sleep(0.2)
        assert driver.returncode == 0
        assert any("reaper" in cmd for cmd in seen.values()) and any("raylet" in cmd for cmd in seen.values())
        left = still_alive(list(seen))
        assert not left, sorted(seen[key] for key in left)
    finally:
        driver.kill()
        driver.wait()
        kill_left(list(seen))


@pytest.mark.slow
def test_a_killed_run_leaves_the_cluster_in_RAY_ADDRESS_running(tmp_path):
    """A cluster the run joined is the user's: killing the run must not take it down (nor start a reaper)."""
    import socket

    from rlpost.cluster import LOOPBACK_ENV

    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(LOOPBACK_ENV, PYTHONPATH=REPO)
    address = f"127.0.0.1:{port}"
    head = subprocess.Popen([ray_cli, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                             "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        for _ in range(120):  # the head is up once `ray status` answers
            if subprocess.run([ray_cli, "status", f"--address={address}"], env=env,
                              capture_output=True).returncode == 0:
                break
            time.sleep(1)
        cluster = run_processes(head.pid)  # `ray start` leads a session of its own
        # the run's rollout worker is the cluster's process, not the driver's: the driver may be alone
        left, before = kill_mid_rl(tmp_path, ASYNC_RUN, env={**env, "RAY_ADDRESS": address}, min_processes=1)
        assert not any("reaper" in cmd for cmd in before.values())
        assert not left, f"alive {GRACE_S:.0f} s after the run was killed: {sorted(left.values())}"
        assert all(alive(*key) for key, cmd in cluster.items() if "gcs_server" in cmd or "raylet" in cmd)
        up = subprocess.run([ray_cli, "status", f"--address={address}"], env=env, capture_output=True, text=True,
                            timeout=120)
        assert up.returncode == 0, up.stdout + up.stderr  # the user's cluster is still up
    finally:  # `ray stop` would stop every Ray on the machine; this stops the head's session only
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=120)


@pytest.mark.slow
def test_a_killed_torchrun_launch_leaves_no_rank_running(tmp_path):
    """`rlpost train --nproc 2` runs torchrun, which runs the ranks: none may train on after the kill."""
    overrides = ["--nproc", "2", *ASYNC_RUN[1:]]  # the async run's sizes, colocated (fsdp2 refuses Ray)
    left, before = kill_mid_rl(tmp_path, overrides, ("torch.distributed.run",), min_processes=4)
    assert not left, f"alive {GRACE_S:.0f} s after the run was killed: {sorted(left.values())}"


@pytest.mark.slow
def test_sigterm_to_a_torchrun_launch_stops_every_rank_after_a_checkpoint(tmp_path):
    """SIGTERM to `rlpost train --nproc 2` (what a scheduler sends the process it started) stops the ranks at the
    next step boundary after a checkpoint, as it stops one process: exit 143, summary.json `interrupted
    (SIGTERM)`, nothing left running. The launcher used to die of it at once, and its reaper then SIGKILLed
    torchrun and the ranks: no checkpoint since the last rl.save_every, no summary.json."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    log = open(tmp_path / "driver.log", "w")
    launcher = subprocess.Popen([sys.executable, "-m", "rlpost.cli", "train", "--nproc", "2", *ASYNC_RUN[1:],
                                 f"out_dir={tmp_path}", "run_name=run"], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    before: dict = {}
    try:
        deadline = time.monotonic() + 240
        while rl_steps(run_dir) < 1:
            assert launcher.poll() is None and time.monotonic() < deadline, (tmp_path / "driver.log").read_text()
            time.sleep(0.2)
        before = run_processes(launcher.pid)
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=120) == 143, (tmp_path / "driver.log").read_text()[-3000:]
    finally:
        if launcher.poll() is None:
            launcher.kill()
        kill_left(list(before))
        log.close()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"].startswith("interrupted (SIGTERM)")
    assert any(c.startswith("step_") for c in os.listdir(run_dir / "checkpoints"))
    left = {key: before[key] for key in still_alive(list(before))}
    assert not left, f"alive {GRACE_S:.0f} s after the run stopped: {sorted(left.values())}"


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}


# no `if __name__ == "__main__":` guard: a worker that re-imported this script would run it again
UNGUARDED = """
from rlpost.env.math import MathReward
r = MathReward(workers=1, fast_path=False)
print("scored", r(r"\\boxed{\\sqrt{8}}", {"answer": r"2\\sqrt{2}"}),
      r(r"\\boxed{\\sqrt{8}}", {"answer": r"3\\sqrt{2}"}), flush=True)
"""


def test_math_reward_from_a_script_without_main_guard_and_from_stdin(tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED)
    for how in ([sys.executable, str(script)], [sys.executable, "-"]):
        done = subprocess.run(how, input=UNGUARDED if how[-1] == "-" else None, env=_env(), cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{how}: {done.stderr[-3000:]}"
        assert done.stdout.split() == ["scored", "1.0", "0.0"], (how, done.stdout, done.stderr[-3000:])


# the pool starts in a thread that then ends (as the reward's call threads do): its worker must not die with
# that thread, and must die with the process, even while it is inside a call that holds the GIL for minutes
THREAD_THEN_STUCK = """
import os, threading, time
from rlpost.env.math import MathReward

if __name__ == "__main__":
    r = MathReward(workers=1, fast_path=False, timeout_s=600)
    t = threading.Thread(target=r, args=(r"\\boxed{\\sqrt{8}}", {"answer": r"2\\sqrt{2}"}))
    t.start()
    t.join()
    first = r._pool.pids()
    time.sleep(1.0)
    assert r(r"\\boxed{\\sqrt{18}}", {"answer": r"3\\sqrt{2}"}) == 1.0
    assert r._pool.pids() == first, (first, r._pool.pids())
    threading.Thread(target=r, args=(r"\\boxed{9^{9^{9}}}", {"answer": r"3\\sqrt{2}"}), daemon=True).start()
    time.sleep(2.0)  # the worker is inside sympy's power now
    print(*first, flush=True)
    time.sleep(600)
"""


def test_a_worker_outlives_the_thread_that_started_it_and_dies_with_its_process(tmp_path):
    script = tmp_path / "thread_then_stuck.py"
    script.write_text(THREAD_THEN_STUCK)
    proc = subprocess.Popen([sys.executable, str(script)], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    workers = []
    try:
        line = proc.stdout.readline()
        assert line.strip(), f"the script failed: {proc.stderr.read()[-3000:] if proc.poll() is not None else ''}"
        workers = [(pid, _stat(pid)[3]) for pid in map(int, line.split())]
        assert all(alive(*w) for w in workers)
        proc.kill()
        proc.wait()
        assert not still_alive(workers), f"worker(s) {workers} alive {GRACE_S:.0f} s after the kill"
    finally:
        proc.kill()
        proc.wait()
        kill_left(workers)


# the reaper on its own: a caller that starts a process in a session of its own, which starts another
REAPED = """
import subprocess, sys, time
from rlpost.reaper import Reaper

reaper = Reaper.start()
child = subprocess.Popen(["sh", "-c", "sleep 300 & sleep 300; wait"], start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
time.sleep(1.5)  # the reaper has seen them
{end}
"""


def _pids_below(pid: int) -> dict[tuple[int, int], str]:
    return {key: cmd for key, cmd in run_processes(pid, session=False).items() if key[0] != pid}


def test_the_reaper_kills_what_a_killed_caller_started(tmp_path):
    script = tmp_path / "caller.py"
    script.write_text(REAPED.format(end="print('ready', flush=True)\ntime.sleep(300)"))
    caller = subprocess.Popen([sys.executable, str(script)], env=_env(), stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    below = {}
    try:
        assert caller.stdout.readline() == "ready\n"
        below = _pids_below(caller.pid)
        assert sum("sleep 300" in cmd for cmd in below.values()) >= 2 and any("reaper" in c for c in below.values())
        caller.kill()
        caller.wait()
        left = still_alive(list(below))
        assert not left, {key: below[key] for key in left}
    finally:
        caller.kill()
        caller.wait()
        kill_left(list(below))


def test_a_stopped_reaper_kills_nothing(tmp_path):
    script = tmp_path / "caller.py"
    script.write_text(REAPED.format(end="reaper.stop()\nprint(child.pid, reaper.proc.returncode, flush=True)"))
    done = subprocess.run([sys.executable, str(script)], env=_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    pid, code = map(int, done.stdout.split())
    start = _stat(pid)[3]
    try:
        time.sleep(1.5)  # the caller is gone: a reaper still watching would kill now
        assert code == 0 and alive(pid, start)
    finally:
        os.killpg(pid, signal.SIGKILL)


if __name__ == "__main__":  # measure by hand: python tests/test_no_leaks.py math|async
    import tempfile

    args, expect = (MATH_RUN, ()) if sys.argv[1] == "math" else (ASYNC_RUN, ("raylet", "gcs_server"))
    with tempfile.TemporaryDirectory() as d:
        t0 = time.monotonic()
        left, before = kill_mid_rl(Path(d), args, expect)
        print(f"{time.monotonic() - t0:.1f} s; before the kill:")
        for (pid, _), cmd in sorted(before.items()):
            print(f"  {pid} {cmd[:150]}")
        print(f"alive {GRACE_S:.0f} s after:")
        for (pid, _), cmd in sorted(left.items()):
            print(f"  {pid} {cmd[:150]}")
