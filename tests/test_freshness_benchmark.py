"""benchmarks/freshness.py: its runs' configs load, the grid's order, the overlap model, resuming."""
import json
import os

import pytest

from benchmarks import freshness as fr
from rlpost.config import load_config


def test_every_cell_config_loads_with_its_staleness_and_correction(tmp_path):
    args = fr.parse_args(["--out", str(tmp_path)])
    for cell in fr.cells(args):
        if cell["seed"] != 0:
            continue
        overrides = fr.rl_overrides(cell, "gpt_mini", args)
        cfg = load_config(fr.TASKS[cell["task"]]["recipe"], overrides)
        assert cfg.rl.topology == "async" and cfg.rl.max_staleness == cell["staleness"]
        assert cfg.sft.steps == 0 and cfg.trainer.lr == args.lr
        want = {"none": ("none", "token"), "tis": ("tis", "token"), "tis-seq": ("tis", "sequence")}
        got = (cfg.algorithm["rollout_correction"], cfg.algorithm.get("rollout_correction_level", "token"))
        assert got == want[cell["correction"]]
        if cell["task"] == "calculator":
            assert cfg.task.env == "calculator" and cfg.task.max_turns == 2


def test_grid_is_seed_major_and_tis_seq_runs_on_arithmetic_only():
    args = fr.parse_args(["--staleness", "0,8", "--seeds", "0,1", "--seq-seeds", "0", "--multi-seeds", "0"])
    names = [(c["task"], c["name"]) for c in fr.cells(args)]
    assert names == [
        ("arithmetic", "s0-none-seed0"), ("arithmetic", "s0-tis-seed0"), ("arithmetic", "s0-tis-seq-seed0"),
        ("arithmetic", "s8-none-seed0"), ("arithmetic", "s8-tis-seed0"), ("arithmetic", "s8-tis-seq-seed0"),
        ("calculator", "s0-none-seed0"), ("calculator", "s0-tis-seed0"),
        ("calculator", "s8-none-seed0"), ("calculator", "s8-tis-seed0"),
        ("arithmetic", "s0-none-seed1"), ("arithmetic", "s0-tis-seed1"),
        ("arithmetic", "s8-none-seed1"), ("arithmetic", "s8-tis-seed1")]


def write_run(folder, staleness: int, rollout: float, train: float, evals: dict, final: float) -> str:
    """A run directory with 10 RL steps of fixed timings and held-out evaluations at the steps in `evals`."""
    run = folder / f"s{staleness}"
    run.mkdir()
    (run / "config.yaml").write_text(f"rl:\n  topology: async\n  max_staleness: {staleness}\n")
    lines = [{"stage": "eval", "step": 0, "eval/pass@1": 0.5, "after": "start"}]
    for step in range(1, 11):
        line = {"stage": "rl", "step": step, "time/rollout": rollout, "time/reward": 0.1, "time/reference": 0.2,
                "time/critic": 0.0, "time/advantages": 0.0, "time/train": train, "time/sync": 0.05,
                "time/other": 0.05, "time/step": 2.0, "time/rollout_wait": 0.0, "rollout/staleness_max": staleness,
                "loss/clip_frac_low": 0.01 * step}
        if step in evals:
            line["eval/pass@1"] = evals[step]
        lines.append(line)
    lines.append({"stage": "eval", "step": 0, "eval/pass@1": final, "after": "rl"})
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return str(run)


def test_summary_models_sync_as_the_sum_and_async_as_the_max(tmp_path):
    cell = {"task": "arithmetic", "correction": "none", "seed": 0, "name": "x"}
    sync = fr.summarise(write_run(tmp_path, 0, 1.0, 0.6, {5: 0.6, 10: 0.7}, 0.7), {**cell, "staleness": 0},
                        "1.0", 30.0, warmup=3)
    # rollout side 1.0 + 0.1, train side 0.2 + 0.6 + 0.05 + 0.05
    assert sync["rollout_side_s"] == pytest.approx(1.1) and sync["train_side_s"] == pytest.approx(0.9)
    assert sync["modelled_step_s"] == pytest.approx(2.0)
    assert sync["pass@1"] == [[0, 0.5], [5, 0.6], [10, 0.7]]
    assert sync["modelled_seconds"] == pytest.approx([0.0, 10.0, 20.0])
    assert sync["measured_seconds"] == pytest.approx([0.0, 10.0, 20.0])  # the sum of time/step up to each eval
    assert sync["diagnostics"] == {"loss/clip_frac_low": pytest.approx(0.055)}  # the mean over every RL step
    stale = fr.summarise(write_run(tmp_path, 4, 1.0, 0.6, {5: 0.8}, 0.65), {**cell, "staleness": 4},
                         "1.0", 30.0, warmup=3)
    assert stale["modelled_step_s"] == pytest.approx(1.1)  # the rollout side: training hides behind it
    # the end-of-RL evaluation closes the curve when the last step logged none
    assert stale["pass@1"] == [[0, 0.5], [5, 0.8], [10, 0.65]]
    assert stale["pass@1_peak"] == 0.8 and stale["pass@1_final"] == 0.65 and stale["staleness_max"] == 4


def test_a_run_with_a_summary_is_not_run_again_and_a_failed_one_is_reported(tmp_path, monkeypatch):
    args = fr.parse_args(["--out", str(tmp_path / "runs"), "--results", str(tmp_path / "results")])
    cell = {"task": "arithmetic", "staleness": 2, "correction": "tis", "seed": 1, "name": "s2-tis-seed1"}
    calls = []

    def failing_train(recipe, overrides, log):
        calls.append(overrides)
        raise RuntimeError("freshness: the run exited 1")

    monkeypatch.setattr(fr, "train", failing_train)
    assert fr.run_cell(cell, "ckpt", args) is None and len(calls) == 1
    assert "rl.max_staleness=2" in calls[0] and "seed=1" in calls[0]
    done = tmp_path / "results" / "arithmetic" / "s2-tis-seed1.json"
    done.parent.mkdir(parents=True)
    done.write_text(json.dumps({**cell, "pass@1_final": 0.9}))
    assert fr.run_cell(cell, "ckpt", args)["pass@1_final"] == 0.9 and len(calls) == 1
    assert not os.path.exists(tmp_path / "runs" / "arithmetic" / "s2-tis-seed1")


def test_report_tables_every_cell_with_mean_and_spread(tmp_path):
    rows = []
    for seed, final in ((0, 0.6), (1, 0.8)):
        rows.append({"task": "arithmetic", "correction": "none", "staleness": 8, "seed": seed, "steps": 10,
                     "pass@1": [[0, 0.5], [10, final]], "pass@1_start": 0.5, "pass@1_final": final,
                     "pass@1_peak": final, "modelled_step_s": 1.0, "rollout_side_s": 1.0, "train_side_s": 0.5,
                     "time_medians": {"time/step": 1.2}, "modelled_seconds": [0, 10],
                     "load_start": "3.00 2.00 1.00 on 2 CPUs", "load_end": "5.00 2.00 1.00 on 2 CPUs"})
    text = fr.table(rows)
    # no synchronous run of the task yet: the overlap model is the cell's own
    assert "| none | 8 | 2 | 10 | 70.0 ± 14.1 | 70.0 ± 14.1 | 1.000 | 1.000 | 1.200 | 1.000 / 0.500 |" in text
    assert "3.0 to 5.0" in text
    written = fr.plot(rows, str(tmp_path))
    assert sorted(os.path.basename(p) for p in written) == ["freshness_arithmetic.png", "freshness_arithmetic.svg",
                                                           "freshness_wall.png", "freshness_wall.svg"]


def test_wall_clock_model_takes_the_sides_of_the_synchronous_runs():
    def row(corr, staleness, roll, train):
        return {"task": "t", "correction": corr, "staleness": staleness, "rollout_side_s": roll,
                "train_side_s": train, "modelled_step_s": 9.9}

    g = fr.groups([row("none", 0, 0.4, 0.8), row("none", 0, 0.6, 1.0), row("none", 4, 5.0, 5.0),
                   row("tis", 0, 0.5, 1.5), row("tis-seq", 8, 5.0, 5.0)], "t")
    assert fr.pooled_step(g, "none", 0) == pytest.approx((0.5, 0.9, 1.4))   # the sum, seeds averaged
    assert fr.pooled_step(g, "none", 4) == pytest.approx((0.5, 0.9, 0.9))   # the max, not the loaded run's own
    assert fr.pooled_step(g, "tis-seq", 8) == pytest.approx((0.5, 1.5, 1.5))  # tis's synchronous runs
