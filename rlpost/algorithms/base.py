"""What every algorithm shares: the plug-in base class and the policy-gradient machinery.

An algorithm is a class with a nested `Config` dataclass (its knobs, one docstring each) and two methods
it must implement:

    batch = algo.compute_advantages(batch)          # fills batch.advantages [B, T] (may drop rows)
    loss, metrics = algo.compute_loss(logp, batch)  # logp [B, T]: current policy, with grad

The rest has a default on `Algorithm`: `uses_reference`, `uses_critic` and `needs_proximal_logp` (False by
default; True has the controller run the reference, a critic, or the trainer's proximal log-probs), and
`state_dict` / `load_state_dict` (state carried from step to step, e.g. a baseline; none by default).

It owns no model and no optimizer. Metrics are floats computed without grad, with namespaced keys.
`compute_advantages` may return fewer rows than it was given (DAPO drops degenerate groups); the
controller then refills the batch from new prompts.

`PolicyGradient` implements the options every member of the REINFORCE → PPO → GRPO family shares, so
that each algorithm file only states what makes it different (its advantage estimator and, for a
few, its surrogate):

    KL estimator   kl_estimator = k1 | k2 | k3                       (Schulman, "Approximating KL")
    KL placement   kl_in = loss   : + beta * KL(pi || pi_ref) per token in the loss
                   kl_in = reward : - beta * KL(pi_old || pi_ref) per token folded into the reward
    aggregation    loss_agg = token-mean               sum over tokens / tokens in the batch
                              seq-mean-token-mean      mean over sequences of per-sequence token means
                              seq-mean-token-sum-norm  sum over tokens / (sequences * norm_length)
    entropy bonus  - entropy_coef * entropy per token
    adv. clipping  advantages clamped to [-adv_clip, adv_clip]
    rollout IS     rollout_correction = none | tis | mis: the per-token policy loss times a detached weight
                   pi_prox / mu, truncated or masked at rollout_correction_cap, per token or per sequence
                   (correction.py); old_logp is then the proximal policy's and rollout_logp the engine's
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from rlpost.algorithms.correction import LEVELS, MODES, correction_metrics, correction_weights
from rlpost.batch import Batch
from rlpost.ops import last_token_index, masked_mean, masked_mean_value, masked_sum
from rlpost.registry import Registry, make_config
from rlpost.schema import Range, above, at_least, between

KL_ESTIMATORS = ("k1", "k2", "k3")
KL_PLACEMENTS = ("loss", "reward")
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")

# The registry lives here, below the plug-ins: an algorithm file imports this module, never the package's
# __init__ (which imports every algorithm file).
ALGORITHMS = Registry("algorithm", "algorithms")
register = ALGORITHMS.register  # class decorator: @register("name")


class Algorithm:
    """Base class: builds `self.cfg` from keyword parameters, naming any unknown one."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    @dataclass
    class Config:
        pass

    def __init__(self, **params: Any):
        self.cfg = make_config(self.Config, params, f"algorithm '{self.name}'")

    @property
    def uses_reference(self) -> bool:
        """True when the algorithm reads batch.ref_logp (the controller then runs the reference role)."""
        return False

    @property
    def uses_critic(self) -> bool:
        """True when the algorithm reads batch.values / batch.new_values (the controller runs a critic)."""
        return False

    @property
    def needs_proximal_logp(self) -> bool:
        """True when the loss corrects for the behaviour policy: the controller then moves the engine's
        old_logp to batch.rollout_logp and sets old_logp to the trainer's own log-probs (Trainer.logprobs)."""
        return False

    def compute_advantages(self, batch: Batch) -> Batch:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """What the algorithm carries from step to step (e.g. a moving-average baseline); {} for most."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def compute_loss(self, logp: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError


# ---------------------------------------------------------------------------- math helpers

def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman, "Approximating KL divergence").

    k1 = log(pi/pi_ref)                 unbiased, can be negative
    k2 = 0.5 * log(pi/pi_ref)^2         biased, low variance
    k3 = pi_ref/pi - log(pi_ref/pi) - 1 unbiased, always >= 0
    """
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        return torch.exp(-log_ratio) + log_ratio - 1.0
    raise ValueError(f"unknown KL estimator {kind!r}; valid: {', '.join(KL_ESTIMATORS)}")


def token_mean(per_token: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Sum over response tokens / response tokens in the whole batch (micro-batches sum to the batch mean)."""
    denom = batch.global_tokens if batch.global_tokens is not None else batch.response_mask.sum().item()
    return masked_sum(per_token, batch.response_mask) / max(float(denom), 1.0)


def aggregate(per_token: torch.Tensor, batch: Batch, mode: str, norm_length: int | None = None) -> torch.Tensor:
    """Reduce a [B, T] per-token loss to a scalar (see the module docstring for the modes).

    Denominators count the whole batch (batch.global_*), so micro-batch losses sum to the batch loss.
    """
    mask = batch.response_mask.bool()
    seqs = float(batch.global_seqs if batch.global_seqs is not None else len(batch))
    if mode == "token-mean":
        return token_mean(per_token, batch)
    if mode == "seq-mean-token-mean":
        return masked_mean(per_token, mask, 1).sum() / max(seqs, 1.0)
    if mode == "seq-mean-token-sum-norm":
        # A (micro-)batch whose responses are all empty has width 0 but also a sum of 0: any positive
        # divisor gives its true contribution, 0, where 0 / 0 would make the whole step NaN.
        length = norm_length or max(batch.input_ids.shape[1] - batch.prompt_width, 1)
        return masked_sum(per_token, mask) / (max(seqs, 1.0) * length)
    raise ValueError(f"unknown loss aggregation {mode!r}; valid: {', '.join(LOSS_AGGS)}")


def varied_groups(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """[B] bool: does the row's group hold two different rewards (max > min)? Equal rewards carry no
    signal; comparing them exactly, rather than testing a std for 0, is immune to rounding."""
    groups, inverse = torch.unique(group_ids, return_inverse=True)
    inf = torch.full((len(groups),), float("inf"), dtype=rewards.dtype, device=rewards.device)
    g_max = (-inf).scatter_reduce(0, inverse, rewards, "amax")
    g_min = inf.scatter_reduce(0, inverse, rewards, "amin")
    return (g_max > g_min)[inverse]


def group_normalise(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float, divide_std: bool = True):
    """(r - group mean) / (group std + eps) per row, std unbiased (torch.std). [B], float32.

    A group of one sample, or of equal rewards, gets exactly 0: 16 float32 copies of 0.98 average to
    0.98 + ~1e-8, and that residue over a ~1e-8 std would be |A| ~ 0.2 of pure rounding. The statistics
    are computed in float64 so that nearly equal rewards are still told apart precisely."""
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    r = rewards.double()
    n = counts.to(r.dtype)
    mean = torch.zeros_like(n).index_add_(0, inverse, r) / n
    centred = r - mean[inverse]
    if divide_std:
        var = torch.zeros_like(n).index_add_(0, inverse, centred**2) / (n - 1).clamp(min=1)
        centred = centred / (var.sqrt()[inverse] + eps)
    return torch.where(varied_groups(r, group_ids), centred, torch.zeros_like(centred)).float()


# ---------------------------------------------------------------------------- the family's base

@dataclass
class PGConfig:
    clip_low: float = 0.2
    """ratio lower clip: rho >= 1 - clip_low (PPO paper: 0.2)"""
    clip_high: float = 0.2
    """ratio upper clip: rho <= 1 + clip_high (PPO: 0.2; DAPO's clip-higher: 0.28)"""
    beta: float = 0.0
    """KL-to-reference weight; 0 skips the reference model"""
    kl_estimator: str = "k3"
    """k1 | k2 | k3"""
    kl_in: str = "loss"
    """where the KL goes: 'loss' (a penalty term) or 'reward' (per-token reward shaping)"""
    loss_agg: str = "token-mean"
    """token-mean | seq-mean-token-mean | seq-mean-token-sum-norm"""
    norm_length: int | None = None
    """seq-mean-token-sum-norm's constant divisor (None: the batch's response width)"""
    entropy_coef: float = 0.0
    """weight of the entropy bonus (subtracted from the loss)"""
    adv_clip: float | None = None
    """clamp advantages to [-adv_clip, adv_clip] (None: off)"""
    eps: float = 1e-6
    """added to standard deviations before dividing"""
    rollout_correction: str = "none"
    """importance weight pi_prox / mu on the policy loss for stale or mismatched rollouts: none | tis | mis"""
    rollout_correction_cap: float = 2.0
    """tis: weights truncated at cap; mis: weights outside [1/cap, cap] zeroed (>= 1)"""
    rollout_correction_level: str = "token"
    """token: a weight per token; sequence: one per response, exp(sum of its log-ratios)"""

    # What each number may be, checked when the config loads (rlpost/schema.py); subclasses add their own.
    ranges: ClassVar[dict[str, Range]] = {
        "clip_low": between(0, 1, "1: no lower clip", low_open=True),
        "clip_high": above(0),
        "beta": at_least(0, "0: no KL term, no reference model"),
        "norm_length": at_least(1),
        "entropy_coef": Range(note="0: no entropy term; below 0: an entropy penalty"),
        "adv_clip": above(0),
        "eps": at_least(0, "0: divide by the standard deviation alone"),
        "rollout_correction_cap": at_least(1),
    }


class PolicyGradient(Algorithm):
    """Shared policy-gradient machinery. Subclasses implement `sequence_advantages` (one advantage per
    sequence, broadcast to its tokens) or override `compute_advantages` for token-level estimators
    (reading rewards through `token_rewards`, which checks them), and may override `policy_loss`
    (default: the PPO clipped surrogate)."""

    Config = PGConfig

    def __init__(self, **params: Any):
        super().__init__(**params)
        c = self.cfg
        for key, value, valid in (("kl_estimator", c.kl_estimator, KL_ESTIMATORS), ("kl_in", c.kl_in, KL_PLACEMENTS),
                                  ("loss_agg", c.loss_agg, LOSS_AGGS),
                                  ("rollout_correction", c.rollout_correction, MODES),
                                  ("rollout_correction_level", c.rollout_correction_level, LEVELS)):
            if value not in valid:
                raise ValueError(f"{self.name}: {key}={value!r}; valid: {', '.join(valid)}")

    @property
    def uses_reference(self) -> bool:
        return self.cfg.beta > 0

    @property
    def needs_proximal_logp(self) -> bool:
        return self.cfg.rollout_correction != "none"

    # ---- rewards
    def check_rewards(self, batch: Batch) -> None:
        """Raise on a NaN or infinite reward, naming its row and prompt: it would otherwise silently make
        its group's (or, when whitened, the whole batch's) advantages and loss NaN."""
        if batch.rewards is None:
            raise ValueError(f"{self.name}.compute_advantages needs batch.rewards")
        r = batch.rewards.float()
        finite = torch.isfinite(r)
        if r.dim() == 2:  # token rewards: those off the response are never read
            finite = finite | ~batch.response_mask.bool()
        if not finite.all():
            i, *t = (~finite).nonzero()[0].tolist()
            row = batch.meta.get("row", [None] * len(batch))[i]
            prompt = f" (prompt {row['prompt']!r})" if isinstance(row, dict) and "prompt" in row else ""
            n_bad = int((~finite).reshape(len(batch), -1).any(1).sum())
            raise ValueError(f"{self.name}: reward {float(r[(i, *t)])} of row {i}{prompt} is not finite "
                             f"({n_bad} of {len(batch)} rows have one)")

    def token_rewards(self, batch: Batch) -> torch.Tensor:
        """[B, T] rewards: the outcome reward on each row's last response token (or the given token-level
        rewards), minus beta * KL(pi_old || pi_ref) per token when kl_in = reward. Every estimator reads the
        rewards through here, so every algorithm checks them (check_rewards)."""
        self.check_rewards(batch)
        mask = batch.response_mask.bool()
        if batch.rewards.dim() == 2:
            r = torch.where(mask, batch.rewards.float(), torch.zeros_like(batch.rewards.float()))
        else:
            r = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
            r[torch.arange(len(batch), device=mask.device), last_token_index(mask)] = batch.rewards.float()
        if self.cfg.kl_in == "reward" and self.cfg.beta > 0:
            if batch.ref_logp is None:
                raise ValueError(f"{self.name} with kl_in=reward needs batch.ref_logp (run the reference role)")
            kl = kl_estimate(batch.old_logp, batch.ref_logp, self.cfg.kl_estimator)
            r = r - self.cfg.beta * torch.where(mask, kl, torch.zeros_like(kl))
        return r

    def sequence_rewards(self, batch: Batch) -> torch.Tensor:
        """[B]: the sum of token_rewards over each response."""
        return self.token_rewards(batch).sum(1)

    # ---- advantages
    def sequence_advantages(self, rewards: torch.Tensor, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def compute_advantages(self, batch: Batch) -> Batch:
        adv = self.sequence_advantages(self.sequence_rewards(batch), batch)  # [B]
        return batch.replace(advantages=self.clip_advantages(adv[:, None] * batch.response_mask))

    def clip_advantages(self, adv: torch.Tensor) -> torch.Tensor:
        return adv if self.cfg.adv_clip is None else adv.clamp(-self.cfg.adv_clip, self.cfg.adv_clip)

    # ---- loss
    def policy_loss(self, logp: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """PPO's clipped surrogate per token: -min(rho * A, clip(rho, 1 - clip_low, 1 + clip_high) * A)."""
        mask = batch.response_mask.bool()
        adv = batch.advantages
        # log rho is zeroed off the response so exp() of padding garbage cannot make inf * 0 = NaN.
        log_ratio = torch.where(mask, logp - batch.old_logp, torch.zeros_like(logp))
        ratio = torch.exp(log_ratio)
        clipped = torch.clamp(ratio, 1 - self.cfg.clip_low, 1 + self.cfg.clip_high)
        per_token = -torch.min(ratio * adv, clipped * adv)
        with torch.no_grad():
            metrics = {
                "loss/clip_frac_low": masked_mean_value(((ratio < 1 - self.cfg.clip_low) & (adv < 0)).float(), mask),
                "loss/clip_frac_high": masked_mean_value(((ratio > 1 + self.cfg.clip_high) & (adv > 0)).float(), mask),
                "loss/approx_kl_old": masked_mean_value((ratio - 1) - log_ratio, mask),
                "loss/ratio_mean": masked_mean_value(ratio, mask),
            }
        return per_token, metrics

    def compute_loss(self, logp: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        mask = batch.response_mask.bool()
        per_token, metrics = self.policy_loss(logp, batch)
        if self.needs_proximal_logp:  # every policy_loss is weighted here, whichever algorithm defines it
            if batch.rollout_logp is None:
                raise ValueError(f"{self.name} with rollout_correction={self.cfg.rollout_correction} needs "
                                 "batch.rollout_logp (the engine's log-probs; the controller sets it)")
            c = self.cfg
            per_token = per_token * correction_weights(batch, c.rollout_correction, c.rollout_correction_cap,
                                                       c.rollout_correction_level)
            metrics.update(correction_metrics(batch, c.rollout_correction, c.rollout_correction_cap,
                                              c.rollout_correction_level))
        if self.cfg.beta > 0 and self.cfg.kl_in == "loss":
            if batch.ref_logp is None:
                raise ValueError(f"{self.name} with beta > 0 needs batch.ref_logp (run the reference role)")
            kl = kl_estimate(logp, torch.where(mask, batch.ref_logp, logp), self.cfg.kl_estimator)
            per_token = per_token + self.cfg.beta * kl
            metrics["loss/kl_ref"] = masked_mean_value(kl.detach(), mask)
        elif batch.ref_logp is not None:
            metrics["loss/kl_ref"] = masked_mean_value(kl_estimate(logp.detach(), batch.ref_logp, "k3"), mask)
        if self.cfg.entropy_coef:
            if batch.entropy is None:
                raise ValueError(f"{self.name} with entropy_coef needs batch.entropy (set by the trainer)")
            per_token = per_token - self.cfg.entropy_coef * batch.entropy
        loss = aggregate(per_token, batch, self.cfg.loss_agg, self.cfg.norm_length)
        return loss, metrics
