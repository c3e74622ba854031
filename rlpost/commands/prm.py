"""`rlpost prm`: a process reward model (rlpost/env/process_reward_model.py) and an outcome reward model from one
policy's samples.

    rlpost prm recipes/prm.yaml model.name=runs/<sft run>/checkpoints/sft

The policy (`model.name`, usually an SFT checkpoint) samples `prm.solutions` solutions of `prm.problems`
training problems; Monte-Carlo continuations label every step (`prm.rollouts` each). The PRM (trunk copied
from the policy) is fitted on those labels, and the same is done for `prm.eval_problems` held-out problems
to measure it. With `prm.orm`, the Bradley–Terry outcome reward model is fitted on pairs of the same
solutions (a verified one against a wrong one of the same problem). The run directory gets
checkpoints/prm, checkpoints/orm, prm_labels.jsonl (every labelled solution) and summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

from rlpost.commands.common import fit_command, recipe_arguments
from rlpost.commands.rm import start_model_run
from rlpost.models import encode_prompt
from rlpost.preference.data import model_context, tokenize_preferences
from rlpost.env.process_reward_model import ProcessRewardModel, StepExample, fit_prm, mc_step_labels
from rlpost.env.reward_model import RewardModel, fit_reward_model
from rlpost.env.verifiers import reward_from_config
from rlpost.rollout import build_engine
from rlpost.tasks.multistep import step_truth


def add_prm(sub) -> None:
    p = sub.add_parser(
        "prm", help="train a process reward model on Monte-Carlo step labels (and an outcome model) and save both",
        description="Sample solutions of the task's problems from model.name (usually an SFT checkpoint), label "
                    "every reasoning step by the fraction of prm.rollouts continuations from its end that reach a "
                    "verified answer, fit a PRM (trunk copied from the policy) on those labels, and report its "
                    "held-out step-label accuracy. With prm.orm (default), a Bradley-Terry outcome reward model is "
                    "fitted on pairs of the same solutions. Writes <run directory>/checkpoints/prm and /orm "
                    "(rlpost search --prm/--orm reads them). Same keys as `rlpost train --help` (section prm.*).",
        epilog="e.g. rlpost prm recipes/prm.yaml model.name=runs/cot_math-X/checkpoints/sft prm.problems=500",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    recipe_arguments(p)


def cmd_prm(args) -> int:
    return fit_command(args, train_prm, "prm")


def outcome_pairs(examples: list[StepExample], tokenizer, rng: random.Random) -> list[dict]:
    """Preference rows {prompt, chosen, rejected}: per problem, its verified solutions against its wrong ones
    (as many pairs as the smaller side has, each solution used once)."""
    by_prompt: dict[str, list[StepExample]] = {}
    for e in examples:
        by_prompt.setdefault(e.row["prompt"], []).append(e)
    rows = []
    for prompt, group in by_prompt.items():
        right = [tokenizer.decode(e.response) for e in group if e.labels[-1] == 1.0]
        wrong = [tokenizer.decode(e.response) for e in group if e.labels[-1] == 0.0]
        rng.shuffle(right), rng.shuffle(wrong)
        rows += [{"prompt": prompt, "chosen": c, "rejected": r, "where": f"problem {prompt!r}"}
                 for c, r in zip(right, wrong) if c != r]
    return rows


def write_labels(path: str, examples: list[StepExample], tokenizer) -> None:
    with open(path, "w") as f:
        for e in examples:
            steps, start = [], 0
            for end in e.ends:
                steps.append(tokenizer.decode(e.response[start:end + 1]))
                start = end + 1
            f.write(json.dumps({"prompt": e.row["prompt"], "answer": e.row.get("answer"), "steps": steps,
                                "labels": e.labels, "truth": e.truth}) + "\n")


def fit_orm(cfg, policy, tokenizer, train: list[StepExample], held_out: list[StepExample], rng: random.Random,
            run_dir: str, log) -> dict:
    """The Bradley–Terry outcome model on pairs of the PRM's own samples, saved to checkpoints/orm; without a
    single pair (no problem had both a verified and a wrong solution) it is skipped, saying why."""
    rc = cfg.reward_model
    rows = [outcome_pairs(x, tokenizer, rng) for x in (train, held_out)]
    if not rows[0]:
        why = (f"no training problem had both a verified and a wrong solution among its {cfg.prm.solutions} samples "
               "(raise prm.solutions or prm.problems)")
        print(f"rlpost: outcome reward model skipped: {why}")
        return {"orm": None, "orm_skipped": why}
    pairs = [tokenize_preferences(r, tokenizer, max_length=model_context(policy)) if r else None for r in rows]
    print(f"rlpost: outcome reward model: {len(pairs[0])} training pairs, {len(rows[1])} held-out pairs "
          "(a verified against a wrong solution of one problem)")
    orm = RewardModel.from_policy(policy)
    result = fit_reward_model(orm, pairs[0], pairs[1], pad_id=tokenizer.pad_token_id, epochs=rc.epochs,
                              batch_size=rc.batch_size, lr=rc.lr, seed=cfg.seed, log=log)
    orm.save(os.path.join(run_dir, "checkpoints", "orm"), tokenizer)
    return {"orm": os.path.join(run_dir, "checkpoints", "orm"), "orm_pairs": len(pairs[0]),
            "orm_pair_accuracy": result.get("rm/eval_accuracy")}


def train_prm(cfg, recipe_name: str = "prm") -> dict:
    """Label, fit and save the PRM (and the ORM); returns the summary (held-out step accuracy and more)."""
    pc = cfg.prm
    t_start = time.perf_counter()
    task, policy, tokenizer, run_dir, log = start_model_run(cfg, recipe_name, "prm")
    policy.eval()
    engine = build_engine(cfg.rollout.engine, policy, tokenizer, share_weights=True)
    verify = reward_from_config(cfg.task, task.verify)
    rng = random.Random(cfg.seed)
    train_rows = rng.sample(task.train_rows, min(pc.problems, len(task.train_rows)))
    eval_rows = task.eval_rows[:pc.eval_problems]

    def label(rows_, seed, desc):
        return mc_step_labels(engine, verify, tokenizer, rows_,
                              [encode_prompt(tokenizer, r["prompt"], task.system_prompt) for r in rows_],
                              solutions=pc.solutions, rollouts=pc.rollouts, max_new_tokens=cfg.rollout.max_new_tokens,
                              sep=pc.separator, temperature=cfg.rollout.temperature, seed=seed,
                              truth=step_truth if task.name == "multistep" else None,
                              success=cfg.eval.success_threshold, desc=desc)

    try:
        train, held_out = label(train_rows, cfg.seed, "prm labels"), label(eval_rows, cfg.seed + 1, "prm held-out")
        engine.close()
        write_labels(os.path.join(run_dir, "prm_labels.jsonl"), train + held_out, tokenizer)
        prm = ProcessRewardModel.from_policy(policy)
        result = fit_prm(prm, train, held_out, pad_id=tokenizer.pad_token_id, epochs=pc.epochs,
                         batch_size=pc.batch_size, lr=pc.lr, seed=cfg.seed, log=log)
        prm.save(os.path.join(run_dir, "checkpoints", "prm"), tokenizer)
        summary = {"run_dir": run_dir, "prm": os.path.join(run_dir, "checkpoints", "prm"),
                   "solutions_labelled": len(train), "steps_labelled": sum(len(e.ends) for e in train),
                   "policy_accuracy": sum(e.labels[-1] for e in held_out) / len(held_out),
                   **{k.split("/", 1)[1]: v for k, v in result.items() if "/" in k}}
        if pc.orm:
            summary.update(fit_orm(cfg, policy, tokenizer, train, held_out, rng, run_dir, log))
    except BaseException:
        log.close(exit_code=1)
        raise
    finally:
        engine.close()
        log.close()
    summary["wall_seconds"] = time.perf_counter() - t_start
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"rlpost: PRM saved to {summary['prm']}; held-out step-label accuracy "
          f"{100 * summary['eval_step_accuracy']:.1f}% over {int(summary['eval_steps'])} steps"
          + (f", agreement with the task's own step check {100 * summary['eval_truth_accuracy']:.1f}% "
             f"(the Monte-Carlo labels' own: {100 * summary['label_truth_agreement']:.1f}%)"
             if "eval_truth_accuracy" in summary else ""))
    return summary
