"""`rlpost eval`: pass@k, maj@k, mean reward and length of a checkpoint on the task's held-out rows
(rlpost/heldout.py's `run_eval`)."""

from __future__ import annotations

from rlpost.commands.common import count, error, recipe_and_overrides
from rlpost.config import ConfigError
from rlpost.heldout import run_eval
from rlpost.models import ModelLoadError


def add_eval(sub) -> None:
    p = sub.add_parser(
        "eval", help="evaluate a checkpoint: pass@k, maj@k, mean reward and length on the task's held-out rows",
        description="Sample the task's held-out prompts from CHECKPOINT (a run directory: its newest checkpoint's "
                    "weights and its config; or a model folder) and score them with the run's reward, as the "
                    "pipeline's evaluation does. A sample passes when its reward is >= eval.success_threshold "
                    "(or its environment says success). Writes eval.json.")
    p.add_argument("checkpoint", help="a run directory or a model folder")
    p.add_argument("recipe", nargs="?", help="recipe YAML for the task (default: the run's config.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides (task.*, eval.*)")
    p.add_argument("--k", type=count, nargs="+", default=[1], help="the k of pass@k and maj@k (default 1)")
    p.add_argument("--samples", type=count, help="samples per prompt (default: the largest k)")
    p.add_argument("--out", help="where eval.json goes: a file, or a folder that exists (default: in the run "
                                 "directory, else here)")


def cmd_eval(args) -> int:
    """Print and write the metrics of `run_eval`."""
    recipe, overrides = recipe_and_overrides(args)
    try:
        result = run_eval(args.checkpoint, recipe, overrides, ks=args.k, samples=args.samples, out=args.out)
    except (ConfigError, ModelLoadError, ValueError, OSError) as e:
        return error(e, 2 if isinstance(e, ConfigError) else 1)
    print(f"rlpost eval: {result['checkpoint']} on {result['prompts']} held-out prompts of task {result['task']}, "
          f"{result['samples']} samples each at temperature {result['temperature']:g}")
    for key, value in result.items():
        if key.startswith(("pass@", "maj@")) or key in ("mean_reward", "mean_length"):
            print(f"  {key:<12} {value:.4f}")
    print(f"  (a pass: reward >= {result['success_threshold']:g}); written to {result['written_to']}")
    return 0
