"""The vLLM rollout engine (rlpost/rollout/vllm_engine.py), for real: vLLM's CPU build here, a GPU build there.

Opt-in and slow (engine start-up): run in a virtual environment that has vLLM (docs/models.md, 'vLLM backend'):

    .venv-vllm/bin/python -m pytest -m slow tests/test_engine_vllm.py -s

Checked against transformers itself on a tiny Llama (head_dim 32: vLLM's CPU attention needs >= 32):
old_logp equals the trainer's log-probs, greedy output equals `generate`, seeds reproduce, finish reasons,
and a weight sync into the running engine makes it sample from the new weights. The last two tests need no
vLLM and run in the fast suite: the error without vLLM, and WeightSync refusing a mode that does not fit.
"""

import time

import pytest
import torch

from conftest import encode, hf_greedy
from rlpost.config import ModelConfig
from rlpost.models import load_model, token_logprobs
from rlpost.rollout import SamplingParams, build_engine
from rlpost.rollout.vllm_engine import vllm_unavailable_reason
from rlpost.weight_sync import WeightSync

PROMPTS = ["1+2=", "47+85=", "9+99=", "The answer is"]
NO_VLLM = vllm_unavailable_reason()
needs_vllm = pytest.mark.skipif(NO_VLLM is not None, reason=f"vLLM is not importable here ({NO_VLLM})")


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    return load_model(ModelConfig(name=tiny_llama_dir))


@pytest.fixture(scope="module")
def engine(llama):
    from rlpost.rollout.vllm_engine import VLLMEngine

    model, tok = llama
    eng = VLLMEngine(model, tok)
    print(f"\n[vllm] engine start-up {eng.startup_seconds:.1f} s; torch threads after start: {torch.get_num_threads()}")
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


@pytest.mark.slow
@needs_vllm
def test_options_outside_the_old_logp_contract_are_refused(engine, llama):
    _, tok = llama
    for kw in (dict(top_k=5), dict(top_p=0.9), dict(min_new_tokens=2)):
        with pytest.raises(ValueError, match="old_logp"):
            engine.generate(encode(tok, PROMPTS[:1]), 2, SamplingParams(max_new_tokens=4, **kw))


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
