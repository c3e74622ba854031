"""Importance-sampling correction for rollouts that were not sampled by the policy being trained.

The rollout engine samples from a behaviour policy mu whose log-probs it records as it draws
(batch.rollout_logp). mu differs from the trainer's policy when the rollout ran on older weights
(asynchronous training, up to `rl.max_staleness` versions behind) and, slightly, whenever the engine's
numerics differ from the trainer's. With the correction on, the controller recomputes `old_logp` as the
*proximal* policy pi_prox (the trainer's weights at the start of the step, no grad), so that the three
policies each play one part (decoupled PPO, Hilton et al. 2022; AReaL, Fu et al. 2025):

    per-token loss = w * ppo_loss(pi_theta / pi_prox, A)       PPO's ratio and clip: a trust region around pi_prox
    w              = pi_prox / mu = exp(old_logp - rollout_logp)   detached: it only reweights

    level token:     w_t = exp(old_logp_t - rollout_logp_t)
    level sequence:  w_t = exp(sum over the response of (old_logp - rollout_logp)), the same for all its tokens

    mode none:  no weight (PPO's ratio is then pi_theta / mu: the trust region is centred on the stale policy)
    mode tis:   w -> min(w, cap)                                 truncated IS (Ionides 2008, "Truncated importance
                                                                 sampling"; Yao et al. 2025, TIS for engine mismatch)
    mode mis:   w -> w if 1/cap <= w <= cap, else 0              masked IS (Liu et al. 2025, "When speed kills
                                                                 stability"; IcePop, Ling team 2025)

Untruncated IS is unbiased: E_mu[w * g] = E_prox[g]. Truncation trades a bias of exactly
-E_mu[(w - min(w, cap)) * g] (masking: -E_mu[w * 1{w outside [1/cap, cap]} * g]) for bounded variance;
tests/test_rollout_correction.py measures both on a bandit whose gradient is known in closed form.

Deviations. A masked token keeps its place in the loss's denominator with weight 0, where the masked-IS
recipes remove it from the response mask (a self-normalised estimate over the kept tokens); keeping it
makes the estimate a plain sum whose expectation is the formula above. Only the policy loss is weighted,
not the KL-to-reference or entropy terms. mis's lower bound is fixed at 1/cap. Weights are computed per
token or per whole response; there is no geometric-mean level.
"""

from __future__ import annotations

import torch

from rlpost.batch import Batch
from rlpost.ops import masked_mean_value

MODES = ("none", "tis", "mis")
LEVELS = ("token", "sequence")
# the raw weights' histogram: bins [lo, hi) over these edges, with open ends [0, 1/8) and [8, inf)
HIST_EDGES = (0.125, 0.25, 0.5, 0.8, 0.95, 1.05, 1.25, 2.0, 4.0, 8.0)


def raw_weights(batch: Batch, level: str) -> torch.Tensor:
    """[B, T] detached pi_prox / mu per token (level token) or per response (level sequence); 1 off the response."""
    if batch.rollout_logp is None or batch.old_logp is None:
        raise ValueError("the rollout correction needs batch.rollout_logp (the engine's log-probs) and "
                         "batch.old_logp (the proximal policy's); the controller sets both when it is on")
    mask = batch.response_mask.bool()
    log_w = torch.where(mask, batch.old_logp - batch.rollout_logp, torch.zeros_like(batch.old_logp)).detach()
    if level == "sequence":
        log_w = torch.where(mask, log_w.sum(1, keepdim=True).expand_as(log_w), torch.zeros_like(log_w))
    elif level != "token":
        raise ValueError(f"unknown rollout_correction_level {level!r}; valid: {', '.join(LEVELS)}")
    return torch.exp(log_w)


def apply_mode(w: torch.Tensor, mode: str, cap: float) -> torch.Tensor:
    """The weights the loss uses: truncated at cap (tis), zeroed outside [1/cap, cap] (mis), as is (none)."""
    if mode == "tis":
        return w.clamp(max=cap)
    if mode == "mis":
        return torch.where((w >= 1.0 / cap) & (w <= cap), w, torch.zeros_like(w))
    if mode == "none":
        return w
    raise ValueError(f"unknown rollout_correction {mode!r}; valid: {', '.join(MODES)}")


def correction_weights(batch: Batch, mode: str, cap: float, level: str) -> torch.Tensor:
    """[B, T] detached importance weights that multiply the per-token policy loss (module docstring)."""
    return apply_mode(raw_weights(batch, level), mode, cap)


def hist_label(lo: float, hi: float) -> str:
    """The metric key of the histogram bin [lo, hi), e.g. correction/weight_hist/0.8-0.95."""
    return f"correction/weight_hist/{lo:g}-{hi:g}"


@torch.no_grad()
def correction_metrics(batch: Batch, mode: str, cap: float, level: str) -> dict[str, float]:
    """Statistics over the response tokens (a sequence-level weight counts once per token):

    correction/weight_mean    mean of the weights applied (after truncation or masking)
    correction/weight_max     largest raw weight pi_prox / mu
    correction/clipped_frac   (tis) fraction of tokens whose raw weight exceeds cap
    correction/masked_frac    (mis) fraction of tokens given weight 0
    correction/weight_hist/<lo>-<hi>   fraction of raw weights in [lo, hi) over HIST_EDGES (sums to 1)

    The trainer averages metrics over micro-batches weighted by their token counts, so means, fractions and
    the histogram are exact over the batch; weight_max is then the mean of the micro-batches' maxima."""
    mask = batch.response_mask.bool()
    raw = raw_weights(batch, level)
    w = apply_mode(raw, mode, cap)
    out = {"correction/weight_mean": masked_mean_value(w, mask),
           "correction/weight_max": float(raw[mask].max()) if mask.any() else 1.0}
    if mode == "tis":
        out["correction/clipped_frac"] = masked_mean_value((raw > cap).float(), mask)
    if mode == "mis":
        out["correction/masked_frac"] = masked_mean_value((w == 0).float(), mask)
    edges = (0.0, *HIST_EDGES, float("inf"))
    for lo, hi in zip(edges[:-1], edges[1:]):
        top = raw < hi if hi < float("inf") else torch.ones_like(mask)  # an overflowed weight (inf) is in the last bin
        out[hist_label(lo, hi)] = masked_mean_value(((raw >= lo) & top).float(), mask)
    return out
