"""Supervised fine-tuning on demonstrations: the stage before RL.

It reuses the algorithm-agnostic Trainer with a negative log-likelihood loss on completion tokens;
the batch has the same layout as a rollout's (prompt left-padded, completion + eos right-padded).
"""

from __future__ import annotations

import random

import torch
from tqdm import tqdm

from rlpost.algorithms.base import token_mean
from rlpost.batch import Batch
from rlpost.rollout import assemble
from rlpost.schedule import LRSchedule
from rlpost.trainer import Trainer


def nll_loss(logp: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean negative log-likelihood of the response tokens."""
    loss = -token_mean(logp, batch)
    return loss, {"sft/nll": loss.item() * (batch.global_tokens or 1) / max(batch.num_response_tokens, 1)}


def sft_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> Batch:
    R = max(len(c) for c in completions)
    tokens = torch.full((len(prompts), R), pad_id, dtype=torch.long)
    for i, c in enumerate(completions):
        tokens[i, :len(c)] = torch.tensor(c)
    lengths = torch.tensor([len(c) for c in completions])
    batch = assemble(prompts, 1, tokens, torch.zeros(tokens.shape), lengths, torch.ones(len(prompts), dtype=torch.bool),
                     pad_id, version=0)
    return batch.replace(old_logp=None, policy_version=None, meta={})


def run_sft(model, tokenizer, demos: list[dict], *, steps: int, batch_size: int, lr: float, warmup_steps: int,
            seed: int, log=None, precision: str = "fp32", gradient_checkpointing: bool = False) -> dict[str, float]:
    """Train on `demos` (rows with prompt + completion), linear warm-up then cosine decay to lr / 10.
    Batches are built on the CPU; the Trainer moves them to the model's device. Returns the last step's
    metrics."""
    prompts = [tokenizer.encode_prompt(r["prompt"]) for r in demos]
    completions = [tokenizer.encode_completion(r["completion"]) + [tokenizer.eos_token_id] for r in demos]
    trainer = Trainer(model, lr=lr, weight_decay=0.1, grad_clip=1.0, betas=(0.9, 0.95), precision=precision,
                      gradient_checkpointing=gradient_checkpointing,
                      schedule=LRSchedule("cosine", warmup_steps, total_steps=max(steps, 1), min_lr_ratio=0.1))
    rng = random.Random(seed)
    metrics: dict[str, float] = {}
    bar = tqdm(range(steps), desc="sft", unit="step", dynamic_ncols=True)
    for step in bar:
        idx = [rng.randrange(len(demos)) for _ in range(batch_size)]
        batch = sft_batch([prompts[i] for i in idx], [completions[i] for i in idx], tokenizer.pad_token_id)
        metrics = trainer.step(batch, nll_loss)
        bar.set_postfix(nll=f"{metrics['sft/nll']:.3f}")
        if log is not None and (step % 50 == 0 or step == steps - 1):
            log({"stage": "sft", "step": step, **metrics})
    return metrics
