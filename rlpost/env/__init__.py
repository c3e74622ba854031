"""Environments and rewards: what scores the policy's samples.

- base.py: the protocols: `Env` (`reset`, `step -> Step`), `VerifierEnv` (one turn scored by a verifier) and
  `Verifier` (a verifier's hooks, with defaults);
- role.py: `RewardRole`, the base of every reward role, and the episodes the rollout runs with it;
- reward.py: `Reward`, the one-turn verifier role (`VerifierEnv` stepped for a whole batch), its errors;
- verifiers.py: the shipped verifiers by name (`get_reward`), weighted sums, the run's role from the config;
- episodes.py: `EnvRole`, episodes against an environment, one `Env` per episode;
- per_source.py: `SourceRoles`, task.sources whose entries run in different roles (an env, a verifier);
- registry.py: the shipped environments by name (task.env), their declared sizes;
- math.py, code.py, judge.py, format.py: the shipped verifiers; tools.py: the shipped tool environments.

    task:
      env: calculator          # or 'my_envs:MyEnv'
      env_options: {...}       # the constructor's keyword options
      max_turns: 4
      max_episode_tokens: 64   # policy + environment tokens after the prompt (default: room for every turn)

`rlpost envs` lists the shipped environments, `rlpost rewards` the shipped verifiers.
"""

from __future__ import annotations

from rlpost.env.base import Env, Step, Verifier, VerifierEnv, as_verifier
from rlpost.env.episodes import EnvError, EnvRole
from rlpost.env.registry import (ENVS, PRINTABLE, check_vocabulary, env_class, env_takes_reward, load_env,
                                 observation_alphabet, response_budget)
from rlpost.env.role import RewardRole

__all__ = ["ENVS", "PRINTABLE", "Env", "EnvError", "EnvRole", "RewardRole", "Step", "Verifier", "VerifierEnv",
           "as_verifier", "check_vocabulary", "env_class", "env_takes_reward", "load_env", "observation_alphabet",
           "response_budget"]
