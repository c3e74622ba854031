"""rl.topology: rollout in Ray actors (disaggregated) and ahead of training (async), on a real local Ray.

The contract tested here: the topology changes where rollout runs, never what the run computes —
one worker with staleness 0 reproduces the colocated run exactly; async staleness is exactly
min(step - 1, S); an async run resumed from a checkpoint is the run never interrupted; a killed
worker is restarted and samples what it would have; collective weight sync delivers the same weights.
"""

import json
import os
import shutil
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

from rlpost.config import load_config
from rlpost.models import load_model
from rlpost.rollout import SamplingParams, build_engine
from rlpost.rollout.engine import named_weights
from rlpost.rollout.ray_engine import RayEngine, RolloutWorkerError, _split
from rlpost.run import saved_config, train

# a policy that learns something in a few steps (rewards vary, so the weights do move)
TINY = ["sft.steps=120", "sft.batch_size=64", "rl.steps=6", "rl.eval_every=3", "rl.save_every=0",
        "task.num_eval=30", "task.max_operand=9", "rollout.prompts_per_step=4", "rollout.k=4",
        "eval.samples_per_prompt=2", "model.n_layer=2", "model.n_embd=64", "model.n_head=2", "threads=1"]


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the session: 127.0.0.1 only, no dashboard, 2 CPUs."""
    from rlpost.cluster import RayCluster

    with RayCluster(num_cpus=2) as cluster:
        yield cluster


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def run(tmp_path, name, *overrides):
    cfg = load_config(None, [*TINY, f"out_dir={tmp_path}", f"run_name={name}", *overrides])
    train(cfg)
    return os.path.join(tmp_path, name)


def metrics(run_dir, drop=("sync/bytes",)) -> list[dict]:
    """metrics.jsonl without wall-clock fields and memory / GPU measurements (and the bytes moved, which differ
    by design)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    measured = ("time/", "time_share/", "mem/", "gpu/")
    return [{k: v for k, v in m.items() if not (k.startswith(measured) or k.endswith("tokens_per_s") or k in drop)}
            for m in lines]


def rl_lines(run_dir):
    return [m for m in metrics(run_dir) if m.get("stage") == "rl"]


def weights(run_dir):
    return load_file(os.path.join(run_dir, "checkpoints", "final", "model.safetensors"))


def assert_same(a, b):
    assert metrics(a) == metrics(b)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def colocated(ray_local, tmp_path_factory):
    before = torch.get_num_threads()
    path = run(tmp_path_factory.mktemp("colocated"), "colocated")
    torch.set_num_threads(before)
    return path


def test_disaggregated_and_async_at_staleness_0_reproduce_the_colocated_run(colocated, tmp_path, one_thread):
    lines = rl_lines(colocated)
    assert len({m["reward/mean"] for m in lines}) > 1  # a run that learns: the comparison means something
    for name, overrides in (("disaggregated", ["rl.topology=disaggregated"]),
                            ("async0", ["rl.topology=async", "rl.max_staleness=0"])):
        path = run(tmp_path, name, *overrides)
        assert_same(colocated, path)
        sent = [json.loads(line) for line in open(os.path.join(path, "metrics.jsonl"))]
        assert all(m["sync/bytes"] > 0 for m in sent if m.get("stage") == "rl")  # weights really crossed over


def test_async_staleness_is_exactly_min_of_step_and_the_bound(colocated, tmp_path, one_thread):
    path = run(tmp_path, "async2", "rl.topology=async", "rl.max_staleness=2")
    lines = rl_lines(path)
    assert [m["rollout/staleness_max"] for m in lines] == [0.0, 1.0, 2.0, 2.0, 2.0, 2.0]
    assert [m["rollout/staleness_mean"] for m in lines] == [0.0, 1.0, 2.0, 2.0, 2.0, 2.0]
    assert all(m["rollout/staleness_max"] == 0.0 for m in rl_lines(colocated))
    # the first step samples what the colocated run sampled (same weights, same prompts, same seed)
    assert lines[0]["reward/mean"] == rl_lines(colocated)[0]["reward/mean"]


def test_an_async_run_resumed_from_a_checkpoint_is_the_run_never_interrupted(ray_local, tmp_path, one_thread):
    full = run(tmp_path, "full", "rl.topology=async", "rl.max_staleness=2", "rl.save_every=2",
               "rl.keep_checkpoints=0")
    # a run that stopped right after step 2's checkpoint: its later checkpoints never happened
    cut = os.path.join(tmp_path, "cut")
    shutil.copytree(full, cut)
    for name in [n for n in os.listdir(os.path.join(cut, "checkpoints")) if n not in ("sft", "step_2", "reference")]:
        shutil.rmtree(os.path.join(cut, "checkpoints", name))
    state = torch.load(os.path.join(cut, "checkpoints", "step_2", "rlpost_state.pt"), weights_only=False)
    ahead = state["stage"]["controller"]["ahead"]
    assert ahead["submitted"] == 4 and sorted(ahead["results"]) == [3, 4]  # sampled with old weights: saved
    train(saved_config(cut), resume=cut)
    assert_same(full, cut)


def test_ray_engine_splits_prompts_and_seeds_like_local_engines(ray_local):
    assert _split(5, 2) == [(0, 3), (3, 5)] and _split(2, 3) == [(0, 1), (1, 2), (2, 2)]
    model, tok = load_model(load_config(None, TINY).model, "0123456789+=")
    prompts = [tok.encode_prompt(p) for p in ("1+2=", "3+4=", "5+6=")]
    params = SamplingParams(max_new_tokens=4, temperature=1.0)
    local = build_engine("auto", model, tok, share_weights=True)
    engine = RayEngine(model, tok, workers=2)
    try:
        batch = engine.generate(prompts, 2, params, seed=7)
        first, second = local.generate(prompts[:2], 2, params, seed=7), local.generate(prompts[2:], 2, params,
                                                                                          seed=7 + 1_000_033)
        assert batch.group_ids.tolist() == [0, 0, 1, 1, 2, 2]
        resp = batch.input_ids[:, batch.prompt_width:]
        for rows, part in ((slice(0, 4), first), (slice(4, 6), second)):
            n = part.input_ids.shape[1] - part.prompt_width
            assert torch.equal(resp[rows, :n], part.input_ids[:, part.prompt_width:])
            # (log-probs to rounding: the worker runs 1 thread, this process 2)
            assert torch.allclose(batch.old_logp[rows, batch.prompt_width:][:, :n],
                                  part.old_logp[:, part.prompt_width:],
                                  atol=1e-6)
    finally:
        engine.close()


def test_a_killed_worker_is_restarted_and_samples_what_it_would_have(ray_local):
    model, tok = load_model(load_config(None, TINY).model, "0123456789+=")
    prompts = [tok.encode_prompt(p) for p in ("1+2=", "3+4=")]
    params = SamplingParams(max_new_tokens=4, temperature=1.0)
    engine = RayEngine(model, tok, workers=1, max_restarts=1)
    try:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        engine.update_weights(named_weights(model), 3)   # the restarted worker must get these back
        before = engine.generate(prompts, 4, params, seed=11)
        os.kill(engine.worker_pids()[0], signal.SIGKILL)
        after = engine.generate(prompts, 4, params, seed=11)
        assert engine.restarts == 1
        assert torch.equal(before.input_ids, after.input_ids) and torch.equal(before.old_logp, after.old_logp)
        assert after.policy_version.tolist() == [3] * 8
        os.kill(engine.worker_pids()[0], signal.SIGKILL)
        with pytest.raises(RolloutWorkerError, match="rl.max_worker_restarts=1"):
            engine.generate(prompts, 4, params, seed=11)
    finally:
        engine.close()


def test_collective_weight_sync_delivers_the_trainers_weights(ray_local):
    model, tok = load_model(load_config(None, TINY).model, "0123456789+=")
    prompts = [tok.encode_prompt(p) for p in ("1+2=", "3+4=")]
    greedy = SamplingParams(max_new_tokens=4, temperature=0.0)
    engine = RayEngine(model, tok, workers=2, mode="collective")
    try:
        assert engine.weight_sync_mode == "collective"
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.5 * torch.randn_like(p))
        engine.update_weights(named_weights(model), 1)
        local = build_engine("auto", model, tok, share_weights=True)
        batch, expect = engine.generate(prompts, 1, greedy, seed=0), local.generate(prompts, 1, greedy, seed=0)
        assert torch.equal(batch.input_ids, expect.input_ids)
        assert torch.allclose(batch.old_logp, expect.old_logp, atol=1e-6)
        assert batch.policy_version.tolist() == [1, 1]
    finally:
        engine.close()


# ---------------------------------------------------------------------------- a worker killed mid-run

CALLS = {"n": 0}


def reward_that_kills_the_worker(completion: str, row: dict) -> float:
    """The task's own reward, which also SIGKILLs the rollout worker once, at RL step 3's first sample
    (calls 1-60 are the held-out evaluation after SFT, then 16 per step): the run's next generate
    finds it dead. Deterministic, unlike a kill from outside timed against the run."""
    from rlpost.tasks import answer_match

    CALLS["n"] += 1
    if CALLS["n"] == 60 + 2 * 16 + 1:
        import psutil  # Ray's own dependency

        # this run's worker: a descendant of this process (its Ray was started here), not another run's
        workers = [p for p in psutil.Process().children(recursive=True)
                   if "ray::RolloutWorker" in " ".join(p.cmdline())]
        assert len(workers) == 1, workers
        workers[0].kill()
    return answer_match(completion, row["answer"])


def ray_processes() -> int:
    import subprocess

    return len(subprocess.run(["pgrep", "-f", "gcs_server"], capture_output=True, text=True).stdout.split())


@pytest.mark.slow
def test_a_worker_killed_mid_run_is_restarted_and_the_run_is_unchanged(colocated, tmp_path):
    """A real `rlpost train` process (its own Ray, started and stopped by rlpost) whose rollout worker is
    killed at step 3: it is restarted, the run finishes, and its metrics and weights are the colocated run's."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    before = ray_processes()
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.path.join(root, 'tests')}", "TQDM_DISABLE": "1"}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "-m", "rlpost.cli", "train", *TINY, "rl.topology=disaggregated",
                          "task.reward=test_topologies:reward_that_kills_the_worker", f"out_dir={tmp_path}",
                          "run_name=killed"], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "rollout worker 0 died" in out.stdout and "restarting it (1/3)" in out.stdout
    assert_same(colocated, os.path.join(tmp_path, "killed"))
    assert ray_processes() == before  # the Ray it started is gone


@pytest.mark.slow
def test_a_run_joins_the_cluster_in_RAY_ADDRESS_and_leaves_it_running(tmp_path):
    """`ray start --head` (on 127.0.0.1) is a user's cluster: rlpost runs its workers there and leaves it up."""
    import socket
    import subprocess
    import sys

    from rlpost.cluster import LOOPBACK_ENV

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, **LOOPBACK_ENV, "PYTHONPATH": root, "TQDM_DISABLE": "1"}
    env.pop("RAY_ADDRESS", None)
    # `ray start --block` in a session of its own: stopping that session stops this cluster and nothing else
    head = subprocess.Popen([ray_cli, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                             "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        for _ in range(120):  # the head is up once `ray status` answers
            status = subprocess.run([ray_cli, "status", f"--address={address}"], env=env, capture_output=True)
            if status.returncode == 0:
                break
            time.sleep(1)
        out = subprocess.run([sys.executable, "-m", "rlpost.cli", "train", *TINY, "rl.steps=2", "sft.steps=4",
                              "rl.topology=async", f"out_dir={tmp_path}", "run_name=joined"],
                             env={**env, "RAY_ADDRESS": address}, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"rollout worker(s) in Ray ({address})" in out.stdout
        alive = subprocess.run([ray_cli, "status", f"--address={address}"], env=env, capture_output=True, text=True,
                               timeout=120)
        assert alive.returncode == 0, alive.stdout + alive.stderr  # the user's cluster is still up
    finally:  # `ray stop` would stop every Ray on the machine; this stops the head's session only
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=120)
