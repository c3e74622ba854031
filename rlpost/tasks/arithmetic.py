"""The embedded default task: two-operand addition, procedurally generated, seeded, verifiable.

Numbers are written at fixed width (prompt "07+85=", answer "092"), so each answer digit sits at a
fixed offset from the operand digits it depends on; a tiny transformer learns that layout in minutes.
The verifier compares values, so "92" is also right. Every pair (a, b) with 0 <= a, b <= max_operand is one problem; a
seeded shuffle holds `num_eval` of them out. The SFT data comes from an *imperfect demonstrator*:
it labels each training problem once, and a fixed fraction `error_rate` of its labels are wrong by a
one-digit slip (as a careless human labeller's would be). Imitating it caps a model near the
demonstrator's accuracy; RL against the verifier is what can push past it.
"""

from __future__ import annotations

import random

from rlpost.tasks.base import TASKS, Task, TaskSource, answer_match

ALPHABET = "0123456789+="


def slip(answer: str, rng: random.Random) -> str:
    """The answer with one digit replaced by a different one."""
    i = rng.randrange(len(answer))
    choices = [d for d in "0123456789" if d != answer[i]]
    return answer[:i] + rng.choice(choices) + answer[i + 1:]


def demonstrate(row: dict, error_rate: float, rng: random.Random) -> str:
    """The demonstrator's answer: right with probability 1 - error_rate, else a one-digit slip."""
    return slip(row["answer"], rng) if rng.random() < error_rate else row["answer"]


def arithmetic_task(seed: int = 1234, max_operand: int = 99, num_eval: int = 500, error_rate: float = 0.35) -> Task:
    if not 0.0 <= error_rate <= 1.0:
        raise ValueError(f"task.demonstrator_error must be in [0, 1], got {error_rate}")
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)]
    rng.shuffle(pairs)
    if not 0 < num_eval < len(pairs):
        raise ValueError(f"task.num_eval must be between 1 and {len(pairs) - 1}, got {num_eval}")
    w = len(str(max_operand))
    rows = [{"prompt": f"{a:0{w}d}+{b:0{w}d}=", "answer": f"{a + b:0{w + 1}d}"} for a, b in pairs]
    eval_rows, train_rows = rows[:num_eval], rows[num_eval:]
    demos = [{**r, "completion": demonstrate(r, error_rate, rng)} for r in train_rows]
    # The demonstrator's accuracy on the held-out problems (a fresh draw, as it would label them).
    held_out = [answer_match(demonstrate(r, error_rate, rng), r["answer"]) for r in eval_rows]
    return Task("arithmetic", train_rows, eval_rows, demos, ALPHABET, sum(held_out) / len(held_out))


@TASKS.register("arithmetic")
class Arithmetic(TaskSource):
    description = "two-operand addition (the default)"

    def load(self, cfg) -> Task:
        return arithmetic_task(seed=cfg.seed, max_operand=cfg.max_operand, num_eval=cfg.num_eval,
                               error_rate=cfg.demonstrator_error)
