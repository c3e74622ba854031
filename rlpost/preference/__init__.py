"""Preference optimisation, offline: the DPO family on (prompt, chosen, rejected) pairs or on unpaired
(prompt, completion, label) rows.

    from rlpost.preference import get_preference_loss
    loss_fn = get_preference_loss("dpo", beta=0.1)
    loss, metrics = loss_fn(policy_seq_logps, reference_seq_logps)

    data.py     loading (JSONL / Hugging Face datasets), validation, tokenisation, pairs from samples
    base.py     SeqLogps, the PreferenceLoss base class, shared metrics
    dpo.py ipo.py kto.py orpo.py simpo.py   one loss each, citing its paper
    trainer.py  the offline loop: reference log-probs cached once, then epochs over the pairs
"""

from __future__ import annotations

from typing import Any

from rlpost.preference.base import PreferenceLoss, SeqLogps, sequence_logps

_REGISTRY: dict[str, type[PreferenceLoss]] = {}


def register(name: str):
    """Class decorator: make a PreferenceLoss subclass available as `get_preference_loss(name)`."""

    def wrap(cls: type[PreferenceLoss]) -> type[PreferenceLoss]:
        if name in _REGISTRY:
            raise ValueError(f"preference loss {name!r} is already registered by {_REGISTRY[name].__module__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def available() -> dict[str, str]:
    """Registered preference loss names -> one-line descriptions."""
    return {name: cls.description for name, cls in sorted(_REGISTRY.items())}


def get_preference_loss(name: str, **params: Any) -> PreferenceLoss:
    """Build a registered preference loss; an unknown name or parameter fails with the valid choices."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown preference loss {name!r}; valid preference losses: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**params)


__all__ = ["PreferenceLoss", "SeqLogps", "available", "get_preference_loss", "register", "sequence_logps"]

from rlpost.preference import dpo, ipo, kto, orpo, simpo  # noqa: E402,F401  (importing registers them)
