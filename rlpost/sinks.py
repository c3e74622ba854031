"""Where metrics go besides metrics.jsonl: TensorBoard and Weights & Biases (`log.tensorboard`, `log.wandb`).

Every record `RunLog` writes to metrics.jsonl is handed to the sinks too, with the same metric names and
the record's own `step` as the x-axis. Each stage counts its steps from 0 (SFT step 10 and RL step 10 are
different steps), so a record is filed under its *series*: the record's `stage` (sft, preference, rm, rl,
...), and for the held-out evaluations, which all log step 0, `eval_<after>` (eval_start, eval_sft,
eval_dpo, eval_rl).

    TensorBoard   RUN_DIR/tensorboard/<series>/ : one TensorBoard run per series, the metric names as tags,
                  so SFT's and RL's `train/loss` are two curves on one chart. Scalars only.
    W&B           one W&B run (project `log.wandb_project`, named after the run directory, the resolved
                  config as its config, files in RUN_DIR/wandb/); keys `<series>/<metric>` plotted against
                  `<series>/step`. Offline (no network, `wandb sync` uploads later) unless an API key is
                  configured (WANDB_API_KEY, or a netrc entry for the W&B host) or WANDB_MODE says otherwise.

Resume (`rlpost train --resume`): the sinks continue. metrics.jsonl drops the lines written after the
checkpoint; TensorBoard drops the same points: each series whose lines were dropped reopens with
`purge_step` at the first dropped step, so the resumed run's points replace them, with no duplicates.
W&B resumes the same run (its id is kept in RUN_DIR/wandb/run_id); W&B's history only grows, so the points
logged between the checkpoint and the crash stay in it, and the resumed run logs those steps again.

Under torchrun only rank 0 opens sinks (as only it writes metrics.jsonl).
"""

from __future__ import annotations

import math
import netrc
import os
import uuid
from typing import Any
from urllib.parse import urlparse

INSTALL = "pip install 'rlpost[log]'"


def series(record: dict) -> str:
    """The series a record belongs to: its stage, and for evaluations which one (eval_start, eval_rl, ...)."""
    stage = str(record.get("stage", "run"))
    return f"{stage}_{record['after']}" if "after" in record else stage


def scalars(record: dict) -> dict[str, float]:
    """The record's numeric, finite values (not `step`; not strings, None, NaN or inf)."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def check_available(log_cfg) -> None:
    """Fail before any work when a switched-on sink's package is missing, naming the pip command."""
    for package in ("tensorboard", "wandb"):
        if not getattr(log_cfg, package):
            continue
        try:
            __import__(package)
        except ImportError as e:
            raise ImportError(f"log.{package}=true needs the `{package}` package: {INSTALL} (or pip install "
                              f"{package}); or set log.{package}=false") from e


class TensorBoardSink:
    """Scalars into RUN_DIR/tensorboard/<series>/, one SummaryWriter per series, opened at its first record.
    `purge` maps a series to the first step to drop (a resume cut metrics.jsonl back to a checkpoint)."""

    def __init__(self, run_dir: str, purge: dict[str, int] | None = None):
        self.root, self.purge, self.writers = os.path.join(run_dir, "tensorboard"), dict(purge or {}), {}

    def __call__(self, name: str, step: int, values: dict[str, float]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        w = self.writers.get(name)
        if w is None:
            # purge_step: TensorBoard hides this series' points from that step on (logged before a resume)
            w = SummaryWriter(os.path.join(self.root, name), purge_step=self.purge.pop(name, None))
            self.writers[name] = w
        for key, v in values.items():
            w.add_scalar(key, v, step)
        w.flush()  # as metrics.jsonl: a killed run loses nothing it logged

    def close(self, exit_code: int = 0) -> None:
        for w in self.writers.values():
            w.close()
        self.writers = {}


def wandb_api_key_configured() -> bool:
    """An API key in WANDB_API_KEY or in ~/.netrc (or $NETRC) for the W&B host: only then may W&B go online."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbSink:
    """One W&B run per run directory; a resumed run continues it (same id, RUN_DIR/wandb/run_id).
    Offline unless an API key is configured, so it never prompts for one and never waits on the network."""

    def __init__(self, run_dir: str, project: str, config: dict, resume: bool):
        import wandb

        folder = os.path.join(run_dir, "wandb")
        os.makedirs(folder, exist_ok=True)
        id_file = os.path.join(folder, "run_id")
        if os.path.exists(id_file):
            with open(id_file) as f:
                run_id = f.read().strip()
        else:
            run_id = uuid.uuid4().hex[:12]
            with open(id_file, "w") as f:
                f.write(run_id)
        mode = os.environ.get("WANDB_MODE") or ("online" if wandb_api_key_configured() else "offline")
        self.run = wandb.init(project=project, dir=run_dir, name=os.path.basename(os.path.normpath(run_dir)),
                              config=config, id=run_id, resume="allow" if resume else None, mode=mode,
                              settings=wandb.Settings(console="off"))  # tqdm and the console lines stay ours
        self.defined: set[str] = set()

    def __call__(self, name: str, step: int, values: dict[str, float]) -> None:
        if name not in self.defined:  # each series has its own x-axis: <series>/step
            self.run.define_metric(f"{name}/step")
            self.run.define_metric(f"{name}/*", step_metric=f"{name}/step")
            self.defined.add(name)
        self.run.log({f"{name}/step": step, **{f"{name}/{k}": v for k, v in values.items()}})

    def close(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None


class Sinks:
    """The configured sinks, fed one metrics record at a time: `sinks(record)`; `close()` once at the end."""

    def __init__(self, sinks: list):
        self.sinks = sinks

    def __bool__(self) -> bool:
        return bool(self.sinks)

    def __call__(self, record: dict) -> None:
        values = scalars(record)
        if values and isinstance(record.get("step"), int):
            name = series(record)
            for sink in self.sinks:
                sink(name, record["step"], values)

    def close(self, exit_code: int = 0) -> None:
        """Close every sink (idempotent); `exit_code` non-zero marks a W&B run failed."""
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.close(exit_code)


def first_dropped_steps(dropped: list[dict]) -> dict[str, int]:
    """For a resume: the first step of each series among the metrics lines dropped after the checkpoint."""
    purge: dict[str, int] = {}
    for record in dropped:
        if isinstance(record.get("step"), int):
            name = series(record)
            purge[name] = min(purge.get(name, record["step"]), record["step"])
    return purge


def open_sinks(log_cfg, run_dir: str, config: dict[str, Any], *, resume: bool = False,
               dropped: list[dict] | None = None) -> Sinks:
    """The sinks `log_cfg` switches on, for run directory `run_dir`; `dropped`: on resume, the metrics
    records cut from metrics.jsonl (their points are purged from TensorBoard too)."""
    check_available(log_cfg)
    sinks: list = []
    if log_cfg.tensorboard:
        sinks.append(TensorBoardSink(run_dir, first_dropped_steps(dropped or [])))
    if log_cfg.wandb:
        sinks.append(WandbSink(run_dir, log_cfg.wandb_project, config, resume))
    return Sinks(sinks)
