"""The embedded chain-of-thought task: three-operand arithmetic, solved step by step, checked by the math verifier.

    rlpost train recipes/cot_math.yaml

Prompt "57+32+18=". A demonstration writes the intermediate sum, then the final one, then the answer
in GSM8K's form: "57+32=089;089+18=107;#### 107". Numbers are written at fixed width (operands 2
digits, sums 3), so each digit sits at a fixed offset from the digits it depends on, as in the
default task: that is what lets a tiny model learn to carry in minutes. The verifier is `math` with `extract: hash`: it
reads only what follows "####" and compares it to the gold answer by value (math-verify), so the
reasoning is free text and only the final answer counts.

The demonstrator slips on a fraction `error_rate` of the problems: one digit of an intermediate result
is wrong and the rest of its reasoning carries the mistake through (as a careless solver's would), or
the slip is in the last sum. SFT imitates reasoning and slips alike; RL against the verifier removes
the slips.

With `format_rate` < 1 (task.options.answer_format_rate; task.answer_format_rate is its flat alias) only that
fraction of the demonstrations ends with ";#### <answer>"; the others stop after the last sum
("57+32=089;089+18=107"), which the verifier cannot read: recipes/r1_zero.yaml's base model, which RL with a
format reward teaches to write the answer format.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from rlpost.schema import Range, between
from rlpost.tasks.base import TASKS, Task, TaskSource
from rlpost.tasks.arithmetic import slip

ALPHABET = "0123456789+=;# "


def solve(a: int, b: int, c: int, w: int, error_rate: float, rng: random.Random) -> str:
    """The demonstrator's worked solution (with a slip on `error_rate` of the problems)."""
    s = f"{a + b:0{w + 1}d}"
    where = rng.randrange(2) if rng.random() < error_rate else -1
    if where == 0:  # a slip in the first sum; the second step carries the wrong value on
        s = slip(s, rng)
    t = f"{int(s) + c:0{w + 1}d}"
    if where == 1:
        t = slip(t, rng)
    return f"{a:0{w}d}+{b:0{w}d}={s};{s}+{c:0{w}d}={t};#### {t}"


def multistep_task(seed: int = 1234, max_operand: int = 99, num_eval: int = 500, error_rate: float = 0.35,
                   num_train: int = 20000, format_rate: float = 1.0) -> Task:
    if not 0.0 <= error_rate <= 1.0:
        raise ValueError(f"task.demonstrator_error must be in [0, 1], got {error_rate}")
    rng = random.Random(seed)
    w = len(str(max_operand))
    if 3 * max_operand >= 10 ** (w + 1):
        raise ValueError(f"task.max_operand={max_operand}: three operands must sum to at most {w + 1} digits")
    seen, problems = set(), []
    total = (max_operand + 1) ** 3
    while len(problems) < min(num_train + num_eval, total):
        p = (rng.randint(0, max_operand), rng.randint(0, max_operand), rng.randint(0, max_operand))
        if p not in seen:
            seen.add(p)
            problems.append(p)
    if not 0 < num_eval < len(problems):
        raise ValueError(f"task.num_eval must be between 1 and {len(problems) - 1}, got {num_eval}")

    def row(p):
        a, b, c = p
        return {"prompt": f"{a:0{w}d}+{b:0{w}d}+{c:0{w}d}=", "answer": str(a + b + c)}

    eval_p, train_p = problems[:num_eval], problems[num_eval:]
    demos = [{**row(p), "completion": solve(*p, w, error_rate, rng)} for p in train_p]
    if format_rate < 1.0:  # only some demonstrations end in the answer format; the rest stop after the last sum
        keep = random.Random(seed + 1)
        demos = [d if keep.random() < format_rate else {**d, "completion": d["completion"].rsplit(";####", 1)[0]}
                 for d in demos]
    right = [int(solve(*p, w, error_rate, rng).rsplit("#### ", 1)[1]) == sum(p) for p in eval_p]
    return Task("multistep", [row(p) for p in train_p], [row(p) for p in eval_p], demos, ALPHABET,
                sum(right) / len(right))


def step_truth(completion: str, row: dict, sep: str = ";") -> list[int]:
    """Which steps of a completion are right, by the task's own arithmetic (what Monte-Carlo step labels
    estimate without it): step 1 must write a+b, step 2 a+b+c, the answer step "#### a+b+c". A step that
    cannot be read (wrong shape, no number) counts as wrong; steps past the third are wrong.

    >>> step_truth("57+32=089;089+18=107;#### 107", {"prompt": "57+32+18=", "answer": "107"})
    [1, 1, 1]
    """
    a, b, c = (int(x) for x in row["prompt"].rstrip("=").split("+"))
    want = [a + b, a + b + c, a + b + c]
    steps = completion.split(sep)
    if steps and steps[-1].strip() == "" and len(steps) > 1:  # a completion ending in the separator
        steps = steps[:-1]
    truth = []
    for i, s in enumerate(steps):
        value = s.rsplit("####", 1)[1] if i == 2 and "####" in s else s.rsplit("=", 1)[-1] if i < 2 else None
        try:
            ok = value is not None and int(value.strip()) == want[i] and (i == 2) == ("####" in s)
        except ValueError:
            ok = False
        truth.append(int(ok))
    return truth


@TASKS.register("multistep")
class Multistep(TaskSource):
    description = "three-operand addition, solved step by step (chain of thought)"

    @dataclass
    class Config:
        answer_format_rate: float = 1.0
        """fraction of the demonstrations that end with '#### <answer>' (the rest stop after the last sum: a base
        model that only sometimes writes the answer format)"""

        ranges: ClassVar[dict[str, Range]] = {
            "answer_format_rate": between(0, 1, "0: no demonstration ends with the answer format")}

    def load(self, cfg) -> Task:
        return multistep_task(seed=cfg.seed, max_operand=cfg.max_operand, num_eval=cfg.num_eval,
                              error_rate=cfg.demonstrator_error, format_rate=self.options.answer_format_rate)
