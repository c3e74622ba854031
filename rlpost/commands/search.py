"""`rlpost search`: test-time search at budgets of N samples (rlpost/search.py's `search_command`)."""

from __future__ import annotations

import argparse

from rlpost.commands.common import error, recipe_and_overrides
from rlpost.config import ConfigError
from rlpost.models import ModelLoadError
from rlpost.search import METHODS, search_command


def add_search(sub) -> None:
    p = sub.add_parser(
        "search", help="test-time search at a budget of N samples: greedy, majority, best-of-N (ORM, PRM), beam, MCTS",
        description="Answer the task's held-out problems from POLICY (a run directory or a model folder) with each "
                    "search method at each budget N, and print held-out accuracy and generated tokens per problem: "
                    "greedy, majority vote, best-of-N reranked by the outcome model (--orm) or by the PRM (--prm; "
                    "min, last and product of its step scores), PRM-guided beam search and MCTS over steps. Methods "
                    "whose model is not given are left out. Writes search.json (every cell and the table).",
        epilog="e.g. rlpost search runs/cot_math-X --prm runs/prm-Y/checkpoints/prm --orm runs/prm-Y/checkpoints/orm "
               "--n 1 4 16 64", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("policy", metavar="POLICY", help="a run directory or a model folder")
    p.add_argument("recipe", nargs="?", help="recipe YAML for the task (default: the run's config.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted config overrides (task.*, rollout.*)")
    p.add_argument("--prm", help="a process reward model folder (rlpost prm: checkpoints/prm), or "
                                 "'step-check': the chain-of-thought task's own step check, a perfect PRM")
    p.add_argument("--orm", help="an outcome reward model folder (rlpost prm: checkpoints/orm, or rlpost rm)")
    p.add_argument("--n", type=int, nargs="+", default=[1, 4, 16, 64], help="budgets N (default 1 4 16 64)")
    p.add_argument("--methods", nargs="+", help="a subset of: " + ", ".join(METHODS))
    p.add_argument("--problems", type=int, help="the first this many held-out problems (default all)")
    p.add_argument("--width", type=int, default=4, help="beam search: ways each beam is extended; MCTS: "
                                                        "children per node (default 4)")
    p.add_argument("--out", help="where search.json goes (default: in the run directory, else here)")


def cmd_search(args) -> int:
    recipe, overrides = recipe_and_overrides(args)
    try:
        result = search_command(args.policy, recipe, overrides, prm=args.prm, orm=args.orm, ns=args.n,
                                methods=args.methods, problems=args.problems, width=args.width, out=args.out)
    except (ConfigError, ModelLoadError, ValueError, OSError) as e:
        return error(e, 1)
    print(result["table"])
    print(f"rlpost search: {result['wall_seconds']:.0f} s; written to {result['written_to']}")
    return 0
