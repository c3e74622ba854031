"""The embedded judge: teach a tiny model to grade additions, then use it as an LLM-as-judge reward.

    rlpost train recipes/judge_grader.yaml        # SFT only: runs/judge_grader/checkpoints/sft is the judge
    rlpost train recipes/judge_arithmetic.yaml    # the default task, rewarded by that judge (task.reward: judge)

A grading row shows the judge an addition, its reference answer and a candidate answer through the
judge's rubric (`RUBRIC`, the same text as `task.reward_options.rubric` in
recipes/judge_arithmetic.yaml). The judge reasons before it scores, as judges are asked to: it pairs
each digit of the candidate with the reference's ("19" "33" "55" for 135 against 195), then gives the
score, 1 (right) or 0 (wrong), on a last line of its own, which is what the judge parser reads
(`rlpost.env.judge.parse_score`: the last line's one number). Candidates
are right half of the time and otherwise one digit off, as the policy's own mistakes are. The judge's
held-out grading accuracy (its last number against the label) is the grader run's pass@1.

Trained to answer the score alone (without the pairing), the same model reached 70 % grading accuracy
in 800 steps, with or without the reference in the rubric: too weak to reward by.
"""

from __future__ import annotations

import random

from rlpost.env.judge import render_rubric
from rlpost.tasks.base import TASKS, Task, TaskSource
from rlpost.tasks.arithmetic import arithmetic_task, slip

RUBRIC = "{prompt}{reference}|{completion}"  # recipes/judge_arithmetic.yaml gives the judge this rubric


def grade_row(row: dict, rng: random.Random) -> dict:
    right = rng.random() < 0.5
    candidate = row["answer"] if right else slip(row["answer"], rng)
    prompt = render_rubric(RUBRIC, candidate, row, 0, 1)
    # the score on a line of its own: the judge parser reads the last line, and refuses one with several numbers
    answer = " ".join(c + r for c, r in zip(candidate, row["answer"])) + f"\n{int(right)}"
    return {"prompt": prompt, "answer": answer, "completion": answer}


class GradingTask(Task):
    def verify(self, completion: str, row: dict) -> float:
        """A grading is right when its score (the last word) is the label, whatever the pairing said."""
        words = completion.split()
        return float(bool(words) and words[-1] == row["answer"].split()[-1])


def grading_task(seed: int = 1234, max_operand: int = 99, num_eval: int = 500) -> Task:
    base = arithmetic_task(seed=seed, max_operand=max_operand, num_eval=num_eval, error_rate=0.0)
    rng = random.Random(seed + 1)
    train = [grade_row(r, rng) for r in base.train_rows]
    evals = [grade_row(r, rng) for r in base.eval_rows]
    chars = sorted({c for r in train + evals for c in r["prompt"] + r["completion"]})
    return GradingTask("grading", train, evals, train, "".join(chars), 1.0)


@TASKS.register("grading")
class Grading(TaskSource):
    description = "grade additions: a judge model to reward by"

    def load(self, cfg) -> Task:
        return grading_task(seed=cfg.seed, max_operand=cfg.max_operand, num_eval=cfg.num_eval)
