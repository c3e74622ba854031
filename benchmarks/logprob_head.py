"""The log-prob head at a real vocabulary: chunked (rlpost.models.logprobs) vs the full-logits path.

    .venv/bin/python benchmarks/logprob_head.py                     # V = 151,936, 4 x 1,024 tokens, entropy on
    .venv/bin/python benchmarks/logprob_head.py --rows 1 --threads 2

One forward + backward of what the trainer computes per micro-batch (per-token log-probs and entropies of a
random Qwen2 with hidden 64, 2 layers: the head dominates), in two ways:
- `full`: the model's logits [rows, T, V], fp32 log-softmax, gather, entropy, autograd through all of it
  (what rlpost did before the chunked head);
- `chunked`: `token_logprobs`, which never holds more than one chunk's [chunk, V].
Time: the median of --repeats interleaved runs in this process (threads pinned). Peak memory: each path once
more in a fresh subprocess, peak RSS above that process's baseline (the model built, nothing scored yet).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F


def build(vocab: int, tokens: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rlpost.models import HFCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=128, max_position_embeddings=tokens + 1,
                      tie_word_embeddings=False)
    return HFCausalLM(Qwen2ForCausalLM(cfg))


def step(model, batch, mode: str, chunk: int | None) -> None:
    from rlpost.models import position_ids_for, token_logprobs

    model.zero_grad(set_to_none=True)
    if mode == "chunked":
        logp, ent = token_logprobs(model, batch, with_entropy=True, share_prompt=False, chunk=chunk)
    else:
        ids, mask = batch.input_ids, batch.attention_mask
        logits = model(ids, mask, position_ids_for(mask))[:, :-1]
        la = F.log_softmax(logits.float(), -1)
        logp, ent = la.gather(-1, ids[:, 1:, None]).squeeze(-1), -(la.exp() * la).sum(-1)
    (logp.sum() + 0.01 * ent.sum()).backward()


def make_batch(vocab: int, rows: int, tokens: int):
    from rlpost.batch import Batch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (rows, tokens), generator=g)
    ones = torch.ones(rows, tokens, dtype=torch.long)
    return Batch(input_ids=ids, attention_mask=ones, response_mask=ones)


def peak_child(a) -> None:
    model = build(a.vocab, a.tokens)
    batch = make_batch(a.vocab, a.rows, a.tokens)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step(model, batch, a.peak_child, a.chunk)
    print(json.dumps({"gb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 2**20}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=None, help="tokens per chunk (default: sized from the vocabulary)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-full", action="store_true", help="skip the full path (it needs ~3 GB per 1,024 tokens)")
    ap.add_argument("--peak-child", choices=["full", "chunked"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.peak_child:
        return peak_child(a)
    modes = ["chunked"] + ([] if a.no_full else ["full"])
    print(f"V={a.vocab} rows={a.rows} tokens={a.tokens} threads={a.threads} load average {os.getloadavg()}")
    peaks = {}
    for mode in modes:
        cmd = [sys.executable, __file__, "--peak-child", mode, "--vocab", str(a.vocab), "--rows", str(a.rows),
               "--tokens", str(a.tokens), "--threads", str(a.threads)] + (["--chunk", str(a.chunk)] if a.chunk else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        peaks[mode] = json.loads(out.strip().splitlines()[-1])["gb"]
    model, batch = build(a.vocab, a.tokens), make_batch(a.vocab, a.rows, a.tokens)
    times = {m: [] for m in modes}
    for _ in range(a.repeats):
        for mode in modes:
            t0 = time.perf_counter()
            step(model, batch, mode, a.chunk)
            times[mode].append(time.perf_counter() - t0)
    for mode in modes:
        print(f"{mode:8s} peak above baseline {peaks[mode]:6.2f} GB   forward+backward median "
              f"{statistics.median(times[mode]):6.2f} s (min {min(times[mode]):.2f})")
    if "full" in peaks:
        print(f"chunked / full: memory {peaks['chunked'] / peaks['full']:.3f}x, time "
              f"{statistics.median(times['chunked']) / statistics.median(times['full']):.2f}x")
    print(f"load average after {os.getloadavg()}")


if __name__ == "__main__":
    main()
