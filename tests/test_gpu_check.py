"""The prepared GPU check (benchmarks/gpu_check.sh, benchmarks/gpu_step.py) on the CPU: the Qwen2.5-0.5B config
written out is the real one's size, the locally trained tokenizer survives a reload as a Qwen2Tokenizer, the
script refuses to run without a GPU, and (slow) the step's code path and every command of the script run at toy
size on the CPU. The GPU numbers themselves come only from a GPU run."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")


def test_the_written_out_config_has_qwen25_05bs_parameter_count():
    """494,032,768 parameters (tied embeddings): transformers' Qwen2 built from the literal config (on the meta
    device, no memory), and `rlpost plan memory`'s count of the same shape."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from benchmarks.gpu_step import QWEN25_05B
    from rlpost.plan.memory import NAMED, shape_from_config

    cfg = Qwen2Config(**{k: v for k, v in QWEN25_05B.items() if k not in ("model_type", "architectures")})
    with torch.device("meta"):
        hf = Qwen2ForCausalLM(cfg)
    assert sum(p.numel() for p in hf.parameters()) == 494_032_768
    assert shape_from_config(QWEN25_05B).num_params() == NAMED["qwen2.5-0.5b"].num_params() == 494_032_768
    assert cfg.tie_word_embeddings and cfg.vocab_size == 151_936


def test_the_local_tokenizer_reloads_as_a_qwen2_tokenizer_that_tokenizes_the_same(tmp_path):
    """AutoTokenizer on a qwen2 folder builds a Qwen2Tokenizer, which installs its own normaliser and
    pre-tokeniser: the BPE is trained with the same ones, so the reload encodes every text identically."""
    from transformers import AutoTokenizer

    from benchmarks.gpu_step import build_tokenizer

    tok = build_tokenizer(300, texts=300)
    tok.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert type(again).__name__ == "Qwen2Tokenizer"
    for text in ("Question: what is 12+34? Answer: 46.", "  two  spaces\nand a line", "café ÉCOLE 1234567"):
        ids = again.encode(text)
        assert ids == tok.encode(text) and again.decode(ids) == text
    assert again.eos_token == "<|endoftext|>" and len(again) <= 300


def test_mfu_is_six_n_tokens_over_time_and_peak():
    from benchmarks.gpu_step import H100_BF16_DENSE_TFLOPS, mfu

    assert H100_BF16_DENSE_TFLOPS == 989.0
    assert mfu(494_032_768, 10_000, 0.5, 989.0) == pytest.approx(6 * 494_032_768 * 10_000 / 0.5 / 989e12)


@pytest.mark.slow  # a fresh interpreter importing torch: seconds on a loaded machine
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the script would run for minutes")
def test_the_check_refuses_to_run_without_a_gpu(tmp_path):
    done = subprocess.run(["bash", SCRIPT], env={**os.environ, "PY": sys.executable, "GPU_CHECK_DIR": str(tmp_path)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "sees no GPU" in done.stdout and "=== cuda_tests" not in done.stdout


@pytest.mark.slow
def test_the_step_runs_on_the_cpu_at_toy_size(tmp_path):
    """gpu_step.py --device cpu --tiny: rlpost's native-engine step with its per-role peaks and the plan's figure;
    vLLM (CUDA only here) and TRL (when not installed) are skipped with their reasons."""
    from benchmarks.gpu_step import main

    res = main(["--device", "cpu", "--tiny", "--steps", "1", "--json", str(tmp_path / "r.json")])
    assert json.loads((tmp_path / "r.json").read_text())["params"] == res["params"] > 0
    assert res["failed"] == {}
    native = res["sides"]["native"]
    assert native["engine"] == "HFNativeEngine" and native["response_len_mean"] == 8.0
    assert native["rollout_tokens_per_s"] > 0 and 0 < native["mfu_step"] < native["mfu_train"]
    assert all(v > 0 for v in native["mem_peak_mib"].values()) and native["plan"]["per_gpu_mib"] > 0
    assert native["run_peak_mib"] >= max(native["mem_peak_mib"].values())
    assert native["plan"]["params"] == res["params"]
    assert "CUDA only" in res["skipped"]["vllm"]
    assert "trl" in res["sides"] or "TRL is not installed" in res["skipped"]["trl"]


@pytest.mark.slow
def test_every_command_of_the_check_runs_on_the_cpu(tmp_path):
    """GPU_CHECK_DEVICE=cpu: the step, the packing run (or its skip) and fsdp2 under torchrun (gloo) at toy size."""
    env = {**os.environ, "PY": sys.executable, "GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_DIR": str(tmp_path),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    out = done.stdout
    assert done.returncode == 0, out[-4000:] + done.stderr[-2000:]
    assert "=== grpo_step: ok" in out and "=== fsdp2_nccl: ok" in out and "every part ran" in out
    assert "=== packing: ok" in out or "=== packing: skipped: this rlpost has no trainer.packing" in out
    assert json.loads((tmp_path / "gpu_step.json").read_text())["sides"]["native"]["step_s"] > 0
    metrics = [json.loads(x) for x in (tmp_path / "runs" / "fsdp2" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if m["stage"] == "rl"] == [1, 2, 3]


def test_the_checks_time_limits_and_budget_end_it_within_eight_minutes():
    """Every part's limit (the numbers after `part NAME`) sums to at most the default budget, and the budget plus
    the 10 s a part may take to die after its TERM and 10 s of bookkeeping is at most 8 minutes (the limits once
    summed to 9.5)."""
    text = open(SCRIPT).read()
    limits = {m.group(1): int(m.group(2)) for m in re.finditer(r"^\s*(?:\w+=\w+ )?part (\w+) (\d+) ", text, re.M)}
    assert set(limits) == {"cuda_tests", "grpo_step", "packing", "fsdp2_nccl", "vllm_features"}
    budget = int(re.search(r"^BUDGET=\$\{GPU_CHECK_BUDGET_S:-(\d+)\}$", text, re.M).group(1))
    assert sum(limits.values()) <= budget and budget + 10 + 10 <= 8 * 60
    assert "timeout -k 10 " in text


@pytest.mark.slow  # bash and one python import: several seconds on a loaded machine
def test_a_spent_budget_starts_no_part_and_says_so(tmp_path):
    env = {**os.environ, "PY": sys.executable, "GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_DIR": str(tmp_path),
           "GPU_CHECK_BUDGET_S": "1"}
    done = subprocess.run(["bash", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout.count(": NOT RUN: the check's budget of 3 s is spent") == 5
    assert "(limit" not in done.stdout and "FAILED: cuda_tests(not run)" in done.stdout


def test_the_steps_plan_figure_is_rlpost_plan_memorys_own_layout(tmp_path, capsys):
    """gpu_step.py sets the measured peaks beside what `rlpost plan memory` prints for the same job by default
    (rlpost's layout), not the generic ZeRO-3 estimate, which counts an engine copy rlpost does not hold."""
    import argparse

    from benchmarks.gpu_step import TINY, plan_figure
    from rlpost.cli import main

    (tmp_path / "config.json").write_text(json.dumps(TINY))
    args = argparse.Namespace(device="cpu", prompts=2, k=2, new_tokens=8, micro_batch=2)
    fig = plan_figure(str(tmp_path), args, 40, "native")
    assert main(["plan", "memory", f"model.name={tmp_path}", "model.dtype=bfloat16", "rollout.prompts_per_step=2",
                 "rollout.k=2", "rollout.max_new_tokens=8", "trainer.micro_batch_size=2", "rollout.engine=native",
                 "--prompt-tokens", "32", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert fig["per_gpu_mib"] == pytest.approx(printed["peak"] / 2 ** 20)
    assert fig["peak_phase"] == printed["peak_phase"]
    assert "reference (full copy) (held)" in fig["terms_mib"] and "KV cache (rollout)" in fig["terms_mib"]
    assert not any(k.startswith("rollout: weights") for k in fig["terms_mib"])
    assert "KV cache (rollout)" not in plan_figure(str(tmp_path), args, 40, "vllm")["terms_mib"]


def test_the_runs_peak_is_the_largest_role_peak_of_any_step():
    """gpu_step.py's whole-run figure: CUDA's max_memory_allocated read at the end was only the last role's (sync)
    peak, the controller having reset it as each role started; it is now the largest mem/peak_* of every step."""
    from benchmarks.gpu_step import run_peak_mib

    steps = [{"mem/peak_train": 5.0, "time/step": 99.0}, {"mem/peak_rollout": 7.0, "mem/peak_sync": 3.0}]
    assert run_peak_mib(steps) == 7.0
    assert run_peak_mib([{"time/step": 1.0}]) != run_peak_mib([{"time/step": 1.0}])  # NaN: no peak was logged
