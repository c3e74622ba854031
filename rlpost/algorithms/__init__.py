"""The algorithm registry: one file per algorithm, one entry each, one signature for all.

    from rlpost.algorithms import get_algorithm
    algo = get_algorithm("grpo", clip_low=0.2, clip_high=0.28, beta=0.04)

The registry and the `register` decorator live in base.py, which every algorithm file imports; this package
imports the algorithm files, and importing one registers its algorithm.
"""

from __future__ import annotations

from typing import Any

from rlpost.algorithms import cispo, dapo, dr_grpo, grpo, gspo, ppo, reinforce, reinforce_pp, rloo, sapo  # noqa: F401
from rlpost.algorithms.base import ALGORITHMS, Algorithm, register

__all__ = ["Algorithm", "available", "get_algorithm", "register"]


def available() -> dict[str, str]:
    """Registered algorithm names -> one-line descriptions."""
    return ALGORITHMS.available()


def get_algorithm(name: str, **params: Any) -> Algorithm:
    """Build a registered algorithm; an unknown name or parameter fails with the valid choices."""
    return ALGORITHMS.build(name, **params)
