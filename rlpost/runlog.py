"""The run directory's own files: `run.json` and `config.yaml` (what made the run, `make_run_dir`), and the
logs `metrics.jsonl` and `rollouts.jsonl` (`RunLog`, `open_log`), which a resume cuts back to what its
checkpoint counts (`cut_jsonl`). It sits below the stages and the run (rlpost/run.py), which both write
through it.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
import time
import uuid
from typing import Any

import yaml

from rlpost import distributed as dist
from rlpost.checkpoint import write_error
from rlpost.config import Config, to_dict
from rlpost.sinks import open_sinks

RUN_FILE = "run.json"


class ResumeError(ValueError):
    """A run directory that cannot be resumed: missing, of another kind, with another config, no checkpoint."""


class RunDirBusy(ResumeError):
    """Another process holds the run directory (`hold_run_dir`): a run, or a resume of it, still going."""


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
    log = RunLog(run_dir, keep_lines=keep_lines, write=dist.is_main(), keep_rollouts=keep_rollouts,
                 checkpoint=checkpoint, digests=digests)
    if dist.is_main():
        try:
            log.sinks = open_sinks(cfg.log, run_dir, to_dict(cfg), resume=resume, dropped=log.dropped)
        except BaseException:
            log.close()
            raise
    return log


# ---------------------------------------------------------------------------- run directory

def run_dir_of(cfg: Config, recipe_name: str) -> str:
    name = cfg.run_name or f"{recipe_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return os.path.join(cfg.out_dir, name)


_HELD: dict[str, int] = {}  # run directory (absolute) -> the descriptor whose lock holds it (`hold_run_dir`)


def hold_run_dir(run_dir: str) -> None:
    """Hold `run_dir` for this process until `release_run_dir`: an exclusive lock (flock) on the folder itself,
    which the system lets go when the process ends, however it ends (SIGKILL included), so a killed run never
    leaves a stale lock. RunDirBusy when another process (or another run in this one) holds it: two runs
    writing one directory would interleave their metrics lines, prune each other's checkpoints, and a resume
    cutting metrics.jsonl back would replace the file under the run still appending to it. Where the file
    system has no locks, it warns and goes on unheld."""
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
            print(f"rlpost: warning: cannot lock run directory {run_dir} ({e.strerror}): nothing stops a second "
                  "run from writing into it at the same time", file=sys.stderr, flush=True)
            return
        raise RunDirBusy(f"run directory {run_dir} is in use: another rlpost process (the run itself, or a resume "
                         "of it) is writing into it, and two at once would damage its files; nothing was changed. "
                         f"Wait for it to end, or stop it (SIGTERM writes a checkpoint), then `rlpost train "
                         f"--resume {run_dir}`") from None
    _HELD[os.path.abspath(run_dir)] = fd


def release_run_dir(run_dir: str) -> None:
    """Let go of `run_dir` (`hold_run_dir`); nothing when this process does not hold it."""
    fd = _HELD.pop(os.path.abspath(run_dir), None)
    if fd is not None:
        os.close(fd)  # (the lock goes with the last descriptor of its open file)


def make_run_dir(cfg: Config, recipe_name: str, kind: str = "train", hold: bool = False) -> str:
    """out_dir/run_name (or a timestamped name) with config.yaml and RUN_FILE (what made it, and a fresh run id
    its checkpoints carry). Refuses a folder that already holds any of RUN_START_FILES, whoever wrote them (a
    run, or a user's own config.yaml): a run never overwrites, nor on refusal removes, a file it did not write.
    `hold`: the folder is held (`hold_run_dir`) before anything is written into it, so that a resume of the run
    started at once is refused while it runs; the caller releases it (`release_run_dir`)."""
    run_dir = run_dir_of(cfg, recipe_name)
    if not cfg.run_name:  # runs started in the same second (a sweep launched at once) get -2, -3, ...
        run_dir = _unused_folder(run_dir)
    if os.path.lexists(os.path.join(run_dir, "metrics.jsonl")):
        raise FileExistsError(f"run directory {run_dir} already holds a run; choose another run_name, or continue "
                              f"it with `rlpost train --resume {run_dir}`")
    there = [n for n in RUN_START_FILES if os.path.lexists(os.path.join(run_dir, n))]
    if there:
        raise FileExistsError(f"run directory {run_dir} already holds {', '.join(there)}, which a run writes; "
                              "choose another run_name, or move them out of the folder")
    os.makedirs(run_dir, exist_ok=True)
    if hold:
        hold_run_dir(run_dir)
    try:
        # "x": created here or not at all, so that a run started at the same moment in the same folder fails here
        with open(os.path.join(run_dir, "config.yaml"), "x") as f:
            yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
        with open(os.path.join(run_dir, RUN_FILE), "x") as f:
            json.dump({"kind": kind, "recipe": recipe_name, "run_id": uuid.uuid4().hex}, f)
    except BaseException:
        release_run_dir(run_dir)
        raise
    return run_dir


def _unused_folder(path: str) -> str:
    """`path`, or `path-2`, `path-3`, ... : the first that did not exist, created here (os.mkdir either creates
    it or fails, so two processes never both get the same one)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    candidate, n = path, 1
    while True:
        try:
            os.mkdir(candidate)
            return candidate
        except FileExistsError:
            n += 1
            candidate = f"{path}-{n}"


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
