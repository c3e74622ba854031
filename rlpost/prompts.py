"""Which prompts an RL step trains on: the seeded walk over the prompt set (`PromptSampler`), a mixture of
several sources drawn by weight (`MixtureSampler`, task.sources), and the set-aside pool of prompts that teach
nothing right now (`Recycler`, rl.recycle_every).

Every sampler has `next(count) -> row indices` and `state_dict` / `load_state_dict`: the controller saves the
state in each checkpoint, so a resumed run draws exactly the prompts it would have.

Mixture. Each source walks its own rows in its own seeded order (reshuffled at each of its epochs), and the
sources take turns by smooth weighted round robin: each draw adds every source's weight to its credit, the
source with the most credit gives the prompt and pays the total weight back. Over any run of draws a source's
share stays within one prompt of its weight's share, so every step holds the mixture (weights 3:1 and 8
prompts a step: 6 and 2), not only the run on average.

Recycling. GRPO learns from how the K rewards of a prompt differ: a prompt whose K samples are all right (pass
rate p = 1) or all wrong (p = 0) gives zero advantage, a rollout that teaches nothing. The recycler tracks each
prompt's pass rate at its last visit; a prompt seen at p = 0 or 1 is set aside (skipped by the draws), and every
`every` steps the set-aside prompts return to the pool, to be tried again by a policy that has moved on. The
reward variance p(1 - p) of this step's prompts (the signal density, at most 0.25) is logged as a histogram.
"""

from __future__ import annotations

import json
import math
import random

import torch

SOURCE_KEY = "task_source"  # the task.sources entry a mixed row came from (its name), which its reward dispatches on
RIGHT = 1.0        # a sample is right when its reward is >= this (the verifiers' 1.0; pass@1's default threshold)
PQ_BINS = 5        # data/pq_hist_<i>: share of the step's prompts with p(1 - p) in [i, i + 1) * 0.05 (0.25: the last)


class PromptSampler:
    """Walks the prompt set in seeded random order, reshuffling at each epoch."""

    def __init__(self, n: int, seed: int):
        self.n, self.rng, self.order = n, random.Random(seed), []

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate(), "order": list(self.order)}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(state["rng"])
        self.order = list(state["order"])

    def next(self, count: int) -> list[int]:
        out = []
        while len(out) < count:
            if not self.order:
                self.order = list(range(self.n))
                self.rng.shuffle(self.order)
            out.append(self.order.pop())
        return out


class MixtureSampler:
    """Sources drawn by weight, each prompt in turn (smooth weighted round robin); `spans` are the sources'
    (first row, rows) in the concatenated row list, `weights` their weights (positive)."""

    def __init__(self, spans: list[tuple[int, int]], weights: list[float], seed: int):
        if len(spans) != len(weights) or not spans:
            raise ValueError(f"a mixture needs one weight per source, got {len(spans)} source(s), "
                             f"{len(weights)} weight(s)")
        for i, w in enumerate(weights):  # a weight of 0 (or NaN, or negative) would never be drawn, without a word
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < w < math.inf:
                raise ValueError(f"a mixture's weights must be positive finite numbers: source {i} (rows "
                                 f"{spans[i][0]}..{spans[i][0] + spans[i][1] - 1}) has weight {w!r}")
        self.spans, self.weights = list(spans), [float(w) for w in weights]
        # weights near the float limit: their sum (paid back) or a credit (within a few sums of 0) would overflow
        if not math.isfinite(sum(self.weights) * 4 * len(self.weights)):
            top = max(self.weights)
            self.weights = [w / top for w in self.weights]
        # each source its own stream, so one source's epochs never move another's order
        self.samplers = [PromptSampler(n, seed * 1_000_003 + i) for i, (_, n) in enumerate(spans)]
        self.credit = [0.0] * len(spans)

    def pick(self) -> int:
        """The source of the next prompt (and its credit paid)."""
        self.credit = [c + w for c, w in zip(self.credit, self.weights)]
        best = max(range(len(self.credit)), key=lambda i: self.credit[i])  # ties: the first listed
        self.credit[best] -= sum(self.weights)
        return best

    def next(self, count: int) -> list[int]:
        out = []
        for _ in range(count):
            i = self.pick()
            out.append(self.spans[i][0] + self.samplers[i].next(1)[0])
        return out

    def state_dict(self) -> dict:
        return {"credit": list(self.credit), "sources": [s.state_dict() for s in self.samplers]}

    def load_state_dict(self, state: dict) -> None:
        if "sources" not in state or len(state["sources"]) != len(self.samplers):
            raise ValueError(f"the checkpoint's prompt sampler is not a mixture of {len(self.samplers)} sources "
                             "(task.sources changed since it was written?)")
        self.credit = list(state["credit"])
        for sampler, s in zip(self.samplers, state["sources"]):
            sampler.load_state_dict(s)


def row_key(row: dict) -> str:
    """A row's identity for the recycler: its content (a row that comes back from a Ray worker is a copy)."""
    return json.dumps(row, sort_keys=True, default=str)


class Recycler:
    """Wraps a sampler: skips the prompts set aside (last seen all right or all wrong) and returns them to the
    pool every `every` steps. `rows`: the sampler's rows, to find a scored sample's prompt by its row."""

    def __init__(self, inner, rows: list[dict], every: int):
        self.inner, self.every, self.n = inner, every, len(rows)
        self.index: dict[str, list[int]] = {}
        for i, r in enumerate(rows):  # identical rows are one prompt: seen, set aside and recycled together
            self.index.setdefault(row_key(r), []).append(i)
        self.pass_rate: dict[int, float] = {}  # each prompt seen: its pass rate at its last visit
        self.set_aside: set[int] = set()
        self.recycled = 0  # prompts returned to the pool at the start of this step

    def next(self, count: int) -> list[int]:
        out, skipped = [], 0
        while len(out) < count:
            # every prompt set aside, or 2n draws in a row set aside (a mixture whose other sources weigh next
            # to nothing, whose rows the draws may never reach): all of them return now. A plain walk covers
            # every row within 2n draws, so for it the second case is the first.
            if len(self.set_aside) >= self.n or skipped >= 2 * self.n:
                self.recycled += len(self.set_aside)
                self.set_aside.clear()
            i = self.inner.next(1)[0]
            if i not in self.set_aside:
                out.append(i)
                skipped = 0
            else:
                skipped += 1
        return out

    def start_step(self, step: int) -> None:
        """Every `every` steps, before the step draws: the set-aside prompts return to the pool."""
        self.recycled = 0
        if step % self.every == 0:
            self.recycled = len(self.set_aside)
            self.set_aside.clear()

    def observe(self, batch) -> list[float]:
        """Each group's pass rate (fraction of its samples with reward >= RIGHT), recorded for its prompt; a
        prompt at 0 or 1 is set aside. Returns the groups' pass rates."""
        rewards = batch.rewards.float()
        rewards = rewards.sum(1) if rewards.dim() == 2 else rewards  # an episode's return
        rows, rates = batch.meta["row"], []
        for g in torch.unique(batch.group_ids).tolist():
            members = (batch.group_ids == g).nonzero().flatten().tolist()
            p = sum(float(rewards[j]) >= RIGHT for j in members) / len(members)
            rates.append(p)
            for i in self.index.get(row_key(rows[members[0]]), []):
                self.pass_rate[i] = p
                if p in (0.0, 1.0):
                    self.set_aside.add(i)
        return rates

    def metrics(self, rates: list[float]) -> dict[str, float]:
        """data/set_aside, data/recycled, the signal density of the step's prompts (data/pq_mean) and its
        histogram (data/pq_hist_<i>, shares of the step's prompts)."""
        pq = [p * (1 - p) for p in rates]
        out = {"data/set_aside": float(len(self.set_aside)), "data/recycled": float(self.recycled),
               "data/pq_mean": sum(pq) / len(pq) if pq else 0.0}
        for b in range(PQ_BINS):
            inside = sum(min(int(v / (0.25 / PQ_BINS)), PQ_BINS - 1) == b for v in pq)
            out[f"data/pq_hist_{b}"] = inside / len(pq) if pq else 0.0
        return out

    def state_dict(self) -> dict:
        return {**self.inner.state_dict(), "recycle": {"set_aside": sorted(self.set_aside),
                                                       "pass_rate": dict(self.pass_rate)}}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)
        saved = state.get("recycle")
        if saved is None:
            raise ValueError("the checkpoint's prompt sampler has no set-aside pool (rl.recycle_every was 0 when it "
                             "was written)")
        self.set_aside, self.pass_rate = set(saved["set_aside"]), dict(saved["pass_rate"])
