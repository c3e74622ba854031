"""`rlpost rm`: a Bradley-Terry reward model fitted on `model.name`'s task and saved to its own run directory.

    rlpost rm model.name=runs/<sft run>/checkpoints/sft reward_model.epochs=3

The fitting itself is the reward-model stage's (rlpost/stages/reward_model.py); this command runs it alone
and saves checkpoints/reward_model for `rlpost train reward_model.path=...`. `start_model_run` is also the
start of `rlpost prm` (rlpost/commands/prm.py).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from rlpost.commands.common import fit_command, recipe_arguments
from rlpost.models import check_lengths, load_model
from rlpost.runlog import make_run_dir, open_log
from rlpost.sinks import check_available
from rlpost.stages.reward_model import fit_reward_model_from_config
from rlpost.tasks import load_task


def add_rm(sub) -> None:
    p = sub.add_parser(
        "rm", help="train a Bradley-Terry reward model on preference pairs and save it",
        description="Fit a reward model whose trunk starts from model.name (usually an SFT checkpoint) on "
                    "preference pairs built from the task, report held-out pair accuracy and margin per epoch, "
                    "and save it to <run directory>/checkpoints/reward_model (use it with "
                    "`rlpost train reward_model.path=...`). Same keys as `rlpost train --help`.",
        epilog="e.g. rlpost rm model.name=runs/default-X/checkpoints/sft reward_model.epochs=3",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    recipe_arguments(p)


def cmd_rm(args) -> int:
    return fit_command(args, train_reward_model, "rm")


def start_model_run(cfg, recipe_name: str, kind: str):
    """The start of a command that fits a model on `model.name`'s task (`rlpost rm`, `rlpost prm`): the log
    sinks checked before any work, the seed, the task, the policy and tokenizer (lengths checked), a new run
    directory and its log. Returns (task, policy, tokenizer, run_dir, log)."""
    check_available(cfg.log)  # before any work
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    task = load_task(cfg.task)
    rows = task.train_rows + task.eval_rows
    policy, tokenizer = load_model(cfg.model, task.alphabet, rows=rows, max_new_tokens=cfg.rollout.max_new_tokens)
    check_lengths(policy, tokenizer, rows, cfg.rollout.max_new_tokens)
    run_dir = make_run_dir(cfg, recipe_name, kind=kind)
    log = open_log(cfg, run_dir)
    print(f"rlpost: run directory {run_dir}")
    return task, policy, tokenizer, run_dir, log


def train_reward_model(cfg, recipe_name: str = "rm") -> dict:
    """`rlpost rm`: fit a reward model from `model.name` (usually an SFT checkpoint) and save it; the summary
    has the held-out pair accuracy and margin."""
    t_start = time.perf_counter()
    task, policy, tokenizer, run_dir, log = start_model_run(cfg, recipe_name, "rm")
    try:
        _, result = fit_reward_model_from_config(cfg.reward_model, cfg.preference, cfg.seed, policy, tokenizer, task,
                                                 run_dir, log)
    except BaseException:
        log.close(exit_code=1)
        raise
    finally:
        log.close()
    summary = {"run_dir": run_dir, "reward_model": os.path.join(run_dir, "checkpoints", "reward_model"),
               "rm_pair_accuracy": result.get("rm/eval_accuracy"), "rm_margin": result.get("rm/eval_margin"),
               "wall_seconds": time.perf_counter() - t_start}
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"rlpost: reward model saved to {summary['reward_model']}" + (
        f"; held-out pair accuracy {100 * summary['rm_pair_accuracy']:.1f}%, margin {summary['rm_margin']:.3f}"
        if summary["rm_pair_accuracy"] is not None else " (no held-out pairs)"))
    return summary
