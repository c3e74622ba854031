"""ENV / REWARD: the one-turn verifier role, its errors and helpers. Never touches weights.

`Reward(fn, tokenizer)` is `VerifierEnv(fn)` (rlpost/env/base.py) stepped for a whole batch: one sampled turn
per episode, then it decodes every response and calls `fn(completion, row) -> float` on it, writing
batch.rewards [B] and batch.meta["completion"]. A function that raises, returns something that is not a
finite number, or runs past `timeout_s`, is reported with the sample it failed on (index, row of its
file, prompt, completion); with `on_error="zero"` that sample scores `failure_score` instead (0, or lower
when the reward can be negative) and the failure is counted in the metrics (reward/errors;
reward/timeouts for those that ran out of time).

The calls run in daemon threads (rlpost/env/calls.py), so a call that hangs is abandoned when its time is
up and a fresh thread scores the next sample; what it returns later is dropped. A call stuck inside C code
that holds the GIL (a catastrophic regular expression, say) cannot be abandoned: it stalls the whole process
until it returns, so such work must be bounded by the reward itself (a cap on the input, a subprocess).
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from typing import Callable

import torch

from rlpost.batch import Batch
from rlpost.env.base import Verifier, as_verifier, reward_value
from rlpost.env.calls import CallResult, call_all, hung_calls
from rlpost.env.role import RewardRole

RewardFn = Callable[[str, dict], float]
MAX_HUNG_CALLS = 1000   # abandoned reward calls still running, past which a run stops rather than run out of threads


class RewardError(RuntimeError):
    """The reward function failed on a named sample."""


def reward_range(fn: Verifier) -> tuple[float, float] | None:
    """The (lowest, highest) value `fn` can return, as it declares in its `reward_range` (the shipped
    verifiers and their weighted sums do), checked; None when it does not say."""
    declared = fn.reward_range
    if declared is None:
        return None
    lo, hi = (float(v) for v in declared)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        raise ValueError(f"reward {getattr(fn, '__qualname__', fn)!r}: reward_range must be two finite numbers "
                         f"(lowest, highest), got {declared!r}")
    return lo, hi


def failure_score(fn: Verifier, scored: list[float]) -> float:
    """What a failed sample scores under on_error=zero: 0, or lower when the reward can be negative: the lowest
    value it declares in `reward_range`, and never more than the lowest reward scored in the same batch (so an
    undeclared or wrongly declared range still cannot pay). A failure (a crash, a hang) must never pay more
    than an honest wrong answer, or a policy learns to fail on purpose."""
    declared = reward_range(fn)
    return min([0.0, *scored, *(declared[:1] if declared else ())])


def verifier_metrics(fn: Verifier) -> dict[str, float]:
    """The verifier's own counters as the reward role logs them (a key without a '/' as reward/<key>): running
    totals since it was built (a judge's calls, math's timeouts), not counts of one batch."""
    return {(k if "/" in k else f"reward/{k}"): float(v) for k, v in fn.metrics().items()}


def load_reward_fn(spec: str) -> RewardFn:
    """'package.module:function' -> the function.

    The module is looked for in the current working directory, as `python -m` would, and then on the
    rest of sys.path (the installed packages). The `rlpost` console script puts only its own bin folder
    on sys.path, so without this a `my_rewards.py` next to the user's data is not found. The folder stays
    on sys.path, so the reward module's own imports (at load or at call time) resolve the same way.
    """
    if ":" not in spec:
        raise ValueError(f"task.reward must look like 'module:function', got {spec!r}")
    module_name, fn_name = spec.split(":", 1)
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
        importlib.invalidate_caches()
    try:
        fn = getattr(importlib.import_module(module_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load reward function {spec!r} (modules are looked for in the working "
                         f"directory {cwd}, then on sys.path): {e}") from e
    if not callable(fn):
        raise ValueError(f"reward {spec!r} is not callable")
    return fn


def decode_responses(batch: Batch, tokenizer) -> list[str]:
    """Each row's response tokens (response_mask) as text."""
    ids, mask = batch.input_ids.cpu(), batch.response_mask.bool().cpu()  # one transfer, not one per row
    return [tokenizer.decode(ids[i][mask[i]].tolist()) for i in range(len(batch))]


def _sample(i: int, row: dict, completion: str, limit: int = 300) -> str:
    """'sample 3 (line 12 of its file; prompt '...', completion '...')': where a reward failed, clipped."""
    def clip(x) -> str:
        text = repr(x)
        return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"

    where = ""
    if "line" in row or "row" in row:  # added by the file readers: where the user can find the row
        # task.sources: several files, so the row's source says which ("task_source", rlpost.prompts.SOURCE_KEY)
        of = f"source {row['task_source']!r}'s file" if "task_source" in row else "its file"
        where = f"line {row['line']} of {of}; " if "line" in row else f"row {row['row']} of {of}; "
    elif "task_source" in row:
        where = f"source {row['task_source']!r}; "
    return f"sample {i} ({where}prompt {clip(row.get('prompt', row.get('messages')))}, completion {clip(completion)})"


class Reward(RewardRole):
    """The one-turn verifier role: `fn(completion, row)` on every sample (`fn` as a `Verifier`: a plain
    function is wrapped). `workers` > 1 scores that many samples at once (threads: for rewards that wait on a
    sandbox, a process pool or an HTTP judge). A weighted sum (`rlpost.env.verifiers.WeightedRewards`) logs
    each part's mean as reward/<name> (`Verifier.scored`); the verifier's `metrics()` (the judge's call and
    failure counts) are logged. A verifier with `batched = True` is given the whole batch at once
    (`score_batch(completions, rows)`): a local judge answers every sample in one generation, and is not
    timed: its own engine bounds it.

    `timeout_s` (task.reward_timeout_s) bounds each call. None: no limit, and with one worker the calls run
    in the calling thread (for a reward that needs the main thread, e.g. one that uses signal.alarm)."""

    def __init__(self, fn: RewardFn, tokenizer, on_error: str = "raise", workers: int = 1,
                 timeout_s: float | None = 60.0):
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"reward timeout_s must be > 0 seconds or None (no limit), got {timeout_s!r}")
        self.fn: Verifier = as_verifier(fn)
        self.tokenizer, self.on_error, self.workers = tokenizer, on_error, workers
        self.timeout_s = timeout_s
        self.name = getattr(self.fn, "__qualname__", repr(fn))  # a function's name, a weighted sum's terms

    def scored_by(self, fn: RewardFn) -> Reward:
        """The one-turn role of verifier `fn` (eval.reward), over the same tokenizer, with the same handling of
        its calls: task.reward_on_error, task.reward_workers and task.reward_timeout_s."""
        return Reward(fn, self.tokenizer, on_error=self.on_error, workers=self.workers, timeout_s=self.timeout_s)

    def completions(self, batch: Batch) -> list[str]:
        return decode_responses(batch, self.tokenizer)

    def __call__(self, batch: Batch) -> tuple[Batch, dict[str, float]]:
        """Score every sample of `batch` (its responses decoded, its data rows in meta["row"])."""
        texts = self.completions(batch)
        rows = batch.meta["row"]
        if self.fn.batched:  # one call for the whole batch (a local judge: one generation)
            try:
                results = [CallResult(value=(v, {})) for v in self.fn.score_batch(texts, rows)]
            except Exception as e:  # noqa: BLE001 - reported below, on the first sample, as any reward failure
                results = [CallResult(error=e)] * len(texts)
        else:
            # raise: the first failure ends the batch, so a hung reward stops the run one timeout after it
            results = call_all([lambda t=t, r=r: self.fn.scored(t, r) for t, r in zip(texts, rows)], self.timeout_s,
                               self.workers, stop_on_failure=self.on_error != "zero")
            if hung_calls() > MAX_HUNG_CALLS:  # on_error=zero and a reward that hangs, batch after batch
                raise RewardError(f"{hung_calls()} calls of the reward ran past task.reward_timeout_s and are still "
                                  f"running in abandoned threads, which Python cannot stop; reward function "
                                  f"{self.name} keeps hanging (more than {MAX_HUNG_CALLS} at once): fix it, or bound "
                                  f"its work itself (a subprocess with a timeout, the sandbox)")
        rewards, failures, timeouts, parts, failed = [], 0, 0, {}, []
        for i, (text, row, res) in enumerate(zip(texts, rows, results)):
            if res.cancelled:  # another sample failed first; the loop raises on it
                rewards.append(0.0)
                continue
            if res.timed_out:
                if self.on_error != "zero":
                    raise RewardError(f"reward function {self.name} timed out after {self.timeout_s:g} s "
                                      f"(task.reward_timeout_s) on {_sample(i, row, text)}: make it return sooner, "
                                      f"raise task.reward_timeout_s, or set task.reward_on_error=zero to score such "
                                      f"samples 0")
                failures, timeouts = failures + 1, timeouts + 1
                failed.append(i)
                rewards.append(0.0)
                continue
            try:
                if res.error is not None:
                    raise res.error
                value, named = res.value
                for label, v in named.items():  # the parts of a weighted sum
                    parts.setdefault(label, []).append(float(v))
                r = reward_value(value)
            except Exception as e:  # noqa: BLE001 - any failure of user code is reported the same way
                if self.on_error != "zero":
                    raise RewardError(f"reward function {self.name} failed on {_sample(i, row, text)}: "
                                      f"{type(e).__name__}: {e}") from e
                failures, r = failures + 1, 0.0
                failed.append(i)
            rewards.append(r)
        if failed:  # scored once the batch's honest rewards are known: never above the lowest of them
            failed_set = set(failed)
            floor = failure_score(self.fn, [r for j, r in enumerate(rewards) if j not in failed_set])
            for j in failed:
                rewards[j] = floor
        meta = {**batch.meta, "completion": texts}
        rewards = torch.tensor(rewards, device=batch.input_ids.device)
        metrics = {"reward/errors": float(failures), "reward/timeouts": float(timeouts)}
        metrics.update({f"reward/{label}": sum(v) / len(v) for label, v in parts.items()})
        metrics.update(verifier_metrics(self.fn))
        return batch.replace(rewards=rewards, meta=meta), metrics
