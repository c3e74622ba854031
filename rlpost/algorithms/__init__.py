"""The algorithm registry: one file per algorithm, one entry each, one signature for all.

    from rlpost.algorithms import get_algorithm
    algo = get_algorithm("grpo", clip_low=0.2, clip_high=0.28, beta=0.04)
"""

from __future__ import annotations

from typing import Any

from rlpost.algorithms.base import Algorithm

_REGISTRY: dict[str, type[Algorithm]] = {}


def register(name: str):
    """Class decorator: make an Algorithm subclass available as `get_algorithm(name)`."""

    def wrap(cls: type[Algorithm]) -> type[Algorithm]:
        if name in _REGISTRY:
            raise ValueError(f"algorithm {name!r} is already registered by {_REGISTRY[name].__module__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def available() -> dict[str, str]:
    """Registered algorithm names -> one-line descriptions."""
    return {name: cls.description for name, cls in sorted(_REGISTRY.items())}


def get_algorithm(name: str, **params: Any) -> Algorithm:
    """Build a registered algorithm; an unknown name or parameter fails with the valid choices."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown algorithm {name!r}; valid algorithms: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**params)


# Importing a module registers its algorithm.
from rlpost.algorithms import dapo, dr_grpo, grpo, gspo, ppo, reinforce, reinforce_pp, rloo  # noqa: E402,F401
