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
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import env_line, load_line  # noqa: E402

from rlpost.config import load_config  # noqa: E402
from rlpost.run import train  # noqa: E402

ROLLOUT_SIDE = ("rollout", "reward")
TRAIN_SIDE = ("reference", "critic", "advantages", "train", "sync", "other")


def rl_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [m for m in map(json.loads, f) if m.get("stage") == "rl"]


def med(lines: list[dict], key: str) -> float:
    return statistics.median(m.get(key) or 0.0 for m in lines)


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
                        ("async", ["rl.topology=async", f"rl.max_staleness={args.staleness}", "rl.rollout_workers=1"])):
        cfg = load_config(None, [*common, *extra, f"run_name={name}"])
        train(cfg)
        runs[name] = rl_metrics(os.path.join(out, name))[args.warmup:]
    print(load_line())

    co, asy = runs["colocated"], runs["async"]
    roles = {r: med(co, f"time/{r}") for r in (*ROLLOUT_SIDE, *TRAIN_SIDE)}
    rollout_side = sum(roles[r] for r in ROLLOUT_SIDE)
    train_side = sum(roles[r] for r in TRAIN_SIDE)
    eq_sum, eq_max = rollout_side + train_side, max(rollout_side, train_side)
    measured_co, measured_async = med(co, "time/step"), med(asy, "time/step")
    print(f"\n{len(co)} steps each after {args.warmup} warm-up; {args.prompts} prompts x {args.k} samples, "
          f"<= {args.max_new_tokens} tokens; {args.threads} thread(s) per side; async staleness {args.staleness}")
    print("colocated per-role medians (s): " + "  ".join(f"{r} {v:.4f}" for r, v in roles.items()))
    print(f"  rollout side (rollout + reward)            {rollout_side:.4f} s")
    print(f"  train side (reference ... sync + other)    {train_side:.4f} s")
    print(f"\n{'':28}{'equation':>10}{'measured':>10}")
    print(f"{'colocated step (sum)':28}{eq_sum:10.4f}{measured_co:10.4f}")
    print(f"{'async step (max)':28}{eq_max:10.4f}{measured_async:10.4f}")
    print(f"{'speed-up async/colocated':28}{eq_sum / eq_max:9.2f}x{measured_co / measured_async:9.2f}x")
    a_roll = sum(med(asy, f"time/{r}") for r in ROLLOUT_SIDE)
    a_train = sum(med(asy, f"time/{r}") for r in TRAIN_SIDE)
    print(f"async run's own role medians: rollout side {a_roll:.4f} s, train side {a_train:.4f} s "
          f"(max {max(a_roll, a_train):.4f} s: the equation on the async run's timings)")
    print(f"\nasync run: rollout busy {med(asy, 'time/rollout') + med(asy, 'time/reward'):.4f} s/step, "
          f"trainer waited {med(asy, 'time/rollout_wait'):.4f} s/step for rollouts; staleness max "
          f"{max(m['rollout/staleness_max'] for m in asy):.0f}; run directories in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
