"""Tasks: prompts with gold answers, a verifier, and demonstrations for SFT.

A row is a dict with `prompt` (a string, or chat messages [{role, content}]), usually `answer` (str),
plus `completion` (str) when the row carries a demonstration (reasoning before the answer is fine:
SFT imitates the whole completion), plus any other columns of its file. A task offers:

    task.train_rows, task.eval_rows       # lists of rows (eval rows are held out from training)
    task.demonstrations                   # rows with a `completion` to imitate in SFT
    task.verify(completion, row) -> float # the verifier: 1.0 right, 0.0 wrong
    task.alphabet                         # characters gpt_mini needs to spell every prompt and answer
    task.demonstrator_accuracy            # mean score of the held-out rows' completions (None: unknown)
    task.system_prompt                    # task.system_prompt: put before every chat-template prompt

Task names (task.name): `arithmetic` (procedural, embedded) and `file` (task.train_file / eval_file in
any format rlpost/tasks/files.py reads; `jsonl` is the same task under its older name).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rlpost.tasks.files import Columns, TaskDataError, prompt_text, read_rows  # noqa: F401 - the task data API

EMBEDDED = ("arithmetic", "multiply", "multistep", "functions", "grading", "web")  # procedural tasks, one file each
FILE_TASKS = ("file", "jsonl")
TASKS = EMBEDDED + FILE_TASKS  # the valid task.name values (load_task); jsonl: an alias of file


@dataclass
class Task:
    name: str
    train_rows: list[dict]
    eval_rows: list[dict]
    demonstrations: list[dict]
    alphabet: str
    demonstrator_accuracy: float | None
    system_prompt: str | None = None

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
    """Rows of a JSON Lines prompt file (any file name); every malformed row is reported with its line number."""
    return read_rows(path, fmt="json")


def _text(value) -> str:
    """A field's characters: a multi-turn completion's are its turns' contents."""
    return "".join(t["content"] for t in value) if isinstance(value, list) else str(value)


def _alphabet(rows: list[dict]) -> str:
    chars = {c for r in rows for k in ("prompt", "answer", "completion") if k in r
             for c in (prompt_text(r[k]) if k == "prompt" else _text(r[k]))}
    return "".join(sorted(chars))


def file_task(train_file: str, eval_file: str | None, cols: Columns = Columns(), *, train_split: str = "train",
              eval_split: str = "test", require_answer: bool = True, verify=None,
              system_prompt: str | None = None, name: str = "file") -> Task:
    """The task of a training file and an optional held-out file (see rlpost/tasks/files.py for formats).

    A DatasetDict folder as `train_file` gives `train_split`; without `eval_file`, its `eval_split` (when it
    has one) is the held-out set. Demonstrations are the training rows with a completion, or else a string
    answer to imitate. `demonstrator_accuracy` is the mean score, under `verify` (the run's reward; default:
    the exact first-line match), of the held-out rows that carry a completion."""
    from rlpost.tasks.files import dataset_splits

    train = read_rows(train_file, cols, split=train_split, require_answer=require_answer)
    if eval_file:
        evals = read_rows(eval_file, cols, split=eval_split, split_key="task.eval_split",
                          require_answer=require_answer, held_out=True)
    elif eval_split in (dataset_splits(train_file) or []) and eval_split != train_split:
        evals = read_rows(train_file, cols, split=eval_split, split_key="task.eval_split",
                          require_answer=require_answer, held_out=True)
    else:
        evals = []
    demos = [r if "completion" in r else {**r, "completion": r["answer"]} for r in train
             if "completion" in r or isinstance(r.get("answer"), str)]
    graded = [r for r in evals if "completion" in r]
    acc = None
    if graded:
        score, total = verify or answer_match_reward, 0.0
        for r in graded:
            try:
                total += float(score(r["completion"], r))
            except Exception as e:  # noqa: BLE001 - a reward's failure, named with its row
                where = f"line {r['line']}" if "line" in r else f"row {r.get('row')}"
                raise ValueError(f"{eval_file or train_file} {where}: the reward failed on the held-out row's "
                                 f"completion (scored for the demonstrator accuracy): {type(e).__name__}: {e}") from e
        acc = total / len(graded)
    return Task(name, train, evals, demos, _alphabet(train + evals + demos), acc, system_prompt)


def jsonl_task(train_file: str, eval_file: str | None, **options) -> Task:
    """`file_task` under its older name."""
    return file_task(train_file, eval_file, **options)


def uses_own_verifier(cfg) -> bool:
    """Whether the run scores with the task's verifier (no task.reward, task.rewards or task.env)."""
    return not (cfg.reward or getattr(cfg, "rewards", None) or getattr(cfg, "env", None))


def load_task(cfg) -> Task:
    """The task that TaskConfig `cfg` names."""
    system_prompt = getattr(cfg, "system_prompt", None)
    task = _embedded_task(cfg)
    if task is not None:
        task.system_prompt = system_prompt
        return task
    if cfg.name not in FILE_TASKS:
        raise ValueError(f"task.name is {cfg.name!r}; valid values: {', '.join(TASKS)}")
    own = uses_own_verifier(cfg)
    verify = None
    if not own and (cfg.reward or getattr(cfg, "rewards", None)):  # demonstrator accuracy under the run's reward
        from rlpost.rewards import reward_from_config

        verify = _LazyReward(lambda: reward_from_config(cfg, answer_match_reward),
                             getattr(cfg, "reward_timeout_s", None))
    task = file_task(cfg.train_file, cfg.eval_file, Columns.from_config(cfg),
                     train_split=getattr(cfg, "train_split", "train"), eval_split=getattr(cfg, "eval_split", "test"),
                     require_answer=own, verify=verify, system_prompt=system_prompt, name=cfg.name)
    if not own and verify is None:  # an environment scores episodes, not completions: no accuracy to report
        task.demonstrator_accuracy = None
    return task


class _LazyReward:
    """Builds the reward on first call: only a held-out set with completions needs it at load time. Each
    call gets task.reward_timeout_s, as in the run (rlpost/env/calls.py), so a hung reward fails the row."""

    def __init__(self, build, timeout_s: float | None = None):
        self.build, self.fn, self.timeout_s = build, None, timeout_s

    def __call__(self, completion: str, row: dict) -> float:
        from rlpost.env.calls import call_all

        if self.fn is None:
            self.fn = self.build()
        (result,) = call_all([lambda: self.fn(completion, row)], self.timeout_s, workers=1)
        if result.timed_out:
            raise TimeoutError(f"it ran past task.reward_timeout_s={self.timeout_s:g} s")
        if result.error is not None:
            raise result.error
        return result.value


def _embedded_task(cfg) -> Task | None:
    """The procedural task `cfg.name` names (None for a file task), built from its task.* keys."""
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
                              error_rate=cfg.demonstrator_error, format_rate=cfg.answer_format_rate)
    if cfg.name == "functions":
        from rlpost.tasks.programs import functions_task

        return functions_task(seed=cfg.seed, num_eval=min(cfg.num_eval, 200), error_rate=cfg.demonstrator_error)
    if cfg.name == "grading":
        from rlpost.tasks.grading import grading_task

        return grading_task(seed=cfg.seed, max_operand=cfg.max_operand, num_eval=cfg.num_eval)
    if cfg.name == "web":
        from rlpost.tasks.web import web_task

        return web_task(seed=cfg.seed, num_eval=cfg.num_eval, error_rate=cfg.demonstrator_error)
    return None


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
