"""Bad numbers are refused before any work: every numeric key of the schema, fuzzed.

The keys are enumerated from the dataclasses themselves (the config sections, every algorithm's, every
preference loss's and every task's own `Config`), so a key added later is fuzzed without touching this file.
Each gets NaN, +-inf, -1 and 0, spelled as on a command line ("nan") and as YAML floats (".nan", ".inf"). The
config loader must either refuse the value, naming the key, the value and what is allowed, or accept a finite
value inside the key's declared range, whose boundary values carry a meaning in the range's note, and that note
is written in docs/cli.md. Nothing here builds a model; the CLI tests check that a refusal comes before the run
directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from rlpost.algorithms import available as algorithms
from rlpost.algorithms import get_algorithm
from rlpost.cli import main
from rlpost.config import Config, ConfigError, load_config
from rlpost.env.sources import SOURCES
from rlpost.preference import available as preference_losses
from rlpost.preference import get_preference_loss
from rlpost.schema import Range, hints, numeric_fields
from rlpost.tasks import TASKS

ROOT = Path(__file__).resolve().parent.parent
VALUES = ["nan", "inf", "-inf", ".nan", ".inf", "-1", "0"]


@dataclass(frozen=True)
class Key:
    """One numeric key: its dotted name, int or float, whether null is allowed, its declared range, the
    overrides that set it (the plug-in keys first pick their algorithm or loss), and who declares it."""

    name: str
    kind: type
    optional: bool
    range: Range | None
    select: tuple[str, ...] = ()
    owner: str = ""

    def overrides(self, value: str) -> list[str]:
        return [*self.select, f"{self.name}={value}"]


def section_keys(cls: type = Config, prefix: str = "") -> list[Key]:
    keys = [Key(prefix + name, kind, optional, rng)
            for name, (kind, optional, rng) in numeric_fields(cls).items()]
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints(cls)[f.name]):
            keys += section_keys(hints(cls)[f.name], f"{prefix}{f.name}.")
    return keys


def plugin_keys() -> list[Key]:
    keys = []
    for section, names, build in (("algorithm", algorithms(), get_algorithm),
                                  ("preference.loss", preference_losses(), get_preference_loss)):
        for name in names:
            for param, (kind, optional, rng) in numeric_fields(type(build(name)).Config).items():
                keys.append(Key(f"{section}.{param}", kind, optional, rng, (f"{section}={{name: {name}}}",),
                                f"{section}.name={name}"))
    for name in TASKS:  # a task's options: task.options.<param>, the task chosen by task.name
        for param, (kind, optional, rng) in numeric_fields(TASKS.classes[name].Config).items():
            keys.append(Key(f"task.options.{param}", kind, optional, rng, (f"task.name={name}",), f"task.name={name}"))
    for name, cls in sorted(SOURCES.classes.items()):  # rl.reward's sources, with the folder each one needs
        needs = {"teacher": ", teacher: t", "prm": ", path: p"}.get(name, "")
        for param, (kind, optional, rng) in numeric_fields(cls.Config).items():
            keys.append(Key(f"rl.reward.{param}", kind, optional, rng, (f"rl.reward={{name: {name}{needs}}}",),
                            f"rl.reward.name={name}"))
    return keys


KEYS = section_keys() + plugin_keys()


def key_id(key: Key) -> str:
    return f"{key.name}[{key.owner.split('=')[1]}]" if key.owner else key.name


def test_the_enumeration_finds_the_keys_the_requirement_names():
    names = {k.name for k in KEYS}
    assert {"rollout.temperature", "rl.steps", "threads", "model.n_head", "eval.temperature", "algorithm.beta",
            "algorithm.clip_low", "algorithm.clip_high", "algorithm.gamma", "preference.loss.beta"} <= names
    assert len(section_keys()) >= 80 and len(plugin_keys()) >= 90


@pytest.mark.parametrize("key", KEYS, ids=key_id)
def test_every_numeric_key_declares_its_range(key):
    assert key.range is not None, (
        f"numeric key {key.name} ({key.owner or 'config'}) declares no range: give it one next to the field "
        "(opt(default, help, at_least(...) / above(...) / between(...)) in its rlpost/settings/ module, or the "
        "`ranges` "
        "table of a plug-in's Config), with a note saying what a boundary value means, and add its row to "
        "the table in docs/cli.md")


def boundary(rng: Range, value: float) -> bool:
    return (value == rng.low and not rng.low_open) or (value == rng.high and not rng.high_open)


@pytest.mark.parametrize("key", KEYS, ids=key_id)
def test_every_numeric_key_refuses_or_means_each_fuzzed_value(key):
    rng = key.range or Range()
    for raw in VALUES:
        number = float(raw.replace(".nan", "nan").replace(".inf", "inf"))
        try:
            load_config(None, key.overrides(raw))
        except ConfigError as e:  # a clear refusal: the key, the value and what is allowed
            msg = str(e)
            param = key.name.rsplit(".", 1)[1] if key.owner else key.name
            assert f"'{key.name}'" in msg or (f"'{key.name.rsplit('.', 1)[0]}'" in msg and param in msg), msg
            assert re.search(rf"got .*{re.escape(raw.lstrip('.').replace('-.', '-'))}", msg), msg
            if "must be" in msg:  # a range refusal (a wrongly typed value says which type it needs instead)
                assert rng.describe(key.optional) in msg, msg
            continue
        # accepted: a finite number the key means something for
        assert math.isfinite(number), f"{key.name}={raw} was accepted: a run would train on it"
        assert number in rng, f"{key.name}={raw} was accepted outside its declared range {rng.bounds()}"
        if boundary(rng, number):
            assert re.search(rf"(^|; ){number:g}:", rng.note), (
                f"{key.name}={raw} is accepted at the edge of its range: its range's note must say what "
                f"{number:g} means (e.g. '{number:g}: off'), got note {rng.note!r}")


def range_table() -> list[str]:
    """docs/cli.md's table of numeric keys: the config sections' keys, then the plug-ins' parameters (one row
    per parameter and range, naming the algorithms or losses when not all of them have it)."""
    rows = [f"| `{k.name}` | {(k.range or Range()).describe(k.optional)} |" for k in section_keys()]
    groups: dict[tuple[str, str], list[str]] = {}
    for k in plugin_keys():
        groups.setdefault((k.name, (k.range or Range()).describe(k.optional)), []).append(k.owner.split("=")[1])
    every = {"algorithm": sorted(algorithms()), "preference.loss": sorted(preference_losses()),
             "task.options": sorted(TASKS),
             "rl.reward": sorted(SOURCES.classes)}
    for (name, allowed), owners in groups.items():
        section = name.rsplit(".", 1)[0]
        which = "" if sorted(owners) == every[section] else f" ({', '.join(owners)})"
        rows.append(f"| `{name}`{which} | {allowed} |")
    return rows


def test_docs_cli_lists_every_numeric_key_with_its_range():
    text = (ROOT / "docs" / "cli.md").read_text()
    missing = [row for row in range_table() if row not in text]
    assert not missing, ("docs/cli.md's table of numeric keys is out of date; its rows should be:\n"
                         + "\n".join(range_table()))


# ---------------------------------------------------------------------------- the ones the requirement names

@pytest.mark.parametrize("overrides, match", [
    (["rollout.temperature=nan"], r"'rollout.temperature' must be >= 0 .*got nan"),
    (["rollout.temperature=-1"], r"'rollout.temperature' must be >= 0 \(0: greedy.*got -1"),
    (["algorithm.beta=-1"], r"'algorithm.beta' must be >= 0 .*got -1 \(algorithm.name=grpo\)"),
    (["algorithm.clip_low=-0.5"], r"'algorithm.clip_low' must be in \(0, 1\] .*got -0.5"),
    (["algorithm.clip_high=nan"], r"'algorithm.clip_high' must be > 0, got nan"),
    (["rl.steps=-1"], r"'rl.steps' must be >= 0 \(0: no RL stage\), got -1"),
    (["threads=0"], r"'threads' must be >= 1 or null, got 0"),
    (["model.n_head=3", "model.n_embd=16"], r"'model.n_head' is 3, which does not divide model.n_embd=16.*"
                                            r"among 1, 2, 4, 8, 16"),
    (["run_name=../x"], r"'run_name' is '\.\./x': it names a folder inside out_dir"),
    (["run_name=/tmp/x"], r"'run_name' is '/tmp/x'"),
    (["run_name=a/../../x"], r"'run_name' is 'a/\.\./\.\./x'"),
    (["run_name=."], r"'run_name' is '\.'"),
    (["stages=[sft, {rl: {rollout.temperature: .nan}}]", "rl.steps=1"],
     r"stages\[1\] \(rl\): config key 'rollout.temperature' must be >= 0"),
])
def test_the_values_the_requirement_names_are_refused_at_load_time(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_an_algorithm_mapping_without_a_name_is_named():
    with pytest.raises(ConfigError, match=r"config key 'algorithm' needs a 'name' besides its parameters, got "
                                          r"\{'beta': 0.1\}"):
        load_config(None, ["algorithm={beta: 0.1}"])  # was a TypeError from get_algorithm


def test_a_run_name_inside_out_dir_is_accepted():
    assert load_config(None, ["run_name=sweep/lr3e-4"]).run_name == "sweep/lr3e-4"
    assert load_config(None, ["run_name=a/../b"]).run_name == "a/../b"  # still inside out_dir


def test_the_gpt_mini_head_split_is_checked_by_the_model_itself():
    from rlpost.models.gpt_mini import GPT, GPTConfig

    with pytest.raises(ValueError, match=r"n_embd=16 must be a multiple of n_head=3 \(config keys model.n_embd"):
        GPT(GPTConfig(vocab_size=8, block_size=8, n_layer=1, n_head=3, n_embd=16))


def test_an_hf_model_is_not_refused_for_gpt_mini_sizes():
    # n_head / n_embd shape only the embedded model; a checkpoint brings its own
    load_config(None, ["model.name=some/checkpoint", "model.n_head=3", "model.n_embd=16"])



# ---------------------------------------------------------------------------- the structured keys, misused

@pytest.mark.parametrize("overrides, match", [
    (['stages=["rl", {}]'], r"config key 'stages\[1\]' must be a stage name or \{name: "),  # was a StopIteration
    (["task.env=nope"], r"config key 'task.env': unknown environment 'nope'; shipped: calculator"),
    (["task.env=no_such_module_x:Env"], r"config key 'task.env': task.env 'no_such_module_x:Env'"),
    (["task.env=calculator", "task.env_options={nope: 1}"], r"config key 'task.env': task.env 'calculator': bad "
                                                            r"task.env_options \['nope'\]"),
    (["task.env=web", "task.env_options={top_k: 0}"], r"config key 'task.env': task.env 'web': task.env_options: web "
                                                      r"env: top_k must be a whole number >= 1, got 0"),
    (["rl.keep_best=true", "rl.eval_every=500"], r"rl.eval_every=500 runs none .* set rl.eval_every=N \(0 < N < "
                                                 r"150\)"),
    (["rl.keep_best=true", "rl.steps=10", "rl.eval_every=10"], r"rl.eval_every=10 runs none"),
    ([f"task.train_file={ROOT / 'README.md'}"], r"task.name=arithmetic makes its own problems and reads no prompt "
                                                r"file, but task.train_file is set"),
    (["task.name=multistep", "task.eval_file=x.jsonl"], r"task.name=multistep .* task.eval_file is set"),
    (["task.sources=[{task: arithmetic, file: x.jsonl}]"], r"task.name=arithmetic .* an entry's `file`"),
    # beside task.sources every key but the run's is an entry's own, and was silently not read
    (["task.sources=[{task: arithmetic}]", "task.name=multistep"], r"config key 'task.name' is set beside "
                                                                   r"'task.sources'.*task.sources\[i\].task\)"),
    (["task.sources=[{task: arithmetic}]", "task.seed=5"], r"'task.seed' is set beside 'task.sources'"),
    (["task.sources=[{file: x.jsonl}]", "task.prompt_key=question"], r"'task.prompt_key' is set beside"),
    # one column read as two keys: every row's answer (or demonstration) was its own prompt
    (["task.name=file", "task.train_file=x.jsonl", "task.prompt_key=q", "task.answer_key=q"],
     r"config keys 'task.prompt_key' and 'task.answer_key' both name the column 'q'"),
    (["task.name=file", "task.train_file=x.jsonl", "task.completion_key=prompt"],
     r"config keys 'task.prompt_key' and 'task.completion_key' both name the column 'prompt'"),
    (["task.sources=[{file: x.jsonl, messages_key: answer}]"],
     r"config keys 'task.sources\[0\].messages_key' and 'task.sources\[0\].answer_key' both name the column"),
    # a plug-in name that is a list or a mapping was looked up in the registry: TypeError, unhashable
    (["algorithm.name=[grpo]"], r"config key 'algorithm': unknown algorithm \['grpo'\]; valid algorithms: cispo"),
    (["preference.loss.name={dpo: 1}"], r"config key 'preference.loss': unknown preference loss \{'dpo': 1\}"),
    # a list's items were not checked: steps 'a', 1.5 or 0 were accepted and never traced
    (["trainer.profile_steps=[3, a]"], r"config key 'trainer.profile_steps' expects list\[int\], got list \[3, 'a'\]"),
    (["trainer.profile_steps=[1.5]"], r"config key 'trainer.profile_steps' expects list\[int\], got list \[1.5\]"),
    (["trainer.profile_steps=[0, 2]"], r"config key 'trainer.profile_steps' lists RL steps, which count from 1"),
])
def test_a_structured_key_that_means_nothing_is_refused_naming_it(overrides, match):
    """Each was accepted (and ignored: the embedded task trained on its own problems, keep_best kept nothing), or
    ended in a traceback, or failed only after the model had loaded (an unknown environment)."""
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


@pytest.mark.parametrize("override", ["task.env_options={nope:", "stages=[rl", "rl.reward={name: [", "rl.steps=@"])
def test_an_override_that_is_not_yaml_names_its_key(override, tmp_path, capsys):
    """A shell splits an unquoted `key={a: 1}` at its space: the YAML parser's exception came out as a traceback."""
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"config key '{re.escape(key)}': the value .* is not valid YAML .* quote "
                                          "the whole override"):
        load_config(None, [override])
    assert main(["train", override, "1}", f"out_dir={tmp_path / 'runs'}"]) == 2
    assert f"config key '{key}'" in capsys.readouterr().err and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("override, where", [("rl={1: 2}", "'rl'"), ("task.options={1: 2}", "'task.options'"),
                                             ("rl.reward={name: prm, path: p, 1: 2}", "'rl.reward'"),
                                             ("stages=[{rl: {1: 2}}]", "'stages[0].rl'"),
                                             ("algorithm={name: grpo, null: 2}", "'algorithm'")])
def test_a_key_that_is_not_a_name_is_refused_where_it_sits(override, where, tmp_path):
    """YAML reads `1: 2` with an int key: the merge (str + int) or a plug-in's keyword arguments raised a
    TypeError or an AttributeError; a recipe too."""
    with pytest.raises(ConfigError, match=f"config key {re.escape(where)} has the key .*; keys are names"):
        load_config(None, [override])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("1: 2\n")
    with pytest.raises(ConfigError, match=r"r.yaml: the top level has the key 1 \(int\); keys are names"):
        load_config(str(recipe))
    assert load_config(None, ["task.name=multistep", "task.options={'answer_format_rate': 0.5}"])


def test_the_structured_keys_still_accept_what_means_something():
    assert load_config(None, ["rl.keep_best=true", "rl.steps=10", "rl.eval_every=9"]).rl.keep_best
    assert load_config(None, ["task.env=web", "task.name=web"]).task.env == "web"
    assert load_config(None, ["task.env=calculator", "task.env_options={call_open: '<c>'}"]).task.env_options
    assert load_config(None, ["task.name=file", "task.train_file=x.jsonl", "task.eval_file=y.jsonl"]).task.eval_file
    assert load_config(None, ["task.sources=[{file: x.jsonl}, {task: arithmetic}]"]).task.sources
    assert load_config(None, ["trainer.profile_steps=[1, 3]"]).trainer.profile_steps == [1, 3]
    # the answer as the demonstration is what a row without a completion gets anyway; messages in the prompt column
    assert load_config(None, ["task.name=file", "task.train_file=x.jsonl", "task.completion_key=answer",
                              "task.messages_key=prompt"]).task.completion_key == "answer"


# ---------------------------------------------------------------------------- through the CLI

def cli(args: list[str], tmp_path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "rlpost", "train", *args, f"out_dir={tmp_path / 'runs'}"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_the_cli_refuses_nan_before_the_run_directory_exists(tmp_path):
    out, err = (p := cli(["rollout.temperature=nan", "run_name=x"], tmp_path)).communicate(timeout=300)
    assert p.returncode == 2, (out, err)
    assert "config key 'rollout.temperature' must be >= 0 (0: greedy, scored at temperature 1), got nan" in err
    assert "rlpost: model" not in out and not (tmp_path / "runs").exists()  # no model built, no run directory


@pytest.mark.slow
def test_the_cli_refuses_each_named_value_before_the_run_directory_exists(tmp_path):
    cases = {"clip": (["algorithm.clip_high=nan"], "config key 'algorithm.clip_high' must be > 0, got nan "
                                                   "(algorithm.name=grpo)"),
             "beta": (["algorithm.beta=-1"], "config key 'algorithm.beta' must be >= 0"),
             "steps": (["rl.steps=-1"], "config key 'rl.steps' must be >= 0 (0: no RL stage), got -1"),
             "threads": (["threads=0"], "config key 'threads' must be >= 1 or null, got 0"),
             "heads": (["model.n_head=3", "model.n_embd=16"], "config key 'model.n_head' is 3, which does not divide"),
             "escape": (["run_name=../escaped"], "config key 'run_name' is '../escaped'")}
    procs = {name: cli(args, tmp_path) for name, (args, _) in cases.items()}  # at once: each pays for torch's import
    for name, p in procs.items():
        out, err = p.communicate(timeout=300)
        assert p.returncode == 2 and cases[name][1] in err, (name, out, err)
        assert "rlpost: model" not in out
    assert not (tmp_path / "runs").exists() and not (tmp_path / "escaped").exists()


@pytest.mark.parametrize("args", [["rl.steps=-1"], ["threads=0"], ["algorithm.beta=-1"], ["algorithm.clip_low=-0.5"],
                                  ["model.n_head=3", "model.n_embd=16"], ["eval.temperature=-1"]])
def test_main_returns_2_and_leaves_no_run_directory(args, tmp_path, capsys):
    assert main(["train", *args, f"out_dir={tmp_path / 'runs'}"]) == 2
    assert "config key" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------- accepted values mean something

TINY = ["model.n_layer=1", "model.n_embd=16", "model.n_head=2", "threads=1", "task.num_eval=8", "sft.steps=0",
        "rollout.prompts_per_step=2", "rollout.k=2", "eval.samples_per_prompt=1", "rl.steps=2"]


def test_greedy_rollouts_train_on_finite_log_probs(tmp_path):
    """rollout.temperature=0: the engine reports old_logp at temperature 1, and the trainer and the reference
    score there too (logits / 0 made every one of their log-probs NaN, and every step was skipped). Zeros of
    other keys ride along: each one's documented meaning runs."""
    from rlpost.run import train

    summary = train(load_config(None, [*TINY, "rollout.temperature=0", "eval.temperature=0", "rl.eval_every=0",
                                       "rl.save_every=0", "rl.keep_checkpoints=0", "rollout.top_k=0",
                                       "rollout.max_refill_rounds=0", "trainer.grad_clip=0",
                                       "trainer.weight_decay=0", "log.rollouts_every=0", "algorithm.beta=0.1",
                                       "algorithm.entropy_coef=0.01", f"out_dir={tmp_path}", "run_name=greedy"]))
    assert summary["status"] == "ok"
    lines = [json.loads(x) for x in (tmp_path / "greedy" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if m["stage"] == "rl"]
    assert len(steps) == 2
    for m in steps:
        assert m["train/skipped_nonfinite"] == 0
        assert math.isfinite(m["train/loss"]) and math.isfinite(m["train/grad_norm"]) and m["train/grad_norm"] > 0
        assert m["rollout/logp_mismatch_max"] < 1e-4  # the trainer scores what the engine reported
        assert math.isfinite(m["loss/kl_ref"])
    assert [m["after"] for m in lines if m["stage"] == "eval"] == ["start", "rl"]  # eval_every=0: at the end only
    assert not (tmp_path / "greedy" / "rollouts.jsonl").exists()  # rollouts_every=0: never


def test_every_scorer_scores_at_the_sampling_params_log_prob_temperature():
    """The trainer, the reference and a distillation teacher take the rollout's SamplingParams and score at its
    log-prob temperature: the sampling temperature, 1 for greedy; one that has no tempered distribution
    (negative, NaN, infinite) is refused, naming what scores there."""
    import torch

    from rlpost.config import TrainerConfig
    from rlpost.env.teacher import TeacherReward
    from rlpost.reference import Reference
    from rlpost.rollout.engine import SamplingParams, logp_temperature
    from rlpost.trainer import Trainer

    model = torch.nn.Linear(2, 2)
    scorers = {"trainer": lambda p: Trainer(model, TrainerConfig(lr=1e-3), p),
               "reference": lambda p: Reference(model, None, p),
               "teacher": lambda p: TeacherReward(model, tokenizer=None, params=p)}
    for name, make in scorers.items():
        assert make(SamplingParams(temperature=0)).temperature == 1.0, name  # greedy: the untempered policy
        assert make(SamplingParams(temperature=0.7)).temperature == 0.7, name
        assert make(None).temperature == 1.0, name
        for t in (-1.0, float("nan"), float("inf")):
            with pytest.raises(ValueError, match="logp_temperature"):
                make(SamplingParams(temperature=t))
    assert SamplingParams(temperature=0).logp_temperature == logp_temperature(0) == 1.0
    assert logp_temperature(0.7) == 0.7


def test_train_help_shows_each_numeric_keys_range(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    assert lines["rollout.temperature"].endswith("[>= 0]") and lines["trainer.min_lr_ratio"].endswith("[in [0, 1]]")
    assert "[" not in lines["model.name"].split("'")[-1]  # a string key has no range


def test_a_large_seed_runs_rl_or_is_refused_when_it_loads(tmp_path):
    """seed=1733580000000 (a timestamp in ms) passed the config, ran SFT and evaluation, then stopped at the first RL
    step: the engine's seed, derived by multiplying it, overflowed torch's 64-bit generator ('Overflow when
    unpacking long long'); seed=2**64 failed the same way at start-up."""
    with pytest.raises(ConfigError, match=r"config key 'seed' must be >= 0 \(0: a seed like any other\) and below "
                                          r"2\*\*63 .*got 9223372036854775808"):
        load_config(None, [f"seed={2**63}"])
    args = ["train", "seed=1733580000000", "rl.steps=1", "rollout.prompts_per_step=2", "rollout.k=2",
            "model.n_layer=1", "model.n_embd=16", "model.n_head=1", "task.num_eval=2", "eval.samples_per_prompt=1",
            "stages=[rl]", "threads=1", f"out_dir={tmp_path / 'runs'}", "run_name=r"]
    assert main(args) == 0
    assert json.loads((tmp_path / "runs" / "r" / "summary.json").read_text())["status"] == "ok"
