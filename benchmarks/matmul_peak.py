"""This machine's fp32 matmul peak, the yardstick for the FLOP/s the GRPO step achieves.

    .venv/bin/python benchmarks/matmul_peak.py

Peak = the best FLOP/s (2*M*N*K per matmul) over square fp32 matmuls of a few sizes, each the best of
several timed repetitions, with torch's default thread count (the same the benchmarks run with).
Best-of, not median: it is the attainable ceiling, and outside load on a shared machine only lowers it.

How rlpost's step is counted against it (benchmarks/grpo_step_vs_trl.py): with N the parameters
that take part in matmuls (every parameter but the input embedding; the untied LM head counts),
a forward pass costs 2*N FLOPs per token and a training forward+backward 6*N per token. Tokens are
the full padded [B, T] rows the model processes (prompt included), except rollout, which
prefills each prompt once and then decodes B rows x new tokens. Attention-score FLOPs (T^2 terms)
are not counted (under 3% at these lengths), so the fractions are slight underestimates.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch


def _gflops(m: int, n: int, k: int, reps: int, dtype: torch.dtype = torch.float32) -> tuple[float, float]:
    """(best GFLOP/s of wall-clock, best GFLOP per CPU-second) of one matmul shape (fp32 unless `dtype`)."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(2):
        a @ b
    best, best_cpu = float("inf"), float("inf")
    for _ in range(reps):
        c0, t0 = time.process_time(), time.perf_counter()
        a @ b
        best, best_cpu = min(best, time.perf_counter() - t0), min(best_cpu, time.process_time() - c0)
    flop = 2 * m * n * k
    return flop / best / 1e9, flop / max(best_cpu, 1e-6) / 1e9


def matmul_peak(quick: bool = False) -> dict:
    """peak_gflops: the best wall-clock GFLOP/s over square sizes (the machine's attainable ceiling with
    this thread count); peak_gflops_per_cpu_s: GFLOP per CPU-second (process time, all threads), a
    yardstick that other processes' load disturbs less (time spent descheduled is not counted)."""
    sizes = (1024, 2048) if quick else (512, 1024, 2048, 3072)
    reps = 5 if quick else 10
    per_size = {s: _gflops(s, s, s, reps) for s in sizes}
    # the shapes of the GRPO step's largest matmuls: 64 rows x 45 tokens against the MLP weights
    # (gate_proj / up_proj, then down_proj), for how close a step of that size can get to the peak
    step_shapes = {"2880x256 @ 256x1024": _gflops(2880, 1024, 256, reps),
                   "2880x1024 @ 1024x256": _gflops(2880, 256, 1024, reps)}
    return {"threads": torch.get_num_threads(), "peak_gflops": max(g for g, _ in per_size.values()),
            "peak_gflops_per_cpu_s": max(c for _, c in per_size.values()),
            "square": per_size, "step_shapes": step_shapes}


def main(argv=None) -> dict:
    import argparse

    from benchmarks.common import env_line, load_line

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# {env_line()}")
    print(f"# load average before: {load_line()}")
    res = matmul_peak()
    print(f"fp32 matmul, {res['threads']} threads, best of 10 per shape: GFLOP/s (wall-clock), GFLOP per CPU-second")
    for s, (g, c) in res["square"].items():
        print(f"  {s}x{s} @ {s}x{s}: {g:7.1f} {c:7.1f}")
    for s, (g, c) in res["step_shapes"].items():
        print(f"  {s}: {g:7.1f} {c:7.1f}")
    print(f"peak: {res['peak_gflops']:.1f} GFLOP/s ({res['peak_gflops_per_cpu_s']:.1f} GFLOP per CPU-second)")
    print(f"# load average after: {load_line()}")
    return res


if __name__ == "__main__":
    main()
