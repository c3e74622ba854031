"""rl.*: the RL stage's steps, checkpoints, and where its roles run (topology, weight sync)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rlpost.schema import ConfigError, Section, at_least, opt


@dataclass
class RLConfig(Section):
    steps: int = opt(150, "RL steps (each: rollout, reward, reference, advantages, train, sync)",
                     at_least(0, "0: no RL stage"))
    eval_every: int = opt(50, "held-out pass@1 every this many steps (0: only at the end)",
                          at_least(0, "0: only at the end"))
    save_every: int = opt(50, "write a resumable checkpoint checkpoints/step_<n> every this many steps (0: only "
                              "checkpoints/final at the end)", at_least(0, "0: only checkpoints/final"))
    keep_best: bool = opt(False, "with rl.eval_every: keep the policy with the best held-out pass@1 measured during "
                                 "RL as checkpoints/best (a model folder, rewritten when a new best appears)")
    keep_checkpoints: int = opt(2, "keep the newest this many step checkpoints (0: all)", at_least(0, "0: keep all"))
    weight_sync: str = opt("auto", "the transport of weights to Ray rollout workers (disaggregated/async): 'auto' "
                                   "(ray) | 'ray' (Ray object store) | 'collective' (torch.distributed broadcast); "
                                   "colocated, how they land is the engine's ('auto'), with the aliases 'pointer' "
                                   "(shared module) | 'vllm' (rollout.engine=vllm) | 'copy' (the engine's own copy)",
                           choices="rlpost.loops:WEIGHT_SYNCS")
    topology: str = opt("colocated", "where the roles run: 'colocated' (one process, taking turns) | 'disaggregated' "
                                     "(rollout in rl.rollout_workers Ray actors) | 'async' (as disaggregated, rollout "
                                     "runs up to rl.max_staleness steps ahead of training)",
                         choices="rlpost.loops:TOPOLOGIES")
    rollout_workers: int = opt(1, "disaggregated/async: Ray actors that generate (each its own engine and weights)",
                               at_least(1))
    max_staleness: int = opt(1, "async: rollouts run this many policy versions ahead at most (0: synchronous)",
                             at_least(0, "0: synchronous"))
    max_worker_restarts: int = opt(3, "disaggregated/async: restarts of dead rollout workers before the run stops",
                                   at_least(0, "0: a dead worker stops the run"))
    recycle_every: int = opt(0, "set aside the prompts whose K samples were all right or all wrong (no signal for "
                                "GRPO) and return them to the pool every this many steps; logs data/set_aside, "
                                "data/recycled and the p(1-p) histogram data/pq_hist_<i> (0: off, every prompt "
                                "stays in the pool)", at_least(0, "0: off"))
    reward: dict[str, Any] = opt({"name": "verifier"}, "the RL reward's source and its options: verifier | "
                                                       "reward_model | teacher | prm (e.g. {name: teacher, teacher: "
                                                       "runs/x/checkpoints/final}; distill.teacher, prm.path and a "
                                                       "reward_model stage are aliases)")

    def check(self, prefix: str) -> None:
        # the evaluations during RL fall on the multiples of eval_every below steps (the last step's is the
        # final evaluation, after RL): eval_every=0, or >= steps, runs none, and keep_best would keep nothing
        if self.keep_best and self.steps > 0 and not 0 < self.eval_every < self.steps:
            raise ConfigError(f"{prefix}keep_best keeps the best of the held-out evaluations during RL, and "
                              f"{prefix}eval_every={self.eval_every} runs none (they run at the multiples of "
                              f"{prefix}eval_every below {prefix}steps={self.steps}): set {prefix}eval_every=N "
                              f"(0 < N < {self.steps})")
