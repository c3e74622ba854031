"""What a task is (`Task`), how one registers (`TASKS`, `TaskSource`), and the helpers every task and its
readers share: the exact-answer check and a demonstration's encoding.

A task module registers its task by name, with the task's own options as a nested `Config` (like an
algorithm's: rlpost/registry.py), set in a recipe as task.options and checked when the config loads:

    @TASKS.register("multistep")
    class Multistep(TaskSource):
        description = "three-operand chain of thought"

        @dataclass
        class Config:
            answer_format_rate: float = 1.0
            ranges = {"answer_format_rate": between(0, 1, "0: ...")}

        def load(self, cfg) -> Task:                  # cfg: the run's TaskConfig; self.options: a Config
            return multistep_task(..., format_rate=self.options.answer_format_rate)

rlpost/tasks/__init__.py imports every task module, so importing rlpost.tasks fills `TASKS`; the config reads
it by name (rlpost/settings/task.py), without importing a task itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from rlpost.registry import Registry, make_config

TASKS = Registry("task", "tasks")  # task.name -> its TaskSource, in the order the tasks register


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

    @property
    def mixture(self) -> list[tuple[str, float, int]] | None:
        """task.sources' (name, weight, training rows) per source (rlpost/tasks/mixture.py); None: one task."""
        return None


class TaskSource:
    """A registered task: its own options (`Config`, filled from task.options) and `load`, which builds the
    Task that the run's TaskConfig describes."""

    name = ""  # set by TASKS.register
    description = ""

    @dataclass
    class Config:
        """The task's own options (task.options): none unless the task declares some."""

    def __init__(self, **options: Any):
        self.options = make_config(self.Config, options, f"task {self.name!r}")

    def check(self, cfg) -> None:
        """Refuse (ValueError naming the key) a TaskConfig this task cannot load; called when the config loads,
        before any work. By default: prompt files, which only the file task reads (a task that reads them
        overrides this), since an embedded task would train on its own problems and ignore them."""
        files = [key for key in ("train_file", "eval_file") if getattr(cfg, key, None)]
        if files:
            raise ValueError(f"task.name={self.name} makes its own problems and reads no prompt file, but "
                             f"{' and '.join('task.' + k for k in files)} is set (in task.sources: an entry's "
                             "`file`): set task.name=file to train on the file (in task.sources: leave out the "
                             "entry's `task`), or unset it")

    def load(self, cfg) -> Task:
        """The Task of TaskConfig `cfg` (its shared keys: seed, files, columns...) and this task's options."""
        raise NotImplementedError(f"task {self.name!r} does not define load()")


def answer_match(completion: str, answer: str) -> float:
    """1.0 when the completion's first line equals the answer (numerically when both are numbers: exactly, as
    decimals, so "046" = "46" = "46.0", but two integers past float's 16 digits are never taken for each other)."""
    got = completion.strip().split("\n")[0].strip()
    want = str(answer).strip()
    if got == want:
        return 1.0
    try:
        a, b = Decimal(got), Decimal(want)
    except (InvalidOperation, ValueError):
        return 0.0
    return 1.0 if a.is_finite() and b.is_finite() and a == b else 0.0


def answer_match_reward(completion: str, row: dict) -> float:
    """The `exact` reward: `answer_match` against row["answer"]."""
    return answer_match(completion, row["answer"])

