"""How `make run`'s SFT degrades when another process competes for the cores, per thread setting.

    .venv/bin/python benchmarks/threads_under_load.py            # 200 SFT steps, quiet vs one busy competitor
    .venv/bin/python benchmarks/threads_under_load.py --steps 50 --repeats 1

Each setting runs `python -m rlpost train "stages=[sft]" sft.steps=N` as a fresh process, once on its own
and once beside one CPU-bound competitor (a Python busy loop), and prints the wall-clock of both and their
ratio. The settings:

- `rlpost-default`: `rlpost train` as it is, nothing set;
- `spin`: two torch threads whose waits spin first (GOMP_SPINCOUNT=300000, libgomp's own default when
  OMP_WAIT_POLICY is unset): what runs did before rlpost chose the wait policy;
- `passive`: two threads whose waits sleep at once (OMP_WAIT_POLICY=PASSIVE);
- `threads=1`: one torch thread (no waits at all, but half the cores on a quiet machine).

The thread count changes float summation order (a run at 1 thread and one at 2 differ in the last bits), so a
default that picked it from the load would make the same command give other numbers on a busy machine; the wait
policy does not change any number.

Run it on a machine with nothing else running (check the load average it prints): the competitor is the
only load it means to measure.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

SETTINGS = {
    "rlpost-default": ({}, []),
    "spin": ({"GOMP_SPINCOUNT": "300000"}, ["threads=2"]),
    "spin10k": ({"GOMP_SPINCOUNT": "10000"}, ["threads=2"]),
    "spin30k": ({"GOMP_SPINCOUNT": "30000"}, ["threads=2"]),
    "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, ["threads=2"]),
    "threads=1": ({}, ["threads=1"]),
}

# the competitor: a busy loop that dies with this script, however the script ends (PR_SET_PDEATHSIG = 1, SIGKILL)
HOG = ("import ctypes, os, signal; ctypes.CDLL(None).prctl(1, signal.SIGKILL); "
       f"os.getppid() == {os.getpid()} or os._exit(0)\nwhile True: pass")


def run_sft(steps: int, env_extra: dict, args: list[str], out_dir: str) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(env_extra, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    cmd = [sys.executable, "-m", "rlpost", "train", "stages=[sft]", f"sft.steps={steps}", "sft.save_every=0",
           f"out_dir={out_dir}", *args]
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=2, help="runs per setting and condition (the median is printed)")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    a = ap.parse_args()
    print(f"load average before: {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as out_dir:
        for name in a.settings.split(","):
            env_extra, args = SETTINGS[name]
            quiet, loaded = [], []
            for _ in range(a.repeats):
                quiet.append(run_sft(a.steps, env_extra, args, out_dir))
                hog = subprocess.Popen([sys.executable, "-c", HOG])
                try:
                    time.sleep(0.5)
                    loaded.append(run_sft(a.steps, env_extra, args, out_dir))
                finally:
                    hog.kill()
                    hog.wait()
            q, ld = statistics.median(quiet), statistics.median(loaded)
            print(f"{name:14s} quiet {q:6.1f} s   one busy competitor {ld:6.1f} s   ratio {ld / q:4.2f}x", flush=True)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
