"""The Engine protocol (rlpost/rollout/engine.py): every CPU engine implements it, weights reach an engine
through update_weights only ("pointer": zero copy, "copy": in place, names and shapes checked), the version
is stamped on the rows, close() is idempotent, WeightSync round-trips its state, and what crosses the
protocol pickles (as an engine in another process needs)."""

import pickle

import pytest
import torch

from rlpost.config import ModelConfig, TrainerConfig
from rlpost.models import load_model, token_logprobs
from rlpost.rollout import Engine, SamplingParams, build_engine
from rlpost.rollout.engine import named_weights
from rlpost.stages.sft import nll_loss
from rlpost.trainer import Trainer
from rlpost.weight_sync import WeightSync

PROMPTS = ["1+2=", "47+85=", "9+99="]
KINDS = ["native-gpt", "native-llama", "hf-llama"]


@pytest.fixture
def make(tiny_gpt, tiny_llama_dir):
    """make(kind, share_weights) -> (engine, trainer model, tokenizer); a fresh model each time (tests train it)."""
    def build(kind, share_weights=True):
        model, tok = tiny_gpt if kind == "native-gpt" else load_model(ModelConfig(name=tiny_llama_dir))
        return build_engine(kind.split("-")[0], model, tok, share_weights=share_weights), model, tok
    return build


def prompts(tok):
    return [tok.encode_prompt(p) for p in PROMPTS]


def sample(engine, tok, k=2, seed=0, **kw):
    return engine.generate(prompts(tok), k, SamplingParams(**{"max_new_tokens": 5, **kw}), seed=seed)


def train_one_step(model, batch):
    Trainer(model, TrainerConfig(lr=5e-2)).step(batch, nll_loss)


@pytest.mark.parametrize("share_weights", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_every_engine_implements_the_protocol(make, kind, share_weights):
    engine, _, _ = make(kind, share_weights)
    assert isinstance(engine, Engine)
    assert engine.version == 0 and engine.weight_sync_mode == ("pointer" if share_weights else "copy")


@pytest.mark.parametrize("share_weights", [True, False])
@pytest.mark.parametrize("kind", ["native-gpt", "native-llama"])
def test_native_sampling_runs_in_inference_mode_and_hands_out_ordinary_tensors(make, kind, share_weights):
    """The native engines sample in torch.inference_mode (cheaper per op than no_grad), yet nothing that leaves
    generate is an inference tensor: a loss that saves the rows' tensors for its backward trains on them, and
    the trainer's parameters (which a pointer engine reads) stay ordinary, for a second rollout after the step."""
    engine, model, tok = make(kind, share_weights)
    modes, forward = [], engine.forward
    engine.forward = lambda *a, **kw: modes.append(torch.is_inference_mode_enabled()) or forward(*a, **kw)
    batch = sample(engine, tok, temperature=1.0)
    assert modes and all(modes)
    fields = [v for v in vars(batch).values() if isinstance(v, torch.Tensor)]
    assert fields and not any(t.is_inference() for t in fields)
    assert not any(p.is_inference() for p in model.parameters())

    def loss_saving_old_logp(logp, b):  # old_logp * logp saves old_logp for the backward
        return -(b.old_logp * logp * b.response_mask).sum() / b.response_mask.sum(), {}

    Trainer(model, TrainerConfig(lr=1e-2)).step(batch, loss_saving_old_logp)
    engine.update_weights(named_weights(model), 1)
    assert sample(engine, tok, temperature=1.0).policy_version.tolist() == [1] * 6


@pytest.mark.parametrize("kind", KINDS)
def test_pointer_update_moves_nothing_and_stamps_the_version(make, kind):
    engine, model, tok = make(kind, share_weights=True)
    params = list(model.parameters())
    before = [(p.data_ptr(), p._version) for p in params]
    engine.update_weights(named_weights(model), 7)
    assert [(p.data_ptr(), p._version) for p in params] == before   # copy_ would bump _version
    assert engine.version == 7 and sample(engine, tok).policy_version.tolist() == [7] * 6


@pytest.mark.parametrize("kind", KINDS)
def test_copy_engine_samples_old_weights_until_update_weights(make, kind):
    engine, model, tok = make(kind, share_weights=False)
    batch = sample(engine, tok, k=3)
    train_one_step(model, batch)
    stale = sample(engine, tok, k=3, seed=1)                      # the engine still has the old weights
    new_logp = token_logprobs(model, stale) * stale.response_mask
    assert (new_logp - stale.old_logp).abs().max() > 1e-3
    engine.update_weights(named_weights(model), 1)
    fresh = sample(engine, tok, k=3, seed=1)
    new_logp = token_logprobs(model, fresh) * fresh.response_mask
    assert (new_logp - fresh.old_logp).abs().max() <= 1e-5
    assert fresh.policy_version.tolist() == [1] * 9


def test_update_weights_names_what_is_wrong(make):
    engine, model, tok = make("native-llama", share_weights=False)
    weights = dict(named_weights(model))
    name = "model.layers.0.mlp.up_proj.weight"
    bad = {**weights, "model.bogus": torch.zeros(1)}
    bad.pop(name)
    with pytest.raises(ValueError, match=rf"missing: {name}; unexpected: model.bogus"):
        engine.update_weights(bad.items(), 1)
    with pytest.raises(ValueError, match=rf"shape mismatch: {name} \(3, 2\)"):
        engine.update_weights({**weights, name: torch.zeros(3, 2)}.items(), 1)
    assert engine.version == 0                                    # a refused update changes nothing


def test_a_tied_weight_may_come_under_one_name(make):
    """gpt_mini ties lm_head to wte; its checkpoint stores the pair once, which update_weights accepts."""
    engine, model, tok = make("native-gpt", share_weights=False)
    with torch.no_grad():
        model.transformer.wte.weight.mul_(2)
    engine.update_weights([(n, t) for n, t in named_weights(model) if n != "lm_head.weight"], 1)
    batch = sample(engine, tok)
    assert (token_logprobs(model, batch) * batch.response_mask - batch.old_logp).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_close_is_idempotent(make, kind):
    engine, _, tok = make(kind, share_weights=False)
    engine.close()
    engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        sample(engine, tok)


@pytest.mark.parametrize("share", [True, False])
def test_weight_sync_mode_follows_how_the_engine_was_built(make, share):
    engine, model, _ = make("native-gpt", share_weights=share)
    assert WeightSync(model, engine).mode == engine.weight_sync_mode == ("pointer" if share else "copy")


def test_weight_sync_state_round_trip_restores_version_and_weights(make):
    engine, model, tok = make("native-llama", share_weights=False)
    sync = WeightSync(model, engine)
    for step in range(3):
        train_one_step(model, sample(engine, tok, seed=step))
        metrics = sync.sync()
    assert metrics["sync/version"] == 3 and metrics["sync/bytes"] > 0 and metrics["time/sync_copy"] >= 0
    state, saved = sync.state_dict(), {n: t.clone() for n, t in named_weights(model)}
    expected = sample(engine, tok, seed=9)
    assert state == {"version": 3} and expected.policy_version.tolist() == [3] * 6

    # resume in a new process: the model loads its checkpoint, the engine starts from the base weights
    engine2, model2, _ = make("native-llama", share_weights=False)
    model2.hf.load_state_dict(saved)
    sync2 = WeightSync(model2, engine2)
    sync2.load_state_dict(pickle.loads(pickle.dumps(state)))
    assert sync2.version == engine2.version == 3
    again = sample(engine2, tok, seed=9)
    assert torch.equal(again.input_ids, expected.input_ids) and torch.allclose(again.old_logp, expected.old_logp)
    assert (token_logprobs(model2, again) * again.response_mask - again.old_logp).abs().max() <= 1e-5
    assert again.policy_version.tolist() == [3] * 6
    assert sync2.sync()["sync/version"] == 4


def test_what_crosses_the_protocol_pickles(make):
    engine, model, tok = make("native-gpt")
    params = SamplingParams(max_new_tokens=4, temperature=0.7, stop_token_ids=[3], stop=["\n"])
    assert pickle.loads(pickle.dumps(params)) == params
    batch = engine.generate(prompts(tok), 2, params, seed=0)
    back = pickle.loads(pickle.dumps(batch))
    for field in ("input_ids", "attention_mask", "response_mask", "old_logp", "group_ids", "policy_version"):
        assert torch.equal(getattr(back, field), getattr(batch, field))
    assert back.meta == batch.meta
    weights = pickle.loads(pickle.dumps(named_weights(model)))
    assert [n for n, _ in weights] == [n for n, _ in named_weights(model)]


def test_the_pipeline_runs_with_a_copy_engine(tmp_path):
    """rl.weight_sync=copy through `train`: the engine's copy is brought up to date after SFT (before the
    evaluation) and after every RL step, so engine and trainer log-probs agree at every step."""
    import json

    from rlpost.config import load_config
    from rlpost.run import train

    cfg = load_config(None, ["sft.steps=20", "sft.batch_size=32", "rl.steps=2", "rl.eval_every=1", "task.num_eval=20",
                             "rollout.prompts_per_step=4", "rollout.k=4", "eval.samples_per_prompt=1",
                             "model.n_layer=2", "model.n_embd=32", "model.n_head=2", "rl.weight_sync=copy",
                             f"out_dir={tmp_path}", "run_name=copy"])
    assert train(cfg)["status"] == "ok"
    rl = [m for m in map(json.loads, open(tmp_path / "copy" / "metrics.jsonl")) if m["stage"] == "rl"]
    assert [m["sync/version"] for m in rl] == [1.0, 2.0] and all(m["sync/bytes"] > 0 for m in rl)
    assert max(m["rollout/logp_mismatch_max"] for m in rl) < 1e-4
