"""Logging sinks (TensorBoard, W&B offline), a progress bar in every stage, torch.profiler traces of RL steps.

Every run here is a real (tiny) `rlpost train`; the sinks' files are read back with TensorBoard's and W&B's
own formats and compared with metrics.jsonl."""

import glob
import json
import os
import re
import shutil
import struct
import sys

import pytest

from rlpost.config import load_config
from rlpost.run import train
from rlpost.sinks import wandb_api_key_configured

TINY = ["sft.steps=12", "sft.batch_size=16", "rl.steps=4", "rl.eval_every=0", "task.num_eval=12",
        "rollout.prompts_per_step=4", "rollout.k=4", "eval.samples_per_prompt=2", "model.n_layer=2",
        "model.n_embd=32", "model.n_head=2", "threads=1"]


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def odd_length(completion, row):
    """A reward that splits any policy's samples: some right, some wrong (so self-made pairs exist)."""
    return float(len(completion) % 2)


def tensorboard_scalars(run_dir, series):
    """{tag: [(step, value)]} of RUN_DIR/tensorboard/<series>, as TensorBoard shows it (purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run_dir, "tensorboard", series), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def expected(metrics, stage, key):
    return [(m["step"], m[key]) for m in metrics if m["stage"] == stage and m.get(key) is not None]


def test_tensorboard_holds_the_metrics_of_every_stage_under_its_own_step(tmp_path):
    cfg = load_config(None, TINY + [f"out_dir={tmp_path}", "run_name=tb", "log.tensorboard=true"])
    assert train(cfg)["status"] == "ok"
    run_dir = tmp_path / "tb"
    metrics = read_metrics(run_dir)
    assert sorted(os.listdir(run_dir / "tensorboard")) == ["eval_rl", "eval_sft", "rl", "sft"]
    rl, sft = tensorboard_scalars(run_dir, "rl"), tensorboard_scalars(run_dir, "sft")
    for key in ("reward/mean", "train/loss", "train/grad_norm", "rollout/response_len_mean", "time/step"):
        want = expected(metrics, "rl", key)
        assert [s for s, _ in rl[key]] == [1, 2, 3, 4]
        assert rl[key] == [(s, pytest.approx(v, rel=1e-6, abs=1e-6)) for s, v in want], key
    assert sft["sft/nll"] == [(s, pytest.approx(v, rel=1e-6)) for s, v in expected(metrics, "sft", "sft/nll")]
    assert "rollout/logp_mismatch_max" not in rl or all(v == v for _, v in rl["rollout/logp_mismatch_max"])  # no NaN
    assert "after" not in rl and "stage" not in rl  # strings are not scalars
    final = [m for m in metrics if m["stage"] == "eval" and m["after"] == "rl"][0]
    assert tensorboard_scalars(run_dir, "eval_rl")["eval/pass@1"] == [(0, pytest.approx(final["eval/pass@1"]))]


def test_a_resume_purges_the_tensorboard_points_logged_after_the_checkpoint(tmp_path, no_wandb_key):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    args = TINY + [f"out_dir={tmp_path}", "run_name=res", "log.tensorboard=true", "log.wandb=true", "rl.steps=6",
                   "rl.save_every=2", "rl.keep_checkpoints=5"]
    assert train(load_config(None, args))["status"] == "ok"
    run_dir = tmp_path / "res"
    # as if killed after step 6 was logged and before checkpoints/final: the newest checkpoint is step_4
    shutil.rmtree(run_dir / "checkpoints" / "final")
    assert len(expected(read_metrics(run_dir), "rl", "reward/mean")) == 6
    summary = train(load_config(None, args), resume=str(run_dir))
    assert summary["status"] == "ok"
    metrics = read_metrics(run_dir)
    rl = tensorboard_scalars(run_dir, "rl")
    assert [s for s, _ in rl["reward/mean"]] == [1, 2, 3, 4, 5, 6]  # no step twice
    assert rl["reward/mean"] == [(s, pytest.approx(v, abs=1e-6)) for s, v in expected(metrics, "rl", "reward/mean")]
    assert len(tensorboard_scalars(run_dir, "eval_rl")["eval/pass@1"]) == 1
    assert [s for s, _ in tensorboard_scalars(run_dir, "sft")["sft/nll"]] == [0, 11]  # before the checkpoint: kept

    def purges(series):  # the SessionLog START events purge_step writes: steps from there on are dropped
        events = [e for f in sorted(glob.glob(str(run_dir / "tensorboard" / series / "events.*")))
                  for e in EventFileLoader(f).Load()]
        return [e.step for e in events if e.HasField("session_log") and e.session_log.status == 1]

    assert purges("rl") == [5] and purges("eval_rl") == [0] and purges("sft") == []
    # W&B continues the same run: one offline folder per start, both of the run id kept in the run directory
    run_id = (run_dir / "wandb" / "run_id").read_text()
    assert [p.rsplit("-", 1)[1] for p in glob.glob(str(run_dir / "wandb" / "offline-run-*"))] == [run_id, run_id]


def wandb_records(path):
    """The records of a W&B run file (.wandb): a LevelDB-style log of 32 KiB blocks after a 7-byte header, each
    record split into chunks (4-byte checksum, 2-byte length, 1-byte type: full, first, middle, last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B"
    pos, block, part, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        part += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(part)
            out.append(record)
            part = b""
    return out


@pytest.fixture
def no_wandb_key(tmp_path, monkeypatch):
    """No API key anywhere (environment, netrc), and W&B's own folders in tmp_path."""
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    assert not wandb_api_key_configured()


def test_wandb_runs_offline_without_a_key_and_its_history_holds_the_metrics(tmp_path, no_wandb_key):
    cfg = load_config(None, TINY + [f"out_dir={tmp_path}", "run_name=wb", "log.wandb=true",
                                    "log.wandb_project=sinks-test"])
    assert train(cfg)["status"] == "ok"
    run_dir = tmp_path / "wb"
    [offline] = glob.glob(str(run_dir / "wandb" / "offline-run-*"))
    [path] = glob.glob(os.path.join(offline, "run-*.wandb"))
    records = wandb_records(path)
    run = [r.run for r in records if r.WhichOneof("record_type") == "run"][0]
    assert run.run_id == (run_dir / "wandb" / "run_id").read_text() and run.display_name == "wb"
    assert run.project == "sinks-test"
    config = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in run.config.update}
    rl_config = config["rl"].get("value", config["rl"])  # some versions wrap each key in {"value": ...}
    assert rl_config["steps"] == 4 and config["log"].get("value", config["log"])["wandb"] is True
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    metrics = read_metrics(run_dir)
    rl = [h for h in history if "rl/step" in h]
    for key in ("reward/mean", "train/loss"):
        assert [(h["rl/step"], h[f"rl/{key}"]) for h in rl] == [(s, pytest.approx(v)) for s, v in
                                                               expected(metrics, "rl", key)]
    sft = [h for h in history if "sft/step" in h]
    assert [(h["sft/step"], h["sft/sft/nll"]) for h in sft] == [(s, pytest.approx(v)) for s, v in
                                                                 expected(metrics, "sft", "sft/nll")]
    assert any(r.WhichOneof("record_type") == "exit" and r.exit.exit_code == 0 for r in records)


def test_every_stage_shows_a_progress_bar_with_its_total(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    cfg = load_config(None, TINY + [f"out_dir={tmp_path}", "run_name=bars", "task.reward=test_sinks:odd_length",
                                    "preference.enabled=true", "preference.num_prompts=16",
                                    "preference.samples_per_prompt=4", "preference.epochs=2",
                                    "preference.batch_size=8", "reward_model.train=true", "reward_model.pairs=64",
                                    "reward_model.eval_pairs=16", "reward_model.epochs=2",
                                    "reward_model.batch_size=16", "rl.steps=2"])
    assert train(cfg)["status"] == "ok"
    out = capsys.readouterr()
    metrics = read_metrics(tmp_path / "bars")
    examples = [m["data/examples"] for m in metrics if "data/examples" in m][0]
    bars = {"sft": 12, "eval": 12, "preference pairs": 16, "preference/dpo": 2 * -(-examples // 8),
            "reward_model": 2 * (64 // 16), "rl/grpo": 2}
    for desc, total in bars.items():
        assert re.search(rf"(^|\r){re.escape(desc)}: +\d+%\|.*\| \d+/{total} ", out.err, re.M), desc
    assert "rl/grpo: 100%" in out.err and "sft: 100%" in out.err
    assert "step    2 | reward" in out.out  # console lines stay on stdout, whole


def test_profile_steps_write_a_chrome_trace_with_the_roles(tmp_path, capsys):
    cfg = load_config(None, TINY + [f"out_dir={tmp_path}", "run_name=prof", "sft.steps=0", "rl.steps=2",
                                    "trainer.profile_steps=[2]"])
    assert train(cfg)["status"] == "ok"
    path = tmp_path / "prof" / "profile" / "rl_step_2.json"
    assert os.listdir(tmp_path / "prof" / "profile") == ["rl_step_2.json"]
    with open(path) as f:
        trace = json.load(f)
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"rollout", "reward", "reference", "advantages", "train", "sync"} <= names
    assert f"profile: {path}" in capsys.readouterr().out


def test_a_sink_without_its_package_is_refused_before_any_work_naming_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed: `import tensorboard` fails
    cfg = load_config(None, TINY + [f"out_dir={tmp_path}", "run_name=nope", "log.tensorboard=true"])
    with pytest.raises(ImportError, match=r"log.tensorboard=true needs the `tensorboard` package: pip install"):
        train(cfg)
    assert not (tmp_path / "nope").exists()
