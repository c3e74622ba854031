"""The vLLM rollout engine (rlpost/rollout/vllm_engine.py), for real: vLLM's CPU build here, a GPU build there.

Opt-in and slow (engine start-up): run in a virtual environment that has vLLM (docs/models.md, 'vLLM backend'):

    .venv-vllm/bin/python -m pytest -m slow tests/test_engine_vllm.py -s

Checked against transformers itself on a tiny Llama (head_dim 32: vLLM's CPU attention needs >= 32):
old_logp equals the trainer's log-probs, greedy output equals `generate`, seeds reproduce, finish reasons,
and a weight sync into the running engine makes it sample from the new weights. top-k / top-p /
min_new_tokens: the samples lie in the truncated distribution of a fresh forward, whose log-probs the engine
reports as rollout_logp, and an RL step then recomputes old_logp (ratio 1). LoRA: samples through the
engine's LoRARequest equal the merged model's, and an adapter-only sync switches to the new adapters. The
tests without `slow` need no vLLM and run in the fast suite (the error without vLLM, WeightSync's mode, the
config's rules for rollout.vllm_sleep and LoRA). vLLM's sleep mode needs a GPU: benchmarks/gpu_check.sh.
"""

import os
import time

import pytest
import torch

from conftest import encode, hf_greedy
from rlpost.config import ModelConfig
from rlpost.models import load_model, token_logprobs
from rlpost.rollout import SamplingParams, build_engine
from rlpost.rollout.vllm_engine import vllm_unavailable_reason
from rlpost.weight_sync import WeightSync

# vLLM reads every attribute of torch.distributed's modules at start-up, which warns of a deprecated one
pytestmark = pytest.mark.filterwarnings("ignore:`torch.distributed.reduce_op` is deprecated:FutureWarning")
PROMPTS = ["1+2=", "47+85=", "9+99=", "The answer is"]
NO_VLLM = vllm_unavailable_reason()
needs_vllm = pytest.mark.skipif(NO_VLLM is not None, reason=f"vLLM is not importable here ({NO_VLLM})")


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    return load_model(ModelConfig(name=tiny_llama_dir))


@pytest.fixture(scope="module")
def engine(llama):
    model, tok = llama
    eng = build_engine("vllm", model, tok, vllm_gpu_memory_utilization=0.25)  # as rollout.vllm_gpu_memory_utilization
    print(f"\n[vllm] engine start-up {eng.startup_seconds:.1f} s; torch threads after start: "
          f"{torch.get_num_threads()}")
    yield eng
    eng.close()


def responses(batch, P):
    lengths = batch.response_mask.sum(1).tolist()
    return [batch.input_ids[i, P:P + n].tolist() for i, n in enumerate(lengths)]


def assert_greedy_equals_transformers(engine, model, tok, prompts, new_tokens=12):
    batch = engine.generate(prompts, 2, SamplingParams(max_new_tokens=new_tokens, temperature=0.0))
    P = max(map(len, prompts))
    want = hf_greedy(model, tok, prompts, new_tokens)
    for i, got in enumerate(responses(batch, P)):
        ref = want[i // 2].tolist()
        ref = ref[:ref.index(tok.eos_token_id) + 1] if tok.eos_token_id in ref else ref
        assert got == ref, (i, got, ref)
    return batch


@pytest.mark.slow
@needs_vllm
@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_old_logp_equals_trainer_logprobs(engine, llama, temperature):
    model, tok = llama
    params = SamplingParams(max_new_tokens=10, temperature=temperature)
    t0 = time.perf_counter()
    batch = engine.generate(encode(tok, PROMPTS), 4, params, seed=0)
    seconds = time.perf_counter() - t0
    logp = token_logprobs(model, batch, params.logp_temperature) * batch.response_mask
    mismatch = (logp - batch.old_logp).abs().max().item()
    print(f"\n[vllm] T={temperature}: {int(batch.response_mask.sum())} tokens in {seconds:.2f} s, "
          f"max |old_logp - trainer logp| = {mismatch:.2e}")
    assert batch.response_mask.sum() > 0 and batch.input_ids.shape[0] == 16
    assert batch.group_ids.tolist() == [g for g in range(4) for _ in range(4)]
    assert (batch.policy_version == engine.version).all()
    assert mismatch <= 1e-4


@pytest.mark.slow
@needs_vllm
def test_the_engine_reserves_the_configured_share_of_the_gpu(engine):
    """rollout.vllm_gpu_memory_utilization reaches vLLM (its own default, 0.92, would crowd out a colocated
    trainer)."""
    assert engine.llm.llm_engine.vllm_config.cache_config.gpu_memory_utilization == 0.25


@pytest.mark.slow
@needs_vllm
def test_greedy_equals_transformers_generate(engine, llama):
    model, tok = llama
    assert_greedy_equals_transformers(engine, model, tok, encode(tok, PROMPTS))


@pytest.mark.slow
@needs_vllm
def test_seeded_and_reproducible(engine, llama):
    _, tok = llama
    prompts, params = encode(tok, PROMPTS), SamplingParams(max_new_tokens=8)
    a, b, c = (engine.generate(prompts, 4, params, seed=s) for s in (3, 3, 4))
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.old_logp, b.old_logp)
    assert not torch.equal(a.input_ids, c.input_ids)
    P = max(map(len, prompts))
    assert len({tuple(r) for r in responses(a, P)}) > 4  # the k samples of a prompt differ


@pytest.mark.slow
@needs_vllm
def test_finish_reasons_and_stop_tokens(engine, llama):
    model, tok = llama
    stops = list(range(0, len(tok.tok), 3))  # a third of the vocabulary stops a response
    params = SamplingParams(max_new_tokens=12, stop_token_ids=stops)
    prompts = encode(tok, PROMPTS)
    batch = engine.generate(prompts, 4, params, seed=1)
    P = max(map(len, prompts))
    for resp, reason in zip(responses(batch, P), batch.meta["finish_reason"]):
        assert all(t not in stops + [tok.eos_token_id] for t in resp[:-1])  # the stop token ends it, and is kept
        assert reason == ("stop" if resp[-1] in stops + [tok.eos_token_id] else "length")
        assert reason == "stop" or len(resp) == 12
    assert "stop" in batch.meta["finish_reason"]
    logp = token_logprobs(model, batch) * batch.response_mask
    assert (logp - batch.old_logp).abs().max() <= 1e-4


@torch.no_grad()
def truncated_logprobs(model, batch, params: SamplingParams, stops=()):
    """[B, T] log-prob of each response token under the distribution vLLM samples from, from a fresh forward of
    the trainer's model (one unpadded row at a time): logits / T, the stop tokens masked before min_new_tokens,
    top-k, then top-p (the smallest set of most likely tokens whose mass reaches top_p), renormalised. -inf: the
    token lies outside it. 0 off the response."""
    out = torch.zeros(batch.input_ids.shape)
    P = batch.prompt_width
    for i in range(len(batch)):
        keep = batch.attention_mask[i].bool()
        logits = model.hf(batch.input_ids[i][keep][None]).logits[0].float()  # [L, V]; row i's positions, in order
        pos = keep.nonzero().squeeze(1)
        for j in range(int(batch.response_mask[i].sum())):
            z = logits[(pos == P + j).nonzero().item() - 1].clone()  # the logits that predicted response token j
            if j < params.min_new_tokens:
                z[list(stops)] = float("-inf")
            z = z / params.temperature if params.temperature > 0 else z
            if params.temperature > 0 and params.top_k > 0:
                z[z < torch.topk(z, params.top_k).values[-1]] = float("-inf")
            if params.temperature > 0 and params.top_p < 1.0:
                sz, order = z.sort()  # ascending, as vLLM: drop the tail whose mass is at most 1 - top_p
                drop = sz.softmax(-1).cumsum(-1) <= 1 - params.top_p
                drop[-1] = False
                z[order[drop]] = float("-inf")
            out[i, P + j] = z.log_softmax(-1)[batch.input_ids[i, P + j]]
    return out


@pytest.mark.slow
@needs_vllm
def test_top_k_1_is_greedy(engine, llama):
    _, tok = llama
    prompts = encode(tok, PROMPTS)
    greedy = engine.generate(prompts, 2, SamplingParams(max_new_tokens=10, temperature=0.0))
    top1 = engine.generate(prompts, 2, SamplingParams(max_new_tokens=10, temperature=1.0, top_k=1), seed=5)
    assert torch.equal(top1.input_ids, greedy.input_ids)
    assert greedy.rollout_logp is None and top1.rollout_logp is not None and engine.truncates_logp(
        SamplingParams(top_k=1))
    assert (top1.rollout_logp * top1.response_mask).abs().max() <= 1e-6  # one token left: probability 1


@pytest.mark.slow
@needs_vllm
@pytest.mark.parametrize("options", [dict(top_p=0.8), dict(top_k=4, temperature=0.7), dict(top_k=20, top_p=0.6)],
                         ids=["top_p", "top_k", "both"])
def test_truncated_sampling_reports_the_behaviour_logprobs(engine, llama, options):
    """The samples lie in the truncated distribution of a fresh forward, and rollout_logp is its renormalised
    log-prob: the behaviour policy mu, not the untruncated log softmax of the old_logp contract."""
    model, tok = llama
    params = SamplingParams(max_new_tokens=10, **options)
    batch = engine.generate(encode(tok, PROMPTS), 4, params, seed=11)
    mask = batch.response_mask.bool()
    want = truncated_logprobs(model, batch, params)
    assert torch.isfinite(want[mask]).all(), "a sampled token lies outside the truncated distribution"
    mismatch = (want - batch.rollout_logp)[mask].abs().max().item()
    untruncated = token_logprobs(model, batch, params.logp_temperature)
    print(f"\n[vllm] {options}: max |rollout_logp - truncated fresh forward| = {mismatch:.2e}, truncation moves "
          f"the log-prob by up to {(untruncated - want)[mask].abs().max():.2f}")
    assert mismatch <= 1e-4
    assert (untruncated - want)[mask].abs().max() > 1e-2  # the truncation shows: not the contract's old_logp
    assert torch.equal(batch.old_logp, batch.rollout_logp)  # until the controller recomputes old_logp


@pytest.mark.slow
@needs_vllm
def test_min_new_tokens_holds_the_stop_tokens_back(engine, llama):
    model, tok = llama
    prompts = encode(tok, PROMPTS)
    batch = engine.generate(prompts, 1, SamplingParams(max_new_tokens=10, temperature=0.0, min_new_tokens=4))
    want = hf_greedy(model, tok, prompts, 10, min_new_tokens=4)  # greedy: transformers' own min_new_tokens
    P = max(map(len, prompts))
    for got, ref in zip(responses(batch, P), want.tolist()):
        assert got == (ref[:ref.index(tok.eos_token_id) + 1] if tok.eos_token_id in ref else ref)
    stops = list(range(0, len(tok.tok), 3))  # a third of the vocabulary stops a response: stops come early
    params = SamplingParams(max_new_tokens=10, min_new_tokens=4, stop_token_ids=stops)
    batch = engine.generate(prompts, 4, params, seed=3)
    for resp in responses(batch, P):
        assert len(resp) >= 4 and all(t not in stops + [tok.eos_token_id] for t in resp[:4])
    want = truncated_logprobs(model, batch, params, stops=stops + [tok.eos_token_id])
    assert (want - batch.rollout_logp)[batch.response_mask.bool()].abs().max() <= 1e-4


@pytest.mark.slow
@needs_vllm
def test_weight_sync_pushes_new_weights_into_the_running_engine(engine, llama):
    model, tok = llama
    prompts = encode(tok, PROMPTS)
    sync = WeightSync(model, engine)
    before = assert_greedy_equals_transformers(engine, model, tok, prompts)
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    try:
        with torch.no_grad():  # as an optimizer step would: in place, on the trainer's module
            torch.manual_seed(7)
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.5)
        stale = engine.generate(prompts, 2, SamplingParams(max_new_tokens=12, temperature=0.0))
        assert torch.equal(stale.input_ids, before.input_ids)  # vLLM holds its own copy until the sync
        t0 = time.perf_counter()
        metrics = sync.sync()
        print(f"\n[vllm] weight sync into the running engine: {time.perf_counter() - t0:.3f} s")
        assert metrics["sync/version"] == 1.0 and engine.version == 1
        after = assert_greedy_equals_transformers(engine, model, tok, prompts)  # the new weights' greedy output
        assert not torch.equal(after.input_ids, before.input_ids)
        assert (after.policy_version == 1).all()
        sampled = engine.generate(prompts, 4, SamplingParams(max_new_tokens=10), seed=2)
        logp = token_logprobs(model, sampled) * sampled.response_mask
        assert (logp - sampled.old_logp).abs().max() <= 1e-4
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(saved[n])
        sync.sync()


@pytest.mark.slow
@needs_vllm
def test_an_engine_core_in_its_own_process_reloads_weights_from_its_folder(llama, monkeypatch):
    """VLLM_ENABLE_V1_MULTIPROCESSING=1 (the engine core in a process of its own): tensors cannot travel through
    collective_rpc, so a sync saves them into the engine's model folder and vLLM reloads them from that path."""
    model, tok = llama
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    prompts = encode(tok, PROMPTS)
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = build_engine("vllm", model, tok)
    try:
        before = assert_greedy_equals_transformers(engine, model, tok, prompts)
        with torch.no_grad():
            torch.manual_seed(11)
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.5)
        WeightSync(model, engine).sync()
        after = assert_greedy_equals_transformers(engine, model, tok, prompts)  # the new weights' greedy output
        assert not torch.equal(after.input_ids, before.input_ids)
    finally:
        engine.close()
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(saved[n])


@pytest.mark.skipif(NO_VLLM is None, reason="vLLM is installed here: the error path cannot be reached")
def test_build_engine_vllm_without_vllm_says_how_to_install(llama):
    model, tok = llama
    with pytest.raises(ValueError, match=r"rollout.engine=vllm: .*pip install 'rlpost\[vllm\]'"):
        build_engine("vllm", model, tok)


def test_weight_sync_takes_its_mode_from_an_engine_that_owns_its_weights(llama):
    """The sync's mode is the engine's; which settings go together is the config's check (rlpost/loops/)."""
    model, _ = llama

    class OwnsWeights:  # stands in for a VLLMEngine
        weight_sync_mode, version, pushed = "vllm", 0, 0

        def update_weights(self, named_tensors, version):
            self.pushed += len(list(named_tensors))
            self.version = version

    eng = OwnsWeights()
    sync = WeightSync(model, eng)  # pushes at once (the engine may predate SFT), then on every sync
    assert sync.mode == "vllm" and eng.pushed == len(model.hf.state_dict())
    sync.sync()
    assert eng.pushed == 2 * len(model.hf.state_dict()) and eng.version == 1


@pytest.mark.slow
@needs_vllm
def test_the_pipeline_runs_on_vllm_from_a_recipe(tiny_llama_dir, tmp_path):
    """rollout.engine=vllm + rl.weight_sync=vllm through `train`: SFT, held-out evaluation (weights pushed
    first), GRPO steps with a weight push after each; engine and trainer log-probs agree."""
    import json

    from rlpost.config import load_config
    from rlpost.run import train

    cfg = load_config(None, ["sft.steps=3", "sft.batch_size=16", "rl.steps=2", "rl.eval_every=0", "task.num_eval=20",
                             "rollout.prompts_per_step=4", "rollout.k=4", "rollout.max_new_tokens=4",
                             "eval.samples_per_prompt=1", f"model.name={tiny_llama_dir}", "rollout.engine=vllm",
                             "rl.weight_sync=vllm", f"out_dir={tmp_path}", "run_name=vllm"])
    assert train(cfg)["status"] == "ok"
    rl = [json.loads(line) for line in open(tmp_path / "vllm" / "metrics.jsonl")]
    rl = [m for m in rl if m["stage"] == "rl"]
    assert len(rl) == 2 and rl[-1]["sync/version"] >= 2 and rl[0]["rollout/logp_mismatch_max"] < 1e-4


@pytest.mark.slow
@needs_vllm
def test_a_ray_rollout_worker_runs_vllm_and_reloads_weights_by_its_own_path(llama):
    """rl.topology=disaggregated with rollout.engine=vllm: the worker builds vLLM in its actor; weights reach
    it through the object store (`ray`) and through a torch.distributed broadcast (`collective`), then vLLM's
    reload path. Greedy output equals transformers' before and after the update."""
    pytest.importorskip("ray")
    from rlpost.cluster import RayCluster
    from rlpost.rollout.engine import named_weights
    from rlpost.rollout.ray_engine import RayEngine

    model, tok = llama
    prompts = encode(tok, PROMPTS)
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    with RayCluster(num_cpus=2):
        for mode in ("ray", "collective"):
            engine = RayEngine(model, tok, kind="vllm", workers=1, mode=mode)
            try:
                engine.update_weights(named_weights(model), 0)
                before = assert_greedy_equals_transformers(engine, model, tok, prompts)
                with torch.no_grad():
                    torch.manual_seed(7)
                    for p in model.parameters():
                        p.add_(torch.randn_like(p) * 0.5)
                t0 = time.perf_counter()
                engine.update_weights(named_weights(model), 1)
                print(f"\n[vllm in Ray, {mode}] weight update {time.perf_counter() - t0:.3f} s")
                after = assert_greedy_equals_transformers(engine, model, tok, prompts)
                assert not torch.equal(after.input_ids, before.input_ids) and (after.policy_version == 1).all()
            finally:
                engine.close()
                with torch.no_grad():
                    for n, p in model.named_parameters():
                        p.copy_(saved[n])


@pytest.mark.slow
@needs_vllm
def test_an_rl_step_with_top_p_takes_old_logp_from_the_trainer(tiny_llama_dir, tmp_path):
    """rollout.top_p=0.9 on vLLM: the engine's truncated log-probs become rollout_logp and old_logp is the
    trainer's own, so PPO's ratio is exactly 1 before the optimizer step (one minibatch, one epoch)."""
    import json

    from rlpost.config import load_config
    from rlpost.run import train

    cfg = load_config(None, ["sft.steps=0", "rl.steps=1", "rl.eval_every=0", "task.num_eval=4",
                             "eval.samples_per_prompt=1", "rollout.prompts_per_step=4", "rollout.k=4",
                             "rollout.max_new_tokens=6", "rollout.top_p=0.9", "trainer.micro_batch_size=8",
                             f"model.name={tiny_llama_dir}", "rollout.engine=vllm",
                             f"out_dir={tmp_path}", "run_name=top_p"])
    assert train(cfg)["status"] == "ok"
    rl = [json.loads(line) for line in open(tmp_path / "top_p" / "metrics.jsonl")]
    rl = [m for m in rl if m["stage"] == "rl"]
    print(f"\n[vllm] top_p=0.9 RL step: ratio_mean {rl[0]['loss/ratio_mean']:.8f}, engine (truncated) vs trainer "
          f"log-prob max {rl[0]['rollout/logp_mismatch_max']:.3f}")
    assert abs(rl[0]["loss/ratio_mean"] - 1.0) <= 1e-6
    assert rl[0]["loss/clip_frac_low"] == rl[0]["loss/clip_frac_high"] == 0.0
    assert rl[0]["rollout/logp_mismatch_max"] > 1e-2  # the engine's log-probs were the truncated ones


class BehaviourEngine:
    """Stands in for vLLM with top-p: a native engine whose reported log-probs are another distribution's
    (the sampled log-prob + 0.3, as a truncated, renormalised one raises it), set as rollout_logp."""

    weight_sync_mode = "pointer"

    def __init__(self, model, tok):
        from rlpost.rollout.native import NativeEngine

        self.inner = NativeEngine(model, tok)

    @property
    def version(self):
        return self.inner.version

    def update_weights(self, named_tensors, version):
        self.inner.update_weights(named_tensors, version)

    def generate(self, prompts, k, params, seed=0):
        batch = self.inner.generate(prompts, k, params, seed=seed)
        mu = (batch.old_logp + 0.3) * batch.response_mask
        return batch.replace(old_logp=mu, rollout_logp=mu.clone())


def test_the_controller_recomputes_old_logp_when_the_engine_reports_behaviour_logprobs(tiny_gpt):
    """With rollout_logp from the engine (and no rollout correction) the loss gets the trainer's own old_logp:
    PPO's ratio is 1 before the optimizer step, and the engine's log-probs stay in rollout_logp."""
    from rlpost.algorithms import get_algorithm
    from rlpost.config import RLConfig, RolloutConfig, TrainerConfig
    from rlpost.controller import Controller, Roles
    from rlpost.env.reward import Reward
    from test_controller import SpyTrainer

    model, tok = tiny_gpt
    rows = [{"prompt": f"{a}+{b}=", "answer": "0"} for a in range(10, 14) for b in range(2)]
    engine = BehaviourEngine(model, tok)
    trainer = SpyTrainer(model, TrainerConfig(lr=1e-3, micro_batch_size=5))
    roles = Roles(engine=engine, reward=Reward(lambda completion, row: float(len(completion) % 2), tok),
                  algorithm=get_algorithm("grpo", beta=0.0), trainer=trainer, weight_sync=WeightSync(model, engine))
    ctl = Controller(roles, RLConfig(), SamplingParams(max_new_tokens=4, top_p=0.9),
                     RolloutConfig(prompts_per_step=3, k=4), rows=rows,
                     prompt_ids=[tok.encode_prompt(r["prompt"]) for r in rows], seed=0)
    for step in (1, 2):
        metrics = ctl.step(step)
        batch = trainer.seen[-1]
        mask = batch.response_mask.bool()
        assert metrics["loss/ratio_mean"] == pytest.approx(1.0, abs=1e-6)  # old_logp is the trainer's forward
        assert ((batch.rollout_logp - batch.old_logp)[mask] - 0.3).abs().max() <= 1e-4  # the engine's, kept
        assert metrics["rollout/logp_mismatch_max"] == pytest.approx(0.3, abs=1e-4)  # measured against them


def test_multi_turn_episodes_keep_the_engines_behaviour_logprobs(tiny_gpt):
    from rlpost.env import EnvRole, Step
    from rlpost.env.base import Env
    from rlpost.rollout.episodes import run_episodes

    class TwoTurns(Env):
        def reset(self, row):
            self.n = 0
            return row["prompt"]

        def step(self, turn):
            self.n += 1
            return Step(observation="+1=", reward=1.0, done=self.n >= 2)

    model, tok = tiny_gpt
    rows = [{"prompt": "12+34=", "answer": "46"}, {"prompt": "7+8=", "answer": "15"}]
    role = EnvRole(make=TwoTurns, tokenizer=tok, max_turns=2, max_tokens=15)
    batch, _ = run_episodes(BehaviourEngine(model, tok), role, rows, [tok.encode_prompt(r["prompt"]) for r in rows],
                            2, SamplingParams(max_new_tokens=4, top_p=0.9), 0)
    assert batch.rollout_logp is not None and max(batch.meta["turns"]) == 2
    assert torch.equal(batch.rollout_logp, batch.old_logp)
    plain, _ = run_episodes(BehaviourEngine(model, tok).inner, role, rows,
                            [tok.encode_prompt(r["prompt"]) for r in rows], 2, SamplingParams(max_new_tokens=4), 0)
    assert plain.rollout_logp is None


# ---------------------------------------------------------------------------- LoRA

LORA_TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def lora_llama(tiny_llama_dir):
    """The tiny Llama with rank-8 adapters, set to random values large enough to change its greedy output."""
    from rlpost.config import LoRAConfig

    model, tok = load_model(ModelConfig(name=tiny_llama_dir, lora=LoRAConfig(r=8, target_modules=LORA_TARGETS)))
    randomize_adapters(model, seed=1)
    return model, tok


def randomize_adapters(model, seed):
    from rlpost.models.lora import adapter_state

    torch.manual_seed(seed)
    with torch.no_grad():
        for t in adapter_state(model).values():
            t.copy_(torch.randn_like(t) * 0.3)


def merged(model, tiny_llama_dir):
    """A plain model (no adapters) whose weights are the LoRA model's base + delta."""
    from rlpost.models.lora import merged_state_dict

    plain, _ = load_model(ModelConfig(name=tiny_llama_dir))
    plain.hf.load_state_dict(merged_state_dict(model))
    return plain


@pytest.fixture(scope="module")
def lora_engine(lora_llama):
    from rlpost.rollout.vllm_engine import VLLMEngine

    model, tok = lora_llama
    eng = VLLMEngine(model, tok, kv_cache_memory_bytes=64 * 2**20)  # a second engine in this process: small KV
    yield eng
    eng.close()


@pytest.mark.slow
@needs_vllm
def test_lora_samples_equal_the_merged_model(lora_engine, lora_llama, tiny_llama_dir):
    model, tok = lora_llama
    prompts = encode(tok, PROMPTS)
    plain = merged(model, tiny_llama_dir)
    assert_greedy_equals_transformers(lora_engine, plain, tok, prompts)
    base = hf_greedy(load_model(ModelConfig(name=tiny_llama_dir))[0], tok, prompts, 12)
    assert not torch.equal(base, hf_greedy(plain, tok, prompts, 12))  # the adapters matter here
    assert lora_engine.lora_request is not None and lora_engine.lora["r"] == 8
    sampled = lora_engine.generate(prompts, 4, SamplingParams(max_new_tokens=10), seed=2)
    mismatch = ((token_logprobs(plain, sampled) - sampled.old_logp) * sampled.response_mask).abs().max().item()
    print(f"\n[vllm LoRA] max |old_logp - merged model logp| = {mismatch:.2e}")
    assert mismatch <= 1e-4


@pytest.mark.slow
@needs_vllm
def test_lora_sync_sends_the_adapters_and_switches_to_them(lora_engine, lora_llama, tiny_llama_dir):
    from rlpost.models.lora import adapter_state

    model, tok = lora_llama
    prompts = encode(tok, PROMPTS)
    sync = WeightSync(model, lora_engine)  # a full push first: the base reloads too
    before = assert_greedy_equals_transformers(lora_engine, merged(model, tiny_llama_dir), tok, prompts)
    request = lora_engine.lora_request
    randomize_adapters(model, seed=2)  # as an optimizer step would: the adapters change, the base does not
    t0 = time.perf_counter()
    metrics = sync.sync()
    print(f"\n[vllm LoRA] adapter sync {time.perf_counter() - t0:.3f} s, {metrics['sync/bytes'] / 1e3:.0f} kB")
    adapters = sum(t.numel() * t.element_size() for t in adapter_state(model).values())
    assert metrics["sync/bytes"] == adapters < sum(p.numel() * p.element_size() for p in model.parameters()) / 10
    assert lora_engine.lora_request.lora_int_id != request.lora_int_id and lora_engine.version == sync.version
    after = assert_greedy_equals_transformers(lora_engine, merged(model, tiny_llama_dir), tok, prompts)
    assert not torch.equal(after.input_ids, before.input_ids)
    assert not os.path.exists(request.lora_path)  # the previous adapter folder is gone


@pytest.mark.slow
@needs_vllm
def test_ray_rollout_workers_take_adapter_only_updates(lora_llama, tiny_llama_dir):
    """rl.topology=disaggregated with model.lora: the worker's vLLM gets the adapters alone through the object
    store (`ray`) and through a broadcast (`collective`), and samples what the merged model does."""
    pytest.importorskip("ray")
    from rlpost.cluster import RayCluster
    from rlpost.models.lora import adapter_state
    from rlpost.rollout.engine import named_weights
    from rlpost.rollout.ray_engine import RayEngine

    model, tok = lora_llama
    prompts = encode(tok, PROMPTS)
    saved = {n: t.clone() for n, t in adapter_state(model).items()}
    with RayCluster(num_cpus=2):
        for mode in ("ray", "collective"):
            engine = RayEngine(model, tok, kind="vllm", workers=1, mode=mode)
            try:
                engine.update_weights(named_weights(model), 0)
                before = assert_greedy_equals_transformers(engine, merged(model, tiny_llama_dir), tok, prompts)
                randomize_adapters(model, seed=3)
                engine.update_weights(named_weights(model, adapters_only=True), 1)
                after = assert_greedy_equals_transformers(engine, merged(model, tiny_llama_dir), tok, prompts)
                assert not torch.equal(after.input_ids, before.input_ids) and (after.policy_version == 1).all()
            finally:
                engine.close()
                with torch.no_grad():  # the module's other tests see the adapters as they were
                    for n, t in adapter_state(model).items():
                        t.copy_(saved[n])


def test_lora_rank_and_truncation_rules():
    """max_lora_rank is the smallest rank vLLM accepts that holds model.lora.r; which options make vLLM's
    log-probs a truncated distribution's (greedy ignores top-k / top-p; the min-tokens mask applies to both)."""
    from rlpost.rollout.vllm_engine import lora_rank, truncates_logp

    assert [lora_rank(r) for r in (1, 4, 8, 9, 64, 300)] == [1, 8, 8, 16, 64, 320]
    with pytest.raises(ValueError, match=r"model.lora.r=600 is above vLLM's largest LoRA rank 512"):
        lora_rank(600)
    assert not truncates_logp(SamplingParams())
    assert truncates_logp(SamplingParams(top_p=0.9)) and truncates_logp(SamplingParams(top_k=5))
    assert not truncates_logp(SamplingParams(temperature=0.0, top_p=0.9, top_k=5))
    assert truncates_logp(SamplingParams(temperature=0.0, min_new_tokens=2))


def test_config_takes_lora_with_vllm():
    from rlpost.config import load_config

    cfg = load_config(None, ["model.lora.r=8", "rollout.engine=vllm"])
    assert cfg.model.lora.r == 8 and cfg.rollout.engine == "vllm"


# ---------------------------------------------------------------------------- sleep mode

@pytest.mark.parametrize("overrides", [["rollout.vllm_sleep=true"], ["rollout.vllm_sleep=true", "rollout.engine=vllm",
                                                                     "rl.topology=disaggregated"]])
def test_vllm_sleep_needs_a_colocated_vllm_engine(overrides):
    from rlpost.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"rollout.vllm_sleep .* rollout.engine=vllm and rl.topology=colocated"):
        load_config(None, overrides)
    assert load_config(None, ["rollout.vllm_sleep=true", "rollout.engine=vllm"]).rollout.vllm_sleep


@pytest.mark.slow
@needs_vllm
def test_vllm_sleep_says_why_it_cannot_run_without_sleep_mode(llama):
    """vLLM's CPU platform has no sleep mode: the engine refuses at once, naming the key (on a GPU the real
    test is benchmarks/gpu_check.sh's vLLM section)."""
    from vllm.platforms import current_platform

    from rlpost.rollout.vllm_engine import VLLMEngine

    if current_platform.is_sleep_mode_available():
        pytest.skip("this vLLM has sleep mode: benchmarks/gpu_check.sh tests it")
    model, tok = llama
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"rollout.vllm_sleep=true needs vLLM's sleep mode.*'cpu'.*"
                                         r"rollout.vllm_sleep=false"):
        VLLMEngine(model, tok, sleep=True)
    assert time.perf_counter() - t0 < 30  # refused before vLLM starts


@pytest.mark.slow
@needs_vllm
def test_the_gpu_checks_vllm_part_runs_on_vllms_cpu_build(tmp_path):
    """benchmarks/gpu_step.py's vllm_features (what benchmarks/gpu_check.sh runs on a GPU) at toy size on the
    CPU: top-p, LoRA and two RL steps run on one engine; sleep mode is reported as unavailable here."""
    from benchmarks.gpu_step import main

    res = main(["--device", "cpu", "--tiny", "--skip", "native", "vllm", "trl", "--json", str(tmp_path / "r.json")])
    assert res["failed"] == {}, res["failed"]
    out = res["vllm_features"]
    assert "rollout.vllm_sleep" in out["sleep_unavailable"]
    assert out["top_p"]["inside_nucleus_frac"] == 1.0 and out["top_p"]["logp_max_abs_diff"] <= 1e-4
    assert [abs(s["ratio_mean"] - 1.0) <= 1e-6 for s in out["rl_steps"]] == [True, True]
    assert all(0 < s["sync_bytes"] < 2**20 for s in out["rl_steps"])  # the adapters alone
    lora = out["lora"]
    assert lora["greedy_agrees"] == lora["after_rl_steps_agrees"] == lora["after_new_adapters_agrees"] == 1.0
    assert lora["output_changed"]
