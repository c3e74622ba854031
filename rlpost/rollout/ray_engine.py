"""Rollout engines in Ray actors, behind the same Engine protocol (rlpost/rollout/engine.py).

    engine = RayEngine(model, tokenizer, kind="auto", workers=2)     # 2 actors, each with its own engine
    batch = engine.generate(prompts, k, params, seed)                # prompts split across the actors
    engine.update_weights(named_weights(model), version)             # every actor, then they sample with it
    engine.close()

Each actor (`RolloutWorker`) holds its own copy of the policy and builds the engine `kind` names in
its process (native, hf or vLLM: a vLLM worker reloads weights by its own path), so the trainer's
process never generates. `generate` cuts the prompts into one contiguous share per actor, runs the
shares at once and concatenates them back in order (group ids stay the prompt's position). The
first share keeps `seed`; share i samples with `seed + i * SEED_STRIDE`, so one worker samples
exactly what a colocated engine would, and more workers sample other (equally distributed) tokens.

Weights reach the actors two ways (`mode`):

- "ray": one `ray.put` of the tensors; every actor reads them from the object store (copied, not
  zero-copy on CPU). Simple, and fine for small models.
- "collective": a torch.distributed group of the driver (rank 0) and the actors, made without
  touching the default process group (a ProcessGroupGloo, or ProcessGroupNCCL on CUDA, on a TCPStore),
  so it lives beside torchrun's; each tensor is broadcast from the driver. For large models. The NCCL
  variant is written for GPUs and untested here (CPU machines: gloo).

An actor that dies (RayActorError) is restarted from the initial policy plus the last weights it
was sent, and the call is repeated with the same arguments (so the result is what it would have
been), up to `max_restarts` times in all; then RolloutWorkerError says so. With "collective" a
restart would need a new group, so a dead actor stops the run with that error (resume from the
last checkpoint).
"""

from __future__ import annotations

import copy
import datetime
import socket
from collections.abc import Iterable

import torch
import torch.nn as nn

from rlpost.batch import Batch
from rlpost.rollout import build_engine
from rlpost.rollout.engine import SamplingParams

SEED_STRIDE = 1_000_033
SYNC_MODES = ("ray", "collective")


class RolloutWorkerError(RuntimeError):
    """A rollout worker died more often than it may be restarted, or could not be restarted."""


class RolloutWorker:
    """The body of one rollout actor: an engine over its own copy of the policy."""

    def __init__(self, model: nn.Module, tokenizer, kind: str, threads: int, device: str = "cpu", dtype: str = "fp32"):
        torch.set_num_threads(max(threads, 1))
        self.engine = build_engine(kind, model.to(device), tokenizer, share_weights=True, dtype=dtype)
        self.device, self.group = device, None

    def ready(self) -> int:
        """The actor's process id, once it is built."""
        import os

        return os.getpid()

    def generate(self, prompts: list[list[int]], k: int, params: SamplingParams, seed: int) -> Batch:
        return self.engine.generate(prompts, k, params, seed=seed)

    def update_weights(self, named: dict[str, torch.Tensor] | list, version: int) -> None:
        self.engine.update_weights(named.items() if isinstance(named, dict) else named, version)

    def join_group(self, host: str, port: int, rank: int, world: int, backend: str) -> None:
        self.group = _make_group(host, port, rank, world, backend, is_master=False)

    def receive_weights(self, specs: list[tuple[str, tuple, torch.dtype]], version: int) -> None:
        """Take part in the driver's broadcast of each tensor (in `specs` order), then load them."""
        received = []
        for name, shape, dtype in specs:
            t = torch.empty(shape, dtype=dtype, device=self.device)
            _broadcast(self.group, t)
            received.append((name, t))
        self.engine.update_weights(received, version)

    def close(self) -> None:
        self.engine.close()


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _make_group(host: str, port: int, rank: int, world: int, backend: str, is_master: bool):
    """A process group that is not the default one (so it can live beside torchrun's)."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=300)
    store = dist.TCPStore(host, port, world, is_master=is_master, timeout=timeout)
    if backend == "nccl":  # written for GPUs, untested here
        return dist.ProcessGroupNCCL(store, rank, world)
    return dist.ProcessGroupGloo(store, rank, world, timeout)


def _broadcast(group, tensor: torch.Tensor) -> None:
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    group.broadcast([tensor], opts).wait()


class RayEngine:
    """`workers` rollout actors behind the Engine protocol. Needs Ray initialised (rlpost.cluster.RayCluster)."""

    def __init__(self, model: nn.Module, tokenizer, kind: str = "auto", workers: int = 1, threads: int = 1,
                 mode: str = "ray", max_restarts: int = 3, dtype: str = "fp32"):
        """dtype: what each worker's engine samples in (rollout.dtype resolved: 'fp32' or 'bf16')."""
        import ray

        if workers < 1:
            raise ValueError(f"rl.rollout_workers must be >= 1, got {workers}")
        if mode not in SYNC_MODES:
            raise ValueError(f"Ray weight sync must be one of {', '.join(SYNC_MODES)}, got {mode!r}")
        self.kind, self.threads, self.mode, self.max_restarts, self.dtype = kind, threads, mode, max_restarts, dtype
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        cpu_model = copy.deepcopy(model).to("cpu").requires_grad_(False)
        self._model_ref = ray.put(cpu_model)        # what a (re)started actor is built from
        self._tokenizer_ref = ray.put(tokenizer)
        self._last: tuple | None = None             # (weights ref, version) last sent, for restarts
        self._version = 0
        self.restarts = 0
        self.group, self.backend = None, "nccl" if self.device.type == "cuda" else "gloo"
        self.actors = [self._start() for _ in range(workers)]
        ray.get([a.ready.remote() for a in self.actors])
        if mode == "collective":
            self._form_group()

    # ---------------------------------------------------------------- the protocol
    @property
    def version(self) -> int:
        return self._version

    @property
    def weight_sync_mode(self) -> str:
        return self.mode

    def generate(self, prompts: list[list[int]], k: int, params: SamplingParams, seed: int = 0) -> Batch:
        self._check_open()
        shares = [(i, a, b) for i, (a, b) in enumerate(_split(len(prompts), len(self.actors))) if b > a]
        batches = self._call_all([(i, "generate", (prompts[a:b], k, params, seed + i * SEED_STRIDE))
                                  for i, a, b in shares])
        # group ids become the prompt's position in `prompts`: its share's offset + its place in the share
        parts = [batch.replace(group_ids=batch.group_ids + a) for (_, a, _), batch in zip(shares, batches)]
        return parts[0] if len(parts) == 1 else Batch.concat(parts)

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        import ray

        self._check_open()
        named = [(n, t.detach().to("cpu")) for n, t in named_tensors]
        if self.mode == "ray":
            ref = ray.put(dict(named))
            self._last = (ref, version)
            self._call_all([(i, "update_weights", (ref, version)) for i in range(len(self.actors))])
        else:
            specs = [(n, tuple(t.shape), t.dtype) for n, t in named]
            refs = [a.receive_weights.remote(specs, version) for a in self.actors]
            for _, t in named:
                _broadcast(self.group, t.contiguous().to(self.device) if self.backend == "nccl" else t.contiguous())
            self._get(refs)
        self._version = version

    def close(self) -> None:
        import ray

        if self.actors is None:
            return
        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:  # already gone
                pass
        self.actors = None
        self.group = None

    # ---------------------------------------------------------------- actors
    def worker_pids(self) -> list[int]:
        """The actors' process ids (to watch them, or for a test to kill one)."""
        import ray

        return ray.get([a.ready.remote() for a in self.actors])

    def _start(self):
        import ray

        gpus = 1 if self.device.type == "cuda" else 0
        actor_cls = ray.remote(num_cpus=1, num_gpus=gpus, max_restarts=0)(RolloutWorker)
        return actor_cls.remote(self._model_ref, self._tokenizer_ref, self.kind, self.threads,
                                "cuda" if gpus else "cpu", self.dtype)

    def _restart(self, i: int | None, error: Exception) -> None:
        """Replace dead actor i (None: one of the weight group's, unknown which) or raise RolloutWorkerError."""
        import ray

        who = "a rollout worker" if i is None else f"rollout worker {i}"
        if self.mode == "collective":
            raise RolloutWorkerError(f"{who} died ({type(error).__name__}); with rl.weight_sync=collective it "
                                     "cannot rejoin the weight group: resume the run from its last checkpoint "
                                     "(`rlpost train --resume RUN_DIR`)") from error
        self.restarts += 1
        if self.restarts > self.max_restarts:
            raise RolloutWorkerError(f"rollout worker {i} died; {self.restarts - 1} restart(s) were already used "
                                     f"(rl.max_worker_restarts={self.max_restarts}): stopping. The last checkpoint "
                                     "resumes the run (`rlpost train --resume RUN_DIR`)") from error
        print(f"rlpost: rollout worker {i} died ({type(error).__name__}); restarting it "
              f"({self.restarts}/{self.max_restarts})", flush=True)
        actor = self._start()
        ray.get(actor.ready.remote())
        if self._last is not None:
            ray.get(actor.update_weights.remote(*self._last))
        self.actors[i] = actor

    def _call_all(self, calls: list[tuple[int, str, tuple]]) -> list:
        """Call `method(*args)` on actor i for each (i, method, args) at once; a dead actor is restarted
        and its call repeated."""
        import ray
        from ray.exceptions import RayActorError

        refs = [getattr(self.actors[i], method).remote(*args) for i, method, args in calls]
        out = []
        for (i, method, args), ref in zip(calls, refs):
            while True:
                try:
                    out.append(ray.get(ref))
                    break
                except RayActorError as e:
                    self._restart(i, e)
                    ref = getattr(self.actors[i], method).remote(*args)
        return out

    def _get(self, refs: list) -> list:
        """ray.get of the weight group's calls (collective mode): a dead actor stops the run (see _restart)."""
        import ray
        from ray.exceptions import RayActorError

        try:
            return ray.get(refs)
        except RayActorError as e:
            self._restart(None, e)
            raise

    def _form_group(self) -> None:
        host = "127.0.0.1" if self.device.type != "cuda" else _node_ip()
        port, world = _free_port(host), len(self.actors) + 1
        joins = [a.join_group.remote(host, port, r + 1, world, self.backend) for r, a in enumerate(self.actors)]
        self.group = _make_group(host, port, 0, world, self.backend, is_master=True)
        self._get(joins)

    def _check_open(self) -> None:
        if self.actors is None:
            raise RuntimeError("this RayEngine is closed")


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    """[0, n) cut into `parts` contiguous ranges, sizes differing by at most one (larger first)."""
    base, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        size = base + (i < extra)
        out.append((start, start + size))
        start += size
    return out

