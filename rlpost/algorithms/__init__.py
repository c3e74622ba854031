"""The algorithm registry: one file per algorithm, one entry each, one signature for all.

    from rlpost.algorithms import get_algorithm
    algo = get_algorithm("grpo", clip_low=0.2, clip_high=0.28, beta=0.04)
"""

from __future__ import annotations

from typing import Any

from rlpost.algorithms.base import Algorithm
from rlpost.registry import Registry

_ALGORITHMS = Registry("algorithm", "algorithms")
register = _ALGORITHMS.register  # class decorator: @register("name")


def available() -> dict[str, str]:
    """Registered algorithm names -> one-line descriptions."""
    return _ALGORITHMS.available()


def get_algorithm(name: str, **params: Any) -> Algorithm:
    """Build a registered algorithm; an unknown name or parameter fails with the valid choices."""
    return _ALGORITHMS.build(name, **params)


# Importing a module registers its algorithm.
from rlpost.algorithms import cispo, dapo, dr_grpo, grpo, gspo, ppo, reinforce, reinforce_pp, rloo, sapo  # noqa: F401
