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
from rlpost.registry import Registry

_LOSSES = Registry("preference loss", "preference losses")
register = _LOSSES.register  # class decorator: @register("name")


def available() -> dict[str, str]:
    """Registered preference loss names -> one-line descriptions."""
    return _LOSSES.available()


def get_preference_loss(name: str, **params: Any) -> PreferenceLoss:
    """Build a registered preference loss; an unknown name or parameter fails with the valid choices."""
    return _LOSSES.build(name, **params)


__all__ = ["PreferenceLoss", "SeqLogps", "available", "get_preference_loss", "register", "sequence_logps"]

from rlpost.preference import dpo, ipo, kto, orpo, simpo  # noqa: E402,F401  (importing registers them)
