"""WEIGHT SYNC: move the trainer's fresh weights to the rollout engine, and version them.

Ordering contract, one RL step:

    metrics = trainer.step(batch, algo.compute_loss)   # 1. the optimizer step finishes
    sync.sync()                                        # 2. push: engine gets the new weights, version += 1
    batch = engine.generate(...)                       # 3. the next rollout samples with them

WeightSync only ever calls `engine.update_weights(named_weights(trainer_model), version)` (the Engine
protocol, rlpost/rollout/engine.py): the trainer's tensors under their checkpoint names (an HF model's
own names, gpt_mini's module names). How they land is the engine's, fixed when it was built, and the sync's
`mode` is read from it (`engine.weight_sync_mode`): "pointer" (it shares the trainer's module: nothing moves,
only the version changes), "copy" (its own copy, refreshed in place with copy_), "vllm" (a running vLLM,
which reloads them and drops its prefix cache), "ray" or "collective" (Ray rollout workers:
rlpost/rollout/ray_engine.py, whose transport rl.weight_sync chooses). Which settings go together is
the topology's to check, at config load (rlpost/loops/).
Every batch an engine samples carries `policy_version`, so stale samples are visible downstream.

A sharded policy (trainer.strategy=fsdp2) holds only a shard of each parameter on each rank, which no
generation engine can run: every rank's engine is then a "copy" engine, refreshed from the full weights
gathered over torch.distributed (`gathered_weights`: one parameter at a time, each cast to the dtype the
engine holds it in, so the gathered set is the engine's size: half the bytes for its bf16 matmul weights
under rollout.dtype=bf16). Every rank calls sync/push at the same point; `time/sync_gather` is the gathering's
share of the seconds. Between a rollout and the next sync the trainer works and the engine is idle, so the
controller calls `release()`: the engine frees its copy (ModuleEngine.release_weights), and the next sync's
gathered tensors become its weights as they are (no copy). The train phase then holds no full copy at all,
and a sync or push never holds two (every one frees the engine's copy before it gathers the next).

With LoRA (model.lora), `sync` sends the adapter tensors only (an optimizer step changes nothing else), so
"sync/bytes" is the adapters' size; `push` always sends every weight (the base changes on a load or at a stage's
end, when the adapters are folded into it). Under fsdp2 the engine's copy is freed while the trainer works
(memory first: the train phase holds no full copy, LoRA or not), so the sync after a release gathers the base
with its adapters again.
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from rlpost import distributed as dist
from rlpost.models.lora import is_lora
from rlpost.rollout.engine import Engine, ModuleEngine, named_weights, weights_module

class WeightSync:
    def __init__(self, trainer_model: nn.Module, engine: Engine):
        """Pushes the trainer's weights at once, stamped with the engine's version: the engine may have been
        built from older ones (before SFT). `mode` is the engine's `weight_sync_mode`."""
        mode = engine.weight_sync_mode
        if dist.is_sharded(trainer_model) and mode != "copy":
            raise ValueError(f"a sharded policy (trainer.strategy=fsdp2) needs an engine with its own copy of the "
                             f"weights (rl.weight_sync=copy or auto), not a {type(engine).__name__} built for "
                             f"{mode!r}: no engine can sample from parameter shards")
        self.trainer_model, self.engine, self.mode = trainer_model, engine, mode
        self.version = engine.version
        self.push()

    def sync(self) -> dict[str, float]:
        """After an optimizer step: the new weights (a LoRA model's adapters only, unless the engine released its
        copy) to the engine, version += 1."""
        kept = not (isinstance(self.engine, ModuleEngine) and self.engine.released)  # else it needs the base too
        return self._push(self.version + 1, adapters_only=is_lora(self.trainer_model) and kept)

    def push(self) -> dict[str, float]:
        """All the trainer's current weights to the engine, stamped with the current version (no bump): for
        sampling outside the RL loop, e.g. a held-out evaluation, and after a restore or a change of the base."""
        return self._push(self.version)

    def release(self) -> bool:
        """Between a rollout and the next sync (the engine idle while the trainer works): a sharded policy's
        copy engine frees its copy, which the next sync or push gathers again. Returns whether it did; other
        engines keep their weights (a pointer engine's are the trainer's; a one-process copy is refreshed in
        place)."""
        if dist.is_sharded(self.trainer_model) and isinstance(self.engine, ModuleEngine):
            return self.engine.release_weights()
        return False

    @torch.no_grad()
    def _push(self, version: int, adapters_only: bool = False) -> dict[str, float]:
        t0 = time.perf_counter()
        sharded = dist.is_sharded(self.trainer_model)
        full = sharded and not adapters_only
        if full:  # gathered in the dtypes the engine holds, for it to keep (`take`): its old copy goes first
            dtypes = self.engine.weight_dtypes() if isinstance(self.engine, ModuleEngine) else None
            if isinstance(self.engine, ModuleEngine):
                self.engine.release_weights()
            weights = gathered_weights(self.trainer_model, dtypes)
        elif sharded:  # LoRA: the engine keeps its base, only the adapters are gathered
            weights = gathered_weights(self.trainer_model, adapters_only=True)
        else:
            weights = named_weights(self.trainer_model, adapters_only)
        t_gathered = time.perf_counter()
        if full and isinstance(self.engine, ModuleEngine):
            self.engine.update_weights(weights, version, take=True)
        else:
            self.engine.update_weights(weights, version)
        self.version = version  # only once the engine has it
        moved = 0 if self.mode == "pointer" else sum(t.numel() * t.element_size() for t in _unique(weights))
        return {"sync/version": float(version), "sync/bytes": float(moved), "time/sync_copy": time.perf_counter() - t0,
                "time/sync_gather": t_gathered - t0}

    def state_dict(self) -> dict[str, int]:
        return {"version": self.version}

    def load_state_dict(self, state: dict) -> None:
        """On resume: the restored version, and the trainer's (restored) weights pushed to the engine with it."""
        self._push(int(state["version"]))


def _unique(named: list[tuple[str, torch.Tensor]]) -> list[torch.Tensor]:
    """The tensors, each storage once (a tied weight comes under two names)."""
    seen: dict[tuple, torch.Tensor] = {}
    for _, t in named:
        seen.setdefault((t.device, t.data_ptr()), t)
    return list(seen.values())


def gathered_weights(model: nn.Module, dtypes: dict[str, torch.dtype] | None = None,
                     adapters_only: bool = False) -> list[tuple[str, torch.Tensor]]:
    """A sharded model's full weights on every rank (a collective), under the protocol's names: as
    `named_weights`, i.e. without the `hf.` prefix of a wrapped Hugging Face model. Gathered one parameter at a
    time, each cast to `dtypes[name]` (the engine's) before the next: the result, the only full set held, is
    the engine's size, and the full-precision tensor of one parameter is the only extra. `adapters_only`: a LoRA
    model's adapter tensors alone (the frozen base is not moved)."""
    if adapters_only:
        return [(n, (t.full_tensor() if isinstance(t, DTensor) else t).to((dtypes or {}).get(n, t.dtype)))
                for n, t in named_weights(model, True)]
    prefix = "hf." if weights_module(model) is not model else ""
    seen: set[int] = set()  # a tied weight (gpt_mini's lm_head is its wte) goes under its first name only
    out = []
    for k, t in model.state_dict(keep_vars=True).items():  # DTensor shards, in the same order on every rank
        if id(t) in seen or not k.startswith(prefix):
            continue
        seen.add(id(t))
        name = k[len(prefix):]
        full = t.detach().full_tensor() if isinstance(t, DTensor) else t.detach().clone()
        out.append((name, full.to((dtypes or {}).get(name, full.dtype))))
    return out
