"""LoRA under trainer.strategy=fsdp2: the frozen base and the adapters sharded together, against one process.

Real torchrun processes on gloo/CPU, launched with tests/test_fsdp.py's launcher (whose model, batch and trainer
helpers the jobs reuse):

- equivalence: 2 ranks (uneven shares of one fixed GRPO batch, KL term from the reference = the base with its
  adapters off) train LoRA adapters like one process: losses, reference log-probs, adapters, the adapters a
  weight sync sends, the merged weights a checkpoint saves, the fold at a stage's end, for gpt_mini and a tiny
  Llama; the base weights stay bit-equal to the initial ones; rank 1 drew other initial adapters, and a reset
  still puts back rank 0's on every rank;
- end to end: `rlpost train` with model.lora under torchrun, 2 processes, SFT then RL with a sharded mid-stage
  checkpoint; resuming it on 2 ranks gives the uninterrupted run's metrics and final weights.

Each test launches processes for tens of seconds: they are marked slow (`pytest -m slow tests/test_fsdp_lora.py`).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_fsdp import (RANK_ROWS, ROOT, TOL, free_port, global_batch, make_model, max_diff,  # noqa: E402
                       trainer_for)
from test_fsdp import launch as fsdp_launch  # noqa: E402

STEPS = 3
LORA = dict(r=4, alpha=8.0, dropout=0.0)


def launch(job: str, out: str, *args: str, nproc: int = 2, timeout: int = 300) -> dict:
    """test_fsdp's launcher, running this file's `job`."""
    return fsdp_launch(job, out, *args, nproc=nproc, timeout=timeout, script=__file__)


def _full(model) -> dict[str, torch.Tensor]:
    """Every weight of a (sharded) LoRA model, gathered, under its own names (base_layer and lora_A/B)."""
    from rlpost.distributed import full_state_dict

    return {k: v.detach().clone() for k, v in full_state_dict(model).items()}


def _split(state: dict) -> tuple[dict, dict]:
    from rlpost.models.lora import is_adapter_name

    return ({k: v for k, v in state.items() if not is_adapter_name(k)},
            {k: v for k, v in state.items() if is_adapter_name(k)})


# ---------------------------------------------------------------------------- the jobs

def job_equivalence(out: str, llama_dir: str, folder: str) -> None:
    from rlpost import distributed as dist
    from rlpost.algorithms import get_algorithm
    from rlpost.config import LORA_TARGETS, ModelConfig, TrainerConfig
    from rlpost.models import load_model, save_model
    from rlpost.models.lora import apply_lora, fold_adapters, initial_adapters, merged_state_dict
    from rlpost.reference import Reference
    from rlpost.rollout.engine import named_weights
    from rlpost.weight_sync import gathered_weights

    dist.init()
    rank = dist.rank()
    algo = get_algorithm("grpo", loss_agg="token-mean", beta=0.04)
    result = {}
    for kind in ("gpt_mini", "llama"):
        single_model = make_model(kind, llama_dir)
        apply_lora(single_model, target_modules=LORA_TARGETS, **LORA)
        vocab = 16 if kind == "gpt_mini" else single_model.hf.config.vocab_size
        batch = global_batch(single_model, vocab)
        sharded_model = copy.deepcopy(single_model)
        if rank == 1:  # another rank's own draw of the initial adapters: rank 0's must win, also on a reset
            with torch.no_grad():
                for name, t in initial_adapters(sharded_model).items():
                    t.add_(1.0)
                    sharded_model.get_parameter(_param_name(sharded_model, name)).add_(1.0)
        base0, adapters0 = _split({k: v.clone() for k, v in single_model.state_dict().items()})
        # the reference first, as the RL stage builds it: the base with the adapters off, no copy
        single_ref = Reference(single_model, TrainerConfig(micro_batch_size=3))
        sharded_ref = Reference(sharded_model, TrainerConfig(micro_batch_size=2, strategy="fsdp2"))
        single, sharded = trainer_for(single_model, "single", 3), trainer_for(sharded_model, "fsdp2", 2)
        case = {"no_copy": sharded_ref.shares_policy and sharded_ref.model is sharded_model}
        rows = RANK_ROWS[rank]
        case.update({"single_loss": [], "sharded_loss": [], "ref": [], "ref_moved": [], "grad": []})
        first = single_ref(batch).ref_logp  # the base's log-probs, before any step
        for _ in range(STEPS):
            b1 = single_ref(batch)
            b2 = sharded_ref(batch.select(rows))
            case["ref"].append(dist.reduce_max(float((b2.ref_logp - b1.ref_logp[rows]).abs().max())))
            case["ref_moved"].append(float((b1.ref_logp - first).abs().max()))
            a, b = single.step(b1, algo.compute_loss), sharded.step(b2, algo.compute_loss)
            case["single_loss"].append(a["train/loss"])
            case["sharded_loss"].append(b["train/loss"])
            case["grad"].append(abs(a["train/grad_norm"] - b["train/grad_norm"]))
        base, adapters = _split(_full(sharded_model))
        case["base_bit_equal"] = all(torch.equal(base[k], base0[k]) for k in base0) and base.keys() == base0.keys()
        case["adapters"] = max_diff(adapters, _split(single_model.state_dict())[1])
        case["adapters_moved"] = max_diff(adapters, adapters0)
        # a weight sync after a step: the adapters alone, gathered, as one process sends its own
        sent, own = dict(gathered_weights(sharded_model, adapters_only=True)), dict(named_weights(single_model, True))
        case["sync"] = max_diff(sent, own)
        case["sync_bytes"] = [sum(t.numel() * t.element_size() for t in d.values()) for d in (sent, own)]
        # the final checkpoint: rank 0's gathered copy, merged (what checkpoints/final holds) and unmerged (a LoRA
        # folder: base + adapter files) that load_model reads back as the same LoRA model
        copy_ = dist.unsharded(sharded_model)
        if dist.is_main():
            case["merged"] = max_diff(merged_state_dict(copy_), merged_state_dict(single_model))
            if kind == "llama":
                save_model(copy_, _tokenizer(llama_dir), folder)
                loaded, _ = load_model(ModelConfig(name=folder, device="cpu"))
                case["reloaded"] = max_diff(loaded.state_dict(), single_model.state_dict())
                case["adapter_file"] = os.path.isfile(os.path.join(folder, "lora_adapter.safetensors"))
        # a stage's end: adapters folded into the base and reset (to rank 0's initial values on every rank)
        fold_adapters(single_model)
        fold_adapters(sharded_model)
        full = _full(sharded_model)
        case["folded"] = max_diff(full, single_model.state_dict())
        case["base_changed"] = max_diff(_split(full)[0], base0)
        case["reset"] = max(float((full[k] - adapters0[k]).abs().max()) for k in adapters0)
        mine = float(sum(t.to_local().abs().sum() for n, t in sharded_model.state_dict().items() if "lora_A" in n))
        case["reset_ranks_agree"] = dist.gather_objects(mine)
        # and training goes on from the folded base
        b1, b2 = single_ref(batch), sharded_ref(batch.select(rows))
        case["after_fold_ref"] = dist.reduce_max(float((b2.ref_logp - b1.ref_logp[rows]).abs().max()))
        a, b = single.step(b1, algo.compute_loss), sharded.step(b2, algo.compute_loss)
        case["after_fold_loss"] = [a["train/loss"], b["train/loss"]]
        result[kind] = case
    if dist.is_main():
        with open(out, "w") as f:
            json.dump(result, f)
    dist.destroy()


def _param_name(model, state_name: str) -> str:
    """A state-dict name of the weights module (a wrapped HF model's `hf`) as the model's parameter name."""
    return state_name if not hasattr(model, "hf") else f"hf.{state_name}"


def _tokenizer(folder: str):
    from transformers import AutoTokenizer

    from rlpost.models import HFTokenizer

    return HFTokenizer(AutoTokenizer.from_pretrained(folder))


# ---------------------------------------------------------------------------- the tests

@pytest.fixture(scope="module")
def equivalence(tmp_path_factory, tiny_llama_dir):
    tmp = tmp_path_factory.mktemp("fsdp_lora")
    return launch("equivalence", str(tmp / "eq.json"), tiny_llama_dir, str(tmp / "ckpt"))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gpt_mini", "llama"])
def test_two_ranks_train_lora_like_one_process(equivalence, kind):
    c = equivalence[kind]
    print(f"{kind}: losses {c['single_loss']} vs {c['sharded_loss']}; adapters max |diff| {c['adapters']:.2e}")
    for a, b in zip(c["single_loss"], c["sharded_loss"]):
        assert abs(a - b) < TOL
    assert max(c["grad"]) < TOL
    assert len(set(c["single_loss"])) == STEPS  # the adapters trained
    assert c["adapters_moved"] > 1e-3
    assert c["adapters"] < TOL
    assert c["base_bit_equal"]  # frozen: FSDP2 never touched the base


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gpt_mini", "llama"])
def test_the_sharded_reference_is_the_base_with_adapters_off(equivalence, kind):
    c = equivalence[kind]
    assert c["no_copy"]  # the policy the trainer sharded, not a copy of it
    assert max(c["ref"]) < TOL  # scored like one process, from the shards
    assert max(c["ref_moved"]) < TOL  # the base: training the adapters never moves it
    assert c["after_fold_ref"] < TOL


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gpt_mini", "llama"])
def test_sync_checkpoint_and_fold_of_a_sharded_lora_model(equivalence, kind):
    c = equivalence[kind]
    assert c["sync"] < TOL
    assert c["sync_bytes"][0] == c["sync_bytes"][1]  # the adapters only, as one process sends
    assert c["merged"] < TOL
    assert c["folded"] < TOL and c["base_changed"] > 1e-4  # the delta went into the base, like one process
    assert c["reset"] == 0.0  # rank 0's initial adapters, also where rank 1 had drawn others
    assert c["reset_ranks_agree"][0] > 0 and len(c["reset_ranks_agree"]) == 2
    assert abs(c["after_fold_loss"][0] - c["after_fold_loss"][1]) < TOL
    if kind == "llama":
        assert c["adapter_file"] and c["reloaded"] < TOL


def _train(args: list[str], nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), "-m", "rlpost.cli", *args]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


def _rl_lines(run) -> list[dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if x["stage"] == "rl"]


def _same_numbers(a: dict) -> dict:
    """A metrics line without what depends on the clock or the machine's memory."""
    return {k: v for k, v in a.items()
            if not (k.startswith(("time/", "time_share/", "mem/", "gpu/")) or k.endswith("tokens_per_s"))}


@pytest.mark.slow
def test_rlpost_train_with_lora_under_torchrun_resumes_like_the_uninterrupted_run(tmp_path):
    from safetensors.torch import load_file

    from rlpost.checkpoint import export_model
    from rlpost.config import ModelConfig
    from rlpost.models import load_model

    out = tmp_path / "runs"
    args = ["train", "trainer.strategy=fsdp2", "rl.weight_sync=copy", f"out_dir={out}", "run_name=lora",
            "model.lora.r=4", "model.lora.alpha=16", "sft.steps=20", "sft.batch_size=16", "sft.lr=3e-3",
            "rl.steps=4", "rl.eval_every=0", "rl.save_every=2", "rollout.prompts_per_step=4", "rollout.k=4",
            "task.num_eval=8", "eval.samples_per_prompt=1", "model.n_layer=2", "model.n_embd=32", "model.n_head=2",
            "trainer.micro_batch_size=6", "trainer.lr=3e-3", "algorithm.entropy_coef=0.01", "threads=1"]
    _train(args)
    run = out / "lora"
    full = _rl_lines(run)
    assert [x["step"] for x in full] == [1, 2, 3, 4]
    assert all(x["train/grad_norm"] > 0 for x in full)  # the adapters trained (the entropy term at least)
    model_bytes = (run / "checkpoints" / "sft" / "model.safetensors").stat().st_size
    # the engine's copy is freed while the trainer works (fsdp2), so a step's sync gathers the base again
    assert all(0.9 * model_bytes < x["sync/bytes"] < 1.5 * model_bytes for x in full)
    final = run / "checkpoints" / "final"
    assert (final / "model.safetensors").exists() and not (final / "lora_adapter.safetensors").exists()  # merged
    assert (run / "checkpoints" / "step_2" / "shards").is_dir()  # the mid-stage checkpoint: each rank's shards
    weights = load_file(final / "model.safetensors")

    # the run stopped after step 2: `rlpost export` merges the adapters of the shards into a plain model folder
    shutil.rmtree(final)
    exported = tmp_path / "exported"
    assert export_model(str(run), str(exported)) == str(run / "checkpoints" / "step_2")
    assert not (exported / "lora_adapter.safetensors").exists()
    merged = load_file(exported / "model.safetensors")
    sft = load_file(run / "checkpoints" / "sft" / "model.safetensors")
    assert merged.keys() == sft.keys() and any(not torch.equal(merged[k], sft[k]) for k in sft)  # RL's adapters in
    assert load_model(ModelConfig(name=str(exported), device="cpu"))[0] is not None

    # continue from step 2 on 2 ranks: steps 3 and 4 again, as the uninterrupted run took them
    done = _train(["train", "--resume", str(run)])
    assert "resuming from" in done.stdout and "step_2" in done.stdout
    again = _rl_lines(run)
    assert [x["step"] for x in again] == [1, 2, 3, 4]
    for a, b in zip(full, again):
        assert _same_numbers(a) == _same_numbers(b), a["step"]
    resumed = load_file(final / "model.safetensors")
    assert resumed.keys() == weights.keys()
    assert all(torch.equal(resumed[k], weights[k]) for k in weights)
    assert json.loads((run / "summary.json").read_text())["status"] == "ok"


def test_lora_target_modules_that_match_nothing_fail_at_load_under_fsdp2(tmp_path):
    from rlpost.config import load_config
    from rlpost.models import load_model

    cfg = load_config(None, [f"out_dir={tmp_path}", "trainer.strategy=fsdp2", "model.lora.r=4",
                             "model.lora.target_modules=[nothing_here]", "model.n_layer=1", "model.n_embd=16",
                             "model.n_head=2", "model.block_size=16"])
    assert cfg.trainer.strategy == "fsdp2" and cfg.model.lora.r == 4  # the combination loads
    with pytest.raises(ValueError, match=r"model\.lora\.target_modules \['nothing_here'\] names none"):
        load_model(cfg.model, "0123456789+=")


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    jobs = {"equivalence": job_equivalence}
    jobs[sys.argv[1]](*sys.argv[2:])
