"""rl.topology=disaggregated: the rollout runs in `rl.rollout_workers` Ray actors (rlpost/rollout/ray_engine.py),
each with its own engine and copy of the weights; the loop is the colocated one, in the same order.

rl.weight_sync is the transport to the workers: 'ray' (the object store), 'collective' (a torch.distributed
broadcast), or 'auto' (ray). Ray is started locally on 127.0.0.1 or joined through RAY_ADDRESS (rlpost/cluster.py).
"""

from __future__ import annotations

import torch

from rlpost.cluster import RayCluster
from rlpost.loops.base import LOOPS
from rlpost.loops.colocated import ColocatedLoop
from rlpost.rollout import build_engine
from rlpost.rollout.ray_engine import RayEngine
from rlpost.weight_sync import WeightSync


@LOOPS.register("disaggregated")
class DisaggregatedLoop(ColocatedLoop):
    """The colocated loop over a RayEngine: the same steps in the same order, generation in the workers."""

    description = "rollout in rl.rollout_workers Ray actors"
    weight_syncs = ("auto", "ray", "collective")

    @classmethod
    def check(cls, cfg, has_rl: bool) -> None:
        if cfg.rl.weight_sync not in cls.weight_syncs:
            raise ValueError(f"rl.topology={cfg.rl.topology} sends weights to its rollout workers with rl.weight_sync "
                             f"= {' | '.join(cls.weight_syncs)}, not {cfg.rl.weight_sync!r}")
        if has_rl and cfg.trainer.strategy == "fsdp2":
            raise ValueError(f"trainer.strategy=fsdp2 rolls out on every rank (rl.topology=colocated); "
                             f"rl.topology={cfg.rl.topology} with sharded training is not supported yet")

    @classmethod
    def run_engine(cls, cfg, model, tokenizer):
        """RL rolls out in the workers (`place` starts them); evaluation samples here, sharing the module."""
        kind = "auto" if cfg.rollout.engine == "vllm" else cfg.rollout.engine
        return build_engine(kind, model, tokenizer, share_weights=True, dtype=cfg.rollout.dtype)

    def place(self, ctx, params):
        """Start Ray (or join RAY_ADDRESS) and the workers; the weight sync pushes to `weights_target`."""
        c = self.cfg
        self.cluster = RayCluster(min_cpus=c.rollout_workers).__enter__()
        transport = "ray" if c.weight_sync == "auto" else c.weight_sync
        # the workers use this process's thread count, so one worker samples exactly what colocated would
        self.engine = RayEngine(ctx.model, ctx.tokenizer, kind=self.rollout.engine, workers=c.rollout_workers,
                                threads=torch.get_num_threads(), mode=transport, max_restarts=c.max_worker_restarts,
                                dtype=self.rollout.dtype)
        where = "local, 127.0.0.1" if self.cluster.address == "local" else self.cluster.address or "given"
        print(f"rlpost: rl.topology={c.topology}: {c.rollout_workers} rollout worker(s) in Ray ({where}), "
              f"weight sync {transport}{self.placement_note()}")
        return self.engine, WeightSync(ctx.model, self.weights_target(ctx, params))

    def placement_note(self) -> str:
        """What the placement line adds for this topology."""
        return ""

    def weights_target(self, ctx, params):
        """Where the weight sync pushes: the workers."""
        return self.engine

    def close(self) -> None:
        for name in ("pipeline", "engine", "cluster"):
            part = self.__dict__.pop(name, None)
            if part is not None:
                part.close()
