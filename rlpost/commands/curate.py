"""`rlpost curate`: dedup, decontaminate and keep the prompts in a pass-rate band (rlpost/curate.py does it)."""

from __future__ import annotations

import argparse
import json

from rlpost.commands.common import error
from rlpost.config import ConfigError
from rlpost.curate import run as run_curate
from rlpost.models import ModelLoadError


def add_curate(sub) -> None:
    p = sub.add_parser(
        "curate", help="curate RL prompts: dedup, decontaminate against an eval set, keep a pass-rate band",
        description="Drop exact and near-duplicate prompts and training prompts that overlap the eval set (word "
                    "n-grams), then, with a model, estimate each prompt's pass rate from K samples scored by the "
                    "reward and keep those in the band (prompts always or never solved give GRPO no signal). "
                    "Prints every count and the signal-density histogram; writes the kept rows for "
                    "`rlpost train task.name=file task.train_file=OUT`. Task keys (columns, reward, system "
                    "prompt) and rollout keys (max_new_tokens, temperature, engine) are the same as "
                    "`rlpost train --help`, as key=value overrides or the flags below.",
        epilog="e.g. rlpost curate --model runs/sft-X/checkpoints/sft --train train.jsonl --eval test.jsonl "
               "--out curated.jsonl -k 8 --reward math\n     rlpost curate --no-model --train train.parquet "
               "--eval test.parquet --out curated.parquet\n     rlpost curate --check-gold --train train.jsonl "
               "--reward math --out bad_gold.jsonl --strict",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides (task.*, rollout.*, "
                                                                     "model.*)")
    p.add_argument("--model", help="the model that estimates pass rates: a checkpoint or model folder, a run "
                                   "directory (its newest checkpoint's weights) or a hub id")
    p.add_argument("--no-model", action="store_true", help="skip pass-rate estimation: dedup and decontaminate only")
    p.add_argument("--train", help="training prompts: .jsonl, .json, .parquet or a `datasets` folder (required, but "
                                   "with --check-gold under task.sources, whose entries name their own files)")
    p.add_argument("--eval", help="held-out prompts to decontaminate against (same formats)")
    p.add_argument("--out", help="where the kept rows go: .jsonl / .json (JSON Lines) or .parquet (with "
                                 "--check-gold: the rows whose gold does not verify, when given)")
    p.add_argument("--recipe", help="a recipe YAML whose task / rollout / model keys to use")
    p.add_argument("-k", type=int, default=8, help="samples per prompt for the pass rate (default 8)")
    p.add_argument("--band", type=float, nargs=2, default=[0.1, 0.9], metavar=("LO", "HI"),
                   help="keep prompts with LO <= pass rate <= HI (default 0.1 0.9)")
    p.add_argument("--pass-threshold", type=float, default=0.5,
                   help="a sample passes when its reward is >= this (default 0.5: right, for 0/1 rewards)")
    p.add_argument("--near-dup", type=float, default=0.9,
                   help="drop prompts whose character 5-gram Jaccard with an earlier one is >= this (0: off; "
                        "default 0.9)")
    p.add_argument("--ngram", type=int, default=13, help="decontamination word n-gram length (default 13)")
    p.add_argument("--batch-prompts", type=int, default=None, help="prompts per generation call "
                                                                    "(default eval.batch_prompts)")
    p.add_argument("--report", help="also write the counts and pass rates as JSON here")
    p.add_argument("--check-gold", action="store_true",
                   help="only check the data: score every row's own gold (its completion, else its answer) with the "
                        "reward (task.reward, else the exact match); count and name the rows whose gold scores below "
                        "--pass-threshold: a data bug (no model needed; no other filter runs). Under task.sources "
                        "(--recipe): every source's rows with its own columns and reward, reported per source, "
                        "--out OUT.jsonl writing OUT.<source>.jsonl per source")
    p.add_argument("--strict", action="store_true", help="--check-gold: exit 1 when some row's gold does not verify "
                                                         "(default: report them and exit 0)")
    flags = {"--reward": "task.reward", "--prompt-key": "task.prompt_key", "--answer-key": "task.answer_key",
             "--completion-key": "task.completion_key", "--messages-key": "task.messages_key",
             "--system-prompt": "task.system_prompt", "--train-split": "task.train_split",
             "--eval-split": "task.eval_split", "--max-new-tokens": "rollout.max_new_tokens",
             "--temperature": "rollout.temperature", "--engine": "rollout.engine", "--device": "model.device",
             "--seed": "seed"}
    types = {"--max-new-tokens": int, "--temperature": float, "--seed": int}
    for flag, key in flags.items():
        p.add_argument(flag, dest="key:" + key, metavar="VALUE", type=types.get(flag, str), help=f"sets {key}")



def cmd_curate(args) -> int:
    """The flags that name config keys become overrides, before the key=value ones."""
    keyed = [f"{k[4:]}={json.dumps(v)}" for k, v in vars(args).items() if k.startswith("key:") and v is not None]
    args.overrides = keyed + list(args.overrides)
    try:
        return run_curate(args)
    except (ConfigError, ModelLoadError, ValueError, OSError) as e:
        return error(e, 2 if isinstance(e, ConfigError) else 1)
