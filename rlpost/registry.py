"""Named plug-ins with typed parameters: the one mechanism behind `get_algorithm`, `get_preference_loss`
and the tasks (`rlpost.tasks.TASKS`).

    ALGORITHMS = Registry("algorithm", "algorithms")

    @ALGORITHMS.register("grpo")
    class GRPO(Algorithm): ...

    ALGORITHMS.build("grpo", beta=0.04)    # an unknown name or parameter fails with the valid choices

A plug-in class declares its knobs as a nested `Config` dataclass (every registered class has one);
`make_config` fills it from keyword parameters, naming any unknown one, any of the wrong type and any number
outside the range the `Config` declares for it (rlpost/schema.py: a `ranges` table on the class).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from rlpost.schema import check_ranges, hints, type_name, type_ok


def make_config(config_cls: type, params: dict[str, Any], owner: str) -> Any:
    """`config_cls(**params)`, or a ValueError naming the unknown parameters of `owner` and the valid ones, a
    parameter of the wrong type, or (a RangeError) a number outside its declared range."""
    valid = [f.name for f in dataclasses.fields(config_cls)]
    unknown = [k for k in params if k not in valid]
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(map(repr, unknown))} for {owner}; "
                         f"valid parameters: {', '.join(valid) or '(none)'}")
    types_of = hints(config_cls)
    converted = {}
    for key, value in params.items():
        ok, converted[key] = type_ok(value, types_of[key])  # "nan" from a command line becomes a float, then refused
        if not ok:
            raise ValueError(f"{owner}: {key} expects {type_name(types_of[key])}, got {type(value).__name__} "
                             f"{value!r}")
    cfg = config_cls(**converted)
    check_ranges(cfg, lambda key, value, allowed: f"{owner}: {key}={value!r}; it must be {allowed}")
    return cfg


class Registry:
    """name -> plug-in class; `kind` / `plural` name them in error messages ("algorithm", "algorithms")."""

    def __init__(self, kind: str, plural: str):
        self.kind, self.plural = kind, plural
        self.classes: dict[str, type] = {}

    def register(self, name: str):
        """Class decorator: make a class available as `build(name)`; sets its `name`."""

        def wrap(cls: type) -> type:
            if name in self.classes:
                raise ValueError(f"{self.kind} {name!r} is already registered by {self.classes[name].__module__}")
            cls.name = name
            self.classes[name] = cls
            return cls

        return wrap

    def __iter__(self):
        """The registered names, in the order they registered (a config lists them so)."""
        return iter(self.classes)

    def parameters(self, name: str) -> tuple[str, ...]:
        """The parameters (its `Config`'s fields) of the plug-in registered as `name`."""
        return tuple(f.name for f in dataclasses.fields(self.classes[name].Config))

    def having(self, parameter: str) -> list[str]:
        """The registered names whose plug-in has `parameter`."""
        return [name for name in self.classes if parameter in self.parameters(name)]

    def available(self) -> dict[str, str]:
        """Registered names -> one-line descriptions."""
        return {name: cls.description for name, cls in sorted(self.classes.items())}

    def build(self, name: str, **params: Any):
        """An instance of the class registered as `name`; an unknown name fails with the valid ones."""
        if not isinstance(name, str) or name not in self.classes:  # (a YAML list or mapping is no name: unhashable)
            raise ValueError(f"unknown {self.kind} {name!r}; valid {self.plural}: {', '.join(sorted(self.classes))}")
        return self.classes[name](**params)
