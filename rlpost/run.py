"""A run: a list of stages over one policy, with checkpoints, resume and a clean stop.

    summary = train(cfg)                          # rlpost train
    summary = train(saved_config(run_dir), resume=run_dir)   # rlpost train --resume RUN_DIR

The stages (rlpost/stages/) come from the config: the `stages` list when it is given (names may repeat:
R1's rl, rejection, rl), else this order, each only when it is switched on:

    sft          supervised steps on the task's demonstrations        checkpoints/sft/
    eval         held-out pass@1 of the policy so far
    preference   the DPO family on pairs (+ eval)                     checkpoints/preference/
    reward_model a Bradley-Terry reward model becomes the RL reward   checkpoints/reward_model/
    rl           the seven-step loop (rlpost/controller.py)           checkpoints/step_<n>/, checkpoints/final/
                 (an RL stage that another one follows ends in checkpoints/<label>/: rl/, rl_2/, ...)
    eval         held-out pass@1 after RL
    rejection    fine-tuning on the policy's own verified samples      checkpoints/rejection/
    eval         held-out pass@1 after rejection-sampling SFT

A stage that comes again in the list is its name's second (third, ...) occurrence: its label is `rl_2`,
and its checkpoints (rl_2_step_<n>/; the last RL stage ends in checkpoints/final/, the ones before it in
checkpoints/rl/, rl_2/, ...), files and summary keys carry it; an RL stage logs
its steps after those of the RL stages before it, so metrics.jsonl has one line per RL step of the run.
An eval is labelled by the stage before it (pass@1_sft, pass@1_dpo after preference, pass@1_rl_2; the first
one before any training: pass@1_start).

The RL stage's reward is `rl.reward`'s source (rlpost/env/sources.py): the verifier, the reward_model stage's
model, a teacher's per-token reverse KL (`distill.teacher`), or the verifier's outcome plus a process reward
model's step rewards (`prm.path`).

The run directory:

    run.json           what made it (`train`), so a resume cannot pick up another kind of run, and the
                       run's id, which its checkpoints carry (a resume refuses another run's)
    config.yaml        the resolved config; a resume with a different one is refused, naming the keys
    metrics.jsonl      one JSON line per logged step (a resume drops lines written after its checkpoint)
    rollouts.jsonl     sampled completions every `log.rollouts_every` RL steps (likewise cut back on resume)
    checkpoints/       see rlpost/checkpoint.py; every stage that changes the policy ends with one (with
                       LoRA, model.lora: its adapters are folded into the base first, and that checkpoint
                       is the plain merged model; mid-stage ones hold the base and the adapters apart)
    summary.json       the held-out numbers, wall_seconds, status
    tensorboard/       log.tensorboard: the metrics as TensorBoard event files, one folder per stage (rlpost/sinks.py)
    wandb/             log.wandb: the W&B run (offline without an API key) and its id, which a resume continues
    profile/           trainer.profile_steps: a torch.profiler Chrome trace per profiled RL step

Resume is exact on CPU: every stateful part (the policy, the optimizer and LR schedule, trainer
counters, critic, algorithm, prompt sampler, weight-sync version, every random stream) is in the
checkpoint (an end-of-stage one carries the run's part: the random streams and the weight-sync version),
so a run killed at any point and resumed writes the same metrics, checkpoints and final weights as one
never interrupted. A resume refuses a metrics.jsonl or rollouts.jsonl that lost or changed lines its
checkpoint counts (naming the file and the line), and drops what was written after them. SIGTERM and Ctrl-C ask
the current stage to stop at its next step boundary: SFT and RL write a checkpoint there first; a second
signal stops at once.

Under torchrun (`trainer.strategy=fsdp2`, rlpost/distributed.py) every rank runs the same stages; only rank 0
writes the run directory, metrics.jsonl, summary.json, the console lines and the checkpoints (the sharded
policy gathered into one full model folder), and every rank resumes from the same checkpoint. Stages
before RL (SFT, preference, reward model) run whole on every rank, alike (same seed, same data); the RL
stage shards the policy and splits each step's prompts between the ranks; held-out evaluation samples
on rank 0 alone and hands its numbers to the others.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml

from rlpost import distributed as dist
from rlpost.checkpoint import (Checkpoint, clean_partial, is_write_failure, list_checkpoints, load_rng_state,
                               remove_step_checkpoints, rng_state, verify, write_checkpoint, write_error)
from rlpost.config import Config, from_dict, stage_configs, stage_names, to_dict
from rlpost.loops import loop_class
from rlpost.models.lora import fold_adapters, is_lora

RUN_FILE = "run.json"


class RunInterrupted(Exception):
    """SIGTERM or Ctrl-C stopped the run at a step boundary; the checkpoint written there resumes it."""


class ResumeError(ValueError):
    """A run directory that cannot be resumed: missing, of another kind, with another config, no checkpoint."""


# ---------------------------------------------------------------------------- metrics.jsonl, rollouts.jsonl

ROLLOUTS_FILE = "rollouts.jsonl"


def replace_file(path: str, lines: list[str]) -> None:
    """Write `lines` to `path` through a temporary file renamed over it: a failed write (disk full) leaves the
    old file whole."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", errors="surrogateescape") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise write_error(e, path, "") from e


def lines_digest(lines) -> "hashlib._Hash":
    """A running sha256 over JSONL lines as the file holds them (`update` it with each line written)."""
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode("utf-8", "surrogateescape"))
    return h


def cut_jsonl(path: str, keep: int, checkpoint: str, digest: str | None = None) -> list[dict]:
    """For a resume from `checkpoint`, which counted `keep` lines of the JSONL file `path` (and recorded their
    sha256, `digest`, when given): refuse (ResumeError, naming the file and the line) unless its first `keep`
    lines are each a complete JSON object and, together, the very lines the checkpoint counted, then drop the
    lines after them. Those are written after the checkpoint and are taken leniently: the ones that parse are
    returned, a broken one (the half line a kill leaves) is simply dropped."""
    lines = []
    if os.path.exists(path):
        with open(path, errors="surrogateescape") as f:  # bytes that are not UTF-8 are kept as they are
            lines = f.readlines()
    elif keep:
        raise ResumeError(f"--resume: {path} is missing; checkpoint {checkpoint} counts {keep} line(s) in it. "
                          "Put the file back (or resume from an older checkpoint by removing the newer ones)")
    hint = ("the file was damaged after the checkpoint was written: put back a whole copy, or resume from an "
            "older checkpoint by removing the newer ones")
    if len(lines) < keep:
        raise ResumeError(f"--resume: {path} holds {len(lines)} line(s) but checkpoint {checkpoint} counts {keep}: "
                          f"line(s) {len(lines) + 1}-{keep} are missing; {hint}")
    for n, line in enumerate(lines[:keep], 1):
        problem = None if line.endswith("\n") else "is cut short (no end of line)"
        if problem is None:
            try:
                if not isinstance(json.loads(line), dict):
                    problem = "is not a JSON object"
            except ValueError as e:
                problem = f"is not a complete JSON line ({e})"
        if problem:
            raise ResumeError(f"--resume: {path} line {n} {problem}, one of the {keep} line(s) checkpoint "
                              f"{checkpoint} counts; {hint}")
    if digest is not None and lines_digest(lines[:keep]).hexdigest() != digest:
        raise ResumeError(f"--resume: {path} lines 1-{keep}, the ones checkpoint {checkpoint} counts, are not the "
                          f"lines it was written after (a line was changed, duplicated, replaced or removed); {hint}")
    dropped = []
    for line in lines[keep:]:
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by a kill
            continue
        if isinstance(record, dict):
            dropped.append(record)
    if len(lines) > keep:
        replace_file(path, lines[:keep])
    return dropped


class RunLog:
    """metrics.jsonl writer (one line per call) that never holds data back: each line is flushed; and
    rollouts.jsonl's (`rollouts(records)`). `lines` and `rollout_lines` count what the files hold, so a
    checkpoint can record them and a resume cut back to them (`keep_lines`, `keep_rollouts`, refusing files
    that lost counted lines: see `cut_jsonl`); `dropped` holds the metrics records a resume cut (after the
    checkpoint). With write=False (ranks other than 0 of a sharded run) it only counts. Every metrics record
    also goes to `sinks` (rlpost/sinks.py), once attached. A failed write names the file (`write_error`)."""

    def __init__(self, run_dir: str, keep_lines: int | None = None, write: bool = True,
                 keep_rollouts: int | None = None, checkpoint: str = "the start",
                 digests: dict[str, str | None] | None = None):
        self.path, self.rollouts_path = os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, ROLLOUTS_FILE)
        self.write = write
        self.sinks = None
        self.dropped: list[dict] = []
        self.file = self.rollouts_file = None
        self._hashes: dict[str, Any] = {}  # running sha256 of each file's lines (`digests`); absent: not known yet
        # None: not known (a resume from a checkpoint older than the count): the RL stage cuts by step then
        self.rollout_lines = keep_rollouts
        if not write:  # rank 0 holds the files; this rank counts as it does (a resume cuts them to keep_lines)
            self.lines = keep_lines or 0
            return
        digests = digests or {}
        if keep_lines is not None:  # a resume: drop what was written after the checkpoint
            self.dropped = cut_jsonl(self.path, keep_lines, checkpoint, digests.get("metrics_sha256"))
        if keep_rollouts is not None:
            cut_jsonl(self.rollouts_path, keep_rollouts, checkpoint, digests.get("rollouts_sha256"))
        elif keep_lines is None:  # a new run
            self.rollout_lines = count_lines(self.rollouts_path)
        self.lines = count_lines(self.path)
        try:
            self.file = open(self.path, "a")
        except OSError as e:
            raise write_error(e, self.path, "the metrics file") from e

    def __call__(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        if self.write:
            self._append(self.file, self.path, "the metrics file", [json.dumps(clean) + "\n"])
        self.lines += 1  # only once the line is in the file: a checkpoint never counts a line that is not
        if self.write and self.sinks:
            self.sinks(clean)

    def rollouts(self, records: list[dict]) -> None:
        """Append records to rollouts.jsonl, one line each, flushed (a kill loses at most a half line after
        the counted ones, which a resume drops)."""
        if self.rollouts_file is None:
            try:
                self.rollouts_file = open(self.rollouts_path, "a")
            except OSError as e:
                raise write_error(e, self.rollouts_path, "the rollouts file") from e
        self._append(self.rollouts_file, self.rollouts_path, "the rollouts file",
                     [json.dumps(r) + "\n" for r in records])
        self.rollout_lines = (self.rollout_lines or 0) + len(records)

    def _append(self, file, path: str, what: str, lines: list[str]) -> None:
        h = self._hash(path)
        try:
            file.writelines(lines)
            file.flush()
        except OSError as e:
            self._hashes.pop(path, None)  # a half line may be in the file: read it again when a digest is asked
            raise write_error(e, path, what) from e
        for line in lines:
            h.update(line.encode("utf-8", "surrogateescape"))

    def _hash(self, path: str):
        """The running sha256 of `path`'s lines, read from the file the first time (what a resume kept, or
        rewrote), then updated with each line appended."""
        if path not in self._hashes:
            lines = []
            if os.path.exists(path):
                with open(path, errors="surrogateescape") as f:
                    lines = f.readlines()
            self._hashes[path] = lines_digest(lines)
        return self._hashes[path]

    def digests(self) -> dict[str, str | None]:
        """sha256 of the lines metrics.jsonl and rollouts.jsonl hold so far (what a checkpoint counts), so that
        a resume can tell the very lines from changed, duplicated or replaced ones. None on ranks that do not
        write the files."""
        if not self.write:
            return {"metrics_sha256": None, "rollouts_sha256": None}
        return {"metrics_sha256": self._hash(self.path).hexdigest(),
                "rollouts_sha256": self._hash(self.rollouts_path).hexdigest()}

    def close(self, exit_code: int = 0) -> None:
        """Close the files and the sinks (idempotent); `exit_code` non-zero: the run failed or was stopped."""
        for name in ("file", "rollouts_file"):
            f, path = getattr(self, name), self.path if name == "file" else self.rollouts_path
            setattr(self, name, None)
            if f is not None:
                try:
                    f.close()
                except OSError as e:  # the close flushes: what was already flushed is in the file
                    print(f"rlpost: warning: {write_error(e, path, '')}", file=sys.stderr)
        if self.sinks is not None:
            self.sinks.close(exit_code)


def count_lines(path: str) -> int:
    """The number of lines of `path` (0 when it does not exist)."""
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum(1 for _ in f)


def open_log(cfg: Config, run_dir: str, keep_lines: int | None = None, resume: bool = False,
             keep_rollouts: int | None = None, checkpoint: str = "the start",
             digests: dict[str, str | None] | None = None) -> RunLog:
    """metrics.jsonl and rollouts.jsonl of `run_dir` (cut back to `keep_lines`, `keep_rollouts` on a resume from
    `checkpoint`, whose `digests` of their lines they must match) with the sinks `cfg.log` switches on
    (TensorBoard, W&B); ranks other than 0 of a sharded run only count lines."""
    from rlpost.sinks import open_sinks

    log = RunLog(run_dir, keep_lines=keep_lines, write=dist.is_main(), keep_rollouts=keep_rollouts,
                 checkpoint=checkpoint, digests=digests)
    if dist.is_main():
        try:
            log.sinks = open_sinks(cfg.log, run_dir, to_dict(cfg), resume=resume, dropped=log.dropped)
        except BaseException:
            log.close()
            raise
    return log


# ---------------------------------------------------------------------------- the context stages share

@dataclass
class RunContext:
    """What the stages share: the policy and its tokenizer, the task, the rollout engine with its weight
    sync, the rewards, the log, the summary. Stages read their own config section, given at construction."""

    run_dir: str
    seed: int
    model: Any
    tokenizer: Any
    task: Any
    engine: Any
    weight_sync: Any
    verifier: Any                 # the task's reward role: Reward(verify fn)
    log: RunLog
    summary: dict
    rl_reward: Any = None         # the RL stage's reward: the verifier, or a learned reward (reward_model stage)
    stage_index: int = 0
    stage_name: str = ""
    weights_from: str | None = None   # the checkpoint folder holding the policy's current weights (None: initial)
    stop_requested: str | None = None
    checkpoint_names: list[str] = field(default_factory=list)
    run_id: str | None = None         # run.json's id and the config's digest: a resume takes only checkpoints
    config_sha256: str | None = None  # written by this run under this config (checkpoint.verify)

    def prompt_ids(self, rows: list[dict]) -> list[list[int]]:
        """Each row's prompt as token ids: a string or chat messages, with the task's system prompt."""
        from rlpost.models import encode_prompt

        system = getattr(self.task, "system_prompt", None)
        return [encode_prompt(self.tokenizer, r["prompt"], system) for r in rows]

    def save(self, name: str, *, step: int, finished: bool, state: dict, weights: bool) -> str:
        """Write checkpoint `name` of the current stage: `state` is the stage's own state_dict; the random
        streams, metrics position and summary are added here. `weights`: the policy changed since the
        last checkpoint that holds it, so save it (else the new checkpoint points at that one).
        Every rank calls it (a sharded policy is gathered); rank 0 writes."""
        from rlpost.models import save_model

        model = dist.unsharded(self.model) if weights else None  # a collective when the policy is sharded
        meta = {"stage": self.stage_index, "stage_name": self.stage_name,
                "step": step, "finished": finished, "metrics_lines": self.log.lines,
                "rollouts_lines": self.log.rollout_lines,
                "summary": self.summary, "weights": self.weights_from, **self.log.digests()}
        if self.run_id is not None:
            meta["run_id"] = self.run_id
        if self.config_sha256 is not None:
            meta["config_sha256"] = self.config_sha256
        # the run's own state too, so that an end-of-stage checkpoint (state={}) resumes the next stage exactly:
        # the weight-sync version the next RL stage counts on from
        full = {"stage": state, "rng": rng_state(), "run": {"weight_sync": self.weight_sync.state_dict()}}
        # a finished stage's checkpoint is a plain model folder (a LoRA model's adapters merged in); a
        # mid-stage one keeps a LoRA model's base and adapters apart, so that a resume continues exactly
        saver = (lambda folder: save_model(model, self.tokenizer, folder, merged=finished)) if weights else None
        path = write_checkpoint(self.run_dir, name, meta, full, saver) if dist.is_main() else None
        dist.barrier()  # no rank reads or moves on before the checkpoint is complete
        if weights:
            self.weights_from = name
        return path

    def check_stop(self, save=None) -> None:
        """At a step boundary: when a stop was requested, call `save()` (write a checkpoint) and stop.
        Sharded, a signal seen by any rank stops every rank at the same boundary."""
        if dist.world_size() > 1 and dist.reduce_max(float(self.stop_requested is not None)) > 0:
            self.stop_requested = self.stop_requested or "SIGTERM (another rank)"
        if self.stop_requested:
            if save is not None:
                save()
            raise RunInterrupted(self.stop_requested)


class Stage:
    """One part of a run. `setup` builds what the stage needs (after any earlier stage ran or was
    restored); `load_state_dict` puts back a checkpoint's state when a run resumes inside the stage;
    `run` does the work, writing mid-stage checkpoints through `ctx.save` when it can; `restore`
    re-creates a finished stage's effect on the context (e.g. the RL reward) on resume."""

    name = "stage"
    changes_weights = False   # a finished stage that changed the policy saves it (checkpoints/<checkpoint>)
    checkpoint = ""           # the folder name of its end-of-stage checkpoint ("" : the stage's name)
    keep_step_checkpoints = False  # False: its mid-stage checkpoints go once the end-of-stage one is written
    repeat = 1                # the n-th stage of its name in the run (build_stages counts them)

    @property
    def label(self) -> str:
        """The name, with `_<n>` for the n-th stage of that name (rl, rl_2): what its checkpoints, files and
        summary keys are called, so that a repeated stage overwrites nothing of an earlier one."""
        return self.name if self.repeat == 1 else f"{self.name}_{self.repeat}"

    @property
    def end_checkpoint(self) -> str:
        """The folder name of its end-of-stage checkpoint."""
        return (self.checkpoint or self.name) if self.repeat == 1 else self.label

    def seed(self, ctx: RunContext) -> int:
        """The run's seed; a repeated stage's is shifted, so that it draws other prompts and samples."""
        return ctx.seed + 1_000_003 * (self.repeat - 1)

    def setup(self, ctx: RunContext) -> None:
        pass

    def load_state_dict(self, ctx: RunContext, state: dict) -> None:
        pass

    def run(self, ctx: RunContext) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def restore(self, ctx: RunContext) -> None:
        pass

    def close(self) -> None:
        """Release what `setup` started (worker processes, a cluster); called once the run ends, however it
        ends. Idempotent."""


# ---------------------------------------------------------------------------- run directory

def run_dir_of(cfg: Config, recipe_name: str) -> str:
    name = cfg.run_name or f"{recipe_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return os.path.join(cfg.out_dir, name)


def make_run_dir(cfg: Config, recipe_name: str, kind: str = "train") -> str:
    """out_dir/run_name (or a timestamped name) with config.yaml and RUN_FILE (what made it, and a fresh run id
    its checkpoints carry). Refuses a folder that already holds any of RUN_START_FILES, whoever wrote them (a
    run, or a user's own config.yaml): a run never overwrites, nor on refusal removes, a file it did not write."""
    run_dir = run_dir_of(cfg, recipe_name)
    if os.path.lexists(os.path.join(run_dir, "metrics.jsonl")):
        raise FileExistsError(f"run directory {run_dir} already holds a run; choose another run_name, or continue "
                              f"it with `rlpost train --resume {run_dir}`")
    there = [n for n in RUN_START_FILES if os.path.lexists(os.path.join(run_dir, n))]
    if there:
        raise FileExistsError(f"run directory {run_dir} already holds {', '.join(there)}, which a run writes; "
                              "choose another run_name, or move them out of the folder")
    os.makedirs(run_dir, exist_ok=True)
    # "x": created here or not at all, so that a run started at the same moment in the same folder fails here
    with open(os.path.join(run_dir, "config.yaml"), "x") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    with open(os.path.join(run_dir, RUN_FILE), "x") as f:
        json.dump({"kind": kind, "recipe": recipe_name, "run_id": uuid.uuid4().hex}, f)
    return run_dir


RUN_START_FILES = ("config.yaml", RUN_FILE, "metrics.jsonl", "tensorboard", "wandb")  # make_run_dir, open_log


def run_id_of(run_dir: str) -> str | None:
    """The id RUN_FILE gives the run (None: a run directory of an older rlpost, or no readable RUN_FILE)."""
    try:
        with open(os.path.join(run_dir, RUN_FILE)) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    return info.get("run_id") if isinstance(info, dict) and isinstance(info.get("run_id"), str) else None


def discard_run_dir(run_dir: str, run_id: str | None = None) -> None:
    """Undo make_run_dir and open_log for a run that never began (its data, model or rewards were refused):
    remove what they wrote, and the folder itself when nothing else is in it, so that the same command can
    run again once the input is fixed. make_run_dir refused a folder holding any of RUN_START_FILES, so the
    ones there now are this run's; with `run_id`, nothing is removed unless RUN_FILE is that run's. Anything
    else in the folder is left alone, and a link is removed as a link, never followed."""
    if run_id is not None and run_id_of(run_dir) != run_id:
        return
    for name in RUN_START_FILES:
        path = os.path.join(run_dir, name)
        if os.path.islink(path) or os.path.isfile(path):
            os.remove(path)
        elif os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
    if not os.path.islink(run_dir):
        try:
            os.rmdir(run_dir)
        except OSError:  # not empty: the folder held something before this run
            pass


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "algorithm" and not k.endswith("loss"):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def saved_config(run_dir: str, kind: str = "train") -> Config:
    """The config a run directory was started with; refuses a folder that is not a run of `kind`."""
    if not os.path.isdir(run_dir):
        raise ResumeError(f"--resume: {run_dir} is not a directory")
    info_path, cfg_path = os.path.join(run_dir, RUN_FILE), os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(info_path) or not os.path.isfile(cfg_path):
        raise ResumeError(f"--resume: {run_dir} is not an rlpost run directory (no {RUN_FILE} / config.yaml)")
    with open(info_path) as f:
        info = json.load(f)
    if info.get("kind") != kind:
        raise ResumeError(f"--resume: {run_dir} is a `rlpost {info.get('kind')}` run, not a `rlpost {kind}` run")
    with open(cfg_path) as f:
        return from_dict(Config, yaml.safe_load(f))


def config_differences(saved: Config, new: Config) -> list[str]:
    """`key: saved -> new` for every config key that differs (out_dir/run_name/threads excepted)."""
    a, b = _flatten(to_dict(saved)), _flatten(to_dict(new))
    ignore = {"out_dir", "run_name", "threads"}
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if k not in ignore and a.get(k) != b.get(k)]


# ---------------------------------------------------------------------------- building the run

def eval_labels(names: list[str]) -> list[str | None]:
    """Each eval's label: the label of the stage before it (`dpo` for preference, `start` for none; `_again`
    added when an earlier eval has it); None for the other stages."""
    seen: dict[str, int] = {}
    used, labels, before = set(), [], "start"
    for name in names:
        if name != "eval":
            seen[name] = seen.get(name, 0) + 1
            base = "dpo" if name == "preference" else name
            before = base if seen[name] == 1 else f"{base}_{seen[name]}"
            labels.append(None)
            continue
        label = before
        while label in used:  # an eval right after another one
            label += "_again"
        used.add(label)
        labels.append(label)
    return labels


def build_stages(cfg: Config) -> list[Stage]:
    """The run's stages from the config (`stage_configs`), each given only its own sections, from the settings
    of its own entry in the stage list when it has them."""
    from rlpost.stages.evaluate import EvalStage
    from rlpost.stages.preference import PreferenceStage
    from rlpost.stages.rejection import RejectionStage
    from rlpost.stages.reward_model import RewardModelStage
    from rlpost.stages.rl import RLStage
    from rlpost.stages.sft import SFTStage

    def evaluation(c: Config, label: str) -> EvalStage:
        return EvalStage(c.eval, c.rollout, label)

    make = {"sft": lambda c: SFTStage(c.sft, c.trainer),
            "preference": lambda c: PreferenceStage(c.preference, c.rollout, c.trainer, c.eval),
            "reward_model": lambda c: RewardModelStage(c.reward_model, c.preference),
            "rl": lambda c: RLStage(c.rl, c.rollout, c.algorithm, c.trainer, c.critic, evaluation(c, "rl"),
                                    log_cfg=c.log),
            "rejection": lambda c: RejectionStage(c.rejection, c.rollout, c.trainer, c.eval)}
    plan = stage_configs(cfg)
    stages: list[Stage] = []
    count: dict[str, int] = {}
    rl_steps = 0  # RL steps of the RL stages so far: a later RL stage logs its steps after them
    for (name, stage_cfg), label in zip(plan, eval_labels([name for name, _ in plan])):
        if name == "eval":
            stages.append(evaluation(stage_cfg, label))
            continue
        stage = make[name](stage_cfg)
        count[name] = stage.repeat = count.get(name, 0) + 1
        if name == "rl":
            stage.step_offset, rl_steps = rl_steps, rl_steps + stage_cfg.rl.steps
        stages.append(stage)
    for stage in [s for s in stages if s.name == "rl"][:-1]:  # checkpoints/final is the last RL stage's only
        stage.last = False
    return stages


def stage_line(cfg: Config, stages: list[Stage]) -> list[str]:
    """Each stage's label as the run prints it, with the settings of its own stage-list entry after it."""
    entries = cfg.stages if cfg.stages is not None else [None] * len(stages)
    return [s.label + (" (" + ", ".join(f"{k}={v}" for k, v in next(iter(e.values())).items()) + ")"
                       if isinstance(e, dict) and next(iter(e.values())) else "")
            for s, e in zip(stages, entries)]


def build_context(cfg: Config, run_dir: str, log: RunLog) -> RunContext:
    """Seeds, task, policy, engine and weight sync, the verifier: everything that exists before stage 0."""
    from rlpost.models import check_lengths, load_model
    from rlpost.env import check_vocabulary, observation_alphabet, response_budget
    from rlpost.env.sources import SourceInputs, build_rl_reward, rl_reward_spec
    from rlpost.rewards import reward_role
    from rlpost.tasks import load_task
    from rlpost.weight_sync import WeightSync

    if "auto" in (cfg.trainer.precision, cfg.rollout.dtype):  # train() resolved them already; a caller may not have
        resolve_precisions(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    try:  # NumPy's stream too: checkpoints carry it, so it must be the seed's, not the process's
        import numpy as np

        np.random.seed(cfg.seed % 2**32)
    except ImportError:
        pass
    task = load_task(cfg.task)
    rows, demos = task.train_rows + task.eval_rows, task.demonstrations if "sft" in stage_names(cfg) else []
    # with an environment, an episode's tokens after the prompt (policy + environment) are its budget
    response_tokens = response_budget(cfg.task, cfg.rollout.max_new_tokens)
    # a fresh gpt_mini also spells what the environment may answer; a saved one is checked for it
    alphabet = task.alphabet + "".join(c for c in observation_alphabet(cfg.task) if c not in task.alphabet)
    model, tokenizer = load_model(cfg.model, alphabet, rows=rows, max_new_tokens=response_tokens,
                                  demonstrations=demos)
    check_vocabulary(cfg.task, tokenizer)
    check_lengths(model, tokenizer, rows, response_tokens, demos,  # before any stage, not after SFT
                  system_prompt=task.system_prompt)
    engine = loop_class(cfg.rl.topology).run_engine(cfg, model, tokenizer)  # the topology's (rlpost/loops/)
    weight_sync = WeightSync(model, engine)
    verifier = reward_role(cfg.task, task.verify, tokenizer, cfg.rollout.max_new_tokens)
    # the RL reward: rl.reward's source (the verifier, a teacher, a PRM; a reward_model stage's model later)
    name, options, where = rl_reward_spec(cfg, stage_names(cfg))
    rl_reward = build_rl_reward(name, options, SourceInputs(cfg, tokenizer, verifier,
                                                            [r["prompt"] for r in task.train_rows[:16]],
                                                            system=task.system_prompt), where)
    summary = {"run_dir": run_dir, "demonstrator_accuracy": task.demonstrator_accuracy, "status": "running"}
    return RunContext(run_dir=run_dir, seed=cfg.seed, model=model, tokenizer=tokenizer, task=task, engine=engine,
                      weight_sync=weight_sync, verifier=verifier, log=log, summary=summary, rl_reward=rl_reward)


def _load_policy(ctx: RunContext, folder: str) -> None:
    """The policy's weights from checkpoint folder `folder`; ResumeError naming the folder when they do not fit
    the model the run's config builds (another model's checkpoint)."""
    from rlpost.models import load_weights

    try:
        load_weights(ctx.model, folder)
    except Exception as e:
        raise ResumeError(f"--resume: the policy's weights in {folder} do not load into the model of this run's "
                          f"config.yaml ({type(e).__name__}: {e}); remove that checkpoint to resume from an older "
                          "one") from e


# ---------------------------------------------------------------------------- signals

class _StopOnSignal:
    """SIGTERM / SIGINT: the first asks the run to stop at the next step boundary (after a checkpoint), the
    second stops at once (KeyboardInterrupt). Handlers are put back on exit."""

    def __init__(self, ctx: RunContext):
        self.ctx, self.previous = ctx, {}

    def _handle(self, signum, frame):
        if self.ctx.stop_requested:
            raise KeyboardInterrupt
        self.ctx.stop_requested = signal.Signals(signum).name
        print(f"\nrlpost: {self.ctx.stop_requested}: stopping at the next step boundary (again to stop now)",
              flush=True)

    def __enter__(self):
        try:
            for s in (signal.SIGTERM, signal.SIGINT):
                self.previous[s] = signal.signal(s, self._handle)
        except ValueError:  # not the main thread: signals stay with their owner
            self.previous = {}
        return self

    def __exit__(self, *exc):
        for s, h in self.previous.items():
            signal.signal(s, h)


# ---------------------------------------------------------------------------- the run

def config_digest(cfg: Config) -> str:
    """sha256 of the config's settings (out_dir/run_name/threads aside, as config_differences): a checkpoint
    records it, and a resume takes only checkpoints written under the run directory's config."""
    ignore = {"out_dir", "run_name", "threads"}
    flat = {k: v for k, v in _flatten(to_dict(cfg)).items() if k not in ignore}
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()


def _resume_point(run_dir: str, stages: list[Stage], cfg: Config) -> Checkpoint | None:
    """The newest complete checkpoint of `run_dir`, verified (checkpoint.verify: its name, files, weights, and
    that this run wrote it under `cfg`); None when there is none."""
    removed = clean_partial(run_dir)
    if removed:
        print(f"rlpost: resume: removed incomplete checkpoint folder(s) {', '.join(removed)}")
    ckpts = list_checkpoints(run_dir, warn=lambda message: print(f"rlpost: warning: resume: {message}",
                                                                 file=sys.stderr, flush=True))
    if not ckpts:
        return None
    ckpt = ckpts[-1]
    verify(ckpt, run_dir, run_id=run_id_of(run_dir), config_digest=config_digest(cfg))
    i = ckpt.meta["stage"]
    if i >= len(stages) or stages[i].label != ckpt.meta["stage_name"]:
        raise ResumeError(f"checkpoint {ckpt.path} belongs to stage {ckpt.meta['stage_name']!r}, which this config "
                          "does not run at that place")
    return ckpt


def resolve_precisions(cfg: Config) -> str:
    """trainer.precision=auto and rollout.dtype=auto made concrete, in `cfg` itself (so the run directory's
    saved config, and a resume from it, keep what this machine picked), for the run and for each stage-list
    entry that sets its own trainer.precision. Returns the line the run prints at its start."""
    from rlpost.models import resolve_device, resolve_precision, resolve_rollout_dtype

    device = resolve_device(cfg.model.device)
    asked = cfg.trainer.precision
    cfg.trainer.precision, why = resolve_precision(asked, device)
    cfg.rollout.dtype = resolve_rollout_dtype(cfg.rollout.dtype, cfg.trainer.precision)
    for entry in cfg.stages or []:  # {name: {"trainer.precision": ...}} or {name: {"trainer": {"precision": ...}}}
        settings = next(iter(entry.values())) if isinstance(entry, dict) else None
        for where in (settings, settings.get("trainer") if isinstance(settings, dict) else None):
            key = "precision" if where is not settings else "trainer.precision"
            if isinstance(where, dict) and where.get(key) == "auto":
                where[key] = resolve_precision("auto", device)[0]
    picked = f"trainer.precision={asked} -> {cfg.trainer.precision} ({why})" if asked == "auto" else \
        f"trainer.precision={cfg.trainer.precision}"
    return f"rlpost: {picked}; the rollout samples in {cfg.rollout.dtype} (rollout.dtype) on {device}"


def train(cfg: Config, recipe_name: str = "default", resume: str | None = None) -> dict:
    """Run the stages, or continue the run in directory `resume` (whose saved config `cfg` must be: see
    `saved_config`); returns the summary (also written to summary.json)."""
    t_start = time.perf_counter()
    print(resolve_precisions(cfg), flush=True)
    stages = build_stages(cfg)
    has_rl = any(s.name == "rl" for s in stages)
    loop_class(cfg.rl.topology).check(cfg, has_rl)  # (load_config checked it too; a config built in code may not be)
    if cfg.trainer.strategy == "fsdp2":
        dist.init()
    elif dist.launched_by_torchrun() > 1:
        raise ValueError(f"launched on {dist.launched_by_torchrun()} ranks (torchrun) with trainer.strategy="
                         f"{cfg.trainer.strategy}: each rank would run the whole run into the same directory; "
                         "set trainer.strategy=fsdp2")
    from rlpost.sinks import check_available

    check_available(cfg.log)  # a sink switched on without its package fails before any work
    main = dist.is_main()
    if resume:  # rank 0 finds the checkpoint (and tidies half-written ones); every rank resumes from it
        run_dir = resume
        ckpt = dist.broadcast_object(_resume_point(run_dir, stages, cfg) if main else None)
        keep = ckpt.meta["metrics_lines"] if ckpt else 0
        # a checkpoint written before rollouts.jsonl was counted has no count: the RL stage cuts by step
        keep_rollouts = ckpt.meta.get("rollouts_lines") if ckpt else 0
    else:
        run_dir, ckpt, keep = dist.broadcast_object(make_run_dir(cfg, recipe_name) if main else None), None, None
        keep_rollouts = None
    run_id = dist.broadcast_object(run_id_of(run_dir) if main else None)  # what its checkpoints carry
    log = None
    try:
        log = open_log(cfg, run_dir, keep_lines=keep, resume=bool(resume), keep_rollouts=keep_rollouts,
                       checkpoint=ckpt.path if ckpt else "the start", digests=ckpt.meta if ckpt else None)
        ctx = build_context(cfg, run_dir, log)  # the data, model and rewards, checked before any stage starts
    except BaseException:
        if log is not None:
            log.close(exit_code=1)
        if main and not resume:  # refused before any work: leave nothing that blocks the same command again
            discard_run_dir(run_dir, run_id)
        dist.destroy()
        raise
    ctx.run_id, ctx.config_sha256 = run_id, config_digest(cfg)
    try:
        return _train(cfg, stages, ctx, ckpt, log, resume, t_start)
    finally:
        log.close(exit_code=1)  # closed already when _train got going (then with the run's own exit code)
        dist.destroy()


def _train(cfg: Config, stages: list[Stage], ctx: RunContext, ckpt: Checkpoint | None, log: RunLog,
           resume: str | None, t_start: float) -> dict:
    main = dist.is_main()
    run_dir = ctx.run_dir
    say = print if main else (lambda *a, **k: None)
    say(f"rlpost: run directory {run_dir}" + (f" (resuming from {ckpt.path})" if ckpt else
                                              " (resuming from the start)" if resume else ""))
    say(f"rlpost: model {cfg.model.name} ({sum(p.numel() for p in ctx.model.parameters()) / 1e6:.2f}M params), "
        f"task {ctx.task.name} ({len(ctx.task.train_rows)} train / {len(ctx.task.eval_rows)} held-out prompts); "
        f"stages: {' -> '.join(stage_line(cfg, stages))}")
    first = 0
    if ckpt is not None:
        ctx.summary.update({k: v for k, v in ckpt.meta["summary"].items() if k not in ("status", "wall_seconds")})
        ctx.weights_from = ckpt.meta["weights"]
        if ctx.weights_from is not None:
            _load_policy(ctx, ckpt.weights_dir(run_dir))
        run_state = ckpt.load_state().get("run")
        if run_state is not None:  # the version the run had reached, pushed with the restored weights
            ctx.weight_sync.load_state_dict(run_state["weight_sync"])
        elif ctx.weights_from is not None:  # a checkpoint of an older rlpost: the weights alone
            ctx.weight_sync.push()
        first = ckpt.meta["stage"] + int(ckpt.meta["finished"])
    try:
        with _StopOnSignal(ctx):
            for i, stage in enumerate(stages):
                ctx.stage_index, ctx.stage_name = i, stage.label
                if i < first:
                    stage.restore(ctx)
                    continue
                stage.setup(ctx)
                if ckpt is not None and i == ckpt.meta["stage"] and not ckpt.meta["finished"]:
                    stage.load_state_dict(ctx, ckpt.load_state()["stage"])
                if ckpt is not None and i == first:  # the random streams exactly as they were at the checkpoint
                    load_rng_state(ckpt.load_state()["rng"])
                stage.run(ctx)
                if stage.changes_weights and is_lora(ctx.model):  # the next stage's reference: the policy now
                    fold_adapters(ctx.model)
                    ctx.weight_sync.push()
                if stage.changes_weights or stage.checkpoint:
                    ctx.save(stage.end_checkpoint, step=0, finished=True, state={},
                             weights=stage.changes_weights)
                    if not stage.keep_step_checkpoints:
                        remove_step_checkpoints(run_dir, i)
                ctx.check_stop()
        ctx.summary["status"] = "ok"
    except RunInterrupted as e:
        ctx.summary["status"] = f"interrupted ({e}); continue with `rlpost train --resume {run_dir}`"
        e.run_dir = run_dir
        raise
    except BaseException as e:  # lose nothing: keep the weights and say why the run stopped
        from rlpost.models import save_model

        # a sharded policy is gathered only in one process: with other ranks, they may not be there to join
        if main and (not dist.is_sharded(ctx.model) or dist.world_size() == 1):
            last = os.path.join(run_dir, "checkpoints", "last")
            try:
                save_model(dist.unsharded(ctx.model), ctx.tokenizer, last, merged=True)
            except Exception as save_error:  # (disk full) the run's own error is the one to report
                warning = (write_error(save_error, last, "the policy's weights to") if is_write_failure(save_error)
                           else f"cannot save the policy's weights to {last}: {type(save_error).__name__}: "
                                f"{save_error}")
                print(f"rlpost: warning: {warning}", file=sys.stderr, flush=True)
        ctx.summary["status"] = f"failed: {type(e).__name__}: {e}"
        raise
    finally:
        ctx.summary["wall_seconds"] = time.perf_counter() - t_start
        if main:
            try:  # through a temporary file: a failed write leaves the one before whole
                replace_file(os.path.join(run_dir, "summary.json"), [json.dumps(ctx.summary, indent=2)])
            except OSError as e:
                if ctx.summary["status"] == "ok":
                    raise
                print(f"rlpost: warning: {e}", file=sys.stderr, flush=True)  # the run's own error goes on up
        log.close(exit_code=0 if ctx.summary["status"] == "ok" else 1)
        for stage in stages:
            stage.close()
        ctx.engine.close()
        # process pools, a judge's engine: once each (a learned reward over task.env's episodes shares the env's)
        for fn in {id(f): f for f in (getattr(r, "fn", None) for r in (ctx.verifier, ctx.rl_reward))}.values():
            getattr(fn, "close", lambda: None)()
    if main:
        print_table(ctx.summary)
    return ctx.summary


def print_table(summary: dict) -> None:
    """The held-out numbers, one line per evaluation that ran, in the order they ran."""

    def pct(v):
        return "   n/a" if v is None else f"{100 * v:5.1f}%"

    names = {"start": "initial model", "sft": "after SFT", "rl": "after RL", "rejection": "after rejection SFT",
             "dpo": f"after {str(summary.get('preference_loss', 'dpo')).upper()}", "reward_model": "after RM"}
    print("\n  held-out pass@1")
    print("  ---------------------------")
    print(f"  demonstrator        {pct(summary.get('demonstrator_accuracy'))}")
    for key, value in summary.items():
        if key.startswith("pass@1_"):
            label = key[len("pass@1_"):]
            base, _, n = label.rpartition("_")
            name = f"{names[base]} ({n})" if n.isdigit() and base in names else names.get(label, f"after {label}")
            print(f"  {name:<20}{pct(value)}")
            for source, v in summary.get(f"by_source_pass@1_{label}", {}).items():  # task.sources
                print(f"    {source:<18}{pct(v)}")
    if summary.get("rm_pair_accuracy") is not None:
        print(f"  reward model pairs  {pct(summary['rm_pair_accuracy'])}  (held-out pair accuracy)")
    print(f"  wall-clock          {summary['wall_seconds']:6.1f}s")
    print(f"  run directory       {summary['run_dir']}\n")
