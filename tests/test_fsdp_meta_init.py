"""A fresh fsdp2 run never builds the whole policy on a rank: the policy is a meta skeleton, sharded, and each rank
reads only its shards' rows of the model folder's safetensors (rlpost.models.read_own_rows); the frozen
reference and a separate PPO critic are sharded copies made shard by shard (rlpost.distributed.sharded_copy).

Real torchrun processes on gloo/CPU, as tests/test_fsdp.py (whose launcher, batch and trainer helpers the jobs
reuse). The tests that launch processes take seconds each: they are marked slow
(`pytest -m slow tests/test_fsdp_meta_init.py`).
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_fsdp import RANK_ROWS, ROOT, TOL, full_weights, global_batch, max_diff, trainer_for  # noqa: E402
from test_fsdp import launch as fsdp_launch  # noqa: E402
from test_fsdp_copies import _reset_peak, _rss_kb  # noqa: E402

MEMORY_LAYERS, MEMORY_HIDDEN = 8, 512  # the memory test's Llama: ~27M parameters, ~105 MB in fp32


def launch(job: str, out: str, *args: str, nproc: int = 2, timeout: int = 300) -> dict:
    """test_fsdp's launcher, running this file's `job`."""
    return fsdp_launch(job, out, *args, nproc=nproc, timeout=timeout, script=__file__)


def _no_gather(*args, **kwargs):
    raise AssertionError("the full weights were gathered")


def _buffer_diff(a, b) -> float:
    """The largest difference between two models' buffers (the non-persistent ones too: RoPE's inv_freq); inf
    when their names or dtypes differ."""
    a, b = dict(a.named_buffers()), dict(b.named_buffers())
    if a.keys() != b.keys() or any(a[k].dtype != b[k].dtype for k in a):
        return float("inf")
    return max([float((a[k].float() - b[k].float()).abs().max()) for k in a], default=0.0)


def _held_share(model) -> float:
    from torch.distributed.tensor import DTensor

    held = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in model.parameters())
    return held / sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------- the jobs

def job_fresh(out: str, folders: str) -> None:
    """For each model folder (`folders`: JSON {label: [folder, dtype]}): the policy built as a sharded skeleton
    filled from the folder, against the whole model one process loads: its weights and buffers; the reference
    and a separate critic made from it without gathering (their weights, the reference's log-probs against one
    process's reference); then one AdamW step on each rank's rows against one process's step on the whole batch."""
    from rlpost import distributed as dist
    from rlpost.algorithms import get_algorithm
    from rlpost.config import ModelConfig, TrainerConfig
    from rlpost.critic import Critic
    from rlpost.models import load_model, load_weights
    from rlpost.reference import Reference
    from rlpost.trainer import Trainer

    dist.init()
    rank = dist.rank()
    result = {}
    for label, (folder, dtype) in json.loads(folders).items():
        cfg = ModelConfig(name=folder, device="cpu", dtype=dtype)
        torch.manual_seed(0)
        whole, _ = load_model(cfg)
        policy, _ = load_model(cfg, skeleton=True)
        dist.shard_model(policy)
        load_weights(policy, folder)
        case = {"weights": max_diff(full_weights(policy), whole.state_dict()), "buffers": _buffer_diff(policy, whole),
                "shares": dist.gather_objects(_held_share(policy)),
                "dtypes": sorted({str(p.dtype) for p in policy.parameters()})}
        if dtype == "float32":
            vocab = whole.hf.config.vocab_size if hasattr(whole, "hf") else whole.config.vocab_size
            batch = global_batch(whole, vocab)
            mine = batch.select(RANK_ROWS[rank])
            gather, plain = dist.full_state_dict, dist.plain_copy
            dist.full_state_dict = dist.plain_copy = _no_gather  # a copy that gathers fails here
            try:
                ref = Reference(policy, TrainerConfig(strategy="fsdp2", micro_batch_size=2))
                critic = Critic.build(policy, "separate", TrainerConfig(strategy="fsdp2", packing="auto"))
            finally:
                dist.full_state_dict, dist.plain_copy = gather, plain
            # as the RL stage: a Trainer with the critic (it probes packing, then shards the critic over its
            # trunk), then a value pass through the critic as the FSDP2 root
            Trainer(policy, TrainerConfig(strategy="fsdp2", packing="auto"), critic=critic)
            with torch.no_grad():  # as the controller's value pass
                case["critic_values"] = float(critic(mine).abs().max())  # (its head starts at zero)
            one = Reference(whole, TrainerConfig(micro_batch_size=2))(batch).ref_logp
            case["reference"] = dist.reduce_max(float((ref(mine).ref_logp - one[RANK_ROWS[rank]]).abs().max()))
            case["reference_weights"] = max_diff(full_weights(ref.model), whole.state_dict())
            case["reference_buffers"] = _buffer_diff(ref.model, whole)
            case["reference_shares"] = dist.gather_objects(_held_share(ref.model))
            case["reference_frozen"] = not any(p.requires_grad for p in ref.model.parameters())
            case["critic_trunk"] = max_diff(full_weights(critic.trunk), whole.state_dict())
            case["critic_shares"] = dist.gather_objects(_held_share(critic.trunk))
            # (all but an untied LM head, which the critic never reads)
            case["critic_frozen"] = [n for n, p in critic.trunk.named_parameters() if not p.requires_grad]
            algo = get_algorithm("grpo", loss_agg="token-mean", beta=0.04)
            single, sharded = trainer_for(whole, "single", 3), trainer_for(policy, "fsdp2", 2)
            a, b = single.step(batch, algo.compute_loss), sharded.step(mine, algo.compute_loss)
            case["loss"] = abs(a["train/loss"] - b["train/loss"])
            case["step_weights"] = max_diff(full_weights(policy), whole.state_dict())
        result[label] = case
    if dist.is_main():
        with open(out, "w") as f:
            json.dump(result, f)
    dist.destroy()


def _memory_config(model_dir: str, out_dir: str):
    from rlpost.config import load_config

    return load_config(None, [f"model.name={model_dir}", "model.device=cpu", "trainer.strategy=fsdp2",
                              "rl.weight_sync=copy", "rollout.engine=native", f"out_dir={out_dir}", "threads=1",
                              "task.num_eval=8"])


def job_memory(out: str, model_dir: str, work: str, how: str) -> None:
    """A fresh run's start (run.build_context) on this process's ranks, `how`: "skeleton" (what `rlpost train`
    does: run.skeleton_start's folder, the policy a sharded skeleton filled from it) or "whole" (as a fresh run
    did before: the whole policy built on every rank, and sharded, as its first training stage did). Each
    rank's peak RSS growth until the policy is built and sharded (before its first forward, the packing probe,
    gathers a block at a time, and before the engine's copy is gathered)."""
    from rlpost import distributed as dist
    from rlpost import run
    from rlpost.models import load_model
    from rlpost.runlog import RunLog

    dist.init()
    cfg = _memory_config(model_dir, work)
    log = RunLog(os.path.join(work, f"run-{how}"), write=False)
    policy_peak = []
    packing_line = run.packing_line

    def built(cfg, model):  # the policy built (and, as a skeleton, read): the peak so far (the whole policy:
        dist.shard_model(model)  # sharded here, as its first training stage did)
        policy_peak.append(_rss_kb("VmHWM") * 1024)
        return packing_line(cfg, model)

    run.packing_line = built
    load_model(cfg.model, skeleton=True)  # the first build's lazy imports and caches, out of the measure
    folder = run.skeleton_start(cfg, None, work) if how == "skeleton" else None
    _reset_peak()
    before = _rss_kb("VmRSS") * 1024
    ctx = run.build_context(cfg, work, log, folder=folder)
    whole, _ = load_model(cfg.model)
    if dist.is_main():
        with open(out, "w") as f:
            json.dump({"growth": dist.gather_objects(policy_peak[0] - before), "folder": folder,
                       "policy": max_diff(full_weights(ctx.model), whole.state_dict()),
                       "full_bytes": sum(p.numel() * p.element_size() for p in whole.parameters())}, f)
    else:
        dist.gather_objects(policy_peak[0] - before)
        full_weights(ctx.model)
    dist.destroy()


def job_listing(out: str, folders: str, work: str) -> None:
    """A fresh run's start (run.build_context with run.skeleton_start's folder) of each model folder (`folders`:
    JSON {label: folder}) in this process: how many times build_context listed the folder's tensors
    (safetensors_files: each safetensors file's header read for its names), and its policy against the whole
    model one process loads."""
    from rlpost import distributed as dist
    from rlpost import run
    from rlpost.models import load_model, loading
    from rlpost.runlog import RunLog

    dist.init()
    listed, real = [], loading.safetensors_files

    def counted(folder):
        listed.append(folder)
        return real(folder)

    result = {}
    for label, folder in json.loads(folders).items():
        cfg = _memory_config(folder, work)
        start = run.skeleton_start(cfg, None, work)  # (the decision to start from the folder: not the load)
        log = RunLog(os.path.join(work, f"run-{label.replace('/', '-')}"), write=False)
        listed.clear()
        run.safetensors_files = loading.safetensors_files = counted
        try:
            ctx = run.build_context(cfg, work, log, folder=start)
        finally:
            run.safetensors_files = loading.safetensors_files = real
        whole, _ = load_model(cfg.model)
        result[label] = {"folder": start, "listed": len(listed),
                         "policy": max_diff(full_weights(ctx.model), whole.state_dict())}
    with open(out, "w") as f:
        json.dump(result, f)
    dist.destroy()


# ---------------------------------------------------------------------------- the tests

def job_equal(out: str, folders: str) -> None:
    """For each model folder (`folders`: JSON {label: folder}) and each of fp32 and bf16: the policy built as a
    sharded skeleton filled from the folder (rows read by each rank) against the whole model from_pretrained
    loads: the largest weight, buffer and logit difference; "whole" when missing_weights sends it to the whole
    build instead."""
    from rlpost import distributed as dist
    from rlpost.config import ModelConfig
    from rlpost.models import load_model, load_weights, missing_weights

    dist.init()
    result = {}
    ids = torch.randint(0, 500, (2, 9), generator=torch.Generator().manual_seed(0))
    for label, folder in json.loads(folders).items():
        for dtype in ("float32", "bfloat16"):
            cfg = ModelConfig(name=folder, device="cpu", dtype=dtype)
            whole, _ = load_model(cfg)
            policy, _ = load_model(cfg, skeleton=True)
            if missing_weights(policy, folder):
                result[f"{label}/{dtype}"] = "whole"
                continue
            dist.shard_model(policy)
            load_weights(policy, folder)
            with torch.no_grad():
                logits = float((policy(ids).float() - whole(ids).float()).abs().max())
            result[f"{label}/{dtype}"] = [max_diff(full_weights(policy), whole.state_dict()),
                                          _buffer_diff(policy, whole), logits]
    if dist.is_main():
        with open(out, "w") as f:
            json.dump(result, f)
    dist.destroy()


def _llama_folder(tokenizer_dir: str, folder: str, tied: bool, layers: int = 2, hidden: int = 64) -> str:
    """A saved Llama with tiny_llama_dir's tokenizer: `tied` (its LM head is the embedding, saved once)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=3 * hidden, max_position_embeddings=64,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=tied, rope_theta=500.0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_a_sharded_skeleton_filled_from_a_folder_is_the_loaded_model(tmp_path, tiny_llama_dir, tiny_gpt):
    """On 2 ranks, each policy built as a skeleton, sharded and filled from its folder (each rank reading its
    own rows) equals the model from_pretrained loads, bit for bit: a Llama (in one safetensors file, and split
    over several by an index), a tied-embedding Llama, a gpt_mini
    (GPT-2 layout: transposed Conv1D weights, tied head), and a Llama loaded in bfloat16; its buffers (RoPE's
    non-persistent inv_freq) too, and each rank holds about half of it. The reference and a separate critic
    made from it without gathering hold the same weights, sharded; the reference scores each rank's rows as one
    process's reference scores them; one AdamW step on 2 ranks equals one process's on the whole batch."""
    model, tok = tiny_gpt
    gpt_dir = str(tmp_path / "gpt")
    model.save_pretrained(gpt_dir)
    tok.save_pretrained(gpt_dir)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    split = str(tmp_path / "split")  # saved in several safetensors files, named by model.safetensors.index.json
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir).save_pretrained(split, max_shard_size="40KB")
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(split)
    assert len([f for f in os.listdir(split) if f.endswith(".safetensors")]) > 2
    folders = {"llama": [tiny_llama_dir, "float32"], "llama/split": [split, "float32"],
               "llama/tied": [_llama_folder(tiny_llama_dir, str(tmp_path / "tied"), tied=True), "float32"],
               "gpt_mini": [gpt_dir, "float32"], "llama/bf16": [tiny_llama_dir, "bfloat16"]}
    result = launch("fresh", str(tmp_path / "fresh.json"), json.dumps(folders))
    print(json.dumps(result))
    for label, case in result.items():
        assert case["weights"] == 0.0 and case["buffers"] == 0.0, label
        assert all(0.3 < s < 0.7 for s in case["shares"]), (label, case["shares"])
        assert case["dtypes"] == ["torch.bfloat16" if label.endswith("bf16") else "torch.float32"]
        if label.endswith("bf16"):
            continue
        assert case["reference_weights"] == 0.0 and case["reference_buffers"] == 0.0, label
        assert case["reference"] < TOL, label
        assert case["reference_frozen"], label
        assert case["critic_frozen"] == ([] if label in ("llama/tied", "gpt_mini") else ["hf.lm_head.weight"]), label
        assert case["critic_trunk"] == 0.0 and case["critic_values"] == 0.0, label
        assert all(0.3 < s < 0.7 for s in case["reference_shares"] + case["critic_shares"]), label
        assert case["loss"] < TOL and case["step_weights"] < TOL, label


@pytest.mark.slow
def test_a_fresh_sharded_run_never_builds_the_whole_policy_on_a_rank(tmp_path, tiny_llama_dir, monkeypatch):
    """A fresh fsdp2 run's start (run.build_context with run.skeleton_start's folder) on 2 ranks: each rank's
    peak RSS grows by about its half of the policy until the policy is built and sharded, where building the
    whole policy on every rank (as a fresh run did) grew it by the policy and the engine's copy of it; the
    policy holds the folder's weights either way."""
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))  # large tensors mmapped: freed ones leave the RSS
    model_dir = _llama_folder(tiny_llama_dir, str(tmp_path / "model"), tied=False, layers=MEMORY_LAYERS,
                              hidden=MEMORY_HIDDEN)
    m = {how: launch("memory", str(tmp_path / f"{how}.json"), model_dir, str(tmp_path), how)
         for how in ("skeleton", "whole")}
    full, mb = m["whole"]["full_bytes"], 2 ** 20
    print(f"policy {full / mb:.1f} MB in fp32; each rank's peak RSS growth until it is built and sharded: "
          f"skeleton {[round(g / mb, 1) for g in m['skeleton']['growth']]} MB, "
          f"whole {[round(g / mb, 1) for g in m['whole']['growth']]} MB")
    assert m["skeleton"]["folder"] == model_dir and m["whole"]["folder"] is None
    assert m["skeleton"]["policy"] == 0.0 and m["whole"]["policy"] == 0.0
    assert max(m["skeleton"]["growth"]) < 0.75 * full  # its half, and one tensor's rows at a time
    assert min(m["whole"]["growth"]) > 1.5 * full  # the whole policy, and the engine's copy of it


@pytest.mark.slow
def test_a_fresh_sharded_start_lists_the_folder_once(tmp_path, tiny_llama_dir):
    """run.build_context of a fresh fsdp2 start lists the folder's safetensors once (what is missing, then each
    rank's rows, from that one listing), whether one file or several named by an index; the policy is the
    folder's model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    split = str(tmp_path / "split")
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir).save_pretrained(split, max_shard_size="40KB")
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(split)
    folders = {"llama": tiny_llama_dir, "llama/split": split}
    result = launch("listing", str(tmp_path / "listing.json"), json.dumps(folders), str(tmp_path), nproc=0)
    print(json.dumps(result))
    for label, case in result.items():
        assert case["folder"] == folders[label] and case["policy"] == 0.0, label
        assert case["listed"] == 1, (label, case)


@pytest.mark.slow
def test_rlpost_train_of_a_model_folder_starts_sharded_under_torchrun(tmp_path, tiny_llama_dir):
    """`rlpost train` on 2 ranks of a Llama folder, SFT then PPO with a separate critic and a reference: the policy
    is built empty and sharded from the start (the line says so), the reference and the critic are sharded copies,
    and the run finishes with the RL steps logged once and a final model folder. Stopped after SFT, it resumes
    on 2 ranks from the SFT checkpoint's folder, read the same way."""
    from test_dcp import _resume_copy, _train

    out = tmp_path / "runs"
    done = _train(["train", "trainer.strategy=fsdp2", "rl.weight_sync=copy", f"model.name={tiny_llama_dir}",
                   "algorithm={name: ppo}", "critic.type=separate", f"out_dir={out}", "run_name=meta",
                   "sft.steps=3", "sft.batch_size=8", "rl.steps=2", "rl.eval_every=0", "rl.save_every=0",
                   "rollout.prompts_per_step=4", "rollout.k=2", "rollout.max_new_tokens=8", "task.num_eval=4",
                   "eval.samples_per_prompt=1", "trainer.micro_batch_size=4", "threads=1"], nproc=2)
    assert done.stdout.count("the policy was built empty and sharded") == 1, done.stdout[-3000:]
    run = out / "meta"
    assert json.loads((run / "summary.json").read_text())["status"] == "ok"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["stage"] == "rl"] == [1, 2]
    assert (run / "checkpoints" / "final" / "model.safetensors").exists()

    # stopped after SFT (its end-of-stage checkpoint a model folder): the resume reads that folder the same way
    again = _resume_copy(run, "again", "sft")
    done = _train(["train", "--resume", str(again)], nproc=2)
    sft = again / "checkpoints" / "sft"
    assert f"each rank read only its shards of the weights in {sft}" in done.stdout, done.stdout[-3000:]
    assert json.loads((again / "summary.json").read_text())["status"] == "ok"
    lines = [json.loads(x) for x in (again / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["stage"] == "rl"] == [1, 2]


@pytest.mark.slow
def test_a_fresh_two_rank_run_of_a_model_folder_trains_like_one_process(tmp_path, tiny_llama_dir):
    """`rlpost train` of a Llama folder, SFT steps on 2 ranks (the policy a sharded skeleton read from the folder,
    probed for packing before its first step) and in one process: the same weights after SFT, to the fsdp
    tests' tolerance (the optimizer holds the shards, not the gathered copies a forward leaves behind)."""
    from safetensors.torch import load_file
    from test_dcp import _train

    # (one RL step: with an RL stage the run's start probes the policy for packing, a forward of the sharded one)
    args = ["train", f"model.name={tiny_llama_dir}", "sft.steps=2", "sft.batch_size=8", "rl.steps=1",
            "rl.eval_every=0", "rollout.prompts_per_step=2", "rollout.k=2", "rollout.max_new_tokens=4",
            "task.num_eval=4", "eval.samples_per_prompt=1", "trainer.micro_batch_size=4", "threads=1"]
    two = _train([*args, "trainer.strategy=fsdp2", "rl.weight_sync=copy", f"out_dir={tmp_path}", "run_name=two"],
                 nproc=2)
    assert "the policy was built empty and sharded" in two.stdout
    _train([*args, f"out_dir={tmp_path}", "run_name=one"], nproc=1)
    a, b = (load_file(str(tmp_path / run / "checkpoints" / "sft" / "model.safetensors")) for run in ("two", "one"))
    start = load_file(os.path.join(tiny_llama_dir, "model.safetensors"))
    assert max_diff(a, b) < TOL
    assert max_diff(a, start) > 10 * TOL  # (the steps did change the weights)


def test_a_folder_is_read_row_by_row_only_under_its_own_names(tmp_path, tiny_llama_dir, tiny_gpt):
    """missing_weights names what a folder lacks under the model's own names (so build_context builds the
    policy whole instead), a tied head counted once; a folder without safetensors has nothing to read."""
    from rlpost.config import ModelConfig
    from rlpost.models import load_model, missing_weights, safetensors_files
    from safetensors.torch import load_file, save_file

    model, tok = tiny_gpt
    model.save_pretrained(str(tmp_path / "gpt"))
    assert missing_weights(model, str(tmp_path / "gpt")) == []  # lm_head.weight is saved as the tied wte
    skeleton, _ = load_model(ModelConfig(name=tiny_llama_dir, device="cpu"), skeleton=True)
    assert missing_weights(skeleton, tiny_llama_dir) == []
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    state = load_file(os.path.join(tiny_llama_dir, "model.safetensors"))
    state["model.norm.scale"] = state.pop("model.norm.weight")  # another name for one weight
    save_file(state, str(renamed / "model.safetensors"))
    assert missing_weights(skeleton, str(renamed)) == ["hf.model.norm.weight"]
    assert safetensors_files(str(tmp_path)) is None and missing_weights(skeleton, str(tmp_path))


def test_load_weights_asks_whether_a_model_is_sharded_as_every_role_does():
    """One test of FSDP2 sharding: the loading code's is rlpost.distributed's (defined below it, in models)."""
    from rlpost import distributed
    from rlpost.models import loading

    assert loading.is_sharded is distributed.is_sharded
    assert not hasattr(loading, "_is_sharded")


def test_skeleton_start_reads_a_local_safetensors_folder_under_fsdp2_only(tmp_path, tiny_llama_dir):
    """run.skeleton_start: a fresh fsdp2 run of a local model folder builds its policy as a skeleton; a single
    process, LoRA, a fresh gpt_mini, or a checkpoint's folder to resume from (then that folder) decide otherwise."""
    from rlpost.checkpoint import Checkpoint
    from rlpost.config import load_config
    from rlpost.run import skeleton_start

    def cfg(*extra):
        return load_config(None, [f"model.name={tiny_llama_dir}", "rl.weight_sync=copy", f"out_dir={tmp_path}",
                                  *extra])

    assert skeleton_start(cfg("trainer.strategy=fsdp2"), None, str(tmp_path)) == tiny_llama_dir
    assert skeleton_start(cfg(), None, str(tmp_path)) is None
    assert skeleton_start(cfg("trainer.strategy=fsdp2", "model.lora.r=4"), None, str(tmp_path)) is None
    gpt = load_config(None, ["trainer.strategy=fsdp2", "rl.weight_sync=copy", f"out_dir={tmp_path}"])
    assert skeleton_start(gpt, None, str(tmp_path)) is None
    ckpt = Checkpoint(path=str(tmp_path / "checkpoints" / "sft"), meta={"weights": "sft"})
    (tmp_path / "checkpoints" / "sft").mkdir(parents=True)
    assert skeleton_start(cfg("trainer.strategy=fsdp2"), ckpt, str(tmp_path)) is None  # no safetensors there
    for name in ("model.safetensors", "config.json"):
        os.link(os.path.join(tiny_llama_dir, name), tmp_path / "checkpoints" / "sft" / name)
    assert skeleton_start(cfg("trainer.strategy=fsdp2"), ckpt, str(tmp_path)) == str(tmp_path / "checkpoints" / "sft")
    before = Checkpoint(path=str(tmp_path / "checkpoints" / "x"), meta={"weights": None})  # no weights changed
    assert skeleton_start(cfg("trainer.strategy=fsdp2"), before, str(tmp_path)) == tiny_llama_dir


def test_skeleton_start_reads_a_hub_id_from_the_local_cache_only(tmp_path, tiny_llama_dir, monkeypatch):
    """A hub id whose safetensors are all in the Hugging Face cache: its snapshot folder (nothing downloaded); not
    in the cache, or with a file of its index missing there: None (the whole model is loaded as before)."""
    import shutil

    import huggingface_hub.constants
    from rlpost.config import load_config
    from rlpost.run import skeleton_start

    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / "abc123"
    shutil.copytree(tiny_llama_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    def start(name):
        return skeleton_start(load_config(None, [f"model.name={name}", "trainer.strategy=fsdp2", "rl.weight_sync=copy",
                                                 f"out_dir={tmp_path}"]), None, str(tmp_path))

    assert start("org/tiny") == str(snapshot)
    assert start("org/elsewhere") is None
    (snapshot / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}))  # a file not downloaded
    assert start("org/tiny") is None


def test_a_tied_head_saved_apart_from_its_embedding_is_built_whole_as_transformers_loads_it(
        tmp_path, tiny_llama_dir, capsys):
    """A tied-embedding model's folder that holds its LM head apart from the embedding, with other values:
    transformers unties the two, which rows read into a tied skeleton cannot, so missing_weights names the head
    and build_context builds the policy whole (from_pretrained's weights, untied), saying why."""
    from safetensors.torch import load_file, save_file

    from rlpost.config import load_config
    from rlpost.models import load_model, missing_weights
    from rlpost.run import build_context
    from rlpost.runlog import RunLog, make_run_dir
    from rlpost.settings.model import ModelConfig
    from transformers import AutoModelForCausalLM

    folder = _llama_folder(tiny_llama_dir, str(tmp_path / "tied"), tied=True)
    state = load_file(os.path.join(folder, "model.safetensors"))
    assert "lm_head.weight" not in state  # (transformers saves a tied head once)
    state["lm_head.weight"] = state["model.embed_tokens.weight"] + 1.0
    save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    skeleton, _ = load_model(ModelConfig(name=folder, device="cpu"), skeleton=True)
    head = "hf.lm_head.weight (tied to hf.model.embed_tokens.weight, both saved)"
    assert missing_weights(skeleton, folder) == [head]

    cfg = load_config(None, [f"model.name={folder}", "trainer.strategy=fsdp2", "rl.weight_sync=copy",
                             f"out_dir={tmp_path}", "run_name=tied", "model.device=cpu"])
    run_dir = make_run_dir(cfg, "test")
    ctx = build_context(cfg, run_dir, RunLog(run_dir, write=False), folder=folder)
    assert "the policy is built whole on each rank" in capsys.readouterr().out
    whole = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert max_diff({f"hf.{k}": v for k, v in whole.state_dict().items()}, ctx.model.state_dict()) == 0.0
    assert float((ctx.model.hf.lm_head.weight - ctx.model.hf.model.embed_tokens.weight).detach().abs().min()) > 0.5


def test_a_separate_critic_freezes_an_untied_lm_head_it_never_reads(tiny_llama_dir, tiny_gpt):
    """A separate critic reads its trunk's hidden states: under fsdp2 an untied LM head, which gets no gradient,
    is frozen (out of the optimizer, which must find a state for every trainable parameter on resume); a tied
    head is the embedding, which trains."""
    from rlpost.config import ModelConfig, TrainerConfig
    from rlpost.critic import Critic
    from rlpost.models import load_model

    fsdp2 = TrainerConfig(strategy="fsdp2")
    policy, _ = load_model(ModelConfig(name=tiny_llama_dir, device="cpu"))
    trunk = Critic.build(policy, "separate", fsdp2).trunk
    frozen = [n for n, p in trunk.named_parameters() if not p.requires_grad]
    assert frozen == ["hf.lm_head.weight"]
    assert all(p.requires_grad for p in policy.parameters())  # (the policy's own head is its own)
    # one process keeps it trainable: its checkpoints' optimizer state (loaded by position) counts it
    assert all(p.requires_grad for p in Critic.build(policy, "separate").trunk.parameters())
    model, _ = tiny_gpt
    assert all(p.requires_grad for p in Critic.build(model, "separate", fsdp2).trunk.parameters())


@pytest.mark.slow
def test_a_ppo_run_with_a_separate_critic_resumes_from_its_mid_rl_shards(tmp_path, tiny_llama_dir):
    """`rlpost train` on 2 ranks of a Llama folder (untied LM head), PPO with a separate critic, a sharded
    checkpoint each RL step: resumed on 2 ranks from step 2's shards it writes the same RL metrics and the same
    final weights, bit for bit, as the run never interrupted (the critic's optimizer state loads: its trunk's
    unread LM head has none, and the resumed optimizer no longer expects one)."""
    from safetensors.torch import load_file
    from test_dcp import _resumes_on_two_ranks_as_it_ran, _train

    out = tmp_path / "runs"
    _train(["train", "trainer.strategy=fsdp2", "rl.weight_sync=copy", f"model.name={tiny_llama_dir}",
            "algorithm.name=ppo", "critic.type=separate", f"out_dir={out}", "run_name=ppo", "sft.steps=2",
            "sft.batch_size=8", "rl.steps=3", "rl.save_every=1", "rl.eval_every=0", "rollout.prompts_per_step=4",
            "rollout.k=2", "rollout.max_new_tokens=6", "task.num_eval=4", "eval.samples_per_prompt=1",
            "trainer.micro_batch_size=4", "threads=1"], nproc=2, timeout=300)
    run = out / "ppo"
    assert (run / "checkpoints" / "step_2" / "shards").is_dir()
    _resumes_on_two_ranks_as_it_ran(run, load_file(str(run / "checkpoints" / "final" / "model.safetensors")))


def _hf_folder(tokenizer_dir: str, folder: str, model_type: str, **config) -> str:
    """A saved 2-layer model of `model_type` (vocabulary 515, hidden 64 unless `config` says) with tiny_llama_dir's
    tokenizer, every weight moved off its initial value (norms and biases included, so a weight left unread
    shows)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = {"vocab_size": 515, "hidden_size": 64, "intermediate_size": 96, "head_dim": 32, **config}
    cfg = AutoConfig.for_model(model_type, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                               max_position_embeddings=64, **config)
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_families_and_sizes_that_do_not_divide_are_read_on_three_ranks_as_from_pretrained(tmp_path, tiny_llama_dir):
    """On 3 ranks (2 where a size would not matter), in fp32 and bf16, a sharded skeleton filled from each
    folder equals from_pretrained bit for bit (weights, buffers, logits): Qwen2 (q/k/v biases; tied and untied),
    Gemma, Gemma 2 and Gemma 3 (norms read as saved, embedding scale a buffer), a vocabulary of 515 and hidden
    sizes 64 and 66 (not divisible by 3); a folder saved without the `model.` prefix, which transformers
    renames, is built whole instead."""
    from safetensors.torch import load_file, save_file

    tok = tiny_llama_dir
    folders = {"qwen2": _hf_folder(tok, str(tmp_path / "qwen2"), "qwen2", tie_word_embeddings=False),
               "qwen2/tied": _hf_folder(tok, str(tmp_path / "qwen2t"), "qwen2", tie_word_embeddings=True),
               "gemma": _hf_folder(tok, str(tmp_path / "gemma"), "gemma"),
               "gemma2": _hf_folder(tok, str(tmp_path / "gemma2"), "gemma2"),
               "gemma3": _hf_folder(tok, str(tmp_path / "gemma3"), "gemma3_text"),
               "llama/66": _hf_folder(tok, str(tmp_path / "llama66"), "llama", hidden_size=66, intermediate_size=97,
                                      tie_word_embeddings=False)}
    bare = _hf_folder(tok, str(tmp_path / "bare"), "qwen2", tie_word_embeddings=False)
    state = load_file(os.path.join(bare, "model.safetensors"))
    save_file({k.removeprefix("model."): v for k, v in state.items()}, os.path.join(bare, "model.safetensors"),
              metadata={"format": "pt"})
    folders["no-prefix"] = bare
    result = launch("equal", str(tmp_path / "equal.json"), json.dumps(folders), nproc=3, timeout=400)
    print(json.dumps(result))
    assert len(result) == 2 * len(folders)
    for label, case in result.items():
        assert case == ("whole" if label.startswith("no-prefix") else [0.0, 0.0, 0.0]), label


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    jobs = {"equal": job_equal, "fresh": job_fresh, "memory": job_memory, "listing": job_listing}
    jobs[sys.argv[1]](*sys.argv[2:])
