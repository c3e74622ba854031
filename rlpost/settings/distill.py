"""distill.*: on-policy distillation from a teacher model, the RL reward (rlpost/env/teacher.py)."""

from __future__ import annotations

from dataclasses import dataclass

from rlpost.schema import Section, above, opt


@dataclass
class DistillConfig(Section):
    teacher: str | None = opt(None, "on-policy distillation: a teacher model folder (e.g. a run's checkpoints/final) "
                                    "with the policy's tokenizer; the RL reward becomes per token "
                                    "-coef * (log pi_student - log pi_teacher) of each sampled token (None: off)")
    coef: float = opt(1.0, "weight of the per-token reverse-KL reward", above(0))
