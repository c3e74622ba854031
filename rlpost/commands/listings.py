"""`rlpost algorithms`, `rlpost rewards`, `rlpost envs`: what is registered, one line each."""

from __future__ import annotations

from rlpost.algorithms import available as algorithms
from rlpost.env import ENVS
from rlpost.env.verifiers import REWARDS


def add_algorithms(sub) -> None:
    sub.add_parser("algorithms", help="list the registered RL algorithms")


def cmd_algorithms(args) -> int:
    for name, desc in algorithms().items():
        print(f"  {name:<14} {desc}")
    return 0


def add_rewards(sub) -> None:
    sub.add_parser("rewards", help="list the shipped rewards (task.reward / task.rewards names)")


def cmd_rewards(args) -> int:
    for name, target in REWARDS.items():
        print(f"  {name:<8} {target}")
    print("  or any 'module:function' of your own: (completion, row) -> float")
    return 0


def add_envs(sub) -> None:
    sub.add_parser("envs", help="list the shipped environments (task.env names)")


def cmd_envs(args) -> int:
    for name, (target, desc) in ENVS.items():
        print(f"  {name:<11} {desc}")
    print("  or any 'module:Class' of your own: an rlpost.env.Env subclass")
    return 0
