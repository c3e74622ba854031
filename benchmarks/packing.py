"""Sequence packing against padding: positions computed and the trainer-step and reference times, side by side.

    .venv/bin/python benchmarks/packing.py                       # 4 prompts x K=8, 16 rows per micro-batch
    .venv/bin/python benchmarks/packing.py --rows-per-micro-batch 8 --repeats 5
    .venv/bin/python benchmarks/packing.py --prompt-tokens 200 --mean 16 --sigma 0.5   # long prompts, short answers

A tiny Llama (hidden 256, 4 layers, benchmarks/common.py) trains one GRPO step on a batch whose response
lengths are log-normal (sigma 0.8, mean 256 tokens, capped at --max-len: the shape of chain-of-thought
lengths), K samples per prompt, two ways:
- `padded`: the trainer as it was, micro-batches of --rows-per-micro-batch padded rows (each distinct prompt
  computed once: shared-prompt scoring, on by default);
- `packed`: `trainer.packing=true` with the same memory bound: each micro-batch holds at most as many
  positions as one padded micro-batch (trainer.micro_batch_tokens unset);
- `auto`: `trainer.packing=auto` (the default): each micro-batch plan packed or padded, whichever computes
  fewer positions (rlpost.packing.micro_batches); the line says which it chose.
Positions computed: what the trainer's forwards run over (padded: B x T, less the repeated prompts it shares;
packed: the packed rows, tail included), against the real tokens. Time: the median of --repeats interleaved
steps of each (the optimizer step skipped, so every step trains the same weights), and of the reference's
scoring of the batch (forward only, no grad), wall-clock and CPU seconds, with the load average before and after
(the machine is shared).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import build_llama, corpus, train_tokenizer  # noqa: E402  (sets HF offline first)

import torch  # noqa: E402


def lognormal_lengths(n: int, mean: float, sigma: float, cap: int, seed: int) -> list[int]:
    """n lengths from a log-normal with this mean and sigma (of the log), rounded, in [1, cap]."""
    g = torch.Generator().manual_seed(seed)
    mu = math.log(mean) - sigma ** 2 / 2
    z = torch.randn(n, generator=g)
    return [int(min(max(round(math.exp(mu + sigma * float(x))), 1), cap)) for x in z]


def build_batch(tok, prompts: int, k: int, lengths: list[int], seed: int, prompt_tokens: int = 0):
    from rlpost.batch import Batch

    g = torch.Generator().manual_seed(seed)
    enc = [torch.randint(3, len(tok), (prompt_tokens,), generator=g).tolist() + tok(text)["input_ids"]
           for text in corpus(prompts, seed=seed)]
    P, R = max(map(len, enc)), max(lengths)
    B = prompts * k
    ids = torch.zeros(B, P + R, dtype=torch.long)
    attn, resp = torch.zeros_like(ids), torch.zeros_like(ids)
    for b in range(B):
        prompt, n = enc[b // k], lengths[b]
        ids[b, P - len(prompt):P] = torch.tensor(prompt)
        ids[b, P:P + n] = torch.randint(3, len(tok), (n,), generator=g)
        attn[b, P - len(prompt):P + n] = 1
        resp[b, P:P + n] = 1
    logp = -torch.rand(B, P + R, generator=g) * resp
    return Batch(input_ids=ids, attention_mask=attn, response_mask=resp, old_logp=logp, ref_logp=logp,
                 rewards=torch.tensor([float(b % 2) for b in range(B)]), group_ids=torch.arange(B) // k)


def positions(trainer, batch) -> int:
    """Token positions the trainer's forwards run over for `batch`."""
    from rlpost.packing import shared_prompt

    total = 0
    for _, mb, packed in trainer._plan(batch):
        if packed is not None:
            total += packed.positions
            continue
        B, T = mb.input_ids.shape
        split = shared_prompt(mb)
        total += B * T if split is None else len(split[1]) * split[0] + B * (T - split[0])
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--k", type=int, default=8, help="samples per prompt")
    ap.add_argument("--mean", type=float, default=256.0, help="mean response length (tokens)")
    ap.add_argument("--sigma", type=float, default=0.8, help="sigma of the log of the response length")
    ap.add_argument("--max-len", type=int, default=1024, help="cap on a response's length (max_new_tokens)")
    ap.add_argument("--rows-per-micro-batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt-tokens", type=int, default=0, help="random tokens before each prompt")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from rlpost.algorithms import get_algorithm
    from rlpost.config import TrainerConfig
    from rlpost.models import HFCausalLM
    from rlpost.reference import Reference
    from rlpost.trainer import Trainer

    tok = train_tokenizer()
    model = HFCausalLM(build_llama(tok))
    B = args.prompts * args.k
    lengths = lognormal_lengths(B, args.mean, args.sigma, args.max_len, args.seed)
    batch = build_batch(tok, args.prompts, args.k, lengths, args.seed, args.prompt_tokens)
    algo = get_algorithm("grpo", beta=0.04)
    batch = algo.compute_advantages(batch)
    cfg = TrainerConfig(lr=1e-4, micro_batch_size=args.rows_per_micro_batch)
    configs = {name: dataclasses.replace(cfg, packing=value)
               for name, value in (("padded", False), ("packed", True), ("auto", "auto"))}
    trainers = {name: Trainer(model, c) for name, c in configs.items()}
    references = {name: Reference(model, c) for name, c in configs.items()}
    for t in trainers.values():
        t.optimizer.step = lambda: None  # every step trains the same weights: the paths see equal work

    real = int(batch.attention_mask.sum())
    B, T = batch.input_ids.shape
    prompt_tokens = int((batch.attention_mask * (1 - batch.response_mask)).sum())
    once = real - prompt_tokens + prompt_tokens // args.k  # the real tokens with each group's prompt counted once
    print(f"batch: {args.prompts} prompts x K={args.k} = {B} rows, padded width T={T}; response lengths: mean "
          f"{statistics.mean(lengths):.0f}, median {statistics.median(lengths):.0f}, max {max(lengths)} "
          f"(log-normal sigma {args.sigma}, mean {args.mean:.0f}, cap {args.max_len}); "
          f"{args.rows_per_micro_batch} rows per padded micro-batch")
    print(f"load average before: {os.getloadavg()}; torch threads: {torch.get_num_threads()}")
    print(f"\n  positions computed per step (real tokens: {real:,}; with each prompt once: {once:,})")
    print(f"  padded, every row's prompt  {B * T:>9,}  {B * T / real:5.2f}x real")
    for name, t in trainers.items():
        n = positions(t, batch)
        plan = t._plan(batch)
        label = {"padded": "padded, prompts shared", "packed": "packed"}.get(name) or \
            f"auto ({'packed' if plan[0][2] is not None else 'padded'})"
        print(f"  {label:<26}  {n:>9,}  {n / real:5.2f}x real   ({len(plan)} micro-batch(es))")

    runs = {"trainer step (forward + backward)": {n: (lambda t=t: t.step(batch, algo.compute_loss)["train/loss"])
                                                  for n, t in trainers.items()},
            "reference scoring (forward, no grad)": {n: (lambda r=r: float(r(batch).ref_logp.sum()))
                                                     for n, r in references.items()}}
    for title, sides in runs.items():
        wall: dict[str, list[float]] = {n: [] for n in sides}
        cpu: dict[str, list[float]] = {n: [] for n in sides}
        values = {}
        for _ in range(args.repeats):
            for name, fn in sides.items():  # interleaved: load changes hit all alike
                w, c = time.perf_counter(), time.process_time()
                values[name] = fn()
                wall[name].append(time.perf_counter() - w)
                cpu[name].append(time.process_time() - c)
        print(f"\n  {title}, {args.repeats} interleaved repeats")
        print(f"  {'':8} {'median s':>9} {'min s':>7} {'CPU s (median)':>15} {'speed-up (wall / CPU)':>22}")
        for name in sides:
            ratio = statistics.median(wall["padded"]) / statistics.median(wall[name])
            cpu_ratio = statistics.median(cpu["padded"]) / statistics.median(cpu[name])
            print(f"  {name:<8} {statistics.median(wall[name]):9.2f} {min(wall[name]):7.2f} "
                  f"{statistics.median(cpu[name]):15.2f} {ratio:13.2f}x / {cpu_ratio:.2f}x")
        print("  " + ", ".join(f"{n} {v:.6f}" for n, v in values.items())
              + f" (loss / summed log-probs; largest difference {max(values.values()) - min(values.values()):.1e})")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"load average after: {os.getloadavg()}; peak RSS of this process: {peak:.0f} MB")


if __name__ == "__main__":
    main()
