"""task.*: the prompts, their reward and the environment (rlpost/tasks/, rlpost/env/).

The tasks are plug-ins: each registers itself by name in rlpost/tasks/ (`TASKS`), with its own options (a
nested `Config`, like an algorithm's), set as task.options. Options that once were flat keys of this section
keep their flat names as aliases (OPTION_ALIASES). This module reads the registry only through its name
(`lookup`), when a config is validated: importing it imports no task.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from rlpost.schema import ConfigError, Section, above, at_least, between, build_plugin, from_dict, lookup, opt

TASKS = "rlpost.tasks:TASKS"  # the task registry: its names are the valid task.name values
ON_ERROR = ("raise", "zero")  # task.reward_on_error, task.env_on_error
OPTION_ALIASES = ("answer_format_rate",)  # flat task.* keys that are a task's option (task.options.<key>)
# task.sources: the keys of the whole run, which every source shares (set them as task.*, not in an entry)
RUN_KEYS = ("reward_on_error", "reward_timeout_s", "reward_workers", "system_prompt")
# task.sources: the episode keys an entry with an env may set for itself; task.<key> is every entry's default
SOURCE_ENV_KEYS = ("max_turns", "max_episode_tokens", "env_timeout_s", "env_on_error")
# names a source may not take: reward/<source> sits beside these metrics
RESERVED_SOURCE_NAMES = ("mean", "std", "errors", "timeouts", "gold_mean")
_SOURCE_NAME = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass
class TaskConfig(Section):
    name: str = opt("arithmetic", "an embedded task: arithmetic (the default), multiply (tool), multistep (chain of "
                                  "thought), functions (code), grading (a judge), web (search and browse); or 'file' "
                                  "(train_file / eval_file; 'jsonl' is an alias)", choices=TASKS)
    train_file: str | None = opt(None, "file task: training prompts {prompt, answer[, completion]}: a .jsonl, .json "
                                       "or .parquet file, or a folder saved by `datasets`")
    eval_file: str | None = opt(None, "file task: held-out prompts, same formats (None: train_file's eval_split when "
                                      "it is a DatasetDict folder that has one)")
    train_split: str = opt("train", "file task: the split of a DatasetDict folder that train_file reads")
    eval_split: str = opt("test", "file task: the split of a DatasetDict folder that eval_file reads")
    prompt_key: str = opt("prompt", "file task: the column of each row's prompt (a string, or chat messages)")
    answer_key: str = opt("answer", "file task: the column of the gold answer (the reward reads row['answer'])")
    completion_key: str = opt("completion", "file task: the column of an SFT demonstration (reasoning + answer)")
    messages_key: str = opt("messages", "file task: chat messages [{role, content}], the prompt of rows without "
                                        "one; a last assistant message becomes the completion")
    system_prompt: str | None = opt(None, "a system message before every prompt that goes through the chat "
                                          "template (message prompts, or model.chat_template=true)")
    reward: str | None = opt(None, "a shipped reward (exact | math | code | judge | format: `rlpost rewards`) or "
                                   "'module:function' scoring (completion, row) -> float; default: the task's "
                                   "verifier")
    reward_on_error: str = opt("raise", "when the reward function raises, returns a non-finite number or runs past "
                                        "task.reward_timeout_s: 'raise' (stop, naming the sample) | 'zero' (score "
                                        "0, or the reward's lowest value when it can be negative; counted in "
                                        "reward/errors; reward/timeouts)", choices=ON_ERROR)
    reward_timeout_s: float | None = opt(60.0, "seconds one reward function call may take (it runs in a thread "
                                               "that is abandoned when it hangs); null: no limit", above(0))
    reward_options: dict[str, Any] = opt({}, "keyword options of task.reward (e.g. math: {extract: boxed})")
    rewards: list[dict] | None = opt(None, "a weighted sum of rewards, each logged: [{name, weight, ...options}] "
                                           "(replaces task.reward)")
    reward_workers: int = opt(1, "score this many samples at once (threads): for slow rewards (code, judge)",
                              at_least(1))
    env: str | None = opt(None, "a multi-turn environment: a shipped name (`rlpost envs`) or 'module:Class'; "
                                "None: one turn scored by the reward")
    env_options: dict[str, Any] = opt({}, "keyword options of task.env's constructor")
    max_turns: int = opt(1, "env: assistant turns per episode at most", at_least(1))
    max_episode_tokens: int | None = opt(None, "env: tokens after the prompt (policy + environment) at most "
                                               "(None: room for every turn and the observations between them, "
                                               "max_turns * rollout.max_new_tokens + (max_turns - 1) * the env's "
                                               "observation_tokens, or rollout.max_new_tokens when it declares "
                                               "none)", at_least(1))
    env_timeout_s: float = opt(30.0, "env: seconds one reset or step may take before it counts as hung", above(0))
    env_on_error: str = opt("raise", "env: when reset/step raises or hangs: 'raise' (stop, naming the episode) | "
                                     "'zero' (end that episode with reward 0, counted in env/errors)",
                           choices=ON_ERROR)
    seed: int = opt(1234, "embedded tasks: seed of the problem set, its split and the demonstrator",
                    at_least(0, "0: a seed like any other"))
    max_operand: int = opt(99, "embedded tasks: operands are drawn from 0..max_operand", at_least(1))
    num_eval: int = opt(500, "embedded tasks: held-out problems", at_least(1))
    demonstrator_error: float = opt(0.35, "embedded tasks: fraction of the demonstrator's answers that are wrong",
                                    between(0, 1, "0: every demonstration is right"))
    options: dict[str, Any] = opt({}, "the task's own options (e.g. multistep: {answer_format_rate: 0.2}); "
                                      "docs/cli.md lists each task's")
    sources: list[dict] | None = opt(None, "several datasets mixed by weight in every RL step: [{file, weight, name, "
                                           "...}], each entry its own task settings (file or task, columns, reward, "
                                           "options, env with its max_turns / max_episode_tokens / env_timeout_s / "
                                           "env_on_error; docs/data.md), each prompt scored by its source's reward "
                                           "or run in its source's env; logs reward/<name> and pass@1 per source "
                                           "(None: the one task above)")
    answer_format_rate: float = opt(1.0, "multistep: task.options.answer_format_rate under its flat name: fraction of "
                                         "the demonstrations that end with '#### <answer>' (the rest stop after the "
                                         "last sum: a base model that only sometimes writes the answer format)",
                                    between(0, 1, "0: no demonstration ends with the answer format"))

    def check(self, prefix: str) -> None:
        if self.rewards is not None and self.reward:
            raise ConfigError(f"set either {prefix}reward (one reward) or {prefix}rewards (a weighted sum), not both")
        for key, owner in (("reward_options", "reward"), ("env_options", "env")):
            if getattr(self, key) and not getattr(self, owner):
                raise ConfigError(f"{prefix}{key} are the options of {prefix}{owner}, which is not set")
        for key in ("prompt_key", "answer_key", "completion_key", "messages_key", "train_split", "eval_split"):
            if not getattr(self, key):
                raise ConfigError(f"config key '{prefix}{key}' must be a non-empty string")
        # one column read as two keys: every row's answer (or demonstration) would be its own prompt, without a word
        # (the answer as the demonstration is fine: SFT imitates the answer when a row has no completion)
        for a, b in (("prompt_key", "answer_key"), ("prompt_key", "completion_key"), ("messages_key", "answer_key"),
                     ("messages_key", "completion_key")):
            if getattr(self, a) == getattr(self, b):
                raise ConfigError(f"config keys '{prefix}{a}' and '{prefix}{b}' both name the column "
                                  f"{getattr(self, a)!r}: each names a column of its own (a row's prompt is not its "
                                  f"{b.removesuffix('_key')})")
        tasks = lookup(TASKS)
        options = self.task_options(prefix)
        for key in OPTION_ALIASES:  # a flat alias set for a task without that option: name the flat key
            if getattr(self, key) != _default(key) and key not in tasks.parameters(self.name):
                owners = tasks.having(key)
                raise ConfigError(f"config key '{prefix}{key}' is an option of the {' / '.join(owners)} task, not of "
                                  f"{self.name!r} (got {options[key]!r}); leave it at {_default(key)!r} or set "
                                  f"{prefix}name={owners[0]}")
        if self.sources is not None:
            self.source_configs(prefix)  # each entry checked as a task of its own
            return
        source = build_plugin(tasks.build, options, prefix + "options", name=self.name)
        try:
            source.check(self)  # the task's own rules about the shared keys (the file task needs a train_file)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def source_configs(self, prefix: str = "task.") -> list[tuple[str, float, "TaskConfig"]]:
        """task.sources as (name, weight, the entry's own TaskConfig), each checked as a task would be (its keys,
        their types and ranges, its task's rules); the run's keys (RUN_KEYS) come from this section. An entry's
        `file` is its train_file, `task` its task name (default: file when it has a file), `name` defaults to
        the file's name without extension (or the task's name), `weight` to 1."""
        if not isinstance(self.sources, list) or not self.sources:
            raise ConfigError(f"config key '{prefix}sources' must be a non-empty list of {{file, weight, ...}} "
                              f"entries (or null: the one task of {prefix}name), got {self.sources!r}")
        for f in dataclasses.fields(self):  # every other key is an entry's own: beside task.sources it says nothing
            key = f.name
            shared = key in RUN_KEYS or key in SOURCE_ENV_KEYS or key == "sources"
            if not shared and getattr(self, key) != _default(key):
                own = {"name": "task", "train_file": "file"}.get(key, key)  # what an entry calls it
                raise ConfigError(f"config key '{prefix}{key}' is set beside '{prefix}sources', whose entries each "
                                  f"set their own: move it into the entries ({prefix}sources[i].{own}), or unset it")
        out, names = [], {}
        for i, entry in enumerate(self.sources):
            where = f"{prefix}sources[{i}]"
            if not isinstance(entry, dict):
                raise ConfigError(f"config key '{where}' must be a mapping {{file, weight, name, ...}}, got {entry!r}")
            data = {k: v for k, v in entry.items() if k not in ("weight", "name", "file", "task")}
            for key in data:
                if key in RUN_KEYS or key == "sources":
                    raise ConfigError(f"config key '{where}.{key}' is a setting of the whole run, which every source "
                                      f"shares: set {prefix}{key} instead")
            for key in SOURCE_ENV_KEYS:
                if key in data and not data.get("env"):
                    raise ConfigError(f"config key '{where}.{key}' is a setting of an environment's episodes, and "
                                      f"this source has none ({where}.env): set {where}.env, or unset it")
            if "file" in entry and "train_file" in entry:
                raise ConfigError(f"config key '{where}' sets both file and train_file (one key under two names): "
                                  "set one of them")
            if "file" in entry:
                data["train_file"] = entry["file"]
            task = entry.get("task", "file" if data.get("train_file") else None)
            if task is None:
                raise ConfigError(f"config key '{where}' needs a file (its training prompts) or a task (an embedded "
                                  f"task's name), got {entry!r}")
            data["name"] = task
            data.update({k: getattr(self, k) for k in RUN_KEYS})
            data.update({k: getattr(self, k) for k in SOURCE_ENV_KEYS if k not in data})  # the entry's, else the run's
            try:
                cfg = from_dict(TaskConfig, data, where + ".")
                cfg.validate(where + ".")
            except ConfigError as e:  # an entry names its task by `task` (its `name` is the source's)
                raise ConfigError(str(e).replace(f"'{where}.name'", f"'{where}.task'")) from None
            weight = entry.get("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < float("inf"):
                raise ConfigError(f"config key '{where}.weight' must be a positive finite number (its share of each "
                                  f"step's prompts, relative to the others), got {weight!r}")
            name = source_name(entry)
            if not isinstance(name, str) or not _SOURCE_NAME.fullmatch(name) or name in RESERVED_SOURCE_NAMES:
                raise ConfigError(f"config key '{where}.name' must be letters, digits, '_', '.' or '-' (it names the "
                                  f"metric reward/<name>) and not one of {', '.join(RESERVED_SOURCE_NAMES)}; got "
                                  f"{name!r}")
            if name in names:
                raise ConfigError(f"config keys '{prefix}sources[{names[name]}]' and '{where}' are both named "
                                  f"{name!r}: give each source a name of its own ({where}.name)")
            names[name] = i
            out.append((name, float(weight), cfg))
        return out

    def task_options(self, prefix: str = "task.") -> dict[str, Any]:
        """The task's own options: task.options, with each flat alias (task.answer_format_rate) that differs from
        its default folded in; an alias and its task.options key set to different values are refused."""
        options = dict(self.options)
        for key in OPTION_ALIASES:
            value = getattr(self, key)
            if value == _default(key):
                continue
            if key in options and options[key] != value:
                raise ConfigError(f"config keys '{prefix}{key}' ({value!r}) and '{prefix}options.{key}' "
                                  f"({options[key]!r}) are one option under two names: set one of them")
            options[key] = value
        return options


def source_name(entry: dict) -> Any:
    """The name of a task.sources entry: its `name`, else its file's name without extension, else its task's."""
    if entry.get("name") is not None:
        return entry["name"]
    path = entry.get("file") or entry.get("train_file")
    return _stem(path) if path else entry.get("task")


def _stem(path: str) -> str:
    """'data/gsm8k.parquet' -> 'gsm8k'; a folder 'data/gsm8k/' -> 'gsm8k'."""
    base = str(path).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[0] if "." in base.lstrip(".") else base


def _default(key: str) -> Any:
    f = next(f for f in dataclasses.fields(TaskConfig) if f.name == key)
    return f.default_factory() if f.default is dataclasses.MISSING else f.default
