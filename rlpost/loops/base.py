"""What a topology is: a Loop, and the registry `rl.topology` picks one from.

A loop decides where steps 2-3 of the controller's seven (rollout and reward) run and how a step's
scored batch is collected; the controller (rlpost/controller.py) runs the seven steps in the same order
whatever the loop. A loop class:

    check(cfg, has_rl)               at config load: the settings it cannot run (rl.weight_sync, trainer.strategy)
    run_engine(cfg, model, tok)      the engine the run builds before its stages (evaluation samples with it)
    place(ctx, params)               the RL stage's rollout: (engine, weight sync), e.g. Ray workers
    collect(ctl, step, n, round_)    steps 1-3 of one round: (scored batch, reward metrics)
    state_dict(), close()            what a checkpoint keeps of it; stop what `place` started

A new topology is one module under rlpost/loops/ with `@LOOPS.register("name")` on its Loop subclass, and
its import in rlpost/loops/__init__.py.
"""

from __future__ import annotations

from rlpost.config import Config, RLConfig, RolloutConfig
from rlpost.registry import Registry

LOOPS = Registry("topology", "topologies")


class Loop:
    """One topology. `elsewhere`: the roles that run in another thread (their seconds overlap this thread's,
    and the controller counts the seconds it waited for them instead)."""

    name: str
    description = ""
    elsewhere: tuple[str, ...] = ()
    # the rl.weight_sync values this loop accepts ("auto": the engine's own way)
    weight_syncs: tuple[str, ...] = ("auto",)

    def __init__(self, cfg: RLConfig, rollout: RolloutConfig):
        self.cfg, self.rollout = cfg, rollout

    @classmethod
    def check(cls, cfg: Config, has_rl: bool) -> None:
        """Refuse settings this topology cannot run (a ValueError naming the keys); `has_rl`: the run has an
        RL stage (some settings only matter there)."""

    @classmethod
    def run_engine(cls, cfg: Config, model, tokenizer):
        """The engine the run builds before its stages (held-out evaluation, rejection sampling sample with it)."""
        raise NotImplementedError

    def place(self, ctx, params):
        """The RL stage's rollout: (engine, weight sync)."""
        raise NotImplementedError

    def collect(self, ctl, step: int, n_prompts: int, round_: int):
        """Steps 1-3 for `n_prompts` new prompts of `step`'s round `round_`: (scored batch, reward metrics with
        `time/rollout`, `time/reward` and `time/rollout_wait`)."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """What a checkpoint must keep besides the controller's sampler and algorithm (merged into its state)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def close(self) -> None:
        """Stop what `place` started; idempotent."""


def loop_class(topology: str) -> type[Loop]:
    """The Loop registered as `topology`; an unknown name fails with the valid ones."""
    if topology not in LOOPS.classes:
        raise ValueError(f"config key 'rl.topology' is {topology!r}; valid values: {', '.join(LOOPS.classes)}")
    return LOOPS.classes[topology]


def weight_sync_names() -> list[str]:
    """Every rl.weight_sync value some topology accepts, in registration order."""
    names: list[str] = []
    for cls in LOOPS.classes.values():
        names += [n for n in cls.weight_syncs if n not in names]
    return names


def check_config(cfg: Config, has_rl: bool) -> None:
    """The topology's checks of a run config (called at config load, before any model loads)."""
    cls = loop_class(cfg.rl.topology)
    if cfg.rl.weight_sync not in weight_sync_names():
        raise ValueError(f"config key 'rl.weight_sync' is {cfg.rl.weight_sync!r}; valid values: "
                         f"{', '.join(weight_sync_names())}")
    cls.check(cfg, has_rl)
