"""The embedded tool task: multiply two 3-digit numbers, which a tiny model can only do with its calculator.

    rlpost train recipes/tool_calculator.yaml

Prompt "123*045=" (operands at fixed width). The model may call the calculator: a turn "?123*045"
(call_open "?", the whole turn is the expression) gets the observation "=5535;" appended, and the
next turn gives the answer "5535", scored by the exact verifier. An answer written without calling
the tool is almost never right: a 2-layer char model cannot multiply in its head.

The demonstrator is imperfect in the way tool users are: on a fraction `error_rate` of the problems
it does not call the tool and writes a guess (the product with one digit slipped), and on a quarter of
those errors it calls the tool with an operand mistyped and copies the wrong result. SFT imitates that
mix; RL against the verifier learns to always call, and to call correctly.
"""

from __future__ import annotations

import random

from rlpost.tasks.base import TASKS, Task, TaskSource, answer_match
from rlpost.tasks.arithmetic import slip

ALPHABET = "0123456789*?=;"



def demonstrate(row: dict, a: int, b: int, w: int, error_rate: float, rng: random.Random) -> list[dict]:
    """One demonstration as turns: call, tool answer, final answer (or a guess without the tool)."""
    if rng.random() < error_rate:
        if rng.random() < 0.75:  # no tool: a guess, one digit off
            return [{"role": "assistant", "content": slip(row["answer"], rng)}]
        a = int(slip(f"{a:0{w}d}", rng))  # the tool, called with a typo: its answer is right for the wrong question
    result = str(a * b)
    return [{"role": "assistant", "content": f"?{a:0{w}d}*{b:0{w}d}"},
            {"role": "tool", "content": f"={result};"},
            {"role": "assistant", "content": result}]


def multiply_task(seed: int = 1234, max_operand: int = 999, num_eval: int = 500, error_rate: float = 0.5,
                  num_train: int = 20000) -> Task:
    if not 0.0 <= error_rate <= 1.0:
        raise ValueError(f"task.demonstrator_error must be in [0, 1], got {error_rate}")
    rng = random.Random(seed)
    w = len(str(max_operand))
    seen, rows = set(), []
    while len(rows) < min(num_train + num_eval, (max_operand + 1) ** 2):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        if (a, b) in seen:
            continue
        seen.add((a, b))
        rows.append(({"prompt": f"{a:0{w}d}*{b:0{w}d}=", "answer": str(a * b)}, a, b))
    if not 0 < num_eval < len(rows):
        raise ValueError(f"task.num_eval must be between 1 and {len(rows) - 1}, got {num_eval}")
    eval_rows, train_rows = rows[:num_eval], rows[num_eval:]
    demos = [{**r, "completion": demonstrate(r, a, b, w, error_rate, rng)} for r, a, b in train_rows]
    held_out = [answer_match(demonstrate(r, a, b, w, error_rate, rng)[-1]["content"], r["answer"])
                for r, a, b in eval_rows]
    return Task("multiply", [r for r, _, _ in train_rows], [r for r, _, _ in eval_rows], demos, ALPHABET,
                sum(held_out) / len(held_out))


@TASKS.register("multiply")
class Multiply(TaskSource):
    description = "multiplication with a calculator tool"

    def load(self, cfg) -> Task:
        return multiply_task(seed=cfg.seed, max_operand=cfg.max_operand, num_eval=cfg.num_eval,
                             error_rate=cfg.demonstrator_error)
