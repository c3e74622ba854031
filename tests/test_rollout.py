"""The rollout role: sampling, old_logp captured at sample time, finish reasons, reproducibility."""

import pytest
import torch

from rlpost.models import load_model, token_logprobs
from rlpost.config import ModelConfig
from rlpost.rollout import SamplingParams, build_engine, sample_next
from rlpost.rollout.hf_generate import HFGenerateEngine
from rlpost.rollout.native import NativeEngine

PROMPTS = ["1+2=", "47+85=", "9+99="]


def generate(engine, tok, k=4, seed=0, **kw):
    params = SamplingParams(**{"max_new_tokens": 6, **kw})
    return engine.generate([tok.encode_prompt(p) for p in PROMPTS], k, params, seed=seed)


def test_batch_layout_groups_and_masks(tiny_gpt):
    model, tok = tiny_gpt
    batch = generate(NativeEngine(model, tok), tok)
    assert len(batch) == 12 and batch.group_ids.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    P = max(len(tok.encode_prompt(p)) for p in PROMPTS)
    assert batch.response_mask[:, :P].sum() == 0                      # never on the prompt
    assert (batch.response_mask <= batch.attention_mask).all()       # never on padding
    assert (batch.old_logp[batch.response_mask == 0] == 0).all()
    for i in range(len(batch)):  # responses are contiguous from column P and end at eos or max_new_tokens
        resp = batch.input_ids[i][batch.response_mask[i].bool()].tolist()
        assert 1 <= len(resp) <= 6 and batch.response_mask[i, P:P + len(resp)].all()
        ended = resp[-1] == tok.eos_token_id
        assert batch.meta["finish_reason"][i] == ("stop" if ended else "length")
        assert tok.eos_token_id not in resp[:-1]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_native_old_logp_equals_trainer_logprobs(tiny_gpt, temperature):
    model, tok = tiny_gpt
    batch = generate(NativeEngine(model, tok), tok, temperature=temperature)
    logp = token_logprobs(model, batch, temperature) * batch.response_mask
    assert (logp - batch.old_logp).abs().max() <= 1e-5


def test_same_seed_same_samples_other_seed_other_samples(tiny_gpt):
    model, tok = tiny_gpt
    engine = NativeEngine(model, tok)
    a, b, c = generate(engine, tok, seed=3), generate(engine, tok, seed=3), generate(engine, tok, seed=4)
    assert torch.equal(a.input_ids, b.input_ids) and not torch.equal(a.input_ids, c.input_ids)


def test_greedy_is_deterministic_and_equals_argmax_of_full_forward(tiny_gpt):
    model, tok = tiny_gpt
    batch = generate(NativeEngine(model, tok), tok, k=2, temperature=0.0)
    assert torch.equal(batch.input_ids[0::2], batch.input_ids[1::2])  # both samples of a prompt agree
    with torch.no_grad():  # every generated token is the argmax of a full (uncached) forward
        logits = model(batch.input_ids, batch.attention_mask,
                       (batch.attention_mask.cumsum(1) - 1).clamp(min=0))
    pred = logits[:, :-1].argmax(-1)
    resp = batch.response_mask[:, 1:].bool()
    assert torch.equal(pred[resp], batch.input_ids[:, 1:][resp])


def test_top_k_one_is_greedy():
    logits = torch.randn(5, 11)
    out = sample_next(logits, SamplingParams(top_k=1), torch.Generator().manual_seed(0))
    assert torch.equal(out, logits.argmax(-1))


def test_top_p_keeps_the_smallest_sufficient_prefix():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(probs.log(), SamplingParams(top_p=0.7), g)) for _ in range(200)}
    assert draws == {0, 1}


def test_stop_token_ids_end_a_response(tiny_gpt):
    model, tok = tiny_gpt
    stops = list(range(tok.vocab_size))  # every token stops
    batch = generate(NativeEngine(model, tok), tok, stop_token_ids=stops)
    assert (batch.response_mask.sum(1) == 1).all() and set(batch.meta["finish_reason"]) == {"stop"}


def test_prompt_too_long_for_the_model_is_a_clear_error(tiny_gpt):
    model, tok = tiny_gpt
    with pytest.raises(ValueError, match="block_size"):
        generate(NativeEngine(model, tok), tok, max_new_tokens=40)


def test_engine_auto_picks_native_for_gpt_mini(tiny_gpt):
    model, tok = tiny_gpt
    assert isinstance(build_engine("auto", model, tok), NativeEngine)
    with pytest.raises(ValueError, match="rollout.engine=hf"):
        build_engine("native", torch.nn.Linear(2, 2), tok)


def test_hf_engine_old_logp_equals_trainer_logprobs(tiny_llama_dir):
    model, tok = load_model(ModelConfig(name=tiny_llama_dir))
    engine = build_engine("hf", model, tok)  # "auto" picks the native engine for Llama (test_engine_hf_native.py)
    assert isinstance(engine, HFGenerateEngine)
    batch = generate(engine, tok, k=3, temperature=0.9)
    assert len(batch) == 9
    logp = token_logprobs(model, batch, 0.9) * batch.response_mask
    assert (logp - batch.old_logp).abs().max() <= 1e-4
    again = generate(engine, tok, k=3, temperature=0.9)
    assert torch.equal(batch.input_ids, again.input_ids)  # seeded
