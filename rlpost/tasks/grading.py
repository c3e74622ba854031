"""The embedded judge: teach a tiny model to grade additions, then use it as an LLM-as-judge reward.

    rlpost train recipes/judge_grader.yaml        # SFT only: runs/judge_grader/checkpoints/sft is the judge
    rlpost train recipes/judge_arithmetic.yaml    # the default task, rewarded by that judge (task.reward: judge)

A grading row shows the judge an addition, its reference answer and a candidate answer through the
judge's rubric (`RUBRIC`, the same text as `task.reward_options.rubric` in
recipes/judge_arithmetic.yaml), and the target is "Score: 1" (right) or "Score: 0" (wrong).
Candidates are right half of the time and otherwise one digit off, as the policy's own mistakes are.
The judge's held-out grading accuracy is the grader run's pass@1. (Without the reference in the
rubric the judge has to do the sum itself: 1,500 SFT steps gave a 69 % grader, too weak to reward by.)
"""

from __future__ import annotations

import random

from rlpost.env.judge import render_rubric
from rlpost.tasks import Task
from rlpost.tasks.arithmetic import arithmetic_task, slip

RUBRIC = "{prompt}{reference}|{completion}"  # recipes/judge_arithmetic.yaml gives the judge this rubric


def grade_row(row: dict, rng: random.Random) -> dict:
    right = rng.random() < 0.5
    candidate = row["answer"] if right else slip(row["answer"], rng)
    prompt = render_rubric(RUBRIC, candidate, row, 0, 1)
    answer = f"Score: {int(right)}"
    return {"prompt": prompt, "answer": answer, "completion": answer}


def grading_task(seed: int = 1234, max_operand: int = 99, num_eval: int = 500) -> Task:
    base = arithmetic_task(seed=seed, max_operand=max_operand, num_eval=num_eval, error_rate=0.0)
    rng = random.Random(seed + 1)
    train = [grade_row(r, rng) for r in base.train_rows]
    evals = [grade_row(r, rng) for r in base.eval_rows]
    chars = sorted({c for r in train + evals for c in r["prompt"] + r["completion"]})
    return Task("grading", train, evals, train, "".join(chars), 1.0)
