"""rl.topology=colocated: every role in this process, taking turns; the engine may share the trainer's module.

rl.weight_sync here says how the in-process engine holds the weights (nothing travels between processes):
'auto' is the engine's own way (it shares the trainer's module, "pointer"; a vLLM engine holds its own, "vllm";
under trainer.strategy=fsdp2 each rank's engine holds a full copy, "copy"). 'pointer', 'copy' and 'vllm' are
kept as aliases: 'pointer' and 'vllm' name what auto picks for a native/hf or a vLLM engine, 'copy' makes a
native/hf engine hold its own copy of the weights.
"""

from __future__ import annotations

import time

from rlpost.loops.base import LOOPS, Loop
from rlpost.rollout import build_engine
from rlpost.rollout.episodes import run_episodes

RAY_TRANSPORTS = ("ray", "collective")


@LOOPS.register("colocated")
class ColocatedLoop(Loop):
    """The run's own engine, here; steps 1-3 run in this thread, in turn with the other roles."""

    description = "one process, the roles taking turns"
    weight_syncs = ("auto", "pointer", "copy", "vllm")

    @classmethod
    def check(cls, cfg, has_rl: bool) -> None:
        ws, engine = cfg.rl.weight_sync, cfg.rollout.engine
        if ws in RAY_TRANSPORTS:
            raise ValueError(f"rl.weight_sync={ws} moves weights to Ray rollout workers; it needs "
                             "rl.topology=disaggregated or async")
        if ws != "auto" and (engine == "vllm") != (ws == "vllm"):
            raise ValueError("rollout.engine=vllm and rl.weight_sync=vllm go together (vLLM holds its own copy of the "
                             f"weights); got rollout.engine={engine}, rl.weight_sync={ws}")
        if has_rl and cfg.trainer.strategy == "fsdp2" and ws not in ("auto", "copy"):
            raise ValueError(f"trainer.strategy=fsdp2 needs rl.weight_sync=copy or auto (each rank's engine keeps a "
                             f"full copy, refreshed from the gathered weights), not {ws!r}")

    @classmethod
    def run_engine(cls, cfg, model, tokenizer):
        ws = cfg.rl.weight_sync
        share = ws == "pointer" or (ws == "auto" and cfg.trainer.strategy != "fsdp2")
        return build_engine(cfg.rollout.engine, model, tokenizer, share_weights=share, dtype=cfg.rollout.dtype,
                            vllm_sleep=cfg.rollout.vllm_sleep,
                            vllm_gpu_memory_utilization=cfg.rollout.vllm_gpu_memory_utilization)

    def place(self, ctx, params):
        """The run's own engine and weight sync."""
        return ctx.engine, ctx.weight_sync

    def collect(self, ctl, step: int, n_prompts: int, round_: int):
        t0 = time.perf_counter()
        rank, world = ctl.shard
        # this rank's share (all of them in one process); at least one prompt per rank
        idx = ctl.sampler.next(max(n_prompts, world))[rank::world]
        batch, metrics = run_episodes(ctl.roles.engine, ctl.roles.reward, [ctl.rows[i] for i in idx],
                                      [ctl.prompt_ids[i] for i in idx], ctl.rollout.k, ctl.params,
                                      seed=ctl.episode_seed(step, round_), probe=ctl.probe)
        metrics["time/rollout_wait"] = time.perf_counter() - t0
        return batch, metrics
