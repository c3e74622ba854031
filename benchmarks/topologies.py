"""The throughput equation, measured: a colocated step costs the sum of its role times, an async step the max.

    .venv/bin/python benchmarks/topologies.py                       # 30 RL steps colocated, then async
    .venv/bin/python benchmarks/topologies.py --steps 60 --staleness 2

The same work runs twice from the same initial policy (no SFT, same seed, same prompts per step,
samples, response length and threads): once `rl.topology=colocated` (every role in this process,
taking turns), once `rl.topology=async` with one Ray rollout worker (1 thread) ahead of the trainer
(1 thread). From the colocated run's per-role timings (medians over the steps after warm-up) the
equation predicts

    colocated step = rollout + reward + reference + advantages + train + sync + other   (the sum)
    async step     = max(rollout + reward,  reference + advantages + train + sync + other)  (the max)

and the script prints both next to the measured median step times and the speed-ups. On a 2-core
machine the worker and the trainer each get one core, so the overlap is real but the two also share
memory bandwidth (and the Python interpreter of this process, which scores rewards in a thread).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import env_line, load_line  # noqa: E402

from rlpost.config import load_config  # noqa: E402
from rlpost.plan.throughput import fit  # noqa: E402
from rlpost.run import train  # noqa: E402


def sides(t) -> tuple[float, float]:
    """(rollout side, train side) of fitted terms: what overlaps under async, and what does not."""
    return t.rollout + t.verifier, t.reference + t.train + t.sync + t.other


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30, help="RL steps per run (default 30)")
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of the medians (default 3)")
    p.add_argument("--staleness", type=int, default=1, help="async run's rl.max_staleness (default 1)")
    p.add_argument("--prompts", type=int, default=32, help="prompts per step (default 32)")
    p.add_argument("--k", type=int, default=8, help="samples per prompt (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="response length cap (default 16)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the trainer and of the worker")
    p.add_argument("--out", default=None, help="keep the two run directories here (default: a temporary folder)")
    args = p.parse_args()

    out = args.out or tempfile.mkdtemp(prefix="rlpost-topologies-")
    common = ["sft.steps=0", f"rl.steps={args.steps}", "rl.eval_every=0", "rl.save_every=0", "task.num_eval=8",
              "eval.samples_per_prompt=1", f"rollout.prompts_per_step={args.prompts}", f"rollout.k={args.k}",
              f"rollout.max_new_tokens={args.max_new_tokens}", f"threads={args.threads}", f"out_dir={out}",
              "rollout.max_refill_rounds=0"]
    print(env_line())
    print(load_line())
    runs = {}
    for name, extra in (("colocated", ["rl.topology=colocated"]),
                        ("async", ["rl.topology=async", f"rl.max_staleness={args.staleness}",
                                   "rl.rollout_workers=1"])):
        cfg = load_config(None, [*common, *extra, f"run_name={name}"])
        train(cfg)
        runs[name] = fit(os.path.join(out, name), args.warmup)  # per-term medians after the warm-up
    print(load_line())

    co, asy = runs["colocated"], runs["async"]
    rollout_side, train_side = sides(co)
    eq_sum, eq_max = rollout_side + train_side, max(rollout_side, train_side)
    print(f"\n{co.steps} steps each after {args.warmup} warm-up; {args.prompts} prompts x {args.k} samples, "
          f"<= {args.max_new_tokens} tokens; {args.threads} thread(s) per side; async staleness {args.staleness}")
    print("colocated per-term medians (s): " + "  ".join(
        f"{k} {getattr(co, k):.4f}" for k in ("rollout", "verifier", "reference", "train", "sync", "other")))
    print(f"  rollout side (rollout + verifier)          {rollout_side:.4f} s")
    print(f"  train side (reference ... sync + other)    {train_side:.4f} s")
    print(f"\n{'':28}{'equation':>10}{'measured':>10}")
    print(f"{'colocated step (sum)':28}{eq_sum:10.4f}{co.measured_step:10.4f}")
    print(f"{'async step (max)':28}{eq_max:10.4f}{asy.measured_step:10.4f}")
    print(f"{'speed-up async/colocated':28}{eq_sum / eq_max:9.2f}x{co.measured_step / asy.measured_step:9.2f}x")
    a_roll, a_train = sides(asy)
    print(f"async run's own term medians: rollout side {a_roll:.4f} s, train side {a_train:.4f} s "
          f"(max {max(a_roll, a_train):.4f} s: the equation on the async run's timings)")
    with open(os.path.join(out, "async", "metrics.jsonl")) as f:
        staleness = max(m["rollout/staleness_max"] for m in map(json.loads, f) if m.get("stage") == "rl")
    print(f"\nasync run: rollout busy {a_roll:.4f} s/step, trainer waited {asy.rollout_wait:.4f} s/step for "
          f"rollouts; staleness max {staleness:.0f}; run directories in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
