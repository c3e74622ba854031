"""CONTROLLER: the seven-step loop, colocated (every role in this process, taking turns).

    1. prompts     pick the next prompts
    2. rollout     sample K completions each, with old_logp           engine.generate
    3. reward      score every completion                             reward(batch)
    4. reference   ref_logp from the frozen model (if the loss uses it) reference(batch)
    5. advantages  the algorithm's estimator                          algo.compute_advantages
    6. train       one optimizer step on the algorithm's loss         trainer.step(batch, algo.compute_loss)
    7. sync        fresh weights to the rollout engine                weight_sync.sync()

It holds no algorithm logic: it only calls the roles in order, times each one, and gathers metrics.
"""

from __future__ import annotations

import random
import time
from contextlib import contextmanager

import torch

from rlpost.algorithms.base import Algorithm
from rlpost.batch import Batch
from rlpost.reference import Reference
from rlpost.reward import Reward
from rlpost.rollout import SamplingParams
from rlpost.trainer import Trainer
from rlpost.weight_sync import WeightSync

ROLES = ("rollout", "reward", "reference", "advantages", "train", "sync")


class PromptSampler:
    """Walks the prompt set in seeded random order, reshuffling at each epoch."""

    def __init__(self, n: int, seed: int):
        self.n, self.rng, self.order = n, random.Random(seed), []

    def next(self, count: int) -> list[int]:
        out = []
        while len(out) < count:
            if not self.order:
                self.order = list(range(self.n))
                self.rng.shuffle(self.order)
            out.append(self.order.pop())
        return out


class Controller:
    def __init__(self, *, rows: list[dict], prompt_ids: list[list[int]], engine, reward: Reward,
                 reference: Reference | None, algorithm: Algorithm, trainer: Trainer, weight_sync: WeightSync,
                 params: SamplingParams, prompts_per_step: int, k: int, seed: int = 0):
        if algorithm.uses_reference and reference is None:
            raise ValueError(f"algorithm '{algorithm.name}' reads ref_logp but no reference was given")
        self.rows, self.prompt_ids = rows, prompt_ids
        self.engine, self.reward, self.reference = engine, reward, reference
        self.algorithm, self.trainer, self.weight_sync = algorithm, trainer, weight_sync
        self.params, self.prompts_per_step, self.k, self.seed = params, prompts_per_step, k, seed
        self.sampler = PromptSampler(len(rows), seed)
        self.times: dict[str, float] = {}

    @contextmanager
    def timed(self, role: str):
        t0 = time.perf_counter()
        yield
        self.times[role] = time.perf_counter() - t0

    def step(self, step: int) -> dict[str, float]:
        self.times = {}
        # 1. prompts
        idx = self.sampler.next(self.prompts_per_step)
        # 2. rollout
        with self.timed("rollout"):
            batch = self.engine.generate([self.prompt_ids[i] for i in idx], self.k, self.params,
                                         seed=self.seed * 1_000_003 + step)
            batch = batch.replace(meta={**batch.meta, "row": [self.rows[i] for i in idx for _ in range(self.k)]})
        # 3. reward
        with self.timed("reward"):
            batch, reward_metrics = self.reward(batch)
        # 4. reference
        with self.timed("reference"):
            if self.algorithm.uses_reference:
                batch = self.reference(batch)
        # 5. advantages
        with self.timed("advantages"):
            batch = self.algorithm.compute_advantages(batch)
        # 6. train
        with self.timed("train"):
            train_metrics = self.trainer.step(batch, self.algorithm.compute_loss)
        # 7. sync
        with self.timed("sync"):
            sync_metrics = self.weight_sync.sync()

        total = sum(self.times.values())
        metrics = {**rollout_metrics(batch), **reward_metrics, **train_metrics, **sync_metrics}
        metrics["rollout/tokens_per_s"] = batch.num_response_tokens / max(self.times["rollout"], 1e-9)
        for role in ROLES:
            metrics[f"time/{role}"] = self.times[role]
            metrics[f"time_share/{role}"] = self.times[role] / max(total, 1e-9)
        metrics["time/step"] = total
        return metrics


@torch.no_grad()
def rollout_metrics(batch: Batch) -> dict[str, float]:
    """Reward, length and group statistics of a scored batch (algorithm-independent)."""
    r = batch.rewards.float()
    lengths = batch.response_mask.sum(1).float()
    _, inverse = torch.unique(batch.group_ids, return_inverse=True)
    groups = int(inverse.max()) + 1
    g_max = torch.full((groups,), -float("inf")).scatter_reduce(0, inverse, r, "amax")
    g_min = torch.full((groups,), float("inf")).scatter_reduce(0, inverse, r, "amin")
    adv = batch.advantages[batch.response_mask.bool()] if batch.advantages is not None else torch.zeros(1)
    return {
        "reward/mean": float(r.mean()),
        "reward/std": float(r.std()) if len(r) > 1 else 0.0,
        "rollout/response_len_mean": float(lengths.mean()),
        "rollout/response_len_max": float(lengths.max()),
        "rollout/truncated_frac": sum(f == "length" for f in batch.meta["finish_reason"]) / len(batch),
        "rollout/degenerate_group_frac": float((g_max == g_min).float().mean()),
        "advantage/mean": float(adv.mean()),
        "advantage/std": float(adv.std()) if adv.numel() > 1 else 0.0,
    }
