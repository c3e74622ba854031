"""Rejection-sampling SFT: the policy distils its own verified samples (the stage DeepSeek-R1 runs between
its two RL runs; "expert iteration" in older work).

    1. `rejection.num_prompts` training prompts, `rejection.samples_per_prompt` samples each, drawn by the
       current policy through the episode function (rlpost/rollout/episodes.py), the one path RL and
       evaluation sample through, and scored by the task's verifier;
    2. a sample is verified when its reward is >= `rejection.success_threshold`; of each prompt's verified
       samples the first `rejection.max_per_prompt` distinct ones (by token ids) are kept;
    3. the kept samples go to <run_dir>/rejection_samples.jsonl (prompt, completion, reward), and
       metrics.jsonl gets a `rejection_data` line: the pass rate, the kept fraction, prompts with a kept sample;
    4. the policy is fine-tuned on them with SFT's loop (rlpost/stages/sft.py: `SupervisedStage`) for
       `rejection.steps` steps; the run writes checkpoints/rejection/ when the stage ends.

The stage has no mid-stage checkpoints: a run stopped or killed inside it resumes from the checkpoint
before it (the RL stage's end: checkpoints/final/, or checkpoints/rl/ when another RL stage follows) and runs
the evaluation after RL and this stage again from their start, with the same random streams and weight-sync
version, so the resumed run is the same run.
"""

from __future__ import annotations

import json
import os
import random
import time

from tqdm import tqdm

from rlpost.rollout import SamplingParams
from rlpost.rollout.episodes import episodes_in_chunks
from rlpost.stages.base import RunContext, register
from rlpost.stages.rl import prompt_text
from rlpost.stages.sft import SupervisedStage

PROMPT_SEED, SAMPLE_SEED, BATCH_SEED = 1, 104729, 2  # offsets from the run's seed: which prompts, samples, batches


def select_verified(rewards: list[float], responses: list[tuple], k: int, threshold: float,
                    max_per_prompt: int) -> list[list[int]]:
    """Which samples to keep: rows of `k` consecutive samples per prompt (as the episode function lays them
    out); for each prompt, the indices of its first `max_per_prompt` samples with reward >= `threshold`
    whose `responses` (hashable: the response token ids) are distinct."""
    kept = []
    for start in range(0, len(rewards), k):
        seen, chosen = set(), []
        for i in range(start, start + k):
            if rewards[i] >= threshold and responses[i] not in seen and len(chosen) < max_per_prompt:
                seen.add(responses[i])
                chosen.append(i)
        kept.append(chosen)
    return kept


def response_region(batch, i: int) -> tuple[list[int], list[int]]:
    """Row i's response region (after the prompt, up to its last real token) as (token ids, trained): 1 where
    the policy sampled the token, 0 for an environment's tokens between turns."""
    P = batch.prompt_width
    real = batch.attention_mask[i, P:].bool()
    return batch.input_ids[i, P:][real].tolist(), batch.response_mask[i, P:][real].tolist()


@register("rejection")
class RejectionStage(SupervisedStage):
    """`rejection.*`; sampling from `rollout.*` (temperature, max_new_tokens); generation batch size from
    `eval.batch_prompts`; the fine-tuning's optimizer from `rejection.*` (lr, warmup_steps, min_lr_ratio,
    weight_decay, adam_beta1, adam_beta2, grad_clip); precision and gradient checkpointing from `trainer.*`."""

    name = "rejection"
    sections = ("rejection", "rollout", "trainer", "eval")
    resumable = False  # no mid-stage checkpoints: a resume runs the stage again from its start

    @classmethod
    def from_config(cls, cfg, label: str | None = None) -> "RejectionStage":
        return cls(cfg.rejection, cfg.rollout, cfg.trainer, cfg.eval)

    def __init__(self, cfg, rollout_cfg, trainer_cfg, eval_cfg):
        super().__init__(cfg, trainer_cfg)
        self.rollout_cfg, self.eval_cfg = rollout_cfg, eval_cfg

    def prompt_rows(self, ctx: RunContext) -> list[dict]:
        """`rejection.num_prompts` training rows, drawn without replacement from the run's seed."""
        rows = ctx.task.train_rows
        rng = random.Random(self.seed(ctx) + PROMPT_SEED)
        return [rows[i] for i in rng.sample(range(len(rows)), min(self.cfg.num_prompts, len(rows)))]

    def sample(self, ctx: RunContext) -> tuple[list[dict], dict[str, float]]:
        """Steps 1-3 of the module docstring: the kept samples as records (prompt, completion, reward and the
        token ids to train on) and the metrics of the pass."""
        c = self.cfg
        rows = self.prompt_rows(ctx)
        prompt_ids = ctx.prompt_ids(rows)
        params = SamplingParams(max_new_tokens=self.rollout_cfg.max_new_tokens,
                                temperature=self.rollout_cfg.temperature)
        ctx.weight_sync.push()  # an engine with its own copy of the weights samples from the current policy
        t0 = time.perf_counter()
        kept, drawn, verified, prompts_kept = [], 0, 0, 0
        k = c.samples_per_prompt
        for idx, batch in episodes_in_chunks(ctx.engine, ctx.verifier, rows, prompt_ids, k, params,
                                             seed=self.seed(ctx) + SAMPLE_SEED, chunk=self.eval_cfg.batch_prompts,
                                             desc="rejection sampling"):
            rewards = batch.rewards.float()
            rewards = (rewards.sum(1) if rewards.dim() == 2 else rewards).tolist()
            regions = [response_region(batch, i) for i in range(len(batch))]
            texts = batch.meta.get("completion") or [ctx.tokenizer.decode(t) for t, _ in regions]
            chosen = select_verified(rewards, [tuple(t) for t, _ in regions], k, c.success_threshold,
                                     c.max_per_prompt)
            drawn += len(batch)
            verified += sum(r >= c.success_threshold for r in rewards)
            for j, group in zip(idx, chosen):
                prompts_kept += bool(group)
                for i in group:
                    kept.append({"prompt": prompt_text(rows[j]), "completion": texts[i], "reward": rewards[i],
                                 "prompt_ids": prompt_ids[j], "completion_ids": regions[i][0],
                                 "trained": regions[i][1]})
        metrics = {"rejection/pass_rate": verified / drawn, "rejection/kept_frac": len(kept) / drawn,
                   "rejection/kept": float(len(kept)), "rejection/samples": float(drawn),
                   "rejection/prompts": float(len(rows)), "rejection/prompts_kept_frac": prompts_kept / len(rows),
                   "time/rejection_sampling": time.perf_counter() - t0}
        return kept, metrics

    def run(self, ctx: RunContext) -> None:
        kept, metrics = self.sample(ctx)
        with open(os.path.join(ctx.run_dir, f"{self.label}_samples.jsonl"), "w") as f:  # rejection_2_samples...
            f.writelines(json.dumps({key: r[key] for key in ("prompt", "completion", "reward")}) + "\n" for r in kept)
        ctx.log({"stage": f"{self.label}_data", "step": 0, **metrics})
        ctx.summary[f"{self.label}_kept"] = len(kept)
        ctx.summary[f"{self.label}_pass_rate"] = metrics["rejection/pass_rate"]
        m = metrics
        tqdm.write(f"rlpost: rejection sampling kept {len(kept)} of {int(m['rejection/samples'])} samples (pass rate "
                   f"{m['rejection/pass_rate']:.3f}; {100 * m['rejection/prompts_kept_frac']:.1f}% of "
                   f"{int(m['rejection/prompts'])} prompts gave one)")
        if not kept:
            tqdm.write("rlpost: no sample was verified: the policy is left as it is")
            return
        trained = [r["trained"] for r in kept]
        self.set_examples([r["prompt_ids"] for r in kept], [r["completion_ids"] for r in kept],
                          None if all(all(t) for t in trained) else trained)
        self.build_trainer(ctx, seed=self.seed(ctx) + BATCH_SEED)
        self.train(ctx)
