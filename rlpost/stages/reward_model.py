"""Reward-model stage (RLHF): a Bradley-Terry reward model (rlpost/env/reward_model.py) becomes the RL reward
(`rl.reward: {name: reward_model}`, which this stage's presence in the run means).

It is loaded from `reward_model.path`, or trained now with its trunk copied from the policy, on pairs
from `preference.train_file` or, without one, from the arithmetic task (the right answer against a
one-digit slip). The task's verifier stays as the gold reward, logged beside the proxy. Its end-of-stage
checkpoint records only that it ran: a resume loads the model from checkpoints/reward_model/.
`rlpost rm` (rlpost/commands/rm.py) runs the training part alone.

Under trainer.strategy=fsdp2 the reward model is sharded while it is fitted (its trunk like a policy, the head
one more group) and each rank fits its share of each batch of pairs (rlpost.env.reward_model.fit_epochs); it is
then gathered into a plain model on every rank, which scores the RL rollouts, and rank 0 saves it.
"""

from __future__ import annotations

import os
import random

from rlpost import distributed as dist
from rlpost.preference.data import load_preferences, model_context, read_preference_rows, tokenize_preferences
from rlpost.env.reward_model import RewardModel, fit_reward_model, task_pairs
from rlpost.env.sources import SourceInputs, build_rl_reward
from rlpost.stages.base import RunContext, Stage, register


def fit_reward_model_from_config(rc, pc, seed: int, policy, tokenizer, task, run_dir: str, log, sharded: bool = False):
    """A Bradley-Terry reward model, trunk copied from `policy`, saved to <run_dir>/checkpoints/reward_model;
    `sharded` (trainer.strategy=fsdp2): fitted sharded over the ranks, returned whole on every rank.

    Pairs come from preference.train_file (JSONL or a `datasets` dataset; held out: preference.eval_file,
    else the last 10 %), or, without one, from the arithmetic task: the right answer against a one-digit
    slip, `reward_model.label_noise` of them flipped, held out from the task's held-out problems."""
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
        rng = random.Random(seed)
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
    if sharded:
        rm.shard()
    result = fit_reward_model(rm, train, held_out, pad_id=tokenizer.pad_token_id, epochs=rc.epochs,
                              batch_size=rc.batch_size, lr=rc.lr, seed=seed, log=log)
    rm = rm.unsharded()
    if dist.is_main():
        rm.save(os.path.join(run_dir, "checkpoints", "reward_model"), tokenizer)
    dist.barrier()  # no rank reads it before it is written
    return rm, result


@register("reward_model")
class RewardModelStage(Stage):
    """`reward_model.*` (and `preference.*` for the pair data); `trainer_cfg`: the run's `trainer.*`, whose
    micro-batching the model scores the RL stage's rollouts in, and whose `strategy` shards the fit."""

    name = "reward_model"
    sections = ("reward_model", "trainer")
    checkpoint = "after_reward_model"

    @classmethod
    def from_config(cls, cfg, label: str | None = None) -> "RewardModelStage":
        return cls(cfg.reward_model, cfg.preference, cfg.trainer)

    def __init__(self, cfg, preference_cfg, trainer_cfg=None):
        self.cfg, self.preference_cfg, self.trainer_cfg = cfg, preference_cfg, trainer_cfg
        self.sharded = trainer_cfg is not None and trainer_cfg.strategy == "fsdp2"

    def use(self, ctx: RunContext, rm: RewardModel, rm_tokenizer) -> None:
        """The RL reward from now on: the registry's reward_model source over this model (rl.reward)."""
        inputs = SourceInputs(None, ctx.tokenizer, ctx.verifier, [r["prompt"] for r in ctx.task.train_rows[:16]],
                              system=ctx.task.system_prompt, reward_model=(rm, rm_tokenizer), trainer=self.trainer_cfg)
        ctx.rl_reward = build_rl_reward("reward_model", {}, inputs)

    def run(self, ctx: RunContext) -> None:
        if self.cfg.path:
            self.use(ctx, *RewardModel.load(self.cfg.path))
            return
        rm, result = fit_reward_model_from_config(self.cfg, self.preference_cfg, ctx.seed, ctx.model, ctx.tokenizer,
                                                  ctx.task, ctx.run_dir, ctx.log, sharded=self.sharded)
        ctx.summary["rm_pair_accuracy"] = result.get("rm/eval_accuracy")
        ctx.summary["rm_margin"] = result.get("rm/eval_margin")
        self.use(ctx, rm, ctx.tokenizer)

    def restore(self, ctx: RunContext) -> None:
        self.use(ctx, *RewardModel.load(self.cfg.path or os.path.join(ctx.run_dir, "checkpoints", "reward_model")))
