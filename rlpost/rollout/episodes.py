"""EPISODES: the one path from data rows to scored trajectories.

    batch, metrics = run_episodes(engine, reward, rows, prompt_ids, k, params, seed)

1. the engine samples k completions of each prompt (`Engine.generate`: token ids in, a `Batch` out,
   with `old_logp`, `group_ids`, `policy_version` and finish reasons);
2. each sample gets its data row (`batch.meta["row"]`), so the reward can read the gold answer;
3. the reward role scores the batch (`reward(batch) -> (batch with rewards, metrics)`): a verifier
   `fn(completion, row)` through `rlpost.reward.Reward`, or a learned reward model.

The RL controller, the held-out evaluation and the self-generated preference pairs all call it, so
the three can never disagree on how a row becomes a scored sample. Sampled token ids are kept
verbatim (never decoded and re-encoded). A single-turn verifier is the one-turn case; an
environment that answers over several turns adds its turns here, not in a second path.

`metrics` holds the reward's own metrics plus `time/rollout` and `time/reward` (seconds), so the
caller can report where the time went.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from rlpost.batch import Batch
from rlpost.rollout import SamplingParams


def run_episodes(engine, reward, rows: list[dict], prompt_ids: list[list[int]], k: int, params: SamplingParams,
                 seed: int) -> tuple[Batch, dict[str, float]]:
    """Sample `k` completions for each of `rows` (prompt tokens `prompt_ids`) and score them."""
    if len(rows) != len(prompt_ids):
        raise ValueError(f"run_episodes: {len(rows)} rows but {len(prompt_ids)} prompts")
    t0 = time.perf_counter()
    batch = engine.generate(prompt_ids, k, params, seed=seed)
    batch = batch.replace(meta={**batch.meta, "row": [row for row in rows for _ in range(k)]})
    t1 = time.perf_counter()
    batch, metrics = reward(batch)
    return batch, {**metrics, "time/rollout": t1 - t0, "time/reward": time.perf_counter() - t1}


def episodes_in_chunks(engine, reward, rows: list[dict], prompt_ids: list[list[int]], k: int,
                       params: SamplingParams, seed: int, chunk: int) -> Iterator[tuple[list[int], Batch]]:
    """`run_episodes` over `chunk` rows at a time (seed + first row index per chunk), for passes over a
    whole prompt set (evaluation, preference pairs). Yields (row indices, scored batch)."""
    for start in range(0, len(rows), chunk):
        idx = list(range(start, min(start + chunk, len(rows))))
        batch, _ = run_episodes(engine, reward, [rows[i] for i in idx], [prompt_ids[i] for i in idx], k, params,
                                seed + start)
        yield idx, batch
