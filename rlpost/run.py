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
                       run's id, which its checkpoints carry (a resume refuses another run's); `layout_changes`:
                       an entry per resume that changed layout keys, written once its start passed every check
                       (`record_layout_changes`)
    config.yaml        the resolved config; a resume with a different one is refused, naming the keys, unless
                       it changes only layout keys (micro-batches, gradient checkpointing, ...: the same
                       computation laid out otherwise in memory), which then makes it the run's config
    metrics.jsonl      one JSON line per logged step (a resume drops lines written after its checkpoint)
    rollouts.jsonl     sampled completions every `log.rollouts_every` RL steps (likewise cut back on resume)
    checkpoints/       see rlpost/checkpoint.py; every stage that changes the policy ends with one (with
                       LoRA, model.lora: its adapters are folded into the base first, and that checkpoint
                       is the plain merged model; mid-stage ones hold the base and the adapters apart);
                       under trainer.strategy=fsdp2 a mid-stage one holds shards/ instead of model files:
                       every rank's shards of the policy, a PPO critic and AdamW's state (DCP)
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
writes the run directory, metrics.jsonl, summary.json, the console lines and the checkpoints' metadata and
state; a mid-stage checkpoint's policy and optimizer state are written by every rank, each its own shards
(checkpoints/<name>/shards/, nothing gathered), an end-of-stage one's policy is gathered into one full model
folder. Every rank resumes from the same checkpoint, on any number of ranks (the shards are resharded). The
first stage that trains shards the policy (it stays sharded): SFT, preference and the reward model's fit split
each batch between the ranks, the RL stage each step's prompts; held-out evaluation samples on rank 0 alone
and hands its numbers to the others.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sys
import time
from typing import Any

import torch
import yaml

from rlpost import distributed as dist
from rlpost.checkpoint import (SHARDS_DIR, Checkpoint, clean_partial, list_checkpoints, load_rng_state,
                               remove_step_checkpoints, verify, write_model_folder)
from rlpost.config import (CHANGED_DEFAULTS, Config, config_of, from_dict, plugin_keys, stage_configs, stage_names,
                           to_dict, with_old_defaults)
from rlpost.env import check_vocabulary, observation_alphabet, response_budget
from rlpost.env.sources import SourceInputs, build_rl_reward, rl_reward_spec
from rlpost.env.verifiers import reward_role
from rlpost.loops import loop_class
from rlpost.models import (cached_hub_folder, check_lengths, load_model, load_weights, missing_weights,
                           packing_refusal, resolve_device, resolve_precision, resolve_rollout_dtype,
                           safetensors_files, save_model)
from rlpost.models.lora import fold_adapters, is_lora, saved_lora_config
from rlpost.runlog import (RUN_FILE, ResumeError, RunLog, discard_run_dir, hold_run_dir, make_run_dir, open_log,
                           release_run_dir, replace_file, run_id_of)
from rlpost.schema import ConfigError, layout_keys
from rlpost.sinks import check_available
from rlpost.stages import STAGES
from rlpost.stages.base import RunContext, RunInterrupted, Stage, data_digests
from rlpost.tasks import dataset_splits, load_task
from rlpost.weight_sync import WeightSync

# ---------------------------------------------------------------------------- run directory

def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and prefix + k not in plugin_keys():  # a plug-in's mapping is compared whole
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
    try:
        with open(info_path) as f:
            info = json.load(f)
    except ValueError as e:
        info = e
    if not isinstance(info, dict):
        raise ResumeError(f"--resume: {info_path} is not a JSON object ({info}); the run cannot be resumed from a "
                          f"damaged {RUN_FILE}: restore it from a copy of the run directory")
    if "kind" not in info:  # (said "a `rlpost None` run")
        raise ResumeError(f"--resume: {info_path} names no 'kind' (the command that made the run): not a run.json "
                          f"rlpost wrote, or a damaged one; restore it from a copy of the run directory")
    if info.get("kind") != kind:
        raise ResumeError(f"--resume: {run_dir} is a `rlpost {info.get('kind')}` run, not a `rlpost {kind}` run")
    log = info.get(LAYOUT_LOG, [])
    fields = {"checkpoint", "changes", "config_sha256", "resumed_config_sha256", "time"}
    if not isinstance(log, list) or not all(isinstance(e, dict) and fields <= set(e) and isinstance(e["changes"], dict)
                                            for e in log):
        raise ResumeError(f"--resume: {info_path}: '{LAYOUT_LOG}' is not a list of the entries a resume that changed "
                          f"layout keys writes (each with {', '.join(sorted(fields))}); restore it from a "
                          "copy of the run directory")
    try:
        with open(cfg_path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        data = f"not valid YAML: {e}"
    if not isinstance(data, dict):
        raise ResumeError(f"--resume: {cfg_path} is not the run's config (a YAML mapping of config keys; "
                          f"{data if isinstance(data, str) else f'got {type(data).__name__}'}): restore it from a "
                          "copy of the run directory")
    return from_dict(Config, with_old_defaults(data))


def config_changes(saved: Config, new: Config, on_saved: bool = False) -> dict[str, tuple[Any, Any]]:
    """{key: (saved value, new value)} for every config key that differs (out_dir/run_name/threads excepted),
    in key order. A key whose default changed (CHANGED_DEFAULTS) at its old default in `saved` and its new one in
    `new` is no difference: the run was started under the old default, and the command line did not set the key.
    `on_saved`: `new` was made from `saved` itself (key=value overrides on the saved config), so every difference,
    that one too, is one the command line asked for."""
    a, b = _flatten(to_dict(saved)), _flatten(to_dict(new))
    ignore = {"out_dir", "run_name", "threads"}
    defaults = _flatten(to_dict(Config()))
    if not on_saved:
        ignore |= {k for k, old in CHANGED_DEFAULTS.items() if a.get(k) == old and b.get(k) == defaults.get(k)}
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if k not in ignore and a.get(k) != b.get(k)}


def config_differences(saved: Config, new: Config) -> list[str]:
    """`key: saved -> new` for every config key that differs (`config_changes`)."""
    return [f"{k}: {a!r} -> {b!r}" for k, (a, b) in config_changes(saved, new).items()]


def resume_changes(saved: Config, new: Config, run_dir: str, on_saved: bool = False) -> dict[str, tuple[Any, Any]]:
    """The layout keys (`opt(..., layout=True)`: micro-batches, packing, chunks, recomputation, offload, the rollout's
    batch and vLLM's sleep; rlpost.schema.layout_keys) that `new` changes from run `run_dir`'s saved config,
    {key: (saved, new)}: a resume may change them (after an out-of-memory error, a smaller micro-batch).
    ConfigError naming every other key that differs, and the keys that may."""
    changes = config_changes(saved, new, on_saved)
    layout = layout_keys(Config)
    refused = [f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items() if k not in layout]
    if refused:
        raise ConfigError(f"--resume {run_dir}: the given config differs from the run's saved config.yaml in keys "
                          "that change what the run computes; nothing was changed:\n  " + "\n  ".join(refused)
                          + "\na resume may change only the keys that lay the same computation out in memory: "
                          + ", ".join(layout))
    if new.model.lora.r > 0 and new.model.lora.dropout > 0:
        check_layout_dropout(changes, f"model.lora.dropout={new.model.lora.dropout}", run_dir)
    if changes.get("reference.offload", (None, False))[1] and resolve_device(new.model.device).type == "cpu":
        raise ConfigError(f"--resume {run_dir}: config key 'reference.offload' is true, but the policy runs on the "
                          f"CPU (model.device={new.model.device}): nothing to offload to; nothing was changed. Set "
                          "reference.offload=false, or resume on a GPU")
    return changes


# The layout keys that leave the policy's training forward as it is (the log-prob head's chunk reads the hidden
# states of one forward; the reference and the rollout run in eval mode). Every other one splits, packs or
# re-runs that forward otherwise, and with it the dropout masks it draws: under dropout not a layout change.
DROPOUT_FREE_LAYOUT = frozenset({"trainer.logprob_chunk", "reference.offload", "rollout.max_num_seqs",
                                 "rollout.vllm_sleep", "rollout.vllm_gpu_memory_utilization"})


def training_dropout(model: torch.nn.Module) -> str | None:
    """Where `model` drops out in training: the first module with a dropout probability above 0 (an nn.Dropout,
    LoRA's included, or an attention's own probability) named with it; None when nowhere."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0:
            return f"{name}: p={module.p}"
        for attr in ("dropout", "attention_dropout", "attn_dropout"):
            p = getattr(module, attr, None)
            if isinstance(p, float) and p > 0:
                return f"{name}.{attr}={p}"
    return None


def check_layout_dropout(changes: dict[str, tuple[Any, Any]], dropout: str | None, run_dir: str) -> None:
    """ConfigError when the policy trains with dropout (`dropout`: where) and `changes` has a layout key outside
    DROPOUT_FREE_LAYOUT: its micro-batches (packing, shared prompts) draw other dropout masks, so the run would
    compute other gradients, not the same ones laid out otherwise."""
    shaping = [k for k in changes if k not in DROPOUT_FREE_LAYOUT]
    if dropout and shaping:
        raise ConfigError(f"--resume {run_dir}: the policy trains with dropout ({dropout}), and each micro-batch "
                          f"draws its own dropout masks: {', '.join(shaping)} would change the gradients, not only "
                          "the memory layout; nothing was changed. Under dropout a resume may change only "
                          + ", ".join(sorted(DROPOUT_FREE_LAYOUT)))


def resume_config(run_dir: str, given: Config | None = None,
                  on_saved: bool = False) -> tuple[Config, dict[str, tuple[Any, Any]]]:
    """The config run `run_dir` resumes with, and the layout keys it changes (`resume_changes`): its saved
    config.yaml, with the layout keys `given` (a config from the command line, its trainer.precision /
    rollout.dtype auto made concrete first, as the saved config's were when the run started) sets otherwise,
    and its `threads`. Any other difference is refused (ConfigError): the saved config's value stays where
    `given` differs only by a changed default (CHANGED_DEFAULTS) unless `given` was made on the saved config
    (`on_saved`: then the command line set it), and out_dir/run_name are the run's."""
    saved = saved_config(run_dir)
    if given is None:
        return saved, {}
    resolve_precisions(given)
    changes = resume_changes(saved, given, run_dir, on_saved)
    data = to_dict(saved)
    data["threads"] = given.threads
    for key, (_, value) in changes.items():
        *sections, name = key.split(".")
        node = data
        for section in sections:
            node = node[section]
        node[name] = value
    return config_of(data), changes


LAYOUT_LOG = "layout_changes"  # run.json's record of the resumes that changed layout keys


def layout_change_line(changes: dict[str, tuple[Any, Any]], checkpoint: str | None) -> str:
    """The line a resume that changes layout keys prints (and config.yaml keeps as a comment)."""
    return (f"resumed from {checkpoint or 'the start'} with layout keys changed: "
            + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
            + "; the same computation laid out differently in memory, so the run is no longer guaranteed "
              "bit-identical to an uninterrupted one (float summation order)")


def earlier_config_digests(run_dir: str, current: str) -> set[str]:
    """The digests (`config_digest`) of the configs run `run_dir` had before resumes changed its layout keys
    (run.json's LAYOUT_LOG), whose checkpoints resume under config.yaml as it is now, `current`: the config before
    the entry that wrote `current`, the config before the entry that wrote that one, and so on back, so that each
    config reached differs from `current` in layout keys at most (every entry's change was checked). An entry whose
    config.yaml write a kill prevented (run.json is written first) wrote no config in use and is passed over;
    after an edit of config.yaml by hand no entry wrote `current`: none."""
    try:
        with open(os.path.join(run_dir, RUN_FILE)) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return set()
    entries = [e for e in (info.get(LAYOUT_LOG, []) if isinstance(info, dict) else []) if isinstance(e, dict)]
    found, wanted = set(), current
    for entry in reversed(entries):
        if entry.get("resumed_config_sha256") == wanted and entry.get("config_sha256"):
            wanted = entry["config_sha256"]
            found |= {current, wanted}
    return found


def record_layout_changes(run_dir: str, saved: Config, cfg: Config, changes: dict[str, tuple[Any, Any]],
                          ckpt: Checkpoint | None) -> None:
    """Keep a resume's layout changes in the run directory (`train`, on rank 0, once the resumed run's start has
    passed its checks: the policy built, its dropout checked): an entry in run.json's LAYOUT_LOG (the checkpoint,
    the keys with their old and new values, the digests of the config before, whose checkpoints stay resumable,
    and after, the time), and config.yaml rewritten as the resumed run's config, so that a later resume compares
    against it and keeps its layout, headed by one comment line per such resume (`rlpost report` shows the
    config). run.json first: a kill between the two writes leaves the config before, under which the run
    resumes."""
    info_path = os.path.join(run_dir, RUN_FILE)
    with open(info_path) as f:
        info = json.load(f)
    info.setdefault(LAYOUT_LOG, []).append({
        "checkpoint": ckpt.name if ckpt is not None else None,
        "changes": {k: [a, b] for k, (a, b) in changes.items()},
        "config_sha256": config_digest(saved), "resumed_config_sha256": config_digest(cfg),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    notes = [f"# {e['time']}: {layout_change_line({k: tuple(v) for k, v in e['changes'].items()}, e['checkpoint'])}"
             for e in info[LAYOUT_LOG]]
    replace_file(info_path, [json.dumps(info)])
    replace_file(os.path.join(run_dir, "config.yaml"),
                 [line + "\n" for line in notes] + [yaml.safe_dump(to_dict(cfg), sort_keys=False)])


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
    plan = stage_configs(cfg)
    stages: list[Stage] = []
    count: dict[str, int] = {}
    rl_steps = 0  # RL steps of the RL stages so far: a later RL stage logs its steps after them
    for (name, stage_cfg), label in zip(plan, eval_labels([name for name, _ in plan])):
        stage = STAGES.classes[name].from_config(stage_cfg, label)
        if name == "eval":
            stages.append(stage)
            continue
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


def skeleton_resume(cfg: Config, ckpt: Checkpoint | None, run_dir: str) -> str | None:
    """The shards folder a fsdp2 `--resume` reads the policy from into a sharded skeleton (`build_context`): the
    checkpoint's weights are DCP shards and the engine keeps its own copy (colocated, rl.weight_sync auto or
    copy, not vLLM), without LoRA. None otherwise: the policy is built whole and the weights read into it."""
    folder = ckpt.weights_dir(run_dir) if ckpt is not None else None
    if folder is None or not os.path.isdir(os.path.join(folder, SHARDS_DIR)) or cfg.trainer.strategy != "fsdp2":
        return None
    if cfg.rl.topology != "colocated" or cfg.rl.weight_sync not in ("auto", "copy") or cfg.rollout.engine == "vllm":
        return None
    return None if cfg.model.lora.r > 0 else os.path.join(folder, SHARDS_DIR)


def skeleton_start(cfg: Config, ckpt: Checkpoint | None, run_dir: str) -> str | None:
    """The saved model folder a fsdp2 run reads its policy from into a sharded skeleton when it does not resume
    from shards (`build_context`): a fresh run's (or a resume's before any weights changed) `model.name`, a
    local folder of safetensors weights (a Hugging Face model or a saved gpt_mini; not a .bin checkpoint) or a
    hub id whose safetensors are all in the local Hugging Face cache (its snapshot folder), or the model folder
    of the checkpoint it resumes from; under the same conditions as `skeleton_resume` (colocated,
    rl.weight_sync auto or copy, not vLLM, no LoRA). None otherwise: the policy is built whole on every rank and
    sharded by the first stage that trains (a fresh gpt_mini, whose weights are drawn from the seed, too; a hub
    id still to download)."""
    if cfg.trainer.strategy != "fsdp2" or cfg.model.lora.r > 0 or cfg.rl.topology != "colocated" \
            or cfg.rl.weight_sync not in ("auto", "copy") or cfg.rollout.engine == "vllm":
        return None
    folder = ckpt.weights_dir(run_dir) if ckpt is not None else None
    folder = folder or cfg.model.name
    folder = folder if os.path.isdir(folder) else cached_hub_folder(folder)
    if folder is None or safetensors_files(folder) is None or saved_lora_config(folder) is not None:
        return None
    return folder


def check_held_out(cfg: Config, task) -> None:
    """ValueError, before any stage, when the run evaluates (an eval stage, rl.eval_every) and the task has no
    held-out rows (a file task without task.eval_file): the first evaluation failed after SFT had run."""
    stages = stage_configs(cfg)  # (an rl entry of the stage list may set its own rl.eval_every)
    uses = (["an eval stage"] if any(name == "eval" for name, _ in stages) else []) + sorted({
        f"rl.eval_every={sc.rl.eval_every}" for name, sc in stages
        if name == "rl" and 0 < sc.rl.eval_every < sc.rl.steps})
    if uses and not task.eval_rows:
        t = cfg.task
        if t.name not in ("file", "jsonl") or t.eval_file:
            source = "its held-out rows are empty"
        elif dataset_splits(t.train_file) is None:
            source = "task.eval_file is not set"
        else:
            source = f"task.eval_file is not set and task.train_file has no split {t.eval_split!r} (task.eval_split)"
        raise ValueError(f"task {task.name} has no held-out rows ({source}), and the run evaluates on them "
                         f"({' and '.join(uses)}): set task.eval_file to held-out prompts, or give `stages` without "
                         "eval (and rl.eval_every=0)")


def build_context(cfg: Config, run_dir: str, log: RunLog, shards: str | None = None,
                  folder: str | None = None) -> RunContext:
    """Seeds, task, policy, engine and weight sync, the verifier: everything that exists before stage 0.
    `shards` (a fsdp2 resume, `skeleton_resume`): the policy is built as a skeleton, sharded, and each rank reads
    its own shards from that folder, so no rank ever holds the whole policy; the engine's copy (built empty) is
    gathered from them. `folder` (a fsdp2 run's model folder, `skeleton_start`): the same, each rank reading its
    shards' rows of each tensor from the folder's safetensors (rlpost.models.read_own_rows); when the folder does
    not hold the model's weights under its own names (a model whose names transformers converts), the policy is
    built whole instead, as without `folder`."""
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
    check_held_out(cfg, task)
    rows, demos = task.train_rows + task.eval_rows, task.demonstrations if "sft" in stage_names(cfg) else []
    # with an environment, an episode's tokens after the prompt (policy + environment) are its budget
    response_tokens = response_budget(cfg.task, cfg.rollout.max_new_tokens)
    # a fresh gpt_mini also spells what the environment may answer; a saved one is checked for it
    alphabet = task.alphabet + "".join(c for c in observation_alphabet(cfg.task) if c not in task.alphabet)
    model, tokenizer = load_model(cfg.model, alphabet, rows=rows, max_new_tokens=response_tokens,
                                  demonstrations=demos, skeleton=shards is not None or folder is not None)
    # the folder's tensors listed once (each safetensors header read once): what is missing, then each rank's rows
    files = safetensors_files(folder) if shards is None and folder is not None else None
    unread = missing_weights(model, folder, files) if shards is None and folder is not None else []
    if unread:  # read whole, as transformers does (it converts names, unties a head saved apart)
        if dist.is_main():
            print(f"rlpost: trainer.strategy=fsdp2: the policy is built whole on each rank, then sharded: {folder} "
                  f"does not hold its weights once each under its own names (e.g. {', '.join(unread[:3])})",
                  flush=True)
        folder = None
        model, tokenizer = load_model(cfg.model, alphabet, rows=rows, max_new_tokens=response_tokens,
                                      demonstrations=demos)
    check_vocabulary(cfg.task, tokenizer)
    check_lengths(model, tokenizer, rows, response_tokens, demos,  # before any stage, not after SFT
                  system_prompt=task.system_prompt)
    engine = loop_class(cfg.rl.topology).run_engine(cfg, model, tokenizer)  # the topology's (rlpost/loops/)
    if shards is not None:  # (the engine was built from the skeleton: empty until the weight sync's first push)
        dist.shard_model(model, resolve_device(cfg.model.device))
        _load_policy(model, os.path.dirname(shards))
    elif folder is not None:  # each rank its rows of the folder's tensors (a checkpoint's: ResumeError if unfit)
        dist.shard_model(model, resolve_device(cfg.model.device))
        checkpoints = os.path.abspath(os.path.join(run_dir, "checkpoints"))
        if os.path.commonpath([checkpoints, os.path.abspath(folder)]) == checkpoints:
            _load_policy(model, folder, files)
        else:
            load_weights(model, folder, files)
        if dist.is_main():
            print(f"rlpost: trainer.strategy=fsdp2: the policy was built empty and sharded; each rank read only its "
                  f"shards of the weights in {folder}", flush=True)
    line = packing_line(cfg, model)  # (its probe runs the model: once the weights are there)
    if line and dist.is_main():
        print(line, flush=True)
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


def packing_line(cfg: Config, model) -> str | None:
    """What trainer.packing=auto does in this run's RL stages, as the line the run prints at its start (None when
    packing is set explicitly or no stage is RL): on, off because the policy cannot keep packed sequences apart
    (rlpost.models.packing_refusal). Under fsdp2 each rank chooses for its own rows (rlpost.packing.even_forwards
    keeps the ranks' forward counts equal)."""
    if cfg.trainer.packing != "auto" or "rl" not in stage_names(cfg):
        return None
    why = packing_refusal(model)
    if why is not None:
        return f"rlpost: trainer.packing=auto -> off: {why}"
    return ("rlpost: trainer.packing=auto -> on: RL micro-batches run packed where that computes fewer token "
            "positions than padded rows with each prompt once (trainer.packing=false: always padded)")


def _load_policy(model, folder: str, files: dict[str, str] | None = None) -> None:
    """The policy's weights from checkpoint folder `folder` (a sharded one's shards/: into each rank's shards of a
    sharded policy, or read whole into a not yet sharded one on every rank); ResumeError naming the folder when
    they do not fit the model the run's config builds (another model's checkpoint). `files`: the folder's
    safetensors listing when the caller has it (rlpost.models.load_weights)."""
    try:
        if os.path.isdir(os.path.join(folder, SHARDS_DIR)):
            dist.load_shards(os.path.join(folder, SHARDS_DIR), model)
        else:
            load_weights(model, folder, files)
    except Exception as e:
        raise ResumeError(f"--resume: the policy's weights in {folder} do not load into the model of this run's "
                          f"config.yaml ({type(e).__name__}: {e}); remove that checkpoint to resume from an older "
                          "one") from e


def rank_rng(state: dict) -> dict:
    """The random streams this rank resumes with: its own when the checkpoint was written by as many ranks
    (`rng_ranks`), else rank 0's (a resume on another number of ranks, or a 1-process checkpoint)."""
    ranks = state.get("rng_ranks")
    if ranks is not None and len(ranks) == dist.world_size():
        return ranks[dist.rank()]
    return state["rng"]


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


def _resume_point(run_dir: str, stages: list[Stage], cfg: Config, saved: Config | None = None) -> Checkpoint | None:
    """The newest complete checkpoint of `run_dir`, verified (checkpoint.verify: its name, files, weights, and
    that this run wrote it under `cfg`, or under the run's saved config `saved` or one it had before a resume
    changed layout keys: `cfg` differs from them in layout keys at most); None when there is none."""
    removed = clean_partial(run_dir)
    if removed:
        print(f"rlpost: resume: removed incomplete checkpoint folder(s) {', '.join(removed)}")
    ckpts = list_checkpoints(run_dir, warn=lambda message: print(f"rlpost: warning: resume: {message}",
                                                                 file=sys.stderr, flush=True))
    if not ckpts:
        return None
    ckpt = ckpts[-1]
    digest, recorded, now = config_digest(cfg), ckpt.meta.get("config_sha256"), config_digest(saved or cfg)
    if recorded in earlier_config_digests(run_dir, now) | {now}:
        digest = recorded
    verify(ckpt, run_dir, run_id=run_id_of(run_dir), config_digest=digest)
    i = ckpt.meta["stage"]
    if i >= len(stages) or stages[i].label != ckpt.meta["stage_name"]:
        raise ResumeError(f"checkpoint {ckpt.path} belongs to stage {ckpt.meta['stage_name']!r}, which this config "
                          "does not run at that place")
    return ckpt


def check_data(ckpt: Checkpoint, digests: dict[str, str], cfg: Config) -> None:
    """ResumeError naming what changed when the task's rows (`data_digests`) are not the ones checkpoint `ckpt` was
    written with: the prompt sampler's position and the SFT draws it holds are indices into those rows, so other
    rows would be a different run (or an IndexError, a file cut short). A checkpoint of an older rlpost, which
    recorded none, is taken as it is."""
    recorded = ckpt.meta.get("data_sha256")
    if not isinstance(recorded, dict):
        return
    changed = [k for k, d in digests.items() if k in recorded and recorded[k] != d]
    if changed:
        files = {k: v for k, v in (("task.train_file", cfg.task.train_file), ("task.eval_file", cfg.task.eval_file))
                 if v}
        where = ", ".join(f"{k}={v}" for k, v in files.items()) or f"task.name={cfg.task.name}"
        names = {"train_rows": "training rows", "eval_rows": "held-out rows", "demonstrations": "demonstrations"}
        raise ResumeError(f"--resume: the task's {', '.join(names.get(k, k) for k in changed)} are not the ones "
                          f"checkpoint {ckpt.path} was written with ({where}; edited, regenerated or replaced since "
                          "the run started?); resuming on other data would not continue the same run. Put the data "
                          "back as they were, or start a new run")


def resolve_precisions(cfg: Config) -> str:
    """trainer.precision=auto and rollout.dtype=auto made concrete, in `cfg` itself (so the run directory's
    saved config, and a resume from it, keep what this machine picked), for the run and for each stage-list
    entry that sets its own trainer.precision. Returns the line the run prints at its start."""
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


def train(cfg: Config, recipe_name: str = "default", resume: str | None = None,
          layout_changes: dict[str, tuple[Any, Any]] | None = None) -> dict:
    """Run the stages, or continue the run in directory `resume` (whose saved config `cfg` must be, up to layout
    keys: see `resume_config`); returns the summary (also written to summary.json). `layout_changes`: what the
    caller's own `resume_config` returned with `cfg` (the command line, which knows whether `cfg` was made on the
    saved config); None: worked out here."""
    t_start = time.perf_counter()
    saved = None
    if resume:  # (every rank reads config.yaml here, before the first collective: rank 0 may rewrite it later)
        saved = saved_config(resume)
        if layout_changes is None:
            cfg, layout_changes = resume_config(resume, cfg)
    layout_changes = layout_changes or {}
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
    check_available(cfg.log)  # a sink switched on without its package fails before any work
    main = dist.is_main()
    if resume:  # rank 0 finds the checkpoint (and tidies half-written ones); every rank resumes from it
        run_dir = resume
        if main:  # refused while another process writes the run directory (the run itself, still going)
            hold_run_dir(run_dir)
        try:
            ckpt = dist.broadcast_object(_resume_point(run_dir, stages, cfg, saved) if main else None)
        except BaseException:
            release_run_dir(run_dir)
            raise
        keep = ckpt.meta["metrics_lines"] if ckpt else 0
        # a checkpoint written before rollouts.jsonl was counted has no count: the RL stage cuts by step
        keep_rollouts = ckpt.meta.get("rollouts_lines") if ckpt else 0
    else:
        run_dir = dist.broadcast_object(make_run_dir(cfg, recipe_name, hold=True) if main else None)
        ckpt, keep = None, None
        keep_rollouts = None
    run_id = dist.broadcast_object(run_id_of(run_dir) if main else None)  # what its checkpoints carry
    log = None
    try:
        log = open_log(cfg, run_dir, keep_lines=keep, resume=bool(resume), keep_rollouts=keep_rollouts,
                       checkpoint=ckpt.path if ckpt else "the start", digests=ckpt.meta if ckpt else None)
        # the data, model and rewards, checked before any stage starts (a fsdp2 resume: the policy's shards read)
        shards = skeleton_resume(cfg, ckpt, run_dir)
        ctx = build_context(cfg, run_dir, log, shards=shards,
                            folder=None if shards else skeleton_start(cfg, ckpt, run_dir))
        ctx.data_sha256 = data_digests(ctx.task)
        if ckpt is not None:
            check_data(ckpt, ctx.data_sha256, cfg)
        if layout_changes:  # before the change is recorded: refused, the run directory keeps its config
            check_layout_dropout(layout_changes, training_dropout(ctx.model), run_dir)
    except BaseException:
        if log is not None:
            log.close(exit_code=1)
        if main and not resume:  # refused before any work: leave nothing that blocks the same command again
            discard_run_dir(run_dir, run_id)
        release_run_dir(run_dir)
        dist.destroy()
        raise
    ctx.run_id, ctx.config_sha256 = run_id, config_digest(cfg)
    try:
        if layout_changes and main:  # the run goes ahead under the changed layout: say so, keep it in the run dir
            print(f"rlpost: {layout_change_line(layout_changes, ckpt.name if ckpt else None)}", flush=True)
            record_layout_changes(run_dir, saved, cfg, layout_changes, ckpt)
        return _train(cfg, stages, ctx, ckpt, log, resume, t_start)
    finally:
        log.close(exit_code=1)  # closed already when _train got going (then with the run's own exit code)
        release_run_dir(run_dir)
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
        if ctx.weights_from is not None and not dist.is_sharded(ctx.model):  # (sharded: build_context read them)
            _load_policy(ctx.model, ckpt.weights_dir(run_dir))
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
                    load_rng_state(rank_rng(ckpt.load_state()))
                stage.run(ctx)
                if stage.changes_weights and is_lora(ctx.model):  # the next stage's reference: the policy now
                    fold_adapters(ctx.model)
                    ctx.weight_sync.push()
                if stage.changes_weights or stage.checkpoint:
                    ctx.save(stage.end_checkpoint, step=0, finished=True, state={},
                             weights=stage.changes_weights)
                    if not stage.keep_step_checkpoints:
                        remove_step_checkpoints(run_dir, i)
                if i < len(stages) - 1:  # a stop asked during the last stage: nothing is left to stop
                    ctx.check_stop()
        ctx.summary["status"] = "ok"
    except RunInterrupted as e:
        ctx.summary["status"] = f"interrupted ({e}); continue with `rlpost train --resume {run_dir}`"
        e.run_dir = run_dir
        raise
    except BaseException as e:  # lose nothing: keep the weights and say why the run stopped
        # a sharded policy is gathered only in one process: with other ranks, they may not be there to join
        if main and (not dist.is_sharded(ctx.model) or dist.world_size() == 1):
            last = os.path.join(run_dir, "checkpoints", "last")
            try:  # through checkpoints/.tmp-last: a failed or killed write leaves the last/ before it whole
                write_model_folder(run_dir, "last", lambda folder: save_model(dist.unsharded(ctx.model), ctx.tokenizer,
                                                                              folder, merged=True))
            except Exception as save_error:  # (disk full) the run's own error is the one to report
                named = isinstance(save_error, OSError) and last in (save_error.strerror or "")
                warning = (save_error.strerror if named else str(save_error) if isinstance(save_error, OSError)
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
        roles = [r for r in (ctx.verifier, ctx.rl_reward) if r is not None]
        for fn in {id(r.fn): r.fn for r in roles if r.fn is not None}.values():
            fn.close()
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
