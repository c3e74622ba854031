"""`rlpost plan throughput`: the five-term equation, checked against hand arithmetic on a run directory
whose timings are known, and run on a real run."""

import json
import os

import pytest

from rlpost.plan.throughput import diagnose, fit, predict, report


def fake_run(tmp_path, steps, topology="colocated", workers=1, model_bytes=0):
    """A run directory whose RL steps all took the given seconds per role."""
    os.makedirs(tmp_path / "checkpoints" / "final")
    if model_bytes:
        (tmp_path / "checkpoints" / "final" / "model.safetensors").write_bytes(b"\0" * model_bytes)
    (tmp_path / "config.yaml").write_text(f"rl:\n  topology: {topology}\n  rollout_workers: {workers}\n")
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"stage": "sft", "step": 1, "time/step": 99.0}) + "\n")
        for i, s in enumerate(steps, 1):
            f.write(json.dumps({"stage": "rl", "step": i, **{k if "/" in k else f"time/{k}": v for k, v in s.items()}})
                    + "\n")
    return str(tmp_path)


STEP = {"rollout": 0.6, "reward": 0.1, "reference": 0.08, "critic": 0.02, "advantages": 0.01, "train": 0.29,
        "sync": 0.0, "other": 0.0, "step": 1.1}


def test_the_terms_are_the_medians_after_warm_up(tmp_path):
    slow_first = [{**STEP, "rollout": 5.0}] * 3 + [STEP] * 4 + [{**STEP, "rollout": 0.8}]
    t = fit(fake_run(tmp_path, slow_first), warmup=3)
    assert t.steps == 5 and t.rollout == pytest.approx(0.6)        # median of 0.6 x4, 0.8
    assert (t.verifier, t.reference, t.train) == pytest.approx((0.1, 0.1, 0.3))  # ref + critic, adv + train
    assert t.measured_step == pytest.approx(1.1)


def test_topologies_compose_the_terms_by_sum_and_max(tmp_path):
    # 2 MB of weights at 0.01 GB/s: a copying engine's sync costs 0.2 s where the colocated run moved nothing
    t = fit(fake_run(tmp_path, [STEP] * 5, model_bytes=2_000_000), warmup=0)
    by = lambda top, n=1: predict(t, top, n, sync_gbps=0.01)["step_s"]  # noqa: E731
    assert by("colocated") == pytest.approx(0.6 + 0.1 + 0.1 + 0.3)                  # 1.1: the sum
    assert by("disaggregated") == pytest.approx(0.6 + 0.1 + 0.1 + 0.3 + 0.2)         # 1.3: + the sync
    assert by("disaggregated", 2) == pytest.approx(0.3 + 0.1 + 0.1 + 0.3 + 0.2)      # 1.0: rollout halved
    assert by("async") == pytest.approx(max(0.6 + 0.1, 0.1 + 0.3 + 0.2))             # 0.7: rollout-bound
    assert by("async", 2) == pytest.approx(max(0.3 + 0.1, 0.1 + 0.3 + 0.2))          # 0.6: train-bound
    d = diagnose(t)
    assert d["bottleneck"] == "rollout" and any("rl.topology=async predicts 0.7" in a for a in d["advice"])


def test_an_async_run_is_scaled_back_to_one_worker(tmp_path):
    # 2 workers took 0.3 s of rollout: one would take 0.6 s, colocated pays it in full and no sync
    run = [{**STEP, "rollout": 0.3, "sync": 0.05, "sync/bytes": 1e6}] * 4  # it moved weights: its sync is measured
    t = fit(fake_run(tmp_path, run, "async", 2), warmup=0)
    assert predict(t, "colocated")["step_s"] == pytest.approx(0.6 + 0.1 + 0.1 + 0.3)
    assert predict(t, "async", 4)["step_s"] == pytest.approx(max(0.15 + 0.1, 0.1 + 0.3 + 0.05))
    assert diagnose(t)["bottleneck"] == "train"


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        fit(str(tmp_path))
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"stage": "sft", "step": 1}) + "\n")
    with pytest.raises(ValueError, match="no RL steps"):
        fit(str(tmp_path))
    t = fit(fake_run(tmp_path / "ok", [STEP]), warmup=0)
    with pytest.raises(ValueError, match="topology must be one of"):
        predict(t, "ray")


def test_a_killed_runs_half_line_is_left_out_and_a_damaged_line_is_named(tmp_path):
    """A run killed while writing metrics.jsonl ends in a half line (which --resume drops): plan throughput failed
    on it with a bare JSONDecodeError, naming neither the file nor the line."""
    run = fake_run(tmp_path / "killed", [STEP] * 3)
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:
        f.write('{"stage": "rl", "step": 4, "time/rollout": 0.')
    t = fit(run, warmup=0)
    assert t.steps == 3 and t.rollout == pytest.approx(0.6)
    damaged = fake_run(tmp_path / "damaged", [STEP] * 3)
    path = os.path.join(damaged, "metrics.jsonl")
    lines = open(path).read().splitlines()
    lines[1] = lines[1][:20]
    open(path, "w").write("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"damaged/metrics.jsonl: line 2 is not a JSON line"):
        fit(damaged)
    open(path, "w").write("\n".join(lines[:1] + ["[1, 2]"] + lines[2:]) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is a JSON list, not the object of metrics"):
        fit(damaged)


def test_a_real_run_is_fitted_and_reported(tmp_path):
    from rlpost.config import load_config
    from rlpost.run import train

    train(load_config(None, ["sft.steps=4", "rl.steps=4", "rl.eval_every=0", "task.num_eval=8",
                             "rollout.prompts_per_step=4", "rollout.k=2", "model.n_layer=1", "model.n_embd=32",
                             "model.n_head=2", f"out_dir={tmp_path}", "run_name=r"]))
    r = report(str(tmp_path / "r"), warmup=1)
    t = r["terms"]
    assert t["steps"] == 3 and t["rollout"] > 0 and t["train"] > 0 and t["model_bytes"] > 0
    colocated = r["predictions"][0]
    assert colocated["topology"] == "colocated"
    assert colocated["step_s"] == pytest.approx(sum(t[k] for k in ("rollout", "verifier", "reference", "train",
                                                                   "sync", "other")))


def test_the_command_prints_a_table_or_json(tmp_path, capsys):
    from rlpost.cli import main

    run = fake_run(tmp_path, [STEP] * 4)
    assert main(["plan", "throughput", run, "--warmup", "0", "--workers", "1", "3", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert [(p["topology"], p["workers"]) for p in r["predictions"]] == [
        ("colocated", 1), ("disaggregated", 1), ("disaggregated", 3), ("async", 1), ("async", 3)]
    assert main(["plan", "throughput", run, "--warmup", "0"]) == 0
    assert "bottleneck: rollout" in capsys.readouterr().out
    assert main(["plan", "throughput", str(tmp_path / "missing")]) == 2


# ---------------------------------------------------------------------------- the roofline (no run needed)

def test_roofline_terms_against_hand_arithmetic():
    from rlpost.plan.memory import shape_for
    from rlpost.plan.throughput import Workload, roofline

    shape = shape_for("7b")
    n = shape.num_params()                                  # 7,615,616,512 (checked in test_plan_memory.py)
    r = roofline(shape, 8, "colocated", Workload(prompts=128, k=8, prompt_len=512, response_len=1024))
    flops = 989e12 * 0.4
    tokens = 1024 * (512 + 1024)
    assert r["terms_s"]["train"] == pytest.approx(6 * n * tokens / (flops * 8))        # 22.71 s
    assert r["terms_s"]["reference"] == pytest.approx(2 * n * tokens / (flops * 8))
    assert r["terms_s"]["sync"] == pytest.approx(2 * n / 450e9)
    # 128 sequences per GPU: each of the 1024 decode steps reads the weights (memory-bound), plus the prefill
    weights_per_step = 2 * n / (3.35e12 * 0.6)
    prefill = 2 * n * 512 * 128 / flops
    assert prefill + 1024 * weights_per_step < r["terms_s"]["rollout"] < prefill + 1024 * 2 * weights_per_step
    assert r["step_s"] == pytest.approx(sum(r["terms_s"].values()))
    a = roofline(shape, 8, "async")
    assert a["train_gpus"] == a["rollout_gpus"] == 4
    assert a["step_s"] == pytest.approx(max(a["terms_s"]["rollout"] + a["terms_s"]["verifier"],
                                            a["terms_s"]["reference"] + a["terms_s"]["train"] + a["terms_s"]["sync"]))


def test_a_long_tail_of_lengths_makes_rollout_longer_at_the_same_mean():
    import statistics

    from rlpost.plan.memory import shape_for
    from rlpost.plan.throughput import Workload, response_lengths, roofline

    w = Workload(response_len=1000, length_sigma=0.8)
    lengths = response_lengths(w, 1000)
    assert statistics.mean(lengths) == pytest.approx(1000, rel=0.03) and max(lengths) <= 4000
    assert lengths == sorted(lengths)
    flat, tail = (roofline(shape_for("7b"), 8, "colocated", Workload(length_sigma=s)) for s in (0.0, 0.8))
    assert tail["terms_s"]["rollout"] > 2 * flat["terms_s"]["rollout"]
    assert tail["terms_s"]["train"] == pytest.approx(flat["terms_s"]["train"], rel=0.03)  # the same tokens trained


def test_the_roofline_of_one_gpu_is_colocated_only(capsys):
    """A single GPU cannot be split into rollout and training GPUs; the command still answers for it."""
    from rlpost.cli import main

    assert main(["plan", "throughput", "--model", "qwen2.5-0.5b", "--gpus", "1", "--json"]) == 0
    assert [r["topology"] for r in json.loads(capsys.readouterr().out)] == ["colocated"]
    assert main(["plan", "throughput", "--model", "qwen2.5-0.5b", "--gpus", "2", "--json"]) == 0
    assert [r["topology"] for r in json.loads(capsys.readouterr().out)] == ["colocated", "disaggregated", "async"]
