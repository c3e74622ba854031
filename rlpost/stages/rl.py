"""RL stage: the controller's seven-step loop (rlpost/controller.py), `rl.steps` times.

It builds the roles from their own sections: the algorithm (`algorithm.*`), the critic (`critic.*`,
PPO), the reference (a frozen copy of the policy as the stage starts, saved once to
checkpoints/reference/; with LoRA the policy's own adapter-free base, saved in every checkpoint),
the trainer (`trainer.*`), the sampling (`rollout.*`); the reward is the run's RL reward (the verifier,
or a learned reward model) and the engine and weight sync are the run's.

Every `rl.eval_every` steps it measures held-out pass@1; every `rl.save_every` steps it writes
checkpoints/step_<n>/ (the newest `rl.keep_checkpoints` are kept); it ends with checkpoints/final/.
"""

from __future__ import annotations

import os

from tqdm import tqdm

from rlpost.algorithms import get_algorithm
from rlpost.checkpoint import prune, write_model_folder
from rlpost.controller import Controller
from rlpost.critic import Critic
from rlpost.models import compile_model, load_weights, save_model
from rlpost.reference import Reference
from rlpost.rollout import SamplingParams
from rlpost.run import RunContext, Stage
from rlpost.schedule import LRSchedule
from rlpost.trainer import Trainer

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


class RLStage(Stage):
    """`rl.*`, `rollout.*`, `algorithm`, `trainer.*`, `critic.*`; `evaluation` measures pass@1 mid-stage."""

    name = "rl"
    changes_weights = True
    checkpoint = "final"
    keep_step_checkpoints = True

    def __init__(self, cfg, rollout_cfg, algorithm_cfg: dict, trainer_cfg, critic_cfg, evaluation):
        self.cfg, self.rollout_cfg, self.algorithm_cfg = cfg, rollout_cfg, algorithm_cfg
        self.trainer_cfg, self.critic_cfg, self.evaluation = trainer_cfg, critic_cfg, evaluation
        self.step = 0

    def setup(self, ctx: RunContext) -> None:
        rc, tc, model = self.rollout_cfg, self.trainer_cfg, ctx.model
        self.algorithm = get_algorithm(**self.algorithm_cfg)
        self.critic = (Critic.build(model, self.critic_cfg.type, precision=tc.precision)
                       if self.algorithm.uses_critic else None)
        schedule = LRSchedule(tc.lr_schedule, tc.warmup_steps, total_steps=self.cfg.steps * tc.epochs * tc.minibatches,
                              min_lr_ratio=tc.min_lr_ratio)
        self.trainer = Trainer(model, lr=tc.lr, weight_decay=tc.weight_decay, grad_clip=tc.grad_clip,
                               micro_batch_size=tc.micro_batch_size, max_nonfinite_steps=tc.max_nonfinite_steps,
                               temperature=rc.temperature, epochs=tc.epochs, minibatches=tc.minibatches,
                               critic=self.critic, critic_lr=self.critic_cfg.lr, seed=ctx.seed,
                               precision=tc.precision, gradient_checkpointing=tc.gradient_checkpointing,
                               schedule=schedule)
        self.reference = Reference(model, rc.temperature, tc.precision) if self.algorithm.uses_reference else None
        if tc.compile:  # after the reference (and a separate critic) copied the eager policy
            compile_model(model)
            if self.reference is not None and not self.reference.shares_policy:
                compile_model(self.reference.model)
        params = SamplingParams(max_new_tokens=rc.max_new_tokens, temperature=rc.temperature, top_k=rc.top_k,
                                top_p=rc.top_p, max_num_seqs=rc.max_num_seqs, stop=list(rc.stop))
        rows = ctx.task.train_rows
        self.controller = Controller(
            rows=rows, prompt_ids=ctx.prompt_ids(rows), engine=ctx.engine, reward=ctx.rl_reward,
            reference=self.reference, algorithm=self.algorithm, trainer=self.trainer, weight_sync=ctx.weight_sync,
            params=params, prompts_per_step=rc.prompts_per_step, k=rc.k, seed=ctx.seed, critic=self.critic,
            max_refill_rounds=rc.max_refill_rounds)

    def state_dict(self) -> dict:
        return {"step": self.step, "controller": self.controller.state_dict(), "trainer": self.trainer.state_dict(),
                "critic": self.critic.state_dict() if self.critic is not None else None}

    def load_state_dict(self, ctx: RunContext, state: dict) -> None:
        self.step = state["step"]
        self.controller.load_state_dict(state["controller"])
        self.trainer.load_state_dict(state["trainer"])
        if self.critic is not None:
            self.critic.load_state_dict(state["critic"])
        if self.reference is not None and not self.reference.shares_policy:  # the policy as the stage started
            load_weights(self.reference.model, os.path.join(ctx.run_dir, "checkpoints", "reference"))
        ctx.weight_sync.load_state_dict(state["weight_sync"])

    def save(self, ctx: RunContext) -> None:
        state = {**self.state_dict(), "weight_sync": ctx.weight_sync.state_dict()}
        ctx.save(f"step_{self.step}", step=self.step, finished=False, state=state, weights=True)
        prune(ctx.run_dir, self.cfg.keep_checkpoints, "step_")

    def run(self, ctx: RunContext) -> None:
        c = self.cfg
        if self.step == 0 and self.reference is not None and not self.reference.shares_policy:
            write_model_folder(ctx.run_dir, "reference", lambda f: save_model(self.reference.model, ctx.tokenizer, f))
        bar = tqdm(range(self.step + 1, c.steps + 1), initial=self.step, total=c.steps,
                   desc=f"rl/{self.algorithm.name}", unit="step", dynamic_ncols=True)
        for step in bar:
            metrics = self.controller.step(step)
            if c.eval_every and step % c.eval_every == 0 and step != c.steps:
                result = self.evaluation.evaluate(ctx)
                metrics["eval/pass@1"], metrics["eval/mean_reward"] = result["pass@1"], result["mean_reward"]
            ctx.log({"stage": "rl", "step": step, **metrics})
            bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}")
            tqdm.write(step_line(step, metrics) + (f" | pass@1 {metrics['eval/pass@1']:.3f}"
                                                   if "eval/pass@1" in metrics else ""))
            self.step = step
            if c.save_every and step % c.save_every == 0 and step < c.steps:
                self.save(ctx)
            ctx.check_stop(save=lambda: self.save(ctx))
        bar.close()
