"""What the commands that run a recipe share: its positional arguments, the run's name, and the exit codes
and one-line messages of a run that stops."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from rlpost.config import ConfigError, load_config
from rlpost.run import RunInterrupted


def count(text: str) -> int:
    """An argparse `type` for a count flag (eval's --k and --samples, train's --nproc): a whole number >= 1 (a 0
    read as "unset" and ran the default: --samples 0 sampled the largest k, --nproc 0 trained in one process
    unsharded; a negative one failed later, deep in its consumer)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def recipe_arguments(parser) -> None:
    """The positional arguments of every command that runs a recipe: the file, then key=value overrides."""
    parser.add_argument("recipe", nargs="?", help="recipe YAML file (optional)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")


def recipe_and_overrides(args) -> tuple[str | None, list[str]]:
    """The parsed recipe and overrides; a 'recipe' that is a key=value and no file is the first override (only
    overrides were given)."""
    recipe, overrides = args.recipe, list(args.overrides)
    if recipe is not None and "=" in recipe and not os.path.exists(recipe):
        recipe, overrides = None, [recipe, *overrides]
    return recipe, overrides


def recipe_base(recipe: str | None) -> str:
    """The recipe file's name without folder and extension ('default' without a file): the run's name."""
    return os.path.splitext(os.path.basename(recipe))[0] if recipe else "default"


def error(e: BaseException, code: int) -> int:
    """Print `e` as rlpost's one-line error and return the exit code `code`."""
    print(f"rlpost: error: {e}", file=sys.stderr)
    return code


def run_job(job: Callable[[], object]) -> int:
    """Run `job` (a run of stages, or a model fitted in a run directory) and return the command's exit code:
    0, 130 / 143 when stopped by SIGINT / SIGTERM (saying how to resume), 1 with a one-line reason on an
    error (the run directory keeps the weights and the metrics)."""
    try:
        job()
    except RunInterrupted as e:
        print(f"rlpost: stopped by {e}; continue from the newest checkpoint with `rlpost train --resume "
              f"{getattr(e, 'run_dir', '<run directory>')}`", file=sys.stderr)
        return 143 if str(e) == "SIGTERM" else 130
    except KeyboardInterrupt:
        print("rlpost: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a clear one-line reason; the run directory keeps the weights and the metrics
        print(f"rlpost: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


def fit_command(args, fit: Callable[[object, str], object], kind: str) -> int:
    """`rlpost rm` / `rlpost prm`: load the recipe and overrides (exit 2 on a bad config), then fit in a run
    directory named after the recipe and `kind` (`run_job`'s exit codes)."""
    recipe, overrides = recipe_and_overrides(args)
    try:
        cfg = load_config(recipe, overrides)
    except (ConfigError, ValueError) as e:
        return error(e, 2)
    return run_job(lambda: fit(cfg, f"{recipe_base(recipe)}-{kind}" if recipe else kind))
