"""WEIGHT SYNC: move the trainer's fresh weights to the rollout engine, and version them.

Ordering contract, one RL step:

    metrics = trainer.step(batch, algo.compute_loss)   # 1. the optimizer step finishes
    sync.sync()                                        # 2. push: engine gets the new weights, version += 1
    batch = engine.generate(...)                       # 3. the next rollout samples with them

Colocated modes: "pointer" (the engine holds the trainer's own module: nothing moves, only the
version changes) and "copy" (the engine owns a separate copy, refreshed in place with copy_). Every
batch an engine samples carries `policy_version`, so stale samples are visible downstream.
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn as nn


class WeightSync:
    def __init__(self, trainer_model: nn.Module, engine, mode: str = "pointer"):
        if mode not in ("pointer", "copy"):
            raise ValueError(f"weight sync mode must be 'pointer' or 'copy', got {mode!r}")
        self.trainer_model, self.engine, self.mode = trainer_model, engine, mode
        if mode == "pointer":
            engine.model = trainer_model
        else:
            engine.model = copy.deepcopy(trainer_model).requires_grad_(False)
        self.version = engine.policy_version

    @torch.no_grad()
    def sync(self) -> dict[str, float]:
        t0 = time.perf_counter()
        if self.mode == "copy":
            src = dict(self.trainer_model.named_parameters())
            for name, p in self.engine.model.named_parameters():
                p.copy_(src[name])
        self.version += 1
        self.engine.policy_version = self.version
        return {"sync/version": float(self.version), "time/sync_copy": time.perf_counter() - t0}
