"""The chunked log-prob head (rlpost/models/logprobs.py): the reference formula, its gradients, every loss's
gradients equal to the full-logits path, and training paths that never build the [tokens, V] logits."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from rlpost import Batch, get_algorithm
from rlpost.algorithms import available
from rlpost.models import position_ids_for, token_logprobs
from rlpost.models.gpt_mini import GPT, GPTConfig
from rlpost.models.logprobs import chunked_logprobs, default_chunk
from rlpost.preference import available as preference_losses
from rlpost.preference import get_preference_loss
from rlpost.preference.fit import make_loss_fn


def formula(h, W, t, T, b=None, softcap=None):
    """The textbook path: whole logits, log-softmax, gather; entropy = -sum p log p."""
    logits = h @ W.t() + (b if b is not None else 0)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logp_all = F.log_softmax(logits / T, -1)
    return logp_all.gather(-1, t[..., None]).squeeze(-1), -(logp_all.exp() * logp_all).sum(-1)


@pytest.mark.parametrize("chunk", [1, 5, 37, 1000])
@pytest.mark.parametrize("softcap,bias", [(None, False), (None, True), (4.0, False), (4.0, True)])
def test_values_and_gradients_equal_the_formula(chunk, softcap, bias):
    g = torch.Generator().manual_seed(chunk)
    N, H, V, T = 37, 8, 50, 0.7
    h = torch.randn(N, H, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    t = torch.randint(0, V, (N,), generator=g)
    w_logp, w_ent = torch.randn(N, generator=g, dtype=torch.float64), torch.randn(N, generator=g, dtype=torch.float64)
    leaves = [x for x in (h, W, b) if x is not None]

    lp, ent = formula(h, W, t, T, b, softcap)
    expected = torch.autograd.grad((lp * w_logp + ent * w_ent).sum(), leaves)
    lp2, ent2 = chunked_logprobs(h, W, t, temperature=T, with_entropy=True, bias=b, softcap=softcap, chunk=chunk)
    got = torch.autograd.grad((lp2 * w_logp + ent2 * w_ent).sum(), leaves)
    torch.testing.assert_close(lp2, lp, rtol=0, atol=1e-12)
    torch.testing.assert_close(ent2, ent, rtol=0, atol=1e-12)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-12)


def test_gradcheck_and_a_loss_that_reads_only_logp():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 9, (2, 3), generator=g)
    assert torch.autograd.gradcheck(
        lambda h, W: chunked_logprobs(h, W, t, temperature=1.3, with_entropy=True, chunk=4, softcap=3.0), (h, W))
    assert torch.autograd.gradcheck(lambda h, W: chunked_logprobs(h, W, t, chunk=2)[0], (h, W))


def test_bf16_autocast_computes_the_matmul_in_bf16_and_returns_fp32():
    g = torch.Generator().manual_seed(0)
    h, W = torch.randn(16, 32, generator=g), torch.randn(100, 32, generator=g) * 0.1
    t = torch.randint(0, 100, (16,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp, ent = chunked_logprobs(h, W, t, with_entropy=True, chunk=5)
    assert lp.dtype == ent.dtype == torch.float32
    ref_lp, ref_ent = formula(h.bfloat16().float(), W.bfloat16().float(), t, 1.0)
    torch.testing.assert_close(lp, ref_lp, rtol=0, atol=2e-2)  # bf16 products, fp32 softmax
    torch.testing.assert_close(ent, ref_ent, rtol=0, atol=2e-2)


def test_bad_chunk_and_temperature_are_refused_and_the_default_is_sized_from_v():
    h, W, t = torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        chunked_logprobs(h, W, t, chunk=0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        chunked_logprobs(h, W, t, temperature=0.0)
    assert default_chunk(151_936) == 220 and default_chunk(32_768) == 1024
    assert default_chunk(151_936) * 151_936 <= 1 << 25


# ---------------------------------------------------------------------------- through a model


def _gpt(vocab=23, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.0))


def _batch(B=6, T=10, prompt=3, vocab=23, seed=0):
    """Rows of random tokens, a shared prompt per pair of rows, random-length responses."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    ids[1::2, :prompt] = ids[0::2, :prompt]
    lengths = torch.randint(1, T - prompt + 1, (B,), generator=g)
    cols = torch.arange(T)[None]
    mask = ((cols >= prompt) & (cols < prompt + lengths[:, None])).long()
    attn = (cols < prompt + lengths[:, None]).long()
    logp = -torch.rand(B, T, generator=g) * 2 * mask
    return Batch(input_ids=ids, attention_mask=attn, response_mask=mask, old_logp=logp,
                 ref_logp=(logp + 0.1 * torch.randn(B, T, generator=g)) * mask,
                 values=torch.randn(B, T, generator=g) * mask, rewards=torch.tensor([1.0, 0.0] * (B // 2)),
                 group_ids=torch.arange(B) // 2)


def full_logprobs(model, batch, T, with_entropy):
    """The full-logits path, written out: model(...) logits, log-softmax over the vocabulary."""
    ids = batch.input_ids
    logits = model(ids, batch.attention_mask, position_ids_for(batch.attention_mask))[:, :-1]
    logp, ent = formula_logits(logits, ids[:, 1:], T)
    return F.pad(logp, (1, 0)), F.pad(ent, (1, 0))


def formula_logits(logits, t, T):
    logp_all = F.log_softmax(logits.float() / T, -1)
    return logp_all.gather(-1, t[..., None]).squeeze(-1), -(logp_all.exp() * logp_all).sum(-1)


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(a, b):
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-5 * max(1.0, float(b[n].abs().max())), msg=n)


@pytest.mark.parametrize("name", sorted(available()))
@pytest.mark.parametrize("share_prompt", [False, True])
def test_every_algorithm_gradient_equals_the_full_logits_path(name, share_prompt):
    model, T = _gpt(), 0.8
    batch = get_algorithm(name).compute_advantages(_batch())

    def loss_with(logp, ent):
        mb = batch.replace(entropy=ent, new_values=batch.values)
        return get_algorithm(name).compute_loss(logp, mb)[0]

    logp, ent = token_logprobs(model, batch, T, with_entropy=True, share_prompt=share_prompt, chunk=4)
    chunked = _grads(model, loss_with(logp, ent))
    full = _grads(model, loss_with(*full_logprobs(model, batch, T, True)))
    _assert_same_grads(chunked, full)


@pytest.mark.parametrize("name", sorted(preference_losses()))
def test_every_preference_loss_gradient_equals_the_full_logits_path(name):
    model = _gpt()
    batch = _batch()
    loss = get_preference_loss(name)
    # KTO's reference point reads (policy, reference) log-probs of mismatched pairs, computed without grad
    loss_fn = make_loss_fn(loss, kl=(torch.tensor([-5.0, -6.0, -7.0]), torch.tensor([-5.5, -6.2, -6.9])))
    chunked = _grads(model, loss_fn(token_logprobs(model, batch, chunk=3), batch)[0])
    full = _grads(model, loss_fn(full_logprobs(model, batch, 1.0, False)[0], batch)[0])
    _assert_same_grads(chunked, full)


def _forbid_full_logits(monkeypatch, model):
    """Fail the test on any pass that builds whole logits: the LM head run as a module, or the full-logits
    scorer."""
    import rlpost.models.logprobs as logprobs

    monkeypatch.setattr(logprobs, "_score", lambda *a, **k: pytest.fail("scored from full logits"))
    head = model.output_head()[0]
    return head.register_forward_hook(lambda *a: pytest.fail("the LM head built whole logits"))


def test_trainer_reference_and_sft_never_build_whole_logits(monkeypatch):
    from rlpost.config import TrainerConfig
    from rlpost.reference import Reference
    from rlpost.rollout import SamplingParams
    from rlpost.stages.sft import nll_loss
    from rlpost.trainer import Trainer

    model = _gpt()
    reference = Reference(model, None, SamplingParams(temperature=0.9))
    hook = _forbid_full_logits(monkeypatch, model)
    hook_ref = reference.model.output_head()[0].register_forward_hook(lambda *a: pytest.fail("reference logits"))
    batch = reference(_batch())
    algo = get_algorithm("grpo")
    trainer = Trainer(model, TrainerConfig(lr=1e-3, micro_batch_size=2, logprob_chunk=5),
                      SamplingParams(temperature=0.9))
    m = trainer.step(algo.compute_advantages(batch), algo.compute_loss)
    assert m["train/skipped_nonfinite"] == 0.0
    m = Trainer(model, TrainerConfig(lr=1e-3)).step(_batch(), nll_loss)
    assert m["train/skipped_nonfinite"] == 0.0
    hook.remove()
    hook_ref.remove()


def _tiny_hf(kind: str):
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  intermediate_size=64, max_position_embeddings=64, head_dim=16, tie_word_embeddings=False)
    if kind == "qwen2":
        cfg = transformers.Qwen2Config(**common)
        hf = transformers.Qwen2ForCausalLM(cfg)
    elif kind == "llama":
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:  # soft-capped logits
        cfg = transformers.Gemma2Config(**common, final_logit_softcapping=2.0, query_pre_attn_scalar=16)
        hf = transformers.Gemma2ForCausalLM(cfg)
    from rlpost.models import HFCausalLM

    return HFCausalLM(hf.float().eval())


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma2"])
def test_hf_models_score_chunked_equal_to_their_own_logits(kind, monkeypatch):
    model = _tiny_hf(kind)
    batch = _batch(vocab=61)
    w = torch.randn(batch.input_ids.shape, generator=torch.Generator().manual_seed(1))
    full_lp, full_ent = full_logprobs(model, batch, 0.7, True)   # model(...) is the HF model's own logits
    full = _grads(model, (full_lp * w).sum() + full_ent.sum())
    hook = _forbid_full_logits(monkeypatch, model)
    lp, ent = token_logprobs(model, batch, 0.7, with_entropy=True, chunk=7)
    chunked = _grads(model, (lp * w).sum() + ent.sum())
    hook.remove()
    torch.testing.assert_close(lp, full_lp, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent, full_ent, rtol=0, atol=1e-5)
    _assert_same_grads(chunked, full)


def test_a_head_that_is_not_plain_falls_back_to_the_full_logits():
    model = _tiny_hf("llama")
    model.hf.config.model_type = "some_family_with_scaled_logits"
    assert model.output_head() is None
    batch = _batch(vocab=61)
    torch.testing.assert_close(token_logprobs(model, batch, share_prompt=False),
                               full_logprobs(model, batch, 1.0, False)[0], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------- memory, in a subprocess

PEAK_SCRIPT = textwrap.dedent("""
    import json, resource, sys, torch, torch.nn.functional as F
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from rlpost.batch import Batch
    from rlpost.models import HFCausalLM, position_ids_for, token_logprobs
    torch.set_num_threads(1)
    mode, rows, T = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(Qwen2Config(vocab_size=151936, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, intermediate_size=128, max_position_embeddings=T + 1,
                                      tie_word_embeddings=False))
    model = HFCausalLM(hf)
    ids = torch.randint(0, 151936, (rows, T))
    ones = torch.ones(rows, T, dtype=torch.long)
    batch = Batch(input_ids=ids, attention_mask=ones, response_mask=ones)
    def run():
        if mode == "chunked":
            logp, ent = token_logprobs(model, batch, with_entropy=True, share_prompt=False)
        else:
            logits = model(ids, ones, position_ids_for(ones))[:, :-1]
            la = F.log_softmax(logits.float(), -1)
            logp, ent = la.gather(-1, ids[:, 1:, None]).squeeze(-1), -(la.exp() * la).sum(-1)
        (logp.sum() + ent.sum()).backward()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_above_baseline_gb": (peak - base) / 2**20}))
""")


def head_peak_gb(mode: str, rows: int, tokens: int) -> float:
    """Peak RSS above the process's baseline (model built, nothing scored) of one forward + backward of the
    log-prob head with entropy, for a random Qwen2 with V = 151,936 (hidden 64, 2 layers)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, mode, str(rows), str(tokens)], env=env, check=True,
                         capture_output=True, text=True, timeout=600).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_above_baseline_gb"]


@pytest.mark.slow
def test_the_chunked_head_peak_stays_small_and_does_not_grow_with_tokens():
    four = head_peak_gb("chunked", 4, 1024)
    one = head_peak_gb("chunked", 1, 1024)
    assert four <= 1.5, f"{four:.2f} GB above baseline for 4 x 1,024 tokens at V = 151,936"
    # what grows with the tokens is [tokens, hidden]-sized (activations), not [tokens, V]: 4x the tokens adds far
    # less than one more [1,024, V] fp32 tensor (0.58 GB)
    assert four - one < 0.3, f"1 x 1,024: {one:.2f} GB, 4 x 1,024: {four:.2f} GB"


def test_an_entropy_the_loss_does_not_use_changes_no_gradient():
    """The trainer computes entropies for its metrics; a loss without an entropy term must get the log-probs'
    gradient alone (the unused output's gradient is not materialised as zeros, nor mistaken for one)."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(11, 4, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(13, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 13, (11,), generator=g)
    lp, _ = formula(h, W, t, 0.9)
    expected = torch.autograd.grad(lp.sum(), (h, W))
    lp2, ent2 = chunked_logprobs(h, W, t, temperature=0.9, with_entropy=True, chunk=3)
    got = torch.autograd.grad(lp2.sum() + 0 * ent2.detach().sum(), (h, W))
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-12)
