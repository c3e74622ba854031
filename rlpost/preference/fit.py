"""The offline preference loop: the DPO family on a fixed set of pairs (or unpaired rows).

    data = load_preferences("prefs.jsonl", tokenizer, max_length=1024)
    metrics = train_preference(model, tokenizer, data, get_preference_loss("dpo", beta=0.1),
                               PreferenceConfig(epochs=1, lr=1e-4), TrainerConfig(grad_clip=1.0), seed=0)

1. REFERENCE, once: before the first update, the model's own log-probs of every completion are
   computed without grad and cached (`data.ref`); they *are* pi_ref, so no frozen copy of the model is
   kept and no reference forward runs during training. Losses without a reference (ORPO, SimPO) skip it.
   With LoRA (model.lora) they are computed with the adapters off: the reference is the base model.
2. TRAIN: `epochs` passes over the examples in a seeded shuffled order, `batch_size` examples per
   optimizer step, through the algorithm-agnostic `rlpost.trainer.Trainer` (micro-batching, gradient
   clipping, the non-finite guard). A pair's two rows always share a micro-batch. The settings are the
   `preference.*` section's (epochs, batch_size, micro_batch_size, lr, warmup_steps) and, for what the
   section does not set (weight decay, gradient clip, AdamW betas, the non-finite guard, precision,
   gradient checkpointing), the `trainer.*` section's.
3. METRICS per step: loss, implicit reward of chosen / rejected, margin, accuracy, and the chosen and
   rejected log-probs themselves (with their change from the reference), so likelihood displacement
   shows: the margin grows while log pi(chosen) falls.

Sharded (trainer.strategy=fsdp2): the Trainer shards the policy (if an earlier stage has not) and every rank
walks the same order, training on its share of each step's examples (`distributed.share`; a pair's rows stay
together) with the loss scaled by the global row count and the gradients summed, so a step is one process's.
The reference log-probs, KTO's mismatched pairs and the held-out evaluation are computed whole on every rank
(the same forwards on every rank, as a sharded model needs).

rlpost/stages/preference.py wires it into a run: data from `preference.train_file`, or pairs built from
the model's own samples scored by the task's verifier.
"""

from __future__ import annotations

import math
import random
import time

import torch
from tqdm import tqdm

from rlpost import distributed as dist
from rlpost.config import PreferenceConfig, TrainerConfig
from rlpost.models import autocast, model_device, token_logprobs
from rlpost.models.lora import adapters_disabled
from rlpost.preference.base import PreferenceLoss, SeqLogps, sequence_logps
from rlpost.preference.data import PreferenceData, PreferenceDataError
from rlpost.progress import progress
from rlpost.trainer import Trainer


def _logprobs(model, batch, precision: str) -> torch.Tensor:
    """token_logprobs of a batch built on the CPU, on the model's device under the trainer's precision; a sharded
    model without shared-prompt scoring (it reads the head outside the model's forward, where FSDP2 gathers it)."""
    device = model_device(model)
    with autocast(device, precision):
        return token_logprobs(model, batch.to(device), share_prompt=not dist.is_sharded(model))


@torch.no_grad()
def _token_logps(model, data: PreferenceData, seqs: list[int], pad_id: int, kl: bool,
                 precision: str = "fp32") -> list[torch.Tensor]:
    """Per-token log-probs of each sequence's completion (a list of 1-D CPU tensors, where data.batch reads them)."""
    b = data.batch(seqs, pad_id, kl=kl)
    logp = _logprobs(model, b, precision).cpu()
    P = b.prompt_width
    comps = data.kl_completions if kl else data.completions
    return [logp[i, P:P + len(comps[s])].clone() for i, s in enumerate(seqs)]


@torch.no_grad()
def cache_reference(model, data: PreferenceData, pad_id: int, chunk: int = 64, precision: str = "fp32") -> float:
    """Fill data.ref (and data.ref_kl for unpaired data) with the model's log-probs, computed under the
    precision the training will use, so that the policy starts exactly at its reference. A LoRA model is
    scored with its adapters off (its base). Returns seconds."""
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    with adapters_disabled(model):
        _cache_reference(model, data, pad_id, chunk, precision)
    model.train(was_training)
    return time.perf_counter() - t0


def _cache_reference(model, data: PreferenceData, pad_id: int, chunk: int, precision: str) -> None:
    n = len(data.completions)
    data.ref = data.ref_kl = None  # batches are built without reference log-probs while they are computed
    ref, ref_kl = [], [] if data.kl_completions is not None else None
    for start in range(0, n, chunk):
        seqs = list(range(start, min(start + chunk, n)))
        ref.extend(_token_logps(model, data, seqs, pad_id, kl=False, precision=precision))
        if ref_kl is not None:
            ref_kl.extend(_token_logps(model, data, seqs, pad_id, kl=True, precision=precision))
    data.ref, data.ref_kl = ref, ref_kl


def seq_logps(logp: torch.Tensor, batch, kl_logp: torch.Tensor | None = None) -> SeqLogps:
    total, length = sequence_logps(logp, batch.response_mask)
    return SeqLogps(total, length, batch.rewards.float(), batch.group_ids, kl_logp)


def make_loss_fn(loss: PreferenceLoss, kl: tuple[torch.Tensor, torch.Tensor] | None = None):
    """The Trainer's loss callable: per-sequence log-probs -> the preference loss. A micro-batch's loss
    is scaled by its share of the batch's rows, so accumulated micro-batches equal the whole batch."""

    def loss_fn(logp, mb):
        pol = seq_logps(logp, mb, kl[0] if kl else None)
        ref = seq_logps(mb.ref_logp, mb, kl[1] if kl else None) if loss.uses_reference else None
        value, metrics = loss(pol, ref)
        share = len(mb) / (mb.global_seqs or len(mb))
        return value * share, metrics

    return loss_fn


def _kl_pair_logps(model, data: PreferenceData, seqs: list[int], pad_id: int, precision: str = "fp32"):
    """KTO: (policy, reference) summed log-probs of the mismatched completions of `seqs`, no grad, on the
    model's device (where the Trainer computes the loss)."""
    with torch.no_grad():
        b = data.batch(seqs, pad_id, kl=True).to(model_device(model))
        pol, _ = sequence_logps(_logprobs(model, b, precision), b.response_mask)
        ref, _ = sequence_logps(b.ref_logp, b.response_mask)
    return pol, ref


@torch.no_grad()
def evaluate_preference(model, data: PreferenceData, loss: PreferenceLoss, pad_id: int, chunk: int = 256,
                        precision: str = "fp32"):
    """Loss and metrics on held-out preference data (no grad), averaged over chunks of examples."""
    model.eval()
    sums, n = {}, 0
    for start in range(0, len(data), chunk):
        ex = list(range(start, min(start + chunk, len(data))))
        seqs = data.sequences(ex)
        b = data.batch(seqs, pad_id).to(model_device(model))
        kl = _kl_pair_logps(model, data, seqs, pad_id, precision) if not loss.paired else None
        value, m = make_loss_fn(loss, kl)(_logprobs(model, b, precision), b)
        for key, v in {"loss": value.item(), **m}.items():
            sums[key] = sums.get(key, 0.0) + v * len(ex)
        n += len(ex)
    model.train()
    return {"eval/" + k.replace("pref/", "pref_"): v / n for k, v in sums.items()}


def step_line(step: int, m: dict) -> str:
    acc = m.get("pref/accuracy")
    return (f"step {step:4d} | loss {m['train/loss']:.4f} | margin {m.get('pref/reward_margin', float('nan')):+.3f} "
            + (f"| acc {acc:.2f} " if acc is not None else "")
            + f"| logp chosen {m.get('pref/logp_chosen', float('nan')):.3f} "
              f"rejected {m.get('pref/logp_rejected', float('nan')):.3f} | grad {m['train/grad_norm']:.3f}")


def trainer_config(cfg: PreferenceConfig, trainer_cfg: TrainerConfig, rows_per_example: int) -> TrainerConfig:
    """The Trainer's settings for the preference loop: lr and linear warm-up then constant from `cfg`, micro-batches
    of `cfg.micro_batch_size` examples (`rows_per_example` rows each); AdamW's weight decay and betas, gradient
    clip, the non-finite guard, precision, gradient checkpointing and strategy (fsdp2: sharded) from `trainer_cfg`.
    Padded rows (trainer.packing is RL's); the rest (RL's epochs, minibatches, log-prob chunk) stay at the
    Trainer's defaults."""
    tc = trainer_cfg
    return TrainerConfig(lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                         micro_batch_size=cfg.micro_batch_size and cfg.micro_batch_size * rows_per_example,
                         weight_decay=tc.weight_decay, grad_clip=tc.grad_clip, adam_beta1=tc.adam_beta1,
                         adam_beta2=tc.adam_beta2, max_nonfinite_steps=tc.max_nonfinite_steps,
                         precision=tc.precision, gradient_checkpointing=tc.gradient_checkpointing,
                         strategy=tc.strategy, packing=False)


def train_preference(model, tokenizer, data: PreferenceData, loss: PreferenceLoss, cfg: PreferenceConfig,
                     trainer_cfg: TrainerConfig | None = None, *, seed: int = 0, log=None, log_every: int = 10,
                     eval_data: PreferenceData | None = None, stop=None) -> dict[str, float]:
    """Train `model` in place on `data` with `loss` as `cfg` (the `preference.*` section: epochs, batch_size,
    micro_batch_size, lr, warmup_steps) and `trainer_cfg` (the `trainer.*` section, None: its defaults) say
    (`trainer_config`), on the model's device under the trainer's precision (the reference log-probs too).
    Returns the last step's metrics (+ eval metrics). `stop()`, checked after every step, ends training early
    by raising what it raises."""
    trainer_cfg = trainer_cfg or TrainerConfig()
    epochs, batch_size, precision = cfg.epochs, cfg.batch_size, trainer_cfg.precision
    if loss.paired and not data.paired:
        raise PreferenceDataError(f"preference loss '{loss.name}' needs paired rows (prompt, chosen, rejected); "
                                  f"this data is unpaired (prompt, completion, label): use the 'kto' loss")
    if not loss.paired:
        data = data.unpaired()
        eval_data = eval_data.unpaired() if eval_data is not None else None
    pad = tokenizer.pad_token_id
    if loss.uses_reference:
        for d, what in ((data, "train"), (eval_data, "eval")):
            if d is not None and d.ref is None:
                secs = cache_reference(model, d, pad, precision=precision)
                if log is not None:
                    log({"stage": "preference", "step": 0, f"time/reference_{what}": secs,
                         "reference/sequences": len(d.completions)})
    rows_per_example = 2 if data.paired else 1
    trainer = Trainer(model, trainer_config(cfg, trainer_cfg, rows_per_example), seed=seed)
    rng = random.Random(seed)
    per_epoch = math.ceil(len(data) / batch_size)
    total = epochs * per_epoch
    metrics: dict[str, float] = {}
    bar = progress(range(1, total + 1), total=total, desc=f"preference/{loss.name}")
    order: list[int] = []
    for step in bar:
        if (step - 1) % per_epoch == 0:
            order = list(range(len(data)))
            rng.shuffle(order)
        i = (step - 1) % per_epoch
        examples = order[i * batch_size:(i + 1) * batch_size]
        seqs = data.sequences(examples)
        t0 = time.perf_counter()
        kl = _kl_pair_logps(model, data, seqs, pad, precision) if not loss.paired else None
        batch = data.batch(seqs, pad)
        if trainer.sharded:  # this rank's examples' rows; a rank left without any runs a row at zero weight
            mine = dist.share(len(examples))
            rows = list(range(mine.start * rows_per_example, mine.stop * rows_per_example))
            metrics = trainer.step(batch.select(rows), make_loss_fn(loss, kl),
                                   filler=batch.select(range(rows_per_example)))
        else:
            metrics = trainer.step(batch, make_loss_fn(loss, kl))
        metrics["time/step"] = time.perf_counter() - t0
        metrics["epoch"] = (step - 1) // per_epoch + 1
        if log is not None:
            log({"stage": "preference", "step": step, **metrics})
        bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", margin=f"{metrics.get('pref/reward_margin', 0.0):.2f}")
        if (step % log_every == 0 or step == total) and dist.is_main():
            tqdm.write(step_line(step, metrics))
        if stop is not None:
            stop()
    bar.close()
    if eval_data is not None:
        ev = evaluate_preference(model, eval_data, loss, pad, precision=precision)
        metrics.update(ev)
        if log is not None:
            log({"stage": "preference_eval", "step": total, **ev})
    return metrics
