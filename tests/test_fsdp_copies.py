"""What a sharded run (trainer.strategy=fsdp2) holds on each rank: no full copy of a PPO critic's state in its
checkpoints, no full policy on a resume from shards, and the rollout engine's copy in the rollout dtype and
released while the trainer works.

Real torchrun processes on gloo/CPU, as tests/test_fsdp.py (whose launcher, batch and trainer helpers the jobs
reuse). The tests that launch processes take seconds each: they are marked slow
(`pytest -m slow tests/test_fsdp_copies.py`).
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_fsdp import ROOT, TOL, full_weights, max_diff  # noqa: E402
from test_fsdp import launch as fsdp_launch  # noqa: E402
from test_fsdp_stages import PPO_ROWS, gpt_mini, ppo_batch  # noqa: E402
from test_dcp import _resume_copy, _rl_lines, _train  # noqa: E402


def launch(job: str, out: str, *args: str, nproc: int = 2, timeout: int = 300) -> dict:
    """test_fsdp's launcher, running this file's `job`."""
    return fsdp_launch(job, out, *args, nproc=nproc, timeout=timeout, script=__file__)


def _rows(world: int, rank: int) -> list[int]:
    return PPO_ROWS[rank] if world == 2 else list(range(8))


# ---------------------------------------------------------------------------- a PPO critic's shards

def _ppo_trainer(seed_head: bool = True):
    """gpt_mini, a separate critic, and a sharded trainer over both (the RL stage's PPO set-up), and the 8-row
    PPO batch (scored by the model before it is sharded)."""
    from rlpost.config import TrainerConfig
    from rlpost.critic import Critic
    from rlpost.trainer import Trainer

    model = gpt_mini()
    batch = ppo_batch(model, 16)
    cfg = TrainerConfig(lr=1e-3, weight_decay=0.01, grad_clip=0.5, micro_batch_size=2, strategy="fsdp2")
    critic = Critic.build(model, "separate", cfg)
    if seed_head:  # a head that starts at zero reads nothing yet: give it weights
        with torch.no_grad():
            critic.head.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    return model, critic, Trainer(model, cfg, critic=critic, critic_lr=3e-3), batch


def _ppo_step(model, critic, trainer, batch) -> None:
    from rlpost.algorithms import get_algorithm

    algo = get_algorithm("ppo")
    with torch.no_grad():
        scored = batch.replace(values=critic(batch))
    trainer.step(algo.compute_advantages(scored), algo.compute_loss)


def _critic_state(model, critic, trainer) -> dict:
    """The policy's and the critic's full weights and AdamW's full state (both modules'), gathered on rank 0."""
    optimizer = trainer._optimizer_state()
    tensors = {**{f"policy.{k}": v for k, v in full_weights(model).items()},
               **{f"critic.{k}": v.detach().clone() for k, v in critic.full_state_dict().items()}}
    for name, entry in optimizer.get("state", {}).items():
        tensors.update({f"adam.{name}.{k}": v.detach().clone().float().reshape(-1) for k, v in entry.items()
                        if isinstance(v, torch.Tensor)})
    return tensors


def job_critic_save(out: str, folder: str) -> None:
    """2 PPO steps on this run's ranks, the policy, the critic and AdamW's state written as shards; the
    gathered state recorded, then one more step."""
    from torch.distributed.checkpoint import FileSystemReader

    from rlpost import distributed as dist

    dist.init()
    world, rank = dist.world_size(), dist.rank()
    model, critic, trainer, batch = _ppo_trainer()
    mine = batch.select(_rows(world, rank))
    for _ in range(2):
        _ppo_step(model, critic, trainer, mine)
    dist.save_shards(os.path.join(folder, "shards"), model, trainer.optimizer, critic)
    saved = _critic_state(model, critic, trainer)
    _ppo_step(model, critic, trainer, mine)
    after = _critic_state(model, critic, trainer)
    if dist.is_main():
        torch.save({"saved": saved, "after": after, "batch": batch}, os.path.join(folder, "reference.pt"))
        keys = sorted(FileSystemReader(os.path.join(folder, "shards")).read_metadata().state_dict_metadata)
        with open(out, "w") as f:
            json.dump({"world": world, "keys": keys}, f)
    dist.destroy()


def job_critic_load(out: str, folder: str) -> None:
    """A fresh sharded PPO trainer (other initial weights) loads the shards; its gathered state against the
    saved one, then the same next step."""
    from rlpost import distributed as dist

    dist.init()
    world, rank = dist.world_size(), dist.rank()
    torch.manual_seed(123)
    model, critic, trainer, _ = _ppo_trainer(seed_head=False)
    with torch.no_grad():  # everything must come from the shards
        for p in [*model.parameters(), *critic.parameters()]:
            p.add_(0.25)
    dist.load_shards(os.path.join(folder, "shards"), model, trainer.optimizer, critic=critic)
    ref = torch.load(os.path.join(folder, "reference.pt"), weights_only=False)
    loaded = _critic_state(model, critic, trainer)
    _ppo_step(model, critic, trainer, ref["batch"].select(_rows(world, rank)))
    after = _critic_state(model, critic, trainer)
    if dist.is_main():
        with open(out, "w") as f:
            json.dump({"world": world, "loaded": max_diff(loaded, ref["saved"]),
                       "next_step": max_diff(after, ref["after"])}, f)
    dist.destroy()


@pytest.mark.slow
@pytest.mark.parametrize("save_ranks,load_ranks", [(2, 2), (2, 1), (1, 2)])
def test_a_ppo_critic_and_its_optimizer_state_go_through_shards(tmp_path, save_ranks, load_ranks):
    """The shards hold the critic's weights and AdamW's moments of the critic's parameters (nothing of them is
    gathered); loaded into a fresh trainer they are bit for bit the saved ones, whatever the ranks on either
    side, and the next step on as many ranks is bit-identical (on other ranks equal to float tolerance)."""
    folder = tmp_path / "ckpt"
    saved = launch("critic_save", str(tmp_path / "save.json"), str(folder), nproc=save_ranks if save_ranks > 1 else 0)
    keys = saved["keys"]
    assert "critic.head.weight" in keys and any(k.startswith("critic.trunk.") for k in keys)
    assert "optimizer.state.critic.head.weight.exp_avg_sq" in keys
    assert any(k.startswith("optimizer.state.policy.") for k in keys)
    loaded = launch("critic_load", str(tmp_path / "load.json"), str(folder), nproc=load_ranks if load_ranks > 1 else 0)
    print(f"{save_ranks} -> {load_ranks} ranks: {loaded}")
    assert loaded["world"] == load_ranks and loaded["loaded"] == 0.0
    if save_ranks == load_ranks:
        assert loaded["next_step"] == 0.0
    else:
        assert loaded["next_step"] < TOL


# a tiny 2-rank run (SFT, then RL) with a mid-RL sharded checkpoint at step 2 (test_dcp's reward and launcher)
RUN = ["train", "trainer.strategy=fsdp2", "rl.weight_sync=copy", "task.reward=test_dcp:odd_length", "sft.steps=10",
       "sft.batch_size=16", "rl.steps=4", "rl.eval_every=0", "rl.save_every=2", "rollout.prompts_per_step=4",
       "rollout.k=4", "task.num_eval=8", "eval.samples_per_prompt=1", "model.n_layer=2", "model.n_embd=32",
       "model.n_head=2", "trainer.micro_batch_size=6", "threads=1"]


@pytest.mark.slow
def test_a_sharded_ppo_run_resumes_bit_identically_from_its_shards(tmp_path):
    """`rlpost train` on 2 ranks with PPO and a separate critic: the mid-RL checkpoint keeps neither the critic's
    weights nor AdamW's state in rlpost_state.pt (they are in its shards); resumed from it on 2 ranks the run
    writes the same metrics and the same final weights, byte for byte, as the run never interrupted."""
    from safetensors.torch import load_file

    out = tmp_path / "runs"
    _train([*RUN, "algorithm={name: ppo}", "critic.type=separate", f"out_dir={out}", "run_name=ppo"], nproc=2)
    run = out / "ppo"
    state = torch.load(run / "checkpoints" / "step_2" / "rlpost_state.pt", weights_only=False)["stage"]
    assert state["critic"] is None and "optimizer" not in state["trainer"]
    final = load_file(str(run / "checkpoints" / "final" / "model.safetensors"))
    assert all(x["train/grad_norm"] > 0 for x in _rl_lines(run)[2:])  # the steps after the checkpoint trained

    two = _resume_copy(run, "two", "step_2")
    done = _train(["train", "--resume", str(two)], nproc=2)
    assert "step_2" in done.stdout
    again = load_file(str(two / "checkpoints" / "final" / "model.safetensors"))
    assert final.keys() == again.keys() and all(torch.equal(final[k], again[k]) for k in final)
    assert _rl_lines(two) == _rl_lines(run)


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    jobs = {"critic_save": job_critic_save, "critic_load": job_critic_load}
    jobs[sys.argv[1]](*sys.argv[2:])
