"""The embedded code task: write a one-line Python function, checked by asserts in the sandbox.

    rlpost train recipes/code_functions.yaml

Prompt "x*3+2;" (an expression in x). The program to write is "def f(x):return x*3+2"; the row's
tests are asserts on a few inputs ("assert f(5)==17"), checked against the program by the `code` reward in
the sandbox (rlpost/sandbox.py): each assert is a case; the recipe's `mode: all` scores 1 when every one passes.

The demonstrator writes programs the way a hurried programmer does: on a fraction `error_rate` of
the problems one constant is off by a digit, an operator is wrong, or the colon is missing (a syntax
error). SFT imitates that; RL against the tests removes the bugs.
"""

from __future__ import annotations

import random

from rlpost.tasks.base import TASKS, Task, TaskSource
from rlpost.tasks.arithmetic import slip

ALPHABET = "0123456789+-*x;def(): rtun"
OPS = "+-*"


def _value(expr: str, x: int) -> int:
    """What `expr` gives at x under Python's own precedence (x-3*2 is x-6): the expressions are ours."""
    return eval(expr, {"__builtins__": {}}, {"x": x})  # noqa: S307 - built from digits, x and + - * only


def write_program(expr: str, error_rate: float, rng: random.Random) -> str:
    """The demonstrator's program for `expr` (buggy on `error_rate` of the problems)."""
    body = expr
    colon = ":"
    if rng.random() < error_rate:
        kind = rng.random()
        if kind < 0.5:
            i = rng.choice((2, 4))
            body = body[:i] + slip(body[i], rng) + body[i + 1:]
        elif kind < 0.75:
            i = rng.choice((1, 3))
            body = body[:i] + rng.choice([o for o in OPS if o != body[i]]) + body[i + 1:]
        else:
            colon = ""
    return f"def f(x){colon}return {body}"


def functions_task(seed: int = 1234, num_eval: int = 200, error_rate: float = 0.4) -> Task:
    if not 0.0 <= error_rate <= 1.0:
        raise ValueError(f"task.demonstrator_error must be in [0, 1], got {error_rate}")
    rng = random.Random(seed)
    exprs = [f"x{o1}{a}{o2}{b}" for o1 in OPS for a in range(1, 10) for o2 in OPS for b in range(1, 10)]
    rng.shuffle(exprs)
    if not 0 < num_eval < len(exprs):
        raise ValueError(f"task.num_eval must be between 1 and {len(exprs) - 1}, got {num_eval}")

    def row(expr: str) -> dict:
        xs = rng.sample(range(-9, 10), 3)
        tests = "\n".join(f"assert f({x})=={_value(expr, x)}" for x in xs)
        return {"prompt": f"{expr};", "answer": f"def f(x):return {expr}", "tests": tests}

    rows = [row(e) for e in exprs]
    eval_rows, train_rows = rows[:num_eval], rows[num_eval:]
    demos = [{**r, "completion": write_program(r["prompt"][:-1], error_rate, rng)} for r in train_rows]
    right = [write_program(r["prompt"][:-1], error_rate, rng) == r["answer"] for r in eval_rows]
    return Task("functions", train_rows, eval_rows, demos, ALPHABET, sum(right) / len(right))


@TASKS.register("functions")
class Functions(TaskSource):
    description = "write a one-line Python function (code, run against tests)"

    def load(self, cfg) -> Task:
        return functions_task(seed=cfg.seed, num_eval=min(cfg.num_eval, 200), error_rate=cfg.demonstrator_error)
