"""A SOURCE of the RL reward: the plug-in that rlpost/env/sources.py's registry holds (`rl.reward`).

    @register("mine")
    class MySource(RewardSource):
        description = "one line for the docs"

        @dataclass
        class Config:                # its options: rl.reward: {name: mine, scale: 2.0}
            scale: float = 1.0

        def build(self, inputs: SourceInputs):
            return over_episodes(inputs.verifier, MyScorer(inputs.tokenizer, self.options.scale))

A source's `build` returns the RL stage's reward role: `role(batch) -> (batch with rewards, metrics)`, called
on every sampled batch (one-turn), or, with task.env, an `EnvRole` whose episodes it rescores
(`over_episodes`). Its options are checked when the config loads (`make_config`: unknown keys, types, the
`ranges` of its numbers), then by its own `check`, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from rlpost.batch import Batch
from rlpost.env import EnvRole
from rlpost.env.per_source import SourceRoles
from rlpost.registry import Registry, make_config

SOURCES = Registry("RL reward source", "RL reward sources")
register = SOURCES.register  # class decorator: @register("name")


@dataclass
class SourceInputs:
    """What a source is built from: the run's config (`Config`), the policy's tokenizer, the task's reward
    role (`verifier`: an `rlpost.env.reward.Reward`, or the `EnvRole` that runs task.env's episodes), a few
    training prompts to compare tokenizers on, the task's system prompt, and, once the reward_model stage
    has run, its model (`reward_model`: (model, its tokenizer)); `trainer`: the `trainer.*` section whose
    micro-batching the learned scorers score in, where `cfg` is not given (None: cfg.trainer)."""

    cfg: Any
    tokenizer: Any
    verifier: Any
    prompts: list
    system: str | None = None
    reward_model: tuple | None = None
    trainer: Any = None

    def micro_batching(self) -> dict:
        """The run's micro-batching as a learned scorer's keyword arguments (`micro_batching`)."""
        return micro_batching(self.trainer if self.trainer is not None else getattr(self.cfg, "trainer", None))


def micro_batching(trainer) -> dict:
    """`trainer.*`'s micro-batching (`micro_batch_size`, `micro_batch_tokens`, `packing`) as keyword arguments of
    a learned scorer (reward model, PRM, teacher), which scores in the trainer's micro-batches; none without a
    trainer section."""
    if trainer is None:
        return {}
    return dict(micro_batch_size=trainer.micro_batch_size, micro_batch_tokens=trainer.micro_batch_tokens,
                packing=trainer.packing)


class RewardSource:
    """Base class of the RL reward sources (see the module docstring). `options` is the filled `Config`;
    `where` names, for each option, the config key it came from (rl.reward.<option>, or an old key such as
    distill.teacher), so that errors name what the user wrote."""

    name = "source"
    description = ""
    # the older keys that stand for this source (rlpost/env/sources.py): a config key whose being set chooses
    # it, a stage whose presence in the run chooses it, and section keys that set its options (option -> key)
    alias_switch: str | None = None
    alias_stage: str | None = None
    alias_keys: dict[str, str] = {}

    @dataclass
    class Config:
        pass

    def __init__(self, where: dict[str, str] | None = None, **options: Any):
        self.where = where or {}
        self.options = make_config(self.Config, options, f"rl.reward (name: {self.name})")

    def key(self, option: str) -> str:
        """The config key an option was set by."""
        return self.where.get(option, f"rl.reward.{option}")

    def check(self, cfg: Any, stages: list[str]) -> None:
        """Raise ValueError when the run cannot use this source (`stages`: the run's stage names)."""

    def build(self, inputs: SourceInputs) -> Any:
        """The RL reward role."""
        raise NotImplementedError


class Rescored:
    """A learned scorer over task.env's episodes: the environment ran them and its reward (an episode's sum)
    is kept as the gold (`reward/gold_mean`), the episode's text stays its completion, and the scorer's
    rewards replace it."""

    def __init__(self, scorer):
        self.scorer = scorer

    def __call__(self, batch: Batch) -> tuple[Batch, dict[str, float]]:
        gold = batch.rewards.float()
        gold = gold.sum(1) if gold.dim() == 2 else gold
        scored, metrics = self.scorer(batch)
        meta = {**scored.meta, "completion": batch.meta["completion"], "gold_reward": gold.tolist()}
        return scored.replace(meta=meta), metrics


def runs_episodes(verifier) -> bool:
    """Does the task's reward role run task.env's episodes (an `EnvRole`, or task.sources' roles where an entry
    names an env), rather than score one turn?"""
    return isinstance(verifier, (EnvRole, SourceRoles))


def over_episodes(verifier, scorer):
    """The RL reward role of a learned `scorer`: the scorer itself for one-turn samples; with task.env
    (`verifier` is the `EnvRole`) the environment's role, whose episodes the scorer then rescores."""
    if runs_episodes(verifier):
        return dataclasses.replace(verifier, rescore=Rescored(scorer))
    return scorer


def episode_reward(verifier):
    """The task's own reward of a sample that a learned scorer reports beside its own (`gold`): the
    one-turn verifier's function; None with task.env, where `Rescored` reports the environment's."""
    return None if runs_episodes(verifier) else getattr(verifier, "fn", None)
