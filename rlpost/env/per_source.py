"""SOURCES WITH ENVIRONMENTS: task.sources whose entries run in different roles (one names an `env`, another is
scored one turn by its reward), as one reward role.

    role = SourceRoles({"math": Reward(...), "tools": EnvRole(...)}, SourceRewards(...))
    batch, metrics = run_episodes(engine, role, rows, prompt_ids, k, params, seed)

Each row runs in the role of the source it came from (row["task_source"]): `SourceEpisodes` starts each
source's episodes with its own role and steps them side by side. The turns the sources ask for at the same
sampling settings (the same k, token cap and seed: every source's first turn) are sampled in one engine
call, and each source gets its own samples back. `result` lays the sources' batches out as one, in the order
of the rows (k samples of each, group ids those of the rows), a one-turn sample written as a one-turn
episode (its transcript, 1 turn), so the per-source metrics, rollouts.jsonl and the trainer see one batch.

Metrics: the sources' own (reward/errors, env/turns, ...), means weighted by samples and counters summed;
and each environment source's env/* metrics again as env/<metric>_<source> (env/turns_tools).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from rlpost.batch import Batch
from rlpost.env.base import Verifier
from rlpost.env.role import Episodes, RewardRole, Turn
from rlpost.ops import last_token_index
from rlpost.prompts import SOURCE_KEY

# metrics that are means over a source's samples (weighted by them over the sources): an environment's per-episode
# means and a weighted reward's parts (reward/<label>); the rest count (errors, timeouts, seconds, a verifier's
# calls) and are summed
MEANS = ("env/turns", "env/env_tokens", "env/budget_frac", "env/tool_calls")
MEAN_PREFIXES = ("prm/", "distill/")  # a learned RL reward's means over the batch it rescored
COUNTS = ("reward/errors", "reward/timeouts")


def _is_mean(key: str) -> bool:
    return key in MEANS or key.startswith(MEAN_PREFIXES) or (key.startswith("reward/") and key not in COUNTS)


@dataclass
class SourceRoles(RewardRole):
    """task.sources with an environment on some entry: `roles` maps each source's name to its role (an
    `EnvRole` for a source with an env, the one-turn `Reward` otherwise); `fn` is every source's verifier
    by source (`SourceRewards`: what maj@k extracts answers with, closed with the run). `rescore`: a learned
    RL reward over the laid-out episodes (rlpost/env/source.py's `over_episodes`)."""

    roles: dict[str, RewardRole]
    fn: Verifier | None = None
    name: str = "sources"
    rescore: Callable[[Batch], tuple[Batch, dict]] | None = None

    def start(self, rows: list[dict], prompt_ids: list[list[int]], k: int) -> SourceEpisodes:
        return SourceEpisodes(self, rows, prompt_ids, k)

    def scored_by(self, fn: Verifier) -> SourceRoles:
        """Every source's role scored by `fn` (eval.reward); ValueError naming the source whose environment
        scores its episodes itself."""
        roles = {}
        for name, role in self.roles.items():
            try:
                roles[name] = role.scored_by(fn)
            except ValueError as e:
                raise ValueError(f"task.sources {name!r}: {e}") from None
        return SourceRoles(roles, fn, self.name)


class SourceEpisodes(Episodes):
    """The k episodes of each row, each in its source's role (see the module docstring)."""

    def __init__(self, role: SourceRoles, rows: list[dict], prompt_ids: list[list[int]], k: int):
        self.role, self.k, self.n_rows = role, k, len(rows)
        by_source: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            source = row.get(SOURCE_KEY)
            if source not in role.roles:
                raise ValueError(f"row {i} names no source of task.sources ({SOURCE_KEY}={source!r}; sources: "
                                 f"{', '.join(role.roles)})")
            by_source.setdefault(source, []).append(i)
        # (source name, its rows' indices, its episodes), in the order task.sources lists the sources
        self.parts = [(name, by_source[name], role.roles[name].start([rows[i] for i in by_source[name]],
                                                                      [prompt_ids[i] for i in by_source[name]], k))
                      for name in role.roles if name in by_source]
        self.offsets = [0]  # each part's first episode in the order of the rows' sources
        for _, idx, _ in self.parts:
            self.offsets.append(self.offsets[-1] + len(idx) * k)
        self.routes: dict[int, list[tuple[int, Turn, int, int]]] = {}  # id(turn) -> (part, its turn, samples)
        self.pending: set[int] = set()  # parts sampled since the last step

    def turns(self, params, seed: int) -> list[Turn]:
        """The sources' next turns; those at the same settings (n, sampling parameters, seed) as one."""
        merged: dict[tuple, tuple[Turn, list]] = {}
        for p, (_, _, episodes) in enumerate(self.parts):
            for t in episodes.turns(params, seed):
                key = (t.n, repr(t.params), t.seed)
                if key not in merged:
                    merged[key] = (Turn([], t.n, t.params, t.seed, []), [])
                turn, routes = merged[key]
                start = len(turn.prompts) * t.n
                turn.prompts.extend(t.prompts)
                turn.members.extend(self.offsets[p] + m for m in t.members)
                routes.append((p, t, start, start + len(t.prompts) * t.n))
        self.routes = {id(turn): routes for turn, routes in merged.values()}
        return [turn for turn, _ in merged.values()]

    def sampled(self, turn: Turn, batch: Batch) -> None:
        for p, own, start, stop in self.routes[id(turn)]:
            self.parts[p][2].sampled(own, batch.select(slice(start, stop)))
            self.pending.add(p)

    def step(self) -> None:
        """Only the sources sampled since the last step answer: a one-turn source scores once."""
        for p in sorted(self.pending):
            self.parts[p][2].step()
        self.pending = set()

    def result(self) -> tuple[Batch, dict[str, float]]:
        batches, metrics, counts = [], [], []
        for name, idx, episodes in self.parts:
            batch, own = episodes.result()
            batches.append(_as_episodes(batch, self.role.roles[name].tokenizer))
            metrics.append((name, own))
            counts.append(len(batch))
        per_turn = any(b.rewards.dim() == 2 for b in batches)
        batches = [_align_rewards(b) if per_turn and b.rewards.dim() == 1 else b for b in batches]
        if any(b.rollout_logp is not None for b in batches):  # a truncated distribution sampled some: said for all
            batches = [b if b.rollout_logp is not None else b.replace(rollout_logp=b.old_logp.clone())
                       for b in batches]
        # each sample's place: row-major over the rows as given, k samples of a row together
        place, offset = [0] * (self.n_rows * self.k), 0
        for (_, idx, _), n in zip(self.parts, counts):
            for local in range(n):
                place[idx[local // self.k] * self.k + local % self.k] = offset + local
            offset += n
        batch = _concat(batches).select(place)
        group = torch.arange(self.n_rows, device=batch.input_ids.device).repeat_interleave(self.k)
        batch = batch.replace(group_ids=group)  # a source's own were its rows' (or its engine call's) places
        out = _combine(metrics, counts)
        if self.role.rescore is not None:
            batch, scored = self.role.rescore(batch)
            out.update(scored)
        return batch, out


def _as_episodes(batch: Batch, tokenizer) -> Batch:
    """A source's batch with the meta every episode carries: a one-turn sample becomes a one-turn episode (its
    prompt and its turn in `transcript`, scored and done); an environment's batch is one already."""
    if "transcript" in batch.meta:
        return batch
    rewards = batch.rewards.float()
    finish, texts = batch.meta["finish_reason"], batch.meta["completion"]
    tokens = batch.response_mask.sum(1).tolist()
    width = _prompt_width(batch)
    ids, attended = batch.input_ids[:, :width].cpu(), batch.attention_mask[:, :width].bool().cpu()
    transcript = [[{"role": "prompt", "text": tokenizer.decode(ids[i][attended[i]].tolist())},
                   {"role": "assistant", "text": texts[i], "tokens": int(tokens[i]), "finish": finish[i],
                    "reward": float(rewards[i]), "env": "done"}] for i in range(len(batch))]
    meta = {**batch.meta, "transcript": transcript, "turns": [1] * len(batch), "env_error": [None] * len(batch),
            "env_info": [{} for _ in range(len(batch))]}
    return batch.replace(meta=meta)


def _align_rewards(batch: Batch) -> Batch:
    """[B] rewards as [B, T]: each on its sample's last response token, where the algorithms put an outcome
    reward (beside an environment that keeps each turn's reward on its turn)."""
    token = torch.zeros(batch.response_mask.shape, dtype=torch.float32, device=batch.rewards.device)
    rows = torch.arange(len(batch), device=token.device)
    token[rows, last_token_index(batch.response_mask)] = batch.rewards.float()
    return batch.replace(rewards=token)


def _prompt_width(batch: Batch) -> int:
    """The column every response starts in; a batch without a policy token (every episode failed at reset)
    ends its prompts at its last attended column."""
    cols = batch.response_mask.any(0).nonzero()
    if len(cols):
        return int(cols[0])
    attended = batch.attention_mask.any(0).nonzero()
    return int(attended[-1]) + 1 if len(attended) else batch.input_ids.shape[1]


def _concat(batches: list[Batch]) -> Batch:
    """The sources' batches stacked: prompts left-padded to the widest, responses right-padded to the longest
    (padding masked out), meta keys that only some sources carry filled with None for the others."""
    widths = [_prompt_width(b) for b in batches]
    P, R = max(widths), max(b.input_ids.shape[1] - w for b, w in zip(batches, widths))
    names = [n for n in batches[0].tensors() if all(getattr(b, n) is not None for b in batches)]
    missing = {n for b in batches for n in b.tensors()} - set(names)
    if missing:
        raise ValueError(f"the sources' batches differ in fields {sorted(missing)}: they cannot be laid out as one")
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for b, w in zip(batches, widths):
        left, right = P - w, R - (b.input_ids.shape[1] - w)
        for n in names:
            t = getattr(b, n)
            parts[n].append(torch.nn.functional.pad(t, (left, right)) if t.dim() == 2 else t)
    keys = list(dict.fromkeys(k for b in batches for k in b.meta))
    meta = {k: [v for b in batches for v in b.meta.get(k, [None] * len(b))] for k in keys}
    return Batch(**{n: torch.cat(ts) for n, ts in parts.items()}, meta=meta)


def combine_metrics(parts: list[tuple[dict[str, float], int]], latest: set[str] | frozenset = frozenset()
                    ) -> dict[str, float]:
    """Reward-role metrics of several batches (each (its metrics, its samples)) as those of their union: means
    (`_is_mean`: an environment's per-episode means, a weighted reward's parts, a learned reward's prm/* and
    distill/*) weighted by each batch's samples,
    over the batches that report them; counters (errors, timeouts, seconds, a verifier's call counts) summed;
    the keys in `latest` (one verifier's running totals, reported by each batch it scored) the last batch's. The
    sources of one step, and the controller's refill rounds."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for own, n in parts:
        for key, value in own.items():
            if key in latest:
                sums[key] = value
            elif _is_mean(key):
                sums[key] = sums.get(key, 0.0) + n * value
                weights[key] = weights.get(key, 0.0) + n
            else:
                sums[key] = sums.get(key, 0.0) + value
    return {key: value / weights[key] if key in weights else value for key, value in sums.items()}


def _combine(metrics: list[tuple[str, dict[str, float]]], counts: list[int]) -> dict[str, float]:
    """The sources' metrics as one run's (`combine_metrics`); each source's env/* metrics also as
    env/<metric>_<source>."""
    out = {f"{key}_{name}": value for name, own in metrics for key, value in own.items() if key.startswith("env/")}
    out.update(combine_metrics([(own, n) for (_, own), n in zip(metrics, counts)]))
    return out
