"""THE RL REWARD: `rl.reward` names where the RL stage's reward comes from, one source of a registry (as
`algorithm` names one algorithm), with the source's options beside its name:

    rl:
      reward: {name: verifier}       # the default: the task's verifier (task.reward / task.rewards), or
                                     # with task.env the environment's own reward
      reward: {name: reward_model}   # the Bradley-Terry model of the run's reward_model stage
      reward: {name: teacher, teacher: runs/big/checkpoints/final, coef: 1.0}   # on-policy distillation
      reward: {name: prm, path: runs/prm/checkpoints/prm, coef: 1.0, reward: delta, separator: ";"}

One key, one name: two sources can never both be asked for. The older keys still choose a source, as
aliases: `distill.teacher: X` is `{name: teacher, teacher: X}` (distill.coef its coef), `prm.path: P` is
`{name: prm, path: P}` (prm.coef, prm.reward, prm.separator its options), a reward_model stage in the run
(reward_model.train / reward_model.path, or `stages`) is `{name: reward_model}`, the stage supplying the
model. A source's option set both ways must agree, and an alias beside another rl.reward name is refused.
`verifier`, the default, gives way to an alias.

Each learned source also runs with task.env: the environment plays the episodes, its reward is logged as
`reward/gold_mean`, and the source scores the episodes (rlpost/env/source.py's `over_episodes`).

A new source is one module with a `RewardSource` subclass registered by `@register("name")`
(rlpost/env/source.py) and one import line at the end of this file.
"""

from __future__ import annotations

from typing import Any

from rlpost.env.source import SOURCES, RewardSource, SourceInputs, register

__all__ = ["SOURCES", "RewardSource", "SourceInputs", "available", "build_rl_reward", "check_rl_reward",
           "rl_reward_spec"]


@register("verifier")
class VerifierSource(RewardSource):
    description = "the task's verifier (task.reward / task.rewards), or task.env's own reward"

    def build(self, inputs: SourceInputs) -> Any:
        return inputs.verifier


def available() -> dict[str, str]:
    """Registered source names -> one-line descriptions."""
    return SOURCES.available()


def _value(cfg, key: str) -> tuple[Any, Any]:
    """(value, default) of a dotted section key such as 'distill.coef'."""
    section_name, name = key.split(".")
    section = getattr(cfg, section_name)
    return getattr(section, name), getattr(type(section)(), name)


def _chosen_by_alias(cfg, stages: list[str]) -> list[tuple[str, str]]:
    """(source name, the key or stage that chose it) for every old key that chooses a source."""
    chosen = []
    for name, cls in sorted(SOURCES.classes.items()):
        if cls.alias_switch is not None and _value(cfg, cls.alias_switch)[0] is not None:
            chosen.append((name, f"{cls.alias_switch}={_value(cfg, cls.alias_switch)[0]!r}"))
        if cls.alias_stage is not None and cls.alias_stage in stages:
            chosen.append((name, f"a {cls.alias_stage} stage"))
    return chosen


def rl_reward_spec(cfg, stages: list[str]) -> tuple[str, dict[str, Any], dict[str, str]]:
    """(name, options, where) of the run's RL reward: `rl.reward`, with the old keys that alias it folded in
    (`where`: option -> the config key that set it). `stages`: the run's stage names. ValueError naming the
    keys when they disagree."""
    spec = cfg.rl.reward
    valid = ", ".join(sorted(SOURCES.classes))
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ValueError(f"config key 'rl.reward' needs a 'name' ({valid}) besides the source's options, got "
                         f"{spec!r}")
    name, options = spec["name"], {k: v for k, v in spec.items() if k != "name"}
    chosen = _chosen_by_alias(cfg, stages)
    if len(chosen) > 1:
        (a, why_a), (b, why_b) = chosen[:2]
        raise ValueError(f"{why_a} and {why_b} both choose the RL reward (rl.reward.name={a} and {b}); a run "
                         "has one RL reward: keep one")
    if chosen:
        alias, why = chosen[0]
        if name not in ("verifier", alias):
            raise ValueError(f"rl.reward.name={name} and {why} (which means rl.reward.name={alias}) both choose the "
                             "RL reward; a run has one RL reward: keep one")
        name = alias
    if name not in SOURCES.classes:
        raise ValueError(f"config key 'rl.reward.name' is {name!r}; valid RL reward sources: {valid}")
    where = {}
    for option, key in SOURCES.classes[name].alias_keys.items():
        value, default = _value(cfg, key)
        if value == default:  # not set: the source's own default, or rl.reward's value
            continue
        if option in options and options[option] != value:
            raise ValueError(f"rl.reward.{option}={options[option]!r} and {key}={value!r} set the same option of "
                             f"the {name} reward differently; set it once (rl.reward.{option})")
        options[option], where[option] = value, key
    return name, options, where


def check_rl_reward(cfg, stages: list[str]) -> None:
    """The run's RL reward checked when the config loads: its name, its options (unknown, wrongly typed, out
    of range) and the source's own conditions (e.g. an RL stage); ValueError naming the key."""
    name, options, where = rl_reward_spec(cfg, stages)
    SOURCES.build(name, where=where, **options).check(cfg, stages)


def build_rl_reward(name: str, options: dict[str, Any], inputs: SourceInputs,
                    where: dict[str, str] | None = None) -> Any:
    """The RL stage's reward role from source `name` with `options` (see `rl_reward_spec`)."""
    return SOURCES.build(name, where=where, **options).build(inputs)


# Importing a module registers its source (one line per source).
from rlpost.env import process_reward, reward_model, teacher  # noqa: E402,F401
