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
from rlpost.models import load_model, save_model
from rlpost.reference import Reference
from rlpost.reward import Reward, load_reward_fn
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


def step_line(step: int, m: dict) -> str:
    """The short console line of one RL step."""
    return (f"step {step:4d} | reward {m['reward/mean']:.3f} | kl {m.get('loss/kl_ref', 0.0):.4f} "
            f"| len {m['rollout/response_len_mean']:.1f} | grad {m.get('train/grad_norm', float('nan')):.3f} "
            f"| {m['time/step']:.2f}s (rollout {100 * m['time_share/rollout']:.0f}%)")


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

    engine = build_engine(cfg.rollout.engine, model, tokenizer)
    reward = Reward(verify, tokenizer, on_error=cfg.task.reward_on_error)
    eval_prompt_ids = [tokenizer.encode_prompt(r["prompt"]) for r in task.eval_rows]

    def evaluate() -> float:
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

        # ---- stage 2: RL
        algorithm = get_algorithm(**cfg.algorithm)
        critic = Critic.build(model, cfg.critic.type) if algorithm.uses_critic else None
        trainer = Trainer(model, lr=cfg.trainer.lr, weight_decay=cfg.trainer.weight_decay,
                          grad_clip=cfg.trainer.grad_clip, micro_batch_size=cfg.trainer.micro_batch_size,
                          max_nonfinite_steps=cfg.trainer.max_nonfinite_steps, temperature=cfg.rollout.temperature,
                          epochs=cfg.trainer.epochs, minibatches=cfg.trainer.minibatches, critic=critic,
                          critic_lr=cfg.critic.lr, seed=cfg.seed)
        params = SamplingParams(max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                                top_k=cfg.rollout.top_k, top_p=cfg.rollout.top_p)
        controller = Controller(
            rows=task.train_rows, prompt_ids=[tokenizer.encode_prompt(r["prompt"]) for r in task.train_rows],
            engine=engine, reward=reward,
            reference=Reference(model, cfg.rollout.temperature) if algorithm.uses_reference else None,
            algorithm=algorithm, trainer=trainer, weight_sync=WeightSync(model, engine, cfg.rl.weight_sync),
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

        summary["pass@1_rl"] = evaluate()
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


def print_table(summary: dict) -> None:
    def pct(v):
        return "   n/a" if v is None else f"{100 * v:5.1f}%"

    print("\n  held-out pass@1")
    print("  ---------------------------")
    print(f"  demonstrator        {pct(summary.get('demonstrator_accuracy'))}")
    print(f"  after SFT           {pct(summary.get('pass@1_sft'))}")
    print(f"  after RL            {pct(summary.get('pass@1_rl'))}")
    print(f"  wall-clock          {summary['wall_seconds']:6.1f}s")
    print(f"  run directory       {summary['run_dir']}\n")
