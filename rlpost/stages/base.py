"""What every stage is built on: `Stage`, the part of a run it is, and `RunContext`, what the stages of a run
share (the policy, the task, the engine, the rewards, the log). rlpost/run.py builds the context and runs the
stages in order; each stage module imports this one, never the run.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

from rlpost import distributed as dist
from rlpost.checkpoint import SHARDS_DIR, rng_state, temporary_folder, write_checkpoint
from rlpost.models import encode_prompt, save_model
from rlpost.registry import Registry
from rlpost.runlog import RunLog

# name -> Stage class: what a `stages` list entry (and build_stages) may name; each stage module registers itself
STAGES = Registry("stage", "stages")
register = STAGES.register


class RunInterrupted(Exception):
    """SIGTERM or Ctrl-C stopped the run at a step boundary; the checkpoint written there resumes it."""


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
    run_id: str | None = None         # run.json's id and the config's digest: a resume takes only checkpoints
    config_sha256: str | None = None  # written by this run under this config (checkpoint.verify)
    data_sha256: dict | None = None   # the task's rows (`data_digests`): a resume refuses other data

    def prompt_ids(self, rows: list[dict]) -> list[list[int]]:
        """Each row's prompt as token ids: a string or chat messages, with the task's system prompt."""
        system = getattr(self.task, "system_prompt", None)
        return [encode_prompt(self.tokenizer, r["prompt"], system) for r in rows]

    def save(self, name: str, *, step: int, finished: bool, state: dict, weights: bool, optimizer=None,
             critic=None) -> str:
        """Write checkpoint `name` of the current stage: `state` is the stage's own state_dict; the random
        streams, metrics position and summary are added here. `weights`: the policy changed since the
        last checkpoint that holds it, so save it (else the new checkpoint points at that one).
        Every rank calls it. A sharded policy's mid-stage checkpoint (not `finished`) is written by every rank:
        its shards of the policy and of `optimizer` (the trainer's, whose state `state` then leaves out) go to
        shards/ (rlpost.distributed.save_shards) with a PPO `critic`'s (which `state` leaves out too), nothing
        is gathered; an end-of-stage one gathers the policy
        onto rank 0, which writes it as a model folder. Rank 0 writes the rest."""
        sharded = weights and not finished and dist.is_sharded(self.model)
        # a collective when the policy is sharded
        model = dist.unsharded(self.model) if weights and not sharded else None
        meta = {"stage": self.stage_index, "stage_name": self.stage_name,
                "step": step, "finished": finished, "metrics_lines": self.log.lines,
                "rollouts_lines": self.log.rollout_lines,
                "summary": self.summary, "weights": self.weights_from, **self.log.digests()}
        if self.run_id is not None:
            meta["run_id"] = self.run_id
        if self.config_sha256 is not None:
            meta["config_sha256"] = self.config_sha256
        if self.data_sha256 is not None:
            meta["data_sha256"] = self.data_sha256
        # the run's own state too, so that an end-of-stage checkpoint (state={}) resumes the next stage exactly:
        # the weight-sync version the next RL stage counts on from
        full = {"stage": state, "rng": rng_state(), "run": {"weight_sync": self.weight_sync.state_dict()}}
        if dist.world_size() > 1:  # each rank's own streams, which a resume on as many ranks puts back
            full["rng_ranks"] = dist.gather_objects(full["rng"])
        # a finished stage's checkpoint is a plain model folder (a LoRA model's adapters merged in); a
        # mid-stage one keeps a LoRA model's base and adapters apart, so that a resume continues exactly
        saver = None if model is None else (lambda folder: save_model(model, self.tokenizer, folder,
                                                                      merged=finished))
        if sharded:
            tmp = os.path.join(self.run_dir, "checkpoints", f".tmp-{name}")
            if dist.is_main():
                temporary_folder(self.run_dir, name)
            dist.save_shards(os.path.join(tmp, SHARDS_DIR), self.model, optimizer, critic)
        shards_world = dist.world_size() if sharded else None
        path = write_checkpoint(self.run_dir, name, meta, full, saver, shards_world) if dist.is_main() else None
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


def data_digests(task) -> dict[str, str]:
    """sha256 of the task's training rows, held-out rows and demonstrations, each as a whole (their order too): a
    checkpoint records them, and a resume refuses data that changed since (the prompt sampler's position and the
    SFT draws are indices into these very rows)."""
    def plain(value: Any) -> Any:  # what JSON has no type for, the same in every process (no address, no set order)
        if hasattr(value, "tolist"):  # NumPy arrays and scalars, tensors
            return value.tolist()
        if isinstance(value, (bytes, bytearray)):
            return value.hex()
        if isinstance(value, (set, frozenset)):
            return sorted(map(repr, value))
        text = repr(value)
        return type(value).__qualname__ if " at 0x" in text else text

    def digest(rows: list[dict]) -> str:
        h = hashlib.sha256()
        for row in rows:
            h.update(json.dumps(row, sort_keys=True, default=plain).encode("utf-8", "surrogateescape") + b"\n")
        return h.hexdigest()

    return {"train_rows": digest(task.train_rows), "eval_rows": digest(task.eval_rows),
            "demonstrations": digest(task.demonstrations)}


class Stage:
    """One part of a run. `setup` builds what the stage needs (after any earlier stage ran or was
    restored); `load_state_dict` puts back a checkpoint's state when a run resumes inside the stage;
    `run` does the work, writing mid-stage checkpoints through `ctx.save` when it can; `restore`
    re-creates a finished stage's effect on the context (e.g. the RL reward) on resume."""

    name = "stage"
    sections: tuple[str, ...] = ()  # the config sections it reads: what a `stages` entry may set for it alone
    changes_weights = False   # a finished stage that changed the policy saves it (checkpoints/<checkpoint>)
    checkpoint = ""           # the folder name of its end-of-stage checkpoint ("" : the stage's name)
    keep_step_checkpoints = False  # False: its mid-stage checkpoints go once the end-of-stage one is written
    repeat = 1                # the n-th stage of its name in the run (build_stages counts them)

    @classmethod
    def from_config(cls, cfg, label: str | None = None) -> "Stage":
        """The stage built from the run's config (only its own `sections` of it); `label`: an evaluation's, the
        stage it follows (build_stages gives it)."""
        raise NotImplementedError

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
