"""Sharded checkpoints under trainer.strategy=fsdp2 (torch.distributed.checkpoint): each rank writes its own
shards of the policy and of AdamW's state, a load reshards them to any number of ranks, a resumed run is the
run never interrupted, and a save never gathers the full state onto one rank.

Real torchrun processes on gloo/CPU, as tests/test_fsdp.py (whose model, batch and trainer helpers the
jobs reuse). The tests that launch processes take seconds each: they are marked slow
(`pytest -m slow tests/test_dcp.py`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_fsdp import (RANK_ROWS, ROOT, TOL, free_port, full_weights, global_batch, make_model, max_diff,  # noqa: E402
                       trainer_for)
from test_fsdp import launch as fsdp_launch  # noqa: E402

STEPS = 2


def launch(job: str, out: str, *args: str, nproc: int = 2, timeout: int = 300) -> dict:
    """test_fsdp's launcher, running this file's `job`."""
    return fsdp_launch(job, out, *args, nproc=nproc, timeout=timeout, script=__file__)


def _rows(world: int, rank: int) -> list[int]:
    """This rank's rows of the 8-row batch: the uneven 2-rank split, or all of them on one rank."""
    return RANK_ROWS[rank] if world == 2 else list(range(8))


def _full_optimizer(trainer) -> dict:
    """AdamW's full state gathered onto rank 0, keyed by parameter name ({} on the other ranks); copied (on one
    rank the gathered tensors may be the optimizer's own, which the next step changes)."""
    state = trainer._optimizer_state()
    return {**state, "state": {name: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in entry.items()}
                               for name, entry in state.get("state", {}).items()}}


def _optimizer_diff(a: dict, b: dict) -> float:
    assert a["state"].keys() == b["state"].keys()
    diffs = [0.0]
    for name, entry in a["state"].items():
        for k, v in entry.items():
            diffs.append(float((v.float() - b["state"][name][k].float()).abs().max()))
    return max(diffs)


# ---------------------------------------------------------------------------- the jobs

def job_save(out: str, folder: str) -> None:
    """Train STEPS steps on this run's ranks, write the shards, record the gathered state, then one more step."""
    from rlpost import distributed as dist
    from rlpost.algorithms import get_algorithm

    dist.init()
    world, rank = dist.world_size(), dist.rank()
    algo = get_algorithm("grpo", loss_agg="token-mean", beta=0.04)
    model = make_model("gpt_mini", "")
    batch = global_batch(model, 16)
    trainer = trainer_for(model, "fsdp2", 2)
    mine = batch.select(_rows(world, rank))
    for _ in range(STEPS):
        trainer.step(mine, algo.compute_loss)
    dist.save_shards(os.path.join(folder, "shards"), model, trainer.optimizer)
    weights, optimizer = full_weights(model), _full_optimizer(trainer)
    trainer.step(mine, algo.compute_loss)
    after = full_weights(model)
    if dist.is_main():
        torch.save({"weights": weights, "optimizer": optimizer, "after": after, "batch": batch},
                   os.path.join(folder, "reference.pt"))
        with open(out, "w") as f:
            json.dump({"world": world, "files": sorted(os.listdir(os.path.join(folder, "shards")))}, f)
    dist.destroy()


def job_load(out: str, folder: str) -> None:
    """A fresh sharded trainer on this run's ranks loads the shards; its gathered state against the saved one,
    then the same next step."""
    from rlpost import distributed as dist
    from rlpost.algorithms import get_algorithm

    dist.init()
    world, rank = dist.world_size(), dist.rank()
    algo = get_algorithm("grpo", loss_agg="token-mean", beta=0.04)
    torch.manual_seed(123)  # other initial weights: everything must come from the shards
    from rlpost.models.gpt_mini import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=16, block_size=16, n_layer=2, n_head=2, n_embd=32))
    trainer = trainer_for(model, "fsdp2", 2)
    dist.load_shards(os.path.join(folder, "shards"), model, trainer.optimizer)
    saved = torch.load(os.path.join(folder, "reference.pt"), weights_only=False)
    weights, optimizer = full_weights(model), _full_optimizer(trainer)
    trainer.step(saved["batch"].select(_rows(world, rank)), algo.compute_loss)
    after = full_weights(model)
    if dist.is_main():
        with open(out, "w") as f:
            json.dump({"world": world, "weights": max_diff(weights, saved["weights"]),
                       "optimizer": _optimizer_diff(optimizer, saved["optimizer"]),
                       "next_step": max_diff(after, saved["after"])}, f)
    dist.destroy()


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _peak_growth(fn) -> int:
    """Bytes by which this process's peak RSS during fn() exceeds its RSS before it (VmHWM reset first)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = _rss_kb("VmRSS")
    fn()
    return (_rss_kb("VmHWM") - before) * 1024


def job_memory(out: str, folder: str) -> None:
    """Rank 0's peak RSS while writing a sharded checkpoint vs while gathering the full state (the old way)."""
    from rlpost import distributed as dist
    from rlpost.algorithms import get_algorithm
    from rlpost.models.gpt_mini import GPT, GPTConfig

    dist.init()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=16, block_size=16, n_layer=8, n_head=4, n_embd=512))
    full_bytes = 3 * sum(p.numel() * p.element_size() for p in model.parameters())  # weights + AdamW's 2 moments
    batch = global_batch(model, 16)
    trainer = trainer_for(model, "fsdp2", 2)
    trainer.step(batch.select(RANK_ROWS[dist.rank()]), get_algorithm("grpo").compute_loss)
    sharded = _peak_growth(lambda: dist.save_shards(os.path.join(folder, "shards"), model, trainer.optimizer))

    def gather():  # what a checkpoint did before: the full policy and optimizer state on rank 0
        state = {"model": dist.full_state_dict(model, rank0_only=True), "optimizer": _full_optimizer(trainer)}
        if dist.is_main():
            torch.save(state, os.path.join(folder, "full.pt"))

    gathered = _peak_growth(gather)
    if dist.is_main():
        with open(out, "w") as f:
            json.dump({"full_bytes": full_bytes, "sharded_growth": sharded, "gathered_growth": gathered,
                       "shard_file": os.path.getsize(os.path.join(folder, "shards", "__0_0.distcp"))}, f)
    dist.destroy()


# ---------------------------------------------------------------------------- the tests

@pytest.mark.slow
@pytest.mark.parametrize("save_ranks,load_ranks", [(2, 2), (2, 1), (1, 2)])
def test_shards_load_exactly_under_any_number_of_ranks(tmp_path, save_ranks, load_ranks):
    """The loaded policy and AdamW state are bit for bit the saved ones, whatever the ranks on either side; the
    next step on as many ranks is bit-identical, on other ranks equal to float tolerance (the gradient is
    summed over other row splits: another order of float additions)."""
    folder = tmp_path / "ckpt"
    saved = launch("save", str(tmp_path / "save.json"), str(folder), nproc=save_ranks if save_ranks > 1 else 0)
    assert saved["files"] == sorted([".metadata"] + [f"__{r}_0.distcp" for r in range(save_ranks)])
    loaded = launch("load", str(tmp_path / "load.json"), str(folder), nproc=load_ranks if load_ranks > 1 else 0)
    print(f"{save_ranks} -> {load_ranks} ranks: {loaded}")
    assert loaded["world"] == load_ranks
    assert loaded["weights"] == 0.0 and loaded["optimizer"] == 0.0
    if save_ranks == load_ranks:
        assert loaded["next_step"] == 0.0
    else:
        assert loaded["next_step"] < TOL


@pytest.mark.slow
def test_a_sharded_save_never_holds_the_full_state(tmp_path):
    """Rank 0's peak RSS while it writes its shards grows by far less than the full state (weights + AdamW's
    two moments); gathering that state onto rank 0, as checkpoints did before, grows it by more than it."""
    m = launch("memory", str(tmp_path / "memory.json"), str(tmp_path), timeout=600)
    mb = {k: round(v / 2**20, 1) for k, v in m.items()}
    print(f"full state {mb['full_bytes']} MB; rank 0's peak RSS growth: sharded save {mb['sharded_growth']} MB "
          f"(its shard file {mb['shard_file']} MB), gathered save {mb['gathered_growth']} MB")
    assert m["shard_file"] < 0.6 * m["full_bytes"]  # rank 0 wrote about half
    assert m["gathered_growth"] > 0.4 * m["full_bytes"]  # the measurement sees a gather (freed memory reused: not all)
    assert m["sharded_growth"] < 0.1 * m["full_bytes"]


def odd_length(completion: str, row: dict) -> float:
    """A reward that a tiny model which answers nothing right still earns now and then (1 for a completion of
    odd length), so that every RL step changes the weights."""
    return float(len(completion) % 2)


ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.path.dirname(os.path.abspath(__file__))}",
       "OMP_NUM_THREADS": "1"}


def _train(args: list[str], nproc: int, timeout: int = 600) -> subprocess.CompletedProcess:
    env = ENV
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), "-m", "rlpost.cli", *args]
    else:
        cmd = [sys.executable, "-m", "rlpost.cli", *args]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


def _rl_lines(run) -> list[dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in x.items() if not k.startswith(("time", "step/tokens_per_s", "rollout/tokens_per_s"))
             and not k.endswith("tokens_per_s") and not k.startswith("mem/")} for x in lines if x["stage"] == "rl"]


def _resumes_on_two_ranks_as_it_ran(run, final: dict) -> None:
    """`run` killed right after step_2's checkpoint and resumed on 2 ranks: the same RL metrics and final weights
    (`final`, the uninterrupted run's model.safetensors), bit for bit."""
    two = _resume_copy(run, "two", "step_2")
    done = _train(["train", "--resume", str(two)], nproc=2)
    assert "step_2" in done.stdout
    again = load_file(str(two / "checkpoints" / "final" / "model.safetensors"))
    assert final.keys() == again.keys() and all(torch.equal(final[k], again[k]) for k in final)
    assert _rl_lines(two) == _rl_lines(run)


def _resume_copy(run, name: str, keep: str):
    """A copy of run directory `run` as if killed right after checkpoint `keep`: the later checkpoints gone."""
    copy = run.parent / name
    shutil.copytree(run, copy)
    for c in (copy / "checkpoints").iterdir():
        if c.name not in (keep, "reference", "sft"):
            shutil.rmtree(c)
    return copy


@pytest.mark.slow
def test_sharded_run_resumes_bit_identically(tmp_path):
    """`rlpost train` on 2 ranks writes its mid-RL checkpoint as shards (no model files, no optimizer in
    rlpost_state.pt), its final one as a model folder; resumed from the shards on 2 ranks it writes the same
    metrics and the same final weights, byte for byte, as the run never interrupted; on 1 rank it resumes and
    finishes; the same run in one process resumes from its own shards on 2 ranks. `rlpost export` of the run
    stopped there writes step 2's weights as a model folder. Another run's or a damaged shard is refused by
    --resume, naming it."""
    from rlpost.checkpoint import SHARDS_DIR, Checkpoint, read_meta, verify, CheckpointError

    out = tmp_path / "runs"
    args = ["train", "trainer.strategy=fsdp2", "rl.weight_sync=copy", f"out_dir={out}", "run_name=dcp",
            "task.reward=test_dcp:odd_length", "sft.steps=10", "sft.batch_size=16", "rl.steps=4",
            "rl.eval_every=0", "rl.save_every=2",
            "rollout.prompts_per_step=4", "rollout.k=4", "task.num_eval=8", "eval.samples_per_prompt=1",
            "model.n_layer=2", "model.n_embd=32", "model.n_head=2", "trainer.micro_batch_size=6", "threads=1"]
    _train(args, nproc=2)
    run = out / "dcp"
    step = run / "checkpoints" / "step_2"
    meta = read_meta(str(step))
    assert meta["sharded"] == {"folder": SHARDS_DIR, "world_size": 2}
    assert not (step / "model.safetensors").exists()
    assert sorted(os.listdir(step / SHARDS_DIR)) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert {f"{SHARDS_DIR}/__0_0.distcp", f"{SHARDS_DIR}/__1_0.distcp", f"{SHARDS_DIR}/.metadata"} \
        <= set(meta["sha256"])
    state = torch.load(step / "rlpost_state.pt", weights_only=False)
    assert "optimizer" not in state["stage"]["trainer"] and len(state["rng_ranks"]) == 2
    assert (run / "checkpoints" / "final" / "model.safetensors").exists()  # the end of the stage: a model folder
    final = load_file(str(run / "checkpoints" / "final" / "model.safetensors"))

    learned = _rl_lines(run)[2:]  # the steps after the checkpoint changed the weights: the comparison means something
    assert all(x["train/grad_norm"] > 0 for x in learned), learned

    _resumes_on_two_ranks_as_it_ran(run, final)

    one = _resume_copy(run, "one", "step_2")
    _train(["train", "--resume", str(one)], nproc=1)  # 2 -> 1 rank: the shards resharded onto one process
    assert [x["step"] for x in _rl_lines(one)] == [1, 2, 3, 4]
    assert _rl_lines(one)[:2] == _rl_lines(run)[:2]

    # `rlpost export` of a run stopped at the sharded step_2: the shards read whole into a model folder
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from rlpost.checkpoint import export_model
    from rlpost.config import ModelConfig
    from rlpost.models import load_model

    stopped = _resume_copy(run, "stopped", "step_2")
    assert export_model(str(stopped), str(tmp_path / "exported")) == str(stopped / "checkpoints" / "step_2")
    exported = load_model(ModelConfig(name=str(tmp_path / "exported"), device="cpu"))[0].state_dict()
    dcp_to_torch_save(str(step / SHARDS_DIR), str(tmp_path / "step_2.pt"))  # torch's own reading of the shards
    shards = torch.load(tmp_path / "step_2.pt", weights_only=False)["model"]
    assert exported.keys() == shards.keys() and all(torch.equal(exported[k], shards[k]) for k in exported)
    last = load_model(ModelConfig(name=str(run / "checkpoints" / "final"), device="cpu"))[0].state_dict()
    assert not all(torch.equal(exported[k], last[k]) for k in exported)  # step 2's, not the final weights

    # 1 -> 2 ranks: the same run in one process (a 1-rank group), resumed from its step_2 on 2 ranks
    _train([*args[:4], "run_name=solo", *args[5:]], nproc=1)
    solo = out / "solo"
    assert read_meta(str(solo / "checkpoints" / "step_2"))["sharded"]["world_size"] == 1
    widened = _resume_copy(solo, "widened", "step_2")
    _train(["train", "--resume", str(widened)], nproc=2)
    assert [x["step"] for x in _rl_lines(widened)] == [1, 2, 3, 4]
    assert _rl_lines(widened)[:2] == _rl_lines(solo)[:2]

    bad = _resume_copy(run, "bad", "step_2")
    shard = bad / "checkpoints" / "step_2" / SHARDS_DIR / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="belongs to another run"):  # copied in from elsewhere
        verify(Checkpoint(str(step), meta), str(run), run_id="another run's id")
    with pytest.raises(CheckpointError, match="shards/__1_0.distcp does not match"):
        verify(Checkpoint(str(bad / "checkpoints" / "step_2"), read_meta(str(bad / "checkpoints" / "step_2"))),
               str(bad))
    refused = subprocess.run([sys.executable, "-m", "rlpost.cli", "train", "--resume", str(bad)], env=ENV, cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "__1_0.distcp" in refused.stdout + refused.stderr


def test_each_rank_resumes_its_own_random_streams(monkeypatch):
    """A checkpoint of N ranks gives each of N resuming ranks its own streams; another number of ranks (or a
    checkpoint without them) takes rank 0's."""
    from rlpost import distributed as dist
    from rlpost.run import rank_rng

    state = {"rng": "rank 0", "rng_ranks": ["rank 0", "rank 1"]}
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "rank", lambda: 1)
    assert rank_rng(state) == "rank 1"
    assert rank_rng({"rng": "rank 0"}) == "rank 0"
    monkeypatch.setattr(dist, "world_size", lambda: 3)
    assert rank_rng(state) == "rank 0"


def test_a_trainer_state_without_the_optimizer_is_only_for_a_sharded_trainer():
    """`state_dict(optimizer=False)` leaves AdamW's state out (the shards hold it); an unsharded trainer, whose
    checkpoints keep it in rlpost_state.pt, refuses such a state, naming what is missing."""
    from rlpost.models.gpt_mini import GPT, GPTConfig

    trainer = trainer_for(GPT(GPTConfig(vocab_size=16, block_size=16, n_layer=1, n_head=2, n_embd=16)), "single", 2)
    state = trainer.state_dict(optimizer=False)
    assert "optimizer" not in state and "optimizer" in trainer.state_dict()
    with pytest.raises(ValueError, match="trainer state lacks optimizer"):
        trainer.load_state_dict(state)


def test_a_half_written_sharded_checkpoint_is_removed(tmp_path):
    """A kill while the ranks write their shards leaves checkpoints/.tmp-<name>/shards/: never read, removed
    on resume."""
    from rlpost.checkpoint import clean_partial, list_checkpoints

    tmp = tmp_path / "checkpoints" / ".tmp-step_2" / "shards"
    tmp.mkdir(parents=True)
    (tmp / "__0_0.distcp").write_bytes(b"half")
    assert list_checkpoints(str(tmp_path)) == []
    assert clean_partial(str(tmp_path)) == [".tmp-step_2"]
    assert not (tmp_path / "checkpoints" / ".tmp-step_2").exists()


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    jobs = {"save": job_save, "load": job_load, "memory": job_memory}
    jobs[sys.argv[1]](*sys.argv[2:])
