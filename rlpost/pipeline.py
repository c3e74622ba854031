"""The main job: SFT on demonstrations, then RL against the verifier, with held-out pass@1 around each.

`train(cfg)` writes a run directory:

    config.yaml        the resolved config
    metrics.jsonl      one JSON line per SFT log point and per RL step
    checkpoints/sft/   the model after SFT (safetensors), the starting point of RL
    checkpoints/final/ the model after RL  (or checkpoints/last/ when the run stopped on an error)
    summary.json       demonstrator_accuracy, pass@1_sft, pass@1_rl, wall_seconds, status
"""

from __future__ import annotations

import json
import math
import os
import random
import time

import torch
import yaml
from tqdm import tqdm

from rlpost.algorithms import get_algorithm
from rlpost.config import Config, to_dict
from rlpost.controller import Controller
from rlpost.critic import Critic
from rlpost.evaluate import pass_at_1
from rlpost.models import compile_model, load_model, save_model
from rlpost.reference import Reference
from rlpost.reward import Reward, load_reward_fn
from rlpost.preference.data import load_preferences, model_context, read_preference_rows, tokenize_preferences
from rlpost.reward_model import LearnedReward, RewardModel, fit_reward_model, task_pairs
from rlpost.rollout import SamplingParams, build_engine
from rlpost.sft import run_sft
from rlpost.tasks import load_task
from rlpost.trainer import Trainer
from rlpost.weight_sync import WeightSync


class RunLog:
    """metrics.jsonl writer (one line per call) that never holds data back: each line is flushed."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.file = open(self.path, "a")

    def __call__(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def make_run_dir(cfg: Config, recipe_name: str) -> str:
    name = cfg.run_name or f"{recipe_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = os.path.join(cfg.out_dir, name)
    if os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
        raise FileExistsError(f"run directory {run_dir} already holds a run; choose another run_name")
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    return run_dir


_SHORT = {"rollout": "roll", "reward": "rew", "reference": "ref", "critic": "critic", "advantages": "adv",
          "train": "train", "sync": "sync", "other": "other"}


def step_line(step: int, m: dict) -> str:
    """The short console line of one RL step: learning signals, then where the step's wall-clock went
    (share of each of the six roles; critic and untimed glue only when they reach 0.5%), throughput, and
    the engine/trainer log-prob mismatch."""
    shares = " ".join(f"{_SHORT[r]} {100 * m.get(f'time_share/{r}', 0.0):.0f}%" for r in _SHORT
                      if r not in ("critic", "other") or m.get(f"time_share/{r}", 0.0) >= 0.005)
    return (f"step {step:4d} | reward {m['reward/mean']:.3f} | kl {m.get('loss/kl_ref', 0.0):.4f} "
            f"| len {m['rollout/response_len_mean']:.1f} | grad {m.get('train/grad_norm', float('nan')):.3f} "
            f"| {m['time/step']:.2f}s: {shares} | {m['rollout/tokens_per_s']:.0f} tok/s gen, "
            f"{m.get('step/tokens_per_s', float('nan')):.0f} tok/s step "
            f"| dlogp max {m.get('rollout/logp_mismatch_max', float('nan')):.1e} "
            f"mean {m.get('rollout/logp_mismatch_mean', float('nan')):.1e}")


def train(cfg: Config, recipe_name: str = "default") -> dict:
    """Run the whole pipeline; returns the summary (also written to summary.json)."""
    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    task = load_task(cfg.task)
    model, tokenizer = load_model(cfg.model, task.alphabet)
    verify = load_reward_fn(cfg.task.reward) if cfg.task.reward else task.verify
    run_dir = make_run_dir(cfg, recipe_name)
    log = RunLog(run_dir)
    print(f"rlpost: run directory {run_dir}")
    print(f"rlpost: model {cfg.model.name} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params), "
          f"task {task.name} ({len(task.train_rows)} train / {len(task.eval_rows)} held-out prompts)")

    engine = build_engine(cfg.rollout.engine, model, tokenizer, share_weights=cfg.rl.weight_sync == "pointer")
    weight_sync = WeightSync(model, engine, cfg.rl.weight_sync)
    reward = Reward(verify, tokenizer, on_error=cfg.task.reward_on_error)
    eval_prompt_ids = [tokenizer.encode_prompt(r["prompt"]) for r in task.eval_rows]

    def evaluate() -> float:
        weight_sync.push()  # an engine with its own copy of the weights (copy, vllm) is brought up to date
        return pass_at_1(engine, reward, task.eval_rows, eval_prompt_ids, samples=cfg.eval.samples_per_prompt,
                         temperature=cfg.eval.temperature, max_new_tokens=cfg.rollout.max_new_tokens,
                         batch_prompts=cfg.eval.batch_prompts, seed=cfg.seed)

    summary: dict = {"run_dir": run_dir, "demonstrator_accuracy": task.demonstrator_accuracy, "status": "running"}
    try:
        # ---- stage 1: SFT on the demonstrations
        if cfg.sft.steps > 0:
            run_sft(model, tokenizer, task.demonstrations, steps=cfg.sft.steps, batch_size=cfg.sft.batch_size,
                    lr=cfg.sft.lr, warmup_steps=cfg.sft.warmup_steps, seed=cfg.seed, log=log)
            save_model(model, tokenizer, os.path.join(run_dir, "checkpoints", "sft"))
        summary["pass@1_sft"] = evaluate()
        log({"stage": "eval", "step": 0, "eval/pass@1": summary["pass@1_sft"]})
        print(f"rlpost: held-out pass@1 before RL: {summary['pass@1_sft']:.3f}")

        # ---- optional stage: offline preference optimisation (DPO family), see rlpost/preference/
        if cfg.preference.enabled:
            from rlpost.preference.trainer import run_preference_stage

            summary.update(run_preference_stage(cfg, model, tokenizer, task, engine, reward, run_dir, log))
            summary["pass@1_dpo"] = evaluate()
            log({"stage": "eval", "step": 0, "eval/pass@1": summary["pass@1_dpo"], "after": "preference"})
            print(f"rlpost: held-out pass@1 after {summary['preference_loss']}: {summary['pass@1_dpo']:.3f}")

        # ---- stage 1b (RLHF): a reward model takes the verifier's place as the RL reward
        rl_reward = reward
        if cfg.reward_model.train or cfg.reward_model.path:
            rl_reward = learned_reward(cfg, model, tokenizer, task, verify, run_dir, log, summary)

        # ---- stage 2: RL
        algorithm = get_algorithm(**cfg.algorithm)
        critic = Critic.build(model, cfg.critic.type) if algorithm.uses_critic else None
        trainer = Trainer(model, lr=cfg.trainer.lr, weight_decay=cfg.trainer.weight_decay,
                          grad_clip=cfg.trainer.grad_clip, micro_batch_size=cfg.trainer.micro_batch_size,
                          max_nonfinite_steps=cfg.trainer.max_nonfinite_steps, temperature=cfg.rollout.temperature,
                          epochs=cfg.trainer.epochs, minibatches=cfg.trainer.minibatches, critic=critic,
                          critic_lr=cfg.critic.lr, seed=cfg.seed)
        params = SamplingParams(max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                                top_k=cfg.rollout.top_k, top_p=cfg.rollout.top_p,
                                max_num_seqs=cfg.rollout.max_num_seqs, stop=list(cfg.rollout.stop))
        reference = Reference(model, cfg.rollout.temperature) if algorithm.uses_reference else None
        if cfg.trainer.compile:  # after the reference (and a separate critic) copied the eager policy
            compile_model(model)
            if reference is not None:
                compile_model(reference.model)
        controller = Controller(
            rows=task.train_rows, prompt_ids=[tokenizer.encode_prompt(r["prompt"]) for r in task.train_rows],
            engine=engine, reward=rl_reward, reference=reference,
            algorithm=algorithm, trainer=trainer, weight_sync=weight_sync,
            params=params, prompts_per_step=cfg.rollout.prompts_per_step, k=cfg.rollout.k, seed=cfg.seed,
            critic=critic, max_refill_rounds=cfg.rollout.max_refill_rounds)
        bar = tqdm(range(1, cfg.rl.steps + 1), desc=f"rl/{algorithm.name}", unit="step", dynamic_ncols=True)
        for step in bar:
            metrics = controller.step(step)
            if cfg.rl.eval_every and step % cfg.rl.eval_every == 0 and step != cfg.rl.steps:
                metrics["eval/pass@1"] = evaluate()
            log({"stage": "rl", "step": step, **metrics})
            bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}")
            tqdm.write(step_line(step, metrics) + (f" | pass@1 {metrics['eval/pass@1']:.3f}"
                                                   if "eval/pass@1" in metrics else ""))

        summary["pass@1_rl"] = evaluate() if cfg.rl.steps > 0 else None  # no RL stage (`rlpost dpo`)
        log({"stage": "eval", "step": cfg.rl.steps, "eval/pass@1": summary["pass@1_rl"]})
        save_model(model, tokenizer, os.path.join(run_dir, "checkpoints", "final"))
        summary["status"] = "ok"
    except BaseException as e:  # lose nothing: keep the weights and say why the run stopped
        save_model(model, tokenizer, os.path.join(run_dir, "checkpoints", "last"))
        summary["status"] = f"failed: {type(e).__name__}: {e}"
        raise
    finally:
        summary["wall_seconds"] = time.perf_counter() - t_start
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        log.close()
    print_table(summary)
    return summary


def fit_reward_model_from_config(cfg: Config, policy, tokenizer, task, run_dir: str, log) -> tuple[RewardModel, dict]:
    """A Bradley–Terry reward model, trunk copied from `policy`, saved to <run_dir>/checkpoints/reward_model.

    Pairs come from preference.train_file (JSONL or a `datasets` dataset; held out: preference.eval_file,
    else the last 10 %), or, without one, from the arithmetic task: the right answer against a one-digit
    slip, `reward_model.label_noise` of them flipped, held out from the task's held-out problems."""
    rc, pc = cfg.reward_model, cfg.preference
    max_length = pc.max_length or model_context(policy)
    if pc.train_file:
        if pc.eval_file:
            train = load_preferences(pc.train_file, tokenizer, max_length=max_length, on_bad_row=pc.on_bad_row,
                                     split=pc.split)
            held_out = load_preferences(pc.eval_file, tokenizer, max_length=max_length, on_bad_row=pc.on_bad_row,
                                        split=pc.split)
        else:  # hold out the last 10 % of the pairs
            rows = read_preference_rows(pc.train_file, pc.split)
            cut = max(len(rows) - max(len(rows) // 10, 1), 1)
            train = tokenize_preferences(rows[:cut], tokenizer, max_length=max_length, on_bad_row=pc.on_bad_row)
            held_out = tokenize_preferences(rows[cut:], tokenizer, max_length=max_length,
                                            on_bad_row=pc.on_bad_row) if cut < len(rows) else None
        source = pc.train_file
    elif task.name == "arithmetic":
        rng = random.Random(cfg.seed)
        train_rows = rng.sample(task.train_rows, min(rc.pairs, len(task.train_rows)))
        train = tokenize_preferences(task_pairs(train_rows, rng, rc.label_noise), tokenizer, max_length=max_length)
        held_out = tokenize_preferences(task_pairs(task.eval_rows[:rc.eval_pairs], rng), tokenizer,
                                        max_length=max_length)
        source = f"the arithmetic task ({100 * rc.label_noise:.0f}% of training labels flipped)"
    else:
        raise ValueError(f"the reward model needs preference pairs: set preference.train_file (task {task.name!r} "
                         "cannot make wrong answers by itself)")
    if train.skipped:
        print(f"rlpost: reward model: skipped {len(train.skipped)} bad pair(s), e.g. {train.skipped[0]}")
    print(f"rlpost: reward model: {len(train)} training pairs from {source}, "
          f"{len(held_out) if held_out is not None else 0} held-out pairs")
    rm = RewardModel.from_policy(policy)
    result = fit_reward_model(rm, train, held_out, pad_id=tokenizer.pad_token_id, epochs=rc.epochs,
                              batch_size=rc.batch_size, lr=rc.lr, seed=cfg.seed, log=log)
    rm.save(os.path.join(run_dir, "checkpoints", "reward_model"), tokenizer)
    return rm, result


def learned_reward(cfg: Config, policy, tokenizer, task, verify, run_dir: str, log, summary: dict) -> LearnedReward:
    """The RLHF reward role: a reward model loaded from reward_model.path or trained now; the verifier is
    kept as the gold reward that is logged beside it."""
    if cfg.reward_model.path:
        rm, rm_tokenizer = RewardModel.load(cfg.reward_model.path)
    else:
        rm, result = fit_reward_model_from_config(cfg, policy, tokenizer, task, run_dir, log)
        rm_tokenizer = tokenizer
        summary["rm_pair_accuracy"] = result.get("rm/eval_accuracy")
        summary["rm_margin"] = result.get("rm/eval_margin")
    reward = LearnedReward(rm, rm_tokenizer, gold=verify)
    reward.check_tokenizer(tokenizer, [r["prompt"] for r in task.train_rows[:16]])
    return reward


def train_reward_model(cfg: Config, recipe_name: str = "rm") -> dict:
    """`rlpost rm`: fit a reward model from `model.name` (usually an SFT checkpoint) and save it; the summary
    has the held-out pair accuracy and margin."""
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    task = load_task(cfg.task)
    policy, tokenizer = load_model(cfg.model, task.alphabet)
    run_dir = make_run_dir(cfg, recipe_name)
    log = RunLog(run_dir)
    print(f"rlpost: run directory {run_dir}")
    try:
        _, result = fit_reward_model_from_config(cfg, policy, tokenizer, task, run_dir, log)
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


def print_table(summary: dict) -> None:
    def pct(v):
        return "   n/a" if v is None else f"{100 * v:5.1f}%"

    print("\n  held-out pass@1")
    print("  ---------------------------")
    print(f"  demonstrator        {pct(summary.get('demonstrator_accuracy'))}")
    print(f"  after SFT           {pct(summary.get('pass@1_sft'))}")
    if "pass@1_dpo" in summary:
        print(f"  after {summary['preference_loss'].upper():<14}{pct(summary['pass@1_dpo'])}")
    print(f"  after RL            {pct(summary.get('pass@1_rl'))}")
    if summary.get("rm_pair_accuracy") is not None:
        print(f"  reward model pairs  {pct(summary['rm_pair_accuracy'])}  (held-out pair accuracy)")
    print(f"  wall-clock          {summary['wall_seconds']:6.1f}s")
    print(f"  run directory       {summary['run_dir']}\n")
