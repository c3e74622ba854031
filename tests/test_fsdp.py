"""Sharded training (trainer.strategy=fsdp2) against one process, with real torchrun/gloo processes on 127.0.0.1.

The jobs below run this file as a worker (`python -m torch.distributed.run ... tests/test_fsdp.py JOB OUT ...`):
each rank checks what it can and rank 0 writes its numbers to OUT (JSON), which the tests read.

- equivalence: 2 ranks, each training on its share of one fixed global batch (uneven shares, so one rank
  pads a micro-batch), equal one process training on the whole batch: the losses, gradient norms and the
  updated weights, for gpt_mini and a tiny Llama, token-mean and seq-mean-token-mean, 3 AdamW steps;
- checkpoint (the same job): the 2-rank policy saved as a model folder loads in transformers with the
  gathered weights, and the full optimizer state is written; one more 2-rank step is the reference for
- resume1: one process (a 1-rank group) loading that checkpoint takes the same next step;
- end to end: `rlpost train` under torchrun, 2 processes, SFT then 3 RL steps; its step-2 checkpoint resumes
  in one process.
"""

import copy
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5
STEPS = 3


def launch(job: str, out: str, *args: str, nproc: int = 2, timeout: int = 300, script: str = __file__) -> dict:
    """Run `script`'s (this file's) `job` under torchrun with `nproc` ranks (nproc=0: a plain process) and read
    OUT."""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), script, job, out, *args]
    else:
        cmd = [sys.executable, script, job, out, *args]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    with open(out) as f:
        return json.load(f)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------- what the workers train

def make_model(kind: str, llama_dir: str):
    from rlpost.models import HFCausalLM
    from rlpost.models.gpt_mini import GPT, GPTConfig

    torch.manual_seed(0)
    if kind == "gpt_mini":
        return GPT(GPTConfig(vocab_size=16, block_size=16, n_layer=2, n_head=2, n_embd=32))
    from transformers import AutoModelForCausalLM

    return HFCausalLM(AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32))


def global_batch(model, vocab: int):
    """8 rows, 2 prompts x 4 samples (so one process scores each prompt once), left-padded prompts, responses
    of 1-5 tokens; old_logp is the model's own (+ noise, so the ratios are clipped), advantages per row."""
    from rlpost.batch import Batch
    from rlpost.models import token_logprobs

    g = torch.Generator().manual_seed(1)
    B, P, R = 8, 4, 5
    prompts = torch.randint(3, vocab, (2, P), generator=g).repeat_interleave(4, 0)
    ids = torch.cat([prompts, torch.randint(3, vocab, (B, R), generator=g)], 1)
    lengths = torch.tensor([5, 1, 3, 4, 2, 5, 3, 1])
    response = (torch.arange(R)[None] < lengths[:, None]).long()
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[4:, 0] = 0  # the second prompt is one token shorter: left padding
    ids[4:, 0] = 0
    attention = torch.cat([prompt_mask, response], 1)
    response_mask = torch.cat([torch.zeros(B, P, dtype=torch.long), response], 1)
    batch = Batch(input_ids=ids * attention, attention_mask=attention, response_mask=response_mask)
    with torch.no_grad():
        logp = token_logprobs(model, batch)
    noise = 0.3 * torch.randn(B, P + R, generator=g)
    adv = torch.randn(B, generator=g)[:, None] * response_mask
    return batch.replace(old_logp=(logp + noise) * response_mask, ref_logp=(logp - noise.abs()) * response_mask,
                         advantages=adv.float(), group_ids=torch.arange(B) // 4)


def trainer_for(model, strategy: str, micro: int, packing: bool = False):
    from rlpost.config import TrainerConfig
    from rlpost.trainer import Trainer

    return Trainer(model, TrainerConfig(lr=1e-3, weight_decay=0.01, grad_clip=0.5, micro_batch_size=micro,
                                        strategy=strategy, packing=packing))


def full_weights(model) -> dict[str, torch.Tensor]:
    from rlpost.distributed import full_state_dict

    return {k: v.detach().clone() for k, v in full_state_dict(model).items()}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a.keys() ^ b.keys()))[:5]
    return max(float((a[k] - b[k]).abs().max()) for k in a)


RANK_ROWS = [list(range(0, 5)), list(range(5, 8))]  # uneven: rank 0 runs 3 micro-batches of 2, rank 1 two


# ---------------------------------------------------------------------------- the jobs

def job_equivalence(out: str, llama_dir: str, ckpt_dir: str) -> None:
    from rlpost import distributed as dist
    from rlpost.algorithms import get_algorithm
    from rlpost.models import save_model

    dist.init()
    rank = dist.rank()
    result = {"cases": {}}
    for kind in ("gpt_mini", "llama"):
        # packed: each rank's packed micro-batches run as one forward each (their segments would differ by rank)
        for agg, packing in (("token-mean", False), ("seq-mean-token-mean", False), ("token-mean", True)):
            algo = get_algorithm("grpo", loss_agg=agg, beta=0.04)
            single_model = make_model(kind, llama_dir)
            vocab = 16 if kind == "gpt_mini" else single_model.hf.config.vocab_size
            batch = global_batch(single_model, vocab)
            sharded_model = copy.deepcopy(single_model)
            single = trainer_for(single_model, "single", 3, packing)
            sharded = trainer_for(sharded_model, "fsdp2", 2, packing)
            mine = batch.select(RANK_ROWS[rank])
            case = {"single_loss": [], "sharded_loss": [], "single_grad": [], "sharded_grad": [], "metrics": []}
            for _ in range(STEPS):
                a, b = single.step(batch, algo.compute_loss), sharded.step(mine, algo.compute_loss)
                case["single_loss"].append(a["train/loss"])
                case["sharded_loss"].append(b["train/loss"])
                case["single_grad"].append(a["train/grad_norm"])
                case["sharded_grad"].append(b["train/grad_norm"])
                case["metrics"].append(max(abs(a[k] - b[k]) for k in a if k.startswith(("loss/", "train/"))
                                           and k != "train/lr"))
            case["weights"] = max_diff(full_weights(sharded_model), single_model.state_dict())
            # every rank must report the same (global) numbers
            last = case["sharded_loss"][-1]
            case["ranks_agree"] = dist.reduce_max(last) == dist.reduce_min(last)
            result["cases"][f"{kind}/{agg}" + ("/packed" if packing else "")] = case

            if kind == "llama" and agg == "token-mean" and not packing:  # a 2-rank run's checkpoint, one more step
                model = dist.unsharded(sharded_model)
                state = sharded.state_dict()
                if dist.is_main():
                    save_model(model, _tokenizer(llama_dir), ckpt_dir)
                    torch.save({"trainer": state, "batch": batch}, os.path.join(ckpt_dir, "state.pt"))
                    from transformers import AutoModelForCausalLM

                    loaded = AutoModelForCausalLM.from_pretrained(ckpt_dir).state_dict()
                    gathered = {k.removeprefix("hf."): v for k, v in full_weights(sharded_model).items()}
                    result["saved_vs_gathered"] = max_diff(loaded, gathered)
                    result["optimizer_entries"] = len(state["optimizer"]["state"])
                else:
                    full_weights(sharded_model)  # the gather is a collective
                sharded.step(mine, algo.compute_loss)
                after = full_weights(sharded_model)
                if dist.is_main():
                    torch.save({k.removeprefix("hf."): v for k, v in after.items()},
                               os.path.join(ckpt_dir, "next_step_2ranks.pt"))
    result["guards"] = guards(dist.rank())
    if dist.is_main():
        with open(out, "w") as f:
            json.dump(result, f)
    dist.destroy()


def guards(rank: int) -> dict:
    """A non-finite loss on one rank skips the step on every rank; a rank without rows makes every rank skip.
    Neither hangs (the collectives still pair up) and neither changes the weights."""
    from rlpost.algorithms import get_algorithm

    algo = get_algorithm("grpo")
    model = make_model("gpt_mini", "")
    batch = global_batch(model, 16)
    trainer = trainer_for(model, "fsdp2", 2)
    before = full_weights(model)

    def nan_on_rank_1(logp, b):
        loss, metrics = algo.compute_loss(logp, b)
        return (loss * float("nan") if rank == 1 else loss), metrics

    nonfinite = trainer.step(batch.select(RANK_ROWS[rank]), nan_on_rank_1)
    empty = trainer.step(batch.select(RANK_ROWS[0] if rank == 0 else []), algo.compute_loss)
    return {"skipped_nonfinite": nonfinite["train/skipped_nonfinite"], "skipped_empty": empty["train/skipped_empty"],
            "unchanged": max_diff(full_weights(model), before) == 0.0, "steps": trainer.steps}


def _tokenizer(folder: str):
    from rlpost.models import HFTokenizer
    from transformers import AutoTokenizer

    return HFTokenizer(AutoTokenizer.from_pretrained(folder))


def job_resume1(out: str, ckpt_dir: str) -> None:
    """One process (no torchrun: a 1-rank group) resumes the 2-rank checkpoint and takes the next step."""
    from rlpost import distributed as dist
    from rlpost.algorithms import get_algorithm
    from rlpost.config import ModelConfig
    from rlpost.models import load_model

    model, _ = load_model(ModelConfig(name=ckpt_dir, device="cpu"))
    dist.init()
    trainer = trainer_for(model, "fsdp2", 2)
    saved = torch.load(os.path.join(ckpt_dir, "state.pt"), weights_only=False)
    trainer.load_state_dict(saved["trainer"])
    trainer.step(saved["batch"], get_algorithm("grpo", loss_agg="token-mean", beta=0.04).compute_loss)
    two_ranks = torch.load(os.path.join(ckpt_dir, "next_step_2ranks.pt"))
    mine = {k.removeprefix("hf."): v for k, v in full_weights(model).items()}
    with open(out, "w") as f:
        json.dump({"world": dist.world_size(), "vs_2ranks": max_diff(mine, two_ranks), "steps": trainer.steps}, f)
    dist.destroy()


def job_reference(out: str, llama_dir: str) -> None:
    """The reference under fsdp2: each rank scores its own rows with a sharded copy (forward-only FSDP2), padded
    and packed micro-batches, uneven shares and a rank with no rows; each holds its shard of the parameters."""
    from torch.distributed.tensor import DTensor

    from rlpost import distributed as dist
    from rlpost.config import TrainerConfig
    from rlpost.reference import Reference

    dist.init()
    rank = dist.rank()
    result = {}
    for kind in ("gpt_mini", "llama"):
        policy = make_model(kind, llama_dir)
        vocab = 16 if kind == "gpt_mini" else policy.hf.config.vocab_size
        batch = global_batch(policy, vocab)
        for name, cfg, rows in (("padded", dict(micro_batch_size=2), RANK_ROWS[rank]),
                                ("packed", dict(packing=True, micro_batch_tokens=12), RANK_ROWS[rank]),
                                ("one rank empty", dict(micro_batch_size=2), RANK_ROWS[0] if rank == 0 else [])):
            one = Reference(policy, TrainerConfig(**cfg))(batch).ref_logp  # one process, the whole batch
            ref = Reference(policy, TrainerConfig(strategy="fsdp2", **cfg))
            mine = ref(batch.select(rows)).ref_logp
            diff = float((mine - one[rows]).abs().max()) if rows else 0.0
            held = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in ref.model.parameters())
            total = sum(p.numel() for p in policy.parameters())
            shares = [None] * dist.world_size()
            torch.distributed.all_gather_object(shares, held / total)
            result[f"{kind}/{name}"] = {"diff": dist.reduce_max(diff), "shares": shares,
                                        "sharded": all(isinstance(p, DTensor) for p in ref.model.parameters())}
    if dist.is_main():
        with open(out, "w") as f:
            json.dump(result, f)
    dist.destroy()


# ---------------------------------------------------------------------------- the tests

def test_a_sharded_run_is_refused_when_it_cannot_work(tmp_path, monkeypatch):
    from rlpost.config import load_config
    from rlpost.run import train

    # refused at config load, before any model loads (the topology's loop checks its settings)
    with pytest.raises(ValueError, match="rl.weight_sync=copy or auto"):
        load_config(None, [f"out_dir={tmp_path}", "trainer.strategy=fsdp2", "rl.weight_sync=pointer"])
    with pytest.raises(ValueError, match="rl.topology=async with sharded training is not supported"):
        load_config(None, [f"out_dir={tmp_path}", "trainer.strategy=fsdp2", "rl.topology=async"])
    # and by train() too, for a config made in code
    cfg = load_config(None, [f"out_dir={tmp_path}", "trainer.strategy=fsdp2"])
    cfg.rl.weight_sync = "pointer"
    with pytest.raises(ValueError, match="rl.weight_sync=copy or auto"):
        train(cfg)
    # an SFT-only run never rolls out for RL: its rl.* settings do not matter
    load_config(None, [f"out_dir={tmp_path}", "trainer.strategy=fsdp2", "rl.weight_sync=pointer", "rl.steps=0"])
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun's ranks, each about to run a whole single-process run
    with pytest.raises(ValueError, match="set trainer.strategy=fsdp2"):
        train(load_config(None, [f"out_dir={tmp_path}"]))
    assert not any(tmp_path.iterdir())  # refused before a run directory was made


@pytest.fixture(scope="module")
def equivalence(tmp_path_factory, tiny_llama_dir):
    tmp = tmp_path_factory.mktemp("fsdp")
    ckpt = tmp / "ckpt"
    t0 = time.perf_counter()
    result = launch("equivalence", str(tmp / "eq.json"), tiny_llama_dir, str(ckpt))
    result["seconds"] = time.perf_counter() - t0
    result["ckpt"] = str(ckpt)
    return result


@pytest.mark.parametrize("case", ["gpt_mini/token-mean", "gpt_mini/seq-mean-token-mean", "llama/token-mean",
                                  "llama/seq-mean-token-mean", "gpt_mini/token-mean/packed",
                                  "llama/token-mean/packed"])
def test_two_ranks_train_like_one_process(equivalence, case):
    c = equivalence["cases"][case]
    print(f"{case}: weights max |diff| {c['weights']:.2e}, losses {c['single_loss']} vs {c['sharded_loss']}")
    for a, b in zip(c["single_loss"], c["sharded_loss"]):
        assert abs(a - b) < TOL
    for a, b in zip(c["single_grad"], c["sharded_grad"]):
        assert abs(a - b) < TOL
    assert max(c["metrics"]) < TOL
    assert c["weights"] < TOL
    assert c["ranks_agree"]
    assert len(set(c["single_loss"])) == STEPS  # the steps changed the weights


def test_one_rank_skipping_skips_on_every_rank(equivalence):
    assert equivalence["guards"] == {"skipped_nonfinite": 1.0, "skipped_empty": 1.0, "unchanged": True, "steps": 0}


def test_two_rank_checkpoint_loads_in_transformers_and_resumes_on_one_rank(equivalence, tmp_path):
    assert equivalence["saved_vs_gathered"] == 0.0
    assert equivalence["optimizer_entries"] > 0  # the full AdamW state, gathered on rank 0
    one = launch("resume1", str(tmp_path / "resume.json"), equivalence["ckpt"], nproc=0)
    print(f"1-rank resume vs 2-rank continuation: max |diff| {one['vs_2ranks']:.2e}")
    assert one["world"] == 1 and one["steps"] == STEPS + 1
    assert one["vs_2ranks"] < TOL


def test_two_ranks_hold_half_the_reference_each_and_score_like_one_process(tmp_path, tiny_llama_dir):
    result = launch("reference", str(tmp_path / "reference.json"), tiny_llama_dir)
    assert len(result) == 6
    for case, r in result.items():
        print(f"{case}: ref_logp max |diff| {r['diff']:.2e}, parameter shares {r['shares']}")
        assert r["diff"] < TOL, case
        assert r["sharded"], case
        assert all(0.4 < s < 0.6 for s in r["shares"]), (case, r["shares"])  # about half each, not a whole copy
        assert abs(sum(r["shares"]) - 1) < 1e-6, case


def test_rlpost_train_under_torchrun(tmp_path):
    """`rlpost train` on 2 ranks: SFT, then 3 sharded RL steps; rank 0 alone writes metrics.jsonl and the
    checkpoints; `--resume` in one process continues from the 2-rank step checkpoint."""
    out = tmp_path / "runs"
    args = ["train", "trainer.strategy=fsdp2", "rl.weight_sync=copy", f"out_dir={out}", "run_name=fsdp",
            "sft.steps=20", "sft.batch_size=16", "rl.steps=3", "rl.eval_every=2", "rl.save_every=2",
            "rollout.prompts_per_step=4", "rollout.k=4", "task.num_eval=20", "eval.samples_per_prompt=1",
            "model.n_layer=2", "model.n_embd=32", "model.n_head=2", "trainer.micro_batch_size=6", "threads=1"]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "rlpost.cli", *args]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    run = out / "fsdp"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rl = [x["step"] for x in lines if x["stage"] == "rl"]
    assert rl == [1, 2, 3]  # once, not once per rank
    assert all(x["sync/bytes"] > 0 for x in lines if x["stage"] == "rl")
    assert done.stdout.count("rlpost: held-out pass@1") == 2  # after sft, after rl: rank 0 only
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "ok" and "pass@1_rl" in summary
    assert (run / "checkpoints" / "final" / "model.safetensors").exists()
    assert (run / "checkpoints" / "step_2" / "rlpost_state.pt").exists()

    # the 2-rank checkpoint at step 2 resumes in one process (a 1-rank group): step 3 again, then the end
    shutil.rmtree(run / "checkpoints" / "final")
    again = subprocess.run([sys.executable, "-m", "rlpost.cli", "train", "--resume", str(run)], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-6000:]
    assert "resuming from" in again.stdout and "step_2" in again.stdout
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["stage"] == "rl"] == [1, 2, 3]
    assert json.loads((run / "summary.json").read_text())["status"] == "ok"


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    jobs = {"equivalence": job_equivalence, "resume1": job_resume1, "reference": job_reference}
    jobs[sys.argv[1]](*sys.argv[2:])
