"""The failure modes of RL post-training, each shown by a run with one knob set wrong.

    .venv/bin/python benchmarks/failure_modes.py                 # SFT once, then one short RL run per row
    .venv/bin/python benchmarks/failure_modes.py --steps 40 --out runs/failures

Every row starts from the same SFT checkpoint (the default recipe's SFT stage, made once and reused) and
runs `--steps` GRPO steps of the default recipe with one change. The script prints, for each run, the
metric of `rlpost report` that shows the symptom: its mean over the first and the last fifth of the
steps, next to the healthy run's, and the held-out pass@1 at the end.

    symptom              knob set wrong                          metric that shows it
    stalled reward       rollout.k=1 (a group of one sample)     rollout/degenerate_group_frac = 1, reward flat
    KL blow-up           trainer.lr x 25                         loss/kl_ref
    log-prob mismatch    rl.topology=async, max_staleness=4,     rollout/logp_mismatch_max (samples from
                         no rollout correction                   weights 4 versions old)

Reward hacking needs a reward model: `recipes/rlhf.yaml` is that run (docs/preference.md). Entropy
collapse and length explosion are not shown here: on the default task (4-token answers, a model already
confident after SFT) neither a 5x learning rate, nor an entropy penalty, nor a reward paid per character
moved entropy or length away from the healthy run's within 40 steps (docs/watching.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rlpost.config import load_config  # noqa: E402
from rlpost.run import train  # noqa: E402


ROWS = [  # name, overrides, metrics to show
    ("healthy (the default)", [], ["reward/mean", "loss/kl_ref", "train/entropy", "rollout/logp_mismatch_max",
                                   "rollout/response_len_mean"]),
    ("stalled reward", ["rollout.k=1"], ["reward/mean", "rollout/degenerate_group_frac"]),
    ("KL blow-up", ["trainer.lr=5e-3"], ["loss/kl_ref", "reward/mean"]),
    ("log-prob mismatch", ["rl.topology=async", "rl.max_staleness=4"],
     ["rollout/logp_mismatch_max", "rollout/staleness_max"]),
]


def fifths(lines: list[dict], key: str) -> tuple[float, float]:
    vals = [m[key] for m in lines if isinstance(m.get(key), (int, float))]
    if not vals:
        return float("nan"), float("nan")
    n = max(len(vals) // 5, 1)
    return statistics.mean(vals[:n]), statistics.mean(vals[-n:])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40, help="RL steps per run (default 40)")
    p.add_argument("--out", default="runs/failures", help="where the runs go (default runs/failures)")
    p.add_argument("--only", help="comma-separated row names to run (default all)")
    args = p.parse_args()

    sft = os.path.join(args.out, "sft", "checkpoints", "sft")
    if not os.path.isdir(sft):
        train(load_config(None, [f"out_dir={args.out}", "run_name=sft", "rl.steps=0"]))
    base = [f"model.name={sft}", "sft.steps=0", f"rl.steps={args.steps}", "rl.eval_every=0", "rl.save_every=0",
            f"out_dir={args.out}", "eval.samples_per_prompt=2"]
    rows = [r for r in ROWS if not args.only or r[0] in args.only.split(",")]
    results = []
    for name, overrides, keys in rows:
        run = name.split(" (")[0].replace(" ", "_").replace("-", "_")
        if not os.path.exists(os.path.join(args.out, run, "summary.json")):
            train(load_config(None, [*base, *overrides, f"run_name={run}"]))
        with open(os.path.join(args.out, run, "metrics.jsonl")) as f:
            lines = [m for m in map(json.loads, f) if m.get("stage") == "rl"]
        with open(os.path.join(args.out, run, "summary.json")) as f:
            summary = json.load(f)
        results.append((name, overrides, {k: fifths(lines, k) for k in keys}, summary.get("pass@1_rl")))

    print(f"\n{args.steps} GRPO steps from {sft}; each metric: mean of the first -> the last fifth of the steps\n")
    for name, overrides, shown, pass1 in results:
        knobs = " ".join(overrides) or "-"
        cells = "; ".join(f"{k} {a:.3g} -> {b:.3g}" for k, (a, b) in shown.items())
        print(f"{name:<22} {knobs:<60} {cells}; held-out pass@1 {pass1 if pass1 is None else f'{100 * pass1:.1f}%'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
