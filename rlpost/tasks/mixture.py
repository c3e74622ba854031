"""task.sources: several tasks (each its own file or embedded task, columns and reward) as one `MixedTask`.

Each source's rows carry its name under row["task_source"] (SOURCE_KEY): the reward (rlpost/env/verifiers.py's
SourceRewards), the verifier (`MixedTask.verify`), the per-source metrics and the per-source pass@1 dispatch on
it; with an env on some entry each row's episodes run in its source's environment (rlpost/env/per_source.py).
The rows are the sources' in the order task.sources lists them; `mixture` says where each source's training
rows lie, for the sampler that draws them by weight (rlpost/prompts.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rlpost.prompts import SOURCE_KEY
from rlpost.tasks.base import Task


@dataclass
class MixedTask(Task):
    """The Task of task.sources: every source's rows (tagged), each verified by its own task."""

    parts: dict[str, Task] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)

    def verify(self, completion: str, row: dict) -> float:
        return self.parts[row[SOURCE_KEY]].verify(completion, row)

    @property
    def mixture(self) -> list[tuple[str, float, int]]:
        """(name, weight, training rows) of each source, in the order of train_rows."""
        return [(name, self.weights[name], len(task.train_rows)) for name, task in self.parts.items()]


def tagged(rows: list[dict], name: str) -> list[dict]:
    """The rows, each with its source's name (a column of that name in the file is refused, not overwritten)."""
    for r in rows:
        if SOURCE_KEY in r and r[SOURCE_KEY] != name:
            where = f"line {r['line']}" if "line" in r else f"row {r.get('row', '?')}"
            raise ValueError(f"task.sources {name!r}: {where} has a column {SOURCE_KEY!r} ({r[SOURCE_KEY]!r}), the "
                             "key a mixed row's source is kept under: rename that column")
    return [{**r, SOURCE_KEY: name} for r in rows]


def mix(parts: list[tuple[str, float, Task]]) -> MixedTask:
    """One task of the sources (name, weight, its loaded Task): their rows concatenated and tagged, their
    alphabets joined, the demonstrator accuracy the mean over every graded held-out row."""
    train, evals, demos, graded, acc_sum = [], [], [], 0, 0.0
    for name, _, task in parts:
        if not task.train_rows:  # its sampler would have nothing to draw when its turn comes
            raise ValueError(f"task.sources {name!r} has no training rows: give its file rows (or remove the "
                             "source)")
        train += tagged(task.train_rows, name)
        evals += tagged(task.eval_rows, name)
        demos += tagged(task.demonstrations, name)
        if task.demonstrator_accuracy is not None:
            n = max(len(task.eval_rows), 1)
            graded, acc_sum = graded + n, acc_sum + task.demonstrator_accuracy * n
    alphabet = "".join(sorted(set("".join(task.alphabet for _, _, task in parts))))
    return MixedTask("sources", train, evals, demos, alphabet, acc_sum / graded if graded else None,
                     parts={name: task for name, _, task in parts}, weights={name: w for name, w, _ in parts})
