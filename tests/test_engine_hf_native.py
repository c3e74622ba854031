"""The native engine for Hugging Face Llama / Qwen2 (rlpost/rollout/hf_native.py) against transformers itself:
greedy output equals `generate`, cached decode logits equal a full forward, old_logp equals the trainer's
log-probs, seeds reproduce, finish reasons, finished rows leave the batch, fresh weights are seen."""

import pytest
import torch

from conftest import encode, hf_greedy, train_tiny_tokenizer
from rlpost.config import ModelConfig
from rlpost.models import HFCausalLM, HFTokenizer, load_model, position_ids_for, token_logprobs
from rlpost.rollout import SamplingParams, build_engine
from rlpost.rollout.hf_generate import HFGenerateEngine
from rlpost.rollout.hf_native import HFNativeEngine

PROMPTS = ["1+2=", "47+85=", "9+99=", "The answer is"]
SAME_LENGTH = ["12+34=", "56+78="]  # no left padding at all: the prefill must still be causal


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    return load_model(ModelConfig(name=tiny_llama_dir))


@pytest.fixture(scope="module")
def qwen2():
    """A tiny Qwen2 with grouped-query attention (4 query heads, 2 KV heads) and q/k/v biases.

    The tokenizer is used directly, never reloaded through AutoTokenizer: with model_type qwen2 that would
    build a Qwen2Tokenizer with its own normaliser (NFC) and pre-tokeniser (a Split regex, then ByteLevel
    without its own regex), which encodes text differently from this tokenizer's plain ByteLevel BPE."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = train_tiny_tokenizer([f"{a}+{b}={a + b}" for a in range(60) for b in range(60)] + ["The answer is 42."])
    torch.manual_seed(1)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True)
    hf = Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # random init leaves the biases at 0; make them count
        for layer in hf.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return HFCausalLM(hf).eval(), HFTokenizer(tok)


MODELS = ["llama", "qwen2"]


def get(request, name):
    return request.getfixturevalue(name)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("texts", [PROMPTS, SAME_LENGTH], ids=["left-padded", "no-padding"])
def test_greedy_equals_transformers_generate(request, name, texts):
    model, tok = get(request, name)
    prompts = encode(tok, texts)
    params = SamplingParams(max_new_tokens=12, min_new_tokens=12, temperature=0.0)
    batch = HFNativeEngine(model, tok).generate(prompts, 2, params)
    P = max(map(len, prompts))
    want = hf_greedy(model, tok, prompts, 12, min_new_tokens=12)
    assert torch.equal(batch.input_ids[0::2, P:], want) and torch.equal(batch.input_ids[1::2, P:], want)


@pytest.mark.parametrize("name", MODELS)
def test_cached_decode_logits_equal_a_full_forward(request, name):
    model, tok = get(request, name)
    engine = HFNativeEngine(model, tok)
    seen = []  # (batch rows live at this step, logits the cache produced)
    orig = engine.logits
    engine.logits = lambda w, x: seen.append(orig(w, x)) or seen[-1]
    prompts = encode(tok, PROMPTS)
    batch = engine.generate(prompts, 1, SamplingParams(max_new_tokens=8, min_new_tokens=8), seed=5)
    with torch.no_grad():
        full = model(batch.input_ids, batch.attention_mask, position_ids_for(batch.attention_mask))
    P = max(map(len, prompts))
    assert len(seen) == 8
    for step, logits in enumerate(seen):  # the logits that drew response token `step` sit at column P - 1 + step
        assert (logits - full[:, P - 1 + step]).abs().max() <= 1e-4


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.7),
                                dict(temperature=1.0, top_k=20, top_p=0.9)])
def test_old_logp_equals_trainer_logprobs(request, name, kw):
    model, tok = get(request, name)
    batch = HFNativeEngine(model, tok).generate(encode(tok, PROMPTS), 4, SamplingParams(max_new_tokens=10, **kw), 0)
    logp = token_logprobs(model, batch, kw["temperature"]) * batch.response_mask
    assert batch.response_mask.sum() > 0
    assert (logp - batch.old_logp).abs().max() <= 1e-4


def test_seeded_and_reproducible(llama):
    model, tok = llama
    engine, prompts, params = HFNativeEngine(model, tok), encode(tok, PROMPTS), SamplingParams(max_new_tokens=8)
    a, b, c = (engine.generate(prompts, 4, params, seed=s) for s in (3, 3, 4))
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.old_logp, b.old_logp)
    assert not torch.equal(a.input_ids, c.input_ids)
    assert a.group_ids.tolist() == [g for g in range(4) for _ in range(4)]


@pytest.mark.parametrize("name", MODELS)
def test_finish_reasons_and_finished_rows_leave_the_batch(request, name):
    model, tok = get(request, name)
    engine = HFNativeEngine(model, tok)
    widths = []
    orig = engine.forward
    engine.forward = lambda w, ids, *a: widths.append(ids.shape[0]) or orig(w, ids, *a)
    stops = list(range(0, len(tok.tok), 3))  # a third of the vocabulary stops a response
    params = SamplingParams(max_new_tokens=12, stop_token_ids=stops, min_new_tokens=2)
    prompts = encode(tok, PROMPTS)
    batch = engine.generate(prompts, 4, params, seed=1)
    lengths = batch.response_mask.sum(1)
    P = max(map(len, prompts))
    for i, reason in enumerate(batch.meta["finish_reason"]):
        resp = batch.input_ids[i, P:P + int(lengths[i])].tolist()
        assert len(resp) >= 2 and all(t not in stops + [tok.eos_token_id] for t in resp[:-1])
        assert reason == ("stop" if resp[-1] in stops + [tok.eos_token_id] else "length")
        assert reason == "stop" or len(resp) == 12
    assert "stop" in batch.meta["finish_reason"] and lengths.min() < lengths.max()
    decode_widths = widths[1:]  # widths[0] is the prefill (one row per prompt)
    assert widths[0] == len(prompts) and decode_widths[0] == 16
    assert decode_widths == sorted(decode_widths, reverse=True) and decode_widths[-1] < 16
    logp = token_logprobs(model, batch) * batch.response_mask  # compaction kept every row's cache right
    assert (logp - batch.old_logp).abs().max() <= 1e-4


def test_fresh_weights_are_used_after_an_in_place_update(llama):
    model, tok = llama
    engine, prompts = HFNativeEngine(model, tok), encode(tok, PROMPTS[:2])
    params = SamplingParams(max_new_tokens=6, min_new_tokens=6, temperature=0.0)
    engine.generate(prompts, 1, params)
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    try:
        with torch.no_grad():  # as an optimizer step would: in place
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.5)
        P = max(map(len, prompts))
        want = hf_greedy(model, tok, prompts, 6, min_new_tokens=6)
        assert torch.equal(engine.generate(prompts, 1, params).input_ids[:, P:], want)
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(saved[n])


def test_auto_picks_native_for_llama_and_qwen2_and_hf_for_others(llama, qwen2):
    from transformers import GPT2Config, GPT2LMHeadModel

    for model, tok in (llama, qwen2):
        assert isinstance(build_engine("auto", model, tok), HFNativeEngine)
        assert isinstance(build_engine("hf", model, tok), HFGenerateEngine)
    gpt2 = HFCausalLM(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)))
    assert isinstance(build_engine("auto", gpt2, llama[1]), HFGenerateEngine)
    with pytest.raises(ValueError, match="model_type 'gpt2'.*rollout.engine=hf"):
        build_engine("native", gpt2, llama[1])


def test_min_new_tokens_in_the_hf_engine_too(llama):
    model, tok = llama
    params = SamplingParams(max_new_tokens=5, min_new_tokens=5, stop_token_ids=list(range(0, len(tok.tok), 2)))
    batch = HFGenerateEngine(model, tok).generate(encode(tok, PROMPTS), 2, params)
    assert (batch.response_mask.sum(1) == 5).all()


def test_greedy_k_samples_in_the_hf_engine_too(llama):
    """temperature 0 with k > 1 (an eval or a GRPO config with greedy sampling): transformers.generate refuses
    num_return_sequences > 1 without sampling, so the hf engine draws each prompt's answer once and repeats it,
    as the native engine's k greedy rows are k copies."""
    model, tok = llama
    prompts, params = encode(tok, PROMPTS), SamplingParams(max_new_tokens=6, temperature=0.0)
    hf = HFGenerateEngine(model, tok).generate(prompts, 3, params)
    native = HFNativeEngine(model, tok).generate(prompts, 3, params)
    assert torch.equal(hf.input_ids, native.input_ids) and hf.group_ids.tolist() == native.group_ids.tolist()
    assert (hf.old_logp - native.old_logp).abs().max() <= 1e-4


def test_the_hf_engine_ignores_the_checkpoints_generation_config(llama):
    """A checkpoint's generation_config may set a repetition penalty, an n-gram ban or beams; transformers.generate
    would apply them to every setting the engine leaves unset, sampling another distribution than old_logp (raw
    logits) records and the native engine draws from. The hf engine samples by SamplingParams alone."""
    model, tok = llama
    prompts, params = encode(tok, PROMPTS), SamplingParams(max_new_tokens=8, temperature=0.0)
    native = HFNativeEngine(model, tok).generate(prompts, 1, params)
    own = model.hf.generation_config
    before = own.repetition_penalty, own.no_repeat_ngram_size
    own.repetition_penalty, own.no_repeat_ngram_size = 5.0, 1
    try:
        hf = HFGenerateEngine(model, tok).generate(prompts, 1, params)
        assert model.hf.generation_config is own  # left as it was
    finally:
        own.repetition_penalty, own.no_repeat_ngram_size = before
    assert torch.equal(hf.input_ids, native.input_ids)
