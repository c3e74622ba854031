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


def _metric_lines(path: str) -> list[dict]:
    """The JSON objects of a metrics.jsonl, one a line. The last line may be cut short (a run killed while
    writing it, as --resume drops): it is left out. Any other line that is not a JSON object is a ValueError
    naming the file and the line."""
    with open(path, "rb") as f:
        raw = f.read().splitlines()
    out = []
    for n, line in enumerate(raw, 1):
        if not line.strip():
            continue
        try:
            m = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if n == len(raw) and not raw[-1].endswith(b"}"):  # the half line a kill leaves
                break
            raise ValueError(f"{path}: line {n} is not a JSON line ({e}): was the file edited?") from None
        if not isinstance(m, dict):
            raise ValueError(f"{path}: line {n} is a JSON {type(m).__name__}, not the object of metrics rlpost writes")
        out.append(m)
    return out


def fit(run_dir: str, warmup: int = 3) -> Terms:
    """The five terms from RUN_DIR's metrics.jsonl (RL steps after the first `warmup`)."""
    import yaml

    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl: not an rlpost run directory")
    lines = [m for m in _metric_lines(path) if m.get("stage") == "rl"]
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
                          f"(rl.rollout_workers={t.workers + 1} predicts "
                          f"{predict(t, 'async', t.workers + 1)['step_s']:.3f} "
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


# ---------------------------------------------------------------------------- before any run: a roofline

@dataclass
class Hardware:
    """One GPU and its links. Defaults: an H100 SXM 80 GB (dense bf16 989 TFLOP/s, HBM3 3.35 TB/s)."""

    tflops: float = 989.0        # peak dense bf16 TFLOP/s
    hbm_tbs: float = 3.35        # HBM bandwidth, TB/s
    mfu: float = 0.4             # the fraction of peak FLOP/s that training, scoring and prefill reach
    decode_efficiency: float = 0.6  # the fraction of HBM bandwidth a decode step reaches
    nvlink_gbs: float = 450.0    # GB/s between the GPUs of a node (colocated weight resharding)
    network_gbs: float = 50.0    # GB/s to engines on other GPUs (disaggregated / async weight broadcast)


@dataclass
class Workload:
    """One RL step: `prompts` x `k` sequences of `prompt_len` + `response_len` tokens."""

    prompts: int = 128
    k: int = 8
    prompt_len: int = 512
    response_len: int = 1024     # the mean response length
    length_sigma: float = 0.0    # response lengths log-normal with this sigma (0: all equal; ~0.5-1 is typical)
    max_response_len: int | None = None  # the length cap (default 4 x the mean)
    verifier_s: float = 0.0      # seconds of scoring per step (CPU work the roofline cannot know: measure it)
    reference: bool = True       # a KL term needs the reference's forward pass
    rollout_gpus: int | None = None  # disaggregated / async: GPUs of the engines (default half)


def roofline(shape, gpus: int, topology: str = "colocated", work: Workload | None = None,
             hw: Hardware | None = None) -> dict:
    """The five terms of one step of `shape` (rlpost.plan.memory.ModelShape) on `gpus` GPUs, from FLOPs and
    bytes (bf16 weights, one engine replica per GPU, data parallel):

        rollout    prefill 2 N P per sequence at mfu, then each of R decode steps costs
                   max((2N + KV bytes of the replica's sequences) / (HBM * decode_efficiency),
                       2 N * sequences / (peak * mfu))                       (memory- or compute-bound)
        reference  2 N (P + R) per sequence at mfu over the training GPUs    (a forward)
        train      6 N (P + R) per sequence at mfu over the training GPUs    (forward + backward)
        sync       2N bytes: over NVLink when the engines share the GPUs, over the network otherwise
        verifier   as given (Workload.verifier_s)

    With `length_sigma` > 0 the responses' lengths are the quantiles of a log-normal of that sigma and
    the given mean, capped at `max_response_len`: decode runs until the longest ends while the batch
    thins out, which is the long tail (the straggler tax) that makes rollout dominate real runs. With
    sigma 0 every response has the mean length: a lower bound on rollout."""
    work, hw = work or Workload(), hw or Hardware()
    if topology not in TOPOLOGIES:
        raise ValueError(f"topology must be one of {', '.join(TOPOLOGIES)}, got {topology!r}")
    n, weight_bytes = shape.num_params(), 2 * shape.num_params()
    if topology == "colocated":
        roll_gpus = train_gpus = gpus
    else:
        roll_gpus = work.rollout_gpus or max(gpus // 2, 1)
        train_gpus = gpus - roll_gpus
        if train_gpus < 1:
            raise ValueError(f"{topology}: {roll_gpus} rollout GPUs leave none of {gpus} to train")
    flops = hw.tflops * 1e12 * hw.mfu
    seqs = work.prompts * work.k
    per_replica = math.ceil(seqs / roll_gpus)
    lengths = response_lengths(work, per_replica)   # one replica's sequences, longest last
    kv_per_token = 2 * shape.num_layers * shape.num_kv_heads * shape.dim * 2
    rollout = 2 * n * work.prompt_len * per_replica / flops
    active, done = per_replica, 0
    for t in range(lengths[-1]):
        while lengths[done] <= t:    # the sequences that ended before step t leave the batch
            done += 1
        active = per_replica - done
        kv = kv_per_token * active * (work.prompt_len + t)
        rollout += max((weight_bytes + kv) / (hw.hbm_tbs * 1e12 * hw.decode_efficiency), 2 * n * active / flops)
    tokens = seqs * work.prompt_len + sum(lengths) * seqs / per_replica
    reference = 2 * n * tokens / (flops * train_gpus) if work.reference else 0.0
    train = 6 * n * tokens / (flops * train_gpus)
    sync = weight_bytes / ((hw.nvlink_gbs if topology == "colocated" else hw.network_gbs) * 1e9)
    terms = {"rollout": rollout, "verifier": work.verifier_s, "reference": reference, "train": train, "sync": sync}
    rollout_side, train_side = rollout + work.verifier_s, reference + train + sync
    step = max(rollout_side, train_side) if topology == "async" else rollout_side + train_side
    total = sum(terms.values())
    return {"model": shape.name, "params": n, "gpus": gpus, "topology": topology, "rollout_gpus": roll_gpus,
            "train_gpus": train_gpus, "terms_s": terms, "shares": {k: v / total for k, v in terms.items()},
            "step_s": step, "workload": asdict(work), "hardware": asdict(hw)}


def response_lengths(work: Workload, count: int) -> list[int]:
    """`count` response lengths, sorted: all `response_len`, or the log-normal quantiles (i + 0.5) / count with
    mean `response_len` and `length_sigma`, capped at `max_response_len` (default 4 x the mean)."""
    if work.length_sigma <= 0:
        return [work.response_len] * count
    cap = work.max_response_len or 4 * work.response_len
    mu = math.log(work.response_len) - work.length_sigma ** 2 / 2   # E[L] = exp(mu + sigma^2 / 2)
    normal = statistics.NormalDist()
    return sorted(min(cap, max(1, round(math.exp(mu + work.length_sigma * normal.inv_cdf((i + 0.5) / count)))))
                  for i in range(count))


def format_roofline(results: list[dict]) -> str:
    w, first = results[0]["workload"], results[0]
    tail = (f"lengths log-normal, sigma {w['length_sigma']}, cap {w['max_response_len'] or 4 * w['response_len']}"
            if w["length_sigma"] > 0 else "every response that long")
    lines = [f"{first['model']} ({first['params'] / 1e9:.2f}B params) on {first['gpus']} GPUs: {w['prompts']} prompts "
             f"x {w['k']} samples, {w['prompt_len']} + {w['response_len']} tokens on average ({tail})", "",
             f"  {'':30}" + "".join(f"{k:>11}" for k in first["terms_s"]) + f"{'step':>11}"]
    for r in results:
        name = r["topology"] + ("" if r["topology"] == "colocated" else f" {r['rollout_gpus']}+{r['train_gpus']} GPUs")
        lines.append(f"  {name + ' (s)':<30}" + "".join(f"{v:11.2f}" for v in r["terms_s"].values())
                     + f"{r['step_s']:11.2f}")
        lines.append(f"  {'  share of the terms':<30}" + "".join(f"{100 * v:10.0f}%" for v in r["shares"].values()))
    return "\n".join(lines)
