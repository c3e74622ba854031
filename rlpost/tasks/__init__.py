"""Tasks: prompts with gold answers, a verifier, and demonstrations for SFT.

A row is a dict with `prompt` (str) and `answer` (str), plus `completion` (str) when the row carries a
demonstration. A task offers:

    task.train_rows, task.eval_rows       # lists of rows (eval rows are held out from training)
    task.demonstrations                   # rows with a `completion` to imitate in SFT
    task.verify(completion, row) -> float # the verifier: 1.0 right, 0.0 wrong
    task.alphabet                         # characters gpt_mini needs to spell every prompt and answer
    task.demonstrator_accuracy            # fraction of demonstrations that are right (None: unknown)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

REQUIRED = ("prompt", "answer")
TASKS = ("arithmetic", "multiply", "multistep", "functions", "grading", "jsonl")  # the valid task.name values (load_task)


class TaskDataError(ValueError):
    """A prompt file that is missing, empty or has malformed rows (each named by line number)."""


@dataclass
class Task:
    name: str
    train_rows: list[dict]
    eval_rows: list[dict]
    demonstrations: list[dict]
    alphabet: str
    demonstrator_accuracy: float | None

    def verify(self, completion: str, row: dict) -> float:
        return answer_match(completion, row["answer"])


def answer_match(completion: str, answer: str) -> float:
    """1.0 when the completion's first line equals the answer (numerically when both are numbers)."""
    got = completion.strip().split("\n")[0].strip()
    want = str(answer).strip()
    if got == want:
        return 1.0
    try:
        a, b = float(got), float(want)
    except ValueError:
        return 0.0
    return 1.0 if math.isfinite(a) and a == b else 0.0


def read_jsonl(path: str) -> list[dict]:
    """Rows of a JSONL prompt file; every malformed row is reported with its line number."""
    try:
        with open(path) as f:
            lines = f.readlines()
    except FileNotFoundError:
        raise TaskDataError(f"prompt file not found: {path}") from None
    rows, problems = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"line {n}: not valid JSON ({e.msg})")
            continue
        if not isinstance(row, dict):
            problems.append(f"line {n}: expected a JSON object, got {type(row).__name__}")
            continue
        for key in REQUIRED:
            if key not in row:
                problems.append(f"line {n}: missing required key '{key}'")
            elif not isinstance(row[key], (str, int, float)) or isinstance(row[key], bool):
                problems.append(f"line {n}: '{key}' must be a string, got {type(row[key]).__name__}")
            elif not str(row[key]).strip():
                problems.append(f"line {n}: '{key}' is empty")
        if "completion" in row and not isinstance(row["completion"], str):
            problems.append(f"line {n}: 'completion' must be a string")
        row = {k: (str(v) if k in REQUIRED else v) for k, v in row.items()}
        row["line"] = n
        rows.append(row)
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise TaskDataError(f"{path}: {len(problems)} malformed row(s):\n  {shown}")
    if not rows:
        raise TaskDataError(f"{path}: the file has no rows")
    return rows


def jsonl_task(train_file: str, eval_file: str | None) -> Task:
    train = read_jsonl(train_file)
    evals = read_jsonl(eval_file) if eval_file else []
    demos = [r if "completion" in r else {**r, "completion": r["answer"]} for r in train]
    chars = {c for r in train + evals for k in ("prompt", "answer", "completion") for c in str(r.get(k, ""))}
    graded = [r for r in evals if "completion" in r]
    acc = sum(answer_match(r["completion"], r["answer"]) for r in graded) / len(graded) if graded else None
    return Task("jsonl", train, evals, demos, "".join(sorted(chars)), acc)


def load_task(cfg) -> Task:
    if cfg.name == "arithmetic":
        from rlpost.tasks.arithmetic import arithmetic_task

        return arithmetic_task(seed=cfg.seed, max_operand=cfg.max_operand, num_eval=cfg.num_eval,
                               error_rate=cfg.demonstrator_error)
    if cfg.name == "multiply":
        from rlpost.tasks.multiply import multiply_task

        return multiply_task(seed=cfg.seed, max_operand=cfg.max_operand, num_eval=cfg.num_eval,
                             error_rate=cfg.demonstrator_error)
    if cfg.name == "multistep":
        from rlpost.tasks.multistep import multistep_task

        return multistep_task(seed=cfg.seed, max_operand=cfg.max_operand, num_eval=cfg.num_eval,
                              error_rate=cfg.demonstrator_error)
    if cfg.name == "functions":
        from rlpost.tasks.programs import functions_task

        return functions_task(seed=cfg.seed, num_eval=min(cfg.num_eval, 200), error_rate=cfg.demonstrator_error)
    if cfg.name == "grading":
        from rlpost.tasks.grading import grading_task

        return grading_task(seed=cfg.seed, max_operand=cfg.max_operand, num_eval=cfg.num_eval)
    return jsonl_task(cfg.train_file, cfg.eval_file)


def answer_match_reward(completion: str, row: dict) -> float:
    """The `exact` reward: `answer_match` against row["answer"]."""
    return answer_match(completion, row["answer"])


def encode_demonstration(tokenizer, completion: str | list[dict]) -> tuple[list[int], list[int]]:
    """A demonstration's completion -> (token ids, trained): what SFT imitates.

    A string is one assistant turn: its ids + eos, all trained. A multi-turn demonstration is a list of
    segments {"role", "content"}: an "assistant" segment is the policy's turn (ids + eos, trained), any
    other role (tool output, a user turn) is what an environment appends (ids encoded bare, as the
    episode function appends a text observation; not trained)."""
    if isinstance(completion, str):
        ids = tokenizer.encode_completion(completion) + [tokenizer.eos_token_id]
        return ids, [1] * len(ids)
    ids, trained = [], []
    for n, seg in enumerate(completion):
        if not isinstance(seg, dict) or not isinstance(seg.get("content"), str) or "role" not in seg:
            raise ValueError(f"completion segment {n} must be {{'role': ..., 'content': str}}, got {seg!r}")
        if seg["role"] == "assistant":
            part = tokenizer.encode_completion(seg["content"]) + [tokenizer.eos_token_id]
        else:
            part = tokenizer.encode_completion(seg["content"])
        ids += part
        trained += [int(seg["role"] == "assistant")] * len(part)
    return ids, trained
