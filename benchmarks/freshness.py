"""The freshness wall: held-out pass@1 against rl.max_staleness, with and without the rollout correction.

    .venv/bin/python benchmarks/freshness.py                     # the whole sweep (resumable), then tables and plots
    .venv/bin/python benchmarks/freshness.py --report-only       # tables and plots from the runs already made
    .venv/bin/python benchmarks/freshness.py --tasks arithmetic --staleness 0,8 --seeds 0   # the early check

Every run is `rl.topology=async` with one Ray rollout worker, so S = rl.max_staleness fixes exactly which
policy version samples each step (t - S - 1; S = 0 is the synchronous loop on the same engine). Each task's
SFT runs once (`rl.steps=0`) and every RL run starts from its exported folder (`model.name=<sft run>/
checkpoints/sft sft.steps=0`), so the runs of a task differ only in S, the correction and the seed:

    arithmetic   the embedded default task (gpt_mini), SFT shortened to --sft-steps so RL has room to learn
    calculator   recipes/tool_calculator.yaml: two turns (the model calls its calculator, the environment
                 answers, the model answers), 3-digit multiplication

Corrections (`algorithm.rollout_correction`): `none` (plain GRPO: the clip is centred on the stale
behaviour policy mu), `tis` (decoupled loss, truncated IS weight pi_prox / mu per token, cap 2),
`tis-seq` (the same weight per response: `rollout_correction_level=sequence`).

Runs are subprocesses (`python -m rlpost.cli train`), at most --parallel at a time, each with one torch
thread for the trainer and one for its Ray worker. A run whose summary is already in --results is
skipped; a run directory without a finished summary is removed and made again. Per run, --results gets
<task>/<cell>.json: the held-out pass@1 curve against step and against wall-clock, the per-term step
medians (`time/*`), the load average at its start and end, and the overlap-model step time

    synchronous (S = 0)  rollout + reward + reference + advantages + train + sync + other   (the sum)
    async (S > 0)        max(rollout + reward, reference + advantages + train + sync + other)  (the max)

from that run's own medians (rlpost/plan/throughput.py's fit). Measured wall-clock depends on what else
ran on the machine (and a run's own medians on the load while it ran), so the wall-clock plot uses one
overlap model per task and correction: the rollout and train sides of its synchronous (S = 0) runs, where
the two sides take turns and do not slow each other, averaged over seeds; then step x (sum or max). The
measured seconds are in each JSON. --results also gets results.md (final and peak pass@1, mean +- sd over seeds)
and --plots the figures (freshness_<task>.svg/png).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

from common import load_line  # noqa: E402

from rlpost.plan.throughput import fit  # noqa: E402

CORRECTIONS = {
    "none": ["algorithm.rollout_correction=none"],
    "tis": ["algorithm.rollout_correction=tis", "algorithm.rollout_correction_level=token"],
    "tis-seq": ["algorithm.rollout_correction=tis", "algorithm.rollout_correction_level=sequence"],
}

# per task: the SFT run's overrides and every RL run's (beyond staleness, correction, seed)
TASKS = {
    "arithmetic": {
        "recipe": None,
        "sft": lambda a: [f"sft.steps={a.sft_steps}", "sft.save_every=0"],
        "rl": lambda a: [f"trainer.lr={a.lr}", "rollout.max_refill_rounds=0"],
    },
    "calculator": {
        "recipe": os.path.join(ROOT, "recipes", "tool_calculator.yaml"),
        "sft": lambda a: [],
        "rl": lambda a: [f"trainer.lr={a.lr}"],
    },
}


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def names(text: str, known) -> list[str]:
    out = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in out if x not in known]
    if bad:
        raise SystemExit(f"freshness: unknown {', '.join(bad)}; known: {', '.join(known)}")
    return out


def train(recipe: str | None, overrides: list[str], log: str) -> None:
    """One `rlpost train` in a subprocess (its own Ray), output to `log`; raises with the log's tail on failure."""
    cmd = [sys.executable, "-m", "rlpost.cli", "train", *([recipe] if recipe else []), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    if rc:
        with open(log) as f:
            tail = f.read()[-2000:]
        raise RuntimeError(f"freshness: {' '.join(cmd)} exited {rc}; the end of {log}:\n{tail}")


def finished(run_dir: str) -> bool:
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            return json.load(f).get("status") == "ok"
    except (OSError, ValueError):
        return False


def sft(task: str, args) -> str:
    """The task's SFT run (made once): the folder every RL run of the task starts from."""
    run_dir = os.path.join(args.out, task, "sft")
    if not finished(run_dir):
        shutil.rmtree(run_dir, ignore_errors=True)
        os.makedirs(os.path.dirname(run_dir), exist_ok=True)
        print(f"freshness: {task}: SFT ...", flush=True)
        spec = TASKS[task]
        train(spec["recipe"], [*spec["sft"](args), "rl.steps=0", f"task.num_eval={args.num_eval}", "threads=1",
                               f"out_dir={os.path.dirname(run_dir)}", "run_name=sft", f"seed={args.sft_seed}"],
              run_dir + ".log")
    return os.path.join(run_dir, "checkpoints", "sft")


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def overlap_step(t, staleness: int) -> tuple[float, float, float]:
    """(rollout side, train side, modelled step): the sum when synchronous, the max when rollout runs ahead."""
    roll, rest = t.rollout + t.verifier, t.reference + t.train + t.sync + t.other
    return roll, rest, (roll + rest if staleness == 0 else max(roll, rest))


# why a stale run learns less: how far the trainer is from the sampler, and what the loss did about it
DIAGNOSTICS = ("rollout/logp_mismatch_mean", "loss/clip_frac_low", "loss/clip_frac_high", "loss/approx_kl_old",
               "correction/weight_mean", "correction/clipped_frac", "loss/kl_ref", "train/entropy")


def diagnostics(rl: list[dict]) -> dict[str, float]:
    """The mean over the run's RL steps of each DIAGNOSTICS metric it logged."""
    return {k: statistics.mean(r[k] for r in rl if k in r) for k in DIAGNOSTICS if any(k in r for r in rl)}


def summarise(run_dir: str, cell: dict, load_start: str, wall: float, warmup: int) -> dict:
    """The run's curve, timings and overlap-model step time, as stored in --results."""
    lines = read_metrics(run_dir)
    rl = [r for r in lines if r.get("stage") == "rl"]
    start = next(r["eval/pass@1"] for r in lines if r.get("stage") == "eval" and r.get("after") != "rl")
    final = next(r["eval/pass@1"] for r in lines if r.get("stage") == "eval" and r.get("after") == "rl")
    elapsed, curve, seconds = 0.0, [(0, start)], [0.0]
    for r in rl:
        elapsed += r["time/step"]
        if "eval/pass@1" in r:
            curve.append((r["step"], r["eval/pass@1"]))
            seconds.append(elapsed)
    if curve[-1][0] != rl[-1]["step"]:  # the end-of-RL evaluation, when the last step had none
        curve.append((rl[-1]["step"], final))
        seconds.append(elapsed)
    terms = fit(run_dir, warmup)
    roll, rest, step = overlap_step(terms, cell["staleness"])
    keys = sorted(k for k in rl[-1] if k.startswith("time/"))
    medians = {k: statistics.median(r[k] for r in rl[warmup:] if k in r) for k in keys}
    return {**cell, "run_dir": os.path.relpath(run_dir, ROOT), "steps": len(rl),
            "pass@1": [[s, v] for s, v in curve], "measured_seconds": seconds,
            "modelled_step_s": step, "rollout_side_s": roll, "train_side_s": rest,
            "modelled_seconds": [s * step for s, _ in curve],
            "pass@1_start": start, "pass@1_final": final, "pass@1_peak": max(v for _, v in curve),
            "staleness_max": max(r.get("rollout/staleness_max", 0) for r in rl),
            "time_medians": medians, "diagnostics": diagnostics(rl), "rl_seconds_measured": elapsed,
            "process_seconds": wall, "load_start": load_start, "load_end": load_line()}


def cells(args) -> list[dict]:
    """Every run, seed-major (a seed's whole grid, arithmetic then calculator, before the next seed's), so a
    sweep stopped early leaves whole seeds."""
    out = []
    for i in range(max(len(args.seeds), len(args.seq_seeds), len(args.multi_seeds))):
        for task in args.tasks:
            for s in args.staleness:
                for corr in args.corrections:
                    seeds = (args.seeds if task == "arithmetic" else args.multi_seeds)
                    if corr == "tis-seq" and task == "arithmetic":
                        seeds = args.seq_seeds
                    elif corr == "tis-seq":
                        seeds = []  # the sequence-level comparison runs on arithmetic only
                    if i < len(seeds):
                        out.append({"task": task, "staleness": s, "correction": corr, "seed": seeds[i],
                                    "name": f"s{s}-{corr}-seed{seeds[i]}"})
    return out


def rl_overrides(cell: dict, ckpt: str, args) -> list[str]:
    """The `rlpost train` overrides of one RL run (after the task's recipe): async, one worker, S, correction."""
    steps = args.steps if cell["task"] == "arithmetic" else args.multi_steps
    return [f"model.name={ckpt}", "sft.steps=0", f"rl.steps={steps}", f"rl.eval_every={args.eval_every}",
            "rl.save_every=0", f"task.num_eval={args.num_eval}", "threads=1", "rl.topology=async",
            "rl.rollout_workers=1", f"rl.max_staleness={cell['staleness']}", f"seed={cell['seed']}",
            *CORRECTIONS[cell["correction"]], *TASKS[cell["task"]]["rl"](args),
            f"out_dir={os.path.join(args.out, cell['task'])}", f"run_name={cell['name']}"]


def run_cell(cell: dict, ckpt: str, args) -> dict | None:
    """One run of the grid (skipped when its summary is in --results); None when it failed."""
    path = os.path.join(args.results, cell["task"], cell["name"] + ".json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    run_dir = os.path.join(args.out, cell["task"], cell["name"])
    shutil.rmtree(run_dir, ignore_errors=True)
    spec = TASKS[cell["task"]]
    overrides = rl_overrides(cell, ckpt, args)
    load_start, t0 = load_line(), time.perf_counter()
    print(f"freshness: {cell['task']} {cell['name']} (load {load_start}) ...", flush=True)
    try:
        train(spec["recipe"], overrides, run_dir + ".log")
    except RuntimeError as e:  # one failed run must not stop the others: reported, and the sweep exits 1
        print(e, flush=True)
        return None
    kept = [o.replace(ROOT + os.sep, "") for o in overrides]  # repository-relative, as any checkout has them
    result = summarise(run_dir, {**cell, "overrides": kept}, load_start, time.perf_counter() - t0, args.warmup)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"freshness: {cell['task']} {cell['name']}: pass@1 {result['pass@1_start']:.3f} -> "
          f"{result['pass@1_final']:.3f} (peak {result['pass@1_peak']:.3f}), "
          f"{result['process_seconds']:.0f} s", flush=True)
    return result


def load_results(results: str) -> list[dict]:
    """Every run's summary under `results`; one written before summaries had diagnostics gets them from its
    run directory, when that is still there."""
    out = []
    for task in sorted(os.listdir(results)) if os.path.isdir(results) else []:
        folder = os.path.join(results, task)
        if os.path.isdir(folder):
            for name in sorted(os.listdir(folder)):
                if name.endswith(".json"):
                    path = os.path.join(folder, name)
                    with open(path) as f:
                        r = json.load(f)
                    run_dir = os.path.join(ROOT, r.get("run_dir", ""))
                    if "diagnostics" not in r and os.path.isfile(os.path.join(run_dir, "metrics.jsonl")):
                        r["diagnostics"] = diagnostics([m for m in read_metrics(run_dir) if m.get("stage") == "rl"])
                        with open(path, "w") as f:
                            json.dump(r, f, indent=1)
                    out.append(r)
    return out


def mean_sd(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{100 * xs[0]:.1f}"
    return f"{100 * statistics.mean(xs):.1f} ± {100 * statistics.stdev(xs):.1f}"


def groups(results: list[dict], task: str) -> dict[tuple[str, int], list[dict]]:
    out: dict[tuple[str, int], list[dict]] = {}
    for r in results:
        if r["task"] == task:
            out.setdefault((r["correction"], r["staleness"]), []).append(r)
    order = list(CORRECTIONS)
    return dict(sorted(out.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1])))


def pooled_step(g: dict, corr: str, staleness: int) -> tuple[float, float, float]:
    """(rollout side, train side, step) of the task's overlap model for `corr` at S = `staleness`: the sides
    measured in its synchronous runs (those of `tis` for `tis-seq` when it has none, else any correction's)."""
    for key in [(corr, 0), *([("tis", 0)] if corr == "tis-seq" else []), *[k for k in g if k[1] == 0]]:
        if key in g:
            rs = g[key]
            roll = statistics.mean(r["rollout_side_s"] for r in rs)
            rest = statistics.mean(r["train_side_s"] for r in rs)
            return roll, rest, (roll + rest if staleness == 0 else max(roll, rest))
    rs = g[(corr, staleness)]  # no synchronous run yet: the cell's own
    return (statistics.mean(r["rollout_side_s"] for r in rs), statistics.mean(r["train_side_s"] for r in rs),
            statistics.mean(r["modelled_step_s"] for r in rs))


def table(results: list[dict]) -> str:
    lines = []
    for task in sorted({r["task"] for r in results}):
        g = groups(results, task)
        starts = [r["pass@1_start"] for r in results if r["task"] == task]  # the seed's own sampling of it
        lines += [f"### {task} (held-out pass@1 in %, SFT start {mean_sd(starts)}; mean ± sd over seeds)", "",
                  "| correction | S | seeds | steps | final | peak | overlap model step (s) | the runs' own model (s) "
                  "| measured step (s) | the runs' rollout side / train side (s) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for (corr, s), rs in g.items():
            measured = statistics.mean(r["time_medians"]["time/step"] for r in rs)
            lines.append(
                f"| {corr} | {s} | {len(rs)} | {rs[0]['steps']} | {mean_sd([r['pass@1_final'] for r in rs])} "
                f"| {mean_sd([r['pass@1_peak'] for r in rs])} | {pooled_step(g, corr, s)[2]:.3f} "
                f"| {statistics.mean(r['modelled_step_s'] for r in rs):.3f} | {measured:.3f} "
                f"| {statistics.mean(r['rollout_side_s'] for r in rs):.3f} / "
                f"{statistics.mean(r['train_side_s'] for r in rs):.3f} |")
        lines += ["", "Mean over the RL steps (and seeds): how far the trainer's log-probs were from the sampler's, "
                      "and what the loss did about it", "",
                  "| correction | S | logp mismatch mean | clip frac (low + high) | IS weight mean | IS clipped frac "
                  "| kl to ref | entropy |", "|---|---|---|---|---|---|---|---|"]
        for (corr, s), rs in g.items():
            def d(key, rs=rs):
                vals = [r["diagnostics"][key] for r in rs if key in r.get("diagnostics", {})]
                return f"{statistics.mean(vals):.3g}" if vals else "—"

            clip = [r["diagnostics"].get("loss/clip_frac_low", 0) + r["diagnostics"].get("loss/clip_frac_high", 0)
                    for r in rs if "diagnostics" in r]
            lines.append(f"| {corr} | {s} | {d('rollout/logp_mismatch_mean')} "
                         f"| {f'{statistics.mean(clip):.3g}' if clip else '—'} | {d('correction/weight_mean')} "
                         f"| {d('correction/clipped_frac')} | {d('loss/kl_ref')} | {d('train/entropy')} |")
        loads = [float(r[k].split()[0]) for r in results if r["task"] == task for k in ("load_start", "load_end")
                 if r.get(k, "unknown") != "unknown"]
        if loads:
            lines += ["", f"1-minute load average at the runs' starts and ends: {min(loads):.1f} to {max(loads):.1f} "
                          f"(median {statistics.median(loads):.1f}) on {os.cpu_count()} CPUs"]
        lines.append("")
    return "\n".join(lines)


def mean_curve(rs: list[dict], seconds_per_step: float = 1.0) -> tuple[list[float], ...]:
    """x (the step x seconds_per_step), and the mean, min and max over seeds of pass@1 at each evaluation point
    the runs share."""
    n = min(len(r["pass@1"]) for r in rs)
    xs, mean, lo, hi = [], [], [], []
    for i in range(n):
        vals = [r["pass@1"][i][1] for r in rs]
        xs.append(rs[0]["pass@1"][i][0] * seconds_per_step)
        mean.append(statistics.mean(vals))
        lo.append(min(vals))
        hi.append(max(vals))
    return xs, mean, lo, hi


def plot(results: list[dict], plots: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for task in sorted({r["task"] for r in results}):
        g = groups(results, task)
        corrs = [c for c in CORRECTIONS if any(k[0] == c for k in g)]
        stale = sorted({k[1] for k in g})
        colours = {s: plt.cm.viridis(i / max(len(stale) - 1, 1)) for i, s in enumerate(stale)}
        fig, axes = plt.subplots(2, len(corrs), figsize=(4.6 * len(corrs), 7.2), squeeze=False, sharey=True)
        for col, corr in enumerate(corrs):
            for row, xlabel in enumerate(("RL step", "overlap-model wall-clock (s): step x sum (S=0) or max (S>0)")):
                ax = axes[row][col]
                for s in stale:
                    rs = g.get((corr, s))
                    if not rs:
                        continue
                    xs, mean, lo, hi = mean_curve(rs, 1.0 if row == 0 else pooled_step(g, corr, s)[2])
                    ax.plot(xs, mean, color=colours[s], label=f"S={s} ({len(rs)} seed{'s' * (len(rs) > 1)})")
                    if len(rs) > 1:
                        ax.fill_between(xs, lo, hi, color=colours[s], alpha=0.12, linewidth=0)
                ax.set_xlabel(xlabel)
                ax.grid(alpha=0.3)
                if row == 0:
                    ax.set_title(f"{task}: rollout_correction={corr}", fontsize=10)
                if col == 0:
                    ax.set_ylabel("held-out pass@1")
        axes[0][0].legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        for ext in ("svg", "png"):
            path = os.path.join(plots, f"freshness_{task}.{ext}")
            fig.savefig(path, dpi=90 if ext == "png" else None)
            written.append(path)
        plt.close(fig)
    written += plot_wall(results, plots, plt)
    return written


def plot_wall(results: list[dict], plots: str, plt) -> list[str]:
    """freshness_wall.svg/png: final held-out pass@1 against S, one line per correction, one panel per task."""
    tasks = sorted({r["task"] for r in results})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        g = groups(results, task)
        for i, corr in enumerate(c for c in CORRECTIONS if any(k[0] == c for k in g)):
            pts = sorted((s, [r["pass@1_final"] for r in rs]) for (c, s), rs in g.items() if c == corr)
            xs = [p[0] + 0.08 * (i - 1) for p in pts]  # side by side, so the error bars do not hide each other
            mean = [statistics.mean(v) for _, v in pts]
            err = [statistics.stdev(v) if len(v) > 1 else 0.0 for _, v in pts]
            ax.errorbar(xs, mean, yerr=err, marker="o", capsize=3, label=corr)
        start = statistics.mean(r["pass@1_start"] for r in results if r["task"] == task)
        ax.axhline(start, color="grey", linestyle=":", label="SFT start")
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xticks(sorted({k[1] for k in g}))
        ax.set_xticklabels([str(s) for s in sorted({k[1] for k in g})])
        ax.set_xlabel("rl.max_staleness S")
        ax.set_ylabel("final held-out pass@1 (mean ± sd)")
        ax.set_title(f"{task}: {next(iter(g.values()))[0]['steps']} RL steps", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    written = []
    for ext in ("svg", "png"):
        path = os.path.join(plots, f"freshness_wall.{ext}")
        fig.savefig(path, dpi=90 if ext == "png" else None)
        written.append(path)
    plt.close(fig)
    return written


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="arithmetic,calculator", help="arithmetic, calculator (comma-separated)")
    ap.add_argument("--staleness", default="0,1,2,4,8", help="rl.max_staleness values (default 0,1,2,4,8)")
    ap.add_argument("--corrections", default="none,tis,tis-seq",
                    help="none, tis, tis-seq (default: all three; tis-seq on arithmetic only)")
    ap.add_argument("--seeds", default="0,1,2", help="arithmetic seeds for none and tis (default 0,1,2)")
    ap.add_argument("--seq-seeds", default="0", help="arithmetic seeds for tis-seq (default 0)")
    ap.add_argument("--multi-seeds", default="0", help="calculator seeds, every correction (default 0)")
    ap.add_argument("--steps", type=int, default=80, help="arithmetic RL steps per run (default 80)")
    ap.add_argument("--multi-steps", type=int, default=60, help="calculator RL steps per run (default 60)")
    ap.add_argument("--eval-every", type=int, default=10, help="held-out pass@1 every this many steps (default 10)")
    ap.add_argument("--num-eval", type=int, default=200, help="held-out prompts (task.num_eval, default 200)")
    ap.add_argument("--lr", type=float, default=2e-4, help="RL learning rate, every run (default 2e-4, the "
                    "default recipe's)")
    ap.add_argument("--sft-steps", type=int, default=300, help="arithmetic SFT steps (default 300)")
    ap.add_argument("--sft-seed", type=int, default=0, help="the SFT runs' seed (default 0)")
    ap.add_argument("--warmup", type=int, default=3, help="first RL steps left out of the time medians")
    ap.add_argument("--parallel", type=int, default=2, help="runs at a time (default 2: this machine has 2 cores)")
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "freshness"), help="run directories")
    ap.add_argument("--results", default=os.path.join(HERE, "results", "freshness"),
                    help="per-run JSON summaries and results.md (default benchmarks/results/freshness)")
    ap.add_argument("--plots", default=os.path.join(ROOT, "docs"), help="where the figures go (default docs/)")
    ap.add_argument("--report-only", action="store_true", help="no runs: tables and plots from --results")
    args = ap.parse_args(argv)
    args.tasks = names(args.tasks, TASKS)
    args.corrections = names(args.corrections, CORRECTIONS)
    args.staleness, args.seeds = ints(args.staleness), ints(args.seeds)
    args.seq_seeds, args.multi_seeds = ints(args.seq_seeds), ints(args.multi_seeds)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    if not args.report_only:
        print(f"freshness: load {load_line()}", flush=True)
        ckpts = {task: sft(task, args) for task in args.tasks}
        with ThreadPoolExecutor(max_workers=args.parallel) as pool:  # in order, --parallel at a time
            todo = cells(args)
            failed = [c for c, r in zip(todo, pool.map(lambda c: run_cell(c, ckpts[c["task"]], args), todo))
                      if r is None]
    results = load_results(args.results)
    if not results:
        print(f"freshness: no results in {args.results} yet")
        return 1
    report = table(results)
    with open(os.path.join(args.results, "results.md"), "w") as f:
        f.write(report)
    written = plot(results, args.plots)
    print("\n" + report)
    print(f"freshness: wrote {os.path.join(args.results, 'results.md')}, {', '.join(written)}")
    if not args.report_only and failed:
        print(f"freshness: {len(failed)} run(s) failed (their logs: {args.out}/<task>/<name>.log): "
              + ", ".join(f"{c['task']} {c['name']}" for c in failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
