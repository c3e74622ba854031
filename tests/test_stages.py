"""The `stages` list: None keeps the fixed order of every recipe; a list runs its stages in order, a repeated
stage (R1's second RL) with its own checkpoints, eval label, RL step numbers and summary keys, resumable in
the middle of the repeat; names and unconfigured sections fail at load time."""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_resume import TINY, comparable, killed_run, run_to_end

from rlpost.checkpoint import list_checkpoints
from rlpost.config import ConfigError, load_config, stage_configs, stage_names
from rlpost.run import build_stages, stage_line, train

R1_SHAPE = "stages=[sft, eval, rl, eval, rejection, eval, rl, eval]"
REJECTION = ["rejection.num_prompts=16", "rejection.samples_per_prompt=4", "rejection.steps=3",
             "rejection.batch_size=8", "rejection.success_threshold=0.0"]  # keeps every sample: the tiny model is bad


def described(cfg):
    """Each stage as the run prints it, evals with their label."""
    return [f"eval:{s.after}" if s.name == "eval" else s.label for s in build_stages(cfg)]


@pytest.mark.parametrize("recipe, expected", [
    (None, ["sft", "eval:sft", "rl", "eval:rl"]),
    ("recipes/tulu3.yaml", ["sft", "eval:sft", "preference", "eval:dpo", "rl", "eval:rl"]),
    ("recipes/instructgpt.yaml", ["sft", "eval:sft", "reward_model", "rl", "eval:rl"]),
    ("recipes/rejection_sft.yaml", ["sft", "eval:sft", "rl", "eval:rl", "rejection", "eval:rejection"]),
    ("recipes/lora.yaml", ["eval:start", "rl", "eval:rl"]),
])
def test_without_a_list_the_order_is_the_fixed_one(recipe, expected):
    cfg = load_config(recipe)
    assert cfg.stages is None and described(cfg) == expected
    checkpoints = [s.end_checkpoint for s in build_stages(cfg) if s.changes_weights or s.checkpoint]
    assert checkpoints == [{"rl": "final", "reward_model": "after_reward_model"}.get(n, n) for n in expected
                           if not n.startswith("eval")]


def test_a_list_names_the_stages_in_order_with_repeats_labelled():
    cfg = load_config(None, [R1_SHAPE])
    assert described(cfg) == ["sft", "eval:sft", "rl", "eval:rl", "rejection", "eval:rejection", "rl_2", "eval:rl_2"]
    rl, rl_2 = [s for s in build_stages(cfg) if s.name == "rl"]
    # checkpoints/final is the last RL stage's: the first one's end is not the run's final model
    assert (rl.end_checkpoint, rl.step_prefix, rl.reference_folder, rl.step_offset) == ("rl", "step_", "reference", 0)
    assert (rl_2.end_checkpoint, rl_2.step_prefix, rl_2.reference_folder, rl_2.step_offset) == (
        "final", "rl_2_step_", "rl_2_reference", cfg.rl.steps)
    cfg = load_config(None, ["stages=[eval, dpo, eval, eval, sft, sft]", "preference.num_prompts=8"])
    assert stage_names(cfg) == ["eval", "preference", "eval", "eval", "sft", "sft"]
    assert described(cfg) == ["eval:start", "preference", "eval:dpo", "eval:dpo_again", "sft", "sft_2"]


@pytest.mark.parametrize("overrides, match", [
    (["stages=[sft, grpo]"], ("unknown stage 'grpo'; valid stages: sft, preference, reward_model, rl, rejection, "
                              "eval, dpo")),
    (["stages=[]"], "empty list"),
    (["stages=[sft, rl]", "rl.steps=0"], "rl stage, which needs rl.steps >= 1"),
    (["stages=[sft, rl]", "sft.steps=0"], "sft stage, which needs sft.steps >= 1"),
    (["stages=[sft, reward_model, rl, reward_model, rl]"], "reward_model more than once"),
    (["stages=[sft, reward_model, rl]", "task.name=multistep"], "reward_model stage, which needs preference pairs"),
    (["stages=[sft, eval, rl, eval]", "rejection.enabled=true"], "rejection.enabled is set but .* no rejection"),
    (["stages=[sft, rl]", "reward_model.train=true"], "reward_model.train is set but .* no reward_model"),
    (["stages=sft"], "expects list"),
    # a stage's own settings: only the sections it reads, not what the run builds once, valid values
    (["stages=[sft, {rl: {model.n_layer: 4}}]"], (r"'stages\[1\] \(rl\)' sets 'model.n_layer', which a rl stage "
                                                   "does not read; it may set keys of rl, rollout, algorithm")),
    (["stages=[{sft: {rollout.k: 4}}, rl]"], "sets 'rollout.k', which a sft stage does not read"),
    (["stages=[sft, {rl: {rollout.engine: hf}}]"], "'rollout.engine': .* built once for the whole run"),
    (["stages=[sft, {rl: {rl: {topology: disaggregated}}}]"], "sets 'rl': .* built once for the whole run"),
    (["stages=[sft, {rl: {trainer.lr: -1}}]"], r"stages\[1\] \(rl\): .*'trainer.lr' must be a positive"),
    (["stages=[sft, {rl: {trainer.lrr: 1}}]"], r"stages\[1\] \(rl\): unknown config key 'trainer.lrr'"),
    (["stages=[sft, {rl: {algorithm: {name: nope}}}]"], r"stages\[1\] \(rl\): .*nope"),
    (["stages=[sft, {rl: {rl.steps: 0}}]"], r"stages\[1\] \(rl\): .*needs rl.steps >= 1 \(it is 0\)"),
    (["stages=[sft, {rl: 3}]"], r"'stages\[1\]' must be a stage name or \{name: \{key: value"),
    (["stages=[sft, {rl: {}, eval: {}}]"], r"'stages\[1\]' must be a stage name"),
    (["stages=[sft, {grpo: {rl.steps: 3}}]"], "unknown stage 'grpo'"),
    (["stages=[sft, [rl]]"], r"unknown stage \['rl'\]"),
])
def test_bad_lists_fail_at_load_time_naming_the_problem(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


RECIPE_WITH_STAGE_SETTINGS = """
trainer: {lr: 2.0e-4, warmup_steps: 10}
rl: {steps: 40}
stages:
  - sft
  - eval
  - rl
  - rl:
      trainer.lr: 1.0e-4               # a dotted key sets one value
      rl: {steps: 20, eval_every: 5}   # a section merges into that section
      algorithm: {name: rloo}          # the algorithm is replaced whole, as in a recipe
  - eval: {eval.samples_per_prompt: 8}
"""


def test_a_stage_list_entry_carries_settings_for_that_stage_alone(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE_WITH_STAGE_SETTINGS)
    cfg = load_config(str(recipe))
    assert stage_names(cfg) == ["sft", "eval", "rl", "rl", "eval"]
    plan = stage_configs(cfg)
    assert [c is cfg for _, c in plan] == [True, True, True, False, False]
    rl_2 = plan[3][1]
    assert (rl_2.trainer.lr, rl_2.trainer.warmup_steps, rl_2.rl.steps, rl_2.rl.eval_every) == (1e-4, 10, 20, 5)
    assert rl_2.algorithm == {"name": "rloo"} and cfg.algorithm["name"] == "grpo"
    assert (cfg.trainer.lr, cfg.rl.steps, cfg.eval.samples_per_prompt) == (2e-4, 40, 4)  # the run's own: untouched
    assert plan[4][1].eval.samples_per_prompt == 8 and plan[4][1].trainer.lr == 2e-4
    stages = build_stages(cfg)
    rl, second, last = stages[2], stages[3], stages[4]
    assert (rl.trainer_cfg.lr, rl.cfg.steps, rl.algorithm_cfg["name"]) == (2e-4, 40, "grpo")
    assert (second.label, second.trainer_cfg.lr, second.cfg.steps, second.algorithm_cfg) == ("rl_2", 1e-4, 20,
                                                                                              {"name": "rloo"})
    assert second.step_offset == 40 and second.evaluation.cfg.samples_per_prompt == 4
    assert (last.after, last.cfg.samples_per_prompt) == ("rl_2", 8)
    assert stage_line(cfg, stages) == [
        "sft", "eval", "rl", "rl_2 (trainer.lr=0.0001, rl={'steps': 20, 'eval_every': 5}, algorithm={'name': 'rloo'})",
        "eval (eval.samples_per_prompt=8)"]


def test_a_repeated_rl_stage_runs_twice_writing_its_own_checkpoints_labels_and_steps(tmp_path):
    s = train(load_config(None, [*TINY, R1_SHAPE, *REJECTION, "log.rollouts_every=1", f"out_dir={tmp_path}",
                                 "run_name=r1"]))
    run = tmp_path / "r1"
    assert s["status"] == "ok"
    assert [k for k in s if k.startswith("pass@1_")] == ["pass@1_sft", "pass@1_rl", "pass@1_rejection",
                                                         "pass@1_rl_2"]
    names = {c.name for c in list_checkpoints(run)}
    assert {"sft", "rl", "rejection", "final", "step_4", "step_6", "rl_2_step_4", "rl_2_step_6"} <= names
    assert (run / "checkpoints" / "reference").is_dir() and (run / "checkpoints" / "rl_2_reference").is_dir()
    # the second RL stage trained the policy on: its weights are not the first stage's
    first, second = (load_file(run / "checkpoints" / d / "model.safetensors") for d in ("rl", "final"))
    assert any(not torch.equal(first[k], second[k]) for k in first)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if m["stage"] == "rl"] == list(range(1, 17))  # 8 + 8, one line each
    assert [m["after"] for m in lines if m["stage"] == "eval"] == ["sft", "rl", "rejection", "rl_2"]
    rollouts = [json.loads(x) for x in (run / "rollouts.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in rollouts}) == list(range(1, 17))
    pytest.importorskip("matplotlib")
    from rlpost.report import build_report

    with open(build_report(str(run))) as f:
        assert "<b>16 of 16</b>" in f.read()  # the header counts the RL steps of both stages


def test_a_run_killed_inside_the_repeated_rl_stage_resumes_to_the_same_run(tmp_path):
    # the repeat runs with settings of its own (6 steps, another learning rate), which the resumed run keeps
    args = [*TINY, "stages=[sft, eval, rl, eval, {rl: {rl.steps: 6, trainer.lr: 1.0e-3}}, eval]"]
    run_to_end([*args, f"out_dir={tmp_path}", "run_name=ref"], tmp_path)
    run = tmp_path / "killed"
    killed_run([*args, f"out_dir={tmp_path}", "run_name=killed", "task.reward=test_resume:reward_that_kills_its_run"],
               tmp_path, run / "checkpoints" / "rl_2_step_4")
    assert (run / "checkpoints" / "rl").is_dir() and not (run / "checkpoints" / "final").exists()
    out = run_to_end(["--resume", str(run)], tmp_path)
    assert "resuming from" in out and "rl_2_step_4" in out, out
    ref = tmp_path / "ref"
    assert comparable(ref) == comparable(run)
    for folder in ("rl", "final"):
        a, b = (load_file(d / "checkpoints" / folder / "model.safetensors") for d in (ref, run))
        assert all(torch.equal(a[k], b[k]) for k in a)
    rl_lines = [m for m in comparable(run) if m["stage"] == "rl"]
    assert [m["step"] for m in rl_lines] == list(range(1, 15))  # 8 steps, then the repeat's 6
    assert {m["train/lr"] for m in rl_lines[:8]} == {2e-4} and {m["train/lr"] for m in rl_lines[8:]} == {1e-3}
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (ref, run))
    assert sa["pass@1_rl"] == sb["pass@1_rl"] and sa["pass@1_rl_2"] == sb["pass@1_rl_2"] and sb["status"] == "ok"


def test_rlpost_dpo_refuses_a_stage_list(capsys):
    from rlpost.cli import main

    assert main(["dpo", "stages=[sft, dpo, eval]"]) == 2
    assert "runs with `rlpost train`" in capsys.readouterr().err


def test_a_new_stage_is_one_class_and_its_registry_line():
    """A stage registered by name is a valid `stages` entry, takes only its own sections from an entry's
    settings, and is built by build_stages: nothing else changes (no table in config.py or run.py)."""
    from rlpost.stages import STAGES, Stage, register

    @register("probe")
    class ProbeStage(Stage):
        sections = ("eval",)

        @classmethod
        def from_config(cls, cfg, label=None):
            stage = cls()
            stage.samples = cfg.eval.samples_per_prompt
            return stage

    try:
        cfg = load_config(None, ["stages=[sft, {probe: {eval.samples_per_prompt: 3}}, eval]"])
        stages = build_stages(cfg)
        assert [s.name for s in stages] == ["sft", "probe", "eval"] and stages[1].samples == 3
        with pytest.raises(ConfigError, match="a probe stage does not read; it may set keys of eval"):
            load_config(None, ["stages=[{probe: {trainer.lr: 0.1}}]"])
    finally:
        del STAGES.classes["probe"]
    with pytest.raises(ConfigError, match="unknown stage 'probe'"):
        load_config(None, ["stages=[probe]"])
