"""Preference optimisation, offline: the DPO family on (prompt, chosen, rejected) pairs or on unpaired
(prompt, completion, label) rows.

    from rlpost.preference import get_preference_loss
    loss_fn = get_preference_loss("dpo", beta=0.1)
    loss, metrics = loss_fn(policy_seq_logps, reference_seq_logps)

    data.py     loading (JSONL / Hugging Face datasets), validation, tokenisation, pairs from samples
    base.py     SeqLogps, the PreferenceLoss base class, shared metrics, the registry (`register`)
    dpo.py ipo.py kto.py orpo.py simpo.py   one loss each, citing its paper (importing one registers it)
    trainer.py  the offline loop: reference log-probs cached once, then epochs over the pairs
"""

from __future__ import annotations

from typing import Any

from rlpost.preference import dpo, ipo, kto, orpo, simpo  # noqa: F401  (importing registers them)
from rlpost.preference.base import LOSSES, PreferenceLoss, SeqLogps, register, sequence_logps

__all__ = ["PreferenceLoss", "SeqLogps", "available", "get_preference_loss", "register", "sequence_logps"]


def available() -> dict[str, str]:
    """Registered preference loss names -> one-line descriptions."""
    return LOSSES.available()


def get_preference_loss(name: str, **params: Any) -> PreferenceLoss:
    """Build a registered preference loss; an unknown name or parameter fails with the valid choices."""
    return LOSSES.build(name, **params)
