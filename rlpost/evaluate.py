"""Held-out evaluation: pass@1 is the probability that one sampled completion is right.

It is estimated as the mean verifier score over `samples` completions per held-out prompt, drawn at
`temperature` (1.0 by default: the policy itself, not its mode). Rollout + reward through the same
episode function as training (rlpost/rollout/episodes.py), nothing else.
"""

from __future__ import annotations

from rlpost.reward import Reward
from rlpost.rollout import SamplingParams
from rlpost.rollout.episodes import episodes_in_chunks


def pass_at_1(engine, reward: Reward, rows: list[dict], prompt_ids: list[list[int]], *, samples: int,
              temperature: float, max_new_tokens: int, batch_prompts: int = 256, seed: int = 0) -> float:
    if not rows:
        return float("nan")
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature)
    total, count = 0.0, 0
    for _, batch in episodes_in_chunks(engine, reward, rows, prompt_ids, samples, params, seed, batch_prompts):
        total += float(batch.rewards.sum())
        count += len(batch)
    return total / count
