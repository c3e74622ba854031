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

Topologies (`rl.topology`) are loops (rlpost/loops/): the loop says where steps 1-3 run and collects a
round's scored batch (colocated: here; disaggregated: in Ray actors; async: in a background thread, steps
ahead); the controller runs the seven steps in the same order whatever the loop.

Sharded (`shard=(rank, world)`, trainer.strategy=fsdp2): every rank's sampler walks the same order, and
rank r takes every world-th of the step's prompts from r (its own engine seed); its groups never straddle
ranks. The refill rule counts the groups of all ranks, and the step's metrics are combined over ranks
(rlpost.distributed.reduce_metrics), so every rank logs the same line. Both are no-ops in one process.
Between the last round's rollout and the sync each rank's engine frees its copy of the weights
(WeightSync.release: colocated, a sharded policy), so the training runs beside no full copy.
"""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from rlpost import distributed as dist
from rlpost.algorithms.base import Algorithm
from rlpost.batch import Batch
from rlpost.config import RLConfig, RolloutConfig
from rlpost.critic import Critic
from rlpost.devices import RoleProbe
from rlpost.loops import Loop, loop_class
from rlpost.prompts import SOURCE_KEY, MixtureSampler, PromptSampler, Recycler  # noqa: F401 - PromptSampler: its old home
from rlpost.reference import Reference
from rlpost.env.per_source import combine_metrics
from rlpost.env.reward import Reward, verifier_metrics
from rlpost.rollout import Engine, SamplingParams
from rlpost.trainer import Trainer
from rlpost.weight_sync import WeightSync

ROLES = ("rollout", "reward", "reference", "critic", "advantages", "train", "sync")
# every role's seconds and share of the step; "other" is the step's wall-clock not inside any role
# (prompt picking, concatenating refill rounds, gathering metrics), so the shares sum to 1
TIMED = (*ROLES, "other")


class RoleOutOfMemoryError(torch.OutOfMemoryError):
    """Memory ran out inside one role of an RL step: the message names the role and the step and what to change.
    A torch.OutOfMemoryError still (the run's own handler keeps the weights in checkpoints/last)."""


def out_of_memory(e: BaseException) -> bool:
    """Whether `e` is the allocator running out: CUDA's OutOfMemoryError, Python's MemoryError, or the CPU
    allocator's RuntimeError."""
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


@dataclass
class Roles:
    """The roles one RL step calls. `reference` only when the algorithm reads ref_logp, `critic` only when it
    has one (PPO); `weight_sync` pushes to the engine (or to what the loop put in front of it)."""

    engine: Engine
    reward: Reward
    algorithm: Algorithm
    trainer: Trainer
    weight_sync: WeightSync
    reference: Reference | None = None
    critic: Critic | None = None


class Controller:
    def __init__(self, roles: Roles, cfg: RLConfig, params: SamplingParams, rollout: RolloutConfig, *,
                 rows: list[dict], prompt_ids: list[list[int]], seed: int = 0, loop: Loop | None = None,
                 shard: tuple[int, int] = (0, 1), mixture: list[tuple[str, float, int]] | None = None):
        """`rollout`: prompts_per_step, k, max_refill_rounds; `loop`: the topology's loop, placed (None: the one
        `cfg.topology` names, for a loop that needs no placement); `shard`: (rank, world) under fsdp2;
        `mixture`: task.sources as (name, weight, rows) in the order of `rows` (None: one prompt set)."""
        algorithm = roles.algorithm
        if algorithm.uses_reference and roles.reference is None:
            raise ValueError(f"algorithm '{algorithm.name}' reads ref_logp but no reference was given")
        if algorithm.uses_critic and roles.critic is None:
            raise ValueError(f"algorithm '{algorithm.name}' needs a critic but none was given")
        self.roles, self.cfg, self.params, self.rollout = roles, cfg, params, rollout
        self.rows, self.prompt_ids, self.seed, self.shard = rows, prompt_ids, seed, shard
        self.loop = loop if loop is not None else loop_class(cfg.topology)(cfg, rollout)
        self.mixture = mixture
        if mixture:
            held = sum(n for _, _, n in mixture)
            if held != len(rows):
                raise ValueError(f"the mixture's sources hold {held} rows, the controller was given {len(rows)}: "
                                 "give it the mixed task's train_rows")
            starts = [sum(n for _, _, n in mixture[:i]) for i in range(len(mixture))]
            self.sampler = MixtureSampler([(s, n) for s, (_, _, n) in zip(starts, mixture)],
                                          [w for _, w, _ in mixture], seed)
        else:
            self.sampler = PromptSampler(len(rows), seed)
        self.recycler = None
        if cfg.recycle_every:  # the draws skip the prompts set aside (rlpost/prompts.py)
            self.sampler = self.recycler = Recycler(self.sampler, rows, cfg.recycle_every)
            epoch = len(rows) / max(rollout.prompts_per_step, 1)  # steps before a prompt comes round again
            if cfg.recycle_every < epoch:
                warnings.warn(f"rl.recycle_every={cfg.recycle_every} is shorter than an epoch ({len(rows)} prompts at "
                              f"{rollout.prompts_per_step} a step: {epoch:.0f} steps): a prompt is drawn once an "
                              "epoch, so most set-aside prompts return before they would be drawn again and little "
                              "is skipped; raise it above an epoch", stacklevel=2)
        self.times: dict[str, float] = {}
        try:  # the trainer's device is where the roles' tensors live (a test's stand-in trainer may have none)
            device = roles.trainer.device
        except AttributeError:
            device = torch.device("cpu")
        self.probe = RoleProbe(device)
        self.current_step = 0

    def state_dict(self) -> dict:
        """The sampler, the algorithm, and what the loop keeps (async: the rollouts already made for coming
        steps, saved as data)."""
        return {"sampler": self.sampler.state_dict(), "algorithm": self.roles.algorithm.state_dict(),
                **self.loop.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.roles.algorithm.load_state_dict(state["algorithm"])
        self.loop.load_state_dict(state)

    @contextmanager
    def timed(self, role: str):
        """Add the block's seconds to `role`'s time; under torch.profiler the block is a range named `role`
        (record_function costs microseconds when no profiler runs)."""
        t0 = time.perf_counter()
        try:
            with torch.profiler.record_function(role), self.probe.role(role):
                yield
        except Exception as e:
            if out_of_memory(e) and not isinstance(e, RoleOutOfMemoryError):
                raise RoleOutOfMemoryError(
                    f"out of memory in role '{role}' at RL step {self.current_step}: {type(e).__name__}: {e}\n"
                    f"The policy's weights are kept in checkpoints/last and the newest step checkpoint stays: "
                    f"`rlpost train --resume RUN` continues from it once the memory is there, and with less "
                    f"memory given layout keys, e.g. `rlpost train --resume RUN trainer.micro_batch_size=N`: "
                    f"trainer.micro_batch_size, trainer.micro_batch_tokens or trainer.gradient_checkpointing=true "
                    f"(reference, train, critic) and rollout.max_num_seqs (rollout) lower it. `rlpost plan "
                    f"memory` with this config says what each role holds") from e
            raise
        self.times[role] = self.times.get(role, 0.0) + time.perf_counter() - t0

    def collect(self, step: int, n_prompts: int, round_: int) -> tuple[Batch, Batch, dict[str, float]]:
        """Steps 1-5 for `n_prompts` new prompts: (scored batch, batch with advantages, reward metrics)."""
        r = self.roles
        # 1. prompts, 2. rollout and 3. reward: where the loop runs them
        batch, reward_metrics = self.loop.collect(self, step, n_prompts, round_)
        for role in ("rollout", "reward", "rollout_wait"):
            self.times[role] = self.times.get(role, 0.0) + reward_metrics.pop(f"time/{role}")
        self.staleness.append((r.weight_sync.version - batch.policy_version).float())
        # 4. reference (and critic values); a role that does not run gets no memory peak (and 0 seconds)
        if r.algorithm.uses_reference:
            with self.timed("reference"):
                batch = r.reference(batch)
        if r.critic is not None:
            with self.timed("critic"), torch.no_grad():
                batch = batch.replace(values=r.critic(batch))
        # importance-sampling correction, or an engine whose log-probs are a truncated distribution's (it sets
        # rollout_logp: vLLM with top-k / top-p): old_logp becomes the proximal's, the trainer's own
        if r.algorithm.needs_proximal_logp or batch.rollout_logp is not None:
            with self.timed("reference"):
                behaviour = batch.rollout_logp if batch.rollout_logp is not None else batch.old_logp
                batch = batch.replace(rollout_logp=behaviour, old_logp=r.trainer.logprobs(batch))
        # 5. advantages
        with self.timed("advantages"):
            trained = r.algorithm.compute_advantages(batch)
        return batch, trained, reward_metrics

    def episode_seed(self, step: int, round_: int) -> int:
        """The engine seed of a step's round (a sharded rank's own: each rank samples other tokens), below 2**63: a
        torch generator takes 64-bit seeds, and the engine may add small offsets (an episode's turn) to it."""
        rank, world = self.shard
        return (((self.seed * 1_000_003 + step) * 101 + round_) * world + rank) % 2**63

    def step(self, step: int) -> dict[str, float]:
        t_step = time.perf_counter()
        self.current_step = step  # named by an out-of-memory error in one of the step's roles
        self.times, self.staleness = {}, []
        self.probe.clear()
        sampled, kept, rounds = [], [], []  # rounds: each round's reward metrics and its samples
        groups, wanted, rates = 0, self.rollout.prompts_per_step, []
        if self.recycler is not None:
            self.recycler.start_step(step)
        for round_ in range(self.rollout.max_refill_rounds + 1):
            before = groups
            scored, trained, m = self.collect(step, wanted - groups, round_)
            if self.recycler is not None:
                rates += self.recycler.observe(scored)
            offset = round_ * wanted  # group ids stay unique across rounds
            sampled.append(scored.replace(group_ids=scored.group_ids + offset))
            if len(trained):
                kept.append(trained.replace(group_ids=trained.group_ids + offset))
                groups += int(torch.unique(trained.group_ids).numel())
            if self.shard[1] > 1:  # every rank's groups: all ranks agree on the refill, samplers stay in step
                groups = int(dist.reduce_sum(groups - before)) + before
            rounds.append((m, len(scored)))
            if groups >= wanted:
                break
        batch = Batch.concat(kept) if kept else None
        # means over all the rounds' samples, counters summed, the verifier's running totals as they are now
        fn = getattr(self.roles.reward, "fn", None) if len(rounds) > 1 else None
        reward_metrics = combine_metrics(rounds, latest=set(verifier_metrics(fn)) if fn is not None else set())
        if not self.loop.elsewhere:  # the engine idles until the sync: a sharded run's engine frees its copy
            self.roles.weight_sync.release()
        # 6. train
        with self.timed("train"):
            train_metrics = self.roles.trainer.step(batch, self.roles.algorithm.compute_loss)  # None: skipped_empty
        # 7. sync
        with self.timed("sync"):
            sync_metrics = self.roles.weight_sync.sync()

        all_sampled = Batch.concat(sampled) if len(sampled) > 1 else sampled[0]
        self.sampled = all_sampled  # every sample of this step, scored (the RL stage keeps some in rollouts.jsonl)
        metrics = {**rollout_metrics(all_sampled), **advantage_metrics(batch), **reward_metrics, **train_metrics,
                   **sync_metrics, "rollout/refill_rounds": float(len(sampled) - 1),
                   "rollout/trained_groups": float(groups)}
        stale = torch.cat(self.staleness)
        metrics["rollout/staleness_mean"], metrics["rollout/staleness_max"] = float(stale.mean()), float(stale.max())
        # this thread's seconds: every role it ran, and the wait for those the loop ran elsewhere (async: rollout
        # and reward ran in the rollout thread, overlapping the rest, so shares may sum past 1)
        wall = time.perf_counter() - t_step
        waited = self.times.get("rollout_wait", 0.0)
        here = sum(self.times.get(role, 0.0) for role in ROLES if role not in self.loop.elsewhere)
        if self.loop.elsewhere:
            here = waited + here
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
        if self.recycler is not None:
            metrics.update(self.recycler.metrics(rates))
        if self.mixture:
            metrics.update(source_metrics(all_sampled, [name for name, _, _ in self.mixture]))
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
        # a learned reward (rlpost/env/reward_model.py) also scores each sample with the verifier, when there is one
        **({"reward/gold_mean": sum(batch.meta["gold_reward"]) / len(batch)} if "gold_reward" in batch.meta else {}),
    }


@torch.no_grad()
def source_metrics(batch: Batch, names: list[str]) -> dict[str, float]:
    """reward/<source>: the mean reward of this step's samples of each task.sources entry (NaN, null in
    metrics.jsonl, for a source with no sample this step). Sharded, over every rank's samples: a rank's share of
    the step's prompts need not hold each source, nor in the same proportion as another rank's."""
    r = batch.rewards.float()
    r = r.sum(1) if r.dim() == 2 else r
    of = [row.get(SOURCE_KEY) for row in batch.meta["row"]]
    totals = {}
    for name in names:
        mine = [float(r[i]) for i, s in enumerate(of) if s == name]
        totals[f"sum/{name}"], totals[f"n/{name}"] = sum(mine), float(len(mine))
    totals = dist.reduce_dict(totals, "sum")  # every rank passes the same keys; one rank: as it is
    return {f"reward/{name}": totals[f"sum/{name}"] / totals[f"n/{name}"] if totals[f"n/{name}"] else float("nan")
            for name in names}


@torch.no_grad()
def advantage_metrics(batch: Batch | None) -> dict[str, float]:
    """advantage/mean and /std over the step batch's response tokens; with a critic's rollout-time values and
    returns, value/explained_variance, 1 - Var(R - V) / Var(R), over the whole batch (not per micro-batch, whose
    average would change with the trainer's micro-batch layout)."""
    if batch is None or batch.advantages is None:
        return {}
    mask = batch.response_mask.bool()
    adv = batch.advantages[mask]
    out = {"advantage/mean": float(adv.mean()) if adv.numel() else 0.0,
           "advantage/std": float(adv.std()) if adv.numel() > 1 else 0.0}
    if batch.values is not None and batch.returns is not None:
        ret = batch.returns.float()[mask]
        var_ret = float(ret.var(unbiased=False)) if ret.numel() else 0.0
        var_res = float((ret - batch.values.float()[mask]).var(unbiased=False)) if ret.numel() else 0.0
        out["value/explained_variance"] = 1.0 - var_res / var_ret if var_ret > 0 else 0.0
    return out
