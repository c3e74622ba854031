"""The verifiers shipped with rlpost, by name, and their weighted sums.

    from rlpost.env.verifiers import get_reward
    score = get_reward("math", extract="boxed")       # a Verifier: (completion, row) -> float
    score("... so the answer is \\boxed{1/2}", {"answer": "0.5"})   # 1.0

Names (`rlpost rewards` lists them): `exact` (the first line equals row["answer"], numerically when both
are numbers: the embedded task's verifier), `math` (answer extraction + math-verify equivalence),
`code` (the completion's program against row["tests"] in the sandbox), `judge` (an LLM grades the
completion against a rubric), `format` (the whole completion matches a regular expression: the form, not
the answer; by default reasoning, then "#### <number>"). Anything else of the form 'module:function' is the
user's own: a function `(completion, row) -> float`, or a class whose instances are, built with the options.
`get_reward` always returns a `rlpost.env.Verifier` (a user's function is wrapped in one).

In a config, `task.reward: math` with `task.reward_options: {...}` picks one, and

    task:
      rewards:
        - {name: math, weight: 1.0}
        - {name: my_rewards:brevity, weight: 0.1, max_chars: 200}

sums several; each component's mean is logged as reward/<name>. `reward_role` builds the run's reward role
from the config: the one-turn verifier role, or task.env's episodes scored with the configured reward.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import warnings
from typing import Any, Callable

from rlpost.env.base import Verifier, as_verifier, reward_value
from rlpost.env.episodes import EnvRole
from rlpost.env.per_source import SourceRoles
from rlpost.env.registry import env_takes_reward
from rlpost.env.reward import Reward, load_reward_fn, reward_range
from rlpost.env.role import RewardRole
from rlpost.prompts import SOURCE_KEY

REWARDS = {  # name -> "module:object"; the modules are imported on first use
    "exact": "rlpost.tasks:answer_match_reward",
    "math": "rlpost.env.math:MathReward",
    "code": "rlpost.env.code:CodeReward",
    "judge": "rlpost.env.judge:JudgeReward",
    "format": "rlpost.env.format:FormatReward",
}
# The (lowest, highest) each shipped verifier returns; the judge declares its own (its on_failure may be lower).
RANGES = {"exact": (0.0, 1.0), "math": (0.0, 1.0), "code": (0.0, 1.0), "format": (0.0, 1.0)}


def _build(obj: Any, name: str, options: dict) -> Any:
    """The callable `obj` makes with `options`: a class's instance, or a function with the options bound."""
    if inspect.isclass(obj):
        try:
            return obj(**options)
        except TypeError as e:
            raise ValueError(f"reward {name!r}: bad options {sorted(options)}: {e}") from e
    if options:
        params = inspect.signature(obj).parameters
        unknown = [k for k in options if k not in params and not any(p.kind == p.VAR_KEYWORD for p in params.values())]
        if unknown:
            raise ValueError(f"reward {name!r} takes no option(s) {unknown}; its parameters: {list(params)}")
        fn = obj
        return lambda completion, row: fn(completion, row, **options)
    return obj


def _resolve(name: Any) -> Any:
    """The function or class a reward name stands for (a user's module is imported)."""
    if not isinstance(name, str):
        raise ValueError(f"a reward name must be a string, got {name!r}")
    if name in REWARDS:
        module, attr = REWARDS[name].split(":")
        return getattr(importlib.import_module(module), attr)
    if ":" in name:
        return load_reward_fn(name)
    raise ValueError(f"unknown reward {name!r}; shipped: {', '.join(REWARDS)}, or a user's 'module:function'")


def check_reward(name: str, options: dict) -> None:
    """Raise ValueError for a reward that `get_reward(name, **options)` would refuse, without starting anything
    heavy: what a config is checked with when it loads, before any model is. A shipped class is built (and
    closed) or asked with its `check_options`; a user's class only has its options matched to its signature
    (building it may be costly); a user's function too."""
    obj = _resolve(name)
    if inspect.isclass(obj) and callable(getattr(obj, "check_options", None)):
        obj.check_options(**options)
    elif inspect.isclass(obj) and name not in REWARDS:
        try:
            inspect.signature(obj).bind(**options)
        except TypeError as e:
            raise ValueError(f"reward {name!r}: bad options {sorted(options)}: {e}") from None
    else:
        fn = _build(obj, name, options)
        if callable(fn):
            as_verifier(fn).close()


def check_eval_reward(name: str, options: dict, env: str | None) -> None:
    """`check_reward` for eval.reward, and with task.env `env`: the environment must take a `reward` (the eval
    reward scores its final turn in place of the run's); one that scores its episodes itself cannot be."""
    check_reward(name, options)
    if env and not env_takes_reward(env):
        raise ValueError(f"with task.env={env!r}, which scores its episodes itself (its constructor takes no "
                         "`reward`), eval.reward cannot score them; leave eval.reward unset, or give the "
                         "environment a `reward` parameter that scores its final turn")


def get_reward(name: str, **options: Any) -> Verifier:
    """A verifier `(completion, row) -> float` by shipped name or 'module:function', built with `options`."""
    fn = _build(_resolve(name), name, options)
    if not callable(fn):
        raise ValueError(f"reward {name!r} is not callable")
    fn = as_verifier(fn)
    if name in RANGES and fn.reward_range is None:
        fn.reward_range = RANGES[name]
    return fn


def gold_check(task_cfg, answer_column: str = "answer") -> tuple[bool, Callable[[dict], str | None] | None]:
    """(whether every row needs its `answer`, a check of one row or None) for the run's reward (task.reward or
    each term of task.rewards, with task.env too: it scores the final turn): what the rows must hold for it,
    checked as the task loads, so that a row the reward cannot score is named before the run starts instead of
    failing the RL step that draws it. A shipped reward says which key holds its gold (`gold_key(**options)`:
    math's `answer_key`; `exact` reads `answer`) and what makes a gold unusable (`gold_problem(value)`: math's
    '####' with nothing after it). `answer_column` is the file's column of the `answer` key (task.answer_key),
    for the messages. Not for task.sources (each source's task checks its own rows)."""
    if task_cfg.rewards:
        terms = [(name, options) for _, _, name, options in parse_weighted(task_cfg.rewards)]
    else:
        terms = [(task_cfg.reward, task_cfg.reward_options)] if task_cfg.reward else []
    needs_answer, checks = False, []
    for name, options in terms:
        obj = _resolve(name)
        key = "answer" if name == "exact" else getattr(obj, "gold_key", None)
        if callable(key):
            key = key(**options)
        if not isinstance(key, str):
            continue
        needs_answer = needs_answer or key == "answer"
        problem = getattr(obj, "gold_problem", None)
        checks.append((name, key, answer_column if key == "answer" else key, problem))

    def check(row: dict) -> str | None:
        for name, key, column, problem in checks:
            if key not in row:
                mapped = (f" (task.answer_key maps the column {column!r} to the row's 'answer', which the reward "
                          "reads unless its answer_key option is set: leave that option unset)"
                          if key != "answer" and key == answer_column else "")
                return f"missing the key {column!r}, where the {name} reward reads the gold answer{mapped}"
            bad = problem(row[key]) if callable(problem) else None
            if bad:
                return f"{column!r} (the gold answer of the {name} reward) {bad}"
        return None

    return needs_answer, check if checks else None


def parse_weighted(specs: Any) -> list[tuple[str, float, str, dict]]:
    """task.rewards -> (label, weight, name, options) per term; ValueError naming the entry that is wrong."""
    if not isinstance(specs, list) or not specs:
        raise ValueError(f"task.rewards must be a non-empty list of {{name, weight}}, got {specs!r}")
    terms, seen = [], {}
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
            raise ValueError(f"task.rewards[{i}] must be a mapping with a 'name', got {spec!r}")
        options = {k: v for k, v in spec.items() if k not in ("name", "weight", "label")}
        weight = spec.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"task.rewards[{i}].weight must be a finite number, got {weight!r}")
        label = str(spec.get("label") or spec["name"].split(":")[-1])
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            label = f"{label}_{seen[label]}"
        terms.append((label, float(weight), spec["name"], options))
    return terms


def check_weighted(specs: Any) -> None:
    """Raise ValueError for task.rewards that WeightedRewards would refuse, naming the entry (see check_reward)."""
    for i, (_, _, name, options) in enumerate(parse_weighted(specs)):
        try:
            check_reward(name, options)
        except ValueError as e:
            raise ValueError(f"task.rewards[{i}] ({name}): {e}") from None


class WeightedRewards(Verifier):
    """sum_i weight_i * reward_i(completion, row); `scored` gives each term (unweighted) for logging."""

    def __init__(self, specs: list[dict]):
        self.terms: list[tuple[str, float, Verifier]] = [
            (label, weight, get_reward(name, **options)) for label, weight, name, options in parse_weighted(specs)]
        self.__qualname__ = "+".join(f"{w:g}*{label}" for label, w, _ in self.terms)

    @property
    def reward_range(self) -> tuple[float, float] | None:
        """The sum's (lowest, highest) when every term declares its range, else None."""
        ranges = [reward_range(fn) for _, _, fn in self.terms]
        if any(r is None for r in ranges):
            return None
        lows = [min(w * lo, w * hi) for (_, w, _), (lo, hi) in zip(self.terms, ranges)]
        highs = [max(w * lo, w * hi) for (_, w, _), (lo, hi) in zip(self.terms, ranges)]
        return sum(lows), sum(highs)

    @property
    def call_limit_s(self) -> float | None:
        """What one call may take: its terms' limits, summed (a call runs them one after another)."""
        return sum(fn.call_limit_s or 0.0 for _, _, fn in self.terms) or None

    def components(self, completion: str, row: dict) -> dict[str, float]:
        parts = {}
        for label, _, fn in self.terms:
            try:
                parts[label] = reward_value(fn(completion, row))
            except (TypeError, ValueError) as e:
                raise type(e)(f"term {label!r} {e}") from e
        return parts

    def combine(self, parts: dict[str, float]) -> float:
        return sum(w * parts[label] for label, w, _ in self.terms)

    def scored(self, completion: str, row: dict) -> tuple[float, dict[str, float]]:
        parts = self.components(completion, row)
        return self.combine(parts), parts

    def __call__(self, completion: str, row: dict) -> float:
        return self.combine(self.components(completion, row))

    def metrics(self) -> dict[str, float]:
        """The components' own counters (a judge's failures, math-verify timeouts), merged."""
        out: dict[str, float] = {}
        for _, _, fn in self.terms:
            out.update(fn.metrics())
        return out

    def close(self) -> None:
        for _, _, fn in self.terms:
            fn.close()


class SourceRewards(Verifier):
    """task.sources: each row scored by the verifier of the source it came from (row["task_source"])."""

    def __init__(self, rewards: dict[str, Verifier]):
        self.rewards = {name: as_verifier(fn) for name, fn in rewards.items()}
        self.__qualname__ = "sources(" + ", ".join(f"{name}: {getattr(fn, '__qualname__', fn)}"
                                                   for name, fn in self.rewards.items()) + ")"
        ranges = [fn.reward_range for fn in self.rewards.values()]
        if all(r is not None for r in ranges):  # the lowest and highest any source declares
            self.reward_range = (min(lo for lo, _ in ranges), max(hi for _, hi in ranges))

    def _of(self, row: dict) -> Verifier:
        source = row.get(SOURCE_KEY)
        if source not in self.rewards:
            raise ValueError(f"the row names no source of task.sources ({SOURCE_KEY}={source!r}; sources: "
                             f"{', '.join(self.rewards)})")
        return self.rewards[source]

    def __call__(self, completion: str, row: dict) -> float:
        return self._of(row)(completion, row)

    def scored(self, completion: str, row: dict) -> tuple[float, dict[str, float]]:
        return self._of(row).scored(completion, row)

    def final_answer_of(self, completion: str, row: dict) -> Any:
        return self._of(row).final_answer_of(completion, row)  # the source's extraction (math: the final answer)

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for fn in self.rewards.values():
            out.update(fn.metrics())
        return out

    def close(self) -> None:
        for fn in self.rewards.values():
            fn.close()


def reward_role(task_cfg, default: Callable[[str, dict], float], tokenizer, max_new_tokens: int) -> RewardRole:
    """The run's reward role: task.env's episodes (the environment scoring with the configured reward), or the
    one-turn verifier role `Reward` over `reward_from_config(task_cfg, default)`; with task.sources of which an
    entry names an env, each source's own role (`SourceRoles`). What the pipeline, `rlpost eval` and `rlpost
    curate` sample with."""
    if task_cfg.sources and any(source.env for _, _, source in task_cfg.source_configs()):
        return _source_roles(task_cfg, default, tokenizer, max_new_tokens)
    fn = reward_from_config(task_cfg, default)
    if task_cfg.env:
        return EnvRole.from_config(task_cfg, tokenizer, fn, max_new_tokens)
    _warn_if_cut_short(fn, task_cfg.reward_timeout_s)
    return Reward(fn, tokenizer, on_error=task_cfg.reward_on_error, workers=task_cfg.reward_workers,
                  timeout_s=task_cfg.reward_timeout_s)


def _source_roles(task_cfg, default, tokenizer, max_new_tokens: int) -> SourceRoles:
    """task.sources with an environment on some entry: each source's role built from its own entry (its env,
    max_turns, budget and env_on_error; the one-turn `Reward` for a source without an env)."""
    roles, fns = {}, {}
    for i, (name, _, source) in enumerate(task_cfg.source_configs()):
        fns[name] = fn = reward_from_config(source, default)
        if source.env:  # its errors and warnings name the source
            role = EnvRole.from_config(source, tokenizer, fn, max_new_tokens)
            roles[name] = dataclasses.replace(role, name=f"{source.env} (task.sources[{i}] {name!r})",
                                              key=f"task.sources[{i}]")
        else:
            _warn_if_cut_short(fn, source.reward_timeout_s)
            roles[name] = Reward(fn, tokenizer, on_error=source.reward_on_error, workers=source.reward_workers,
                                 timeout_s=source.reward_timeout_s)
    return SourceRoles(roles, SourceRewards(fns))


def _warn_if_cut_short(fn: Verifier, timeout_s: float | None) -> None:
    """Warn when task.reward_timeout_s is below what the reward may legitimately take per call: its
    `call_limit_s` (an HTTP judge: every attempt timing out, plus the backoffs; a weighted sum's terms
    summed, as one call runs them one after another)."""
    need = fn.call_limit_s or 0.0
    if timeout_s is not None and need > timeout_s:
        warnings.warn(f"task.reward_timeout_s={timeout_s:g} is below the {need:g} s a call of the reward may take "
                      f"(a judge's (retries + 1) * timeout_s plus its backoffs): a slow call would count as hung "
                      f"(task.reward_on_error) before the reward gives up by itself; raise task.reward_timeout_s "
                      f"or lower the reward's retries / timeout_s", stacklevel=3)


def eval_reward_role(eval_cfg, role: RewardRole) -> RewardRole | None:
    """The role evaluation scores with when eval.reward is set: the run's `role` with eval.reward (and
    eval.reward_options) as its verifier (one turn: a `Reward`; with task.env: the environment scoring its final
    turn with it); None when evaluation uses the run's reward."""
    if not eval_cfg.reward:
        return None
    return role.scored_by(get_reward(eval_cfg.reward, **eval_cfg.reward_options))


def reward_from_config(task_cfg, default: Callable[[str, dict], float]) -> Verifier:
    """The reward a run's config asks for: task.rewards (a weighted sum), task.reward (one, by name or
    'module:function', with task.reward_options), else `default` (the task's own verifier)."""
    if task_cfg.sources:  # the default (the mixed task's verify) picks the row's source's verifier itself
        return SourceRewards({name: reward_from_config(source, default)
                              for name, _, source in task_cfg.source_configs()})
    if task_cfg.rewards:
        return WeightedRewards(task_cfg.rewards)
    if task_cfg.reward:
        return get_reward(task_cfg.reward, **task_cfg.reward_options)
    return as_verifier(default)
