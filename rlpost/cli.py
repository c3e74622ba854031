"""rlpost command line.

    rlpost train                              the embedded default: SFT then GRPO on arithmetic
    rlpost train recipes/hf_chat_model.yaml rl.steps=20 algorithm.beta=0.0
    rlpost train --resume runs/default-X       continue a stopped run from its newest checkpoint
    rlpost rm model.name=runs/X/checkpoints/sft   a Bradley-Terry reward model on preference pairs
    rlpost dpo --loss ipo                     SFT, then offline preference optimisation (DPO family)
    rlpost curate --model M --train F --eval E --out O   dedup, decontaminate, keep prompts in a pass-rate band
    rlpost algorithms                         the registered algorithms
    rlpost rewards / rlpost envs              the shipped rewards and environments
    rlpost eval runs/X --k 1 8                pass@k, maj@k, mean reward and length on the held-out rows
    rlpost export runs/X --out model/         a plain model folder (LoRA adapters merged) + tokenizer
"""

from __future__ import annotations

import argparse
import os
import sys

from rlpost.config import ConfigError, describe, load_config
from rlpost.preference import available as preference_losses

TRAIN_EPILOG = "config keys (recipe YAML sections or key=value overrides), default, meaning:\n" + "\n".join(describe())


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(prog="rlpost", description="RL post-training of language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p_train = sub.add_parser(
        "train", help="run a recipe: SFT on demonstrations, then RL against a reward",
        description="Run a recipe (default: the embedded gpt_mini arithmetic pipeline). Settings come from the "
                    "defaults, then the recipe file, then key=value overrides (dotted, e.g. rl.steps=20).",
        epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p_train.add_argument("recipe", nargs="?", help="recipe YAML file (optional)")
    p_train.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p_train.add_argument("--resume", metavar="RUN_DIR",
                         help="continue the run in RUN_DIR from its newest complete checkpoint, with its saved "
                              "config (a recipe or overrides given too must not change it)")
    p_rm = sub.add_parser(
        "rm", help="train a Bradley-Terry reward model on preference pairs and save it",
        description="Fit a reward model whose trunk starts from model.name (usually an SFT checkpoint) on "
                    "preference pairs built from the task, report held-out pair accuracy and margin per epoch, "
                    "and save it to <run directory>/checkpoints/reward_model (use it with "
                    "`rlpost train reward_model.path=...`). Same keys as `rlpost train --help`.",
        epilog="e.g. rlpost rm model.name=runs/default-X/checkpoints/sft reward_model.epochs=3",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p_rm.add_argument("recipe", nargs="?", help="recipe YAML file (optional)")
    p_rm.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p_dpo = sub.add_parser(
        "dpo", help="offline preference optimisation (DPO, IPO, KTO, ORPO, SimPO): SFT (sft.steps) then the loss",
        description="Run a recipe with the preference stage and without RL: SFT when sft.steps > 0, then the "
                    "preference loss on preference.train_file (JSONL or a `datasets` dataset) or, without one, on "
                    "pairs built from the model's own samples scored by the task's verifier. Same keys as "
                    "`rlpost train --help` (section preference.*).",
        epilog="preference losses:\n" + "\n".join(f"  {n:<8} {d}" for n, d in preference_losses().items())
               + "\n\ne.g. rlpost dpo --loss ipo preference.loss.beta=0.5 preference.train_file=prefs.jsonl",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p_dpo.add_argument("recipe", nargs="?", help="recipe YAML file (optional)")
    p_dpo.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p_dpo.add_argument("--loss", choices=sorted(preference_losses()), help="the preference loss, with its defaults")
    add_curate_parser(sub)
    p_eval = sub.add_parser(
        "eval", help="evaluate a checkpoint: pass@k, maj@k, mean reward and length on the task's held-out rows",
        description="Sample the task's held-out prompts from CHECKPOINT (a run directory: its newest checkpoint's "
                    "weights and its config; or a model folder) and score them with the run's reward, as the "
                    "pipeline's evaluation does. A sample passes when its reward is >= eval.success_threshold "
                    "(or its environment says success). Writes eval.json.")
    p_eval.add_argument("checkpoint", help="a run directory or a model folder")
    p_eval.add_argument("recipe", nargs="?", help="recipe YAML for the task (default: the run's config.yaml)")
    p_eval.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides (task.*, eval.*)")
    p_eval.add_argument("--k", type=int, nargs="+", default=[1], help="the k of pass@k and maj@k (default 1)")
    p_eval.add_argument("--samples", type=int, help="samples per prompt (default: the largest k)")
    p_eval.add_argument("--out", help="where eval.json goes (default: in the run directory, else here)")
    p_export = sub.add_parser(
        "export", help="write a plain model folder (LoRA adapters merged in) + tokenizer from a run or checkpoint",
        description="Write SOURCE's policy as a plain model folder with its tokenizer: safetensors weights and "
                    "config.json that transformers.AutoModelForCausalLM.from_pretrained loads (gpt_mini: as GPT-2; "
                    "rlpost's load_model loads it as gpt_mini), with no peft needed. SOURCE is a run directory "
                    "(the weights of its newest checkpoint) or a checkpoint folder. A LoRA checkpoint "
                    "(model.lora: base weights + lora_adapter.safetensors) is merged: each weight becomes base + "
                    "B @ A * alpha / r. A folder without adapters is copied as it is.",
        epilog="e.g. rlpost export runs/lora-X --out exported/\n     rlpost export runs/lora-X/checkpoints/step_50 "
               "--out step50/", formatter_class=argparse.RawDescriptionHelpFormatter)
    p_export.add_argument("source", metavar="SOURCE", help="a run directory or a checkpoint folder")
    p_export.add_argument("--out", required=True, metavar="FOLDER", help="where the model folder is written")
    sub.add_parser("algorithms", help="list the registered RL algorithms")
    sub.add_parser("rewards", help="list the shipped rewards (task.reward / task.rewards names)")
    sub.add_parser("envs", help="list the shipped environments (task.env names)")
    args = parser.parse_args(argv)

    if args.command == "rewards":
        from rlpost.rewards import REWARDS

        for name, target in REWARDS.items():
            print(f"  {name:<8} {target}")
        print("  or any 'module:function' of your own: (completion, row) -> float")
        return 0
    if args.command == "envs":
        from rlpost.env import ENVS

        for name, (target, desc) in ENVS.items():
            print(f"  {name:<11} {desc}")
        print("  or any 'module:Class' of your own: an rlpost.env.Env subclass")
        return 0

    if args.command == "curate":
        return run_curate(args)
    if args.command == "eval":
        return run_eval_command(args)
    if args.command == "export":
        from rlpost.checkpoint import export_model

        try:
            folder = export_model(args.source, args.out)
        except (ValueError, OSError) as e:
            print(f"rlpost: error: {e}", file=sys.stderr)
            return 1
        print(f"rlpost export: {folder} -> {args.out}")
        return 0
    if args.command == "algorithms":
        from rlpost.algorithms import available

        for name, desc in available().items():
            print(f"  {name:<14} {desc}")
        return 0
    if args.command in ("train", "dpo", "rm"):
        recipe, overrides = args.recipe, list(args.overrides)
        if recipe is not None and "=" in recipe and not os.path.exists(recipe):  # only overrides were given
            recipe, overrides = None, [recipe, *overrides]
        if getattr(args, "loss", None):
            overrides = [f"preference.loss={{name: {args.loss}}}", *overrides]
        resume = getattr(args, "resume", None)
        try:
            cfg = load_config(recipe, overrides)
            if args.command == "dpo":  # the preference stage, and no RL
                cfg.preference.enabled, cfg.rl.steps = True, 0
            if resume:
                cfg = resumable_config(resume, cfg if recipe or overrides else None)
        except (ConfigError, ValueError) as e:
            print(f"rlpost: error: {e}", file=sys.stderr)
            return 2
        from rlpost.run import RunInterrupted, train
        from rlpost.stages.reward_model import train_reward_model

        base = os.path.splitext(os.path.basename(recipe))[0] if recipe else "default"
        name = {"train": base, "dpo": f"{base}-dpo", "rm": f"{base}-rm" if recipe else "rm"}[args.command]
        try:
            if args.command == "rm":
                train_reward_model(cfg, name)
            else:
                train(cfg, name, resume=resume)
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
    parser.print_help()
    return 0


def add_curate_parser(sub) -> None:
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
               "--eval test.parquet --out curated.parquet",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides (task.*, rollout.*, "
                                                                     "model.*)")
    p.add_argument("--model", help="the model that estimates pass rates: a checkpoint or model folder, a run "
                                   "directory (its newest checkpoint's weights) or a hub id")
    p.add_argument("--no-model", action="store_true", help="skip pass-rate estimation: dedup and decontaminate only")
    p.add_argument("--train", required=True, help="training prompts: .jsonl, .json, .parquet or a `datasets` folder")
    p.add_argument("--eval", help="held-out prompts to decontaminate against (same formats)")
    p.add_argument("--out", required=True, help="where the kept rows go: .jsonl / .json (JSON Lines) or .parquet")
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
    flags = {"--reward": "task.reward", "--prompt-key": "task.prompt_key", "--answer-key": "task.answer_key",
             "--completion-key": "task.completion_key", "--messages-key": "task.messages_key",
             "--system-prompt": "task.system_prompt", "--train-split": "task.train_split",
             "--eval-split": "task.eval_split", "--max-new-tokens": "rollout.max_new_tokens",
             "--temperature": "rollout.temperature", "--engine": "rollout.engine", "--device": "model.device",
             "--seed": "seed"}
    types = {"--max-new-tokens": int, "--temperature": float, "--seed": int}
    for flag, key in flags.items():
        p.add_argument(flag, dest="key:" + key, metavar="VALUE", type=types.get(flag, str), help=f"sets {key}")


def run_curate(args) -> int:
    """`rlpost curate`: the flags that name config keys become overrides, before the key=value ones."""
    import json

    from rlpost.curate import run

    keyed = [f"{k[4:]}={json.dumps(v)}" for k, v in vars(args).items() if k.startswith("key:") and v is not None]
    args.overrides = keyed + list(args.overrides)
    try:
        return run(args)
    except (ConfigError, ValueError, OSError) as e:
        print(f"rlpost: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1


def run_eval_command(args) -> int:
    """`rlpost eval`: print and write the metrics of `rlpost.evaluate.run_eval`."""
    from rlpost.evaluate import run_eval

    recipe, overrides = args.recipe, list(args.overrides)
    if recipe is not None and "=" in recipe and not os.path.exists(recipe):  # only overrides were given
        recipe, overrides = None, [recipe, *overrides]
    try:
        result = run_eval(args.checkpoint, recipe, overrides, ks=args.k, samples=args.samples, out=args.out)
    except (ConfigError, ValueError, OSError) as e:
        print(f"rlpost: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    print(f"rlpost eval: {result['checkpoint']} on {result['prompts']} held-out prompts of task {result['task']}, "
          f"{result['samples']} samples each at temperature {result['temperature']:g}")
    for key, value in result.items():
        if key.startswith(("pass@", "maj@")) or key in ("mean_reward", "mean_length"):
            print(f"  {key:<12} {value:.4f}")
    print(f"  (a pass: reward >= {result['success_threshold']:g}); written to {result['written_to']}")
    return 0


def resumable_config(run_dir: str, given=None):
    """The config saved in `run_dir`; a config `given` on the command line too must not differ from it."""
    from rlpost.run import config_differences, saved_config

    saved = saved_config(run_dir)
    if given is not None:
        diff = config_differences(saved, given)
        if diff:
            raise ConfigError(f"--resume {run_dir}: the given config differs from the run's saved config.yaml; "
                              "nothing was changed:\n  " + "\n  ".join(diff))
    return saved


if __name__ == "__main__":
    sys.exit(main())
