"""CONTROLLER: the seven-step loop, colocated (every role in this process, taking turns).

    1. prompts     pick the next prompts                              sampler.next
    2. rollout     sample K completions each, with old_logp           run_episodes: engine.generate
    3. reward      score every completion                             run_episodes: reward(batch)
    4. reference   ref_logp from the frozen model (if the loss uses it) reference(batch)
                   (and values from the critic, if the algorithm has one;
                   and, under a rollout correction, the proximal old_logp) trainer.logprobs(batch)
    5. advantages  the algorithm's estimator                          algo.compute_advantages
    6. train       the optimizer step(s) on the algorithm's loss      trainer.step(batch, algo.compute_loss)
    7. sync        fresh weights to the rollout engine                weight_sync.sync()

It holds no algorithm logic: it only calls the roles in order, times each one, and gathers metrics.
Each role also gets its memory peak (`mem/peak_<role>`, MiB: CUDA's max_memory_allocated on a GPU, the
process's peak RSS on the CPU, reset as the role starts), `gpu/util` on CUDA, and an NVTX range named
after it (rlpost/devices.py). Async, rollout and reward run in another thread and get no memory peak.
One rule is generic: when compute_advantages returns fewer groups than were sampled (an algorithm
that filters, such as DAPO's dynamic sampling), steps 1-5 repeat on new prompts until the batch has
`prompts_per_step` groups or `max_refill_rounds` extra rounds are spent.

Its state (`state_dict`) is the prompt sampler's position and the algorithm's own state; the engine's
seed of each step is a function of (seed, step, round), so a resumed run samples what it would have.

Topologies (`rl.topology`) change where steps 2-3 run, never the order of the seven steps:

    colocated      the engine is in this process (it may share the trainer's module)
    disaggregated  the engine is Ray actors (rlpost/rollout/ray_engine.py); same loop, same order
    async          steps 2-3 run in a background thread (rlpost/rollout/pipeline.py), `max_staleness`
                   steps ahead: step t's prompts are submitted at the start of step t - S, before the
                   weights of step t - S are pushed, so step t samples with version t - S - 1 exactly.
                   S = 0 is the synchronous loop; a batch's staleness (trainer version - its
                   policy_version) is logged and never exceeds S.

Sharded (`shard=(rank, world)`, trainer.strategy=fsdp2): every rank's sampler walks the same order, and
rank r takes every world-th of the step's prompts from r (its own engine seed); its groups never straddle
ranks. The refill rule counts the groups of all ranks, and the step's metrics are combined over ranks
(rlpost.distributed.reduce_metrics), so every rank logs the same line. Both are no-ops in one process.
"""

from __future__ import annotations

import random
import time
from contextlib import contextmanager

import torch

from rlpost import distributed as dist
from rlpost.algorithms.base import Algorithm
from rlpost.batch import Batch
from rlpost.devices import RoleProbe
from rlpost.reference import Reference
from rlpost.env.reward import Reward
from rlpost.rollout import Engine, SamplingParams
from rlpost.rollout.episodes import run_episodes
from rlpost.rollout.pipeline import RolloutPipeline
from rlpost.trainer import Trainer
from rlpost.weight_sync import WeightSync

ROLES = ("rollout", "reward", "reference", "critic", "advantages", "train", "sync")
# every role's seconds and share of the step; "other" is the step's wall-clock not inside any role
# (prompt picking, concatenating refill rounds, gathering metrics), so the shares sum to 1
TIMED = (*ROLES, "other")


class PromptSampler:
    """Walks the prompt set in seeded random order, reshuffling at each epoch."""

    def __init__(self, n: int, seed: int):
        self.n, self.rng, self.order = n, random.Random(seed), []

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate(), "order": list(self.order)}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(state["rng"])
        self.order = list(state["order"])

    def next(self, count: int) -> list[int]:
        out = []
        while len(out) < count:
            if not self.order:
                self.order = list(range(self.n))
                self.rng.shuffle(self.order)
            out.append(self.order.pop())
        return out


class Controller:
    def __init__(self, *, rows: list[dict], prompt_ids: list[list[int]], engine: Engine, reward: Reward,
                 reference: Reference | None, algorithm: Algorithm, trainer: Trainer, weight_sync: WeightSync,
                 params: SamplingParams, prompts_per_step: int, k: int, seed: int = 0, critic=None,
                 max_refill_rounds: int = 0, pipeline: RolloutPipeline | None = None, max_staleness: int = 0,
                 steps: int | None = None, shard: tuple[int, int] = (0, 1)):
        """`pipeline`: run rollouts ahead (async) by up to `max_staleness` steps, never past step `steps`."""
        if algorithm.uses_reference and reference is None:
            raise ValueError(f"algorithm '{algorithm.name}' reads ref_logp but no reference was given")
        if algorithm.uses_critic and critic is None:
            raise ValueError(f"algorithm '{algorithm.name}' needs a critic but none was given")
        self.rows, self.prompt_ids = rows, prompt_ids
        self.engine, self.reward, self.reference, self.critic = engine, reward, reference, critic
        self.algorithm, self.trainer, self.weight_sync = algorithm, trainer, weight_sync
        self.params, self.prompts_per_step, self.k, self.seed = params, prompts_per_step, k, seed
        self.max_refill_rounds, self.shard = max_refill_rounds, shard
        self.sampler = PromptSampler(len(rows), seed)
        self.times: dict[str, float] = {}
        try:  # the trainer's device is where the roles' tensors live (a test's stand-in trainer may have none)
            device = trainer.device
        except AttributeError:
            device = torch.device("cpu")
        self.probe = RoleProbe(device)
        if pipeline is not None and steps is None:
            raise ValueError("an async Controller needs `steps` (it never samples past the last step)")
        self.pipeline, self.max_staleness, self.steps = pipeline, max_staleness, steps
        self.submitted = 0  # async: the last step whose rollouts were submitted

    def state_dict(self) -> dict:
        """The sampler, the algorithm, and (async) the rollouts already made for coming steps: they were
        sampled with older weights than a resumed run could reproduce, so they are saved as data."""
        state = {"sampler": self.sampler.state_dict(), "algorithm": self.algorithm.state_dict()}
        if self.pipeline is not None:
            state["ahead"] = {"submitted": self.submitted, "results": self.pipeline.drain()}
        return state

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.algorithm.load_state_dict(state["algorithm"])
        if self.pipeline is not None and "ahead" in state:
            self.submitted = state["ahead"]["submitted"]
            self.pipeline.restore(state["ahead"]["results"])

    @contextmanager
    def timed(self, role: str):
        """Add the block's seconds to `role`'s time; under torch.profiler the block is a range named `role`
        (record_function costs microseconds when no profiler runs)."""
        t0 = time.perf_counter()
        with torch.profiler.record_function(role), self.probe.role(role):
            yield
        self.times[role] = self.times.get(role, 0.0) + time.perf_counter() - t0

    def collect(self, step: int, n_prompts: int, round_: int) -> tuple[Batch, Batch, dict[str, float]]:
        """Steps 1-5 for `n_prompts` new prompts: (scored batch, batch with advantages, reward metrics)."""
        # 1. prompts, 2. rollout and 3. reward
        if self.pipeline is None:
            t0 = time.perf_counter()
            rank, world = self.shard
            # this rank's share (all of them in one process); at least one prompt per rank
            idx = self.sampler.next(max(n_prompts, world))[rank::world]
            batch, reward_metrics = run_episodes(self.engine, self.reward, [self.rows[i] for i in idx],
                                                 [self.prompt_ids[i] for i in idx], self.k, self.params,
                                                 seed=self.episode_seed(step, round_), probe=self.probe)
            reward_metrics["time/rollout_wait"] = time.perf_counter() - t0
        else:
            if round_ == 0:  # keep `max_staleness` steps submitted ahead of this one
                while self.submitted < min(step + self.max_staleness, self.steps):
                    self.submit(self.submitted + 1, 0, self.prompts_per_step)
            else:            # a refill round: after what is already queued, with the newest weights pushed
                self.submit((step, round_), round_, n_prompts)
            batch, reward_metrics = self.pipeline.result(step if round_ == 0 else (step, round_))
        for role in ("rollout", "reward", "rollout_wait"):
            self.times[role] = self.times.get(role, 0.0) + reward_metrics.pop(f"time/{role}")
        stale = (self.weight_sync.version - batch.policy_version).float()
        self.staleness.append(stale)
        if self.pipeline is not None and float(stale.max()) > self.max_staleness:
            raise RuntimeError(f"a batch is {int(stale.max())} versions stale, more than rl.max_staleness="
                               f"{self.max_staleness}: the rollout pipeline lost its order")
        # 4. reference (and critic values); a role that does not run gets no memory peak (and 0 seconds)
        if self.algorithm.uses_reference:
            with self.timed("reference"):
                batch = self.reference(batch)
        if self.critic is not None:
            with self.timed("critic"), torch.no_grad():
                batch = batch.replace(values=self.critic(batch))
        if self.algorithm.needs_proximal_logp:  # importance-sampling correction: old_logp becomes the proximal's
            with self.timed("reference"):
                batch = batch.replace(rollout_logp=batch.old_logp, old_logp=self.trainer.logprobs(batch))
        # 5. advantages
        with self.timed("advantages"):
            trained = self.algorithm.compute_advantages(batch)
        return batch, trained, reward_metrics

    def episode_seed(self, step: int, round_: int) -> int:
        """The engine seed of a step's round (a sharded rank's own: each rank samples other tokens)."""
        rank, world = self.shard
        return ((self.seed * 1_000_003 + step) * 101 + round_) * world + rank

    def submit(self, key, round_: int, n_prompts: int) -> None:
        """Async: draw the prompts of `key` (a step, or (step, round)) now and queue their rollouts."""
        step = key if round_ == 0 else key[0]
        idx = self.sampler.next(n_prompts)
        self.pipeline.submit(key, [self.rows[i] for i in idx], [self.prompt_ids[i] for i in idx],
                             self.episode_seed(step, round_))
        if round_ == 0:
            self.submitted = key

    def step(self, step: int) -> dict[str, float]:
        t_step = time.perf_counter()
        self.times, self.staleness = {}, []
        self.probe.clear()
        sampled, kept, reward_metrics = [], [], {}
        groups = 0
        for round_ in range(self.max_refill_rounds + 1):
            before = groups
            scored, trained, m = self.collect(step, self.prompts_per_step - groups, round_)
            offset = round_ * self.prompts_per_step  # group ids stay unique across rounds
            sampled.append(scored.replace(group_ids=scored.group_ids + offset))
            if len(trained):
                kept.append(trained.replace(group_ids=trained.group_ids + offset))
                groups += int(torch.unique(trained.group_ids).numel())
            if self.shard[1] > 1:  # every rank's groups: all ranks agree on the refill, samplers stay in step
                groups = int(dist.reduce_sum(groups - before)) + before
            reward_metrics = {k: reward_metrics.get(k, 0.0) + v for k, v in m.items()}
            if groups >= self.prompts_per_step:
                break
        batch = Batch.concat(kept) if kept else None
        # 6. train
        with self.timed("train"):
            train_metrics = self.trainer.step(batch, self.algorithm.compute_loss)  # None: skipped_empty
        # 7. sync
        with self.timed("sync"):
            sync_metrics = self.weight_sync.sync()

        all_sampled = Batch.concat(sampled) if len(sampled) > 1 else sampled[0]
        self.sampled = all_sampled  # every sample of this step, scored (the RL stage keeps some in rollouts.jsonl)
        metrics = {**rollout_metrics(all_sampled), **advantage_metrics(batch), **reward_metrics, **train_metrics,
                   **sync_metrics, "rollout/refill_rounds": float(len(sampled) - 1),
                   "rollout/trained_groups": float(groups)}
        stale = torch.cat(self.staleness)
        metrics["rollout/staleness_mean"], metrics["rollout/staleness_max"] = float(stale.mean()), float(stale.max())
        # this thread's seconds: every role but rollout and reward, which it waited for (colocated: ran itself);
        # async, rollout and reward ran in the rollout thread, overlapping the rest, so shares may sum past 1
        wall = time.perf_counter() - t_step
        waited = self.times.get("rollout_wait", 0.0)
        if self.pipeline is None:
            here = sum(self.times.get(role, 0.0) for role in ROLES)
        else:
            here = waited + sum(self.times.get(role, 0.0) for role in ROLES if role not in ("rollout", "reward"))
        self.times["other"] = max(wall - here, 0.0)
        total = here + self.times["other"]  # = wall (up to clock rounding)
        tokens = all_sampled.num_response_tokens
        metrics["rollout/tokens_per_s"] = tokens / max(self.times["rollout"], 1e-9)  # generation speed
        metrics["step/tokens_per_s"] = tokens / max(total, 1e-9)                    # end to end, all roles
        for role in TIMED:
            metrics[f"time/{role}"] = self.times.get(role, 0.0)
            metrics[f"time_share/{role}"] = self.times.get(role, 0.0) / max(total, 1e-9)
        metrics["time/rollout_wait"] = waited
        metrics["time/step"] = total
        metrics.update(self.probe.metrics())
        for key in ("rollout/logp_mismatch_max", "rollout/logp_mismatch_mean"):  # every line has them:
            metrics.setdefault(key, float("nan"))  # NaN (null in metrics.jsonl) when no update measured it
        return dist.reduce_metrics(metrics) if self.shard[1] > 1 else metrics


@torch.no_grad()
def rollout_metrics(batch: Batch) -> dict[str, float]:
    """Reward, length and group statistics of everything sampled this step (algorithm-independent)."""
    r = batch.rewards.float()
    if r.dim() == 2:
        r = r.sum(1)
    lengths = batch.response_mask.sum(1).float()
    _, inverse = torch.unique(batch.group_ids, return_inverse=True)
    groups = int(inverse.max()) + 1
    g_max = torch.full((groups,), -float("inf"), device=r.device).scatter_reduce(0, inverse, r, "amax")
    g_min = torch.full((groups,), float("inf"), device=r.device).scatter_reduce(0, inverse, r, "amin")
    return {
        "reward/mean": float(r.mean()),
        "reward/std": float(r.std()) if len(r) > 1 else 0.0,
        "rollout/response_len_mean": float(lengths.mean()),
        "rollout/response_len_max": float(lengths.max()),
        # cut by max_new_tokens, or (an environment's episode) by the token budget
        "rollout/truncated_frac": sum(f in ("length", "budget") for f in batch.meta["finish_reason"]) / len(batch),
        "rollout/degenerate_group_frac": float((g_max == g_min).float().mean()),
        # a learned reward (rlpost/reward_model.py) also scores each sample with the verifier, when there is one
        **({"reward/gold_mean": sum(batch.meta["gold_reward"]) / len(batch)} if "gold_reward" in batch.meta else {}),
    }


@torch.no_grad()
def advantage_metrics(batch: Batch | None) -> dict[str, float]:
    if batch is None or batch.advantages is None:
        return {}
    adv = batch.advantages[batch.response_mask.bool()]
    return {"advantage/mean": float(adv.mean()) if adv.numel() else 0.0,
            "advantage/std": float(adv.std()) if adv.numel() > 1 else 0.0}
