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


@pytest.mark.parametrize("kind", ["gpt_mini", "hf_llama"])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_llama_dir, kind):
    model, _ = models(tiny_llama_dir)[kind]
    batch = layout_batch(16)
    w = torch.randn(batch.input_ids.shape, generator=torch.Generator().manual_seed(1))
    grads = {}
    for on in (False, True):
        m = copy.deepcopy(model).train()
        set_gradient_checkpointing(m, on)
        calls = block_calls(m)
        logp = token_logprobs(m, batch, share_prompt=False)     # one path for both: the same float rounding
        (logp * w).sum().backward()
        assert len(calls) == (2 if on else 1)                  # recomputed in the backward
        grads[on] = {n: p.grad for n, p in m.named_parameters()}
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
