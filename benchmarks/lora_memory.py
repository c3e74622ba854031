"""Memory the RL reference costs with and without LoRA (model.lora), on a Llama built from a config (nothing is
downloaded).

    .venv/bin/python benchmarks/lora_memory.py                 # ~ 0.1 B-parameter Llama, fp32
    .venv/bin/python benchmarks/lora_memory.py --hidden 256 --layers 4

Each mode runs in its own process: build the policy (LoRA r=16 on the attention and MLP projections, or none),
then the RL stage's `Reference`, and score one batch with it. Printed per mode: the parameter bytes the reference
holds beyond the policy's (counted: a full fine-tune's reference is a deep copy of every weight, a LoRA run's is
the policy's own module with the adapters off), the process's resident memory after the policy and after the
reference has scored (RSS, /proc/self/status), and the peak RSS (getrusage)."""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def one(args) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlpost.batch import Batch
    from rlpost.config import LORA_TARGETS
    from rlpost.models import HFCausalLM
    from rlpost.models.lora import apply_lora
    from rlpost.reference import Reference

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                      num_key_value_heads=args.hidden // 64, max_position_embeddings=256)
    policy = HFCausalLM(LlamaForCausalLM(cfg))
    if args.mode == "lora":
        apply_lora(policy, r=16, alpha=32, dropout=0.0, target_modules=LORA_TARGETS)
    params = {id(p): p for p in policy.parameters()}
    after_policy = rss_mb()
    ref = Reference(policy)
    extra = sum(p.numel() * p.element_size() for p in ref.model.parameters() if id(p) not in params)
    ids = torch.randint(3, args.vocab, (8, 48))
    mask = torch.ones_like(ids)
    response = torch.zeros_like(ids)
    response[:, 16:] = 1
    ref(Batch(input_ids=ids, attention_mask=mask, response_mask=response))
    return {"mode": args.mode, "params": sum(p.numel() for p in policy.parameters()),
            "trainable": sum(p.numel() for p in policy.parameters() if p.requires_grad),
            "reference_extra_bytes": extra, "rss_after_policy_mb": after_policy, "rss_after_reference_mb": rss_mb(),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--mode", choices=["full", "lora"], help=argparse.SUPPRESS)  # one mode, in this process
    args = p.parse_args()
    if args.mode:
        print(json.dumps(one(args)))
        return
    rows = []
    for mode in ("full", "lora"):
        cmd = [sys.executable, __file__, "--mode", mode, "--hidden", str(args.hidden), "--layers", str(args.layers),
               "--vocab", str(args.vocab)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": ROOT}).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, fp32; "
          "the reference scores 8 x 48 tokens")
    print(f"{'mode':<6}{'params':>12}{'trainable':>12}{'ref. copy MB':>14}{'RSS policy MB':>15}"
          f"{'RSS +ref MB':>13}{'peak RSS MB':>13}")
    for r in rows:
        print(f"{r['mode']:<6}{r['params']:>12,}{r['trainable']:>12,}{r['reference_extra_bytes'] / 2**20:>14.1f}"
              f"{r['rss_after_policy_mb']:>15.1f}{r['rss_after_reference_mb']:>13.1f}{r['peak_rss_mb']:>13.1f}")


if __name__ == "__main__":
    main()
