"""Checkpoints and resume: a run killed with SIGKILL (or stopped by SIGTERM) and resumed writes the same
metrics.jsonl (timings aside) and the same final weights as a run never interrupted; bad resumes are refused.

Every run here is a real `rlpost train` process (`python -m rlpost.cli`), killed for real."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from rlpost.checkpoint import CheckpointError, list_checkpoints
from rlpost.cli import main
from rlpost.run import saved_config
from rlpost.runlog import ResumeError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["sft.steps=24", "sft.batch_size=32", "sft.save_every=8", "rl.steps=8", "rl.eval_every=3",
        "rl.save_every=2", "rl.keep_checkpoints=2", "task.num_eval=30", "rollout.prompts_per_step=4",
        "rollout.k=4", "eval.samples_per_prompt=2", "model.n_layer=2", "model.n_embd=32", "model.n_head=2",
        "threads=1"]


def command(*args):
    return [sys.executable, "-m", "rlpost.cli", "train", *args]


def run_env(**extra: str) -> dict:
    """The environment a test's run starts in, with `extra` variables."""
    # tests/ too: a resumed run imports the reward function its saved config names (test_resume:...)
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.path.join(ROOT, 'tests')}", "TQDM_DISABLE": "1",
            "HF_HUB_OFFLINE": "1", **extra}


def start(args, tmp_path):
    return subprocess.Popen(command(*args), cwd=tmp_path, env=run_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_or_kill(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait up to `timeout` seconds for `proc` to end; if it has not, SIGKILL it and reap it (none of its pipes is
    read). True when it had to be killed. (Here, not in conftest: runs import this module for their rewards, and
    conftest would set their torch thread count.)"""
    try:
        proc.wait(timeout=timeout)
        return False
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return True


def run_to_end(args, tmp_path) -> subprocess.CompletedProcess:
    p = start(args, tmp_path)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    return out


def comparable(run_dir) -> list[dict]:
    """metrics.jsonl without its wall-clock fields and memory / GPU measurements."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    return [{k: v for k, v in m.items()
             if not (k.startswith(("time/", "time_share/", "mem/", "gpu/")) or k.endswith("tokens_per_s"))}
            for m in lines]


def final_weights(run_dir):
    return load_file(os.path.join(run_dir, "checkpoints", "final", "model.safetensors"))


def same(x, y) -> bool:
    """Equal, tensors and arrays element by element (bit for bit), through dicts, lists and tuples."""
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        return isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)
    if type(x).__module__ == "numpy" or type(y).__module__ == "numpy":
        import numpy as np

        return bool(np.array_equal(x, y))
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
        return type(x) is type(y) and len(x) == len(y) and all(same(p, q) for p, q in zip(x, y))
    return x == y


def assert_same_checkpoints(a, b) -> list[str]:
    """Every checkpoint both runs hold is the same: its weights, its state (optimizer, counters, random streams,
    the run's part) and its metadata (the summary without its run directory and timings). Returns their names."""
    both = {c.name: c for c in list_checkpoints(a)}
    pairs = [(both[c.name], c) for c in list_checkpoints(b) if c.name in both]
    assert pairs

    def strip(meta):  # the state file is compared loaded (its pickle need not be byte-equal); the run's id and
        # config digest name the run, and metrics.jsonl's digest covers its timings (compared line by line apart)
        meta = {k: v for k, v in meta.items() if k not in ("run_id", "config_sha256", "metrics_sha256")}
        return {**meta, "sha256": {k: v for k, v in meta["sha256"].items() if k != "rlpost_state.pt"},
                "summary": {k: v for k, v in meta["summary"].items()
                            if k not in ("run_dir", "wall_seconds", "status")}}

    for x, y in pairs:
        assert strip(x.meta) == strip(y.meta), x.name
        assert same(x.load_state(), y.load_state()), x.name
        if os.path.isfile(os.path.join(x.path, "model.safetensors")):
            wa, wb = (load_file(os.path.join(c.path, "model.safetensors")) for c in (x, y))
            assert same(wa, wb), x.name
    return [x.name for x, _ in pairs]


def resume_after_step_2(ref, run) -> list[str]:
    """Copy finished run `ref` to `run` as a kill after step 2's checkpoint leaves it, resume it in this process
    and check it ends as `ref` did (metrics, rollouts); returns the checkpoints both hold (assert_same_checkpoints)."""
    from rlpost.run import train

    shutil.copytree(ref, run)
    for c in list_checkpoints(run):
        if c.name != "step_2":
            shutil.rmtree(c.path)
    assert train(saved_config(str(run)), resume=str(run))["status"] == "ok"
    assert comparable(run) == comparable(ref)
    assert (run / "rollouts.jsonl").read_text() == (ref / "rollouts.jsonl").read_text()
    return assert_same_checkpoints(ref, run)


def assert_same_run(a, b):
    """Runs `a` and `b` wrote the same metrics.jsonl (line by line, timings aside), the same checkpoints where
    both hold one, and the same final weights and held-out numbers."""
    ma, mb = comparable(a), comparable(b)
    assert len(ma) == len(mb), (len(ma), len(mb))
    for n, (x, y) in enumerate(zip(ma, mb), 1):
        assert x == y, f"metrics.jsonl line {n}"
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert_same_checkpoints(a, b)
    sa, sb = (json.load(open(os.path.join(d, "summary.json"))) for d in (a, b))
    for key in ("pass@1_sft", "pass@1_rl", "status"):
        assert sa.get(key) == sb.get(key)


def wait_for(predicate, proc, timeout=300):
    t0 = time.time()
    while not predicate():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.time() - t0 < timeout
        time.sleep(0.05)


def signal_when(tmp_path, name: str, checkpoint: str, sig):
    """Start run `name`; once checkpoints/<checkpoint> exists, send it `sig`. Returns (run dir, process)."""
    run = tmp_path / name
    p = start(TINY + [f"out_dir={tmp_path}", f"run_name={name}"], tmp_path)
    wait_for(lambda: (run / "checkpoints" / checkpoint).is_dir(), p)
    p.send_signal(sig)
    return run, p


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """The same run, never interrupted."""
    tmp = tmp_path_factory.mktemp("reference")
    run_to_end(TINY + [f"out_dir={tmp}", "run_name=ref"], tmp)
    return tmp / "ref"


def kill_if_asked() -> None:
    """SIGKILL this process (a run, from inside its reward) once the folder in RLPOST_TEST_KILL_AFTER exists."""
    folder = os.environ.get("RLPOST_TEST_KILL_AFTER")
    if folder and os.path.isdir(folder):
        os.kill(os.getpid(), signal.SIGKILL)


def killed_run(args, tmp_path, after) -> subprocess.CompletedProcess:
    """Run `rlpost train args` (task.reward one of this file's ..._that_kills_its_run) in `tmp_path` until its
    reward SIGKILLs it, at the first sample it scores once checkpoint folder `after` exists; the test fails
    unless it ended so."""
    p = subprocess.run(command(*args), cwd=tmp_path, env=run_env(RLPOST_TEST_KILL_AFTER=str(after)),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == -signal.SIGKILL, p.stdout + p.stderr
    return p


def reward_that_kills_its_run(completion: str, row: dict) -> float:
    """The task's own reward, which SIGKILLs its own process at the first sample it scores once the folder
    in RLPOST_TEST_KILL_AFTER exists (`killed_run`): a kill at a fixed point of the run (step 5's rollout, right
    after step 4's checkpoint), whatever the speed of the machine. Without the variable it only scores."""
    from rlpost.tasks import answer_match

    kill_if_asked()
    return answer_match(completion, row["answer"])


def odd_length(completion: str, row: dict) -> float:
    """An eval reward whose pass@1 moves from step to step on a tiny model that answers nothing right (so
    rl.keep_best has a best to find): 1 for a completion of odd length."""
    return float(len(completion) % 2)


def test_sigkill_mid_rl_then_resume_is_bit_identical(reference_run, tmp_path):
    run = tmp_path / "killed"
    killed_run([*TINY, f"out_dir={tmp_path}", "run_name=killed", "task.reward=test_resume:reward_that_kills_its_run"],
               tmp_path, run / "checkpoints" / "step_4")
    assert not (run / "checkpoints" / "final").exists() and not (run / "checkpoints" / "step_6").exists()
    out = run_to_end(["--resume", str(run)], tmp_path)
    assert "resuming from" in out and "step_4" in out, out
    assert_same_run(reference_run, run)
    steps = sorted(c.name for c in list_checkpoints(run) if c.name.startswith("step_"))
    assert steps == ["step_4", "step_6"]  # rl.keep_checkpoints=2; final supersedes nothing else
    assert not any(c.name.startswith("sft_step_") for c in list_checkpoints(run))


def odd_length_that_kills_its_run(completion: str, row: dict) -> float:
    """`odd_length`, killing its run as `reward_that_kills_its_run` does."""
    kill_if_asked()
    return odd_length(completion, row)


def best_weights(run_dir):
    return load_file(os.path.join(run_dir, "checkpoints", "best", "model.safetensors"))


def test_keep_best_writes_the_best_evaluation_and_a_resume_compares_with_the_same_best(tmp_path):
    """rl.keep_best: checkpoints/best is the policy of the step with the best held-out pass@1 (the first of
    equals), and a run killed after that best, resumed, keeps it (the best so far is in the stage's state), where
    a run that forgot it would take the next, lower, evaluation as the best."""
    keep = TINY + ["rl.eval_every=2", "rl.keep_checkpoints=0", "rl.keep_best=true", "trainer.lr=0.01"]
    run_to_end(keep + ["task.reward=test_resume:odd_length", f"out_dir={tmp_path}", "run_name=ref"], tmp_path)
    ref = tmp_path / "ref"
    evals = {m["step"]: m["eval/pass@1"] for m in comparable(ref) if m["stage"] == "rl" and "eval/pass@1" in m}
    assert sorted(evals) == [2, 4, 6]  # (step 8 is the end-of-RL evaluation's)
    best = max(evals, key=lambda s: (evals[s], -s))
    summary = json.loads((ref / "summary.json").read_text())
    assert (summary["best_step"], summary["best_pass@1"]) == (best, evals[best])
    step_weights = load_file(os.path.join(ref, "checkpoints", f"step_{best}", "model.safetensors"))
    assert same(best_weights(ref), step_weights)
    # the kill comes after the best's checkpoint and before a lower evaluation: else this proves nothing
    assert best <= 4 and evals[6] < evals[best], evals
    run = tmp_path / "killed"
    killed_run([*keep, f"out_dir={tmp_path}", "run_name=killed",
                "task.reward=test_resume:odd_length_that_kills_its_run"], tmp_path, run / "checkpoints" / "step_4")
    assert not (run / "checkpoints" / "step_6").exists()
    run_to_end(["--resume", str(run)], tmp_path)
    assert_same_run(ref, run)
    assert same(best_weights(run), best_weights(ref))
    resumed = json.loads((run / "summary.json").read_text())
    assert (resumed["best_step"], resumed["best_pass@1"]) == (best, evals[best])


def test_keep_best_without_evaluations_is_refused():
    from rlpost.config import load_config
    from rlpost.schema import ConfigError

    with pytest.raises(ConfigError, match="rl.keep_best .* rl.eval_every=0 runs none"):
        load_config(None, ["rl.keep_best=true", "rl.eval_every=0"])
    assert load_config(None, ["rl.keep_best=true", "rl.eval_every=0", "rl.steps=0"]).rl.keep_best


def test_sigterm_writes_a_checkpoint_and_the_resume_finishes_the_same_run(reference_run, tmp_path):
    run, p = signal_when(tmp_path, "termed", "sft", signal.SIGTERM)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 143, out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"].startswith("interrupted (SIGTERM)")
    newest = list_checkpoints(run)[-1]  # SFT and RL checkpoint where they stop; an evaluation is redone on resume
    assert newest.meta["stage_name"] in ("sft", "rl") and newest.meta["metrics_lines"] <= len(comparable(run))
    run_to_end(["--resume", str(run)], tmp_path)
    assert_same_run(reference_run, run)


def test_a_half_written_checkpoint_is_never_loaded(reference_run, tmp_path):
    """A kill in mid-write leaves a .tmp- folder: the resume ignores it and starts from the one before."""
    run, p = signal_when(tmp_path, "partial", "step_2", signal.SIGKILL)
    p.wait()
    newest = list_checkpoints(run)[-1]
    fake = run / "checkpoints" / ".tmp-step_99"
    fake.mkdir()
    (fake / "model.safetensors").write_bytes(b"half")
    out = run_to_end(["--resume", str(run)], tmp_path)
    assert f"resuming from {newest.path}" in out and not fake.exists()
    assert_same_run(reference_run, run)


def test_bad_resumes_are_refused_and_change_nothing(tmp_path, capsys):
    args = TINY[:-1] + ["sft.steps=8", "rl.steps=2", "rl.eval_every=0", f"out_dir={tmp_path}", "run_name=done"]
    assert main(["train", *args]) == 0
    run = tmp_path / "done"
    before = (run / "metrics.jsonl").read_text()
    # a changed config: refused, naming the key
    assert main(["train", "--resume", str(run), *args, "trainer.lr=0.1"]) == 2
    assert "trainer.lr: 0.0002 -> 0.1" in capsys.readouterr().err
    # not a run directory / another kind of run
    with pytest.raises(ResumeError, match="not an rlpost run directory"):
        saved_config(str(tmp_path))
    (run / "run.json").write_text(json.dumps({"kind": "rm"}))
    assert main(["train", "--resume", str(run)]) == 2
    assert "is a `rlpost rm` run" in capsys.readouterr().err
    (run / "run.json").write_text(json.dumps({"id": "x"}))  # said "is a `rlpost None` run"
    assert main(["train", "--resume", str(run)]) == 2
    assert "run.json names no 'kind' (the command that made the run)" in capsys.readouterr().err
    (run / "run.json").write_text(json.dumps({"kind": "train"}))
    # a corrupt checkpoint: refused, naming the file
    ckpt = list_checkpoints(run)[-1]
    with open(os.path.join(ckpt.path, "rlpost_state.pt"), "ab") as f:
        f.write(b"garbage")
    from rlpost.run import train
    with pytest.raises(CheckpointError, match="rlpost_state.pt does not match its recorded sha256"):
        train(saved_config(str(run)), resume=str(run))
    assert (run / "metrics.jsonl").read_text() == before


def test_wait_or_kill_kills_only_a_process_still_running():
    """The chaos tests' kill (wait_or_kill): a process that ends in time is left to end, one still
    running at the timeout is SIGKILLed and reaped."""
    quick = subprocess.Popen([sys.executable, "-c", "pass"])
    assert not wait_or_kill(quick, 120) and quick.returncode == 0
    stuck = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    assert wait_or_kill(stuck, 0.5) and stuck.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_twenty_sigkills_at_random_points_resume_bit_identical(tmp_path):
    """Kill runs at 20+ random moments (start-up, SFT, evaluation, RL steps, checkpoint writes), resuming
    each time; every finished run must equal the uninterrupted one. A run that finishes before the 20th
    kill is compared, and the kills go on in a fresh run, so the outcome never depends on timing."""
    longer = TINY + ["sft.steps=120", "sft.save_every=20", "rl.steps=40", "rl.eval_every=10", "rl.save_every=3"]
    t0 = time.time()
    run_to_end(longer + [f"out_dir={tmp_path}", "run_name=ref"], tmp_path)
    duration = time.time() - t0
    rng = random.Random(0)
    kills, finished, resumes = 0, 0, 0
    while kills < 20:
        run = tmp_path / f"chaos{finished}"
        started = (run / "run.json").exists()
        p = start(["--resume", str(run)] if started else longer + [f"out_dir={tmp_path}", f"run_name={run.name}"],
                  tmp_path)
        resumes += started
        if wait_or_kill(p, rng.uniform(0.5, 0.3 * duration)):
            kills += 1
            continue
        assert p.returncode == 0, p.communicate()[0]
        assert_same_run(tmp_path / "ref", run)
        finished += 1
    run = tmp_path / f"chaos{finished}"
    if (run / "run.json").exists():  # the last one killed: let it finish
        run_to_end(["--resume", str(run)], tmp_path)
        assert_same_run(tmp_path / "ref", run)
        finished += 1
    print(f"\n{kills} SIGKILLs, {resumes} resumes, {finished} finished run(s), all identical to the reference")


# ---------------------------------------------------------------------------- damaged metrics / rollouts files

SHORT = TINY[:-1] + ["sft.steps=8", "rl.steps=4", "rl.eval_every=0", "log.rollouts_every=1"]


@pytest.fixture(scope="module")
def finished_short_run(tmp_path_factory):
    """A short run to the end (checkpoints step_2 and final), and its files as they are then."""
    from rlpost.config import load_config
    from rlpost.run import train

    tmp = tmp_path_factory.mktemp("short")
    assert train(load_config(None, SHORT + [f"out_dir={tmp}", "run_name=done"]))["status"] == "ok"
    run = tmp / "done"
    return run, {name: (run / name).read_text() for name in ("metrics.jsonl", "rollouts.jsonl")}


def killed_after_step_2(finished_short_run, tmp_path):
    """A copy of the finished run as a kill after step 2's checkpoint leaves it: step_2 is the newest."""
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(finished_short_run[0], run)
    shutil.rmtree(run / "checkpoints" / "final")
    ckpt = list_checkpoints(run)[-1]
    assert ckpt.name == "step_2"
    return run, ckpt


@pytest.mark.parametrize("name, count", [("metrics.jsonl", "metrics_lines"), ("rollouts.jsonl", "rollouts_lines")])
def test_a_resume_refuses_a_file_that_lost_counted_lines_and_changes_nothing(finished_short_run, tmp_path, name,
                                                                              count):
    from rlpost.run import train

    run, ckpt = killed_after_step_2(finished_short_run, tmp_path)
    counted = ckpt.meta[count]
    assert counted >= 3
    lines = (run / name).read_text().splitlines(keepends=True)
    cases = [(lines[:counted - 2], f"holds {counted - 2} line(s) but checkpoint {ckpt.path} counts {counted}: "
                                   f"line(s) {counted - 1}-{counted} are missing"),
             (lines[:counted - 1] + [lines[counted - 1][:9]], f"line {counted} is cut short"),
             (lines[:1] + ['{"step": 1, "broken\n'] + lines[2:], "line 2 is not a complete JSON line")]
    for damaged, message in cases:
        (run / name).write_text("".join(damaged))
        with pytest.raises(ResumeError, match=f"{os.path.join(str(run), name)}.*" + message.replace("(", r"\(")
                           .replace(")", r"\)")):
            train(saved_config(str(run)), resume=str(run))
        assert (run / name).read_text() == "".join(damaged)  # refused before anything was cut or appended
    (run / name).unlink()
    with pytest.raises(ResumeError, match=f"{os.path.join(str(run), name)} is missing; checkpoint .* counts"):
        train(saved_config(str(run)), resume=str(run))


def test_a_broken_line_after_the_counted_ones_is_dropped_and_the_resume_is_exact(finished_short_run, tmp_path):
    from rlpost.run import train

    run, _ = killed_after_step_2(finished_short_run, tmp_path)
    for name in ("metrics.jsonl", "rollouts.jsonl"):  # a kill in mid-write of the line after the checkpoint
        with open(run / name, "a") as f:
            f.write('{"stage": "rl", "step": 9, "cut sh')
    assert train(saved_config(str(run)), resume=str(run))["status"] == "ok"
    done, files = finished_short_run
    assert comparable(run) == comparable(done)
    assert (run / "rollouts.jsonl").read_text() == files["rollouts.jsonl"]


# ---------------------------------------------------------------------------- a stage list, resumed between stages

TWO_RL = TINY[:-1] + ["stages=[rl, eval, {rl: {trainer.lr: 1.0e-3}}, eval]", "rl.steps=4", "rl.eval_every=0",
                      "log.rollouts_every=1"]


def test_two_rl_stages_resumed_between_them_are_bit_identical(tmp_path):
    """A kill right after the first RL stage's end checkpoint (checkpoints/rl: `final` is the last RL stage's):
    the second stage carries on the weight-sync version (sync/version 5-8, not 1-4) and the random streams,
    so metrics.jsonl, rollouts.jsonl and every checkpoint equal the run's never stopped."""
    import shutil

    from rlpost.config import load_config
    from rlpost.run import train

    assert train(load_config(None, TWO_RL + [f"out_dir={tmp_path}", "run_name=ref"]))["status"] == "ok"
    ref, run = tmp_path / "ref", tmp_path / "killed"
    rl_lines = [m for m in comparable(ref) if m["stage"] == "rl"]
    assert [m["sync/version"] for m in rl_lines] == list(range(1, 9))
    shutil.copytree(ref, run)
    first = next(c for c in list_checkpoints(run) if c.name == "rl")
    assert first.meta["finished"] and first.meta["stage_name"] == "rl"
    for c in list_checkpoints(run):  # as the kill leaves it: nothing after checkpoints/rl
        if c.order > first.order:
            shutil.rmtree(c.path)
    assert list_checkpoints(run)[-1].name == "rl"
    assert train(saved_config(str(run)), resume=str(run))["status"] == "ok"
    assert_same_run(ref, run)
    assert {"rl", "rl_2_step_2", "final"} <= set(assert_same_checkpoints(ref, run))
    assert (run / "rollouts.jsonl").read_text() == (ref / "rollouts.jsonl").read_text()


@pytest.mark.slow
def test_a_stage_list_recipe_killed_between_stages_resumes_bit_identical(tmp_path):
    """recipes/r1.yaml (sft, rl, rejection, rl at its own lr, evals between), tiny: SIGKILL at the first sample
    the rejection stage scores, after the first RL stage's end checkpoint; the resume continues from that one."""
    r1 = [os.path.join(ROOT, "recipes", "r1.yaml"), *TINY, "task.num_eval=20",
          "rejection.num_prompts=16", "rejection.samples_per_prompt=2", "rejection.steps=3", "rejection.batch_size=8",
          "rl.steps=4", "task.rewards=null", "task.reward=test_resume:reward_that_kills_its_run"]
    run_to_end([*r1, f"out_dir={tmp_path}", "run_name=ref"], tmp_path)
    run = tmp_path / "killed"
    killed_run([*r1, f"out_dir={tmp_path}", "run_name=killed"], tmp_path, run / "checkpoints" / "rl")
    assert list_checkpoints(run)[-1].name == "rl"
    out = run_to_end(["--resume", str(run)], tmp_path)
    assert f"resuming from {run / 'checkpoints' / 'rl'}" in out, out
    ref = tmp_path / "ref"
    assert_same_run(ref, run)
    assert {"sft", "rl", "rejection", "final"} <= set(assert_same_checkpoints(ref, run))
    assert [m["sync/version"] for m in comparable(run) if m["stage"] == "rl"] == list(range(1, 9))


# ---------------------------------------------------------------------------- damaged checkpoints

@pytest.mark.parametrize("damage", ['{"stage": 0, "step": 0, "finis', "[]", None])
def test_a_damaged_old_checkpoint_is_named_and_skipped_for_a_newer_complete_one(finished_short_run, tmp_path, capsys,
                                                                               damage):
    from rlpost.run import train

    run, newest = killed_after_step_2(finished_short_run, tmp_path)
    meta = run / "checkpoints" / "sft" / "rlpost_checkpoint.json"
    if damage is None:  # unreadable: a folder where the file should be
        meta.unlink()
        meta.mkdir()
    else:
        meta.write_text(damage)
    assert [c.name for c in list_checkpoints(run)] == ["step_2"]
    capsys.readouterr()
    summary = train(saved_config(str(run)), resume=str(run))
    err = capsys.readouterr().err
    assert f"warning: resume: checkpoint {run / 'checkpoints' / 'sft'}" in err and "left out" in err, err
    assert summary["status"] == "ok" and summary["pass@1_rl"] == json.loads(
        (finished_short_run[0] / "summary.json").read_text())["pass@1_rl"]
    assert comparable(run) == comparable(finished_short_run[0])


def test_weights_taken_from_a_damaged_checkpoint_are_refused_naming_it(finished_short_run, tmp_path):
    from rlpost.checkpoint import verify

    run, newest = killed_after_step_2(finished_short_run, tmp_path)
    newest.meta["weights"] = "sft"  # as a stage that left the policy as it was records it
    with open(run / "checkpoints" / "sft" / "model.safetensors", "ab") as f:
        f.write(b"garbage")
    with pytest.raises(CheckpointError, match=f"takes its weights from {run / 'checkpoints' / 'sft'}, whose "
                                              "model.safetensors is missing or does not match"):
        verify(newest, str(run))
    (run / "checkpoints" / "sft" / "rlpost_checkpoint.json").write_text("{")
    with pytest.raises(CheckpointError, match="which is damaged: .* has an unreadable rlpost_checkpoint.json"):
        verify(newest, str(run))


# ---------------------------------------------------------------------------- failed writes

def no_space_for(folder_part: str):
    """A torch.save that fails as a full disk does, half-way through a file whose path contains `folder_part`."""
    import errno

    real = torch.save

    def save(obj, f, *args, **kwargs):
        if folder_part in str(f):
            with open(f, "wb") as fh:
                fh.write(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *args, **kwargs)

    return save


def test_a_full_disk_at_a_checkpoint_names_it_and_loses_nothing_written_before(finished_short_run, tmp_path,
                                                                              monkeypatch):
    import errno

    from rlpost.config import load_config
    from rlpost.run import train

    monkeypatch.setattr(torch, "save", no_space_for(".tmp-step_2"))
    with pytest.raises(OSError, match=f"cannot write checkpoint {tmp_path / 'full' / 'checkpoints' / 'step_2'}: "
                                      "No space left on device; what was written before it is whole") as e:
        train(load_config(None, SHORT + [f"out_dir={tmp_path}", "run_name=full"]))
    assert e.value.errno == errno.ENOSPC
    monkeypatch.undo()
    run = tmp_path / "full"
    assert "cannot write checkpoint" in json.loads((run / "summary.json").read_text())["status"]
    assert sorted(os.listdir(run / "checkpoints")) == ["last", "reference", "sft"]  # no half-written folder
    assert [m["step"] for m in comparable(run) if m["stage"] == "rl"] == [1, 2]  # every line logged is whole
    assert train(saved_config(str(run)), resume=str(run))["status"] == "ok"
    assert comparable(run) == comparable(finished_short_run[0])


def test_a_failed_rewrite_of_a_checkpoint_keeps_the_one_of_that_name(tmp_path, monkeypatch):
    from rlpost.checkpoint import verify, write_checkpoint

    meta = {"stage": 0, "step": 1, "finished": False, "metrics_lines": 0, "summary": {}, "weights": None}
    write_checkpoint(str(tmp_path), "step_1", meta, {"x": torch.arange(3)})
    monkeypatch.setattr(torch, "save", no_space_for(".tmp-step_1"))
    with pytest.raises(OSError, match="cannot write checkpoint .*step_1: No space left on device"):
        write_checkpoint(str(tmp_path), "step_1", {**meta, "step": 2}, {"x": torch.arange(5)})
    monkeypatch.undo()
    (ckpt,) = list_checkpoints(tmp_path)
    verify(ckpt, str(tmp_path))
    assert ckpt.meta["step"] == 1 and torch.equal(ckpt.load_state()["x"], torch.arange(3))
    assert os.listdir(tmp_path / "checkpoints") == ["step_1"]


def test_a_model_folder_rewritten_when_the_run_is_stopped_keeps_the_one_before(tmp_path, monkeypatch):
    """rl.keep_best's best/ (and a redone stage's reference/) is rewritten in place: a second Ctrl-C (or a kill)
    between removing the old folder and renaming the new one into place used to leave neither, and a resume
    then removed the complete .tmp- folder too. The old folder is kept aside until the new one is in place,
    and a resume puts it back, matching the checkpoint's own record of the best."""
    from rlpost.checkpoint import clean_partial, write_model_folder

    def model(text):
        return lambda folder: (os.makedirs(folder), open(os.path.join(folder, "model.safetensors"), "w").write(text))

    write_model_folder(str(tmp_path), "best", model("step 3"))
    rename = os.rename

    def stopped_at_the_rename_into_place(src, dst):
        if os.path.basename(src) == ".tmp-best":
            raise KeyboardInterrupt
        rename(src, dst)

    monkeypatch.setattr(os, "rename", stopped_at_the_rename_into_place)
    with pytest.raises(KeyboardInterrupt):
        write_model_folder(str(tmp_path), "best", model("step 6"))
    monkeypatch.undo()
    assert clean_partial(str(tmp_path)) == [".old-best", ".tmp-best"]
    assert os.listdir(tmp_path / "checkpoints") == ["best"]
    assert (tmp_path / "checkpoints" / "best" / "model.safetensors").read_text() == "step 3"
    write_model_folder(str(tmp_path), "best", model("step 6"))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["best"]
    assert (tmp_path / "checkpoints" / "best" / "model.safetensors").read_text() == "step 6"


class FullDisk:
    """A file whose disk fills up: each write puts half its text in, then fails as a full disk does."""

    def __init__(self, path):
        self.f = open(path, "a")

    def writelines(self, lines):
        import errno

        text = "".join(lines)
        self.f.write(text[:len(text) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self):
        self.f.flush()

    def close(self):
        self.f.close()


def test_a_full_disk_while_logging_names_the_file_and_keeps_the_lines_before(tmp_path):
    import errno

    from rlpost.runlog import RunLog, cut_jsonl

    log = RunLog(str(tmp_path))
    log({"step": 1})
    log.rollouts([{"step": 1}])
    log.file.close()
    log.file = FullDisk(tmp_path / "metrics.jsonl")
    with pytest.raises(OSError, match=f"cannot write the metrics file {tmp_path / 'metrics.jsonl'}: No space") as e:
        log({"step": 2})
    assert e.value.errno == errno.ENOSPC and log.lines == 1  # a checkpoint never counts the failed line
    log.rollouts_file.close()
    log.rollouts_file = FullDisk(tmp_path / "rollouts.jsonl")
    with pytest.raises(OSError, match=f"cannot write the rollouts file {tmp_path / 'rollouts.jsonl'}: No space"):
        log.rollouts([{"step": 2}])
    assert log.rollout_lines == 1
    log.close()
    for name in ("metrics.jsonl", "rollouts.jsonl"):  # the line before is whole; the half one after it is dropped
        assert (tmp_path / name).read_text().startswith('{"step": 1}\n{"st')
        assert cut_jsonl(str(tmp_path / name), 1, "step_1") == [] and (tmp_path / name).read_text() == '{"step": 1}\n'


# ---------------------------------------------------------------------------- the wrong checkpoint or lines

def test_swapped_checkpoint_folders_are_refused_naming_them(finished_short_run, tmp_path):
    """Two checkpoint folders that traded names: the newest by its metadata sits in the folder of an older one,
    so the resume would load weights and state of another step. Refused, naming the folder and its real name."""
    from rlpost.run import train

    run, _ = killed_after_step_2(finished_short_run, tmp_path)
    root = run / "checkpoints"
    (root / "step_2").rename(root / "swap")
    (root / "sft").rename(root / "step_2")
    (root / "swap").rename(root / "sft")
    before = (run / "metrics.jsonl").read_text()
    with pytest.raises(CheckpointError, match=f"checkpoint {root / 'sft'} was written as 'step_2', not 'sft'"):
        train(saved_config(str(run)), resume=str(run))
    assert (run / "metrics.jsonl").read_text() == before


def test_a_checkpoint_of_another_run_or_config_is_refused(finished_short_run, tmp_path):
    """A checkpoint copied in from another run (seen as run.json's id differing from the checkpoint's), or one
    written before config.yaml was edited: refused, naming the checkpoint, before anything is loaded or cut."""
    from rlpost.run import train

    run, newest = killed_after_step_2(finished_short_run, tmp_path)
    info = json.loads((run / "run.json").read_text())
    assert info["run_id"] == newest.meta["run_id"]
    (run / "run.json").write_text(json.dumps({**info, "run_id": "0" * 32}))
    with pytest.raises(CheckpointError, match=f"checkpoint {newest.path} belongs to another run"):
        train(saved_config(str(run)), resume=str(run))
    (run / "run.json").write_text(json.dumps(info))
    config = (run / "config.yaml").read_text()
    assert "lr: 0.0002\n" in config
    (run / "config.yaml").write_text(config.replace("lr: 0.0002\n", "lr: 0.001\n"))
    with pytest.raises(CheckpointError, match=f"checkpoint {newest.path} was written under another config"):
        train(saved_config(str(run)), resume=str(run))
    assert (run / "metrics.jsonl").read_text().count("\n") > newest.meta["metrics_lines"]  # nothing was cut


def test_a_resume_given_the_command_line_that_started_the_run_is_no_change(finished_short_run, tmp_path, capsys):
    """trainer.precision and rollout.dtype 'auto' are saved as what they resolved to; the same command line given
    again with --resume resolves them alike, so it is not refused as a config change."""
    run, _ = killed_after_step_2(finished_short_run, tmp_path)
    assert "dtype: auto" not in (run / "config.yaml").read_text()
    assert main(["train", "--resume", str(run), *SHORT]) == 0, capsys.readouterr().err
    assert comparable(run) == comparable(finished_short_run[0])


def test_a_run_started_while_packing_defaulted_to_off_resumes_as_it_started(tmp_path, capsys):
    """trainer.packing's default was false: a run directory from then (config.yaml says false, or predates the key
    and lacks it) resumes with packing off, and the same command line, whose packing is now the new default
    (auto), is no config change. Setting the key to another value still is one: a layout change (the same
    computation packed), which the resume announces and keeps in config.yaml."""
    args = TINY[:-1] + ["sft.steps=8", "rl.steps=4", "rl.eval_every=0", f"out_dir={tmp_path}", "run_name=old"]
    assert main(["train", *args, "trainer.packing=false"]) == 0  # what the old default wrote
    config = (tmp_path / "old" / "config.yaml").read_text()
    assert "  packing: false\n" in config
    for i, text in enumerate((config, config.replace("  packing: false\n", ""))):  # as written; from before the key
        run, _ = killed_after_step_2((tmp_path / "old", None), tmp_path / str(i))
        (run / "config.yaml").write_text(text)
        assert saved_config(str(run)).trainer.packing is False
        assert main(["train", "--resume", str(run), *args[:-2]]) == 0, capsys.readouterr().err
        assert comparable(run) == comparable(tmp_path / "old")
    capsys.readouterr()
    assert main(["train", "--resume", str(run), *args[:-2], "trainer.packing=true"]) == 0
    assert "layout keys changed: trainer.packing: False -> True" in capsys.readouterr().out
    assert saved_config(str(run)).trainer.packing is True


def test_weights_replaced_by_another_whole_checkpoint_are_refused(tmp_path):
    """A checkpoint that takes its weights from an earlier one records the sha256 of those very files: the earlier
    folder replaced by another complete, self-consistent checkpoint of the same name is refused, not loaded."""
    from rlpost.checkpoint import verify, write_checkpoint

    def weights(value):
        return lambda folder: (tmp_path / folder / "model.safetensors").write_bytes(value)

    meta = {"stage": 0, "step": 0, "finished": True, "metrics_lines": 0, "summary": {}, "weights": None}
    write_checkpoint(str(tmp_path), "sft", meta, {}, weights(b"mine"))
    write_checkpoint(str(tmp_path), "eval", {**meta, "stage": 1, "weights": "sft"}, {})
    (sft, evaluated) = list_checkpoints(tmp_path)
    assert evaluated.meta["weights_sha256"] == {"model.safetensors": sft.meta["sha256"]["model.safetensors"]}
    verify(evaluated, str(tmp_path))
    write_checkpoint(str(tmp_path), "sft", meta, {}, weights(b"another run's"))
    verify(list_checkpoints(tmp_path)[0], str(tmp_path))  # whole in itself
    with pytest.raises(CheckpointError, match=f"takes its weights from {tmp_path / 'checkpoints' / 'sft'}, whose "
                                              "model.safetensors is missing or does not match the sha256 recorded"):
        verify(evaluated, str(tmp_path))


def test_weights_that_do_not_fit_the_model_are_refused_naming_the_folder(finished_short_run):
    from rlpost.models.gpt_mini import GPT, GPTConfig
    from rlpost.run import _load_policy

    folder = str(finished_short_run[0] / "checkpoints" / "step_2")
    other = GPT(GPTConfig(vocab_size=15, block_size=14, n_layer=2, n_head=2, n_embd=16))
    with pytest.raises(ResumeError, match=f"the policy's weights in {folder} do not load into the model"):
        _load_policy(other, folder)


@pytest.mark.parametrize("name", ["metrics.jsonl", "rollouts.jsonl"])
@pytest.mark.parametrize("damage", ["duplicated", "replaced", "swapped"])
def test_changed_counted_lines_are_refused_and_change_nothing(finished_short_run, tmp_path, name, damage):
    """The counted lines are each whole JSON, and as many, yet not the ones the checkpoint was written after:
    a line duplicated (the run's last line pushed out of the count), replaced by another object, or two lines
    swapped. Refused, naming the file; nothing cut or appended."""
    from rlpost.run import train

    run, ckpt = killed_after_step_2(finished_short_run, tmp_path)
    lines = (run / name).read_text().splitlines(keepends=True)
    assert ckpt.meta[name.replace(".jsonl", "_lines")] >= 3
    damaged = {"duplicated": lines[:2] + lines[1:],
               "replaced": lines[:1] + ["{}\n"] + lines[2:],
               "swapped": [lines[1], lines[0]] + lines[2:]}[damage]
    (run / name).write_text("".join(damaged))
    with pytest.raises(ResumeError, match=f"{os.path.join(str(run), name)} lines 1-[0-9]+, the ones checkpoint "
                                          f"{ckpt.path} counts, are not the lines it was written after"):
        train(saved_config(str(run)), resume=str(run))
    assert (run / name).read_text() == "".join(damaged)


# ---------------------------------------------------------------------------- errors that are not the disk's

def test_a_value_that_cannot_be_serialised_is_reported_as_itself_not_as_the_disk(tmp_path):
    from rlpost.checkpoint import write_checkpoint, write_model_folder

    meta = {"stage": 0, "step": 1, "finished": False, "metrics_lines": 0, "summary": {}, "weights": None}

    def bad_tokenizer(folder):
        raise TypeError("'utf-8' codec can't encode character '\\ud800': surrogates not allowed")

    for write in (lambda: write_checkpoint(str(tmp_path), "step_1", meta, {}, bad_tokenizer),
                  lambda: write_checkpoint(str(tmp_path), "step_1", {**meta, "summary": {"x": {1, 2}}}, {}),
                  lambda: write_model_folder(str(tmp_path), "reference", bad_tokenizer)):
        with pytest.raises(TypeError) as e:
            write()
        assert not isinstance(e.value, OSError) and "free space" not in str(e.value)
        assert os.listdir(tmp_path / "checkpoints") == []  # the half-written folder went all the same


def test_out_of_memory_names_the_role_and_the_step_and_the_resume_finishes_the_run(finished_short_run, tmp_path,
                                                                                    monkeypatch, capsys):
    """Memory running out in a role stops the run with an error naming the role and the RL step (still a
    torch.OutOfMemoryError); checkpoints/last holds the weights, and `--resume` from step 2's checkpoint ends
    with the uninterrupted run's metrics and rollouts."""
    from rlpost.config import load_config
    from rlpost.reference import Reference
    from rlpost.run import train

    real, calls = Reference.__call__, []

    def out_of_memory_at_step_3(self, batch):
        calls.append(1)
        if len(calls) == 3:  # one reference pass per RL step here
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, batch)

    monkeypatch.setattr(Reference, "__call__", out_of_memory_at_step_3)
    with pytest.raises(torch.OutOfMemoryError, match=r"out of memory in role 'reference' at RL step 3: "
                                                     r"OutOfMemoryError: CUDA out of memory"):
        train(load_config(None, SHORT + [f"out_dir={tmp_path}", "run_name=oom"]))
    run = tmp_path / "oom"
    assert (run / "checkpoints" / "last" / "model.safetensors").exists()
    assert json.loads((run / "summary.json").read_text())["status"].startswith("failed: RoleOutOfMemoryError")
    assert list_checkpoints(run)[-1].name == "step_2"
    monkeypatch.setattr(Reference, "__call__", real)
    assert main(["train", "--resume", str(run), *SHORT]) == 0, capsys.readouterr().err
    assert comparable(run) == comparable(finished_short_run[0])


def test_a_failed_write_of_the_last_weights_keeps_the_ones_before(finished_short_run, tmp_path, monkeypatch,
                                                                   capsys):
    """checkpoints/last (the weights when a run stops on an error) used to be written in place: a second failure
    whose write of it failed (disk full) or was killed left new weights beside the earlier tokenizer and config.
    It goes through .tmp-last now: the earlier folder stays whole, and the warning names the folder."""
    import errno

    from rlpost.checkpoint import write_model_folder
    from rlpost.models.gpt_mini import CharTokenizer
    from rlpost.reference import Reference
    from rlpost.run import train

    run, _ = killed_after_step_2(finished_short_run, tmp_path)
    write_model_folder(str(run), "last", lambda f: (os.makedirs(f), open(os.path.join(f, "model.safetensors"), "w")
                                                    .write("an earlier failure's")))

    def boom(self, batch):
        raise RuntimeError("boom")

    def full_disk(self, folder, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Reference, "__call__", boom)
    monkeypatch.setattr(CharTokenizer, "save_pretrained", full_disk)
    with pytest.raises(RuntimeError, match="boom"):
        train(saved_config(str(run)), resume=str(run))
    assert (run / "checkpoints" / "last" / "model.safetensors").read_text() == "an earlier failure's"
    assert not any(e.startswith(".") for e in os.listdir(run / "checkpoints"))
    last = run / "checkpoints" / "last"
    assert f"warning: cannot write model folder {last}: No space left" in capsys.readouterr().err


# ---------------------------------------------------------------------------- two processes on one run directory

def test_a_resume_while_another_process_holds_the_run_is_refused_and_changes_nothing(finished_short_run, tmp_path):
    """A resume while another process writes the run (held here, as a running run holds it) would cut
    metrics.jsonl by replacing the file under the run still appending to the old one, and tidy away its
    half-written checkpoint: refused, naming the folder, with nothing touched; once released it resumes."""
    from rlpost.run import train
    from rlpost.runlog import RunDirBusy, hold_run_dir, release_run_dir

    run, _ = killed_after_step_2(finished_short_run, tmp_path)
    (run / "checkpoints" / ".tmp-step_4").mkdir()  # the other process's checkpoint, being written
    before = {name: (run / name).read_text() for name in ("metrics.jsonl", "rollouts.jsonl")}
    hold_run_dir(str(run))
    try:
        with pytest.raises(RunDirBusy, match=f"run directory {run} is in use: another rlpost process"):
            train(saved_config(str(run)), resume=str(run))
    finally:
        release_run_dir(str(run))
    assert (run / "checkpoints" / ".tmp-step_4").is_dir()
    assert {name: (run / name).read_text() for name in before} == before
    assert train(saved_config(str(run)), resume=str(run))["status"] == "ok"
    assert comparable(run) == comparable(finished_short_run[0])
    hold_run_dir(str(run))  # the resume let go of it when it ended
    release_run_dir(str(run))


@pytest.mark.slow
def test_a_resume_of_a_run_still_going_is_refused_and_a_killed_run_leaves_no_lock(tmp_path):
    """Two real processes: `rlpost train --resume` of a run that is still training exits 1 naming the folder
    (it used to replace metrics.jsonl under the running run, which then lost every later line, and pruned
    checkpoints out from under each other); SIGKILL of the run lets go of the folder with the process."""
    from rlpost.runlog import hold_run_dir, release_run_dir

    run = tmp_path / "going"
    p = subprocess.Popen(command(*TINY[:-1], "rl.steps=100000", "rl.keep_checkpoints=0", f"out_dir={tmp_path}",
                                 "run_name=going"), cwd=tmp_path, env=run_env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (run / "checkpoints" / "step_2").is_dir(), p)
        second = subprocess.run(command("--resume", str(run)), cwd=tmp_path, env=run_env(), capture_output=True,
                                text=True, timeout=300)
        assert p.poll() is None  # the run went on training throughout
        assert second.returncode == 1, second.stdout + second.stderr
        assert f"run directory {run} is in use" in second.stderr
    finally:
        wait_or_kill(p, 0)
    hold_run_dir(str(run))
    release_run_dir(str(run))


# ---------------------------------------------------------------------------- the data changed under a run

def test_a_resume_on_changed_data_is_refused_naming_what_changed(tmp_path):
    """The prompt sampler's position in a checkpoint indexes the task's rows: a prompt file edited since the run
    started used to resume silently on other prompts (an answer fixed) or fail with a bare IndexError (rows
    removed). Both are refused naming the rows and the file; put back, the resume is exact."""
    from rlpost.config import load_config
    from rlpost.run import train

    rows = [{"prompt": f"{a:02d}+{b:02d}=", "answer": f"{a + b:03d}"} for a, b in zip(range(10, 50), range(60, 100))]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    args = SHORT + ["sft.steps=0", "task.name=file", f"task.train_file={data}",
                    f"task.eval_file={tmp_path / 'eval.jsonl'}", f"out_dir={tmp_path}", "run_name=ref"]
    assert train(load_config(None, args))["status"] == "ok"
    ref, run = tmp_path / "ref", tmp_path / "run"
    shutil.copytree(ref, run)
    shutil.rmtree(run / "checkpoints" / "final")
    original = data.read_text()
    edited = original.replace('"answer": "072"', '"answer": "073"', 1)
    assert edited != original
    for changed in (edited, "".join(original.splitlines(keepends=True)[:5])):
        data.write_text(changed)
        with pytest.raises(ResumeError, match=f"the task's training rows, demonstrations are not the ones checkpoint "
                                              f".*step_2 was written with \\(task.train_file={data}, "):
            train(saved_config(str(run)), resume=str(run))
    data.write_text(original)
    assert train(saved_config(str(run)), resume=str(run))["status"] == "ok"
    assert comparable(run) == comparable(ref)


# ---------------------------------------------------------------------------- a stop at a step that saves anyway

_TERM_SENT = []


def reward_that_sigterms_its_run_in_rl(completion: str, row: dict) -> float:
    """The task's reward, which sends SIGTERM to its own process once, at the first sample it scores after the RL
    stage wrote checkpoints/reference (its folder in RLPOST_TEST_TERM_AFTER): in step 1's reward."""
    from rlpost.tasks import answer_match

    folder = os.environ.get("RLPOST_TEST_TERM_AFTER")
    if folder and os.path.isdir(folder) and not _TERM_SENT:
        _TERM_SENT.append(True)
        os.kill(os.getpid(), signal.SIGTERM)
    return answer_match(completion, row["answer"])


def test_a_stop_at_a_step_that_saves_writes_its_checkpoint_once(tmp_path, monkeypatch):
    """SIGTERM (a scheduler's, with a SIGKILL to follow after a grace period) during a step that writes a
    checkpoint anyway (rl.save_every) used to write that checkpoint twice, the second time at the stop; once is
    enough, and the run stops right after it."""
    import rlpost.stages.base
    from rlpost.config import load_config
    from rlpost.run import train
    from rlpost.stages.base import RunInterrupted

    written, write = [], rlpost.stages.base.write_checkpoint

    def counted(run_dir, name, *args, **kwargs):
        written.append(name)
        return write(run_dir, name, *args, **kwargs)

    monkeypatch.setattr(rlpost.stages.base, "write_checkpoint", counted)
    monkeypatch.setenv("RLPOST_TEST_TERM_AFTER", str(tmp_path / "run" / "checkpoints" / "reference"))
    _TERM_SENT.clear()
    cfg = load_config(None, SHORT + ["rl.save_every=1", "task.reward=test_resume:reward_that_sigterms_its_run_in_rl",
                                     f"out_dir={tmp_path}", "run_name=run"])
    with pytest.raises(RunInterrupted, match="SIGTERM"):
        train(cfg)
    assert _TERM_SENT and written == ["sft", "step_1"]
    assert list_checkpoints(tmp_path / "run")[-1].name == "step_1"


def test_a_stop_asked_during_the_last_stage_ends_the_run_as_finished(tmp_path, monkeypatch):
    """SIGTERM while the last stage (the evaluation after RL) runs: it runs to its end, and there is nothing left
    to stop. The run used to end `interrupted` (exit 143) all the same, its work done, telling the user to resume."""
    from rlpost.config import load_config
    from rlpost.run import train

    monkeypatch.setenv("RLPOST_TEST_TERM_AFTER", str(tmp_path / "run" / "checkpoints" / "final"))
    _TERM_SENT.clear()
    cfg = load_config(None, SHORT + ["task.reward=test_resume:reward_that_sigterms_its_run_in_rl",
                                     f"out_dir={tmp_path}", "run_name=run"])
    summary = train(cfg)
    assert _TERM_SENT and summary["status"] == "ok" and "pass@1_rl" in summary



def test_the_data_digest_is_the_same_in_every_process():
    """A resume runs in another process: rows holding what JSON has no type for digest by content, never by
    what changes from process to process (an object's address in its repr, a set's order, which follows the hash
    seed), or every resume of such a run would be refused; a change of content still shows."""
    from types import SimpleNamespace

    import numpy as np

    from rlpost.stages.base import data_digests

    class Blob:
        pass

    def digest(tags, **extra):
        rows = [{"prompt": "p", "tags": tags, "blob": Blob(), "raw": b"\x00a", "x": np.arange(3), **extra}]
        return data_digests(SimpleNamespace(train_rows=rows, eval_rows=[], demonstrations=rows))

    first = digest({"alpha", "beta"})
    assert digest({"beta", "alpha"}) == first  # another Blob at another address, the set built the other way
    assert digest(frozenset({"alpha", "beta"}))["train_rows"] == first["train_rows"]
    assert digest({"alpha", "gamma"})["train_rows"] != first["train_rows"]
    assert digest({"alpha", "beta"}, x=np.arange(4))["train_rows"] != first["train_rows"]
