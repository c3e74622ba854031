"""The shipped environments by name (`rlpost envs` lists them), task.env's class and the sizes it declares.

    task:
      env: calculator          # or 'my_envs:MyEnv'
      env_options: {...}       # the constructor's keyword options
      max_turns: 4
      max_episode_tokens: 64   # policy + environment tokens after the prompt (default: room for every turn)
"""

from __future__ import annotations

import importlib
import inspect

from rlpost.env.base import PRINTABLE, Env
from rlpost.env.reward import load_reward_fn

ENVS = {  # name -> ("module:Class", one line for `rlpost envs`)
    "calculator": ("rlpost.env.tools:CalculatorEnv",
                   "the model writes <calc>expression</calc>, the environment answers <result>value</result>; "
                   "the final turn is scored by task.reward"),
    "python": ("rlpost.env.tools:PythonToolEnv",
               "the model writes <python>code</python>, the sandbox runs it and returns its output; the final "
               "turn is scored by task.reward"),
    "web": ("rlpost.env.web:WebEnv",
            "the model writes <search>query</search> or <open>url</open> against a local corpus served on "
            "127.0.0.1 (BM25), then <answer>...</answer>, scored by task.reward"),
}


def load_env(spec: str, key: str = "task.env") -> type:
    """A shipped environment's name or 'module:Class' -> the class (`key`: the config key that names it)."""
    if spec in ENVS:
        module, attr = ENVS[spec][0].split(":")
    elif ":" in spec:
        try:  # the same lookup rules as a reward's: the working directory, then sys.path
            cls = load_reward_fn(spec)
        except ValueError as e:
            raise ValueError(f"{key} {spec!r}: {e}") from None
        if not inspect.isclass(cls):
            raise ValueError(f"{key} {spec!r} must name a class (an Env subclass), got {type(cls).__name__}")
        return cls
    else:
        raise ValueError(f"unknown environment {spec!r}; shipped: {', '.join(ENVS)}, or a user's 'module:Class'")
    return getattr(importlib.import_module(module), attr)


def response_budget(task_cfg, max_new_tokens: int) -> int:
    """Tokens after the prompt that one sample may take: rollout.max_new_tokens for one turn; with an
    environment, task.max_episode_tokens, policy and env tokens together. Its default leaves room for every
    turn at full length and an observation between turns: max_turns * max_new_tokens + (max_turns - 1) *
    the env's `observation_tokens` (max_new_tokens when it declares none). With task.sources: the largest of
    the sources' budgets (each entry's env, max_turns and max_episode_tokens)."""
    if getattr(task_cfg, "sources", None):
        return max(response_budget(source, max_new_tokens) for _, _, source in task_cfg.source_configs())
    if not task_cfg.env:
        return max_new_tokens
    if task_cfg.max_episode_tokens:
        return task_cfg.max_episode_tokens
    _, _, env = env_class(task_cfg)
    per_observation = getattr(env, "observation_tokens", None) or max_new_tokens
    getattr(env, "close", lambda: None)()
    return task_cfg.max_turns * max_new_tokens + (task_cfg.max_turns - 1) * per_observation


def observation_alphabet(task_cfg) -> str:
    """The characters task.env's text observations may contain ("" without an environment): the env's
    declared `alphabet`, or PRINTABLE when it declares none. With task.sources: every entry's env's."""
    if getattr(task_cfg, "sources", None):
        chars = "".join(observation_alphabet(source) for _, _, source in task_cfg.source_configs())
        return "".join(dict.fromkeys(chars))
    if not task_cfg.env:
        return ""
    _, _, env = env_class(task_cfg)
    alphabet = getattr(env, "alphabet", None)
    getattr(env, "close", lambda: None)()
    return PRINTABLE if alphabet is None else "".join(dict.fromkeys(alphabet))


def check_vocabulary(task_cfg, tokenizer, key: str = "task.env") -> None:
    """Before any training: a character tokenizer (gpt_mini's) must spell every character task.env may
    answer with. A fresh gpt_mini gets them (`observation_alphabet`, added to the task's alphabet); a saved
    one's vocabulary is fixed, so a missing character is a ValueError naming the env and the character.
    Other tokenizers pass (a byte-level BPE spells anything). With task.sources, each entry's env
    (`key`: the config key that names it)."""
    chars = getattr(tokenizer, "chars", None)
    if chars is not None and getattr(task_cfg, "sources", None):
        for i, (_, _, source) in enumerate(task_cfg.source_configs()):
            check_vocabulary(source, tokenizer, f"task.sources[{i}].env")
        return
    if chars is None or not task_cfg.env:
        return
    missing = [c for c in observation_alphabet(task_cfg) if c not in chars]
    if missing:
        more = f" (and {len(missing) - 1} more: {''.join(missing[1:])!r})" if len(missing) > 1 else ""
        raise ValueError(f"{key} {task_cfg.env!r} may answer with the character {missing[0]!r}{more}, which this "
                         f"gpt_mini's vocabulary {chars!r} lacks, so its observations could not be encoded: train "
                         "from a fresh gpt_mini (model.name: gpt_mini adds them), or, if the env writes fewer "
                         "characters, declare them as its `alphabet` (the shipped tool environments take "
                         f"{key}_options.alphabet)")


def _unscored(completion: str, row: dict) -> float:
    """The reward an environment is built with when it is only inspected (its declared sizes), not run."""
    return 0.0


def check_env(spec: str, options: dict, key: str = "task.env") -> None:
    """Raise ValueError for a task.env that `env_class` would refuse, when the config loads: an unknown name, a
    module:Class that does not load, options its constructor refuses. A shipped environment is built (cheap: the
    web one serves its corpus only when an episode starts) and closed, so its own checks of the options' values
    run; a user's class only has its options matched to its signature (building it may be costly). `key`: the
    config key that names it (task.env, or task.sources[i].env)."""
    cls = load_env(spec, key)
    try:
        if spec in ENVS:
            reward = {"reward": _unscored} if "reward" in inspect.signature(cls).parameters else {}
            env = cls(**reward, **options)
            getattr(env, "close", lambda: None)()
        else:
            inspect.signature(cls).bind(**options)
    except TypeError as e:
        raise ValueError(f"{key} {spec!r}: bad {key}_options {sorted(options)}: {e}") from None
    except ValueError as e:
        raise ValueError(f"{key} {spec!r}: {key}_options: {e}") from None


def env_takes_reward(spec: str) -> bool:
    """Does environment `spec` (a shipped name or 'module:Class') take a `reward` that scores its final turn?"""
    return "reward" in inspect.signature(load_env(spec)).parameters


def env_class(task_cfg, reward_fn=_unscored) -> tuple[type, dict, Env]:
    """task.env's class, its constructor options (the run's reward added when it takes one) and an instance
    built from them (a bad option is named here, before anything runs)."""
    env_cls = load_env(task_cfg.env)
    options = dict(task_cfg.env_options)
    if "reward" in inspect.signature(env_cls).parameters and "reward" not in options:
        options["reward"] = reward_fn  # the env scores its final turn with the configured reward
    try:
        env = env_cls(**options)
    except TypeError as e:
        raise ValueError(f"task.env {task_cfg.env!r}: bad task.env_options {sorted(options)}: {e}") from e
    return env_cls, options, env
