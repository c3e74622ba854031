"""Typed run configuration: dataclasses with one help line per field, filled from a YAML recipe and
`dotted.key=value` overrides. An unknown key or a wrongly typed value fails at load time, naming
the key and listing the valid ones, so no run dies after minutes of work on a typo. So does a number
outside its key's range (NaN and +-inf are outside every range), a name outside its key's valid names and a
plug-in's parameter its plug-in refuses.

Each section lives next to what it configures (rlpost/settings/: one module per area) and validates itself
(`Section.validate`, rlpost/schema.py): each field declares its range or valid names, each section checks its
own rules. This module assembles the sections into `Config`, loads it, and keeps the checks that span sections
(`_validate`) and the stage list. It imports no role: the valid names a role owns are read from the leaf
modules that role imports too, and plug-ins (algorithms, preference losses, tasks) are built through a
'module:function' hook (`rlpost.schema.lookup`) when a config is validated.

The defaults *are* the embedded default recipe (recipes/default.yaml spells them out).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from rlpost.schema import ConfigError, RangeError, Section, at_least, check_names, from_dict, hints, lookup, opt
from rlpost.settings.critic import CriticConfig
from rlpost.settings.reference import ReferenceConfig
from rlpost.settings.distill import DistillConfig
from rlpost.settings.eval import EvalConfig
from rlpost.settings.log import LogConfig
from rlpost.settings.model import LORA_TARGETS, LoRAConfig, ModelConfig
from rlpost.settings.preference import PreferenceConfig
from rlpost.settings.prm import PRM_REWARDS, PRMConfig
from rlpost.settings.rejection import RejectionConfig
from rlpost.settings.reward_model import RewardModelConfig
from rlpost.settings.rl import RLConfig
from rlpost.settings.rollout import RolloutConfig
from rlpost.settings.sft import SFTConfig
from rlpost.settings.task import TaskConfig
from rlpost.settings.trainer import TrainerConfig

__all__ = [  # the sections, importable from here as they always were
    "Config", "ConfigError", "CriticConfig", "DistillConfig", "EvalConfig", "LogConfig", "LoRAConfig", "LORA_TARGETS",
    "ModelConfig", "PreferenceConfig", "PRM_REWARDS", "PRMConfig", "ReferenceConfig", "RejectionConfig",
    "RewardModelConfig", "RLConfig", "RolloutConfig", "Section", "SFTConfig", "TaskConfig", "TrainerConfig",
    "config_of", "from_dict", "load_config", "opt", "stage_configs", "stage_names", "to_dict", "with_old_defaults",
    "CHANGED_DEFAULTS"]


@dataclass
class Config(Section):
    seed: int = opt(0, "seed of model init, sampling and data order", at_least(0, "0: a seed like any other"))
    out_dir: str = opt("runs", "parent folder of run directories")
    run_name: str | None = opt(None, "run directory name, a folder inside out_dir (default: recipe name + timestamp)")
    threads: int | None = opt(None, "torch CPU threads (None: torch's default)", at_least(1))
    stages: list[str | dict[str, Any]] | None = opt(
        None, "the run's stages in order, names may repeat: sft | preference (alias dpo) | reward_model | rl | "
              "rejection | eval, each either a name or {name: {key: value}} with the settings that stage alone runs "
              "with (e.g. {rl: {trainer.lr: 1.0e-4}}) (None: sft, eval, preference, eval, reward_model, rl, eval, "
              "rejection, eval, each when its section is on)")
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: dict[str, Any] = opt({"name": "grpo"}, "algorithm name and its parameters, each defaulting to the "
                                                      "algorithm's own (see `rlpost algorithms`)",
                                    plugin="rlpost.algorithms:get_algorithm")
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    rejection: RejectionConfig = field(default_factory=RejectionConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    prm: PRMConfig = field(default_factory=PRMConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def check(self, prefix: str) -> None:
        if self.seed >= 2**63:  # torch.manual_seed takes a 64-bit seed: 2**64 failed at start-up, 10**12 after SFT
            raise ConfigError(f"config key 'seed' must be >= 0 (0: a seed like any other) and below 2**63 (torch's "
                              f"random generators take 64-bit seeds), got {self.seed}")
        # the run directory is out_dir/run_name: a name that leaves out_dir (or is out_dir itself) would write,
        # and on a failed start remove, files outside the folder the user gave for runs
        name = self.run_name
        if name and (not name.strip() or os.path.isabs(name)
                     or os.path.normpath(name).split(os.sep)[0] in (".", "..")):
            raise ConfigError(f"config key 'run_name' is {name!r}: it names a folder inside out_dir "
                              f"({self.out_dir!r}); give a relative name such as 'exp1' or 'sweep/lr3e-4', without "
                              "'..' or a leading '/'")


# ---------------------------------------------------------------------------- the stage list

STAGE_ALIASES = {"dpo": "preference"}


def _stages() -> dict[str, type]:
    """The registered stages (rlpost/stages/: name -> Stage class), read through the hook, not imported. A stage's
    `sections` are the config sections it reads itself, which a stage-list entry may set for that stage alone."""
    return lookup("rlpost.stages:STAGES").classes


# What the run builds once before its first stage (model, task, rewards, rollout engine, weight sync, sharding)
# is the run's, and no stage-list entry sets it.
RUN_KEYS = ("rollout.engine", "rollout.max_new_tokens", "rollout.dtype", "rl.topology", "rl.weight_sync",
            "rl.reward", "trainer.strategy")


def _entry_name(entry: str | dict[str, Any]) -> str:
    name = next(iter(entry), None) if isinstance(entry, dict) else entry  # {}: no name, refused below
    return STAGE_ALIASES.get(name, name) if isinstance(name, str) else name  # not a name: _validate_stages says so


def stage_names(cfg: Config) -> list[str]:
    """The run's stages in order, aliases resolved: `stages` when given, else the fixed order, each stage
    when its section switches it on (sft.steps, preference.enabled, reward_model.train/path, rl.steps,
    rejection.enabled)."""
    if cfg.stages is not None:
        return [_entry_name(s) for s in cfg.stages]
    names = (["sft"] if cfg.sft.steps > 0 else []) + ["eval"]
    if cfg.preference.enabled:
        names += ["preference", "eval"]
    if cfg.reward_model.train or cfg.reward_model.path:
        names.append("reward_model")
    if cfg.rl.steps > 0:
        names += ["rl", "eval"]
    if cfg.rejection.enabled:
        names += ["rejection", "eval"]
    return names


def stage_configs(cfg: Config) -> list[tuple[str, Config]]:
    """Each stage's name and the config it runs with: `cfg` itself, or for a `{name: {key: value}}` entry of the
    stage list a validated copy with those keys set (dotted keys set one value, a section name merges a mapping
    into that section, a plug-in mapping that names its plug-in replaces the run's, as in a recipe: `_merge`)."""
    if cfg.stages is None:
        return [(name, cfg) for name in stage_names(cfg)]
    out = []
    for i, entry in enumerate(cfg.stages):
        name = _entry_name(entry)
        settings = next(iter(entry.values())) if isinstance(entry, dict) else None
        out.append((name, _stage_config(cfg, name, settings, f"stages[{i}] ({name})") if settings else cfg))
    return out


def _stage_config(cfg: Config, name: str, settings: dict[str, Any], where: str) -> Config:
    data = to_dict(cfg)
    data["stages"] = stage_names(cfg)  # the copy validates as one run of the same stages, without recursing
    for key, value in settings.items():
        section = key.split(".")[0]
        sections = _stages()[name].sections
        if section not in sections:
            raise ConfigError(f"config key '{where}' sets {key!r}, which a {name} stage does not read; it may set "
                              f"keys of {', '.join(sections)}")
        if key in RUN_KEYS or (section == key and isinstance(value, dict)
                               and any(f"{key}.{k}" in RUN_KEYS for k in value)):
            raise ConfigError(f"config key '{where}' sets {key!r}: {', '.join(RUN_KEYS)} are built once for "
                              "the whole run; set them at the top of the recipe")
        if "." in key:
            _set(data, key, value, f"{where}: {key}")
        else:
            data = _merge(data, {key: value})
    try:
        stage_cfg = from_dict(Config, data)
        _validate(stage_cfg)
    except ValueError as e:  # a ConfigError, or an algorithm's own refusal
        raise ConfigError(f"{where}: {e}") from None
    if _rl_reward_name(cfg) == "teacher" and stage_cfg.rollout.temperature != cfg.rollout.temperature:
        raise ConfigError(f"config key '{where}' sets rollout.temperature: the distillation teacher scores at the "
                          "run's rollout.temperature; set it at the top of the recipe")
    return stage_cfg


# ---------------------------------------------------------------------------- loading

def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# Keys whose default changed, with the default they had before. A run directory's config.yaml holds the old value
# (or, written before the key existed, nothing); its resume keeps what the run started with (`with_old_defaults`),
# and a command line that leaves the key at its new default does not change the run (rlpost.run.config_differences).
CHANGED_DEFAULTS: dict[str, Any] = {
    "trainer.packing": False,  # now 'auto': packed where the model can and that computes fewer positions
}


def with_old_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """A saved config (nested dict) with each key of CHANGED_DEFAULTS that it lacks set to its old default: the
    run was started when that key, absent, meant the old one."""
    for key, old in CHANGED_DEFAULTS.items():
        *sections, name = key.split(".")
        node = data
        for s in sections:
            node = node.get(s) if isinstance(node, dict) else None
        if isinstance(node, dict) and name not in node:
            node[name] = old
    return data


def _text_key(key: str) -> bool:
    """Whether dotted config key `key` holds text (`str` or `str | None`): a system prompt, a path, a name."""
    cls: Any = Config
    *sections, name = key.split(".")
    for s in sections:
        cls = hints(cls).get(s) if dataclasses.is_dataclass(cls) else None
    tp = hints(cls).get(name) if dataclasses.is_dataclass(cls) else None
    return tp is str or tp == (str | None)


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML (1e-4, true, [1, 2]), except for a
    key that holds text (a prompt, a path, a name), which takes the text as written unless it is quoted (YAML's
    quoting and escapes) or null / ~ (no value): YAML read `task.system_prompt=#1 rule` as a comment, so as null,
    cut `Be brief #2` to 'Be brief', and refused `run_name=2024`, `Answer: ` and `yes` as a number, a mapping and
    a bool."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form key=value (e.g. rl.steps=20)")
    key, raw = override.split("=", 1)
    text = raw.strip()
    if _text_key(key.strip()) and text and text[0] not in "'\"" and text not in ("null", "Null", "NULL", "~"):
        _set(data, key.strip(), text, f"override {override!r}")
        return
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except RepeatedKeyError as e:
        raise ConfigError(f"config key '{key.strip()}': the value {raw!r} of override {override!r} repeats a key: "
                          f"{e.problem}") from None
    except yaml.YAMLError as e:  # often a shell that split `{a: 1}` at its space: name the key, not a parser trace
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        hint = ("" if isinstance(e, yaml.constructor.ConstructorError) else  # (a parse error, not a value's own)
                "; a value with spaces must reach rlpost as one word: quote the whole override in the shell, as in "
                "'rl.reward={name: teacher, teacher: t}'")
        shown, whole = (raw, repr(override)) if len(raw) <= 200 else (raw[:200] + "...", f"{key.strip()}=...")
        raise ConfigError(f"config key '{key.strip()}': the value {shown!r} of override {whole} is not valid YAML "
                          f"({problem}){hint}") from None
    check_names(value, f"override {override!r}", key.strip())
    _set(data, key.strip(), value, f"override {override!r}")


def _set(data: dict[str, Any], key: str, value: Any, where: str) -> None:
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: '{p}' is not a section")
    node[parts[-1]] = value


@functools.cache
def plugin_keys(cls: type | None = None, prefix: str = "") -> frozenset[str]:
    """The dotted keys of the plug-in mappings (fields declaring a `plugin`): 'algorithm', 'preference.loss'."""
    cls = cls or Config
    keys = set()
    for f in dataclasses.fields(cls):
        if "plugin" in f.metadata:
            keys.add(prefix + f.name)
        elif dataclasses.is_dataclass(hints(cls)[f.name]):
            keys |= plugin_keys(hints(cls)[f.name], f"{prefix}{f.name}.")
    return frozenset(keys)


def _merge(base: dict[str, Any], extra: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`extra` over `base`, section by section. A plug-in mapping that gives a name replaces the one before whole:
    the plug-in it names starts from its own defaults, never from the parameters of the one it replaces."""
    out = dict(base)
    for k, v in extra.items():
        replace = prefix + k in plugin_keys() and isinstance(v, dict) and "name" in v
        deep = isinstance(v, dict) and isinstance(out.get(k), dict) and not replace
        out[k] = _merge(out[k], v, f"{prefix}{k}.") if deep else v
    return out


class RepeatedKeyError(yaml.constructor.ConstructorError):
    """A YAML mapping that gives one key twice."""


class _RecipeLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a mapping that repeats a key is an error: PyYAML keeps the last value
    silently, so a recipe with two `rl:` sections lost the first one's keys whole."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # a `<<` merge's keys may be overridden: that is what it is for
                key = self.construct_object(key_node)
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise RepeatedKeyError(
                        None, None, f"the key {key!r} appears twice in one mapping (lines {seen[key]} and {line}); "
                                    "keep one", key_node.start_mark)
                seen[key] = line
        return super().construct_mapping(node, deep)

    def construct_yaml_int(self, node):
        try:
            return super().construct_yaml_int(node)
        except ValueError:  # more digits than Python converts (4300): a bare ValueError, no line, no file
            raise yaml.constructor.ConstructorError(
                None, None, f"a whole number of {len(str(node.value))} characters, more digits than Python reads as a "
                            "number", node.start_mark) from None


_RecipeLoader.add_constructor("tag:yaml.org,2002:int", _RecipeLoader.construct_yaml_int)


# YAML 1.1 (PyYAML) reads a number in exponent notation without a dot (1e-5, 2E3) as a string; YAML 1.2 and every
# reader of a recipe read it as the number it is. A section's float key converted the string, but a weight in
# task.rewards or task.sources, or a reward's or an environment's option, was refused ("must be a finite number,
# got '1e-2'"). The recipe loader reads it as a float.
_RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                    list("-+0123456789"))


def load_yaml(text: str, name: str | None = None) -> Any:
    """`text` read as YAML, as yaml.safe_load reads it, but a key repeated in a mapping is a RepeatedKeyError;
    `name`: the file it came from, for the error's position."""
    loader = _RecipeLoader(text)
    if name is not None:
        loader.name = name
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_recipe(recipe: str) -> dict[str, Any]:
    """The mapping of config keys in recipe file `recipe`; ConfigError naming the file when it is missing, not a
    readable UTF-8 text file, not valid YAML (a key given twice included) or not a mapping of names."""
    try:
        with open(recipe, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ConfigError(f"recipe file not found: {recipe}") from None
    except OSError as e:  # a folder, a file it may not read
        raise ConfigError(f"recipe {recipe} cannot be read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"recipe {recipe}: line {line}: not valid UTF-8 (byte 0x{raw[e.start]:02x}: {e.reason}); "
                          "save the file as UTF-8") from None
    try:
        loaded = load_yaml(text, recipe) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {recipe} is not valid YAML: {e}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"recipe {recipe} must be a mapping of config keys, got {type(loaded).__name__}")
    check_names(loaded, f"recipe {recipe}", "")
    return loaded


def load_config(recipe: str | None = None, overrides: list[str] = (), base: Config | None = None) -> Config:
    """Defaults (or the config `base`: a resumed run's saved one), then the recipe file, then the overrides;
    validated, algorithm parameters included."""
    data: dict[str, Any] = to_dict(base if base is not None else Config())
    if recipe is not None:
        data = _merge(data, read_recipe(recipe))
    for o in overrides:
        apply_override(data, o)
    return config_of(data)


def config_of(data: dict[str, Any]) -> Config:
    """The Config a whole nested dict (`to_dict`'s form) gives, validated as load_config validates."""
    cfg = from_dict(Config, data)
    _validate(cfg)
    return cfg


def _validate(cfg: Config) -> None:
    cfg.validate()  # each section's own keys: ranges, valid names, plug-ins (algorithm, preference.loss), own rules
    _validate_vllm(cfg)
    _validate_reference(cfg)
    _check_rewards(cfg)
    _validate_rejection(cfg)
    _validate_recycle(cfg)
    _validate_stages(cfg)
    try:  # the topology's own settings (rl.topology, rl.weight_sync, ...): its loop checks them (stages known)
        lookup("rlpost.loops:check_config")(cfg, "rl" in stage_names(cfg))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _validate_rl_reward(cfg)


def _validate_vllm(cfg: Config) -> None:
    if cfg.rollout.vllm_sleep and (cfg.rollout.engine != "vllm" or cfg.rl.topology != "colocated"):
        raise ConfigError(f"rollout.vllm_sleep frees the GPU of a vLLM engine that shares it with the trainer: it "
                          f"needs rollout.engine=vllm and rl.topology=colocated (got {cfg.rollout.engine}, "
                          f"{cfg.rl.topology}); set rollout.vllm_sleep=false")


def _validate_reference(cfg: Config) -> None:
    if not cfg.reference.offload:
        return
    if cfg.model.device == "cpu":
        raise ConfigError("config key 'reference.offload' is true with model.device=cpu: nothing to offload to (the "
                          "reference already lives in CPU memory, where the policy computes); set "
                          "reference.offload=false, or run on a GPU")
    if cfg.trainer.strategy == "fsdp2":
        raise ConfigError("config key 'reference.offload' is true with trainer.strategy=fsdp2: the sharded reference "
                          "already holds 1/ranks of the copy on each rank; set reference.offload=false")
    if cfg.model.lora.r > 0:
        raise ConfigError("config key 'reference.offload' is true with model.lora.r > 0: nothing to offload (the "
                          "reference is the policy's own base with its adapters off, not a copy); set "
                          "reference.offload=false")


def _check_rewards(cfg: Config) -> None:
    """The configured rewards checked now, as a section builds its plug-ins: an unknown name, an entry without
    one, a weight that is not a finite number, an option the reward refuses (a code timeout_s of -5, a math
    extract method that does not exist) is a ConfigError naming the key, not a failure at the first reward
    call after the model has loaded (or, under reward_on_error=zero, every sample silently scoring 0)."""
    verifiers = "rlpost.env.verifiers"
    check_reward, check_weighted = lookup(f"{verifiers}:check_reward"), lookup(f"{verifiers}:check_weighted")
    check_eval_reward = lookup(f"{verifiers}:check_eval_reward")
    t = cfg.task
    tasks = [("task.", t)] + [(f"task.sources[{i}].", s)
                              for i, (_, _, s) in enumerate(t.source_configs() if t.sources else [])]
    checks = [(f"{p}rewards", lambda s=s: s.rewards is not None and check_weighted(s.rewards)) for p, s in tasks]
    checks += [(f"{p}reward", lambda s=s: s.reward and check_reward(s.reward, s.reward_options)) for p, s in tasks]
    # an environment's name is checked now too, not when the first episode starts after the model has loaded
    check_env = lookup("rlpost.env.registry:check_env")
    checks += [(f"{p}env", lambda s=s, p=p: s.env and check_env(s.env, s.env_options, f"{p}env")) for p, s in tasks]
    # eval.reward scores the final turn of every environment's episodes (task.env, or each source's)
    checks += [("eval.reward", lambda s=s: cfg.eval.reward and check_eval_reward(cfg.eval.reward,
                                                                                cfg.eval.reward_options, s.env))
               for p, s in tasks if s.env or p == "task."]
    for key, check in checks:
        try:
            check()
        except ValueError as e:
            raise ConfigError(f"config key '{key}': {e}") from None


def _validate_recycle(cfg: Config) -> None:
    if cfg.rl.recycle_every and cfg.trainer.strategy == "fsdp2":
        raise ConfigError("rl.recycle_every with trainer.strategy=fsdp2 is not supported: each rank scores only its "
                          "share of a step's prompts, so the ranks would set aside different prompts and draw "
                          "different ones; set rl.recycle_every=0")


def _validate_rejection(cfg: Config) -> None:
    if "rejection" in stage_names(cfg) and cfg.trainer.strategy == "fsdp2":
        raise ConfigError("the rejection stage with trainer.strategy=fsdp2 is not supported yet: the stage runs after "
                          "RL has sharded the policy; run it as a run of its own: model.name=<the RL checkpoint> "
                          "rl.steps=0 trainer.strategy=single")


def _validate_stages(cfg: Config) -> None:
    """`stages`: known names, each stage's section configured; with a list, the list alone decides what runs,
    so a switch that names a stage the list leaves out is a contradiction."""
    if cfg.stages is None:
        return
    stages = _stages()
    valid = ", ".join(tuple(stages) + tuple(STAGE_ALIASES))
    if not cfg.stages:
        raise ConfigError(f"config key 'stages' is an empty list; give the stages in order ({valid}), or null "
                          "for the default order")
    for i, s in enumerate(cfg.stages):
        if isinstance(s, dict) and (len(s) != 1 or not isinstance(next(iter(s.values())), (dict, type(None)))):
            raise ConfigError(f"config key 'stages[{i}]' must be a stage name or {{name: {{key: value, ...}}}} "
                              f"(one stage and its own settings), got {s!r}")
        name = next(iter(s)) if isinstance(s, dict) else s
        if not isinstance(name, str) or (name not in stages and name not in STAGE_ALIASES):
            raise ConfigError(f"config key 'stages' names an unknown stage {name!r}; valid stages: {valid}")
    names = stage_names(cfg)
    for name, sc in stage_configs(cfg):  # each stage checked with the settings it runs with
        needs = {"sft": (sc.sft.steps < 1, f"sft.steps >= 1 (it is {sc.sft.steps})"),
                 "rl": (sc.rl.steps < 1, f"rl.steps >= 1 (it is {sc.rl.steps})")}
        missing, what = needs.get(name, (False, ""))
        if missing:
            raise ConfigError(f"config key 'stages' has a {name} stage, which needs {what}")
    if names.count("reward_model") > 1:
        raise ConfigError("config key 'stages' has reward_model more than once: a run trains (or loads) one reward "
                          "model, the RL reward of every rl stage after it")
    if ("reward_model" in names and not cfg.reward_model.path and not cfg.preference.train_file
            and cfg.task.name != "arithmetic"):
        raise ConfigError(f"config key 'stages' has a reward_model stage, which needs preference pairs: set "
                          f"preference.train_file or reward_model.path (task {cfg.task.name!r} cannot make wrong "
                          "answers by itself)")
    switches = {"preference.enabled": (cfg.preference.enabled, "preference"),
                "reward_model.train": (cfg.reward_model.train, "reward_model"),
                "reward_model.path": (bool(cfg.reward_model.path), "reward_model"),
                "rejection.enabled": (cfg.rejection.enabled, "rejection")}
    for key, (on, name) in switches.items():
        if on and name not in names:
            raise ConfigError(f"{key} is set but config key 'stages' has no {name} stage: with 'stages' the list "
                              "alone decides which stages run; add it to the list, or unset the key")


def _rl_reward_name(cfg: Config) -> str:
    """The run's RL reward source (rl.reward.name, or the old key that aliases it)."""
    return lookup("rlpost.env.sources:rl_reward_spec")(cfg, stage_names(cfg))[0]


def _validate_rl_reward(cfg: Config) -> None:
    """rl.reward (and the old keys that alias it) checked by the source registry (rlpost/env/sources.py)."""
    try:
        lookup("rlpost.env.sources:check_rl_reward")(cfg, stage_names(cfg))
    except RangeError as e:
        raise ConfigError(f"config key 'rl.reward.{e.key}' must be {e.range.describe(e.optional)}, got "
                          f"{e.value!r}") from None
    except ValueError as e:
        raise ConfigError(str(e)) from None
