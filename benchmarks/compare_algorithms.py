"""Every registered algorithm trained from the same SFT checkpoint on the embedded default task.

    .venv/bin/python benchmarks/compare_algorithms.py                  # all algorithms, 100 RL steps each
    .venv/bin/python benchmarks/compare_algorithms.py --algorithms grpo,rloo --steps 40

Equal footing: one SFT run (the default recipe's stage 1) makes the checkpoint; every algorithm then
starts from it with the same seed, the same prompts per step (32) x samples per prompt (8), the same
number of RL steps, the same learning rate and the same held-out evaluation. Rollout budget is equal
too: `rollout.max_refill_rounds=0`, so DAPO's dynamic sampling drops degenerate groups without drawing
new ones (its refill would spend extra samples). Each algorithm runs with its registered defaults
(`rlpost algorithms`); PPO adds its critic and 2 minibatches per rollout batch.

Writes, under --out (default runs/compare):
    sft/                 the SFT run (its checkpoints/sft is every algorithm's starting point)
    <algorithm>/         one ordinary run directory per algorithm (config.yaml, metrics.jsonl, summary.json)
    results.md           the table: held-out pass@1 at the start and end, reward, wall-clock
    results.json         the same numbers plus the curves
    curves.svg           held-out pass@1 and (smoothed) training reward against step, one line per algorithm

Exits 1 if some algorithm did not raise held-out pass@1 over the SFT checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from rlpost.algorithms import available
from rlpost.config import load_config
from rlpost.run import train

# per-algorithm settings beyond the algorithm's own defaults (same rollout budget for all)
EXTRA = {"ppo": ["trainer.minibatches=2"]}


def run(overrides: list[str], quiet: bool) -> dict:
    cfg = load_config(None, overrides)
    if quiet:
        with open(os.devnull, "w") as devnull:
            stdout, sys.stdout = sys.stdout, devnull
            try:
                return train(cfg)
            finally:
                sys.stdout = stdout
    return train(cfg)


def read_curves(run_dir: str) -> dict:
    """reward/mean per RL step and eval/pass@1 per evaluation point, from a run's metrics.jsonl."""
    reward, evals = [], []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if r.get("stage") == "rl":
                reward.append((r["step"], r["reward/mean"]))
                if "eval/pass@1" in r:
                    evals.append((r["step"], r["eval/pass@1"]))
            elif r.get("stage") == "eval":
                evals.append((r["step"], r["eval/pass@1"]))
    return {"reward": reward, "pass@1": sorted(set(evals))}


def smooth(points: list[tuple[int, float]], window: int = 10) -> list[tuple[int, float]]:
    out = []
    for i, (step, _) in enumerate(points):
        chunk = [v for _, v in points[max(0, i - window + 1):i + 1]]
        out.append((step, sum(chunk) / len(chunk)))
    return out


COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"]


def svg_panel(x0: float, title: str, series: dict[str, list[tuple[int, float]]], steps: int,
              w: float = 420, h: float = 300) -> list[str]:
    """One line chart (as SVG elements) with its axes, placed at x offset x0."""
    left, top, pw, ph = x0 + 50, 40, w - 70, h - 80
    values = [v for pts in series.values() for _, v in pts]
    lo, hi = min(values), max(values)
    lo, hi = (lo - 0.05, hi + 0.05) if hi - lo < 1e-9 else (lo - 0.02 * (hi - lo), hi + 0.02 * (hi - lo))
    X = lambda s: left + pw * s / max(steps, 1)  # noqa: E731
    Y = lambda v: top + ph * (1 - (v - lo) / (hi - lo))  # noqa: E731
    out = [f'<text x="{left + pw / 2}" y="22" text-anchor="middle" font-size="14">{title}</text>',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>']
    for i in range(5):
        v = lo + (hi - lo) * i / 4
        out.append(f'<text x="{left - 6}" y="{Y(v) + 4:.1f}" text-anchor="end" font-size="10">{v:.2f}</text>')
        s = steps * i / 4
        out.append(f'<text x="{X(s):.1f}" y="{top + ph + 14}" text-anchor="middle" font-size="10">{s:.0f}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{top + ph + 30}" text-anchor="middle" font-size="11">RL step</text>')
    for colour, (name, pts) in zip(COLOURS, series.items()):
        path = " ".join(f"{X(s):.1f},{Y(v):.1f}" for s, v in pts)
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.6"/>')
    return out


def write_svg(path: str, results: dict, steps: int) -> None:
    names = list(results)
    body = svg_panel(0, "held-out pass@1", {n: results[n]["curves"]["pass@1"] for n in names}, steps)
    body += svg_panel(420, "training reward (mean of last 10 steps)",
                      {n: smooth(results[n]["curves"]["reward"]) for n in names}, steps)
    for i, (colour, name) in enumerate(zip(COLOURS, names)):
        x = 60 + 95 * (i % 8)
        y = 300 + 18 * (i // 8)
        body.append(f'<rect x="{x}" y="{y - 9}" width="12" height="4" fill="{colour}"/>'
                    f'<text x="{x + 16}" y="{y - 4}" font-size="11">{name}</text>')
    height = 310 + 18 * ((len(names) - 1) // 8 + 1)
    with open(path, "w") as f:
        f.write(f'<svg xmlns="http://www.w3.org/2000/svg" width="840" height="{height}" '
                f'font-family="sans-serif">\n<rect width="100%" height="100%" fill="white"/>\n')
        f.write("\n".join(body) + "\n</svg>\n")


def table(results: dict, sft_pass: float, steps: int) -> str:
    lines = [f"held-out pass@1 after {steps} RL steps from the same SFT checkpoint (SFT: {100 * sft_pass:.1f}%)", "",
             "| algorithm | pass@1 start | pass@1 end | change | reward, first 10 steps | reward, last 10 steps "
             "| wall-clock |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        rw = [v for _, v in r["curves"]["reward"]]
        first, last = sum(rw[:10]) / max(len(rw[:10]), 1), sum(rw[-10:]) / max(len(rw[-10:]), 1)
        lines.append(f"| {name} | {100 * r['pass@1_start']:.1f}% | {100 * r['pass@1_end']:.1f}% "
                     f"| {100 * (r['pass@1_end'] - r['pass@1_start']):+.1f} | {first:.3f} | {last:.3f} "
                     f"| {r['wall_seconds']:.0f} s |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--algorithms", default=",".join(available()), help="comma-separated (default: all registered)")
    ap.add_argument("--steps", type=int, default=100, help="RL steps per algorithm")
    ap.add_argument("--eval-every", type=int, default=20, help="held-out pass@1 every this many steps")
    ap.add_argument("--sft-checkpoint", help="start from this checkpoint instead of running SFT first")
    ap.add_argument("--out", default=os.path.join("runs", "compare"), help="output folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--verbose", action="store_true", help="show every run's per-step lines")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides applied to every run")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.algorithms.split(",") if n.strip()]
    unknown = [n for n in names if n not in available()]
    if unknown:
        ap.error(f"unknown algorithm(s) {', '.join(unknown)}; registered: {', '.join(available())}")
    os.makedirs(args.out, exist_ok=True)
    common = [f"out_dir={args.out}", f"seed={args.seed}", *args.overrides]

    ckpt = args.sft_checkpoint
    if ckpt is None:
        print("compare: SFT (the default recipe's stage 1) ...", flush=True)
        summary = run([*common, "run_name=sft", "rl.steps=0"], quiet=not args.verbose)
        ckpt = os.path.join(summary["run_dir"], "checkpoints", "sft")
    if not os.path.isdir(ckpt):
        ap.error(f"SFT checkpoint {ckpt} is not a folder")

    results = {}
    for name in names:
        print(f"compare: {name} ...", flush=True)
        summary = run([*common, f"model.name={ckpt}", "sft.steps=0", f"run_name={name}", f"rl.steps={args.steps}",
                       f"rl.eval_every={args.eval_every}", "rollout.max_refill_rounds=0",
                       f"algorithm={{name: {name}}}", *EXTRA.get(name, [])], quiet=not args.verbose)
        # sft.steps=0: the held-out evaluation of the starting (SFT) weights is labelled "start", not "sft"
        start = summary["pass@1_start"] if "pass@1_start" in summary else summary["pass@1_sft"]
        results[name] = {"pass@1_start": start, "pass@1_end": summary["pass@1_rl"],
                         "wall_seconds": summary["wall_seconds"], "curves": read_curves(summary["run_dir"])}
        print(f"compare: {name}: pass@1 {100 * start:.1f}% -> {100 * summary['pass@1_rl']:.1f}% "
              f"({summary['wall_seconds']:.0f} s)", flush=True)

    sft_pass = next(iter(results.values()))["pass@1_start"] if results else float("nan")
    report = table(results, sft_pass, args.steps)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(report)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"steps": args.steps, "sft_checkpoint": ckpt, "results": results}, f, indent=1)
    write_svg(os.path.join(args.out, "curves.svg"), results, args.steps)
    print("\n" + report)
    print(f"compare: wrote {args.out}/results.md, results.json, curves.svg")
    failed = [n for n, r in results.items() if r["pass@1_end"] <= r["pass@1_start"]]
    if failed:
        print(f"compare: no held-out improvement over SFT for: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
