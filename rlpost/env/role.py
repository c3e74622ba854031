"""The reward role: what the rollout runs on a batch of rows, and the episodes it runs them as.

    episodes = role.start(rows, prompt_ids, k)   # k episodes of each row
    while turns := episodes.turns(params, seed):  # what to sample next (none: every episode ended)
        for turn in turns:
            episodes.sampled(turn, engine.generate(turn.prompts, turn.n, turn.params, seed=turn.seed))
        episodes.step()                           # the environment answers (and scores) those turns
    batch, metrics = episodes.result()

rlpost/rollout/episodes.py runs that loop for every role: the one-turn verifier (rlpost.env.reward.Reward,
`VerifierEnv` stepped for a whole batch at once), an environment's episodes (rlpost.env.episodes.EnvRole,
one `Env` per episode) and the learned scorers (a reward model, a teacher, a PRM), which score one
sampled turn. `RewardRole` is the base every role implements: its defaults are the one-turn case, scored by
`role(batch) -> (batch with rewards, metrics)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rlpost.batch import Batch
from rlpost.env.base import Verifier


@dataclass
class Turn:
    """One engine call: `n` samples of each of `prompts` (token ids), at `params` and `seed`, for the
    episodes `members` (in the order the engine returns the samples: prompt-major)."""

    prompts: list[list[int]]
    n: int
    params: Any
    seed: int
    members: list[int]


class Episodes:
    """k episodes of each row in progress. `turns` says what to sample, `sampled` takes the engine's batch,
    `step` lets the environment answer the turns sampled since, `result` gives the scored batch."""

    def turns(self, params, seed: int) -> list[Turn]:
        raise NotImplementedError

    def sampled(self, turn: Turn, batch: Batch) -> None:
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError

    def result(self) -> tuple[Batch, dict[str, float]]:
        raise NotImplementedError


class OneTurn(Episodes):
    """One turn of each episode, the k of a row sampled together (one engine call), scored by
    `score(batch) -> (batch, metrics)` over the whole batch: no per-sample objects. The batch is the
    engine's as it sampled it, with each sample's data row (`meta["row"]`) and the rewards."""

    def __init__(self, score, rows: list[dict], prompt_ids: list[list[int]], k: int):
        self.score, self.rows, self.prompt_ids, self.k = score, rows, prompt_ids, k
        self.batch: Batch | None = None
        self.metrics: dict[str, float] | None = None

    def turns(self, params, seed: int) -> list[Turn]:
        if self.batch is not None:
            return []
        return [Turn(self.prompt_ids, self.k, params, seed, list(range(len(self.rows) * self.k)))]

    def sampled(self, turn: Turn, batch: Batch) -> None:
        self.batch = batch.replace(meta={**batch.meta, "row": [row for row in self.rows for _ in range(self.k)]})

    def step(self) -> None:
        self.batch, self.metrics = self.score(self.batch)

    def result(self) -> tuple[Batch, dict[str, float]]:
        return self.batch, self.metrics


class RewardRole:
    """The base of every reward role (the typed protocol the rollout, evaluation and the stages call; no
    attribute is probed). Defaults: one sampled turn per episode, scored by `self(batch)`.

    `fn` is the verifier the role scores with (maj@k votes on its `final_answer`; `close` closes it), or None
    (a learned scorer: a reward model, a teacher)."""

    name: str = "reward"
    fn: Verifier | None = None

    def __call__(self, batch: Batch) -> tuple[Batch, dict[str, float]]:
        """Score a batch of sampled completions: (the batch with `rewards`, metrics)."""
        raise NotImplementedError(f"{type(self).__name__} scores no batch of single turns")

    def start(self, rows: list[dict], prompt_ids: list[list[int]], k: int) -> Episodes:
        """k episodes of each of `rows` (prompt tokens `prompt_ids`), ready for their first turn."""
        return OneTurn(self, rows, prompt_ids, k)

    def scored_by(self, fn: Verifier) -> RewardRole:
        """The same episodes scored by verifier `fn` instead (eval.reward); ValueError where that cannot be."""
        raise ValueError(f"the reward role {self.name!r} ({type(self).__name__}) cannot be scored by another verifier")

    def final_answer(self, completion: str, row: dict | None = None) -> Any:
        """What maj@k votes on for a sample whose text is `completion` (of `row`, when given: with task.sources
        the row's source's verifier extracts it): the verifier's answer extraction, else the first line."""
        fn = self.fn or Verifier()
        return fn.final_answer(completion) if row is None else fn.final_answer_of(completion, row)

    def close(self) -> None:
        """Free what the role holds (its verifier's worker processes, a judge's engine)."""
        if self.fn is not None:
            self.fn.close()
