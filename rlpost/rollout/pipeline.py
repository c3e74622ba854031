"""Rollouts that run ahead of training: one background thread works through episodes and weight
updates in the exact order they were submitted.

    pipe = RolloutPipeline(engine, reward, k, params)
    pipe.submit(key, rows, prompt_ids, seed)        # queue the episodes of a step (returns at once)
    pipe.update_weights(named, version)             # queue new weights (snapshotted now)
    batch, metrics = pipe.result(key)               # wait for that step's scored batch

Because the engine sees episodes and weights in submission order, which weights a step samples with
is fixed by the caller, never by timing: the controller submits step t+S before pushing the weights
of step t, so step t samples with version t-S-1 (S = rl.max_staleness) and S = 0 is the synchronous
loop. The pipeline also implements the weight half of the Engine protocol (`update_weights`,
`version`, `weight_sync_mode`), so WeightSync pushes through it unchanged.

Each result's metrics carry `time/sync_apply`: the seconds the engine spent loading the weight updates
applied since the previous result (in this thread, so they overlap training).

`drain()` waits until everything submitted is done and returns the results nobody collected yet
(a checkpoint saves them); `restore(results)` puts them back on resume. An error in the thread is
raised again by the next `result`. `close()` stops the thread and closes the engine.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable
from typing import Any

import torch

from rlpost.rollout.engine import SamplingParams
from rlpost.rollout.episodes import run_episodes


class RolloutPipeline:
    def __init__(self, engine, reward, k: int, params: SamplingParams):
        self.engine, self.reward, self.k, self.params = engine, reward, k, params
        self._version = engine.version
        self._todo: queue.Queue = queue.Queue()
        self._done: dict[Any, tuple] = {}
        self._cond = threading.Condition()
        self._pending = 0          # items submitted and not finished
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="rlpost-rollout", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- the Engine protocol's weight half
    @property
    def version(self) -> int:
        """The version of the newest weights submitted (the trainer's)."""
        return self._version

    @property
    def weight_sync_mode(self) -> str:
        return self.engine.weight_sync_mode

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Queue these weights for the engine; they are copied now, so training may go on changing them."""
        snapshot = [(n, t.detach().clone()) for n, t in named_tensors]
        self._put(("weights", snapshot, version))
        self._version = version

    # ---------------------------------------------------------------- episodes
    def submit(self, key, rows: list[dict], prompt_ids: list[list[int]], seed: int) -> None:
        """Queue the episodes of `rows` (k samples each, scored); `result(key)` returns them."""
        self._put(("episodes", key, rows, prompt_ids, seed))

    def result(self, key) -> tuple:
        """(scored batch, metrics) of `key`, waiting for it; metrics gain `time/rollout_wait`, the seconds
        this call waited."""
        t0 = time.perf_counter()
        with self._cond:
            while key not in self._done and self._error is None:
                self._cond.wait()
            self._raise()
            batch, metrics = self._done.pop(key)
        return batch, {**metrics, "time/rollout_wait": time.perf_counter() - t0}

    def drain(self) -> dict:
        """Wait for everything submitted; return (and keep) the results not collected yet."""
        with self._cond:
            while self._pending and self._error is None:
                self._cond.wait()
            self._raise()
            return dict(self._done)

    def restore(self, results: dict) -> None:
        """Results saved by `drain` before a restart, collected by `result` as if just produced."""
        with self._cond:
            self._done.update(results)

    def close(self) -> None:
        if self._thread.is_alive():
            self._todo.put(None)
            self._thread.join()
        self.engine.close()

    # ---------------------------------------------------------------- the thread
    def _put(self, item) -> None:
        self._raise()
        with self._cond:
            self._pending += 1
        self._todo.put(item)

    def _raise(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"the rollout thread failed: {type(self._error).__name__}: {self._error}") \
                from self._error

    def _work(self) -> None:
        applying = 0.0  # seconds spent loading weights into the engine since the last episodes
        while True:
            item = self._todo.get()
            if item is None:
                return
            try:
                if item[0] == "weights":
                    _, named, version = item
                    t0 = time.perf_counter()
                    self.engine.update_weights(named, version)
                    applying += time.perf_counter() - t0
                    out = None
                else:
                    _, key, rows, prompt_ids, seed = item
                    batch, metrics = run_episodes(self.engine, self.reward, rows, prompt_ids, self.k, self.params,
                                                  seed)
                    out, applying = (batch, {**metrics, "time/sync_apply": applying}), 0.0
            except BaseException as e:  # handed to the main thread by the next call
                with self._cond:
                    self._error = e
                    self._cond.notify_all()
                return
            with self._cond:
                if out is not None:
                    self._done[key] = out
                self._pending -= 1
                self._cond.notify_all()
