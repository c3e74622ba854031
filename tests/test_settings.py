"""The config sections live next to what they configure (rlpost/settings/) and validate themselves; config.py
imports no role; tasks are a registry with their own options; GRPO's defaults are written once, in GRPO."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from rlpost.algorithms import get_algorithm
from rlpost.config import (Config, ConfigError, CriticConfig, EvalConfig, ModelConfig, PreferenceConfig, PRMConfig,
                           RewardModelConfig, RLConfig, RolloutConfig, TaskConfig, TrainerConfig, load_config,
                           stage_configs, to_dict)
from rlpost.tasks import TASKS, Task, TaskSource, load_task

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = sorted((ROOT / "rlpost" / "settings").glob("*.py"))


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in a file, at any depth (function-local ones included)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            out.append((node.lineno, node.module))
    return out


# ---------------------------------------------------------------------------- where the sections live

@pytest.mark.parametrize("path", SETTINGS, ids=lambda p: p.name)
def test_a_section_module_imports_only_the_schema_and_the_standard_library(path):
    # no torch, no yaml, no role: a section is plain data and its own rules, importable by every role
    for line, module in imported_modules(path):
        if module.split(".")[0] == "rlpost":
            assert module == "rlpost.schema" or module.startswith("rlpost.settings."), f"{path.name}:{line} {module}"
        else:
            assert module in {"__future__", "dataclasses", "typing", "re"}, f"{path.name}:{line} imports {module}"


def test_config_imports_no_role_module_anywhere():
    roles = [(line, m) for line, m in imported_modules(ROOT / "rlpost" / "config.py")
             if m.startswith("rlpost.") and m != "rlpost.schema" and not m.startswith("rlpost.settings.")]
    assert not roles, f"rlpost/config.py imports roles: {roles}"


def test_every_section_is_still_importable_from_config():
    import rlpost.config as config
    import rlpost.settings.model as model

    assert config.ModelConfig is model.ModelConfig and config.LoRAConfig is model.LoRAConfig
    assert config.LORA_TARGETS is model.LORA_TARGETS


def test_the_roles_read_their_valid_names_from_the_section_modules():
    import rlpost.critic
    import rlpost.models
    import rlpost.rollout
    import rlpost.schedule
    import rlpost.settings.critic
    import rlpost.settings.model
    import rlpost.settings.rl
    import rlpost.settings.rollout
    import rlpost.settings.trainer

    assert rlpost.rollout.ENGINES is rlpost.settings.rollout.ENGINES
    assert rlpost.models.ROLLOUT_DTYPES is rlpost.settings.rollout.ROLLOUT_DTYPES
    assert rlpost.models.DTYPES is rlpost.settings.model.DTYPES
    assert rlpost.models.PRECISION_CHOICES is rlpost.settings.trainer.PRECISION_CHOICES
    assert rlpost.schedule.SCHEDULES is rlpost.settings.trainer.SCHEDULES
    assert rlpost.critic.CRITIC_TYPES is rlpost.settings.critic.CRITIC_TYPES
    # the topologies and their weight-sync names are a registry the rl section reads when a config is validated
    topology = rlpost.settings.rl.RLConfig.__dataclass_fields__["topology"]
    assert topology.metadata["choices"] == "rlpost.loops:TOPOLOGIES"


# ---------------------------------------------------------------------------- each section checks itself

@pytest.mark.parametrize("section, prefix, match", [
    (TaskConfig(reward_on_error="skip"), "task.", r"'task.reward_on_error' is 'skip'; valid values: raise, zero"),
    (TaskConfig(env_on_error="skip"), "task.", r"'task.env_on_error' is 'skip'; valid values: raise, zero"),
    (TaskConfig(name="csv"), "task.", r"'task.name' is 'csv'; valid values: arithmetic, multiply, multistep"),
    (TaskConfig(reward_options={"extract": "boxed"}), "task.", r"task.reward_options are the options of task.reward"),
    (TaskConfig(name="file"), "task.", r"task.name=file needs task.train_file"),
    (TaskConfig(answer_format_rate=0.5), "task.", r"'task.answer_format_rate' is an option of the multistep task"),
    (PreferenceConfig(on_bad_row="drop"), "preference.", r"'preference.on_bad_row' is 'drop'; valid values: skip"),
    (PreferenceConfig(loss={"name": "nope"}), "preference.", r"'preference.loss': unknown preference loss 'nope'"),
    (PreferenceConfig(loss={"name": "dpo", "beta": -1}), "preference.", r"'preference.loss.beta' must be"),
    (PRMConfig(reward="sum"), "prm.", r"'prm.reward' is 'sum'; valid values: score, delta"),
    (PRMConfig(separator=""), "prm.", r"'prm.separator' must be a non-empty string"),
    (RolloutConfig(engine="sglang"), "rollout.", r"'rollout.engine' is 'sglang'; valid values: auto, native, hf"),
    (RolloutConfig(dtype="fp16"), "rollout.", r"'rollout.dtype' is 'fp16'; valid values: auto, fp32, bf16"),
    (ModelConfig(dtype="float16"), "model.", r"'model.dtype' is 'float16'; valid values: float32, bfloat16"),
    (TrainerConfig(precision="fp16"), "trainer.", r"'trainer.precision' is 'fp16'; valid values: auto, fp32, bf16"),
    (TrainerConfig(lr_schedule="step"), "trainer.", r"'trainer.lr_schedule' is 'step'; valid values: constant"),
    (CriticConfig(type="shared"), "critic.", r"'critic.type' is 'shared'; valid values: separate, head"),
    (RLConfig(weight_sync="nccl"), "rl.", r"'rl.weight_sync' is 'nccl'; valid values: auto, pointer"),
    (RLConfig(topology="ray"), "rl.", r"'rl.topology' is 'ray'; valid values: colocated, disaggregated, async"),
    (EvalConfig(reward_options={"extract": "boxed"}), "eval.", r"eval.reward_options are the options of eval.reward"),
    (RewardModelConfig(train=True, path="rm"), "reward_model.", r"reward_model.path .* or reward_model.train, not"),
    (Config(algorithm={"name": "grpo", "beta": -1}), "", r"'algorithm.beta' must be >= 0 .*\(algorithm.name=grpo\)"),
], ids=lambda v: v if isinstance(v, str) else type(v).__name__)
def test_a_section_refuses_its_own_bad_keys_by_itself(section, prefix, match):
    # no load_config, no cross-section pass: the section's own validate() knows its names, rules and plug-ins
    with pytest.raises(ConfigError, match=match):
        section.validate(prefix)


def test_a_sound_section_passes_its_own_validation():
    for section, prefix in ((TaskConfig(name="multistep", answer_format_rate=0.5), "task."),
                            (PreferenceConfig(loss={"name": "ipo", "beta": 0.2}), "preference."),
                            (RolloutConfig(engine="hf", dtype="bf16"), "rollout."), (Config(), "")):
        section.validate(prefix)


# ---------------------------------------------------------------------------- GRPO's defaults, written once

def test_grpo_defaults_live_in_the_plug_in_alone():
    assert to_dict(Config())["algorithm"] == {"name": "grpo"}
    grpo = get_algorithm(**load_config(None, []).algorithm).cfg
    assert (grpo.clip_low, grpo.clip_high, grpo.beta) == (0.2, 0.28, 0.04)


def test_naming_another_algorithm_starts_from_its_own_defaults():
    cfg = load_config(None, ["algorithm.name=ppo"])
    assert cfg.algorithm == {"name": "ppo"}  # no GRPO parameter carried over to PPO
    assert get_algorithm(**cfg.algorithm).cfg.beta == get_algorithm("ppo").cfg.beta


def test_a_named_plug_in_mapping_replaces_the_one_before_and_an_unnamed_one_tunes_it(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("algorithm: {name: ppo, beta: 0.1}\npreference: {loss: {name: ipo, beta: 0.3}}\n"
                      "rl: {steps: 4}\nstages:\n  - rl\n  - rl: {algorithm: {name: rloo}}\n"
                      "  - rl: {algorithm: {clip_high: 0.3}}\n")
    cfg = load_config(str(recipe))
    assert cfg.algorithm == {"name": "ppo", "beta": 0.1} and cfg.preference.loss == {"name": "ipo", "beta": 0.3}
    plan = [c.algorithm for _, c in stage_configs(cfg)]
    assert plan == [{"name": "ppo", "beta": 0.1}, {"name": "rloo"},  # rloo does not inherit ppo's beta
                    {"name": "ppo", "beta": 0.1, "clip_high": 0.3}]  # without a name: the run's algorithm, tuned
    recipe.write_text("algorithm: {beta: 0.0}\n")
    assert load_config(str(recipe)).algorithm == {"name": "grpo", "beta": 0.0}


# ---------------------------------------------------------------------------- tasks: a registry, their own options

def test_tasks_register_themselves_by_name():
    assert list(TASKS) == ["arithmetic", "multiply", "multistep", "functions", "grading", "web", "file", "jsonl"]
    assert all(issubclass(cls, TaskSource) for cls in TASKS.classes.values())


@pytest.fixture
def echo_task():
    @TASKS.register("echo")
    class Echo(TaskSource):
        description = "repeat a word (a task defined by a test)"

        @dataclasses.dataclass
        class Config:
            word: str = "hi"
            """the word to repeat"""

        def check(self, cfg) -> None:
            if cfg.train_file:
                raise ValueError("task.name=echo makes its own prompts; unset task.train_file")

        def load(self, cfg) -> Task:
            rows = [{"prompt": f"{self.options.word}=", "answer": self.options.word}]
            return Task(self.name, rows, rows, [{**rows[0], "completion": self.options.word}], "hi=", 1.0)

    yield Echo
    del TASKS.classes["echo"]


def test_a_new_task_is_one_registered_class(echo_task):
    cfg = load_config(None, ["task.name=echo", "task.options={word: yo}"])
    task = load_task(cfg.task)
    assert task.name == "echo" and task.train_rows == [{"prompt": "yo=", "answer": "yo"}]
    with pytest.raises(ConfigError, match=r"config key 'task.options': unknown parameter\(s\) 'colour' for task "
                                          r"'echo'; valid parameters: word"):
        load_config(None, ["task.name=echo", "task.options.colour=red"])
    with pytest.raises(ConfigError, match=r"task.name=echo makes its own prompts; unset task.train_file"):
        load_config(None, ["task.name=echo", "task.train_file=x.jsonl"])  # the task's own rule, at load time


def demos_in_format(cfg: TaskConfig) -> int:
    return sum("####" in d["completion"] for d in load_task(cfg).demonstrations)


def test_a_task_option_and_its_flat_alias_are_one_option():
    by_option = load_config(None, ["task.name=multistep", "task.options.answer_format_rate=0.2"]).task
    by_alias = load_config(None, ["task.name=multistep", "task.answer_format_rate=0.2"]).task
    assert by_option.task_options() == by_alias.task_options() == {"answer_format_rate": 0.2}
    full = demos_in_format(TaskConfig(name="multistep"))
    assert demos_in_format(by_option) == demos_in_format(by_alias) < full / 2


@pytest.mark.parametrize("overrides, match", [
    (["task.name=multistep", "task.options.answer_format_rate=2"],
     r"config key 'task.options.answer_format_rate' must be in \[0, 1\] .*got 2 \(task.name=multistep\)"),
    (["task.name=multistep", "task.options.answer_format_rate=0.3", "task.answer_format_rate=0.2"],
     r"'task.answer_format_rate' \(0.2\) and 'task.options.answer_format_rate' \(0.3\) are one option"),
    (["task.answer_format_rate=0.2"], r"'task.answer_format_rate' is an option of the multistep task, not of "
                                      r"'arithmetic' \(got 0.2\); leave it at 1.0 or set task.name=multistep"),
    (["task.options.answer_format_rate=0.2"], r"'task.options': unknown parameter\(s\) 'answer_format_rate' for "
                                              r"task 'arithmetic'"),
])
def test_task_options_are_checked_when_the_config_loads(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)
