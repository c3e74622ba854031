"""The native engines' scheduler (rlpost/rollout/scheduler.py) on gpt_mini, HF Llama and Qwen2: continuous
batching under max_num_seqs draws exactly what an uncapped run draws, greedy still equals transformers,
the cross-prompt prefix cache changes no logit, stop strings end a response at the token that completes
them, finish reasons are per sample."""

import pytest
import torch

from rlpost.config import ModelConfig
from rlpost.models import load_model, token_logprobs
from rlpost.rollout import SamplingParams, StopStrings, sample_next
from rlpost.rollout.hf_generate import HFGenerateEngine
from rlpost.rollout.hf_native import HFNativeEngine
from rlpost.rollout.native import NativeEngine
from rlpost.rollout.scheduler import PromptCache, shared_prefix_lengths
from test_engine_hf_native import qwen2  # noqa: F401  (the tiny Qwen2 fixture: GQA and q/k/v biases)

TEXTS = {"gpt": ["1+2=", "47+85=", "9+99=", "5+5="], "hf": ["1+2=", "47+85=", "9+99=", "The answer is"]}


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    return load_model(ModelConfig(name=tiny_llama_dir))


def setup(request, name):
    """(engine, model, tokenizer, vocabulary size, prompts) for 'gpt', 'llama' or 'qwen2'."""
    if name == "gpt":
        model, tok = request.getfixturevalue("tiny_gpt")
        return NativeEngine(model, tok), model, tok, tok.vocab_size, [tok.encode_prompt(t) for t in TEXTS["gpt"]]
    model, tok = request.getfixturevalue(name)
    return HFNativeEngine(model, tok), model, tok, len(tok.tok), [tok.encode_prompt(t) for t in TEXTS["hf"]]


def record_decode(engine):
    """Patch engine.forward to record (rows, ragged) of every decode call (one token per row)."""
    calls, orig = [], engine.forward
    engine.forward = lambda ctx, ids, pos, kv, cols, *a: (
        (ids.shape[1] == 1 and calls.append((ids.shape[0], isinstance(cols, torch.Tensor)))) or
        orig(ctx, ids, pos, kv, cols, *a))
    return calls


@pytest.mark.parametrize("name", ["gpt", "llama", "qwen2"])
@pytest.mark.parametrize("cap", [1, 3, 7])
def test_capped_run_draws_the_same_samples_and_old_logp_as_uncapped(request, name, cap):
    engine, model, tok, V, prompts = setup(request, name)
    stops = [0, 7] if name == "gpt" else list(range(0, V, 8))  # rows end at different steps, some run to the end
    kw = dict(max_new_tokens=10, min_new_tokens=1, stop_token_ids=stops)
    full = engine.generate(prompts, 4, SamplingParams(**kw), seed=7)
    calls = record_decode(engine)
    capped = engine.generate(prompts, 4, SamplingParams(**kw, max_num_seqs=cap), seed=7)

    assert torch.equal(full.input_ids, capped.input_ids) and torch.equal(full.response_mask, capped.response_mask)
    assert full.meta["finish_reason"] == capped.meta["finish_reason"]
    assert {"stop", "length"} <= set(capped.meta["finish_reason"])  # finish reasons are per sample
    assert (full.old_logp - capped.old_logp).abs().max() <= 1e-5
    logp = token_logprobs(model, capped) * capped.response_mask  # ragged rows kept every cache row right
    assert (logp - capped.old_logp).abs().max() <= 1e-4

    widths = [w for w, _ in calls]
    lengths = capped.response_mask.sum(1)
    assert max(widths) == cap and sum(widths) == int(lengths.sum()) - len(lengths)  # no finished or empty row
    waiting_steps = widths.index(next(w for w in widths if w < cap)) if min(widths) < cap else len(widths)
    assert widths[waiting_steps:] == sorted(widths[waiting_steps:], reverse=True)   # full until the queue drains
    if cap > 1:
        assert any(ragged for _, ragged in calls)  # sequences joined mid-flight, at their own columns


@pytest.mark.parametrize("name", ["gpt", "llama", "qwen2"])
@pytest.mark.parametrize("cap", [0, 3])
def test_shared_prompt_attention_draws_what_per_row_prompts_draw(request, name, cap):
    """Reading each prompt once from the prompt table (scheduler.attend) is the same attention as reading
    every row's own copy: same samples, finish reasons and old_logp; on left-padded prompts, with GQA
    (qwen2), under a cap (rows join late, at their own columns) and with rows ending early."""
    engine, model, tok, V, prompts = setup(request, name)
    stops = [0, 7] if name == "gpt" else list(range(0, V, 8))
    params = SamplingParams(max_new_tokens=10, min_new_tokens=1, stop_token_ids=stops, max_num_seqs=cap)
    engine.shared_attention_min = 10 ** 9                     # every row holds its prompt
    per_row = engine.generate(prompts, 3, params, seed=5)
    engine.shared_attention_min = 0                           # the prompts stay in one table
    decodes, forward = [], engine.forward
    engine.forward = lambda ctx, ids, pos, kv, cols, end, mask, shared=None: (
        (ids.shape[1] == 1 and decodes.append((shared is not None, isinstance(cols, torch.Tensor)))) or
        forward(ctx, ids, pos, kv, cols, end, mask, shared))
    batch = engine.generate(prompts, 3, params, seed=5)

    assert decodes and all(used for used, _ in decodes)
    assert any(ragged for _, ragged in decodes) == (cap > 0)
    assert torch.equal(batch.input_ids, per_row.input_ids) and torch.equal(batch.response_mask, per_row.response_mask)
    assert batch.meta["finish_reason"] == per_row.meta["finish_reason"]
    assert len(set(batch.response_mask.sum(1).tolist())) > 1  # rows of different lengths
    assert (batch.old_logp - per_row.old_logp).abs().max() <= 1e-5
    logp = token_logprobs(model, batch) * batch.response_mask
    assert (logp - batch.old_logp).abs().max() <= 1e-4


@pytest.mark.parametrize("name", ["llama", "qwen2"])
@pytest.mark.parametrize("shared_attention_min", [64, 0])
def test_greedy_under_a_cap_equals_transformers_generate(request, name, shared_attention_min):
    engine, model, tok, V, prompts = setup(request, name)
    engine.shared_attention_min = shared_attention_min  # 0: decode reads the prompts from the shared table
    P = max(map(len, prompts))
    ids = torch.full((len(prompts), P), tok.pad_token_id)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):], mask[i, P - len(p):] = torch.tensor(p), 1
    hf_greedy = lambda stops: model.hf.generate(  # noqa: E731
        input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12, min_new_tokens=2,
        eos_token_id=[tok.eos_token_id, *stops], pad_token_id=tok.pad_token_id)[:, P:]
    free = hf_greedy([])
    stops = sorted({int(free[i, 2 + 3 * i]) for i in range(3)})  # prompt i ends by token 3 + 3i: ragged rows
    want = hf_greedy(stops)
    params = SamplingParams(max_new_tokens=12, min_new_tokens=2, temperature=0.0, stop_token_ids=stops, max_num_seqs=3)
    calls = record_decode(engine)
    batch = engine.generate(prompts, 2, params)
    lengths = batch.response_mask.sum(1)
    if name == "llama":  # the tiny Qwen2 repeats one token greedily: its rows all end together (in lockstep)
        assert lengths.min() < lengths.max() and any(ragged for _, ragged in calls)
    for i in range(len(batch)):
        n = int(lengths[i])
        assert batch.input_ids[i, P:P + n].tolist() == want[i // 2, :n].tolist()
        assert n == want.shape[1] or (want[i // 2, n:] == tok.pad_token_id).all()  # transformers ended there too


def test_bad_max_new_tokens_or_max_num_seqs_is_a_clear_error(tiny_gpt):
    model, tok = tiny_gpt
    for bad in (dict(max_new_tokens=0), dict(max_num_seqs=-1)):
        with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
            NativeEngine(model, tok).generate([tok.encode_prompt("1+2=")], 2, SamplingParams(**bad))


def test_shared_prefix_lengths_are_block_aligned_and_leave_a_token():
    sys_ = [1, 5, 5, 5, 5, 5, 5, 5]
    prompts = [sys_ + [7, 8], sys_ + [9], sys_[:6], [3, 3]]
    assert shared_prefix_lengths(prompts, 4) == [8, 8, 4, 0]
    assert shared_prefix_lengths(prompts, 0) == [0, 0, 0, 0]
    assert shared_prefix_lengths([sys_, sys_], 4) == [4, 4]  # the last token is always computed: its logits


@pytest.mark.parametrize("name", ["gpt", "llama", "qwen2"])
def test_prefix_cache_gives_the_logits_of_no_cache_and_skips_the_prefix(request, name):
    engine, model, tok, V, _ = setup(request, name)
    system, questions = ("1+1=2+2=", ["3+4=", "15+27=", "8+80="]) if name == "gpt" else \
        ("The answer is 42. ", ["1+2=", "47+85=", "9+99="])
    texts = [system + q for q in questions] + (["9+9="] if name == "gpt" else ["The answer"])  # one without it
    prompts = [tok.encode_prompt(t) for t in texts]
    P = max(map(len, prompts))
    shared = shared_prefix_lengths(prompts, 2)
    assert shared[:3] == [shared[0]] * 3 and shared[0] >= 6 and shared[3] < shared[0]
    ctx = engine.prepare(P + 4)
    cols = []
    with torch.no_grad():
        kv0, logits0 = PromptCache(engine, ctx, prompts, 1, 0).take([0, 1, 2, 3])
        orig = engine.forward
        engine.forward = lambda c, ids, *a: cols.append(ids.numel()) or orig(c, ids, *a)
        kv1, logits1 = PromptCache(engine, ctx, prompts, 1, 2).take([0, 1, 2, 3])
        engine.forward = orig
    assert (logits0 - logits1).abs().max() <= 1e-5
    for i, p in enumerate(prompts):  # the cache of every real column too
        assert (kv0[:, :, i, :, P - len(p):] - kv1[:, :, i, :, P - len(p):]).abs().max() <= 1e-5
    assert sum(cols) < len(prompts) * P  # the shared prefix was computed once, not once per prompt

    params = SamplingParams(max_new_tokens=4, temperature=1.0)
    engine.prefix_block = 0
    a = engine.generate(prompts, 3, params, seed=2)
    engine.prefix_block = 2
    b = engine.generate(prompts, 3, params, seed=2)
    assert torch.equal(a.input_ids, b.input_ids) and (a.old_logp - b.old_logp).abs().max() <= 1e-5
    logp = token_logprobs(model, b) * b.response_mask
    assert (logp - b.old_logp).abs().max() <= 1e-4


@pytest.mark.parametrize("case", ["gpt-native", "llama-native", "llama-hf"])
@pytest.mark.parametrize("min_new", [0, 3])
def test_stop_strings_end_a_response_at_the_token_that_completes_one(request, case, min_new):
    name, kind = case.split("-")
    engine, model, tok, V, prompts = setup(request, name)
    if kind == "hf":
        engine = HFGenerateEngine(model, tok)
    stop = ["1", "+"]
    params = SamplingParams(max_new_tokens=10, stop=stop, min_new_tokens=min_new, max_num_seqs=5)
    batch = engine.generate(prompts, 4, params, seed=3)
    lengths = batch.response_mask.sum(1)
    P = max(map(len, prompts))
    by_string, rule = 0, StopStrings(stop, tok.decode)
    for i, reason in enumerate(batch.meta["finish_reason"]):
        resp = batch.input_ids[i, P:P + int(lengths[i])].tolist()
        end = rule.end(resp, min_len=min_new + 1)  # where the first stop string (after min_new tokens) completes
        if reason == "length":
            assert len(resp) == 10 and end is None
        elif resp[-1] == tok.eos_token_id:
            assert end is None
        else:
            assert end == len(resp) > min_new and any(s in tok.decode(resp) for s in stop)
            by_string += 1
    assert by_string >= 3


def test_stop_strings_truncate_alike_in_the_native_and_the_generate_engine(llama):
    model, tok = llama
    prompts = [tok.encode_prompt(t) for t in TEXTS["hf"]]
    params = SamplingParams(max_new_tokens=10, temperature=0.0, stop=["1", "5"])
    a = HFNativeEngine(model, tok).generate(prompts, 1, params)
    b = HFGenerateEngine(model, tok).generate(prompts, 1, params)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.response_mask, b.response_mask)
    assert a.meta["finish_reason"] == b.meta["finish_reason"] and "stop" in a.meta["finish_reason"]


def test_stop_string_window_sees_an_occurrence_split_across_tokens():
    chars = "abc"
    decode = lambda ids: "".join(chars[i] for i in ids)  # noqa: E731
    s = StopStrings(["cab"], decode)
    assert s.end([0, 1, 2, 2, 0, 1, 1]) == 6 and s.end([0, 1, 2, 2, 0]) is None
    assert s.end([2, 0, 1], min_len=4) is None


def test_a_stop_string_completed_within_min_new_tokens_never_ends_the_response():
    """min_new_tokens=3: "ab" completed at token 2 is ignored, wherever the check window ends; only an occurrence
    completed after the first 3 tokens counts (both engines take this rule)."""
    chars = "abc"
    decode = lambda ids: "".join(chars[i] for i in ids)  # noqa: E731
    s = StopStrings(["ab"], decode)
    assert s.end([0, 1, 2, 2, 2, 2], min_len=4) is None  # the early "ab" sat in the window at token 4 too
    assert s.end([0, 1, 2, 2, 2, 2, 2, 2, 2, 2], min_len=4) is None
    assert s.end([0, 1, 2, 2, 0, 1, 2], min_len=4) == 6
    assert not s.hit([0, 1, 2]) and s.hit([0, 1]) and s.hit([2, 2, 0, 1])
    multi = StopStrings(["é"], lambda ids: bytes(ids).decode("utf-8", errors="replace"))  # é split across 2 tokens
    assert multi.end(list("xé".encode())) == 3 and multi.end(list("éx".encode()), min_len=3) is None


def test_inverse_cdf_sampling_never_draws_a_zero_probability_token():
    logits = torch.tensor([[float("-inf"), 0.0, float("-inf"), 1.0, float("-inf")]]).repeat(5, 1)
    u = torch.tensor([1e-12, 0.2, 0.5, 0.999999, 1.0], dtype=torch.float64)
    assert set(sample_next(logits, SamplingParams(), uniform=u).tolist()) == {1, 3}
    assert sample_next(logits, SamplingParams(), uniform=u).tolist() == [1, 1, 3, 3, 3]
    logits = torch.randn(5, 11)
    out = sample_next(logits, SamplingParams(top_k=2), uniform=u)  # the top-2 only, even at u = 1
    assert all(t in row for t, row in zip(out.tolist(), logits.topk(2).indices.tolist()))


def test_inverse_cdf_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2])
    u = (torch.arange(1000, dtype=torch.float64) + 0.5) / 1000  # evenly spread uniforms
    draws = sample_next(probs.log().expand(1000, 3), SamplingParams(), uniform=u)
    assert torch.bincount(draws, minlength=3).tolist() == [500, 300, 200]
