"""REPORT: one self-contained HTML page that shows what a run did.

    rlpost report runs/default-X                 # runs/default-X/report/index.html, one PNG per figure beside it
    path = build_report("runs/default-X", out="report.html")

It reads only the run directory (metrics.jsonl, summary.json, config.yaml, rollouts.jsonl, profile/*.json),
draws matplotlib figures (Agg: no display needed), saves each as a PNG and embeds the same bytes in the
page as a data: URI. The page loads nothing from anywhere: no network, no external CSS or JavaScript,
so it can be mailed, attached or opened offline. Sections:

    reward        training reward per RL step (raw and smoothed); held-out pass@1 during and between stages
    dynamics      KL to the reference, entropy, response length, clip fraction
    time          where each step's wall-clock went (stacked per role) and tokens per second
    memory        each role's memory peak per step (mem/peak_<role>), a table of the largest, and gpu/util
    correction    the importance-weight histogram per step (algorithm.rollout_correction) and the engine vs
                  trainer log-prob mismatch
    gold          gold (verifier) vs proxy (reward model) reward, when a reward model was the RL reward
    env           an environment's episodes (task.env): turns, environment tokens, budget stops, errors and
                  timeouts, tool calls (env/* metrics), and each turn's reward (rollouts.jsonl's turns)
    supervised    the SFT stages' loss (sft/nll) and the preference stages' (train/loss, pref/reward_margin,
                  pref/accuracy) per step, so a run without RL, or still in SFT, is not an empty page
    samples       best and worst sampled completions of each step kept in rollouts.jsonl (log.rollouts_every);
                  an environment's episodes turn by turn
    config        config.yaml and summary.json
    profile       links to torch.profiler traces in profile/ (trainer.profile_steps)

A partial run (killed mid-RL, no RL stage at all, metrics with nulls) still gets every section: one
whose data is missing says what is missing and why, instead of a figure. The status in the header is
summary.json's, unless the run wrote after it (a resume that is running, or that was killed): see
`run_status`.
"""

from __future__ import annotations

import base64
import glob
import html
import io
import json
import math
import os
import time
from dataclasses import dataclass, field

from rlpost.config import Config, from_dict, stage_configs
from rlpost.settings.task import source_name

ROLES = ("rollout", "reward", "reference", "critic", "advantages", "train", "sync", "other")  # controller.TIMED
HIST_PREFIX = "correction/weight_hist/"
SAMPLES_PER_END = 3      # best and worst completions shown per kept step
MAX_SAMPLE_STEPS = 12    # kept steps shown in the table (evenly spread, first and last included)
MAX_TEXT = 2000          # characters of a prompt or completion shown in the table
RECENT_S = 900           # a run that wrote this recently without a summary.json after it is taken as running
COPY_SLACK_S = 2         # a copied run directory's files may land out of order: writes this close are not "after"


def _pyplot():
    """matplotlib.pyplot on the Agg backend, or a clear error naming the install command."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("rlpost report draws its figures with matplotlib, which is not installed: "
                          "pip install 'rlpost[report]'  (or: pip install matplotlib)") from e
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------------------- reading the run directory

def read_jsonl(path: str) -> list[dict]:
    """Every JSON object line of a file; a line cut short by a kill (or otherwise unreadable, bytes that are not
    UTF-8 included) is skipped."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:  # (a bad byte spoils its line, not the whole page)
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                out.append(record)
    return out


def _number(v) -> float:
    """A metric value as a float; None, strings and non-finite values become NaN."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return math.nan
    return float(v) if math.isfinite(v) else math.nan


@dataclass
class RunData:
    """What a run directory holds, read once. `rl` has one metrics line per RL step (the last line of a
    step wins, should a step appear twice), ordered by step."""

    run_dir: str
    rl: list[dict] = field(default_factory=list)
    sft: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    config_text: str = ""
    config: dict = field(default_factory=dict)
    rollouts: list[dict] = field(default_factory=list)
    metrics: list[dict] = field(default_factory=list)  # every line of metrics.jsonl, in order
    traces: list[str] = field(default_factory=list)
    eval_x: dict = field(default_factory=dict)  # each evaluation between stages: the RL step it came after

    @classmethod
    def load(cls, run_dir: str) -> "RunData":
        if not os.path.isdir(run_dir):
            raise FileNotFoundError(f"{run_dir} is not a directory")
        metrics = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
        if not metrics and not os.path.exists(os.path.join(run_dir, "config.yaml")):
            raise FileNotFoundError(f"{run_dir} is not an rlpost run directory (no metrics.jsonl or config.yaml)")
        by_step, eval_x, last = {}, {}, 0
        for m in metrics:
            if m.get("stage") == "rl" and isinstance(m.get("step"), int):
                by_step[m["step"]], last = m, m["step"]
            elif m.get("stage") == "eval" and "after" in m:
                eval_x[m["after"]] = last
        data = cls(run_dir=run_dir, rl=[by_step[s] for s in sorted(by_step)],
                   sft=[m for m in metrics if m.get("stage") == "sft"],
                   evals=[m for m in metrics if m.get("stage") == "eval"],
                   rollouts=read_jsonl(os.path.join(run_dir, "rollouts.jsonl")), metrics=metrics,
                   traces=sorted(glob.glob(os.path.join(run_dir, "profile", "*.json"))), eval_x=eval_x)
        path = os.path.join(run_dir, "summary.json")
        if os.path.exists(path):
            try:
                with open(path) as f:
                    data.summary = json.load(f)
            except ValueError:
                data.summary = {"status": "summary.json is unreadable (the run may have been killed while writing it)"}
        path = os.path.join(run_dir, "config.yaml")
        if os.path.exists(path):
            import yaml

            with open(path, encoding="utf-8", errors="replace") as f:
                data.config_text = f.read()
            try:
                data.config = yaml.safe_load(data.config_text) or {}
            except yaml.YAMLError:
                data.config = {}
            if not isinstance(data.config, dict):  # (shown as its text; no section of it is read)
                data.config = {}
        return data

    def stage_lines(self, key: str, *, preference: bool = False) -> dict[str, list[dict]]:
        """{stage label: its metrics lines that have `key`, by step} of the SFT stages (sft, rejection, sft_2,
        ...: lines with sft/nll) or, `preference`, of the preference stages (preference, preference_2, ...)."""
        out: dict[str, dict[int, dict]] = {}
        for m in self.metrics:
            stage = m.get("stage")
            if not isinstance(stage, str) or not isinstance(m.get("step"), int) or key not in m:
                continue
            if preference and not (stage.startswith("preference") and not stage.endswith(("_data", "_eval"))):
                continue
            if not preference and "sft/nll" not in m:
                continue
            out.setdefault(stage, {})[m["step"]] = m  # the last line of a step wins
        return {stage: [by_step[k] for k in sorted(by_step)] for stage, by_step in out.items()}

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(RL steps, values of `key`) over the RL lines that have the key; nulls are NaN."""
        pairs = [(m["step"], _number(m[key])) for m in self.rl if key in m]
        return [s for s, _ in pairs], [v for _, v in pairs]

    def has(self, key: str) -> bool:
        """Some RL line has a finite value of `key`."""
        return any(math.isfinite(v) for v in self.series(key)[1])

    def setting(self, dotted: str, default=None):
        """A value of the resolved config, e.g. setting('rl.steps')."""
        node = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    def planned_rl_steps(self):
        """The RL steps of the `stages` list's RL stages, each with its own settings (without a list: rl.steps);
        None when unknown."""
        steps, stages = self.setting("rl.steps"), self.setting("stages")
        if not isinstance(steps, int) or not isinstance(stages, list):
            return steps
        try:
            return sum(c.rl.steps for name, c in stage_configs(from_dict(Config, self.config)) if name == "rl")
        except (ValueError, TypeError):  # a config this version cannot read
            return None


def _live_resume(run_dir: str) -> int | None:
    """The id of a live `rlpost train --resume RUN_DIR` process of this run (Linux /proc; None elsewhere, or when
    there is none). Its argument is resolved against the process's own working directory."""
    target = os.path.realpath(run_dir)
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return None
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = [a.decode(errors="replace") for a in f.read().split(b"\0")]
            if "--resume" not in args or not any("rlpost" in a for a in args):
                continue
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:  # gone meanwhile, or another user's
            continue
        given = args[args.index("--resume") + 1] if args.index("--resume") + 1 < len(args) else ""
        if given and os.path.realpath(os.path.join(cwd, given)) == target:
            return pid
    return None


def _ago(seconds: float) -> str:
    return (f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200
            else f"{seconds / 3600:.1f} h")


def run_status(data: RunData, now: float | None = None) -> str:
    """The run's status for the header. summary.json is written when a run ends (ok, interrupted, failed), so a
    resumed run keeps its previous summary.json while it runs: when metrics.jsonl or rollouts.jsonl was written
    after it, the status is "running" if a `rlpost train --resume` of this run is alive or the last write is
    recent (RECENT_S), else "stopped without a summary" (killed: no handler ran). `now`: the time to compare with."""
    now = time.time() if now is None else now
    status = data.summary.get("status")
    path = os.path.join(data.run_dir, "summary.json")
    written = os.path.getmtime(path) if os.path.exists(path) else None
    last = max((os.path.getmtime(p) for p in (os.path.join(data.run_dir, f) for f in ("metrics.jsonl",
                                                                                       "rollouts.jsonl"))
                if os.path.exists(p)), default=None)
    if status == "running":
        return "running"
    if written is not None and (last is None or last <= written + COPY_SLACK_S):
        return str(status) if status is not None else "summary.json without a status"
    before = f"; summary.json is from before it: {status}" if written is not None else "; no summary.json yet"
    pid = _live_resume(data.run_dir)
    if pid is not None:
        return f"running (process {pid}, resumed{before})"
    if last is not None and now - last < RECENT_S:
        return f"running (last write {_ago(now - last)} ago{before})"
    if written is None:
        return (f"no summary.json: the run stopped without one (killed?), last write {_ago(now - last)} ago"
                if last is not None else "no summary.json (the run is running, or was killed)")
    return (f"stopped without a summary (killed?): last write {_ago(now - last)} ago, after summary.json "
            f"({status}); continue with `rlpost train --resume {data.run_dir}`")


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over the finite values of the last `window` points (NaN when there are none)."""
    out = []
    for i in range(len(values)):
        recent = [v for v in values[max(0, i - window + 1):i + 1] if math.isfinite(v)]
        out.append(sum(recent) / len(recent) if recent else math.nan)
    return out


# ---------------------------------------------------------------------------- figures

@dataclass
class Section:
    """One part of the page: a title, a note (what the figure shows, or why it is empty), and a figure
    (a PNG file name under the report folder) or HTML of its own."""

    key: str
    title: str
    note: str = ""
    png: str | None = None
    body: str = ""


def _no_rl_reason(data: RunData) -> str:
    planned = data.planned_rl_steps()
    if planned == 0:
        return "the run had no RL stage" + ("" if data.setting("stages") else " (rl.steps=0)")
    status = run_status(data)  # (a resume in progress still holds the summary.json of the run it continues)
    return f"no RL step was logged (rl.steps={planned}; status: {status})"


def _lines(ax, data: RunData, keys: dict[str, str], *, log: bool = False) -> bool:
    """Plot each key's series on `ax` with its label; True when anything finite was drawn."""
    drawn = False
    for key, label in keys.items():
        steps, values = data.series(key)
        if log:
            values = [v if v > 0 else math.nan for v in values]
        if any(math.isfinite(v) for v in values):
            ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=label)
            drawn = True
    if log and drawn:
        ax.set_yscale("log")
    if drawn:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_xlabel("RL step")
    ax.grid(alpha=0.3)
    return drawn


def fig_reward(plt, data: RunData):
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.4))
    steps, reward = data.series("reward/mean")
    if any(math.isfinite(v) for v in reward):
        window = max(1, len(steps) // 10)
        left.plot(steps, reward, color="tab:blue", alpha=0.35, lw=1, label="reward/mean (raw)")
        left.plot(steps, smooth(reward, window), color="tab:blue", lw=2, label=f"smoothed ({window} steps)")
        left.legend(fontsize=8)
    else:
        left.text(0.5, 0.5, "no reward logged", ha="center", va="center", transform=left.transAxes, color="grey")
    left.set(title="training reward (this step's samples)", xlabel="RL step")
    left.grid(alpha=0.3)

    last = steps[-1] if steps else 0
    e_steps, e_vals = data.series("eval/pass@1")
    drawn = False
    if any(math.isfinite(v) for v in e_vals):
        right.plot(e_steps, e_vals, "o-", color="tab:green", label="eval/pass@1 during RL")
        drawn = True
    stage_x = {"start": 0, "sft": 0, "dpo": 0, "rl": data.setting("rl.steps") or last}
    for label, marker in (("start", "s"), ("sft", "D"), ("dpo", "^"), ("rl", "*")):
        v = _number(data.summary.get(f"pass@1_{label}"))
        if math.isfinite(v):
            right.plot([stage_x[label]], [v], marker, ms=10 if marker == "*" else 7, label=f"pass@1_{label}")
            drawn = True
    for label, x in data.eval_x.items():  # the evaluations of a `stages` list: after rejection, rl_2, ...
        v = _number(data.summary.get(f"pass@1_{label}"))
        if label not in stage_x and math.isfinite(v):
            right.plot([x], [v], "o", ms=7, label=f"pass@1_{label}")
            drawn = True
    demo = _number(data.summary.get("demonstrator_accuracy"))
    if math.isfinite(demo):
        right.axhline(demo, color="grey", ls="--", lw=1, label="demonstrator")
        drawn = True
    if drawn:
        right.legend(fontsize=8)
    else:
        right.text(0.5, 0.5, "no held-out evaluation", ha="center", va="center", transform=right.transAxes,
                   color="grey")
    right.set(title="held-out pass@1", xlabel="RL step (stages before RL at 0)", ylim=(-0.02, 1.02))
    right.grid(alpha=0.3)
    return fig


def fig_dynamics(plt, data: RunData):
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.2))
    panels = [("KL(π‖π_ref) per token", {"loss/kl_ref": "loss/kl_ref"}, False),
              ("entropy on response tokens", {"train/entropy": "train/entropy"}, False),
              ("response length (tokens)", {"rollout/response_len_mean": "mean", "rollout/response_len_max": "max"},
               False),
              ("clipped tokens", {"loss/clip_frac_low": "clip_frac_low", "loss/clip_frac_high": "clip_frac_high"},
               False)]
    for ax, (title, keys, log) in zip(axes, panels):
        _lines(ax, data, keys, log=log)
        ax.set_title(title, fontsize=10)
    return fig


def fig_time(plt, data: RunData):
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.4), gridspec_kw={"width_ratios": [3, 2]})
    steps = [m["step"] for m in data.rl]
    rows = [[_number(m.get(f"time/{role}", 0.0)) for m in data.rl] for role in ROLES]
    rows = [[0.0 if not math.isfinite(v) else v for v in row] for row in rows]
    if steps and any(any(row) for row in rows):
        left.stackplot(steps, rows, labels=ROLES, alpha=0.85)
        left.legend(fontsize=7, ncol=4, loc="upper left")
        left.set_ylim(0, max(sum(col) for col in zip(*rows)) * 1.35)
    else:
        left.text(0.5, 0.5, "no timings logged", ha="center", va="center", transform=left.transAxes, color="grey")
    left.set(title="seconds per step, by role", xlabel="RL step", ylabel="s")
    left.grid(alpha=0.3)
    _lines(right, data, {"rollout/tokens_per_s": "generation (rollout/tokens_per_s)",
                         "step/tokens_per_s": "whole step (step/tokens_per_s)"})
    right.set_title("generated tokens per second")
    return fig


MEM_PREFIXES = ("mem/peak_", "mem/peak_so_far_")  # rlpost.devices.RoleProbe: reset per role, or not resettable


def memory_keys(data: RunData) -> dict[str, str]:
    """{metric key: role} of the memory peaks the run logged, in the controller's role order."""
    keys = {k for m in data.rl for k in m if k.startswith("mem/")}
    out = {}
    for role in ROLES:  # the so-far name only where the per-role one is absent (a CPU without clear_refs)
        for prefix in MEM_PREFIXES:
            if prefix + role in keys:
                out[prefix + role] = role
                break
    return out


def fig_memory(plt, data: RunData):
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.4), gridspec_kw={"width_ratios": [3, 2]})
    keys = memory_keys(data)
    _lines(left, data, {k: role for k, role in keys.items()})
    so_far = any(k.startswith("mem/peak_so_far_") for k in keys)
    left.set(title="peak memory per role" + (" (process peak so far)" if so_far else ""), ylabel="MiB")
    if data.has("gpu/util"):
        _lines(right, data, {"gpu/util": "gpu/util (NVML)"})
        right.set(title="GPU utilisation", ylabel="%", ylim=(-2, 102))
    else:
        peaks = [max((v for v in data.series(k)[1] if math.isfinite(v)), default=0.0) for k in keys]
        if peaks:
            right.barh(list(keys.values()), peaks, color="tab:purple")
            for y, v in enumerate(peaks):
                right.text(v, y, f" {v:,.0f}", va="center", fontsize=8)
            right.set_xlim(0, max(peaks) * 1.25 or 1)
            right.invert_yaxis()
        right.set(title="largest peak of the run, per role", xlabel="MiB")
        right.grid(alpha=0.3, axis="x")
    return fig


def memory_table(data: RunData) -> str:
    """HTML: per role, the largest peak of the run (and its step), the last step's and the median."""
    rows = []
    for key, role in memory_keys(data).items():
        pairs = [(s, v) for s, v in zip(*data.series(key)) if math.isfinite(v)]
        if not pairs:
            continue
        step, top = max(pairs, key=lambda p: p[1])
        values = sorted(v for _, v in pairs)
        rows.append(f"<tr><td>{_esc(role)}</td><td>{_esc(key)}</td><td><b>{top:,.0f}</b></td><td>{_esc(step)}</td>"
                    f"<td>{pairs[-1][1]:,.0f}</td><td>{values[len(values) // 2]:,.0f}</td></tr>")
    if not rows:
        return ""
    head = ("<tr><th>role</th><th>metric</th><th>largest peak (MiB)</th><th>at step</th><th>last step (MiB)</th>"
            "<th>median (MiB)</th></tr>")
    return f"<table class='samples' id='memory-table'>{head}{''.join(rows)}</table>"


def _memory_note(data: RunData) -> str:
    keys = memory_keys(data)
    if not keys:
        return ("No mem/peak_<role> metrics: the run was made by an rlpost version that did not log them, "
                "or every step was cut before its metrics were written.")
    note = ("The most memory each role held during the step, in MiB: on a GPU, CUDA's max_memory_allocated "
            "(tensors only, not the allocator's free cache), reset as each role starts; on the CPU, the "
            "process's peak resident set size, reset the same way. After an out-of-memory, the role whose "
            "peak rose is the one to shrink (rollout: rollout.k or max_new_tokens; train / reference: "
            "trainer.micro_batch_size or trainer.logprob_chunk).")
    if any(k.startswith("mem/peak_so_far_") for k in keys):
        note += (" This machine could not reset the peak resident set (no writable /proc/self/clear_refs), so "
                 "each value is the process's peak so far (mem/peak_so_far_<role>): it only ever rises.")
    if data.has("gpu/util"):
        note += " Right: gpu/util, NVML's share of time a kernel ran, averaged over the step's roles."
    return note


def hist_bins(data: RunData) -> list[tuple[float, str]]:
    """The importance-weight histogram's bins logged by the run, as (lower edge, key), lowest first."""
    keys = {k for m in data.rl for k in m if k.startswith(HIST_PREFIX)}
    bins = []
    for key in keys:
        try:
            bins.append((float(key[len(HIST_PREFIX):].split("-")[0]), key))
        except ValueError:
            continue
    return sorted(bins)


def fig_correction(plt, data: RunData):
    bins = hist_bins(data)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6))
    if bins:
        import numpy as np

        steps = [m["step"] for m in data.rl]
        grid = np.array([[_number(m.get(key)) for m in data.rl] for _, key in bins], dtype=float)
        grid = np.ma.masked_invalid(grid)
        edges = [s - 0.5 for s in steps] + [steps[-1] + 0.5] if steps else [0, 1]
        mesh = left.pcolormesh(edges, np.arange(len(bins) + 1), grid, cmap="Blues", vmin=0, vmax=1,
                               shading="flat")
        left.set_yticks(np.arange(len(bins)) + 0.5)
        left.set_yticklabels([key[len(HIST_PREFIX):] for _, key in bins], fontsize=7)
        fig.colorbar(mesh, ax=left, label="fraction of response tokens")
        left.set(title="importance weight π_prox/μ per step", xlabel="RL step", ylabel="weight bin")
    else:
        left.text(0.5, 0.5, "no importance-weight histogram\n(algorithm.rollout_correction was off)", ha="center",
                  va="center", transform=left.transAxes, color="grey")
        left.set_axis_off()
    _lines(right, data, {"rollout/logp_mismatch_max": "max", "rollout/logp_mismatch_mean": "mean"}, log=True)
    right.set_title("|engine log-prob − trainer log-prob| (log scale)")
    return fig


PQ_PREFIX = "data/pq_hist_"  # rl.recycle_every: the share of a step's prompts per p(1-p) bin (rlpost/prompts.py)


def source_names(data: RunData) -> list[str]:
    """The names of task.sources whose reward/<name> the run logged."""
    return sorted({k[len("reward/"):] for m in data.rl for k in m if k.startswith("reward/")}
                  & {str(source_name(e)) for e in data.setting("task.sources") or [] if isinstance(e, dict)})


def fig_data(plt, data: RunData):
    bins = sorted((int(k[len(PQ_PREFIX):]), k) for k in {k for m in data.rl for k in m if k.startswith(PQ_PREFIX)})
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(14, 3.6))
    if bins:
        import numpy as np

        steps = [m["step"] for m in data.rl]
        grid = np.ma.masked_invalid(np.array([[_number(m.get(key)) for m in data.rl] for _, key in bins],
                                             dtype=float))
        edges = [s - 0.5 for s in steps] + [steps[-1] + 0.5] if steps else [0, 1]
        mesh = left.pcolormesh(edges, np.arange(len(bins) + 1), grid, cmap="Greens", vmin=0, vmax=1, shading="flat")
        width = 0.25 / len(bins)
        left.set_yticks(np.arange(len(bins)) + 0.5)
        left.set_yticklabels([f"{b * width:.2f}-{(b + 1) * width:.2f}" for b, _ in bins], fontsize=7)
        fig.colorbar(mesh, ax=left, label="share of the step's prompts")
        left.set(title="signal density p(1−p) per step", xlabel="RL step", ylabel="p(1−p) bin")
    else:
        left.text(0.5, 0.5, "no p(1−p) histogram\n(rl.recycle_every was 0)", ha="center", va="center",
                  transform=left.transAxes, color="grey")
        left.set_axis_off()
    _lines(middle, data, {"data/set_aside": "set aside", "data/recycled": "recycled"})
    middle.set_title("prompts set aside / recycled")
    _lines(right, data, {f"reward/{n}": n for n in source_names(data)})
    right.set_title("mean reward per source (task.sources)")
    return fig


def fig_gold(plt, data: RunData):
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.4))
    _lines(left, data, {"reward/mean": "proxy: reward model (reward/mean)", "reward/gold_mean": "gold: verifier "
                                                                                                  "(reward/gold_mean)"})
    left.set_title("proxy vs gold reward of the same samples")
    steps, proxy = data.series("reward/mean")
    gold = dict(zip(*data.series("reward/gold_mean")))
    gap = [p - gold.get(s, math.nan) for s, p in zip(steps, proxy)]
    right.plot(steps, gap, color="tab:red", label="proxy − gold")
    right.axhline(0, color="grey", lw=1)
    right.set(title="the gap: rising while gold falls is reward hacking", xlabel="RL step")
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    return fig


def env_rollouts(data: RunData) -> list[dict]:
    """The rollouts.jsonl records of environment episodes (those with turns)."""
    return [r for r in data.rollouts if isinstance(r.get("turns"), list)]


def turn_rewards(data: RunData) -> dict[int, tuple[list[int], list[float]]]:
    """{turn number (1, 2, ...): (kept steps, mean reward of that turn over the step's episodes that had it)} from
    rollouts.jsonl; a turn whose step failed (reward null) is left out."""
    sums: dict[int, dict[int, list[float]]] = {}
    for r in env_rollouts(data):
        for n, t in enumerate(r["turns"], 1):
            v = _number(t.get("reward") if isinstance(t, dict) else None)
            if isinstance(r.get("step"), int) and math.isfinite(v):
                sums.setdefault(n, {}).setdefault(r["step"], []).append(v)
    return {n: (sorted(by), [sum(by[s]) / len(by[s]) for s in sorted(by)]) for n, by in sorted(sums.items())}


def episode_ends(data: RunData) -> dict[str, tuple[list[int], list[float]]]:
    """{how episodes ended (finish_reason: done, budget, error, stop, length): (kept steps, share of the step's
    episodes)} from rollouts.jsonl."""
    by_step: dict[int, list[str]] = {}
    for r in env_rollouts(data):
        if isinstance(r.get("step"), int):
            by_step.setdefault(r["step"], []).append(str(r.get("finish_reason")))
    steps = sorted(by_step)
    reasons = sorted({f for fs in by_step.values() for f in fs})
    return {f: (steps, [by_step[s].count(f) / len(by_step[s]) for s in steps]) for f in reasons}


def fig_env(plt, data: RunData):
    fig, axes = plt.subplots(2, 3, figsize=(14, 6.2))
    (a, b, c), (d, e, f) = axes
    _lines(a, data, {"env/turns": "turns (env/turns)", "env/tool_calls": "tool calls (env/tool_calls)"})
    a.set_title("per episode: turns and tool calls", fontsize=10)
    _lines(b, data, {"env/env_tokens": "environment (env/env_tokens)",
                     "rollout/response_len_mean": "policy (rollout/response_len_mean)"})
    b.set_title("tokens per episode", fontsize=10)
    _lines(c, data, {"env/budget_frac": "env/budget_frac"})
    c.set_title("share of episodes stopped by the token budget", fontsize=10)
    _lines(d, data, {"env/errors": "env/errors", "env/timeouts": "env/timeouts"})
    d.set_title("failed episodes per step (errors, of which timeouts)", fontsize=10)
    for ax, series, title, what in (
            (e, {f"turn {n}": v for n, v in turn_rewards(data).items()}, "mean reward of each turn",
             "no turns in rollouts.jsonl"),
            (f, episode_ends(data), "how the episodes ended (share)", "no episodes in rollouts.jsonl")):
        for label, (steps, values) in series.items():
            ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=label)
        if series:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, what, ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.set(title=title, xlabel="RL step (kept in rollouts.jsonl)")
        ax.title.set_fontsize(10)
        ax.grid(alpha=0.3)
    return fig


def _envs(data: RunData) -> str:
    """The run's environments as the report names them: task.env, or each task.sources entry's env ("" without)."""
    env = data.setting("task.env")
    if env:
        return f"the environment task.env={env}"
    named = [f"{source_name(e)}: {e['env']}" for e in data.setting("task.sources") or []
             if isinstance(e, dict) and e.get("env")]
    return f"the environments of task.sources ({', '.join(named)})" if named else ""


def _env_note(data: RunData) -> str:
    limits = (f"at most task.max_turns={data.setting('task.max_turns', '?')} turns, task.max_episode_tokens="
              f"{data.setting('task.max_episode_tokens', 'auto')}" if data.setting("task.env") else
              "each source's max_turns and max_episode_tokens; over the environment sources' episodes, and per "
              "source as env/<metric>_<source> in metrics.jsonl")
    note = (f"Episodes against {_envs(data)} ({limits}). Top: turns and tool calls per episode (mean), "
            "environment vs policy tokens per episode, the share stopped by the token budget (a rising share: "
            "raise task.max_episode_tokens, as the run's warning says), failed episodes (env/errors, of which "
            "env/timeouts: task.env_on_error=zero counts them instead of stopping). Bottom, from rollouts.jsonl: "
            "each turn's mean reward and how the episodes ended (done: the environment said so; budget; error; "
            "stop / length: the last turn ended at max_turns).")
    if not env_rollouts(data):
        every = data.setting("log.rollouts_every", 0)
        note += (" No turns in rollouts.jsonl: " + ("set log.rollouts_every=N to keep them." if not every else
                                                   f"no RL step that is a multiple of log.rollouts_every={every} "
                                                   "was kept yet."))
    return note


def fig_supervised(plt, data: RunData):
    sft = data.stage_lines("sft/nll")
    pref_loss = data.stage_lines("train/loss", preference=True)
    pref_margin = data.stage_lines("pref/reward_margin", preference=True)
    panels = ([("sft", sft)] if sft else []) + ([("loss", pref_loss), ("margin", pref_margin)] if pref_loss else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(max(8.0, 4.7 * len(panels) + 1), 3.4), squeeze=False)
    for ax, (kind, lines) in zip(axes[0], panels):
        for stage, ms in lines.items():
            key = {"sft": "sft/nll", "loss": "train/loss", "margin": "pref/reward_margin"}[kind]
            steps = [m["step"] for m in ms]
            ax.plot(steps, [_number(m[key]) for m in ms], marker="." if len(ms) < 30 else None,
                    label=f"{stage}: {key}")
            if kind == "margin":
                acc = [(m["step"], _number(m.get("pref/accuracy"))) for m in ms if "pref/accuracy" in m]
                if acc:
                    ax.plot(*zip(*acc), ls="--", label=f"{stage}: pref/accuracy")
        if kind == "loss":  # the held-out pairs' loss at the end of each preference stage
            for m in data.metrics:
                if str(m.get("stage", "")).endswith("_eval") and m.get("stage", "").startswith("preference") \
                        and math.isfinite(_number(m.get("eval/loss"))):
                    ax.plot([m["step"]], [_number(m["eval/loss"])], "*", ms=10, label=f"{m['stage']}: eval/loss")
        ax.legend(fontsize=8)
        ax.set(title={"sft": "SFT: negative log-likelihood per token", "loss": "preference loss",
                      "margin": "preference: reward margin and accuracy"}[kind],
               xlabel="optimizer step of the stage")
        ax.title.set_fontsize(10)
        ax.grid(alpha=0.3)
    return fig


def _supervised_note(data: RunData) -> tuple[str, bool]:
    """(the note, whether there is anything to draw)."""
    sft, pref = data.stage_lines("sft/nll"), data.stage_lines("train/loss", preference=True)
    if not sft and not pref:
        stages = data.setting("stages") or "sft, eval, rl, eval (the default)"
        return (f"Nothing to plot: no SFT or preference stage logged a step (stages: {stages}; sft.steps="
                f"{data.setting('sft.steps', '?')}).", False)
    parts = []
    if sft:
        parts.append(f"SFT ({', '.join(sft)}): the demonstrations' negative log-likelihood per token (sft/nll), "
                     "logged every 50 steps and at the last; it should fall and flatten, and a rise is a learning "
                     "rate too high (sft.lr)")
    if pref:
        parts.append(f"preference ({', '.join(pref)}): the loss (train/loss), the implicit reward margin between "
                     "chosen and rejected (pref/reward_margin) and the share of pairs ranked right "
                     "(pref/accuracy); the star is the held-out pairs' loss (preference.eval_file). A margin that "
                     "keeps growing while both log-probs fall is the policy pushing the rejected answers down "
                     "rather than the chosen ones up")
    return "Per optimizer step of each stage: " + "; ".join(parts) + ".", True


def _turns_text(r: dict) -> str:
    """An environment episode's completion, turn by turn, with what rollouts.jsonl says about each turn."""
    out = []
    for n, t in enumerate(r["turns"], 1):
        if not isinstance(t, dict):
            continue
        out.append(f"[turn {n}: {t.get('policy_tokens', '?')} tokens, {t.get('finish', '?')}, reward "
                   f"{_fmt(_number(t.get('reward')), '.2f')}, env {t.get('env', '?')}]\n{t.get('policy', '')}")
        if t.get("observation") is not None:
            out.append(f"[environment: {t.get('env_tokens', '?')} tokens]\n{t['observation']}")
    if r.get("env_error"):
        out.append(f"[error] {r['env_error']}")
    return "\n".join(out)


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


# ---------------------------------------------------------------------------- the page

def _esc(x) -> str:
    return html.escape(str(x), quote=True)


def _clip(text: str) -> str:
    text = str(text)
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + f" … ({len(text) - MAX_TEXT} more characters)"


def _fmt(v, spec: str = ".3f") -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def samples_table(data: RunData) -> tuple[str, str]:
    """(note, HTML table) of the best and worst completions of each kept step in rollouts.jsonl."""
    if not data.rollouts:
        every = data.setting("log.rollouts_every", 0)
        if not data.rl:
            return f"No sampled completions: {_no_rl_reason(data)}.", ""
        if not every:
            return ("No rollouts.jsonl: the run did not keep samples (log.rollouts_every=0). Set "
                    "log.rollouts_every=N to keep every N-th RL step's completions.", "")
        return (f"No rollouts.jsonl lines: log.rollouts_every={every}, but no RL step that is a multiple of it "
                f"finished ({len(data.rl)} RL step(s) logged).", "")
    by_step: dict[int, list[dict]] = {}
    for r in data.rollouts:
        by_step.setdefault(r.get("step"), []).append(r)
    steps = sorted(s for s in by_step if isinstance(s, int))
    turn_by_turn = bool(_envs(data))  # an environment's episodes; a one-turn sample is its completion
    shown = steps
    if len(steps) > MAX_SAMPLE_STEPS:
        picks = {round(i * (len(steps) - 1) / (MAX_SAMPLE_STEPS - 1)) for i in range(MAX_SAMPLE_STEPS)}
        shown = [steps[i] for i in sorted(picks)]
    head = ("<tr><th>step</th><th>rank</th><th>reward</th><th>prompt</th><th>completion</th><th>answer</th>"
            "<th>finish</th><th>tokens</th><th>log-prob mean / min</th><th>version</th></tr>")
    rows = []
    for step in shown:
        ranked = sorted(by_step[step], key=lambda r: -_number(r.get("reward")) if math.isfinite(
            _number(r.get("reward"))) else math.inf)
        n = len(ranked)
        if n <= 2 * SAMPLES_PER_END:
            picked = [(f"{i + 1}/{n}", r) for i, r in enumerate(ranked)]
        else:
            picked = ([(f"best {i + 1}", r) for i, r in enumerate(ranked[:SAMPLES_PER_END])]
                      + [(f"worst {SAMPLES_PER_END - i}", r) for i, r in enumerate(ranked[-SAMPLES_PER_END:])])
        for j, (rank, r) in enumerate(picked):
            cls = "best" if rank.startswith("best") else "worst" if rank.startswith("worst") else ""
            step_cell = f"<td rowspan='{len(picked)}' class='step'>{_esc(step)}<br><small>{n} samples</small></td>"
            text = _turns_text(r) if turn_by_turn and isinstance(r.get("turns"), list) else r.get("completion", "")
            rows.append(
                f"<tr class='{cls}'>{step_cell if j == 0 else ''}<td>{_esc(rank)}</td>"
                f"<td>{_esc(_fmt(_number(r.get('reward'))))}</td>"
                f"<td class='text'>{_esc(_clip(r.get('prompt', '')))}</td>"
                f"<td class='text'>{_esc(_clip(text))}</td>"
                f"<td class='text'>{_esc(_clip(r.get('answer', '')))}</td>"
                f"<td>{_esc(r.get('finish_reason', ''))}</td><td>{_esc(r.get('response_len', ''))}</td>"
                f"<td>{_esc(_fmt(r.get('old_logp_mean'), '.2f'))} / {_esc(_fmt(r.get('old_logp_min'), '.2f'))}</td>"
                f"<td>{_esc(r.get('policy_version', ''))}</td></tr>")
    note = (f"{len(data.rollouts)} samples from {len(steps)} RL step(s) in rollouts.jsonl; the "
            f"{SAMPLES_PER_END} best and {SAMPLES_PER_END} worst by reward of "
            + (f"{len(shown)} of those steps, evenly spread." if len(shown) < len(steps) else "each step.")
            + " Log-probs are the sampling policy's over the response tokens: a very low minimum marks an "
              "unlikely token the engine drew.")
    return note, f"<table class='samples'>{head}{''.join(rows)}</table>"


def _correction_note(data: RunData) -> str:
    """What the importance-weight and log-prob mismatch figure shows for this run."""
    mode = (data.setting("algorithm") or {}).get("rollout_correction", "none") if isinstance(
        data.setting("algorithm"), dict) else "none"
    if hist_bins(data):
        note = (f"Left: the share of response tokens per bin of the raw importance weight π_prox/μ "
                f"(algorithm.rollout_correction={mode}); mass away from the 0.95-1.05 bin means the engine "
                "sampled from a policy other than the one being trained (stale weights, or engine numerics). ")
    else:
        note = (f"No importance-weight histogram: the run had no rollout correction "
                f"(algorithm.rollout_correction={mode}), so no weights were computed; set it to tis or mis "
                "to log them. ")
    note += ("Right: the largest and mean absolute difference between the engine's sampling log-probs and "
             "the trainer's on the same weights; a jump there is an engine/trainer mismatch that biases "
             "every update.")
    zeros = sum(1 for v in data.series("rollout/logp_mismatch_max")[1] if v == 0)
    if zeros:
        note += f" {zeros} step(s) had a mismatch of exactly 0, not drawn on the log scale."
    if not data.has("rollout/logp_mismatch_max"):
        note += " No mismatch was measured (null on every step: no update ran on the sampled tokens)."
    return note


def _sections(plt, data: RunData, folder: str) -> list[tuple[Section, object]]:
    """Every section with its figure (None when it has none); links are relative to `folder`, the page's."""
    no_rl = "" if data.rl else _no_rl_reason(data)
    out = []

    s = Section("reward", "Reward and held-out pass@1")
    if no_rl:
        s.note = f"No training reward: {no_rl}. "
    s.note += ("Left: the mean reward of each step's samples, raw and smoothed; flat means the policy gets no "
               "learning signal (check rollout/degenerate_group_frac). Right: held-out pass@1 measured during RL "
               "(every rl.eval_every steps) and after each stage (summary.json).")
    out.append((s, fig_reward(plt, data) if data.rl or any(k.startswith("pass@1_") for k in data.summary) else None))
    if not out[-1][1]:
        s.note = f"Nothing to plot: {no_rl or 'no evaluation ran'}."

    s = Section("supervised", "SFT and preference training")
    s.note, drawn = _supervised_note(data)
    out.append((s, fig_supervised(plt, data) if drawn else None))

    def rl_section(key: str, title: str, note, draw) -> None:
        """A section drawn from the RL steps: `note()` and `draw()`, or why there is nothing to plot."""
        s = Section(key, title)
        if no_rl:
            s.note = f"Nothing to plot: {no_rl}."
            out.append((s, None))
        else:
            s.note = note()
            out.append((s, draw()))

    rl_section("dynamics", "KL, entropy, length, clipping", lambda: (
        "KL to the reference growing without bound means the policy is leaving the reference fast (raise "
        "algorithm.beta or lower trainer.lr); entropy falling towards 0 is a collapse onto a few answers; "
        "response length racing to rollout.max_new_tokens is a length explosion (see "
        "rollout/truncated_frac); a clipped fraction that stays high means updates are too large for "
        "the trust region."), lambda: fig_dynamics(plt, data))
    rl_section("time", "Where the time goes", lambda: (
        "Seconds of each step per role (time/<role>; 'other' is the step outside any role), and the "
        "generated tokens per second of the rollout alone and of the whole step."), lambda: fig_time(plt, data))
    rl_section("memory", "Memory per role", lambda: _memory_note(data),
               lambda: fig_memory(plt, data) if memory_keys(data) else None)
    if not no_rl:
        out[-1][0].body = memory_table(data)
    rl_section("correction", "Importance weights and log-prob mismatch", lambda: _correction_note(data),
               lambda: fig_correction(plt, data))

    s = Section("data", "Prompt data: signal density, recycling, sources")
    if no_rl or not (data.has("data/set_aside") or source_names(data)):
        s.note = (f"Nothing to plot: {no_rl}." if no_rl else
                  "Nothing to plot: the run neither recycled prompts (rl.recycle_every was 0) nor mixed sources "
                  "(task.sources was unset).")
        out.append((s, None))
    else:
        s.note = ("Left: the share of each step's prompts by reward variance p(1−p) (p: the share of a prompt's K "
                  "samples that were right); the lowest bin holds the prompts that teach GRPO nothing. Middle: "
                  "the prompts set aside (all right or all wrong at their last visit) and those returned to the "
                  "pool (rl.recycle_every). Right: each source's mean reward (task.sources).")
        out.append((s, fig_data(plt, data)))

    s = Section("gold", "Gold vs proxy reward (over-optimisation)")
    if data.has("reward/gold_mean"):
        s.note = ("The RL reward was a learned reward model (the proxy); the task's verifier scored the same "
                  "samples (gold). Proxy rising while gold stalls or falls is the policy exploiting the reward "
                  "model: reward hacking. Stop or raise algorithm.beta before the gap opens.")
        out.append((s, fig_gold(plt, data)))
    else:
        s.note = (f"Nothing to plot: {no_rl}." if no_rl else
                  "No reward/gold_mean: the RL reward was the verifier itself, not a learned reward model, so "
                  "there is no proxy to over-optimise.")
        out.append((s, None))

    s = Section("env", "Environment episodes")
    if not _envs(data):
        s.note = ("No environment: the task has no task.env (nor a task.sources entry an env), so every episode is "
                  "one turn scored by the verifier (environments: docs/environments.md).")
        out.append((s, None))
    elif no_rl:
        s.note = f"Nothing to plot: {no_rl}."
        out.append((s, None))
    else:
        s.note = _env_note(data)
        out.append((s, fig_env(plt, data)))

    s = Section("samples", "Sampled completions")
    s.note, s.body = samples_table(data)
    out.append((s, None))

    s = Section("config", "Config and summary")
    summary = json.dumps(data.summary, indent=2) if data.summary else "no summary.json"
    s.body = (f"<h3>summary.json</h3><pre>{_esc(summary)}</pre>"
              f"<h3>config.yaml</h3><pre>{_esc(data.config_text or 'no config.yaml')}</pre>")
    out.append((s, None))

    s = Section("profile", "Profiler traces")
    if data.traces:
        s.note = ("torch.profiler traces of the steps in trainer.profile_steps (Chrome trace format): open one in "
                  "chrome://tracing or the Perfetto UI.")
        s.body = "<ul>" + "".join(f"<li><a href='{_esc(os.path.relpath(os.path.abspath(t), folder))}'>"
                                  f"{_esc(os.path.basename(t))}</a> "
                                  f"({os.path.getsize(t) / 1e6:.1f} MB)</li>" for t in data.traces) + "</ul>"
    else:
        s.note = "No profile/*.json: the run traced no step (trainer.profile_steps is empty)."
    out.append((s, None))
    return out


CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 0 auto; max-width: 1280px;
       padding: 0 24px 48px; color: #222; }
h1 { margin-bottom: 4px; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 32px; }
.meta { color: #555; } .meta td { padding: 1px 12px 1px 0; }
nav a { margin-right: 14px; }
.note { color: #444; max-width: 1100px; }
img { max-width: 100%; display: block; }
pre { background: #f6f6f6; padding: 10px; overflow-x: auto; font-size: 12px; }
table.samples { border-collapse: collapse; font-size: 12px; }
table.samples td, table.samples th { border: 1px solid #ddd; padding: 3px 6px; vertical-align: top; }
table.samples td.text { white-space: pre-wrap; font-family: ui-monospace, monospace; max-width: 380px;
                        word-break: break-word; }
table.samples tr.best td { background: #f0f8f0; } table.samples tr.worst td { background: #fbf0f0; }
table.samples td.step { background: #fff !important; font-weight: bold; }
"""


def _header(data: RunData) -> str:
    s, planned = data.summary, data.planned_rl_steps()
    done = data.rl[-1]["step"] if data.rl else 0
    wall = _number(s.get("wall_seconds"))
    facts = [("run directory", os.path.abspath(data.run_dir)),
             ("status", run_status(data)),
             ("model / task", f"{data.setting('model.name', '?')} / {data.setting('task.name', '?')}"),
             ("algorithm", (data.setting("algorithm") or {}).get("name", "?") if isinstance(
                 data.setting("algorithm"), dict) else "?"),
             ("RL steps logged", f"{done} of {planned}" if planned is not None else str(done)),
             ("wall-clock", f"{wall:.1f} s" if math.isfinite(wall) else "–")]
    rows = "".join(f"<tr><td>{_esc(k)}</td><td><b>{_esc(v)}</b></td></tr>" for k, v in facts)
    return f"<table class='meta'>{rows}</table>"


NAV = [("reward", "reward"), ("supervised", "SFT / preference"), ("dynamics", "dynamics"), ("time", "time"),
       ("memory", "memory"), ("correction", "correction"), ("gold", "gold vs proxy"), ("env", "environment"),
       ("samples", "samples"), ("config", "config"), ("profile", "profile")]


def build_report(run_dir: str, out: str | None = None) -> str:
    """Write the report of `run_dir` to `out` (default RUN_DIR/report/index.html) and one PNG per figure in
    the same folder; returns the HTML file's path. Raises ImportError (naming the pip command) without
    matplotlib, FileNotFoundError when `run_dir` is not a run directory."""
    plt = _pyplot()
    data = RunData.load(run_dir)
    out = out or os.path.join(run_dir, "report", "index.html")
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    parts = []
    for section, fig in _sections(plt, data, folder):
        img = ""
        if fig is not None:
            png = png_bytes(fig)
            plt.close(fig)
            section.png = f"{section.key}.png"
            with open(os.path.join(folder, section.png), "wb") as f:
                f.write(png)
            img = (f"<img id='fig-{section.key}' alt='{_esc(section.title)}' "
                   f"src='data:image/png;base64,{base64.b64encode(png).decode()}'>")
        parts.append(f"<section id='{section.key}'><h2>{_esc(section.title)}</h2>"
                     f"<p class='note'>{_esc(section.note)}</p>{img}{section.body}</section>")
    nav = " ".join(f"<a href='#{k}'>{_esc(t)}</a>" for k, t in NAV)
    title = f"rlpost report: {os.path.basename(os.path.abspath(data.run_dir))}"
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{_esc(title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{_esc(title)}</h1>{_header(data)}<nav>{nav}</nav>"
            f"{''.join(parts)}</body></html>\n")
    with open(out, "w", encoding="utf-8") as f:
        f.write(page)
    return out
