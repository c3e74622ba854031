"""Preference stage: the DPO family (rlpost/preference/) on the policy, offline.

Data: `preference.train_file` (JSONL or a `datasets` dataset), or pairs made from the policy's own
samples of the task's training prompts scored by the verifier (through the episode function; saved to
<run_dir>/preference_pairs.jsonl), or with task.env its episodes ranked by the environment's reward. Ends
with checkpoints/preference/. Under trainer.strategy=fsdp2 the policy is sharded and each rank trains on its
share of every batch (rlpost/preference/fit.py); self-made pairs are rank 0's, on every rank. A stop request
ends it at the next step without a checkpoint: a resume runs the stage again from its start.
"""

from __future__ import annotations

import os
import random
import time

from tqdm import tqdm

from rlpost import distributed as dist
from rlpost.env.source import runs_episodes
from rlpost.preference import get_preference_loss
from rlpost.preference.data import (PreferenceDataError, load_preferences, model_context, pairs_from_samples,
                                    tokenize_preferences, write_preference_rows)
from rlpost.preference.fit import train_preference
from rlpost.rollout import SamplingParams
from rlpost.stages.base import RunContext, Stage, register


def system_prompt(ctx: RunContext) -> str | None:
    """The task's system prompt: preference prompts are encoded as rollout encodes them."""
    return getattr(ctx.task, "system_prompt", None)


@register("preference")
class PreferenceStage(Stage):
    """`preference.*`; sampling from `rollout.*` for self-made pairs; AdamW's weight decay and betas, clipping,
    the non-finite guard, precision and gradient checkpointing from `trainer.*` (rlpost.preference.fit.
    trainer_config); generation batch size from `eval.batch_prompts`."""

    name = "preference"
    sections = ("preference", "rollout", "trainer", "eval")
    changes_weights = True

    @classmethod
    def from_config(cls, cfg, label: str | None = None) -> "PreferenceStage":
        return cls(cfg.preference, cfg.rollout, cfg.trainer, cfg.eval)

    def __init__(self, cfg, rollout_cfg, trainer_cfg, eval_cfg):
        self.cfg, self.rollout_cfg, self.trainer_cfg, self.eval_cfg = cfg, rollout_cfg, trainer_cfg, eval_cfg

    def log(self, ctx: RunContext, record: dict) -> None:
        """ctx.log; a repeated stage's lines carry its label (preference_2, preference_2_data, ...)."""
        if self.repeat > 1:
            record = {**record, "stage": record["stage"].replace("preference", self.label, 1)}
        ctx.log(record)

    def data(self, ctx: RunContext, max_length: int | None):
        pc = self.cfg
        if pc.train_file:
            data = load_preferences(pc.train_file, ctx.tokenizer, max_length=max_length, on_bad_row=pc.on_bad_row,
                                    split=pc.split, system_prompt=system_prompt(ctx))
            return data, pc.train_file
        rng = random.Random(self.seed(ctx))
        rows = ctx.task.train_rows
        rows = [rows[i] for i in rng.sample(range(len(rows)), min(pc.num_prompts, len(rows)))]
        params = SamplingParams(max_new_tokens=self.rollout_cfg.max_new_tokens,
                                temperature=self.rollout_cfg.temperature)
        t0 = time.perf_counter()
        ctx.weight_sync.push()
        pairs, stats = pairs_from_samples(ctx.engine, ctx.verifier, rows, ctx.prompt_ids(rows),
                                          k=pc.samples_per_prompt, params=params, seed=self.seed(ctx) + 7919,
                                          batch_prompts=self.eval_cfg.batch_prompts,
                                          episodes=runs_episodes(ctx.verifier))
        # sharded (fsdp2): every rank trains on its share of the same pairs, rank 0's (a GPU's sampling may differ)
        pairs, stats = dist.broadcast_object((pairs, stats))
        stats["time/pairs"] = time.perf_counter() - t0
        self.log(ctx, {"stage": "preference_data", "step": 0, **stats})
        tqdm.write(f"rlpost: {int(stats['pairs/made'])} preference pairs from {len(rows)} prompts x "
                   f"{pc.samples_per_prompt} samples (sample accuracy {stats['pairs/sample_accuracy']:.3f}; "
                   f"{int(stats['pairs/all_right'])} prompts all right, {int(stats['pairs/all_wrong'])} all wrong)")
        if not pairs:
            raise PreferenceDataError("no preference pairs: no prompt had both a correct and a wrong sample")
        path = os.path.join(ctx.run_dir, f"{self.label}_pairs.jsonl")  # preference_pairs.jsonl, preference_2_...
        if dist.is_main():
            write_preference_rows(pairs, path)
        return tokenize_preferences(pairs, ctx.tokenizer, max_length=max_length, on_bad_row=pc.on_bad_row,
                                    system_prompt=system_prompt(ctx)), path

    def run(self, ctx: RunContext) -> None:
        pc = self.cfg
        loss = get_preference_loss(**pc.loss)
        max_length = pc.max_length or model_context(ctx.model)
        data, source = self.data(ctx, max_length)
        if data.skipped:
            tqdm.write(f"rlpost: skipped {len(data.skipped)} bad preference row(s):\n  "
                       + "\n  ".join(data.skipped[:10])
                       + (f"\n  ... and {len(data.skipped) - 10} more" if len(data.skipped) > 10 else ""))
        eval_data = (load_preferences(pc.eval_file, ctx.tokenizer, max_length=max_length, on_bad_row=pc.on_bad_row,
                                      split=pc.split, system_prompt=system_prompt(ctx)) if pc.eval_file else None)
        key = self.label  # preference_loss, ...; a repeated stage's: preference_2_loss, ...
        ctx.summary.update({f"{key}_loss": loss.name, f"{key}_data": source,
                            f"{key}_examples": len(data), f"{key}_skipped_rows": len(data.skipped)})
        self.log(ctx, {"stage": "preference_data", "step": 0, "data/examples": len(data),
                       "data/skipped_rows": len(data.skipped)})
        metrics = train_preference(ctx.model, ctx.tokenizer, data, loss, pc, self.trainer_cfg, seed=self.seed(ctx),
                                   log=lambda record: self.log(ctx, record), eval_data=eval_data,
                                   stop=ctx.check_stop)
        ctx.summary.update({k if self.repeat == 1 else f"{key}/{k}": v for k, v in metrics.items()
                            if k.startswith("eval/")})
