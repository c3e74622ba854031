"""WEIGHT SYNC: move the trainer's fresh weights to the rollout engine, and version them.

Ordering contract, one RL step:

    metrics = trainer.step(batch, algo.compute_loss)   # 1. the optimizer step finishes
    sync.sync()                                        # 2. push: engine gets the new weights, version += 1
    batch = engine.generate(...)                       # 3. the next rollout samples with them

Colocated modes: "pointer" (the engine holds the trainer's own module: nothing moves, only the
version changes), "copy" (the engine owns a separate copy, refreshed in place with copy_) and
"vllm" (the engine is a running vLLM (rlpost/rollout/vllm_engine.py) with its own weights: the
trainer's state_dict is pushed into it with vLLM's reload_weights and its prefix cache is dropped).
Every batch an engine samples carries `policy_version`, so stale samples are visible downstream.
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn as nn


class WeightSync:
    def __init__(self, trainer_model: nn.Module, engine, mode: str = "pointer"):
        if mode not in ("pointer", "copy", "vllm"):
            raise ValueError(f"weight sync mode must be 'pointer', 'copy' or 'vllm', got {mode!r}")
        required = getattr(engine, "weight_sync_mode", None)  # an engine that owns its weights names its mode
        if (required or mode) != mode or (mode == "vllm" and not hasattr(engine, "update_weights")):
            raise ValueError(f"weight sync mode {mode!r} does not fit a {type(engine).__name__}: a vLLM engine "
                             f"needs rl.weight_sync=vllm, and 'vllm' needs a vLLM engine")
        self.trainer_model, self.engine, self.mode = trainer_model, engine, mode
        if mode == "vllm":  # the engine may have started from older weights (e.g. before SFT): push now
            engine.model = trainer_model
            self._push()
        elif mode == "pointer":
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
        elif self.mode == "vllm":
            self._push()
        self.version += 1
        self.engine.policy_version = self.version
        return {"sync/version": float(self.version), "time/sync_copy": time.perf_counter() - t0}

    @torch.no_grad()
    def push(self) -> None:
        """The trainer's current weights into the engine, without a new version (e.g. before an evaluation)."""
        if self.mode == "copy":
            src = dict(self.trainer_model.named_parameters())
            for name, p in self.engine.model.named_parameters():
                p.copy_(src[name])
        elif self.mode == "vllm":
            self._push()

    def state_dict(self) -> dict:
        return {"version": self.version}

    def load_state_dict(self, state: dict) -> None:
        self.push()
        self.version = state["version"]
        self.engine.policy_version = self.version

    def _push(self) -> None:
        push_to_vllm(self.trainer_model, self.engine)


def push_to_vllm(model: nn.Module, engine) -> None:
    """The trainer's weights, under their Hugging Face names, into a running vLLM engine (no version bump:
    for sampling from the current weights outside the RL loop, e.g. a held-out evaluation)."""
    hf = getattr(model, "hf", model)
    engine.update_weights(hf.state_dict().items())
