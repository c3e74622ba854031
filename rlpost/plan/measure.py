"""Measure what a real rlpost job holds: peak RSS above the process's baseline, on the CPU.

    from rlpost.plan.measure import qwen_folder, measure
    folder = qwen_folder("/tmp/q", vocab=151936, hidden=256, layers=4)
    result = measure(["rl.steps=1", f"model.name={folder}", ...], ranks=2)
    result["peak_above_baseline"]     # bytes, the largest over the ranks

Each job is `rlpost train` in a fresh subprocess (`ranks` > 1: under torchrun with gloo on 127.0.0.1, one process
per rank, as tests/test_fsdp.py launches them). Each process imports torch, transformers and rlpost's roles first,
reads its RSS there (the baseline: the interpreter and the libraries, no model), runs the job, and reads its peak
RSS at the end. The difference is what the job itself held at its fullest moment, which is what
`rlpost plan memory` predicts per GPU. On the CPU an rlpost rank is one process, so RSS stands for GPU memory.

The run resets the kernel's peak RSS as each role starts (rlpost.devices.RoleProbe logs each role's own peak),
and that reset also lowers what getrusage reports, so the process's peak at the end would only be the peak since
the last role began. `PeakTracker` reads the peak before every reset and as every role ends: the run's peak is the
largest of those, and each role's peak comes with it (`phases`).

`qwen_folder` writes a random Qwen2 of any size with a small byte-level BPE tokenizer (the model's vocabulary is
larger than the tokenizer's: a random policy samples ids the tokenizer decodes to nothing, which is fine for
measuring memory and keeps the responses at full length, since the eos is rarely drawn).

    python -m rlpost.plan.measure OUT.json train KEY=VALUE ...     # one process of a measured job
"""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
from contextlib import contextmanager

from rlpost import cli, devices
from rlpost.stages import rl  # noqa: F401  (the RL stage's modules are loaded before a measured job's baseline)
from rlpost.tasks.arithmetic import arithmetic_task

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    """This process's resident set size now (/proc/self/statm: pages)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def hwm_bytes() -> int | None:
    """The process's peak RSS since the last reset (VmHWM in /proc/self/status), or None without /proc."""
    peak = devices.rss_peak_mib()
    return None if peak is None else int(peak * devices.MiB)


class PeakTracker:
    """The process's true peak RSS across RoleProbe's per-role resets, and each role's peak.

        with PeakTracker() as t:
            cli.main([...])
        t.peak(), t.phases          # bytes; {role: its largest peak}

    While active it wraps rlpost.devices.reset_rss_peak (read the peak, then reset) and RoleProbe.role (read the
    peak as the role ends, which covers exactly the role since its own reset)."""

    def __init__(self):
        self.top = 0
        self.phases: dict[str, int] = {}

    def _read(self, role: str | None = None) -> None:
        peak = max(hwm_bytes() or 0, peak_rss_bytes())
        self.top = max(self.top, peak)
        if role is not None:
            self.phases[role] = max(self.phases.get(role, 0), peak)

    def peak(self) -> int:
        """The largest peak RSS seen so far, the present one included (bytes)."""
        self._read()
        return self.top

    def __enter__(self) -> "PeakTracker":
        self._reset, self._role = devices.reset_rss_peak, devices.RoleProbe.role
        tracker, reset, role = self, self._reset, self._role

        def tracked_reset() -> bool:
            tracker._read()
            return reset()

        @contextmanager
        def tracked_role(probe, name: str):
            try:
                with role(probe, name):
                    yield
            finally:
                tracker._read(name)

        devices.reset_rss_peak, devices.RoleProbe.role = tracked_reset, tracked_role
        return self

    def __exit__(self, *exc) -> None:
        devices.reset_rss_peak, devices.RoleProbe.role = self._reset, self._role
        self._read()


def qwen_folder(folder: str, vocab: int = 151936, hidden: int = 256, layers: int = 4, heads: int = 4,
                kv_heads: int = 1, intermediate: int = 1024, max_positions: int = 2048, tied: bool = True,
                seed: int = 0) -> str:
    """A random Qwen2 (q/k/v biases, SwiGLU, RMSNorm) saved with a byte-level BPE tokenizer trained on the
    arithmetic task's texts; returns the folder. Defaults: the 42.7 M-parameter model with V = 151,936."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    task = arithmetic_task(num_eval=10)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([r["prompt"] + r["answer"] for r in task.train_rows[:2000]],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, intermediate_size=intermediate,
                      max_position_embeddings=max_positions, tie_word_embeddings=tied,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    Qwen2ForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(train_args: list[str], ranks: int = 1, timeout: float = 1800) -> dict:
    """Run `rlpost train *train_args` (1 process, or `ranks` gloo ranks under torchrun) in a subprocess and return
    {"ranks": [per rank: baseline, peak, peak_above_baseline, phases: {role: its peak above the baseline}],
    "peak_above_baseline": the largest, "seconds"}.
    Raises RuntimeError with the job's last output when it fails."""
    import time

    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with tempfile.TemporaryDirectory(prefix="rlpost_measure_") as tmp:
        out = os.path.join(tmp, "peak.json")
        job = ["-m", "rlpost.plan.measure", out, "train", *train_args]
        if ranks > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr",
                   "127.0.0.1", "--master_port", str(_free_port()), *job]
        else:
            cmd = [sys.executable, *job]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"measured job failed ({done.returncode}): {' '.join(cmd)}\n"
                               f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
        per_rank = []
        for r in range(ranks):
            with open(f"{out}.{r}") as f:
                per_rank.append(json.load(f))
    return {"ranks": per_rank, "peak_above_baseline": max(p["peak_above_baseline"] for p in per_rank),
            "seconds": time.perf_counter() - t0}


def _main(argv: list[str]) -> int:
    """One process of a measured job: the baseline after the imports, the job, the peak, written to OUT.<rank>."""
    out, args = argv[0], argv[1:]
    import torch  # noqa: F401  (the baseline holds the libraries every rank loads)
    import transformers  # noqa: F401

    # the baseline is the RSS now, not the peak so far: a transient while importing is not held by the job
    baseline = rss_bytes()
    with PeakTracker() as tracker:
        code = cli.main(args)
    peak = tracker.peak()
    rank = int(os.environ.get("RANK", "0"))
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"rank": rank, "baseline": baseline, "peak": peak, "peak_above_baseline": peak - baseline,
                   "phases": {k: v - baseline for k, v in tracker.phases.items()}}, f)
    return code


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
