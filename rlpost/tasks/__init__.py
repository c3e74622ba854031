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

Task names (task.name) are a registry, `TASKS` (rlpost/tasks/base.py): each embedded task's module registers
it (arithmetic, multiply, multistep, functions, grading: one file each), and this module registers `file`
(task.train_file / eval_file in any format rlpost/tasks/files.py reads; `jsonl` is the same task under its
older name). A task's own options (task.options) are its registered class's `Config`.
"""

from __future__ import annotations

import dataclasses
import warnings

from rlpost.env.calls import call_all
from rlpost.env.verifiers import gold_check, reward_from_config
from rlpost.settings.task import TaskConfig
from rlpost.tasks.base import (TASKS, Task, TaskSource, answer_match,  # noqa: F401 - the task API
                               answer_match_reward)
from rlpost.tasks.files import (Columns, TaskDataError, dataset_splits, prompt_text,  # noqa: F401 - the data API
                                read_rows)
from rlpost.tasks.mixture import MixedTask, mix  # noqa: F401 - task.sources' task

# each embedded task registers itself as its module is imported, in the order task.name lists them
from rlpost.tasks import arithmetic, multiply, multistep, programs, grading, web  # noqa: E402,F401


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


DEFAULT_EVAL_SPLIT = next(f.default for f in dataclasses.fields(TaskConfig) if f.name == "eval_split")


def file_task(train_file: str, eval_file: str | None, cols: Columns = Columns(), *, train_split: str = "train",
              eval_split: str = "test", require_answer: bool = True, verify=None,
              system_prompt: str | None = None, name: str = "file", check=None) -> Task:
    """The task of a training file and an optional held-out file (see rlpost/tasks/files.py for formats).

    A DatasetDict folder as `train_file` gives `train_split`; without `eval_file`, its `eval_split` (when it
    has one; an `eval_split` other than the default that it lacks is an error) is the held-out set.
    Demonstrations are the training rows with a completion, or else a string answer to imitate.
    `demonstrator_accuracy` is the mean score, under `verify` (the run's reward; default: the exact first-line
    match), of the held-out rows that carry a completion. `check(row)`: what else makes a row (training or
    held-out) malformed, see `read_rows`."""
    train = read_rows(train_file, cols, split=train_split, require_answer=require_answer, check=check)
    if eval_file:
        evals = read_rows(eval_file, cols, split=eval_split, split_key="task.eval_split",
                          require_answer=require_answer, held_out=True, check=check)
    elif eval_split in (dataset_splits(train_file) or []) and eval_split != train_split:
        evals = read_rows(train_file, cols, split=eval_split, split_key="task.eval_split",
                          require_answer=require_answer, held_out=True, check=check)
    elif dataset_splits(train_file) and eval_split != DEFAULT_EVAL_SPLIT:  # asked for by name: a typo, not "none"
        raise TaskDataError(f"{train_file}: no split {eval_split!r} (task.eval_split) to hold out; its splits: "
                            f"{', '.join(dataset_splits(train_file))}")
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


def uses_own_verifier(cfg: TaskConfig) -> bool:
    """Whether the run scores with the task's verifier (no task.reward, task.rewards or task.env)."""
    return not (cfg.reward or cfg.rewards or cfg.env)


def load_task(cfg: TaskConfig) -> Task:
    """The task that TaskConfig `cfg` names, with its own options (task.options and their flat aliases); with
    task.sources, a MixedTask of each source's task."""
    if cfg.sources:
        task = mix([(name, weight, load_task(source)) for name, weight, source in cfg.source_configs()])
        task.system_prompt = cfg.system_prompt
        return task
    task = TASKS.build(cfg.name, **cfg.task_options()).load(cfg)
    task.system_prompt = cfg.system_prompt
    return task


class _LazyReward:
    """Builds the reward on first call: only a held-out set with completions needs it at load time. Each
    call gets task.reward_timeout_s, as in the run (rlpost/env/calls.py), so a hung reward fails the row."""

    def __init__(self, build, timeout_s: float | None = None):
        self.build, self.fn, self.timeout_s = build, None, timeout_s

    def __call__(self, completion: str, row: dict) -> float:
        if self.fn is None:
            self.fn = self.build()
        (result,) = call_all([lambda: self.fn(completion, row)], self.timeout_s, workers=1)
        if result.timed_out:
            raise TimeoutError(f"it ran past task.reward_timeout_s={self.timeout_s:g} s")
        if result.error is not None:
            raise result.error
        return result.value


@TASKS.register("file")
class FileTask(TaskSource):
    description = "prompts from task.train_file / task.eval_file (.jsonl, .json, .parquet, a `datasets` folder)"

    def check(self, cfg: TaskConfig) -> None:
        if not cfg.train_file:
            raise ValueError(f"task.name={self.name} needs task.train_file (and usually task.eval_file)")

    def load(self, cfg: TaskConfig) -> Task:
        own = uses_own_verifier(cfg)
        verify = None
        if not own and (cfg.reward or cfg.rewards):  # demonstrator accuracy under the run's reward
            verify = _LazyReward(lambda: reward_from_config(cfg, answer_match_reward), cfg.reward_timeout_s)
        # the rows the run's reward cannot score (a math gold with nothing after its '####') fail here, by row
        needs_answer, check = gold_check(cfg, cfg.answer_key)
        task = file_task(cfg.train_file, cfg.eval_file, Columns.from_config(cfg), train_split=cfg.train_split,
                         eval_split=cfg.eval_split, require_answer=own or needs_answer, verify=verify,
                         name=self.name, check=check)
        if not own and verify is None:  # an environment scores episodes, not completions: no accuracy to report
            task.demonstrator_accuracy = None
        if own:
            _warn_if_worked_solutions(task.train_rows, cfg.answer_key)
        return task


def _warn_if_worked_solutions(rows: list[dict], column: str) -> None:
    """Warn when most answers are worked solutions ending in '#### N' (GSM8K as published) while the run scores
    with the task's own exact first-line match: no completion's first line can equal a whole solution, so every
    reward and pass@1 would be 0 with nothing else saying why."""
    worked = sum(isinstance(r.get("answer"), str) and "\n####" in r["answer"] for r in rows)
    if rows and worked * 2 > len(rows):
        warnings.warn(f"{worked} of {len(rows)} training answers ('{column}') are worked solutions ending in "
                      "'#### N' (GSM8K's form), and with no task.reward the run scores with the exact first-line "
                      "match against the whole answer, which no completion can equal: set task.reward=math (it "
                      "reads the answer after the last '####'), as recipes/gsm8k.yaml does", stacklevel=3)


@TASKS.register("jsonl")
class JsonlTask(FileTask):
    description = "the file task under its older name"
