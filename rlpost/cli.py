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

from rlpost.config import ConfigError, describe, load_config
from rlpost.preference import available as preference_losses

TRAIN_EPILOG = "config keys (recipe YAML sections or key=value overrides), default, meaning:\n" + "\n".join(describe())


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


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(prog="rlpost", description="RL post-training of language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p_train = sub.add_parser(
        "train", help="run a recipe: SFT on demonstrations, then RL against a reward",
        description="Run a recipe (default: the embedded gpt_mini arithmetic pipeline). Settings come from the "
                    "defaults, then the recipe file, then key=value overrides (dotted, e.g. rl.steps=20).",
        epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    recipe_arguments(p_train)
    p_train.add_argument("--resume", metavar="RUN_DIR",
                         help="continue the run in RUN_DIR from its newest complete checkpoint, with its saved "
                              "config (a recipe or overrides given too must not change it)")
    p_train.add_argument("--nproc", type=int, metavar="N",
                         help="launch N processes on this machine with torchrun (127.0.0.1) and train sharded: adds "
                              "trainer.strategy=fsdp2 (with --resume: the saved config's); "
                              "several machines: run torchrun yourself")
    p_rm = sub.add_parser(
        "rm", help="train a Bradley-Terry reward model on preference pairs and save it",
        description="Fit a reward model whose trunk starts from model.name (usually an SFT checkpoint) on "
                    "preference pairs built from the task, report held-out pair accuracy and margin per epoch, "
                    "and save it to <run directory>/checkpoints/reward_model (use it with "
                    "`rlpost train reward_model.path=...`). Same keys as `rlpost train --help`.",
        epilog="e.g. rlpost rm model.name=runs/default-X/checkpoints/sft reward_model.epochs=3",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    recipe_arguments(p_rm)
    p_prm = sub.add_parser(
        "prm", help="train a process reward model on Monte-Carlo step labels (and an outcome model) and save both",
        description="Sample solutions of the task's problems from model.name (usually an SFT checkpoint), label "
                    "every reasoning step by the fraction of prm.rollouts continuations from its end that reach a "
                    "verified answer, fit a PRM (trunk copied from the policy) on those labels, and report its "
                    "held-out step-label accuracy. With prm.orm (default), a Bradley-Terry outcome reward model is "
                    "fitted on pairs of the same solutions. Writes <run directory>/checkpoints/prm and /orm "
                    "(rlpost search --prm/--orm reads them). Same keys as `rlpost train --help` (section prm.*).",
        epilog="e.g. rlpost prm recipes/prm.yaml model.name=runs/cot_math-X/checkpoints/sft prm.problems=500",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    recipe_arguments(p_prm)
    p_dpo = sub.add_parser(
        "dpo", help="offline preference optimisation (DPO, IPO, KTO, ORPO, SimPO): SFT (sft.steps) then the loss",
        description="Run a recipe with the preference stage and without RL: SFT when sft.steps > 0, then the "
                    "preference loss on preference.train_file (JSONL or a `datasets` dataset) or, without one, on "
                    "pairs built from the model's own samples scored by the task's verifier. Same keys as "
                    "`rlpost train --help` (section preference.*).",
        epilog="preference losses:\n" + "\n".join(f"  {n:<8} {d}" for n, d in preference_losses().items())
               + "\n\ne.g. rlpost dpo --loss ipo preference.loss.beta=0.5 preference.train_file=prefs.jsonl",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    recipe_arguments(p_dpo)
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
    add_plan_parser(sub)
    p_search = sub.add_parser(
        "search", help="test-time search at a budget of N samples: greedy, majority, best-of-N (ORM, PRM), beam, MCTS",
        description="Answer the task's held-out problems from POLICY (a run directory or a model folder) with each "
                    "search method at each budget N, and print held-out accuracy and generated tokens per problem: "
                    "greedy, majority vote, best-of-N reranked by the outcome model (--orm) or by the PRM (--prm; "
                    "min, last and product of its step scores), PRM-guided beam search and MCTS over steps. Methods "
                    "whose model is not given are left out. Writes search.json (every cell and the table).",
        epilog="e.g. rlpost search runs/cot_math-X --prm runs/prm-Y/checkpoints/prm --orm runs/prm-Y/checkpoints/orm "
               "--n 1 4 16 64", formatter_class=argparse.RawDescriptionHelpFormatter)
    p_search.add_argument("policy", metavar="POLICY", help="a run directory or a model folder")
    p_search.add_argument("recipe", nargs="?", help="recipe YAML for the task (default: the run's config.yaml)")
    p_search.add_argument("overrides", nargs="*", metavar="key=value",
                          help="dotted config overrides (task.*, rollout.*)")
    p_search.add_argument("--prm", help="a process reward model folder (rlpost prm: checkpoints/prm), or "
                                        "'step-check': the chain-of-thought task's own step check, a perfect PRM")
    p_search.add_argument("--orm", help="an outcome reward model folder (rlpost prm: checkpoints/orm, or rlpost rm)")
    p_search.add_argument("--n", type=int, nargs="+", default=[1, 4, 16, 64], help="budgets N (default 1 4 16 64)")
    p_search.add_argument("--methods", nargs="+", help="a subset of: " + ", ".join(search_methods()))
    p_search.add_argument("--problems", type=int, help="the first this many held-out problems (default all)")
    p_search.add_argument("--width", type=int, default=4, help="beam search: ways each beam is extended; MCTS: "
                                                               "children per node (default 4)")
    p_search.add_argument("--out", help="where search.json goes (default: in the run directory, else here)")
    p_report = sub.add_parser(
        "report", help="write one self-contained HTML page (and PNGs) showing what a run did",
        description="Read RUN_DIR (metrics.jsonl, summary.json, config.yaml, rollouts.jsonl, profile/) and write "
                    "an HTML page with every figure embedded (no network needed to view it): reward and held-out "
                    "pass@1, KL / entropy / length / clipping, time per role, importance weights and log-prob "
                    "mismatch, gold vs proxy reward, sampled completions, the config. Needs matplotlib "
                    "(pip install 'rlpost[report]'). Works on finished, running and killed runs.")
    p_report.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (rlpost train)")
    p_report.add_argument("--out", help="the HTML file (default RUN_DIR/report/index.html; the PNGs go beside it)")
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
    args, extra = parser.parse_known_args(argv)
    # `plan memory` takes its INPUTs (key=value overrides, MODEL, RECIPE) before and after its flags
    if extra and args.command == "plan" and getattr(args, "plan_command", None) == "memory" \
            and not any(x.startswith("-") for x in extra):
        args.inputs = list(args.inputs) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")

    if args.command == "rewards":
        from rlpost.env.verifiers import REWARDS

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
    if args.command == "plan":
        return run_plan(args, parser)
    if args.command == "report":
        from rlpost.report import build_report

        try:
            path = build_report(args.run_dir, args.out)
        except (ImportError, OSError) as e:
            print(f"rlpost: error: {e}", file=sys.stderr)
            return 1
        print(f"rlpost report: {path}")
        return 0
    if args.command == "eval":
        return run_eval_command(args)
    if args.command == "search":
        return run_search_command(args)
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
    if args.command in ("train", "dpo", "rm", "prm"):
        recipe, overrides = recipe_and_overrides(args)
        if getattr(args, "loss", None):
            overrides = [f"preference.loss={{name: {args.loss}}}", *overrides]
        resume = getattr(args, "resume", None)
        if getattr(args, "nproc", None) and "WORLD_SIZE" not in os.environ:
            return launch_torchrun(args.nproc, recipe, overrides, resume)
        try:
            cfg = load_config(recipe, overrides)
            if args.command == "dpo":  # the preference stage, and no RL
                if cfg.stages is not None:
                    raise ConfigError("`rlpost dpo` runs SFT then the preference stage; a recipe with a `stages` "
                                      "list runs with `rlpost train`")
                cfg.preference.enabled, cfg.rl.steps = True, 0
            if resume:
                cfg = resumable_config(resume, cfg if recipe or overrides else None)
        except (ConfigError, ValueError) as e:
            print(f"rlpost: error: {e}", file=sys.stderr)
            return 2
        from rlpost.run import RunInterrupted, train
        from rlpost.stages.prm import train_prm
        from rlpost.stages.reward_model import train_reward_model

        base = os.path.splitext(os.path.basename(recipe))[0] if recipe else "default"
        name = {"train": base, "dpo": f"{base}-dpo", "rm": f"{base}-rm" if recipe else "rm",
                "prm": f"{base}-prm" if recipe else "prm"}[args.command]
        try:
            if args.command == "rm":
                train_reward_model(cfg, name)
            elif args.command == "prm":
                train_prm(cfg, name)
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


def add_plan_parser(sub) -> None:
    """`rlpost plan SUBCOMMAND`: estimates made before a run (memory; each estimate is one subcommand)."""
    from rlpost.plan.memory import LAYOUTS

    p = sub.add_parser("plan", help="estimate a job: `plan memory MODEL`, `plan throughput RUN_DIR`",
                       description="Estimates made before a run, from the model's shape and the job's settings.")
    plan_sub = p.add_subparsers(dest="plan_command", metavar="ESTIMATE")
    m = plan_sub.add_parser(
        "memory", help="GPU memory of an RL job: what each rlpost rank holds, term by term, and whether it fits",
        description="What each rank (one process, one GPU) of `rlpost train` holds for a config, with each term's "
                    "formula: the policy's weights, gradients and AdamW state (sharded under trainer.strategy="
                    "fsdp2), the full reference and engine copies every rank keeps, the native engine's fused "
                    "matrices, and the largest phase on top (rollout: KV cache; reference: its forward over the "
                    "rank's batch; train: one micro-batch's activations and the log-prob head's chunk). "
                    "`--layout zero3` prints the generic ZeRO-3 / FSDP estimate (18 B/param, sharded frozen copies) "
                    "instead, which rlpost itself does not implement.",
        epilog="INPUT: a recipe (.yaml), key=value overrides as `rlpost train` takes them, and MODEL: a size "
               "(0.5b 1.5b 3b 7b 14b 32b 72b: Qwen2.5; 8b 70b: Llama 3.1), a name (qwen2.5-7b, llama3.1-8b, ...) "
               "or a local folder with a config.json (default: the config's model.name)\n"
               "e.g. rlpost plan memory 7b trainer.strategy=fsdp2 rl.weight_sync=copy --ranks 8\n"
               "     rlpost plan memory 7b --layout zero3 --gpus 8 --critic --reward-model",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("inputs", nargs="*", metavar="INPUT", help="MODEL, RECIPE.yaml and key=value overrides")
    m.add_argument("--layout", choices=list(LAYOUTS), default="rlpost",
                   help="rlpost: what rlpost's own roles hold (default); zero3: the generic ZeRO-3 estimate, "
                        "whose own settings are listed below")
    m.add_argument("--ranks", type=int, default=1, help="rlpost: torchrun ranks of trainer.strategy=fsdp2 "
                                                        "(default 1)")
    m.add_argument("--prompt-tokens", type=int, default=128,
                   help="rlpost: tokens of the longest prompt (default 128)")
    z = m.add_argument_group("--layout zero3: the generic estimate's settings")
    z.add_argument("--seq-len", type=int, default=4096, help="prompt + response tokens per sequence (default 4096)")
    z.add_argument("--batch", type=int, default=64, help="rollout sequences in flight over all engines (default 64)")
    z.add_argument("--micro-batch", type=int, default=1, help="sequences per training forward/backward (default 1)")
    z.add_argument("--gpus", type=int, default=1, help="GPUs of the job, trainer and rollout (default 1)")
    m.add_argument("--gpu-memory-gb", "--gpu-gb", type=float, default=80.0,
                   help="memory of one GPU in GB (default 80)")
    z.add_argument("--topology", choices=["colocated", "disaggregated", "async"], default="colocated",
                   help="colocated: every copy on every GPU; disaggregated / async: rollout engines on "
                        "--rollout-gpus of the GPUs, the rest train (default colocated)")
    z.add_argument("--rollout-gpus", type=int, help="disaggregated / async: GPUs of the rollout engines "
                                                    "(default half of --gpus)")
    z.add_argument("--rollout-tp", type=int, default=1, help="tensor-parallel size of one rollout engine (default 1)")
    z.add_argument("--critic", action="store_true", help="a critic (PPO-style algorithms): a second trained copy")
    z.add_argument("--reward-model", action="store_true", help="a learned reward model (a verifier needs none)")
    z.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank (0: full; default 0)")
    z.add_argument("--checkpointing", action="store_true", help="full activation checkpointing")
    z.add_argument("--precision", choices=["mixed", "fp32", "bf16"], default="mixed",
                   help="mixed: bf16 compute with fp32 master weights and AdamW (18 B/param); fp32 (16); "
                        "bf16: pure bf16 (8) (default mixed)")
    z.add_argument("--no-shard", action="store_true", help="do not shard the training state (no ZeRO-3 / FSDP)")
    z.add_argument("--no-flash-attention", action="store_true",
                   help="activations of attention that stores its s x s scores")
    m.add_argument("--headroom", type=float, default=0.10,
                   help="fraction of each GPU kept free for the CUDA context and fragmentation (default 0.10)")
    m.add_argument("--json", action="store_true", help="print a JSON dict instead of the table")
    t = plan_sub.add_parser(
        "throughput", help="a run's step time per role, predicted for other topologies and worker counts",
        description="Fits the step equation's terms (rollout, verifier, reference, train, sync) to RUN_DIR's own "
                    "per-role timings, composes them by topology (sum colocated, max async), predicts the step "
                    "time for other topologies and rollout worker counts, and names the bottleneck with what to "
                    "change (formulas: `python -c 'import rlpost.plan.throughput as m; help(m)'`).")
    t.add_argument("run_dir", metavar="RUN_DIR", nargs="?", help="a run directory with RL steps in its metrics.jsonl")
    r = t.add_argument_group("before any run: a roofline of MODEL on GPUs (instead of RUN_DIR)")
    r.add_argument("--model", help="a size (7b), a named model or a model folder, as `plan memory` takes")
    r.add_argument("--gpus", type=int, default=8, help="GPUs of the job (default 8)")
    r.add_argument("--rollout-gpus", type=int, help="disaggregated / async: GPUs of the engines (default half)")
    r.add_argument("--prompts", type=int, default=128, help="prompts per step (default 128)")
    r.add_argument("--k", type=int, default=8, help="samples per prompt (default 8)")
    r.add_argument("--prompt-len", type=int, default=512, help="prompt tokens (default 512)")
    r.add_argument("--response-len", type=int, default=1024, help="mean response tokens (default 1024)")
    r.add_argument("--length-sigma", type=float, default=0.0,
                   help="response lengths log-normal with this sigma: the long tail (default 0: all equal)")
    r.add_argument("--max-response-len", type=int, help="the length cap (default 4 x the mean)")
    r.add_argument("--verifier-s", type=float, default=0.0, help="seconds of scoring per step (default 0)")
    r.add_argument("--no-reference", action="store_true", help="no KL term: no reference forward")
    r.add_argument("--tflops", type=float, default=989.0, help="peak dense bf16 TFLOP/s of one GPU (default H100 989)")
    r.add_argument("--hbm-tbs", type=float, default=3.35, help="HBM TB/s of one GPU (default H100 3.35)")
    r.add_argument("--mfu", type=float, default=0.4, help="fraction of peak FLOP/s reached (default 0.4)")
    r.add_argument("--decode-efficiency", type=float, default=0.6,
                   help="fraction of HBM bandwidth a decode step reaches (default 0.6)")
    r.add_argument("--network-gbs", type=float, default=50.0,
                   help="GB/s of the weight broadcast to engines on other GPUs (default 50)")
    t.add_argument("--warmup", type=int, default=3, help="first RL steps left out of the medians (default 3)")
    t.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="rollout worker counts to predict")
    t.add_argument("--sync-gbps", type=float, default=1.0,
                   help="GB/s of a weight transfer to a worker's own copy, when the run itself moved nothing "
                        "(default 1.0)")
    t.add_argument("--json", action="store_true", help="print a JSON dict instead of the table")


def run_plan(args, parser) -> int:
    """`rlpost plan memory`: the table (or JSON) of rlpost.plan.memory.estimate (exit 0 whether or not it fits);
    `rlpost plan throughput`: rlpost.plan.throughput.report of a run directory."""
    import json

    from rlpost.plan.memory import Setup, estimate, format_report, shape_for

    if args.plan_command == "throughput":
        from rlpost.plan import throughput

        try:
            if args.model:
                from rlpost.plan.memory import shape_for

                work = throughput.Workload(
                    prompts=args.prompts, k=args.k, prompt_len=args.prompt_len, response_len=args.response_len,
                    length_sigma=args.length_sigma, max_response_len=args.max_response_len,
                    verifier_s=args.verifier_s, reference=not args.no_reference, rollout_gpus=args.rollout_gpus)
                hw = throughput.Hardware(tflops=args.tflops, hbm_tbs=args.hbm_tbs, mfu=args.mfu,
                                         decode_efficiency=args.decode_efficiency, network_gbs=args.network_gbs)
                # one GPU cannot be split into rollout and training GPUs: only colocated applies
                tops = throughput.TOPOLOGIES if args.gpus > 1 else ("colocated",)
                rs = [throughput.roofline(shape_for(args.model), args.gpus, top, work, hw) for top in tops]
                print(json.dumps(rs, indent=2) if args.json else throughput.format_roofline(rs))
                return 0
            if not args.run_dir:
                raise ValueError("plan throughput needs RUN_DIR (a run's timings) or --model (a roofline)")
            r = throughput.report(args.run_dir, args.warmup, args.sync_gbps, args.workers)
        except (ValueError, OSError) as e:
            print(f"rlpost: error: {e}", file=sys.stderr)
            return 2
        print(json.dumps(r, indent=2) if args.json else throughput.format_report(r))
        return 0
    if args.plan_command != "memory":
        parser.parse_args(["plan", "--help"])
        return 0
    try:
        if args.layout == "rlpost":
            from rlpost.plan.memory import format_plan, plan, plan_inputs

            p = plan(*plan_inputs(args.inputs, args.ranks, args.prompt_tokens, args.gpu_memory_gb, args.headroom))
            print(json.dumps(p.to_dict(), indent=2) if args.json else format_plan(p))
            return 0
        if len(args.inputs) != 1 or "=" in args.inputs[0]:
            raise ValueError(f"--layout zero3 takes one MODEL (a size, a name or a folder), got {args.inputs}")
        shape = shape_for(args.inputs[0])
        setup = Setup(seq_len=args.seq_len, batch=args.batch, micro_batch=args.micro_batch, gpus=args.gpus,
                      gpu_memory_gb=args.gpu_memory_gb, topology=args.topology, rollout_gpus=args.rollout_gpus,
                      rollout_tp=args.rollout_tp, critic=args.critic, reward_model=args.reward_model,
                      lora_rank=args.lora_rank, checkpointing=args.checkpointing, precision=args.precision,
                      shard=not args.no_shard, flash_attention=not args.no_flash_attention, headroom=args.headroom)
        est = estimate(shape, setup)
    except (ValueError, KeyError, OSError) as e:
        print(f"rlpost: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(est.to_dict(), indent=2) if args.json else format_report(est))
    return 0


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


def search_methods() -> tuple[str, ...]:
    from rlpost.search import METHODS

    return METHODS


def run_search_command(args) -> int:
    from rlpost.search import search_command

    recipe, overrides = recipe_and_overrides(args)
    try:
        result = search_command(args.policy, recipe, overrides, prm=args.prm, orm=args.orm, ns=args.n,
                                methods=args.methods, problems=args.problems, width=args.width, out=args.out)
    except (ConfigError, ValueError, OSError) as e:
        print(f"rlpost: error: {e}", file=sys.stderr)
        return 1
    print(result["table"])
    print(f"rlpost search: {result['wall_seconds']:.0f} s; written to {result['written_to']}")
    return 0


def run_eval_command(args) -> int:
    """`rlpost eval`: print and write the metrics of `rlpost.evaluate.run_eval`."""
    from rlpost.evaluate import run_eval

    recipe, overrides = recipe_and_overrides(args)
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


def launch_torchrun(nproc: int, recipe: str | None, overrides: list[str], resume: str | None) -> int:
    """`rlpost train` again under torchrun, `nproc` ranks on this machine; its exit code. A resumed run keeps
    its saved config (which must say trainer.strategy=fsdp2)."""
    import socket
    import subprocess

    from rlpost.reaper import Reaper

    with socket.socket() as s:  # a free port on the loopback for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(port), "-m", "rlpost.cli", "train", *([recipe] if recipe else []),
           *overrides, *(["--resume", resume] if resume else ["trainer.strategy=fsdp2"])]
    print("rlpost: " + " ".join(cmd[1:]), flush=True)
    reaper = Reaper.start()  # torchrun and its ranks would train on for good after a SIGKILL of this process
    try:
        return subprocess.call(cmd)
    finally:
        if reaper is not None:
            reaper.stop()


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
