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
from test_dcp import _resumes_on_two_ranks_as_it_ran, _rl_lines, _train  # noqa: E402


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

    _resumes_on_two_ranks_as_it_ran(run, final)


# ---------------------------------------------------------------------------- the rollout engine's copy

ENGINE_KINDS = ["native-gpt", "native-llama", "hf-llama"]
PROMPTS = ["1+2=", "47+85=", "9+99="]


@pytest.fixture
def engines(tiny_gpt, tiny_llama_dir):
    """engines(kind, dtype) -> (pointer engine, copy engine, model, tokenizer) on one model."""
    from rlpost.config import ModelConfig
    from rlpost.models import load_model
    from rlpost.rollout import build_engine

    def build(kind, dtype):
        model, tok = tiny_gpt if kind == "native-gpt" else load_model(ModelConfig(name=tiny_llama_dir))
        kind = kind.split("-")[0]
        return (build_engine(kind, model, tok, share_weights=True, dtype=dtype),
                build_engine(kind, model, tok, share_weights=False, dtype=dtype), model, tok)
    return build


def _sample(engine, tok, seed=0):
    from rlpost.rollout import SamplingParams

    return engine.generate([tok.encode_prompt(p) for p in PROMPTS], 2, SamplingParams(max_new_tokens=6), seed=seed)


def _param_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@pytest.mark.parametrize("kind", ENGINE_KINDS)
def test_a_bf16_copy_engine_holds_its_matmuls_in_bf16_and_samples_as_under_autocast(engines, kind):
    """rollout.dtype=bf16: a copy engine keeps its nn.Linear weights (not tied to an embedding) in bf16, the
    embeddings and norms in fp32, and samples exactly what the pointer engine (fp32 weights under bf16
    autocast) samples, with the same log-probs; an fp32 copy stays fp32."""
    import torch.nn as nn

    from rlpost.rollout.engine import weights_module

    pointer, copy, model, tok = engines(kind, "bf16")
    held = weights_module(copy._model)
    embedded = {id(p) for m in held.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    linear = {id(p) for m in held.modules() if isinstance(m, nn.Linear) for p in m.parameters()} - embedded
    assert linear and all((p.dtype == torch.bfloat16) == (id(p) in linear) for p in held.parameters())
    assert _param_bytes(copy._model) < 0.8 * _param_bytes(model)
    for seed in (0, 1):
        a, b = _sample(pointer, tok, seed), _sample(copy, tok, seed)
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.old_logp, b.old_logp)
    fp32 = engines(kind, "fp32")[1]
    assert all(p.dtype == torch.float32 for p in fp32._model.parameters())


@pytest.mark.parametrize("kind", ENGINE_KINDS)
def test_a_released_copy_engine_holds_nothing_until_it_is_given_every_weight(engines, kind):
    """release_weights frees a copy engine's parameters (a pointer engine keeps the trainer's); it refuses to
    sample, and a partial update, until it is given every weight; given them to `take`, it keeps those very
    tensors and samples as before."""
    from rlpost.rollout.engine import named_weights

    pointer, copy, model, tok = engines(kind, "fp32")
    before = _sample(copy, tok)
    assert not pointer.release_weights()
    assert copy.release_weights() and copy.released
    assert _param_bytes(copy._model) == 0
    with pytest.raises(RuntimeError, match="released"):
        _sample(copy, tok)
    weights = [(n, t.detach().clone()) for n, t in named_weights(model)]
    with pytest.raises(ValueError, match="missing"):
        copy.update_weights([(n, t) for n, t in weights if not n.endswith(("ln_f.weight", "model.norm.weight"))],
                            3, take=True)
    copy.update_weights(weights, 3, take=True)
    assert not copy.released
    kept = {t.data_ptr() for _, t in weights}
    assert all(p.data_ptr() in kept for p in copy._model.parameters())
    after = _sample(copy, tok)
    assert torch.equal(before.input_ids, after.input_ids) and torch.equal(before.old_logp, after.old_logp)


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_peak() -> None:
    """Reset this process's peak RSS (VmHWM) to its current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def job_engine(out: str) -> None:
    """A sharded policy's copy engines (fp32 and bf16), refreshed by WeightSync after a training step, against
    one process's engines on the same weights; then the train phase's peak RSS and the sync's seconds with and
    without the engine's copy released between the rollout and the sync."""
    import copy
    import gc
    import statistics
    import time

    import torch.nn as nn

    from rlpost import distributed as dist
    from rlpost.algorithms import get_algorithm
    from rlpost.models.gpt_mini import GPT, CharTokenizer, GPTConfig
    from rlpost.rollout import SamplingParams, build_engine
    from rlpost.weight_sync import WeightSync, gathered_weights
    from test_fsdp import RANK_ROWS, global_batch, trainer_for

    dist.init()
    rank = dist.rank()
    tok = CharTokenizer("0123456789+=")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=24, n_layer=8, n_head=4, n_embd=512))
    batch = global_batch(model, tok.vocab_size)
    algo = get_algorithm("grpo", loss_agg="token-mean", beta=0.04)
    mine = batch.select(RANK_ROWS[rank])
    copies = {d: build_engine("native", model, tok, share_weights=False, dtype=d) for d in ("fp32", "bf16")}
    trainer = trainer_for(model, "fsdp2", 2)
    trainer.step(mine, algo.compute_loss)  # weights the engines were not built with
    syncs = {d: WeightSync(model, e) for d, e in copies.items()}
    one = copy.deepcopy(copies["fp32"]._model)  # one process: a plain model with the gathered weights
    one.load_state_dict(dist.full_state_dict(model))
    prompts = [tok.encode_prompt(p) for p in ("1+2=", "47+85=", "9+99=")]
    params = SamplingParams(max_new_tokens=6)
    result = {}
    for d, engine in copies.items():
        mine_, theirs = engine.generate(prompts, 2, params, seed=rank), \
            build_engine("native", one, tok, share_weights=True, dtype=d).generate(prompts, 2, params, seed=rank)
        held = {n: t for n, t in engine._model.state_dict().items()}
        cast = {n: t.to(held[n].dtype) for n, t in one.state_dict().items()}
        result[d] = {"tokens_equal": torch.equal(mine_.input_ids, theirs.input_ids),
                     "logp": float((mine_.old_logp - theirs.old_logp).abs().max()),
                     "weights": max(float((held[n].float() - cast[n].float()).abs().max()) for n in held),
                     "bf16_bytes": sum(t.numel() * 2 for t in held.values() if t.dtype == torch.bfloat16),
                     "bytes": sum(p.numel() * p.element_size() for p in engine._model.parameters())}
    result["linear_bytes_fp32"] = sum(p.numel() * 4 for m in one.modules() if isinstance(m, nn.Linear)
                                      for p in m.parameters(recurse=False) if p is not one.lm_head.weight)
    del one, copies["bf16"], syncs["bf16"]
    gc.collect()

    engine, ws = copies["fp32"], syncs["fp32"]
    peaks, seconds = {False: [], True: []}, {False: [], True: []}
    for release in (False, True) * 2:
        engine.generate(prompts, 2, params, seed=0)  # the rollout
        if release:
            ws.release()
        _reset_peak()
        trainer.step(mine, algo.compute_loss)  # the train phase
        peaks[release].append(_rss_kb("VmHWM") * 1024)
        t0 = time.perf_counter()
        ws.sync()
        seconds[release].append(time.perf_counter() - t0)
    gather = {"full_state_dict": [], "per_parameter": []}  # the gather alone: torch's whole-state helper vs ours
    for _ in range(2):
        for how, fn in (("full_state_dict", dist.full_state_dict), ("per_parameter", gathered_weights)):
            t0 = time.perf_counter()
            fn(model)
            gather[how].append(time.perf_counter() - t0)
    result.update({"engine_bytes": result["fp32"]["bytes"],
                   "gather_seconds": {k: statistics.median(v) for k, v in gather.items()},
                   "train_peak": {str(k): min(v) for k, v in peaks.items()},
                   "sync_seconds": {str(k): statistics.median(v) for k, v in seconds.items()}})
    if dist.is_main():
        with open(out, "w") as f:
            json.dump(result, f)
    dist.destroy()


@pytest.mark.slow
def test_a_sharded_runs_engine_copy_is_gathered_in_the_rollout_dtype_and_released_while_training(tmp_path,
                                                                                                 monkeypatch):
    """Two ranks' copy engines, refreshed from the sharded policy after a step, hold its gathered weights (bf16:
    their bf16 casts, the matmuls held in half the bytes) and sample what one process's engine on those weights
    samples, to 1e-5; releasing the copy between the rollout and the sync lowers the train phase's peak RSS by
    about the copy's size, and the sync that refills it takes no longer."""
    # glibc hands every tensor of 128 KiB or more back to the system when it is freed (no adaptive threshold
    # keeping freed memory in the heap), so that the RSS follows the live tensors
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    m = launch("engine", str(tmp_path / "engine.json"), timeout=600)
    mb = 2 ** 20
    print(f"engine copy {m['engine_bytes'] / mb:.1f} MB (fp32), bf16 engine {m['bf16']['bytes'] / mb:.1f} MB; "
          f"train-phase peak RSS {m['train_peak']['False'] / mb:.1f} MB kept vs {m['train_peak']['True'] / mb:.1f} "
          f"MB released; sync {m['sync_seconds']['False'] * 1e3:.0f} ms (copy) vs "
          f"{m['sync_seconds']['True'] * 1e3:.0f} ms (refill); {m}")
    for d in ("fp32", "bf16"):
        assert m[d]["tokens_equal"] and m[d]["logp"] < TOL and m[d]["weights"] == 0.0
    assert m["bf16"]["bf16_bytes"] == m["linear_bytes_fp32"] // 2  # every untied matmul weight held in bf16
    assert m["bf16"]["bytes"] < 0.65 * m["fp32"]["bytes"]
    assert m["train_peak"]["True"] < m["train_peak"]["False"] - 0.6 * m["engine_bytes"]
    assert m["sync_seconds"]["True"] < 2 * m["sync_seconds"]["False"] + 0.5  # generous: a loaded 2-core machine


# ---------------------------------------------------------------------------- a resume from shards

# many blocks of moderate tensors: a reader's buffer is one tensor (or one shard of one), so a model whose bytes
# are one large embedding would hide the difference behind that buffer
RESUME_LAYERS, RESUME_EMBD = 8, 512


def _resume_config(model_dir: str, out_dir: str):
    from rlpost.config import load_config

    return load_config(None, [f"model.name={model_dir}", "model.device=cpu", "trainer.strategy=fsdp2",
                              "rl.weight_sync=copy", "rollout.engine=native", f"out_dir={out_dir}", "threads=1",
                              "task.num_eval=8"])


def job_resume_save(out: str, folder: str) -> None:
    """A gpt_mini model folder (25M parameters, for the arithmetic task's characters), and other weights' shards
    written by this run's ranks, as a mid-stage fsdp2 checkpoint's shards/."""
    from rlpost import distributed as dist
    from rlpost.models import load_model
    from rlpost.models.gpt_mini import GPT, CharTokenizer, GPTConfig
    from rlpost.tasks import load_task

    dist.init()
    model_dir = os.path.join(folder, "model")
    cfg = _resume_config(model_dir, folder)
    if dist.is_main():
        torch.manual_seed(0)
        tok = CharTokenizer(load_task(cfg.task).alphabet)
        GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=RESUME_LAYERS, n_head=4,
                      n_embd=RESUME_EMBD)).save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
    dist.barrier()
    model, _ = load_model(cfg.model)
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with torch.no_grad():  # other weights than the folder's: a resume must read these
        for p in model.parameters():
            p.mul_(-1.5)
    dist.shard_model(model)
    dist.save_shards(os.path.join(folder, "shards"), model)
    state = dist.full_state_dict(model)
    if dist.is_main():
        torch.save(state, os.path.join(folder, "saved.pt"))
        with open(out, "w") as f:
            json.dump({"full_bytes": full_bytes}, f)
    dist.destroy()


def job_resume_load(out: str, folder: str, how: str) -> None:
    """The run's own start of a resume (run.build_context) on this process's ranks, `how`: "shards" (a sharded
    skeleton reads its shards) or "whole" (as a resume did before: the whole policy built, the shards read into
    it, then sharded). Rank 0's peak RSS growth over it, and what the policy and the engine then hold."""
    from rlpost import distributed as dist
    from rlpost import run
    from rlpost.models import load_model
    from rlpost.run import _load_policy, build_context
    from rlpost.runlog import RunLog
    from rlpost.weight_sync import WeightSync, gathered_weights

    dist.init()
    cfg = _resume_config(os.path.join(folder, "model"), folder)
    log = RunLog(os.path.join(folder, f"run-{how}"), write=False)
    policy_peak = []

    def weight_sync(model, engine):  # the policy built (and, from shards, read): the peak so far, before the
        policy_peak.append(_rss_kb("VmHWM") * 1024)  # engine's copy is gathered
        return WeightSync(model, engine)

    run.WeightSync = weight_sync
    load_model(cfg.model, skeleton=True)  # the first build's lazy imports and caches (~36 MB), out of the measure
    _reset_peak()
    before = _rss_kb("VmRSS") * 1024
    if how == "shards":
        ctx = build_context(cfg, folder, log, shards=os.path.join(folder, "shards"))
    else:
        ctx = build_context(cfg, folder, log)
        _load_policy(ctx.model, folder)
        dist.shard_model(ctx.model)
        ctx.weight_sync.push()
    growth = _rss_kb("VmHWM") * 1024 - before
    saved = torch.load(os.path.join(folder, "saved.pt"), weights_only=False)
    policy = dist.full_state_dict(ctx.model)
    engine = dict(gathered_weights(ctx.model))  # (the protocol's names)
    held = ctx.engine._model.state_dict()
    if dist.is_main():
        with open(out, "w") as f:
            json.dump({"growth": growth, "policy_growth": policy_peak[0] - before,
                       "sharded": dist.is_sharded(ctx.model),
                       "policy": max(float((policy[k] - saved[k]).abs().max()) for k in saved),
                       "engine": max(float((held[k] - engine[k]).abs().max()) for k in engine)}, f)
    dist.destroy()


@pytest.mark.slow
def test_a_resume_from_shards_never_builds_the_whole_policy(tmp_path, monkeypatch):
    """A fsdp2 resume from a sharded checkpoint (run.build_context with the shards) builds the policy as a
    skeleton, shards it and reads each rank's shards: the policy holds the saved weights and the engine a copy
    of them. Until the engine's copy is gathered, rank 0's peak RSS grows by about its half of the policy plus a
    buffer (one parameter), where a resume that builds the whole policy (and the engine's copy of it) grew by
    twice the policy; the whole resume's start, the engine's copy included, grows less too."""
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))  # (as above: the RSS follows the live tensors)
    folder = str(tmp_path)
    full = launch("resume_save", str(tmp_path / "save.json"), folder)["full_bytes"]
    shards = launch("resume_load", str(tmp_path / "shards.json"), folder, "shards")
    whole = launch("resume_load", str(tmp_path / "whole.json"), folder, "whole")
    mb = 2 ** 20
    print(f"full policy {full / mb:.1f} MB; rank 0's peak RSS growth until the engine's copy is gathered: from "
          f"shards {shards['policy_growth'] / mb:.1f} MB, whole {whole['policy_growth'] / mb:.1f} MB; over the "
          f"resume's whole start: from shards {shards['growth'] / mb:.1f} MB, whole {whole['growth'] / mb:.1f} MB")
    for m in (shards, whole):
        assert m["sharded"] and m["policy"] == 0.0 and m["engine"] == 0.0
    assert shards["policy_growth"] < 0.75 * full  # its half, and a buffer
    assert whole["policy_growth"] > 1.5 * full  # the whole policy and the engine's copy of it
    assert shards["growth"] < whole["growth"]


@pytest.mark.parametrize("kind", ["gpt_mini", "llama"])
def test_a_skeleton_has_the_architecture_and_buffers_but_no_weights(tiny_gpt, tiny_llama_dir, tmp_path, kind):
    """load_model(skeleton=True): every parameter on the meta device with the loaded model's name, shape and
    dtype (a tied weight still tied), the buffers (RoPE tables) real and equal to the loaded model's; refused
    with LoRA."""
    from rlpost.config import ModelConfig
    from rlpost.models import load_model
    from rlpost.models.hf import ModelLoadError
    from rlpost.settings.model import LoRAConfig

    if kind == "gpt_mini":
        model, tok = tiny_gpt
        model.save_pretrained(str(tmp_path))
        tok.save_pretrained(str(tmp_path))
        folder = str(tmp_path)
    else:
        folder = tiny_llama_dir
    full = load_model(ModelConfig(name=folder, device="cpu"))[0]
    skeleton = load_model(ModelConfig(name=folder, device="cpu"), skeleton=True)[0]
    params = dict(skeleton.named_parameters())
    assert params.keys() == dict(full.named_parameters()).keys() and all(p.is_meta for p in params.values())
    assert all(params[n].shape == p.shape and params[n].dtype == p.dtype for n, p in full.named_parameters())
    if kind == "gpt_mini":
        assert skeleton.lm_head.weight is skeleton.transformer.wte.weight
    buffers = dict(full.named_buffers())
    assert all(not b.is_meta and torch.equal(b, buffers[n]) for n, b in skeleton.named_buffers())
    with pytest.raises(ModelLoadError, match="LoRA"):
        load_model(ModelConfig(name=folder, device="cpu", lora=LoRAConfig(r=4)), skeleton=True)


# ---------------------------------------------------------------------------- the memory plan says so

def test_the_plan_holds_a_sharded_runs_engine_copy_only_while_it_samples_and_in_the_rollout_dtype():
    """rlpost plan memory under fsdp2: the engine's copy is in the rollout and reference phases (gathered at the
    sync, freed before training), not held through the train phase; rollout.dtype=bf16 holds the blocks' matmul
    weights in 2 bytes, and the sync gathers the engine's bytes. One process's rl.weight_sync=copy still holds it."""
    from rlpost.plan.memory import plan, plan_inputs, shape_for

    def rlpost_plan(*inputs, ranks=1):
        return plan(*plan_inputs(list(inputs), ranks, 128, 80.0))

    N, s = 7_615_616_512, shape_for("7b")
    root = 2 * 152_064 * 3_584 + 3_584  # Qwen2.5-7B: untied embedding and head, the final RMSNorm
    p = rlpost_plan("7b", "trainer.strategy=fsdp2", "rl.weight_sync=copy", "rollout.dtype=fp32", ranks=8)
    copies = [t for t in p.terms if t.name.startswith("engine copy")]
    assert sorted(t.phase for t in copies) == ["reference", "rollout"] and all(t.bytes == N * 4 for t in copies)
    assert next(t.bytes for t in p.terms if t.phase == "sync") == N * 4
    bf16 = rlpost_plan("7b", "trainer.strategy=fsdp2", "rl.weight_sync=copy", "rollout.dtype=bf16", ranks=8)
    matmul = N - root + 152_064 * 3_584  # the blocks and the untied head
    engine = matmul * 2 + (N - matmul) * 4
    assert next(t.bytes for t in bf16.terms if t.name.startswith("engine copy")) == engine
    assert next(t.bytes for t in bf16.terms if t.phase == "sync") == engine + s.vocab_size * s.hidden_size * 4
    one = rlpost_plan("7b", "rl.weight_sync=copy", "rollout.dtype=fp32")
    assert [t.phase for t in one.terms if t.name.startswith("engine copy")] == ["held"]


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    jobs = {"critic_save": job_critic_save, "critic_load": job_critic_load, "engine": job_engine,
            "resume_save": job_resume_save, "resume_load": job_resume_load}
    jobs[sys.argv[1]](*sys.argv[2:])
