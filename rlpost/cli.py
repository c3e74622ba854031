"""rlpost command line.

    rlpost train                              the embedded default: SFT then GRPO on arithmetic
    rlpost train recipes/gsm8k.yaml model.name=M task.train_file=F   GRPO on GSM8K with an HF chat model
    rlpost train --resume runs/default-X       continue a stopped run from its newest checkpoint
    rlpost train --nproc 2                    sharded (FSDP2) over 2 processes on this machine, via torchrun
    rlpost rm model.name=runs/X/checkpoints/sft   a Bradley-Terry reward model on preference pairs
    rlpost dpo --loss ipo                     SFT, then offline preference optimisation (DPO family)
    rlpost curate --model M --train F --eval E --out O   dedup, decontaminate, keep prompts in a pass-rate band
    rlpost algorithms                         the registered algorithms
    rlpost rewards / rlpost envs              the shipped rewards and environments
    rlpost eval runs/X --k 1 8                pass@k, maj@k, mean reward and length on the held-out rows
    rlpost plan memory recipe.yaml 7b k=v     what each rank of that rlpost job holds, and whether it fits
    rlpost plan throughput RUN_DIR            where a run's step time goes, predicted for other topologies
    rlpost report runs/X                      one self-contained HTML page of what the run did (runs/X/report/)
    rlpost export runs/X --out model/         a plain model folder (LoRA adapters merged) + tokenizer
"""

from __future__ import annotations

import argparse
import os
import sys

from rlpost.commands.curate import add_curate, cmd_curate
from rlpost.commands.dpo import add_dpo, cmd_dpo
from rlpost.commands.eval import add_eval, cmd_eval
from rlpost.commands.export import add_export, cmd_export
from rlpost.commands.listings import add_algorithms, add_envs, add_rewards, cmd_algorithms, cmd_envs, cmd_rewards
from rlpost.commands.plan import add_plan, cmd_plan
from rlpost.commands.prm import add_prm, cmd_prm
from rlpost.commands.report import add_report, cmd_report
from rlpost.commands.rm import add_rm, cmd_rm
from rlpost.commands.search import add_search, cmd_search
from rlpost.commands.train import add_train, cmd_train

# Every subcommand: its name, the function that adds its parser, and the one that runs it (its exit code). The
# order is the order of `rlpost --help`. A new command is one module in rlpost/commands/ and one line here.
COMMANDS = {
    "train": (add_train, cmd_train),
    "rm": (add_rm, cmd_rm),
    "prm": (add_prm, cmd_prm),
    "dpo": (add_dpo, cmd_dpo),
    "curate": (add_curate, cmd_curate),
    "eval": (add_eval, cmd_eval),
    "plan": (add_plan, cmd_plan),
    "search": (add_search, cmd_search),
    "report": (add_report, cmd_report),
    "export": (add_export, cmd_export),
    "algorithms": (add_algorithms, cmd_algorithms),
    "rewards": (add_rewards, cmd_rewards),
    "envs": (add_envs, cmd_envs),
}


def build_parser() -> argparse.ArgumentParser:
    """The `rlpost` parser with one subparser per entry of COMMANDS."""
    parser = argparse.ArgumentParser(prog="rlpost", description="RL post-training of language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The parsed arguments; an argument no parser knows is an error (exit 2), except that `plan memory` takes
    its INPUTs (key=value overrides, MODEL, RECIPE) before and after its flags."""
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "plan" and getattr(args, "plan_command", None) == "memory" \
            and not any(x.startswith("-") for x in extra):
        args.inputs = list(args.inputs) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """`rlpost COMMAND ...`: the command's exit code; without a command, the help."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parse(parser, argv)
    if args.command is None:
        parser.print_help()
        return 0
    _, cmd = COMMANDS[args.command]
    return cmd(args)


if __name__ == "__main__":
    sys.exit(main())
