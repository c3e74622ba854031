"""The embedded chain-of-thought task: three-operand arithmetic, solved step by step, checked by the math verifier.

    rlpost train recipes/cot_math.yaml

Prompt "57+32-18=". A demonstration writes the intermediate result, then the final one, then the
answer in GSM8K's form: "57+32=89;89-18=71;#### 71". The verifier is `math` with `extract: hash`: it
reads only what follows "####" and compares it to the gold answer by value (math-verify), so the
reasoning is free text and only the final answer counts.

The demonstrator slips on a fraction `error_rate` of the problems: one digit of an intermediate result
is wrong and the rest of its reasoning carries the mistake through (as a careless solver's would), or
the slip is in the last step. SFT imitates reasoning and slips alike; RL against the verifier removes
the slips.
"""

from __future__ import annotations

import random

from rlpost.tasks import Task
from rlpost.tasks.arithmetic import slip

ALPHABET = "0123456789+-=;# "


def _apply(x: int, op: str, y: int) -> int:
    return x + y if op == "+" else x - y


def solve(a: int, op1: str, b: int, op2: str, c: int, error_rate: float, rng: random.Random) -> str:
    """The demonstrator's worked solution (with a slip on `error_rate` of the problems)."""
    s = _apply(a, op1, b)
    wrong = rng.random() < error_rate
    where = rng.randrange(2) if wrong else -1
    if where == 0:  # slip in the first step; the second step uses the wrong value
        s = int(slip(str(abs(s)), rng)) * (1 if s >= 0 else -1)
    t = _apply(s, op2, c)
    shown_t = t
    if where == 1:
        shown_t = int(slip(str(abs(t)), rng)) * (1 if t >= 0 else -1)
    return f"{a}{op1}{b}={s};{s}{op2}{c}={shown_t};#### {shown_t}"


def multistep_task(seed: int = 1234, max_operand: int = 99, num_eval: int = 500, error_rate: float = 0.35,
                   num_train: int = 20000) -> Task:
    if not 0.0 <= error_rate <= 1.0:
        raise ValueError(f"task.demonstrator_error must be in [0, 1], got {error_rate}")
    rng = random.Random(seed)
    seen, problems = set(), []
    while len(problems) < num_train + num_eval:
        p = (rng.randint(0, max_operand), rng.choice("+-"), rng.randint(0, max_operand), rng.choice("+-"),
             rng.randint(0, max_operand))
        if p not in seen:
            seen.add(p)
            problems.append(p)
    if not 0 < num_eval < len(problems):
        raise ValueError(f"task.num_eval must be between 1 and {len(problems) - 1}, got {num_eval}")

    def row(p):
        a, o1, b, o2, c = p
        return {"prompt": f"{a}{o1}{b}{o2}{c}=", "answer": str(_apply(_apply(a, o1, b), o2, c))}

    eval_p, train_p = problems[:num_eval], problems[num_eval:]
    demos = [{**row(p), "completion": solve(*p, error_rate, rng)} for p in train_p]
    right = [solve(*p, error_rate, rng).rsplit("#### ", 1)[1] == row(p)["answer"] for p in eval_p]
    return Task("multistep", [row(p) for p in train_p], [row(p) for p in eval_p], demos, ALPHABET,
                sum(right) / len(right))
