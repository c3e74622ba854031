"""The native rollout's CPU time against an earlier commit's, in one process: is a change to the engine's
per-step work (rlpost/rollout/scheduler.py, sampling.py, hf_native.py) worth its code?

    .venv/bin/python benchmarks/rollout_cpu.py --against HEAD~1         # 64 x 32 tokens, bf16 and fp32
    .venv/bin/python benchmarks/rollout_cpu.py --against HEAD~1 --reps 30 --dtypes bf16

The shape is benchmarks/grpo_step_vs_trl.py's rollout: the tiny Llama (hidden 256, 4 layers), 8 prompts x
8 samples x 32 tokens (min_new_tokens = max_new_tokens, as there). The three engine files of the earlier
commit are loaded next to the working tree's, as separate modules, so both run on the same model in the same
process. On a machine shared with other jobs wall-clock means little: each rollout is timed in process time
(time.process_time) at one thread, old and new alternate (their order flips every repetition), and the
medians are compared, as is the median of the paired differences. Both must sample the same tokens and
old_logp, bit for bit, or the script stops.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks.common import build_llama, env_line, load_line, prompts, train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ("sampling", "scheduler", "hf_native")  # what imports what: each file's imports of the others are renamed


def load_engine_files(rev: str, folder: str) -> dict[str, types.ModuleType]:
    """rlpost/rollout/{sampling,scheduler,hf_native}.py at commit `rev`, as modules old_<name> importing each other."""
    mods = {}
    for name in FILES:
        src = subprocess.check_output(["git", "-C", ROOT, "show", f"{rev}:rlpost/rollout/{name}.py"], text=True)
        for dep in FILES:
            src = src.replace(f"from rlpost.rollout.{dep} import", f"from old_{dep} import")
            src = src.replace(f"from rlpost.rollout import {dep}\n", f"import old_{dep} as {dep}\n")
        path = os.path.join(folder, f"old_{name}.py")
        with open(path, "w") as f:
            f.write(src)
        mod = types.ModuleType(f"old_{name}")
        mod.__file__ = path
        sys.modules[mod.__name__] = mod
        exec(compile(src, path, "exec"), mod.__dict__)
        mods[name] = mod
    return mods


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--against", required=True, help="the commit (any git revision) to compare with")
    ap.add_argument("--reps", type=int, default=15, help="timed rollouts per engine and dtype (>= 12 for a median)")
    ap.add_argument("--dtypes", default="bf16,fp32")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from rlpost.models import HFCausalLM, HFTokenizer
    from rlpost.rollout.engine import SamplingParams
    from rlpost.rollout.hf_native import HFNativeEngine

    hf_tok = train_tokenizer()
    model = HFCausalLM(build_llama(hf_tok)).eval().requires_grad_(False)
    tok = HFTokenizer(hf_tok)
    ids = [tok.encode_prompt(p) for p in prompts(8)]
    params = SamplingParams(max_new_tokens=32, min_new_tokens=32, temperature=1.0)
    print(f"# {env_line()}; timed at 1 thread, process time")
    print(f"# load average before: {load_line()}")
    print(f"# Llama 256/4/4/1024; 8 prompts x 8 samples x 32 tokens; {args.reps} rollouts each, interleaved")
    out = {}
    with tempfile.TemporaryDirectory() as folder:
        old = load_engine_files(args.against, folder)
        for dtype in args.dtypes.split(","):
            engines = {"old": old["hf_native"].HFNativeEngine(model, tok, dtype=dtype),
                       "new": HFNativeEngine(model, tok, dtype=dtype)}
            first = {name: e.generate(ids, 8, params, seed=0) for name, e in engines.items()}  # also a warm-up
            if not (torch.equal(first["old"].input_ids, first["new"].input_ids)
                    and torch.equal(first["old"].old_logp, first["new"].old_logp)):
                sys.exit(f"{dtype}: the working tree samples other tokens or old_logp than {args.against}")
            times = {"old": [], "new": []}
            for i in range(args.reps):
                for name in ("old", "new") if i % 2 == 0 else ("new", "old"):
                    c0 = time.process_time()
                    engines[name].generate(ids, 8, params, seed=i)
                    times[name].append(time.process_time() - c0)
            o, n = statistics.median(times["old"]), statistics.median(times["new"])
            paired = statistics.median(a - b for a, b in zip(times["old"], times["new"]))
            print(f"{dtype}: {args.against} {o * 1e3:.1f} ms, working tree {n * 1e3:.1f} ms per rollout (medians): "
                  f"{100 * (o - n) / o:+.1f} % saved; paired difference {paired * 1e3:.1f} ms "
                  f"({100 * paired / o:+.1f} %)")
            out[dtype] = {"old_s": o, "new_s": n, "paired_s": paired}
    print(f"# load average after: {load_line()}")
    return out


if __name__ == "__main__":
    main()
