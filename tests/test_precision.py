"""Any precision: trainer.precision=bf16 (autocast, fp32 master weights and loss), the pure-bf16
model.dtype=bfloat16, and gradient checkpointing."""

import copy

import pytest
import torch
from test_devices import scored_batch
from test_shared_prompt import layout_batch

from rlpost import get_algorithm
from rlpost.config import ModelConfig, TrainerConfig
from rlpost.critic import Critic
from rlpost.models import autocast, load_model, set_gradient_checkpointing, token_logprobs
from rlpost.reference import Reference
from rlpost.stages.sft import nll_loss
from rlpost.trainer import Trainer

# Tolerance of bf16 autocast against fp32, absolute, on log-probs. bf16 keeps 8 significant bits: each
# matmul input is rounded by up to 2^-9 (0.2 %). On these random tiny models (logits O(0.1-1), log-probs
# near -log V = -2.7 for gpt_mini, -5.7 for the Llama) that moves a log-prob by 1.1e-3 / 1.3e-3 at most
# and 2e-4 / 5e-4 on average (measured). The bounds leave about 8x / 4x of room for other CPUs' kernels;
# a log-softmax taken in bf16 instead of fp32 alone is off by 1.7e-2 on the same logits, and fails them.
BF16_MAX, BF16_MEAN = 1e-2, 2e-3

# On a CPU without native bf16 matmul every bf16 role warns that it will be slow (tested below, once)
pytestmark = pytest.mark.filterwarnings("ignore:trainer.precision=bf16 on a CPU without native bf16")


def models(tiny_llama_dir):
    from rlpost.models.gpt_mini import GPT, CharTokenizer, GPTConfig

    torch.manual_seed(0)
    tok = CharTokenizer("0123456789+=")
    gpt = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=24, n_layer=2, n_head=2, n_embd=32))
    return {"gpt_mini": (gpt, tok), "hf_llama": load_model(ModelConfig(name=tiny_llama_dir))}


@pytest.mark.parametrize("kind", ["gpt_mini", "hf_llama"])
def test_bf16_logprobs_are_fp32_and_close_to_fp32(tiny_llama_dir, kind):
    model, tok = models(tiny_llama_dir)[kind]
    batch = scored_batch(model, tok)
    mask = batch.response_mask.bool()
    with torch.no_grad():
        fp32 = token_logprobs(model, batch)
        with autocast("cpu", "bf16"):
            bf16 = token_logprobs(model, batch)
            assert model(batch.input_ids).dtype == torch.bfloat16  # autocast is really on for the forward
        ref = Reference(model, TrainerConfig(precision="bf16"))(batch).ref_logp
    assert bf16.dtype == ref.dtype == torch.float32
    diff = (bf16 - fp32)[mask].abs()
    assert 0 < diff.max() < BF16_MAX and diff.mean() < BF16_MEAN, (diff.max(), diff.mean())
    # the bf16 reference's weights are stored in bf16 (not cast per matmul from fp32), which also rounds the
    # embeddings and norms: within the same bounds of fp32
    ref_diff = (ref - fp32 * batch.response_mask)[mask].abs()
    assert 0 < ref_diff.max() < BF16_MAX and ref_diff.mean() < BF16_MEAN, (ref_diff.max(), ref_diff.mean())


def parameter_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("kind", ["gpt_mini", "hf_llama"])
def test_the_bf16_reference_is_stored_in_bf16_and_the_fp32_one_is_unchanged(tiny_llama_dir, kind):
    model, tok = models(tiny_llama_dir)[kind]
    batch = scored_batch(model, tok)
    fp32_ref, bf16_ref = Reference(model, TrainerConfig()), Reference(model, TrainerConfig(precision="bf16"))
    assert parameter_bytes(fp32_ref.model) == parameter_bytes(model)
    assert 2 * parameter_bytes(bf16_ref.model) == parameter_bytes(model)  # half today's fp32 copy
    assert {p.dtype for p in bf16_ref.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the policy keeps its fp32 master weights
    # buffers keep their dtype: a rotary embedding's inverse frequencies in bf16 would shift long positions' angles
    assert [b.dtype for b in bf16_ref.model.buffers()] == [b.dtype for b in model.buffers()]
    with torch.no_grad():
        fp32 = token_logprobs(model, batch) * batch.response_mask
    torch.testing.assert_close(fp32_ref(batch).ref_logp, fp32, rtol=0, atol=0)  # the default: bit for bit


@pytest.mark.parametrize("kind", ["gpt_mini", "hf_llama"])
def test_bf16_trainer_step_keeps_fp32_weights_and_loss(tiny_llama_dir, kind):
    model, tok = models(tiny_llama_dir)[kind]
    algo = get_algorithm("grpo", beta=0.04)
    batch = algo.compute_advantages(Reference(model, TrainerConfig(precision="bf16"))(scored_batch(model, tok)))
    seen = {}

    def loss_fn(logp, mb):
        loss, metrics = algo.compute_loss(logp, mb)
        seen.update(logp=logp.dtype, loss=loss.dtype, entropy=mb.entropy.dtype)
        return loss, metrics

    trainer = Trainer(model, TrainerConfig(lr=1e-3, precision="bf16"))  # (packing=auto checks the model in fp32)
    matmul = {}
    linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    linear.register_forward_hook(lambda m, i, o: matmul.setdefault("dtype", o.dtype) and None)
    before = copy.deepcopy(model.state_dict())
    metrics = trainer.step(batch, loss_fn)
    assert matmul["dtype"] == torch.bfloat16                                  # the forward ran in bf16
    assert seen == {"logp": torch.float32, "loss": torch.float32, "entropy": torch.float32}
    assert metrics["train/skipped_nonfinite"] == 0.0 and type(metrics["train/loss"]) is float
    assert all(p.dtype == torch.float32 for p in model.parameters())          # fp32 master weights
    assert any(not torch.equal(before[n], p) for n, p in model.state_dict().items())
    for state in trainer.optimizer.state.values():                            # fp32 AdamW state
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32


@pytest.mark.parametrize("kind", ["head", "separate"])
def test_bf16_critic_values_are_fp32_and_close(tiny_gpt, kind):
    model, tok = tiny_gpt
    batch = scored_batch(model, tok)
    critic = Critic.build(model, kind)
    torch.nn.init.normal_(critic.head.weight)
    bf16 = Critic(critic._trunk[0] if critic.shared else critic.trunk, model.hidden_size, critic.shared,
                  TrainerConfig(precision="bf16"))
    bf16.head.load_state_dict(critic.head.state_dict())
    with torch.no_grad():
        v32, v16 = critic(batch), bf16(batch)
    assert v16.dtype == torch.float32 and bf16.head.weight.dtype == torch.float32
    assert 0 < (v16 - v32).abs().max() < 0.1


def test_pure_bf16_parameters_still_take_a_trainer_step():
    """model.dtype=bfloat16 casts every parameter (so gradients and AdamW state are bf16 too): different
    from trainer.precision=bf16, and coarse, but it must run."""
    model, tok = load_model(ModelConfig(dtype="bfloat16", n_layer=2, n_head=2, n_embd=32), alphabet="0123456789+=")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    algo = get_algorithm("grpo", beta=0.04)
    batch = algo.compute_advantages(Reference(model)(scored_batch(model, tok)))
    assert batch.ref_logp.dtype == torch.float32
    metrics = Trainer(model, TrainerConfig(lr=1e-2)).step(batch, algo.compute_loss)
    assert metrics["train/skipped_nonfinite"] == 0.0 and metrics["train/grad_norm"] > 0
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_unknown_precision_is_named(tiny_gpt):
    model, _ = tiny_gpt
    for make in (lambda: Trainer(model, TrainerConfig(lr=1e-3, precision="fp16")),
                 lambda: Reference(model, TrainerConfig(precision="fp16")),
                 lambda: Critic.build(model, "head", TrainerConfig(precision="fp16"))):
        with pytest.raises(ValueError, match=r"trainer.precision is 'fp16'; valid values: fp32, bf16"):
            make()


# ---------------------------------------------------------------------------- gradient checkpointing

def block_calls(model) -> list:
    """Counts forwards of the first block's MLP (a recomputed block runs twice per step). Wraps its forward:
    torch.utils.checkpoint runs no forward hooks when it recomputes, and HF checkpoints the block's class
    forward, so the MLP inside it is what shows the recompute."""
    calls = []
    mlp = (model.transformer.h if hasattr(model, "transformer") else model.hf.model.layers)[0].mlp
    forward = mlp.forward
    mlp.forward = lambda *a, **kw: calls.append(1) or forward(*a, **kw)
    return calls


def checkpointed_grads(model, precision: str = "fp32") -> tuple[dict, dict]:
    """({checkpointing off/on: the parameters' gradients}, {off/on: calls of the first block}) of one weighted
    log-prob sum over the same batch, the forward run in `precision`'s autocast context."""
    batch = layout_batch(16)
    w = torch.randn(batch.input_ids.shape, generator=torch.Generator().manual_seed(1))
    grads, calls = {}, {}
    for on in (False, True):
        m = copy.deepcopy(model).train()
        set_gradient_checkpointing(m, on)
        calls[on] = block_calls(m)
        with autocast("cpu", precision):
            logp = token_logprobs(m, batch, share_prompt=False)  # one path for both: the same float rounding
        (logp * w).sum().backward()
        grads[on] = {n: p.grad for n, p in m.named_parameters()}
    return grads, calls


@pytest.mark.parametrize("kind", ["gpt_mini", "hf_llama"])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_llama_dir, kind):
    grads, calls = checkpointed_grads(models(tiny_llama_dir)[kind][0])
    assert (len(calls[False]), len(calls[True])) == (1, 2)  # recomputed in the backward
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, rtol=0, atol=1e-5, msg=name)


def test_trainer_turns_checkpointing_on_for_policy_and_critic_not_reference(tiny_gpt):
    model, tok = tiny_gpt
    critic = Critic.build(model, "separate")
    Trainer(model, TrainerConfig(lr=1e-3, gradient_checkpointing=True), critic=critic)
    assert model.gradient_checkpointing and critic.trunk.gradient_checkpointing
    model.train()
    assert not model.can_share_prompt                                  # it would append to its cache twice
    with torch.no_grad():
        assert model.can_share_prompt                                  # no grad, nothing recomputed
    ref = Reference(model)
    assert not ref.model.gradient_checkpointing and ref.model.can_share_prompt
    batch = scored_batch(model, tok)
    metrics = Trainer(model, TrainerConfig(lr=1e-3, gradient_checkpointing=True)).step(batch, nll_loss)
    assert metrics["train/skipped_nonfinite"] == 0.0


def test_bf16_on_a_cpu_without_native_bf16_warns_once_per_role(tiny_gpt, monkeypatch):
    import warnings

    import rlpost.models.precision

    model, _ = tiny_gpt
    monkeypatch.setattr(rlpost.models.precision, "cpu_has_fast_bf16", lambda: False)
    for make in (lambda: Trainer(model, TrainerConfig(lr=1e-3, precision="bf16")),
                 lambda: Reference(model, TrainerConfig(precision="bf16")),
                 lambda: Critic.build(model, "head", TrainerConfig(precision="bf16"))):
        with pytest.warns(UserWarning, match=r"trainer.precision=bf16 on a CPU without native bf16 matmul.*fp32"):
            make()
    monkeypatch.setattr(rlpost.models.precision, "cpu_has_fast_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Trainer(model, TrainerConfig(lr=1e-3, precision="bf16"))
        Trainer(model, TrainerConfig(lr=1e-3, precision="fp32"))


def _attention_inputs(seed=0, rows=3, heads=2, t=9, d=16):
    """q, k in fp32 and v in bf16, as a Llama layer hands them to SDPA under bf16 autocast (RoPE's fp32
    tables promote q and k), leaves that need a gradient; a left-padded causal bool mask."""
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(rows, heads, t, d, generator=g).requires_grad_() for _ in range(2))
    v = torch.randn(rows, heads, t, d, generator=g).bfloat16().requires_grad_()
    mask = torch.ones(rows, 1, t, t, dtype=torch.bool).tril()
    mask[0, :, :, :2] = False  # row 0 left-padded by two columns
    mask[0, :, :2, :2] = torch.eye(2, dtype=torch.bool)  # (padding attends to itself, as HF's masks do)
    return q, k, v, mask


def _sdpa_grads(q, k, v, mask, grad, **kw):
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kw)
    return out, torch.autograd.grad(out, (q, k, v), grad)


@pytest.mark.parametrize("causal", [False, True])
def test_a_bf16_training_forward_keeps_attention_and_takes_its_backward_in_fp32(causal):
    """Under the trainer's CPU bf16 autocast (grad on), SDPA's output is bit for bit autocast's bf16 one, and its
    gradients are the fp32 gradients of attention at the bf16-rounded inputs (torch's bf16 CPU backward is
    several times slower, and rounds inside): within fp32 rounding of them, where the bf16 backward is ~1e-2 off."""
    q, k, v, mask = _attention_inputs()
    mask, kw = (None, {"is_causal": True}) if causal else (mask, {})
    grad = torch.randn(3, 2, 9, 16, generator=torch.Generator().manual_seed(1)).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, plain_grads = _sdpa_grads(q, k, v, mask, grad, **kw)
    with autocast("cpu", "bf16"):
        out, grads = _sdpa_grads(q, k, v, mask, grad, **kw)
    assert out.dtype == torch.bfloat16 and torch.equal(out, plain)
    rounded = [t.detach().bfloat16().float().requires_grad_() for t in (q, k, v)]
    _, exact = _sdpa_grads(*rounded, mask, grad.float(), **kw)
    for g, want, t, bf16_grad in zip(grads, exact, (q, k, v), plain_grads):
        assert g.dtype == t.dtype
        want = want.to(t.dtype).float()
        assert torch.allclose(g.float(), want, rtol=1e-5, atol=1e-6), (g.float() - want).abs().max()
        assert (bf16_grad.float() - want).abs().max() > 10 * (g.float() - want).abs().max()


def test_the_fp32_attention_backward_is_for_training_forwards_only(monkeypatch):
    """No gradient (the reference, the rollout engine, Trainer.logprobs), fp32, or another device type: SDPA
    runs as torch dispatches it, with no per-op cost of the mode where nothing will be differentiated."""
    from rlpost.models.precision import cpu_attention_fp32_backward

    q, k, v, mask = _attention_inputs()
    taken, original = [], cpu_attention_fp32_backward._takes_over
    monkeypatch.setattr(cpu_attention_fp32_backward, "_takes_over",
                        lambda self, call: taken.append(1) or original(self, call))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with torch.no_grad(), autocast("cpu", "bf16"):
        sdpa(q, k, v, attn_mask=mask)
    with autocast("cpu", "fp32"):
        sdpa(q, k, v.float(), attn_mask=mask)
    assert taken == []  # the mode was not entered at all
    with autocast("cpu", "bf16"):
        out = sdpa(q, k, v, attn_mask=mask, dropout_p=0.5)
    assert taken == [1] and out.grad_fn.name() != "_AttentionFp32BackwardBackward"  # dropout: not taken over
    with autocast("cpu", "bf16"):
        out = sdpa(q, k, v, attn_mask=mask, enable_gqa=True)
    assert out.grad_fn.name() != "_AttentionFp32BackwardBackward"  # grouped-query attention: not taken over
    for kw in ({}, {"enable_gqa": False}):
        with autocast("cpu", "bf16"):
            out = sdpa(q, k, v, attn_mask=mask, **kw)
        assert out.grad_fn.name() == "_AttentionFp32BackwardBackward"


def test_the_bf16_trainer_takes_the_fp32_attention_backward_and_engines_sample_without_grad(
        tiny_llama_dir, tiny_gpt, monkeypatch):
    """Wired where it belongs: a bf16 Trainer step on an HF Llama (SDPA attention) runs its attention backward
    in fp32; an engine's forward context has autograd off, so the mode is never entered while sampling."""
    from rlpost.models import precision
    from rlpost.rollout.engine import ModuleEngine

    calls, backward = [], precision._AttentionFp32Backward.backward
    monkeypatch.setattr(precision._AttentionFp32Backward, "backward",
                        staticmethod(lambda ctx, grad: calls.append(1) or backward(ctx, grad)))
    model, tok = load_model(ModelConfig(name=tiny_llama_dir))
    algo = get_algorithm("grpo", beta=0.04)
    batch = algo.compute_advantages(Reference(model)(scored_batch(model, tok)))
    metrics = Trainer(model, TrainerConfig(lr=1e-3, precision="bf16")).step(batch, algo.compute_loss)
    layers = model.hf.config.num_hidden_layers
    assert metrics["train/skipped_nonfinite"] == 0.0 and len(calls) >= layers
    engine = ModuleEngine(tiny_gpt[0], tiny_gpt[1], dtype="bf16")
    with engine._autocast(torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu") and not torch.is_grad_enabled()


@pytest.mark.parametrize("kind", ["gpt_mini", "hf_llama"])
def test_bf16_gradient_checkpointing_recomputes_the_fp32_attention_backward(tiny_llama_dir, kind):
    """trainer.gradient_checkpointing with bf16 on a CPU: the block recomputed in the backward runs outside the
    trainer's autocast context, so it must take the same attention path as its forward did (torch's
    non-reentrant checkpoint refuses a recompute that saves other tensors), and the gradients are the ones
    without checkpointing."""
    grads, _ = checkpointed_grads(models(tiny_llama_dir)[kind][0], "bf16")
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, rtol=0, atol=1e-5, msg=name)
