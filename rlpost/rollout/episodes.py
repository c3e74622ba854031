"""EPISODES: the one path from data rows to scored trajectories.

    batch, metrics = run_episodes(engine, role, rows, prompt_ids, k, params, seed)

1. the reward role starts k episodes of each row (`role.start`: an environment's resets give the prompts;
   the one-turn verifier takes `prompt_ids` as they are);
2. the engine samples their next turn (`Engine.generate`: token ids in, a `Batch` out, with `old_logp`,
   `group_ids`, `policy_version` and finish reasons); the first turn samples each row's k episodes together;
3. the environment steps them (`episodes.step()`): the one-turn verifier scores every sample at once and
   ends the episodes; a multi-turn environment answers each turn, and 2-3 repeat while episodes go on;
4. `episodes.result()` is the scored batch: the engine's own batch for one turn, the episodes laid out
   with their environment tokens masked for several (rlpost/env/episodes.py).

The RL controller, the held-out evaluation and the self-generated preference pairs all call it, so
the three can never disagree on how a row becomes a scored sample. Sampled token ids are kept
verbatim (never decoded and re-encoded). Every role runs this loop (rlpost/env/role.py): the one-turn
verifier is the environment that scores the first turn and ends the episode.

`metrics` holds the role's own metrics plus `time/rollout` (sampling) and `time/reward` (the environment's
resets and steps: scoring, for a verifier), in seconds, so the caller can report where the time went. Given
a `probe` (rlpost.devices.RoleProbe), the two roles' memory peaks are measured too (the caller reads them
from the probe).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

from rlpost.batch import Batch
from rlpost.env.role import RewardRole
from rlpost.progress import progress
from rlpost.rollout import SamplingParams


def run_episodes(engine, role: RewardRole, rows: list[dict], prompt_ids: list[list[int]], k: int,
                 params: SamplingParams, seed: int, probe=None) -> tuple[Batch, dict[str, float]]:
    """Sample `k` episodes of each of `rows` (prompt tokens `prompt_ids`) and score them with `role`;
    `probe` (a rlpost.devices.RoleProbe) measures the memory peak of the rollout and the reward."""
    if len(rows) != len(prompt_ids):
        raise ValueError(f"run_episodes: {len(rows)} rows but {len(prompt_ids)} prompts")

    t0 = t = time.perf_counter()
    with _measured("reward", probe):
        episodes = role.start(rows, prompt_ids, k)
    t_reward = time.perf_counter() - t
    while turns := episodes.turns(params, seed):
        for turn in turns:
            with _measured("rollout", probe):
                batch = engine.generate(turn.prompts, turn.n, turn.params, seed=turn.seed)
            episodes.sampled(turn, batch)
        t = time.perf_counter()
        with _measured("reward", probe):
            episodes.step()
        t_reward += time.perf_counter() - t
    t = time.perf_counter()
    with _measured("reward", probe):  # the layout, and a learned RL reward rescoring task.env's episodes
        batch, metrics = episodes.result()
    t_reward += time.perf_counter() - t
    return batch, {**metrics, "time/rollout": time.perf_counter() - t0 - t_reward, "time/reward": t_reward}


@contextlib.contextmanager
def _measured(name: str, probe):
    """A named range in a torch.profiler trace, and the probe's memory peak of role `name`."""
    with torch.profiler.record_function(name), (probe.role(name) if probe is not None else contextlib.nullcontext()):
        yield


def episodes_in_chunks(engine, role: RewardRole, rows: list[dict], prompt_ids: list[list[int]], k: int,
                       params: SamplingParams, seed: int, chunk: int,
                       desc: str | None = None) -> Iterator[tuple[list[int], Batch]]:
    """`run_episodes` over `chunk` rows at a time (seed + first row index per chunk), for passes over a
    whole prompt set (evaluation, preference pairs). Yields (row indices, scored batch). With `desc`, a
    progress bar (prompts done, ETA) that disappears when the pass ends."""
    bar = progress(total=len(rows), desc=desc, unit="prompt", leave=False) if desc is not None else None
    for start in range(0, len(rows), chunk):
        idx = list(range(start, min(start + chunk, len(rows))))
        batch, _ = run_episodes(engine, role, [rows[i] for i in idx], [prompt_ids[i] for i in idx], k, params,
                                seed + start)
        if bar is not None:
            bar.update(len(idx))
        yield idx, batch
    if bar is not None:
        bar.close()
