"""`--resume` may change the layout keys (micro-batches, gradient checkpointing, the log-prob chunk, packing,
rollout.max_num_seqs, ...): after an out-of-memory error the run finishes with a smaller layout, the change is
announced and kept in the run directory, and the metrics stay those of the uninterrupted run up to float
summation order. Any other change is refused, naming the key and the keys that could change."""

import json
import random
import time
import math
import shutil

import pytest
import torch

import rlpost.run as run_module
from rlpost.checkpoint import list_checkpoints
from rlpost.cli import main
from rlpost.config import Config, load_config
from rlpost.reference import Reference
from rlpost.run import LAYOUT_LOG, resume_changes, resume_config, saved_config, train, training_dropout
from rlpost.schema import layout_keys
from test_resume import SHORT, comparable, wait_or_kill

LAYOUT = ["trainer.micro_batch_size=3", "trainer.gradient_checkpointing=true", "trainer.logprob_chunk=5",
          "trainer.packing=true", "trainer.micro_batch_tokens=40", "rollout.max_num_seqs=5"]
# measured on CPU: float metrics above 1e-4 agree within 8.5e-7 relative; the engine-vs-trainer log-prob mismatch
# metrics, float noise themselves (~5e-7), within 2.4e-7 absolute. The bounds leave room for other BLAS builds.
REL_TOL, ABS_TOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A short run to the end, never interrupted (checkpoints step_2 and final)."""
    tmp = tmp_path_factory.mktemp("layout")
    assert train(load_config(None, SHORT + [f"out_dir={tmp}", "run_name=done"]))["status"] == "ok"
    return tmp / "done"


def killed_after_step_2(finished, run):
    """A copy of the finished run as a kill after step 2's checkpoint leaves it."""
    shutil.copytree(finished, run)
    shutil.rmtree(run / "checkpoints" / "final")
    assert list_checkpoints(run)[-1].name == "step_2"
    return run


def rl_steps(run) -> list[int]:
    return [m["step"] for m in comparable(run) if m["stage"] == "rl"]


def max_difference(a: list[dict], b: list[dict]) -> tuple[float, float]:
    """(largest relative difference of a float metric of magnitude above 1e-4, largest absolute difference) of
    two metrics.jsonl; asserts that both have the same lines, keys and non-float values, and every float pair
    within REL_TOL or ABS_TOL."""
    assert len(a) == len(b), (len(a), len(b))
    rel = absolute = 0.0
    for n, (x, y) in enumerate(zip(a, b), 1):
        assert x.keys() == y.keys(), f"metrics.jsonl line {n}"
        for k in x:
            if isinstance(x[k], float) or isinstance(y[k], float):
                assert math.isclose(x[k], y[k], rel_tol=REL_TOL, abs_tol=ABS_TOL), (n, k, x[k], y[k])
                absolute = max(absolute, abs(x[k] - y[k]))
                if max(abs(x[k]), abs(y[k])) > 1e-4:
                    rel = max(rel, abs(x[k] - y[k]) / max(abs(x[k]), abs(y[k])))
            else:
                assert x[k] == y[k], (n, k, x[k], y[k])
    return rel, absolute


def test_the_layout_keys_are_declared_where_they_live():
    """The keys a resume may change: how the same computation is laid out, nothing that changes what it is."""
    assert set(layout_keys(Config)) == {
        "trainer.micro_batch_size", "trainer.micro_batch_tokens", "trainer.gradient_checkpointing",
        "trainer.logprob_chunk", "trainer.packing", "reference.offload", "rollout.max_num_seqs",
        "rollout.vllm_sleep", "rollout.vllm_gpu_memory_utilization", "preference.micro_batch_size"}
    for numerics in ("trainer.lr", "trainer.precision", "trainer.compile", "trainer.strategy", "model.device",
                     "model.dtype", "rollout.engine", "eval.batch_prompts", "rl.rollout_workers", "seed"):
        assert numerics not in layout_keys(Config)


def test_an_out_of_memory_run_resumed_with_a_smaller_layout_finishes_its_steps(finished, tmp_path, monkeypatch,
                                                                              capsys):
    """The reference runs out of memory at RL step 3 when it scores the whole batch at once; a plain resume runs
    out again, a resume with trainer.micro_batch_size and gradient checkpointing finishes the same RL steps as
    the uninterrupted run, announces the change and keeps it in run.json and config.yaml."""
    real = Reference.__call__
    calls = []

    def out_of_memory_on_a_whole_batch(self, batch):
        calls.append(self.micro_batch_size)
        if len(calls) >= 3 and self.micro_batch_size is None:  # one reference pass per RL step here
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, batch)

    monkeypatch.setattr(Reference, "__call__", out_of_memory_on_a_whole_batch)
    with pytest.raises(torch.OutOfMemoryError, match="out of memory in role 'reference' at RL step 3") as e:
        train(load_config(None, SHORT + [f"out_dir={tmp_path}", "run_name=oom"]))
    assert "`rlpost train --resume RUN trainer.micro_batch_size=N`" in str(e.value)  # the way out, named
    run = tmp_path / "oom"
    assert list_checkpoints(run)[-1].name == "step_2"
    config_before, info_before = (run / "config.yaml").read_text(), (run / "run.json").read_text()
    assert main(["train", "--resume", str(run)]) == 1  # the same layout: out of memory again
    assert "out of memory in role 'reference' at RL step 3" in capsys.readouterr().err

    # overrides alone: they apply to the run's saved config
    assert main(["train", "--resume", str(run), "trainer.micro_batch_size=4",
                 "trainer.gradient_checkpointing=true"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    line = [x for x in out.splitlines() if "layout keys changed" in x]
    assert line == ["rlpost: resumed from step_2 with layout keys changed: trainer.gradient_checkpointing: False -> "
                    "True, trainer.micro_batch_size: None -> 4; the same computation laid out differently in "
                    "memory, so the run is no longer guaranteed bit-identical to an uninterrupted one (float "
                    "summation order)"], out
    assert calls[-1] == 4
    assert rl_steps(run) == rl_steps(finished) == [1, 2, 3, 4]
    assert (run / "checkpoints" / "final").is_dir()
    assert json.loads((run / "summary.json").read_text())["status"] == "ok"
    max_difference(comparable(run), comparable(finished))

    # recorded: run.json's entry, config.yaml as the resumed run's config (with a comment saying why)
    info = json.loads((run / "run.json").read_text())
    assert {k: v for k, v in info.items() if k != LAYOUT_LOG} == json.loads(info_before)
    (entry,) = info[LAYOUT_LOG]
    assert entry["checkpoint"] == "step_2"
    assert entry["changes"] == {"trainer.gradient_checkpointing": [False, True], "trainer.micro_batch_size": [None, 4]}
    saved = saved_config(str(run))
    assert (saved.trainer.micro_batch_size, saved.trainer.gradient_checkpointing) == (4, True)
    config = (run / "config.yaml").read_text()
    assert config.startswith("# ") and "layout keys changed: trainer.gradient_checkpointing" in config.splitlines()[0]
    assert config.replace("micro_batch_size: 4", "micro_batch_size: null").replace(
        "gradient_checkpointing: true", "gradient_checkpointing: false").split("\n", 1)[1] == config_before


def test_a_resume_that_changes_anything_else_is_refused_naming_the_key(finished, tmp_path, capsys):
    """A non-layout key (the learning rate, the seed, the algorithm, the precision, the device), alone or beside
    layout keys: refused before any work, naming it and listing the keys a resume may change; nothing written."""
    run = killed_after_step_2(finished, tmp_path / "run")
    files = {name: (run / name).read_text() for name in ("config.yaml", "run.json", "metrics.jsonl")}
    for change, named in [("trainer.lr=0.1", "trainer.lr: 0.0002 -> 0.1"), ("seed=7", "seed: 0 -> 7"),
                          ("algorithm={name: rloo}", "algorithm: {'name': 'grpo'"),
                          ("trainer.precision=bf16", "trainer.precision: 'fp32' -> 'bf16'"),
                          ("model.device=cpu", "model.device: 'auto' -> 'cpu'")]:
        for extra in ([], ["trainer.micro_batch_size=2"]):
            assert main(["train", "--resume", str(run), change, *extra]) == 2, change
            err = capsys.readouterr().err
            assert named in err and "in keys that change what the run computes" in err, err
            assert "trainer.micro_batch_size: None" not in err  # only the refused keys are listed
            assert "may change only the keys that lay the same computation out in memory: " in err
            assert "trainer.micro_batch_size" in err.split("in memory: ")[1]
    # a recipe with the run's settings and a changed seed: the same refusal (recipe + overrides are the config)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("seed: 3\n")
    assert main(["train", "--resume", str(run), str(recipe), *SHORT]) == 2
    assert "seed: 0 -> 3" in capsys.readouterr().err
    # threads: the resumed process's own (not part of what is computed, as out_dir/run_name); no layout change
    assert saved_config(str(run)).threads is None
    cfg, changes = resume_config(str(run), load_config(None, ["threads=1"], base=saved_config(str(run))))
    assert (cfg.threads, changes) == (1, {})
    # through the library too
    cfg = saved_config(str(run))
    cfg.trainer.lr = 0.1
    with pytest.raises(ValueError, match=r"trainer.lr: 0.0002 -> 0.1\na resume may change only"):
        train(cfg, resume=str(run))
    assert {name: (run / name).read_text() for name in files} == files


def test_an_override_to_a_changed_default_is_a_change_a_recipe_that_leaves_it_is_not(tmp_path, capsys):
    """A run saved with a key at its old default (trainer.packing=false, as every run started before 'auto' was
    the default): `--resume RUN trainer.packing=auto` asks for the new value and gets it, announced as a layout
    change; a recipe that leaves the key out (its new default, from Config()) keeps the run's value."""
    started = SHORT + [f"out_dir={tmp_path}", "run_name=old", "trainer.packing=false"]
    assert train(load_config(None, started))["status"] == "ok"
    run = killed_after_step_2(tmp_path / "old", tmp_path / "run")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("{}\n")
    assert main(["train", "--resume", str(run), str(recipe), *SHORT]) == 0, capsys.readouterr().err
    assert "layout keys changed" not in capsys.readouterr().out
    assert saved_config(str(run)).trainer.packing is False
    shutil.rmtree(run / "checkpoints" / "final")
    assert main(["train", "--resume", str(run), "trainer.packing=auto"]) == 0, capsys.readouterr().err
    assert "layout keys changed: trainer.packing: False -> 'auto';" in capsys.readouterr().out
    assert saved_config(str(run)).trainer.packing == "auto"


def test_a_layout_resume_keeps_the_metrics_and_the_next_resume_compares_with_it(finished, tmp_path, capsys):
    """Nothing runs out of memory: a resume after step 2 with every layout key its stages read on the CPU changed
    (reference.offload is refused there, vLLM's sleep is vLLM's) writes the uninterrupted run's metrics within
    float tolerance (REL_TOL) and the same number of lines. config.yaml is then the resumed run's: a plain resume
    keeps the new layout (no change announced), the checkpoint written before the change stays resumable, and a
    layout key edited into config.yaml by hand is still refused."""
    run = killed_after_step_2(finished, tmp_path / "run")
    assert main(["train", "--resume", str(run), *LAYOUT]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "layout keys changed: rollout.max_num_seqs: 0 -> 5, trainer.gradient_checkpointing: False -> True, " \
           "trainer.logprob_chunk: None -> 5, trainer.micro_batch_size: None -> 3, " \
           "trainer.micro_batch_tokens: None -> 40, trainer.packing: 'auto' -> True;" in out, out
    rel, absolute = max_difference(comparable(run), comparable(finished))
    with capsys.disabled():  # the numbers the tolerance comment above states (pytest -s shows them)
        print(f"\nlayout resume vs uninterrupted: float metrics within {rel:.1e} relative, {absolute:.1e} absolute")
    assert [c.name for c in list_checkpoints(run)] == [c.name for c in list_checkpoints(finished)]

    # the next resume, from the checkpoint written before the change, compares with the new config.yaml
    shutil.rmtree(run / "checkpoints" / "final")
    assert main(["train", "--resume", str(run)]) == 0, capsys.readouterr().err
    assert "layout keys changed" not in capsys.readouterr().out
    assert saved_config(str(run)).trainer.micro_batch_size == 3
    max_difference(comparable(run), comparable(finished))
    assert len(json.loads((run / "run.json").read_text())[LAYOUT_LOG]) == 1

    # giving a layout key back its first value is a change again, against the latest config
    assert main(["train", "--resume", str(run), "trainer.micro_batch_size=null"]) == 0, capsys.readouterr().err
    assert "layout keys changed: trainer.micro_batch_size: 3 -> None;" in capsys.readouterr().out
    assert len(json.loads((run / "run.json").read_text())[LAYOUT_LOG]) == 2

    # config.yaml edited by hand is not a resume's change: every checkpoint, those written under the configs
    # before the layout changes too, was written under another config
    text = (run / "config.yaml").read_text()
    for edit in (("logprob_chunk: 5", "logprob_chunk: 7"), ("lr: 0.0002", "lr: 0.001")):
        assert edit[0] in text
        (run / "config.yaml").write_text(text.replace(*edit))
        for c in reversed(list_checkpoints(run)[-2:]):  # final (written before the last change), then step_2
            assert main(["train", "--resume", str(run)]) == 1
            assert f"checkpoint {c.path} was written under another config" in capsys.readouterr().err
            shutil.move(c.path, tmp_path / c.name)
        for name in ("step_2", "final"):
            shutil.move(tmp_path / name, run / "checkpoints" / name)


@pytest.mark.slow
def test_a_sharded_run_resumes_on_two_ranks_with_a_smaller_micro_batch(tmp_path):
    """trainer.strategy=fsdp2 on 2 ranks, resumed from step 2's shards with trainer.micro_batch_size halved and
    gradient checkpointing: every rank takes the new layout (rank 0 alone announces and records it, after every
    rank read the saved config), and the run ends with the uninterrupted one's RL metrics within tolerance."""
    from test_dcp import _resume_copy, _rl_lines, _train

    out = tmp_path / "runs"
    args = ["train", "trainer.strategy=fsdp2", "rl.weight_sync=copy", f"out_dir={out}", "run_name=dcp",
            "sft.steps=10", "sft.batch_size=16", "rl.steps=4", "rl.eval_every=0", "rl.save_every=2",
            "rollout.prompts_per_step=4", "rollout.k=4", "task.num_eval=8", "eval.samples_per_prompt=1",
            "model.n_layer=2", "model.n_embd=32", "model.n_head=2", "trainer.micro_batch_size=6", "threads=1"]
    _train(args, nproc=2)
    run = _resume_copy(out / "dcp", "smaller", "step_2")
    done = _train(["train", "--resume", str(run), "trainer.micro_batch_size=3",
                   "trainer.gradient_checkpointing=true"], nproc=2)
    assert done.stdout.count("layout keys changed: trainer.gradient_checkpointing: False -> True, "
                             "trainer.micro_batch_size: 6 -> 3;") == 1, done.stdout
    assert len(json.loads((run / "run.json").read_text())[LAYOUT_LOG]) == 1
    assert saved_config(str(run)).trainer.micro_batch_size == 3
    assert [x["step"] for x in _rl_lines(run)] == [1, 2, 3, 4]
    max_difference(_rl_lines(run), _rl_lines(out / "dcp"))


def test_a_kill_between_the_run_json_and_config_yaml_writes_of_a_second_layout_resume_leaves_it_resumable(
        finished, tmp_path, monkeypatch, capsys):
    """Two layout resumes from step_2 in a row, the second killed after it wrote run.json and before config.yaml:
    config.yaml is the first one's, and step_2 (written under the config before both) still resumes under it."""
    run = killed_after_step_2(finished, tmp_path / "run")
    assert main(["train", "--resume", str(run), "trainer.micro_batch_size=3"]) == 0, capsys.readouterr().err
    shutil.rmtree(run / "checkpoints" / "final")  # killed again before its next checkpoint
    config = (run / "config.yaml").read_text()

    def killed_before_config_yaml(path, lines):
        if path.endswith("config.yaml"):
            raise KeyboardInterrupt
        real(path, lines)

    real = run_module.replace_file
    monkeypatch.setattr(run_module, "replace_file", killed_before_config_yaml)
    assert main(["train", "--resume", str(run), "trainer.micro_batch_size=2"]) == 130
    monkeypatch.setattr(run_module, "replace_file", real)
    assert len(json.loads((run / "run.json").read_text())[LAYOUT_LOG]) == 2 and (run / "config.yaml").read_text() \
        == config
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0, capsys.readouterr().err
    assert "resuming from" in capsys.readouterr().out
    assert saved_config(str(run)).trainer.micro_batch_size == 3
    max_difference(comparable(run), comparable(finished))


@pytest.mark.parametrize("name, text, says", [
    ("run.json", "{bad", "run.json is not a JSON object (Expecting property name"),
    ("run.json", "[1]", "run.json is not a JSON object ([1])"),
    ("config.yaml", "seed: [unclosed\n", "config.yaml is not the run's config (a YAML mapping of config keys; not "
                                         "valid YAML"),
    ("config.yaml", "# 2026: resumed from step_2 with layout keys changed\n", "config.yaml is not the run's config "
                                                                              "(a YAML mapping of config keys; got "
                                                                              "NoneType)"),
    ("config.yaml", "- seed\n", "got list"),
    ("run.json", {LAYOUT_LOG: {"a": 1}}, f"run.json: '{LAYOUT_LOG}' is not a list of the entries"),
    ("run.json", {LAYOUT_LOG: [{"changes": 3}]}, f"run.json: '{LAYOUT_LOG}' is not a list of the entries"),
    ("run.json", {LAYOUT_LOG: 5}, "(each with changes, checkpoint, config_sha256, resumed_config_sha256, time)")])
def test_a_damaged_run_json_or_config_yaml_is_named(finished, tmp_path, capsys, name, text, says):
    """A resume, with layout keys or without, of a run directory whose run.json or config.yaml is damaged (run.json's
    record of layout changes too): exit 2, one line naming the file and what to do, nothing written (no
    traceback)."""
    run = killed_after_step_2(finished, tmp_path / "run")
    if isinstance(text, dict):
        text = json.dumps({**json.loads((run / name).read_text()), **text})
    (run / name).write_text(text)
    files = {p.name: p.read_text() for p in run.iterdir() if p.is_file()}
    for extra in ([], ["trainer.micro_batch_size=2"]):
        assert main(["train", "--resume", str(run), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"rlpost: error: --resume: {run / name}") and says in err, err
        assert "restore it from a copy of the run directory" in err
        assert {p.name: p.read_text() for p in run.iterdir() if p.is_file()} == files


@pytest.mark.parametrize("override, says", [
    ("trainer.micro_batch_size=abc", "config key 'trainer.micro_batch_size' expects int | None, got str 'abc'"),
    ("trainer.micro_batch_size=0", "config key 'trainer.micro_batch_size' must be >= 1 or null, got 0"),
    ("trainer.micro_batch_tokens=2.5", "config key 'trainer.micro_batch_tokens' expects int | None, got float"),
    ("trainer.packing=maybe", "config key 'trainer.packing' is 'maybe'; valid values: auto, true, false"),
    ("trainer.gradient_checkpointing=3", "config key 'trainer.gradient_checkpointing' expects bool, got int 3"),
    ("rollout.max_num_seqs=-2", "config key 'rollout.max_num_seqs' must be >= 0"),
    ("trainer.micro_batchsize=3", "unknown config key 'trainer.micro_batchsize'")])
def test_a_bad_layout_override_is_a_config_error_naming_the_key_with_nothing_written(finished, tmp_path, capsys,
                                                                                     override, says):
    run = killed_after_step_2(finished, tmp_path / "run")
    files = {p.name: p.read_text() for p in run.iterdir() if p.is_file()}
    assert main(["train", "--resume", str(run), "trainer.logprob_chunk=4", override]) == 2
    assert says in capsys.readouterr().err
    assert {p.name: p.read_text() for p in run.iterdir() if p.is_file()} == files


@pytest.mark.skipif(torch.cuda.is_available(), reason="the policy runs on the GPU: reference.offload is a layout key")
def test_reference_offload_on_a_cpu_resume_is_refused_before_anything_is_written(finished, tmp_path, capsys):
    """reference.offload=true on a resume whose policy runs on the CPU: refused at once (exit 2, naming the key),
    not recorded as the run's new config and then failing when the RL stage builds the reference."""
    run = killed_after_step_2(finished, tmp_path / "run")
    files = {p.name: p.read_text() for p in run.iterdir() if p.is_file()}
    assert main(["train", "--resume", str(run), "reference.offload=true"]) == 2
    err = capsys.readouterr().err
    assert "config key 'reference.offload' is true, but the policy runs on the CPU (model.device=auto)" in err, err
    assert {p.name: p.read_text() for p in run.iterdir() if p.is_file()} == files


def test_under_dropout_only_the_keys_that_leave_the_training_forward_may_change(finished, tmp_path, capsys):
    """With dropout in training each micro-batch draws its own masks: micro-batches, packing and gradient
    checkpointing (which turns shared-prompt scoring off) change the gradients, so a resume refuses them, whether
    the dropout is in the config (LoRA's, before any work) or in the model (a checkpoint's attention dropout,
    once the policy is built); the log-prob chunk and the rollout's keys still change."""
    lora = load_config(None, SHORT + ["model.lora.r=4", "model.lora.dropout=0.3"])
    BOOLEAN = ("trainer.packing", "trainer.gradient_checkpointing")
    for key in ("trainer.micro_batch_size", "trainer.micro_batch_tokens", "trainer.packing",
                "trainer.gradient_checkpointing", "preference.micro_batch_size"):
        given = load_config(None, SHORT + ["model.lora.r=4", "model.lora.dropout=0.3",
                                           f"{key}={'true' if key in BOOLEAN else 3}"])
        with pytest.raises(ValueError, match=rf"trains with dropout \(model.lora.dropout=0.3\), .*: {key} would "
                                             "change the gradients"):
            resume_changes(lora, given, "RUN")
    given = load_config(None, SHORT + ["model.lora.r=4", "model.lora.dropout=0.3", "trainer.logprob_chunk=3",
                                       "rollout.max_num_seqs=2"])
    assert set(resume_changes(lora, given, "RUN")) == {"trainer.logprob_chunk", "rollout.max_num_seqs"}
    no_dropout = load_config(None, SHORT + ["model.lora.r=4", "trainer.micro_batch_size=3"])
    assert set(resume_changes(load_config(None, SHORT + ["model.lora.r=4"]), no_dropout, "RUN")) == {
        "trainer.micro_batch_size"}

    # a gpt_mini checkpoint with attention dropout (GPT-2's attn_pdrop) as the policy
    model = tmp_path / "model"
    shutil.copytree(finished / "checkpoints" / "final", model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "attn_pdrop": 0.2}))
    args = [a for a in SHORT if not a.startswith("model.")] + [f"model.name={model}", f"out_dir={tmp_path}",
                                                                  "run_name=dropout"]
    assert train(load_config(None, args))["status"] == "ok"
    run = tmp_path / "dropout"
    shutil.rmtree(run / "checkpoints" / "final")
    # (metrics.jsonl and rollouts.jsonl are cut back to step_2's lines, as by any resume: the model is built then)
    files = {p.name: p.read_text() for p in run.iterdir() if p.is_file() and p.suffix != ".jsonl"}
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "trainer.micro_batch_size=3"]) == 1
    err = capsys.readouterr().err
    assert "the policy trains with dropout (transformer.h.0.attn.dropout=0.2)" in err, err
    assert "trainer.micro_batch_size would change the gradients" in err
    assert {p.name: p.read_text() for p in run.iterdir() if p.is_file() and p.suffix != ".jsonl"} == files
    assert main(["train", "--resume", str(run), "trainer.logprob_chunk=3"]) == 0, capsys.readouterr().err
    assert "layout keys changed: trainer.logprob_chunk: None -> 3;" in capsys.readouterr().out


def test_training_dropout_finds_every_kind_of_dropout():
    assert training_dropout(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.0))) is None
    assert training_dropout(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1))) == "1: p=0.1"
    attention = torch.nn.Module()
    attention.attention_dropout = 0.25  # transformers' Llama-style attention: a probability, no module
    assert training_dropout(torch.nn.ModuleDict({"attn": attention})) == "attn.attention_dropout=0.25"


@pytest.mark.slow
def test_sigkills_while_resumes_change_the_layout_back_and_forth_leave_a_consistent_run(tmp_path):
    """Runs killed at random moments, each resume changing trainer.micro_batch_size (3, then back to the
    default, ...) and so rewriting run.json and config.yaml: kills land in the start-up, the record, RL steps and
    checkpoint writes. Each run resumes to its end with the uninterrupted run's RL steps and metrics within
    tolerance, config.yaml its last resume's layout, and run.json an entry per recorded change. A run that ends
    before the 12th kill is checked, and the kills go on in a fresh one."""
    from test_resume import run_to_end, start

    args = SHORT[:-1] + ["rl.steps=10", "rl.save_every=1", "log.rollouts_every=1"]
    t0 = time.time()
    run_to_end(args + [f"out_dir={tmp_path}", "run_name=ref"], tmp_path)
    duration = time.time() - t0
    rng, kills, resumes, finished, size = random.Random(0), 0, 0, 0, {}

    def launch(run):
        nonlocal resumes
        if not (run / "run.json").exists():
            return start(args + [f"out_dir={tmp_path}", f"run_name={run.name}"], tmp_path)
        resumes += 1
        size[run] = "null" if size.get(run) == "3" else "3"
        return start(["--resume", str(run), f"trainer.micro_batch_size={size[run]}"], tmp_path)

    def check(run):
        assert json.loads((run / "summary.json").read_text())["status"] == "ok"
        assert rl_steps(run) == rl_steps(tmp_path / "ref") == list(range(1, 11))
        max_difference(comparable(run), comparable(tmp_path / "ref"))
        assert saved_config(str(run)).trainer.micro_batch_size == (3 if size.get(run) == "3" else None)
        entries = json.loads((run / "run.json").read_text()).get(LAYOUT_LOG, [])
        assert all(set(e["changes"]) == {"trainer.micro_batch_size"} for e in entries)
        return len(entries)

    changes = 0
    while kills < 12:
        run = tmp_path / f"run{finished}"
        p = launch(run)
        if wait_or_kill(p, rng.uniform(0.3, 0.9) * duration):
            kills += 1
            continue
        assert p.returncode == 0, p.communicate()[0]
        changes += check(run)
        finished += 1
    run = tmp_path / f"run{finished}"
    if (run / "run.json").exists():  # the last one killed: resumed (with its layout change) to its end
        p = launch(run)
        assert p.wait(timeout=600) == 0, p.communicate()[0]
        changes += check(run)
        finished += 1
    print(f"\n{kills} SIGKILLs, {resumes} resumes, {changes} layout changes recorded, {finished} finished run(s) "
          "within tolerance of the uninterrupted one")
