"""Under trainer.strategy=fsdp2 every forward all-gathers the shards, so every rank must run as many forwards as the
others (rlpost.packing.even_forwards), even when packing=auto packs one rank's rows and pads another's.

Real torchrun processes on gloo/CPU, as tests/test_fsdp.py. Rank 0's rows have long-tailed lengths (packing saves
positions: auto packs them), rank 1's rows are all full length (nothing to save: auto pads them), and the two
plan different numbers of micro-batches. For the reference, a GRPO trainer, a PPO critic and a reward model's
scoring, the job counts each rank's forwards (a pre-hook on the first transformer block) and its packed ones, and
compares the results with one process running the whole batch. A hang is a failure: each worker gives up after
WATCHDOG seconds (printing where it waited), and the launcher kills torchrun if it is still there after that.
The tests take seconds each: they are marked slow (`pytest -m slow tests/test_fsdp_forwards.py`).
"""

from __future__ import annotations

import copy
import faulthandler
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_fsdp import ROOT, TOL, free_port, full_weights, max_diff  # noqa: E402
from test_fsdp_stages import scored_rows  # noqa: E402

ROWS = [[0, 1, 2, 3], [4, 5, 6, 7, 8]]  # rank 0: packed in 2 micro-batches of 2 rows' positions; rank 1: 3 padded
RESPONSES = [6, 1, 1, 1, 6, 6, 6, 6, 6]  # response lengths after 3 prompt tokens: T = 9
MICRO = 2
WATCHDOG = 240  # seconds a worker runs before it gives up (a hang); the launcher waits longer


def launch(job: str, out: str, timeout: int = WATCHDOG + 60) -> dict:
    """Run this file's `job` under torchrun on 2 ranks and read OUT; a run still going after `timeout` seconds
    (ranks waiting on each other's collectives) is killed, with its whole process group, and fails the test."""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), __file__, job, out]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{job}: the 2 ranks hung (killed after {timeout} s)\n{stdout[-2000:]}{stderr[-4000:]}")
    assert proc.returncode == 0, stdout[-3000:] + stderr[-6000:]
    with open(out) as f:
        return json.load(f)


# ---------------------------------------------------------------------------- what the workers run

def gpt_mini():
    from rlpost.models.gpt_mini import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=16, block_size=16, n_layer=2, n_head=2, n_embd=32))


def global_batch(model):
    """9 rows of 3 prompt tokens and RESPONSES tokens; old/ref log-probs near the model's, advantages, rewards."""
    g = torch.Generator().manual_seed(1)
    B, P, R = len(RESPONSES), 3, max(RESPONSES)
    ids = torch.randint(3, 16, (B, P + R), generator=g)
    response = (torch.arange(R)[None] < torch.tensor(RESPONSES)[:, None]).long()
    batch = scored_rows(model, ids, torch.ones(B, P, dtype=torch.long), response, g)
    return batch.replace(advantages=torch.randn(B, generator=g)[:, None] * batch.response_mask,
                         rewards=torch.randn(B, generator=g), group_ids=torch.arange(B) // 3)


class Forwards:
    """Counts the forwards of `models` (a pre-hook on each one's first transformer block) and the packed ones
    (rlpost.packing.Packed.run) inside `with`."""

    def __init__(self, *models):
        from rlpost.models import transformer_blocks

        self.blocks = [transformer_blocks(m)[0] for m in models]
        self.all = self.packed = 0

    def __enter__(self):
        from rlpost import packing

        self.hooks = [b.register_forward_pre_hook(self._count) for b in self.blocks]
        self.run = packing.Packed.run

        def run(packed, fn, *inputs):
            self.packed += len(packed.segments)
            return self.run(packed, fn, *inputs)

        packing.Packed.run = run
        return self

    def __exit__(self, *exc):
        from rlpost import packing

        packing.Packed.run = self.run
        for h in self.hooks:
            h.remove()

    def _count(self, module, args):
        self.all += 1

    def counts(self) -> list[list[int]]:
        """[[forwards, packed forwards] of each rank] (a collective)."""
        both = [None, None]
        torch.distributed.all_gather_object(both, [self.all, self.packed])
        return both


def trainer_cfg(strategy: str, packing="auto"):
    from rlpost.config import TrainerConfig

    return TrainerConfig(lr=1e-3, weight_decay=0.01, grad_clip=0.5, micro_batch_size=MICRO, strategy=strategy,
                         packing=packing)


def case_reference(rank: int) -> dict:
    from rlpost.reference import Reference

    policy = gpt_mini()
    batch = global_batch(policy)
    one = Reference(policy, trainer_cfg("single"))(batch).ref_logp
    ref = Reference(policy, trainer_cfg("fsdp2"))
    with Forwards(ref.model) as f:
        mine = ref(batch.select(ROWS[rank])).ref_logp
    return {"forwards": f.counts(), "diff": float((mine - one[ROWS[rank]]).abs().max())}


def case_grpo(rank: int) -> dict:
    from rlpost.algorithms import get_algorithm
    from rlpost.trainer import Trainer

    algo = get_algorithm("grpo", beta=0.04)
    single_model = gpt_mini()
    batch = global_batch(single_model)
    sharded_model = copy.deepcopy(single_model)
    single, sharded = Trainer(single_model, trainer_cfg("single")), Trainer(sharded_model, trainer_cfg("fsdp2"))
    mine = batch.select(ROWS[rank])
    ones = [single.step(batch, algo.compute_loss) for _ in range(2)]  # (outside the count: it may pack too)
    with Forwards(sharded_model) as f:
        twos = [sharded.step(mine, algo.compute_loss) for _ in range(2)]
    out = {"packing": sharded.packing, "forwards": f.counts(),
           "losses": [[a["train/loss"], b["train/loss"]] for a, b in zip(ones, twos)],
           "grads": [[a["train/grad_norm"], b["train/grad_norm"]] for a, b in zip(ones, twos)]}
    out["weights"] = max_diff(full_weights(sharded_model), single_model.state_dict())
    return out


def case_ppo(rank: int) -> dict:
    from rlpost.algorithms import get_algorithm
    from rlpost.critic import Critic
    from rlpost.trainer import Trainer

    algo = get_algorithm("ppo")
    out = {}
    for strategy in ("single", "fsdp2"):
        model = gpt_mini()
        batch = global_batch(model)
        critic = Critic.build(model, "separate", trainer_cfg(strategy))
        with torch.no_grad():  # a head that starts at zero reads nothing yet: give it weights
            critic.head.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
        trainer = Trainer(model, trainer_cfg(strategy), critic=critic, critic_lr=3e-3)
        rows = ROWS[rank] if strategy == "fsdp2" else list(range(len(batch)))
        batch = batch.select(rows)
        with Forwards(critic.trunk) as f:
            with torch.no_grad():
                values = critic(batch)
        if strategy == "fsdp2":
            out["value_forwards"] = f.counts()
        m = trainer.step(algo.compute_advantages(batch.replace(values=values)), algo.compute_loss)
        weights = full_weights(model)
        weights.update({f"critic.{k}": v for k, v in critic.full_state_dict().items()})
        out[strategy] = {"values": values, "loss": m["train/loss"], "weights": weights, "packing": critic.packing}
    single, sharded = out.pop("single"), out.pop("fsdp2")
    weights = max_diff(sharded["weights"], single["weights"]) if rank == 0 else 0.0  # the critic's: on rank 0 only
    return {**out, "values": float((sharded["values"] - single["values"][ROWS[rank]]).abs().max()),
            "losses": [single["loss"], sharded["loss"]], "weights": weights, "packing": sharded["packing"]}


def case_logprobs(rank: int) -> dict:
    """Trainer.logprobs (a rollout correction's proximal log-probs) on ranks with 2 and 3 micro-batches."""
    from rlpost.trainer import Trainer

    out = {}
    for packing in (False, True, "auto"):
        model = gpt_mini()
        batch = global_batch(model)
        one = Trainer(copy.deepcopy(model), trainer_cfg("single", packing)).logprobs(batch)
        sharded = Trainer(model, trainer_cfg("fsdp2", packing))
        with Forwards(model) as f:
            mine = sharded.logprobs(batch.select(ROWS[rank]))
        out[str(packing)] = {"forwards": f.counts(), "diff": float((mine - one[ROWS[rank]]).abs().max())}
    return out


def case_logprobs_no_rows(rank: int) -> dict:
    """Trainer.logprobs on a rank without rows (rank 0) while rank 1 scores the whole batch."""
    from rlpost import distributed as dist
    from rlpost.trainer import Trainer

    out = {}
    for packing in (False, True, "auto"):
        model = gpt_mini()
        batch = global_batch(model)
        one = Trainer(copy.deepcopy(model), trainer_cfg("single", packing)).logprobs(batch)
        rows = [[], list(range(len(batch)))][rank]
        with Forwards(model) as f:
            mine = Trainer(model, trainer_cfg("fsdp2", packing)).logprobs(batch.select(rows))
        diff = float((mine - one[rows]).abs().max()) if rows else 0.0
        out[str(packing)] = {"forwards": f.counts(), "shape": list(mine.shape), "diff": dist.reduce_max(diff)}
    return out


def case_reward_model(rank: int) -> dict:
    """RewardModel.score of a sharded reward model (as fitted under fsdp2) in micro-batches: on ranks with 2 and 3
    micro-batches, then on a rank without rows (rank 0) beside one with the whole batch; against one process's
    plain whole-batch score."""
    from rlpost import distributed as dist
    from rlpost.env.reward_model import RewardModel

    out = {}
    for label, packing, rows in [(str(p), p, ROWS[rank]) for p in (False, True, "auto")] + \
            [("no_rows", "auto", [[], list(range(len(RESPONSES)))][rank])]:
        rm = RewardModel(gpt_mini())
        with torch.no_grad():  # a head that starts at zero scores nothing yet: give it weights
            rm.head.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
            rm.head.bias.fill_(0.3)
            batch = global_batch(rm.trunk)
            one = rm.score(batch)
            rm.shard()
            with Forwards(rm.trunk) as f:
                mine = rm.score(batch.select(rows), MICRO, None, packing)
        diff = float((mine - one[rows]).abs().max()) if rows else 0.0
        out[label] = {"forwards": f.counts(), "shape": list(mine.shape), "diff": dist.reduce_max(diff)}
    return out


def job(out: str, cases: str) -> None:
    from rlpost import distributed as dist

    # ranks waiting on each other's collectives never return: each worker prints where it waits and exits by
    # itself before the launcher's timeout (torchrun starts its workers in sessions of their own)
    faulthandler.dump_traceback_later(WATCHDOG, exit=True)
    dist.init()
    rank = dist.rank()
    run = {"reference": case_reference, "grpo": case_grpo, "ppo": case_ppo, "logprobs": case_logprobs,
           "logprobs_no_rows": case_logprobs_no_rows, "reward_model": case_reward_model}
    result = {name: run[name](rank) for name in cases.split(",")}
    for r in result.values():  # each rank's largest difference
        for k in ("diff", "values", "weights"):
            if k in r:
                r[k] = dist.reduce_max(r[k])
    if dist.is_main():
        with open(out, "w") as f:
            json.dump(result, f)
    dist.destroy()


# ---------------------------------------------------------------------------- the tests

def _packs_on_rank_0_only_with_equal_forwards(forwards: list[list[int]]) -> None:
    (all0, packed0), (all1, packed1) = forwards
    assert all0 == all1, f"forwards per rank: {forwards} (FSDP2's all-gathers must pair up)"
    assert packed0 == all0 > 0 and packed1 == 0, f"[forwards, packed] per rank: {forwards}"


@pytest.mark.slow
def test_ranks_where_auto_packs_and_pads_run_as_many_forwards_and_compute_as_one_process(tmp_path):
    r = launch("auto", str(tmp_path / "auto.json"))
    print(json.dumps(r))
    ref = r["reference"]
    _packs_on_rank_0_only_with_equal_forwards(ref["forwards"])
    assert ref["forwards"][1][0] == 3  # rank 1: 3 padded micro-batches; rank 0 adds a third to its 2 packed
    assert ref["diff"] < TOL
    grpo = r["grpo"]
    assert grpo["packing"] == "auto"  # no longer turned off under fsdp2
    _packs_on_rank_0_only_with_equal_forwards(grpo["forwards"])
    for (a, b) in grpo["losses"] + grpo["grads"]:
        assert abs(a - b) < TOL
    assert grpo["weights"] < TOL
    ppo = r["ppo"]
    assert ppo["packing"] == "auto"
    _packs_on_rank_0_only_with_equal_forwards(ppo["value_forwards"])
    assert ppo["values"] < TOL and abs(ppo["losses"][0] - ppo["losses"][1]) < TOL
    assert ppo["weights"] < TOL


@pytest.mark.slow
def test_trainer_logprobs_pads_the_rank_with_fewer_micro_batches(tmp_path):
    r = launch("logprobs", str(tmp_path / "logprobs.json"))["logprobs"]
    print(json.dumps(r))
    for packing, c in r.items():
        assert c["forwards"][0][0] == c["forwards"][1][0] == 3, (packing, c["forwards"])
        assert c["diff"] < TOL, packing
    assert r["auto"]["forwards"][0][1] > 0 and r["auto"]["forwards"][1][1] == 0  # packed on rank 0 only



@pytest.mark.slow
def test_trainer_logprobs_on_a_rank_without_rows_pads_instead_of_failing(tmp_path):
    """A rank with no rows (a rollout correction's proximal log-probs) plans no micro-batch, whatever the packing,
    and runs the other rank's count of padding forwards; the other rank's log-probs are one process's."""
    r = launch("no_rows", str(tmp_path / "no_rows.json"))["logprobs_no_rows"]
    print(json.dumps(r))
    for packing, c in r.items():
        assert c["forwards"][0][0] == c["forwards"][1][0] > 0, (packing, c["forwards"])
        assert c["shape"] == [0, 9] and c["diff"] < TOL, (packing, c)


@pytest.mark.slow
def test_a_sharded_reward_model_scores_uneven_ranks_in_as_many_forwards_as_one_process(tmp_path):
    """RewardModel.score in micro-batches, sharded: ranks with 2 and 3 micro-batches (and a rank without rows) run
    as many forwards each, whatever the packing; the rewards are one process's plain whole-batch ones."""
    r = launch("reward_model", str(tmp_path / "reward_model.json"))["reward_model"]
    print(json.dumps(r))
    for label, c in r.items():
        assert c["forwards"][0][0] == c["forwards"][1][0] > 0, (label, c["forwards"])
        assert c["diff"] < TOL, (label, c)
    assert r["False"]["forwards"][0][0] == 3  # rank 0's 2 micro-batches and a padding one
    _packs_on_rank_0_only_with_equal_forwards(r["auto"]["forwards"])
    assert r["no_rows"]["shape"] == [0]


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    jobs = {"auto": "reference,grpo,ppo", "logprobs": "logprobs", "no_rows": "logprobs_no_rows",
            "reward_model": "reward_model"}
    job(sys.argv[2], jobs[sys.argv[1]])
