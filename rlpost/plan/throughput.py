"""The throughput equation of an RL step, fitted to a run's own timings: `rlpost plan throughput RUN_DIR`.

One step of the loop has five terms, each measured per step in metrics.jsonl (`time/<role>`):

    R  rollout     generating the samples                      time/rollout
    V  verifier    scoring them (reward function, env, judge)  time/reward
    F  reference   forward passes that do not train            time/reference + time/critic
    T  train       advantages and the optimizer step(s)        time/advantages + time/train
    S  sync        weights to the engine                       time/sync
    O  other       prompt picking, gathering metrics           time/other

The topology composes them (the controller's order, rlpost/controller.py):

    colocated       tau = R + V + F + T + S + O                 every role takes its turn
    disaggregated   tau = R/N + V + F + T + S' + O              the same turns, rollout split over N workers
    async           tau = max(R/N + V,  F + T + S' + O)         rollout runs ahead, overlapping the rest

S' is the sync of a topology whose engines hold their own copy: the measured S when the run already
moved weights (`sync/bytes` > 0), else bytes / bandwidth with the policy's bytes (a colocated run
that shared the trainer's module moved nothing). R/N assumes prompts split evenly and one core or
device per worker; the step still waits for the slowest worker, so with long-tailed lengths it is a
lower bound.

`fit` takes medians over the steps after a warm-up, `predict` composes them for another topology or
worker count, and `diagnose` walks "where is my wall-clock going" to a bottleneck and what to change.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import asdict, dataclass

TOPOLOGIES = ("colocated", "disaggregated", "async")


@dataclass
class Terms:
    """Seconds per step of each term (medians over the fitted steps), and what the run was."""

    rollout: float
    verifier: float
    reference: float
    train: float
    sync: float
    other: float
    measured_step: float       # the median time/step of the run itself
    topology: str              # the run's rl.topology
    workers: int               # its rl.rollout_workers (1 when colocated)
    sync_bytes: float          # bytes moved per sync (0: a shared module)
    model_bytes: float         # the policy's weights in bytes (what a copying engine would receive)
    rollout_wait: float        # seconds the trainer waited for rollouts (async: the pipeline's bubble)
    steps: int                 # steps the medians are over


def _median(lines: list[dict], key: str) -> float:
    vals = [m[key] for m in lines if isinstance(m.get(key), (int, float)) and math.isfinite(m[key])]
    return statistics.median(vals) if vals else 0.0


def _model_bytes(run_dir: str) -> float:
    """Bytes of the newest saved policy weights (safetensors files of the newest checkpoint folder)."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return 0.0
    folders = sorted((os.path.join(root, d) for d in os.listdir(root) if d != "reference"),
                     key=os.path.getmtime, reverse=True)
    for folder in folders:
        files = [f for f in os.listdir(folder) if f.endswith(".safetensors")] if os.path.isdir(folder) else []
        if files:
            return float(sum(os.path.getsize(os.path.join(folder, f)) for f in files))
    return 0.0


def fit(run_dir: str, warmup: int = 3) -> Terms:
    """The five terms from RUN_DIR's metrics.jsonl (RL steps after the first `warmup`)."""
    import yaml

    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl: not an rlpost run directory")
    with open(path) as f:
        lines = [m for m in map(json.loads, f) if m.get("stage") == "rl"]
    if not lines:
        raise ValueError(f"{run_dir} has no RL steps in metrics.jsonl: nothing to fit")
    fitted = lines[warmup:] if len(lines) > warmup else lines
    cfg = {}
    if os.path.isfile(os.path.join(run_dir, "config.yaml")):
        with open(os.path.join(run_dir, "config.yaml")) as f:
            cfg = yaml.safe_load(f).get("rl", {})
    topology = cfg.get("topology", "colocated")
    return Terms(
        rollout=_median(fitted, "time/rollout"), verifier=_median(fitted, "time/reward"),
        reference=_median(fitted, "time/reference") + _median(fitted, "time/critic"),
        train=_median(fitted, "time/advantages") + _median(fitted, "time/train"),
        sync=_median(fitted, "time/sync"), other=_median(fitted, "time/other"),
        measured_step=_median(fitted, "time/step"), topology=topology,
        workers=int(cfg.get("rollout_workers", 1)) if topology != "colocated" else 1,
        sync_bytes=_median(fitted, "sync/bytes"), model_bytes=_model_bytes(run_dir),
        rollout_wait=_median(fitted, "time/rollout_wait"), steps=len(fitted))


def predict(t: Terms, topology: str, workers: int = 1, sync_gbps: float = 1.0) -> dict[str, float]:
    """Step time of `topology` with `workers` rollout workers, from terms fitted on any topology.

    The fitted rollout term is the run's own rollout seconds, made with `t.workers` workers: it is
    scaled to one worker first (x t.workers), then split over `workers`. `sync_gbps`: GB/s of the
    weight transfer a copying engine needs, used when the run itself moved nothing."""
    if topology not in TOPOLOGIES:
        raise ValueError(f"topology must be one of {', '.join(TOPOLOGIES)}, got {topology!r}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    one_worker = t.rollout * t.workers
    if topology == "colocated":
        rollout = one_worker
        sync = t.sync if t.topology == "colocated" else 0.0  # colocated shares the module: nothing moves
    else:
        rollout = one_worker / workers
        sync = t.sync if t.sync_bytes > 0 else t.model_bytes / (sync_gbps * 1e9)
    rollout_side = rollout + t.verifier
    train_side = t.reference + t.train + sync + t.other
    step = max(rollout_side, train_side) if topology == "async" else rollout_side + train_side
    return {"topology": topology, "workers": workers, "step_s": step, "rollout_side_s": rollout_side,
            "train_side_s": train_side, "rollout_s": rollout, "sync_s": sync}


def diagnose(t: Terms) -> dict:
    """The bottleneck and what to change, from the fitted shares ('where is my wall-clock going')."""
    parts = {"rollout": t.rollout, "verifier": t.verifier, "reference": t.reference, "train": t.train,
             "sync": t.sync, "other": t.other}
    total = sum(parts.values()) or 1.0
    shares = {k: v / total for k, v in parts.items()}
    advice: list[str] = []
    if t.topology == "async":
        rollout_side, train_side = t.rollout + t.verifier, t.reference + t.train + t.sync + t.other
        if rollout_side > train_side:
            bottleneck = "rollout"
            advice.append(f"the trainer waits {t.rollout_wait:.3f} s/step for rollouts: add rollout workers "
                          f"(rl.rollout_workers={t.workers + 1} predicts {predict(t, 'async', t.workers + 1)['step_s']:.3f} "
                          "s/step) or a faster engine (rollout.engine, rollout.max_num_seqs)")
        else:
            bottleneck = "train"
            advice.append("rollout keeps up with training: the step is the trainer's; speed the train side up "
                          "(below), or spend the idle rollout time on more samples (rollout.k)")
    else:
        bottleneck = max(parts, key=parts.get)
    if shares["rollout"] >= 0.5 or bottleneck == "rollout":
        if t.topology == "colocated":
            a = predict(t, "async", 1)
            advice.append(f"rollout is {100 * shares['rollout']:.0f}% of the step: overlap it with training "
                          f"(rl.topology=async predicts {a['step_s']:.3f} s/step vs {t.measured_step:.3f} now), "
                          "or split it over workers (rl.rollout_workers)")
        advice.append("check the long tail: rollout/truncated_frac near 1 means responses hit max_new_tokens; a "
                      "shorter cap or rollout.max_num_seqs helps decode throughput")
    if shares["verifier"] >= 0.2:
        advice.append(f"the verifier is {100 * shares['verifier']:.0f}% of the step: score in parallel "
                      "(task.reward_workers), batch a judge, or move scoring off the critical path (async)")
    if shares["train"] >= 0.4 or bottleneck == "train":
        advice.append(f"training is {100 * shares['train']:.0f}% of the step: trainer.precision=bf16 on hardware "
                      "with fast bf16, a larger trainer.micro_batch_size, trainer.compile, fewer epochs or "
                      "minibatches, or shard it over more devices (trainer.strategy=fsdp2)")
    if shares["reference"] >= 0.2:
        advice.append(f"the reference is {100 * shares['reference']:.0f}% of the step: algorithm.beta=0 skips it, "
                      "and with model.lora the reference is the base model (no second copy)")
    if shares["sync"] >= 0.1:
        advice.append(f"weight sync is {100 * shares['sync']:.0f}% of the step: rl.weight_sync=collective for large "
                      "models, model.lora to send adapters only, or a colocated engine sharing the module")
    if not advice:
        advice.append("no term dominates: the step is balanced")
    return {"bottleneck": bottleneck, "shares": shares, "advice": advice}


def report(run_dir: str, warmup: int = 3, sync_gbps: float = 1.0, workers: list[int] | None = None) -> dict:
    """Everything `rlpost plan throughput` prints: the terms, each topology's predicted step, the diagnosis."""
    t = fit(run_dir, warmup)
    counts = sorted(set(workers or [1, 2, 4]))
    predictions = [predict(t, "colocated", 1, sync_gbps)] + [predict(t, top, n, sync_gbps)
                                                             for top in ("disaggregated", "async") for n in counts]
    return {"run_dir": run_dir, "terms": asdict(t), "predictions": predictions, "diagnosis": diagnose(t)}


def format_report(r: dict) -> str:
    t = r["terms"]
    lines = [f"{r['run_dir']}: rl.topology={t['topology']}, {t['workers']} worker(s); medians over {t['steps']} steps",
             "", "  term          s/step   share"]
    total = sum(t[k] for k in ("rollout", "verifier", "reference", "train", "sync", "other")) or 1.0
    for k in ("rollout", "verifier", "reference", "train", "sync", "other"):
        lines.append(f"  {k:<12}{t[k]:8.4f}  {100 * t[k] / total:5.1f}%")
    lines.append(f"  measured step {t['measured_step']:8.4f}")
    lines += ["", "  predicted step time           s/step   vs this run"]
    for p in r["predictions"]:
        name = p["topology"] + (f", {p['workers']} worker(s)" if p["topology"] != "colocated" else "")
        lines.append(f"  {name:<28}{p['step_s']:8.4f}   {t['measured_step'] / max(p['step_s'], 1e-12):5.2f}x")
    d = r["diagnosis"]
    lines += ["", f"  bottleneck: {d['bottleneck']}"] + [f"  - {a}" for a in d["advice"]]
    return "\n".join(lines)
