"""Calls per second of the `math` reward, with and without its in-process fast path.

    .venv/bin/python benchmarks/math_reward.py [--n 400] [--workers 2] [--threads 1 4]

Three workloads of `n` (completion, row) pairs, half of them right:
  gsm8k    "... #### 42" against a plain number (the fast path decides all of them)
  frac     "\\boxed{\\frac{3}{8}}" against "0.375" (the fast path reads \\frac{a}{b} too)
  symbolic "\\boxed{2\\sqrt{2}}", sets, intervals, polynomials (always math-verify, in the worker processes)
Each is scored with fast_path on and off, from 1 and from several threads. The worker pool is started
before timing (its start-up, about 3 s for two workers, is printed separately).
"""

from __future__ import annotations

import argparse
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor

from rlpost.env.math import MathReward


def workloads(n: int, seed: int = 0) -> dict[str, list[tuple[str, dict]]]:
    rng = random.Random(seed)
    gsm, frac, sym = [], [], []
    for i in range(n):
        right = i % 2 == 0
        a = rng.randint(1, 10_000)
        gsm.append((f"We add them up.\n#### {a if right else a + 1}", {"answer": str(a)}))
        p, q = rng.randint(1, 50), 2 ** rng.randint(1, 6)
        frac.append((f"so \\boxed{{\\frac{{{p if right else p + 1}}}{{{q}}}}}", {"answer": str(p / q)}))
        k = rng.randint(2, 30)
        sym.append([
            (f"\\boxed{{{k}\\sqrt{{2}}}}", {"answer": f"\\sqrt{{{2 * k * k if right else 2 * k * k + 1}}}"}),
            (f"\\boxed{{\\{{{k}, 1\\}}}}", {"answer": f"\\{{1, {k if right else k + 1}\\}}"}),
            (f"\\boxed{{[0, {k})}}", {"answer": f"[0, {k})" if right else f"[0, {k}]"}),
            (f"\\boxed{{(x+{k})^2}}", {"answer": f"x^2 + {2 * k}x + {k * k if right else k * k + 1}"}),
        ][i % 4])
    return {"gsm8k": gsm, "frac": frac, "symbolic": sym}


def rate(reward: MathReward, pairs, threads: int) -> tuple[float, float]:
    started = time.perf_counter()
    if threads == 1:
        scores = [reward(c, row) for c, row in pairs]
    else:
        with ThreadPoolExecutor(threads) as ex:
            scores = list(ex.map(lambda p: reward(*p), pairs))
    return len(pairs) / (time.perf_counter() - started), sum(scores) / len(scores)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=400, help="pairs per workload")
    ap.add_argument("--workers", type=int, default=2, help="math-verify worker processes")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 4], help="calling threads")
    args = ap.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    reward = MathReward(workers=args.workers)
    started = time.perf_counter()
    reward._pool.start()
    print(f"pool start-up ({args.workers} workers): {time.perf_counter() - started:.2f} s")
    for name, pairs in workloads(args.n).items():
        for fast in (True, False):
            reward.fast_path = fast
            for threads in args.threads:
                calls, accuracy = rate(reward, pairs, threads)
                print(f"{name:9s} fast_path={fast!s:5s} threads={threads}: {calls:9.0f} calls/s  "
                      f"(mean reward {accuracy:.2f})")
    print(f"timeouts: {reward.timeouts}; load average after: {os.getloadavg()[0]:.2f}")
    reward.close()


if __name__ == "__main__":
    main()
