"""What every preference loss shares: sequence log-probs, the plug-in base class, common metrics.

A preference loss is a class with a nested `Config` dataclass (its knobs) and one method,

    loss, metrics = pref_loss(policy, reference)   # both: SeqLogps, one entry per sequence

For a *paired* loss (DPO, IPO, ORPO, SimPO) the sequences come as pairs: `policy.chosen(...)` and
`policy.rejected(...)` are the rows of a pair's preferred and dispreferred completion. For an
*unpaired* loss (KTO) each sequence carries a binary label (desirable / undesirable) instead.

Log-probs are **sums over the completion's tokens** (log pi(y|x)); prompt and padding positions are
replaced, never multiplied, so a NaN or inf there cannot leak into a result. A loss that wants the
length-averaged log-prob divides by `length` itself and says so in its docstring.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from rlpost.ops import masked_sum
from rlpost.registry import Registry, make_config

# The registry lives here, below the plug-ins: a loss file imports this module, never the package's __init__
# (which imports every loss file).
LOSSES = Registry("preference loss", "preference losses")
register = LOSSES.register  # class decorator: @register("name")


@dataclass
class SeqLogps:
    """Per-sequence quantities of one batch of preference rows (all [N]).

    logp:    sum over completion tokens of log pi(y_t | x, y_<t)
    length:  completion tokens (float, >= 1)
    label:   1.0 chosen / desirable, 0.0 rejected / undesirable
    pair:    pair index (paired data: the two rows of a pair share it; unpaired: the row index)
    kl_logp: unpaired losses only: log pi of a *mismatched* completion for the same prompt (KTO's
             KL estimate); None otherwise
    """

    logp: torch.Tensor
    length: torch.Tensor
    label: torch.Tensor
    pair: torch.Tensor
    kl_logp: torch.Tensor | None = None

    def _rows(self, want: float) -> torch.Tensor:
        idx = (self.label == want).nonzero().squeeze(-1)
        return idx[torch.argsort(self.pair[idx])]  # pair order, so chosen[i] and rejected[i] match

    def chosen(self, x: torch.Tensor) -> torch.Tensor:
        return x[self._rows(1.0)]

    def rejected(self, x: torch.Tensor) -> torch.Tensor:
        return x[self._rows(0.0)]


def sequence_logps(token_logp: torch.Tensor, response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log-probs over response tokens [N], response tokens [N]) from [N, T] tensors."""
    mask = response_mask.bool()
    total = masked_sum(token_logp, mask, -1)
    return total, mask.sum(-1).clamp(min=1).to(total.dtype)


class PreferenceLoss:
    """Base class: builds `self.cfg` from keyword parameters, naming any unknown one."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    paired: ClassVar[bool] = True          # False: unpaired rows with labels (KTO)
    uses_reference: ClassVar[bool] = True  # False: no reference model (ORPO, SimPO)

    @dataclass
    class Config:
        pass

    def __init__(self, **params: Any):
        self.cfg = make_config(self.Config, params, f"preference loss '{self.name}'")

    def __call__(self, policy: SeqLogps, reference: SeqLogps | None) -> tuple[torch.Tensor, dict[str, float]]:
        if self.uses_reference and reference is None:
            raise ValueError(f"preference loss '{self.name}' needs reference log-probs")
        return self.compute(policy, reference)

    def compute(self, policy: SeqLogps, reference: SeqLogps | None) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError


@torch.no_grad()
def pair_metrics(policy: SeqLogps, reward_chosen: torch.Tensor, reward_rejected: torch.Tensor,
                 reference: SeqLogps | None = None) -> dict[str, float]:
    """The metrics every paired loss reports (means over pairs).

    pref/reward_chosen, _rejected  the loss's implicit reward of each completion
    pref/reward_margin             reward_chosen - reward_rejected
    pref/accuracy                  fraction of pairs whose margin is > 0
    pref/logp_chosen, _rejected    log pi(y|x) summed over tokens: when both fall while the margin
                                   grows, that is likelihood displacement
    pref/logp_chosen_vs_ref, ...   log pi - log pi_ref (with a reference): < 0 means the policy now
                                   gives the completion less mass than it started with
    """
    margin = reward_chosen - reward_rejected
    m = {"pref/reward_chosen": reward_chosen.mean().item(), "pref/reward_rejected": reward_rejected.mean().item(),
         "pref/reward_margin": margin.mean().item(), "pref/accuracy": (margin > 0).float().mean().item(),
         "pref/logp_chosen": policy.chosen(policy.logp).mean().item(),
         "pref/logp_rejected": policy.rejected(policy.logp).mean().item()}
    if reference is not None:
        m["pref/logp_chosen_vs_ref"] = (policy.chosen(policy.logp) - reference.chosen(reference.logp)).mean().item()
        m["pref/logp_rejected_vs_ref"] = (policy.rejected(policy.logp)
                                          - reference.rejected(reference.logp)).mean().item()
    return m
