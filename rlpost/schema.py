"""What a config value may be: its type, for a number the range it means something in, for a name the
names it may be. Shared by the run config's sections (rlpost/settings/, assembled in rlpost/config.py) and the
plug-ins' own configs (algorithms, preference losses, tasks), so that a bad value is refused when the config
loads, naming the key, the value and what is allowed. This module is a leaf: it imports no rlpost module, so a
section (and anything else) can import it without pulling in torch or a role.

A numeric field declares its range next to itself: in its field metadata (`opt(default, help, Range(...))`
in a section module), or, for a plug-in `Config` whose fields carry docstrings, in the class's `ranges`
table (a subclass adds to, or overrides, its bases' tables). NaN and +-inf lie outside every range,
declared or not: a number that is not finite never reaches a run.

    at_least(1)                         >= 1
    at_least(0, "0: off")               >= 0 (0: off)       the note says what a boundary value means
    above(0)                            > 0
    between(0, 1)                       in [0, 1]
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator


@dataclass(frozen=True)
class Range:
    """The values a numeric key means something for: from `low` to `high` (None: unbounded), each bound
    included unless `low_open` / `high_open`; always finite. `note` says what a boundary value means
    ("0: off"); `what` names the range ("a positive learning rate")."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    note: str = ""
    what: str = ""

    def __contains__(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def bounds(self) -> str:
        """The range in symbols: '>= 0', '> 0', 'in [0, 1)', 'finite'."""
        lo, hi = self.low, self.high
        if lo is not None and hi is not None:
            return f"in {'(' if self.low_open else '['}{lo:g}, {hi:g}{')' if self.high_open else ']'}"
        if lo is not None:
            return f"{'>' if self.low_open else '>='} {lo:g}"
        if hi is not None:
            return f"{'<' if self.high_open else '<='} {hi:g}"
        return "finite"

    def describe(self, optional: bool = False) -> str:
        """The range as an error message says it: '>= 1 or null (0: off)', 'a positive learning rate (> 0)'."""
        text = f"{self.what} ({self.bounds()})" if self.what else self.bounds()
        text += " or null" if optional else ""
        return f"{text} ({self.note})" if self.note else text


def at_least(low: float, note: str = "") -> Range:
    """>= low."""
    return Range(low, note=note)


def above(low: float, note: str = "", what: str = "") -> Range:
    """> low."""
    return Range(low, low_open=True, note=note, what=what)


def between(low: float, high: float, note: str = "", *, low_open: bool = False, high_open: bool = False) -> Range:
    """From low to high, both included unless said otherwise."""
    return Range(low, high, low_open=low_open, high_open=high_open, note=note)


FINITE = Range()  # any finite number: what a numeric field without a declared range may be


class RangeError(ValueError):
    """A numeric value outside its key's range; `key`, `value` and `range` say which, for callers that name
    the key their own way (the run config says 'config key algorithm.beta' for an algorithm's 'beta')."""

    def __init__(self, message: str, key: str, value: float, range: Range, optional: bool):
        super().__init__(message)
        self.key, self.value, self.range, self.optional = key, value, range, optional


# ---------------------------------------------------------------------------- types

def type_ok(value: Any, tp: Any) -> tuple[bool, Any]:
    """(accepted, converted value) for a value against an annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v = type_ok(value, arg)
            if ok:
                return True, v
        return False, value
    if tp is type(None):
        return value is None, value
    if tp is Any:
        return True, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:  # an int is a fine float; so is "1e-3" or "nan", which YAML 1.1 reads as strings
        if isinstance(value, str):
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return isinstance(value, (int, float)) and not isinstance(value, bool), value
    if tp is str:
        return isinstance(value, str), value
    if origin is dict or tp is dict:
        return isinstance(value, dict), dict(value) if isinstance(value, dict) else value
    if origin is list:  # a list of plain values holds values of its type (a list of steps holds whole numbers);
        # a list of mappings is checked item by item by its section, which names the item
        (item,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list) or item not in (str, int, float, bool):
            return isinstance(value, list), value
        items = [type_ok(v, item) for v in value]
        return all(ok for ok, _ in items), [v for _, v in items]
    raise TypeError(f"unsupported config annotation {tp}")


def type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


@functools.cache
def hints(cls: type) -> dict[str, Any]:
    """typing.get_type_hints(cls), once per class (a config loads many times in a sweep or a test)."""
    return typing.get_type_hints(cls)


def numeric_type(tp: Any) -> tuple[type, bool] | None:
    """(int or float, whether None is allowed) for a numeric annotation (`int`, `float | None`, ...); None
    for any other (bool is not a number here)."""
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    optional = type(None) in args
    rest = [a for a in args if a is not type(None)]
    if len(rest) == 1 and rest[0] in (int, float):
        return rest[0], optional
    return None


# ---------------------------------------------------------------------------- ranges

def declared_range(cls: type, name: str) -> Range | None:
    """The range dataclass `cls` declares for its field `name`: the field's metadata, else the nearest
    `ranges` table along the class's bases; None when it declares none."""
    for f in dataclasses.fields(cls):
        if f.name == name and "range" in f.metadata:
            return f.metadata["range"]
    for c in cls.__mro__:
        table = vars(c).get("ranges")
        if isinstance(table, dict) and name in table:
            return table[name]
    return None


@functools.cache
def numeric_fields(cls: type) -> dict[str, tuple[type, bool, Range | None]]:
    """{name: (int or float, None allowed, declared range or None)} of the numeric fields of dataclass `cls`
    (its own, not those of nested dataclasses)."""
    types_of = hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        kind = numeric_type(types_of[f.name])
        if kind is not None:
            out[f.name] = (*kind, declared_range(cls, f.name))
    return out


def out_of_range(obj: Any) -> Iterator[tuple[str, float, Range, bool]]:
    """(field, value, range, None allowed) of each numeric field of dataclass instance `obj` whose value lies
    outside its range (FINITE when it declares none). None passes where the annotation allows it."""
    for name, (_, optional, rng) in numeric_fields(type(obj)).items():
        value = getattr(obj, name)
        if value is None and optional:
            continue
        rng = rng or FINITE
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value not in rng:
            yield name, value, rng, optional


def check_ranges(obj: Any, message: typing.Callable[[str, float, str], str]) -> None:
    """Raise RangeError for the first numeric field of `obj` outside its range, with the text
    `message(field, value, what is allowed)`."""
    for key, value, rng, optional in out_of_range(obj):
        raise RangeError(message(key, value, rng.describe(optional)), key, value, rng, optional)


# ---------------------------------------------------------------------------- sections

class ConfigError(ValueError):
    """A recipe or override that does not fit the schema."""


LEARNING_RATE = above(0, what="a positive learning rate")
ADAM_BETA = between(0, 1, "0: no averaging", high_open=True)


def from_dict(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{'config key ' + repr(path[:-1]) if path else 'recipe'}: expected a mapping, got "
                          f"{type(data).__name__}")
    types_of = hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        where = f"{path}{key}"
        if (key not in fields and isinstance(key, str) and "." in key and key.split(".")[0] in fields
                and dataclasses.is_dataclass(types_of[key.split(".")[0]])):
            # `trainer.lr: 1e-4` in a recipe: a key rlpost knows, in the spelling of an override, not of a mapping
            first, rest = key.split(".", 1)
            raise ConfigError(f"config key '{where}' is written dotted inside a mapping: a recipe nests its sections "
                              f"({first}: {{{rest}: ...}}, or '{first}:' with '  {rest}: ...' on the next line); the "
                              "dotted form is for key=value overrides and a stage-list entry's settings")
        if key not in fields:
            raise ConfigError(f"unknown config key '{where}'; valid keys{' under ' + path[:-1] if path else ''}: "
                              f"{', '.join(fields)}")
        tp = types_of[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value, where + ".")
            continue
        ok, converted = type_ok(value, tp)
        if not ok:
            raise ConfigError(f"config key '{where}' expects {type_name(tp)}, got {type(value).__name__} {value!r}")
        kwargs[key] = converted
    return cls(**kwargs)


def opt(default: Any, help: str, range: Range | None = None, *, choices: Iterable[str] | str | None = None,
        plugin: str | None = None, layout: bool = False) -> Any:
    """A config field with its help line (shown by `rlpost train --help`) and, for a number, the range of
    values it means something for (checked at load time; every numeric key declares one).

    `choices`: the names a string field may take: a tuple (defined in a leaf module that the role reading the
    key imports too), or a 'module:attribute' reference to a collection filled by the role's package (a
    registry), looked up only when the config is validated (`lookup`). `plugin`: the field is a plug-in's
    mapping {name, ...parameters}; 'module:function' builds it from that mapping (`build_plugin`).
    `layout`: the key changes only how the same computation is laid out in memory (micro-batches, packing,
    chunks, recomputation, offload, the rollout's batch, vLLM's sleep), not what is computed up to float
    summation order: `--resume` may change it (`layout_keys`). A key that changes the numerics beyond that, the
    data order, a random stream, the algorithm, the model, the precision or the number of optimizer steps is
    not one."""
    metadata: dict[str, Any] = {"help": help}
    for key, value in (("range", range), ("choices", choices), ("plugin", plugin)):
        if value is not None:
            metadata[key] = value
    if layout:
        metadata["layout"] = True
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@functools.cache
def layout_keys(cls: type, prefix: str = "") -> tuple[str, ...]:
    """The dotted names of the fields of config dataclass `cls` (nested sections too) declared `opt(...,
    layout=True)`, in declaration order: the keys a resumed run may change (rlpost.run.resume_changes)."""
    keys: list[str] = []
    types_of = hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(types_of[f.name]):
            keys.extend(layout_keys(types_of[f.name], f"{prefix}{f.name}."))
        elif f.metadata.get("layout"):
            keys.append(prefix + f.name)
    return tuple(keys)


def lookup(ref: str) -> Any:
    """The object a 'module:attribute' reference names, its module imported now. The hook through which a
    section reads what a role's package defines (its registered names, its plug-in builder) without importing
    the role itself: the import happens when a config is validated, not when the section is."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def valid_names(choices: Iterable[str] | str) -> tuple[str, ...]:
    """The names a `choices` declaration allows, in their own order (a reference is looked up first)."""
    return tuple(lookup(choices) if isinstance(choices, str) else choices)


def check_choice(key: str, value: Any, choices: Iterable[str] | str) -> None:
    """Raise ConfigError when `value` is not one of `choices`, listing the valid names."""
    valid = valid_names(choices)
    if value not in valid:
        raise ConfigError(f"config key '{key}' is {value!r}; valid values: {', '.join(valid)}")


def build_plugin(build: Any, params: dict[str, Any], key: str, *, name: str | None = None) -> Any:
    """Build a plug-in (an algorithm, a preference loss, a task's options) from config key `key`'s parameters,
    now: an unknown name or parameter is its own error; a number outside the range the plug-in declares is
    named as a config key. `build` is the builder or its 'module:function' reference; `name`: the plug-in's
    name when it is not the mapping's 'name' (then `key` names the parameters' mapping)."""
    if name is None and "name" not in params:  # a recipe's mapping replaces the one before whole, name included
        raise ConfigError(f"config key '{key}' needs a 'name' besides its parameters, got {params!r}")
    build = lookup(build) if isinstance(build, str) else build
    try:
        return build(**params) if name is None else build(name, **params)
    except RangeError as e:
        which = f"{key.rsplit('.', 1)[0]}.name={name}" if name is not None else f"{key}.name={params.get('name')}"
        raise ConfigError(f"config key '{key}.{e.key}' must be {e.range.describe(e.optional)}, got {e.value!r} "
                          f"({which})") from None
    except ValueError as e:
        raise ConfigError(f"config key '{key}': {e}") from None


class Section:
    """A config section (and the whole Config): it checks its own keys. `validate` refuses a number outside
    the range its field declares, a name outside its field's `choices` and a plug-in mapping its plug-in
    refuses, in this section and the sections nested in it, then applies `check`, the section's own rules that
    declarations cannot say (keys of the section that go together)."""

    def validate(self, prefix: str = "") -> None:
        """Raise ConfigError naming the first bad key of this section (`prefix`: its dotted path, e.g. 'model.')."""
        try:
            check_ranges(self, lambda key, value, allowed: f"config key '{prefix}{key}' must be {allowed}, "
                                                           f"got {value!r}")
        except RangeError as e:
            raise ConfigError(str(e)) from None
        for f in dataclasses.fields(self):
            if "choices" in f.metadata:
                check_choice(prefix + f.name, getattr(self, f.name), f.metadata["choices"])
            if "plugin" in f.metadata:
                build_plugin(f.metadata["plugin"], getattr(self, f.name), prefix + f.name)
        self.check(prefix)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Section):
                value.validate(f"{prefix}{f.name}.")

    def check(self, prefix: str) -> None:
        """The section's own rules beyond the declarations of its fields (none by default)."""


def describe(cls: type, prefix: str = "") -> list[str]:
    """One line per key of the config dataclass `cls` (nested sections too): name, default, help, and a number's
    allowed range. `rlpost train --help` lists `describe(Config)`."""
    lines = []
    types_of = hints(cls)
    default = cls()
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(types_of[f.name]):
            lines.extend(describe(types_of[f.name], f"{prefix}{f.name}."))
        else:
            rng = f.metadata.get("range")
            allowed = f" [{rng.bounds()}]" if rng is not None else ""
            lines.append(f"  {prefix + f.name:<28} {getattr(default, f.name)!s:<14} {f.metadata.get('help', '')}"
                         f"{allowed}")
    return lines


def check_names(value: Any, where: str, key: str, _inside: tuple[int, ...] = ()) -> None:
    """Every mapping key in a recipe or an override value is a name (a config key, a plug-in's or a reward's
    option): YAML reads `1: 2` or `null: x` as a number or None, which broke the merge and the plug-ins'
    keyword arguments with a TypeError; refused here naming where it sits. So is a value that holds itself (a
    YAML alias inside its own anchor, `a: &x [*x]`), which no config key can mean and which recursed without end."""
    if isinstance(value, (dict, list)):
        if id(value) in _inside:
            raise ConfigError(f"{where}: config key '{key}' holds itself (a YAML alias *name used inside its own "
                              "&name anchor); write the value out")
        _inside += (id(value),)
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                inside = f"config key '{key}' has" if key else "the top level has"
                raise ConfigError(f"{where}: {inside} the key {k!r} ({type(k).__name__}); keys are names: quote it "
                                  f"('{k}': ...) if it is meant as text")
            check_names(v, where, f"{key}.{k}" if key else k, _inside)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_names(v, where, f"{key}[{i}]", _inside)
