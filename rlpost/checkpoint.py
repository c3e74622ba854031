"""Checkpoints: everything a run needs to continue exactly where it stopped, written atomically.

A checkpoint is a folder under `<run_dir>/checkpoints/`:

    model.safetensors, config.json, tokenizer files   the policy (loads in `transformers`), when it
                                                      changed since the previous checkpoint
    rlpost_state.pt     every other part's state_dict: optimizer and LR schedule, trainer counters,
                        critic, algorithm, prompt sampler (the stage's), and the run's: the weight-sync
                        version and the random streams (an end-of-stage checkpoint holds those alone)
    shards/             under trainer.strategy=fsdp2, a mid-stage checkpoint's policy, PPO critic and optimizer state
                        instead of the model files: a torch.distributed.checkpoint folder in which every rank wrote its
                        own shards (`__<rank>_0.distcp`) and rank 0 the `.metadata`; it loads under any number
                        of ranks (rlpost.distributed.load_shards). End-of-stage checkpoints stay model folders
    rlpost_checkpoint.json   where the run stood: stage index and name, step, whether the stage had
                        finished, metrics.jsonl and rollouts.jsonl lines written so far (and a sha256 of
                        them), the summary so far, the folder holding the policy weights and the sha256 of
                        each of its files, the run's id and config digest, the sha256 of the task's rows, the
                        folder's own name, and a sha256 of every file above (those in shards/ included, as
                        `shards/<file>`); a sharded one also `sharded`: {"folder": "shards", "world_size": the
                        ranks that wrote it}

It is written into `checkpoints/.tmp-<name>/` and renamed into place only when complete, so a kill
in mid-write leaves a `.tmp-` folder that is never read (and is removed on resume). The newest
complete checkpoint is the one with the highest (stage, finished, step); a folder whose metadata cannot be
read is left out (a resume warns, naming it), so one damaged old checkpoint never blocks a newer one.
`verify` refuses a checkpoint in a folder of another name (folders renamed or swapped) and weights that
are not the very files the checkpoint was written with (another run's checkpoint copied in).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml

from rlpost import distributed as dist
from rlpost.config import ModelConfig
from rlpost.models import load_model, save_model
from rlpost.models.lora import ADAPTER_FILE, CONFIG_FILE as LORA_CONFIG_FILE, apply_lora, is_adapter_name, is_lora

STATE_FILE = "rlpost_state.pt"
META_FILE = "rlpost_checkpoint.json"
SHARDS_DIR = "shards"  # a sharded checkpoint's torch.distributed.checkpoint folder


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or does not match its recorded checksums."""


# ---------------------------------------------------------------------------- random streams

def rng_state() -> dict[str, Any]:
    """The process-wide random streams: Python's `random`, torch's CPU (and CUDA) generator, NumPy's."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def load_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


# ---------------------------------------------------------------------------- writing

def is_write_failure(e: BaseException) -> bool:
    """Whether `e` says that writing to the disk failed: an OSError (disk full, read-only, permissions), or the
    RuntimeError torch.save raises when its file write fails. Anything else (a TypeError from serialising a
    value, say) is a bug or bad data, and is reported as itself, never blamed on the disk."""
    if isinstance(e, OSError):
        return True
    return isinstance(e, RuntimeError) and any(w in str(e) for w in ("failed writing", "file write failed"))


def write_error(e: Exception, path: str, what: str) -> OSError:
    """`e`, raised while writing `what` at `path` (disk full, read-only, ...), as an OSError naming the path and
    what to do. An OSError keeps its type and errno (disk full stays errno 28); torch.save's failed write (a
    RuntimeError) becomes a plain OSError with its message. Only for write failures (`is_write_failure`)."""
    where = f"{what} {path}" if what else path
    message = (f"cannot write {where}: {e.strerror or e if isinstance(e, OSError) else f'{type(e).__name__}: {e}'}"
               "; what was written before it is whole: free space or make it writable, then continue with "
               "`rlpost train --resume RUN_DIR`")
    if isinstance(e, OSError) and e.errno is not None:
        return type(e)(e.errno, message, path)
    return OSError(message)


@dataclass
class Checkpoint:
    """One complete checkpoint as found on disk (`state` is loaded lazily by `load_state`)."""

    path: str
    meta: dict[str, Any]
    state: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    @property
    def order(self) -> tuple[int, int, int]:
        return self.meta["stage"], int(self.meta["finished"]), self.meta["step"]

    def weights_dir(self, run_dir: str) -> str | None:
        """The folder holding the policy weights of this checkpoint (None: the run's initial model)."""
        w = self.meta.get("weights")
        return None if w is None else os.path.join(run_dir, "checkpoints", w)

    def load_state(self) -> dict[str, Any]:
        if self.state is None:
            self.state = torch.load(os.path.join(self.path, STATE_FILE), weights_only=False)
        return self.state


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(folder: str) -> list[str]:
    """Every file in `folder`, and in its shards/ folder as `shards/<file>`, sorted."""
    out = [f for f in os.listdir(folder) if os.path.isfile(os.path.join(folder, f))]
    shards = os.path.join(folder, SHARDS_DIR)
    if os.path.isdir(shards):
        out += [f"{SHARDS_DIR}/{f}" for f in os.listdir(shards) if os.path.isfile(os.path.join(shards, f))]
    return sorted(out)


def _weights_digests(root: str, tmp: str, weights: str | None, name: str) -> dict[str, str] | None:
    """The sha256 of each policy file of the checkpoint named `weights` (None: the initial model): the ones
    just written into `tmp` when it is this checkpoint `name` (a sharded one's shards), else those the earlier
    checkpoint recorded."""
    if weights is None:
        return None
    if weights == name:
        return {f: _sha256(os.path.join(tmp, f)) for f in _files(tmp) if f not in (STATE_FILE, META_FILE)}
    source = read_meta(os.path.join(root, weights))
    return {f: d for f, d in source["sha256"].items() if f != STATE_FILE}


def temporary_folder(run_dir: str, name: str, fresh: bool = True) -> str:
    """checkpoints/.tmp-<name>/, where checkpoint `name` is written before it is renamed into place; `fresh`:
    emptied (what an earlier, interrupted write left goes)."""
    tmp = os.path.join(run_dir, "checkpoints", f".tmp-{name}")
    if fresh:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    return tmp


def write_checkpoint(run_dir: str, name: str, meta: dict[str, Any], state: dict[str, Any],
                     save_weights=None, shards_world: int | None = None) -> str:
    """Write checkpoint `name` atomically. `save_weights(folder)` writes the policy into the folder (None:
    the weights are those of an earlier checkpoint, named by meta["weights"]). `shards_world`: the ranks
    have already written the policy and optimizer shards into the temporary folder's shards/
    (rlpost.distributed.save_shards), that many of them; they are this checkpoint's weights. Returns its path."""
    root = os.path.join(run_dir, "checkpoints")
    tmp, final = os.path.join(root, f".tmp-{name}"), os.path.join(root, name)
    try:
        os.makedirs(root, exist_ok=True)
        temporary_folder(run_dir, name, fresh=shards_world is None)
        if shards_world is not None:
            if not os.path.isfile(os.path.join(tmp, SHARDS_DIR, ".metadata")):
                raise CheckpointError(f"{tmp}/{SHARDS_DIR} holds no complete sharded checkpoint (no .metadata)")
            meta = {**meta, "weights": name, "sharded": {"folder": SHARDS_DIR, "world_size": shards_world}}
        elif save_weights is not None:
            save_weights(tmp)
            meta = {**meta, "weights": name}
        weights = _weights_digests(root, tmp, meta.get("weights"), name)
        torch.save(state, os.path.join(tmp, STATE_FILE))
        files = _files(tmp)
        meta = {**meta, "name": name, "sha256": {f: _sha256(os.path.join(tmp, f)) for f in files}}
        if weights is not None:  # the very weights this checkpoint goes with, checked on resume (`verify`)
            meta["weights_sha256"] = weights
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump(meta, f, indent=2)
        for f in _files(tmp):
            with open(os.path.join(tmp, f), "rb") as fh:
                os.fsync(fh.fileno())
        if os.path.isdir(os.path.join(tmp, SHARDS_DIR)):
            _fsync_dir(os.path.join(tmp, SHARDS_DIR))
        _fsync_dir(tmp)
    except Exception as e:  # disk full, read-only: the half-written folder goes (freeing its space); the
        shutil.rmtree(tmp, ignore_errors=True)  # checkpoints before it, one of this name included, stay whole
        if not is_write_failure(e):  # a value that cannot be serialised: a bug or bad data, not the disk
            raise
        raise write_error(e, final, "checkpoint") from e
    try:
        _move_into_place(root, name)
        _fsync_dir(root)
    except OSError as e:
        raise write_error(e, final, "checkpoint") from e
    return final


def _move_into_place(root: str, name: str) -> None:
    """Rename the complete `root/.tmp-<name>` to `root/<name>`. An older folder of that name (a stage redone after
    a resume, a new best) is first renamed to `.old-<name>` and removed only once the new one is in place, so a
    kill at any moment leaves one of them whole: clean_partial puts `.old-` back when `<name>` is missing."""
    tmp, final = os.path.join(root, f".tmp-{name}"), os.path.join(root, name)
    if os.path.exists(final):
        old = os.path.join(root, f".old-{name}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)  # a failure from here on: a resume puts .old- back (clean_partial)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)


# ---------------------------------------------------------------------------- reading

def clean_partial(run_dir: str) -> list[str]:
    """Remove half-written `.tmp-` folders; put back an `.old-` folder whose replacement never landed.
    Returns what was removed or restored."""
    root = os.path.join(run_dir, "checkpoints")
    done = []
    if not os.path.isdir(root):
        return done
    for entry in sorted(os.listdir(root)):
        path = os.path.join(root, entry)
        if entry.startswith(".old-"):
            target = os.path.join(root, entry[len(".old-"):])
            if os.path.exists(target):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.rename(path, target)
            done.append(entry)
        elif entry.startswith(".tmp-"):
            shutil.rmtree(path, ignore_errors=True)
            done.append(entry)
    return done


def read_meta(path: str) -> dict[str, Any]:
    """The metadata of checkpoint folder `path`; CheckpointError naming the file when it cannot be read, is not
    JSON, or lacks what a resume needs."""
    meta_path = os.path.join(path, META_FILE)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} has an unreadable {META_FILE}: {e}") from e
    need = {"stage": int, "step": int, "finished": bool, "sha256": dict, "metrics_lines": int, "summary": dict}
    wrong = [k for k, t in need.items() if not isinstance(meta, dict) or not isinstance(meta.get(k), t)]
    if wrong:
        raise CheckpointError(f"checkpoint {path}: {META_FILE} lacks {', '.join(wrong)} (damaged)")
    return meta


def list_checkpoints(run_dir: str, warn=None) -> list[Checkpoint]:
    """Every checkpoint folder with a readable metadata file, oldest first. One whose metadata cannot be read
    (damaged, or not readable) is left out, and `warn(message)` is told which, when given."""
    root = os.path.join(run_dir, "checkpoints")
    out = []
    if not os.path.isdir(root):
        return out
    for entry in os.listdir(root):
        path = os.path.join(root, entry)
        if entry.startswith(".") or not os.path.lexists(os.path.join(path, META_FILE)):
            continue
        try:
            out.append(Checkpoint(path, read_meta(path)))
        except CheckpointError as e:
            if warn is not None:
                warn(f"{e}; it is left out")
    return sorted(out, key=lambda c: c.order)


def verify(ckpt: Checkpoint, run_dir: str, run_id: str | None = None, config_digest: str | None = None) -> None:
    """Check that the checkpoint is the one its folder is named for, every file against its recorded sha256,
    and the weights it names (its own, or another checkpoint's when a stage left the policy as it was)
    against the sha256 it recorded for them. With `run_id` / `config_digest` (the run directory's), also
    that it was written by that run under that config. CheckpointError naming the checkpoint otherwise."""
    recorded = ckpt.meta.get("name")
    if recorded is not None and recorded != ckpt.name:
        raise CheckpointError(f"checkpoint {ckpt.path} was written as {recorded!r}, not {ckpt.name!r} (folders "
                              f"renamed or swapped?); give it back its name {recorded!r}, or remove it to resume "
                              "from an older checkpoint")
    if run_id is not None and ckpt.meta.get("run_id") != run_id:
        raise CheckpointError(f"checkpoint {ckpt.path} belongs to another run (run id {ckpt.meta.get('run_id')}, "
                              f"this run directory's is {run_id}): it was copied in from elsewhere; remove it to "
                              "resume from an older checkpoint of this run")
    if config_digest is not None and ckpt.meta.get("config_sha256", config_digest) != config_digest:
        raise CheckpointError(f"checkpoint {ckpt.path} was written under another config than the run directory's "
                              "config.yaml (edited since?); put config.yaml back as it was, or remove the "
                              "checkpoint to resume from an older one")
    for f, digest in ckpt.meta["sha256"].items():
        path = os.path.join(ckpt.path, f)
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint {ckpt.path} is missing {f}; it cannot be resumed from")
        if _sha256(path) != digest:
            raise CheckpointError(f"checkpoint {ckpt.path}: {f} does not match its recorded sha256 (corrupt); "
                                  "it cannot be resumed from")
    weights = ckpt.weights_dir(run_dir)
    if weights is None:
        return
    expected = ckpt.meta.get("weights_sha256")
    if os.path.abspath(weights) == os.path.abspath(ckpt.path):
        if expected is not None and any(ckpt.meta["sha256"].get(f) != d for f, d in expected.items()):
            raise CheckpointError(f"checkpoint {ckpt.path}: its weights do not match the ones it was written with")
        return
    if not os.path.isdir(weights):
        raise CheckpointError(f"checkpoint {ckpt.path} takes its weights from {weights}, which is missing")
    try:
        source = read_meta(weights)
    except CheckpointError as e:
        raise CheckpointError(f"checkpoint {ckpt.path} takes its weights from {weights}, which is damaged: {e}")
    if expected is None:  # a checkpoint of an older rlpost: the weights folder against its own record
        expected = {f: d for f, d in source["sha256"].items() if f != STATE_FILE}
    for f, digest in expected.items():
        if not os.path.isfile(os.path.join(weights, f)) or _sha256(os.path.join(weights, f)) != digest:
            raise CheckpointError(f"checkpoint {ckpt.path} takes its weights from {weights}, whose {f} is missing "
                                  "or does not match the sha256 recorded for it (corrupt, or another checkpoint's)")


def prune(run_dir: str, keep: int, prefix: str) -> None:
    """Keep the newest `keep` mid-stage checkpoints whose names start with `prefix` (0: keep all);
    a checkpoint whose weights a kept one still uses is kept too."""
    if keep <= 0:
        return
    ckpts = list_checkpoints(run_dir)
    mid = [c for c in ckpts if c.name.startswith(prefix) and not c.meta["finished"]]
    needed = {c.meta.get("weights") for c in ckpts if c not in mid[:-keep]}
    for c in mid[:-keep]:
        if c.name not in needed:
            shutil.rmtree(c.path, ignore_errors=True)


def remove_step_checkpoints(run_dir: str, stage: int) -> None:
    """Remove the mid-stage checkpoints of stage `stage` (its end-of-stage checkpoint supersedes them)."""
    for c in list_checkpoints(run_dir):
        if c.meta["stage"] == stage and not c.meta["finished"]:
            shutil.rmtree(c.path, ignore_errors=True)


def write_model_folder(run_dir: str, name: str, save) -> str:
    """`save(folder)` into checkpoints/<name>/ atomically (a plain model folder, not a resumable checkpoint): a
    kill while it is written leaves the folder of that name as it was before (`_move_into_place`)."""
    root = os.path.join(run_dir, "checkpoints")
    tmp, final = os.path.join(root, f".tmp-{name}"), os.path.join(root, name)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save(tmp)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not is_write_failure(e):
            raise
        raise write_error(e, final, "model folder") from e
    _move_into_place(root, name)
    return final


# ---------------------------------------------------------------------------- export

def resolve_model(path: str) -> str:
    """A model folder as given, or, for a run directory, the weights of its newest checkpoint that holds a model
    folder (what `--model` and `rlpost export` accept: a checkpoint, a model folder, a run directory or a hub
    id); a sharded (fsdp2) mid-stage checkpoint holds DCP shards, not a model folder, and is passed over."""
    if not os.path.isdir(path) or os.path.isfile(os.path.join(path, "config.json")):
        return path
    for ckpt in reversed(list_checkpoints(path)):
        folder = ckpt.weights_dir(path)
        # a sharded (fsdp2) mid-stage checkpoint's weights are DCP shards, not a model folder: an older one's are
        if folder is not None and os.path.isfile(os.path.join(folder, "config.json")):
            return folder
    raise ValueError(f"--model {path}: a folder with neither a saved model (config.json) nor a run checkpoint "
                     "holding weights")


def export_model(source: str, out: str) -> str:
    """Write a plain model folder (weights, config, tokenizer) to `out` from `source`: a run directory (the
    weights of its newest checkpoint that holds the policy) or a checkpoint / model folder. A LoRA checkpoint's
    adapters are merged into its base, so `transformers.AutoModelForCausalLM.from_pretrained(out)` (an HF model)
    or rlpost's `load_model` (gpt_mini) loads it without peft. A sharded (fsdp2) mid-stage checkpoint's shards
    are read whole into the model of a model folder of the same run (its architecture and tokenizer), in this
    one process. Returns the folder the weights came from."""
    if not os.path.isdir(source):
        raise ValueError(f"rlpost export: {source} is not a run directory or a checkpoint folder")
    # files of another model that the export does not overwrite and that decide how the folder loads: a LoRA
    # checkpoint's adapters (loaded over the exported weights: the folder came back a LoRA model) or a sharded index
    stale = [f for f in (ADAPTER_FILE, LORA_CONFIG_FILE, "model.safetensors.index.json")
             if os.path.isfile(os.path.join(out, f))]
    if stale:
        raise ValueError(f"rlpost export: --out {out} holds {', '.join(stale)} of another model, which would load "
                         "over the exported weights: export into a new or empty folder")
    shards = _newest_shards(source)
    if shards is not None:
        return _export_shards(shards, out)
    folder = resolve_model(source)
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    dtype = "bfloat16" if "bfloat16" in (config.get("dtype"), config.get("torch_dtype")) else "float32"
    model, tokenizer = load_model(ModelConfig(name=folder, device="cpu", dtype=dtype))
    if os.path.abspath(out) == os.path.abspath(folder):
        raise ValueError(f"rlpost export: --out {out} is the source folder itself")
    save_model(model, tokenizer, out, merged=True)
    return folder


def _newest_shards(source: str) -> str | None:
    """The checkpoint folder whose shards/ hold the weights `rlpost export source` means: `source` itself when
    it is a sharded checkpoint, a run directory's newest checkpoint holding the policy when that one is
    sharded; None otherwise (a model folder is exported as it is)."""
    if os.path.isdir(os.path.join(source, SHARDS_DIR)):
        return source
    if os.path.isfile(os.path.join(source, "config.json")):
        return None
    for ckpt in reversed(list_checkpoints(source)):
        folder = ckpt.weights_dir(source)
        if folder is not None:
            return folder if os.path.isdir(os.path.join(folder, SHARDS_DIR)) else None
    return None


def _export_shards(folder: str, out: str) -> str:
    """`rlpost export` of sharded checkpoint `folder`: the architecture and tokenizer from a model folder beside
    it in checkpoints/ (the run's reference, an earlier stage's end, best/: one policy, one architecture), the
    weights from its shards."""
    root = os.path.dirname(os.path.abspath(folder))
    skeletons = sorted((e for e in os.listdir(root) if not e.startswith(".")
                        and os.path.isfile(os.path.join(root, e, "config.json"))),
                       key=lambda e: os.path.getmtime(os.path.join(root, e)), reverse=True)
    if not skeletons:
        raise ValueError(f"rlpost export: {folder} is a sharded checkpoint, and {root} holds no model folder to "
                         "take the model's architecture and tokenizer from; resume the run to the end of its "
                         "stage (`rlpost train --resume RUN_DIR`), which writes a model folder")
    skeleton = os.path.join(root, skeletons[0])
    model, tokenizer = load_model(ModelConfig(name=skeleton, device="cpu"))
    lora = _shards_lora(folder)
    if lora is not None and not is_lora(model):  # a LoRA run's shards: base_layer and adapter tensors
        apply_lora(model, **lora)
    if os.path.abspath(out) in (os.path.abspath(folder), os.path.abspath(skeleton)):
        raise ValueError(f"rlpost export: --out {out} is a checkpoint folder of the run")
    try:
        dist.load_shards(os.path.join(folder, SHARDS_DIR), model)
    except Exception as e:
        raise ValueError(f"rlpost export: the shards in {folder} do not load into the model of {skeleton} "
                         f"({type(e).__name__}: {e})") from e
    save_model(model, tokenizer, out, merged=True)
    return folder


def _shards_lora(folder: str) -> dict | None:
    """The LoRA config (model.lora of the run's config.yaml) of a sharded checkpoint whose shards hold LoRA
    adapters (a run with model.lora under fsdp2), None when they hold none."""
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(os.path.join(folder, SHARDS_DIR)).read_metadata().state_dict_metadata
    if not any(is_adapter_name(k) for k in keys):
        return None
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(folder))), "config.yaml")
    try:
        with open(path) as f:
            lora = yaml.safe_load(f)["model"]["lora"]
    except (OSError, KeyError, TypeError, yaml.YAMLError) as e:
        raise ValueError(f"rlpost export: the shards in {folder} hold LoRA adapters, and the run's {path} does not "
                         f"say their model.lora ({type(e).__name__}: {e})") from e
    return {k: lora[k] for k in ("r", "alpha", "dropout", "target_modules")}
