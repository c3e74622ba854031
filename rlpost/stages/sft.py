"""Supervised fine-tuning on demonstrations: the stage before RL.

It reuses the algorithm-agnostic Trainer with a negative log-likelihood loss on completion tokens;
the batch has the same layout as a rollout's (prompt left-padded, completion + eos right-padded).
The learning rate warms up linearly for `warmup_steps`, then decays on a cosine to lr * `min_lr_ratio` (0.1);
AdamW's betas, weight decay and gradient clip are the section's too (`sft.*`, `rejection.*`).
`save_every` writes a resumable checkpoint (checkpoints/sft_step_<n>/) every that many steps; they
are removed once the stage's own checkpoints/sft/ is written, which supersedes them.

Under torchrun (trainer.strategy=fsdp2) the policy is sharded as the stage starts (rlpost.distributed.shard_model,
if an earlier stage has not done it already) and every rank draws the same batch (same seed) and trains on its
share of its rows (`distributed.share`): the loss is normalised by the global token count and the gradients are
summed, so the step is the one process's on the whole batch. `batch_size` needs at least one row per rank.
"""

from __future__ import annotations

import random

import torch

from rlpost import distributed as dist
from rlpost.algorithms.base import token_mean
from rlpost.batch import Batch
from rlpost.config import TrainerConfig
from rlpost.progress import progress
from rlpost.models import encode_demonstration
from rlpost.stages.base import RunContext, Stage, register
from rlpost.trainer import Trainer


def nll_loss(logp: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean negative log-likelihood of the response tokens."""
    loss = -token_mean(logp, batch)
    return loss, {"sft/nll": loss.item() * (batch.global_tokens or 1) / max(batch.num_response_tokens, 1)}


class SupervisedStage(Stage):
    """Fine-tuning on (prompt, completion) token ids with the negative log-likelihood loss: the loop that SFT on
    demonstrations and rejection-sampling SFT on the policy's own verified samples share. `cfg` has `steps`,
    `batch_size`, the optimizer's `lr`, `warmup_steps`, `min_lr_ratio`, `weight_decay`, `adam_beta1`, `adam_beta2`
    and `grad_clip` and, for resumable mid-stage checkpoints, `save_every`. A subclass sets
    the examples with `set_examples` and calls `train`."""

    changes_weights = True
    resumable = True  # a stop request writes a mid-stage checkpoint (False: the stage starts over on resume)

    def __init__(self, cfg, trainer_cfg):
        self.cfg, self.trainer_cfg = cfg, trainer_cfg
        self.step = 0

    def optimizer_config(self) -> TrainerConfig:
        """The trainer's settings: AdamW (lr, betas, weight decay, gradient clip) and the schedule, linear warm-up
        then cosine decay to lr * min_lr_ratio, from the stage's own section; precision, gradient checkpointing
        and the log-prob head's chunk from `trainer.*`, and `trainer.strategy` (fsdp2: the policy sharded, each
        rank on its share of each batch). The rest are the Trainer's plain defaults: whole-batch steps; padded rows
        (trainer.packing is RL's)."""
        c, tc = self.cfg, self.trainer_cfg
        return TrainerConfig(lr=c.lr, weight_decay=c.weight_decay, grad_clip=c.grad_clip, adam_beta1=c.adam_beta1,
                             adam_beta2=c.adam_beta2, lr_schedule="cosine", warmup_steps=c.warmup_steps,
                             min_lr_ratio=c.min_lr_ratio, precision=tc.precision,
                             gradient_checkpointing=tc.gradient_checkpointing, logprob_chunk=tc.logprob_chunk,
                             strategy=tc.strategy, packing=False)

    def build_trainer(self, ctx: RunContext, seed: int) -> None:
        """AdamW on the policy as `optimizer_config` says; `seed` draws the batches."""
        cfg = self.optimizer_config()
        if cfg.strategy == "fsdp2" and self.cfg.batch_size < dist.world_size():
            raise ValueError(f"{self.name}.batch_size={self.cfg.batch_size} is smaller than the {dist.world_size()} "
                             f"ranks of trainer.strategy=fsdp2, which each train on a share of every batch; set "
                             f"{self.name}.batch_size to at least {dist.world_size()}")
        self.trainer = Trainer(ctx.model, cfg, total_steps=max(self.cfg.steps, 1))
        self.rng = random.Random(seed)

    def set_examples(self, prompts: list[list[int]], completions: list[list[int]],
                     trained: list[list[int]] | None = None) -> None:
        """The examples to imitate; `trained` (0/1 per completion token) marks the tokens the loss reads (None:
        all of them; a multi-turn completion's environment tokens are 0)."""
        self.prompts, self.completions, self.trained = prompts, completions, trained

    @property
    def save_every(self) -> int:
        return getattr(self.cfg, "save_every", 0)

    def state_dict(self) -> dict:
        return {"step": self.step, "rng": self.rng.getstate(), "trainer": self.trainer.state_dict()}

    def load_state_dict(self, ctx: RunContext, state: dict) -> None:
        self.step = state["step"]
        self.rng.setstate(state["rng"])
        self.trainer.load_state_dict(state["trainer"])

    def save(self, ctx: RunContext) -> None:
        ctx.save(f"{self.label}_step_{self.step}", step=self.step, finished=False, state=self.state_dict(),
                 weights=True)

    def train(self, ctx: RunContext) -> None:
        """`steps` optimizer steps of `batch_size` examples drawn with replacement, from `self.step` on. With
        `save_every`, a checkpoint every that many steps. A stop request stops at the step boundary, after a
        checkpoint when the stage is `resumable` (else a resume runs the stage again from its start)."""
        c, pad, resumable = self.cfg, ctx.tokenizer.pad_token_id, self.resumable
        bar = progress(range(self.step, c.steps), initial=self.step, total=c.steps, desc=self.label)
        for step in bar:
            idx = [self.rng.randrange(len(self.prompts)) for _ in range(c.batch_size)]
            batch = Batch.for_sft([self.prompts[i] for i in idx], [self.completions[i] for i in idx], pad,
                                  None if self.trained is None else [self.trained[i] for i in idx])
            if self.trainer.sharded:  # every rank drew the same batch: each trains on its rows
                batch = batch.select(list(dist.share(len(batch))))
            metrics = self.trainer.step(batch, nll_loss)
            bar.set_postfix(nll=f"{metrics['sft/nll']:.3f}")
            if step % 50 == 0 or step == c.steps - 1:
                ctx.log({"stage": self.label, "step": step, **metrics})
            self.step = step + 1
            saved = bool(resumable and self.save_every and self.step % self.save_every == 0 and self.step < c.steps)
            if saved:
                self.save(ctx)
            ctx.check_stop(save=(lambda: self.save(ctx)) if resumable and not saved else None)
        bar.close()


@register("sft")
class SFTStage(SupervisedStage):
    """`sft.*`: `steps` optimizer steps of `batch_size` demonstrations drawn with replacement, the optimizer's
    settings; precision, gradient checkpointing and the log-prob chunk from `trainer.*`."""

    name = "sft"
    sections = ("sft", "trainer")

    @classmethod
    def from_config(cls, cfg, label: str | None = None) -> "SFTStage":
        return cls(cfg.sft, cfg.trainer)

    def setup(self, ctx: RunContext) -> None:
        tok, demos = ctx.tokenizer, ctx.task.demonstrations
        if not demos:
            raise ValueError("sft.steps > 0 but the task has no demonstrations (rows with a completion, or a string "
                             "answer to imitate); set sft.steps=0 or give the rows a completion column")
        # prompts as rollout encodes them: chat template and system prompt included
        encoded = [encode_demonstration(tok, r["completion"]) for r in demos]
        # multi-turn demonstrations: environment tokens sit in the sequence but are not imitated
        trained = [t for _, t in encoded] if any(not isinstance(r["completion"], str) for r in demos) else None
        self.set_examples(ctx.prompt_ids(demos), [ids for ids, _ in encoded], trained)
        self.build_trainer(ctx, seed=self.seed(ctx))

    def run(self, ctx: RunContext) -> None:
        self.train(ctx)
