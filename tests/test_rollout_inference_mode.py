"""The native engines sample in torch.inference_mode (rlpost/rollout/scheduler.py `generate`). A tensor born
there that outlives the call and is later trained through, updated in place, copied into by a weight sync,
saved or pickled makes torch raise. So: on a fresh model whose first forward ever is the rollout's (any cache
a module builds lazily is built inside inference mode), per family (the HF ones with their own paths: q/k
norms, per-layer-type RoPE, partial rotary, an embedding-scale buffer), with LoRA adapters, pointer and copy
engines in fp32 and bf16, nothing a module holds is an inference tensor afterwards, and the model trains on
the rows (a loss that saves old_logp for its backward), syncs into the engine, samples again, deep-copies,
pickles and saves."""

import copy
import io
import pickle

import pytest
import torch
from test_engine_families import build as build_hf

from conftest import encode, train_tiny_tokenizer
from rlpost.config import TrainerConfig
from rlpost.models.lora import apply_lora
from rlpost.rollout import SamplingParams, build_engine
from rlpost.rollout.engine import named_weights
from rlpost.trainer import Trainer


@pytest.fixture(scope="module")
def hf_tok():
    return train_tiny_tokenizer([f"{a}+{b}={a + b}" for a in range(60) for b in range(60)] + ["The answer is 42."])


def inference_tensors(module: torch.nn.Module) -> list[str]:
    """Every tensor a module of `module` holds (parameters, buffers, and plain attributes, inside lists, tuples
    and dicts too: where a lazily built cache would sit) that is an inference tensor, by where it sits."""
    found = []

    def visit(x, where, depth=0):
        if isinstance(x, torch.Tensor):
            if x.is_inference():
                found.append(where)
        elif isinstance(x, (list, tuple)) and depth < 3:
            for i, y in enumerate(x):
                visit(y, f"{where}[{i}]", depth + 1)
        elif isinstance(x, dict) and depth < 3:
            for k, y in x.items():
                visit(y, f"{where}[{k!r}]", depth + 1)

    for name, m in module.named_modules(remove_duplicate=False):
        for attr, value in vars(m).items():
            if attr != "_modules":
                visit(value, f"{name or 'model'}.{attr}")
    return found


def loss_saving_old_logp(logp, b):  # old_logp * logp saves old_logp for the backward
    return -(b.old_logp * logp * b.response_mask).sum() / b.response_mask.sum(), {}


def round_trip(model, tok, prompts, share_weights: bool, dtype: str):
    engine = build_engine("native", model, tok, share_weights=share_weights, dtype=dtype)
    params = SamplingParams(max_new_tokens=6, temperature=1.0)
    batch = engine.generate(prompts, 2, params, seed=1)
    assert not any(t.is_inference() for t in vars(batch).values() if isinstance(t, torch.Tensor))
    assert inference_tensors(model) == []
    if not share_weights:
        assert inference_tensors(engine._model) == []
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    Trainer(model, TrainerConfig(lr=1e-2)).step(batch, loss_saving_old_logp)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
    engine.update_weights(named_weights(model), 1)  # copy: copy_ into the engine's own parameters
    again = engine.generate(prompts, 2, params, seed=1)
    assert again.policy_version.tolist() == [1] * len(prompts) * 2
    Trainer(model, TrainerConfig(lr=1e-2)).step(again, loss_saving_old_logp)  # trains on after the second rollout
    copy.deepcopy(model)
    pickle.loads(pickle.dumps(model))
    torch.save(model.state_dict(), io.BytesIO())
    assert inference_tensors(model) == []


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("share_weights,dtype", [(True, "fp32"), (False, "bf16")], ids=["pointer-fp32", "copy-bf16"])
def test_gpt_mini_first_forward_in_the_rollout_leaves_nothing_inference(tiny_gpt, share_weights, dtype, lora):
    model, tok = tiny_gpt
    if lora:
        apply_lora(model, 4, 8.0, 0.0, ["c_attn", "c_proj"])
    round_trip(model, tok, [tok.encode_prompt(p) for p in ["1+2=", "47+85=", "9+9="]], share_weights, dtype)


@pytest.mark.parametrize("family", ["qwen3", "gemma3", "phi3"])
@pytest.mark.parametrize("share_weights,dtype", [(True, "fp32"), (False, "bf16")], ids=["pointer-fp32", "copy-bf16"])
def test_hf_first_forward_in_the_rollout_leaves_nothing_inference(hf_tok, family, share_weights, dtype):
    model, htok = build_hf(family, hf_tok)
    model.train()
    if family == "qwen3":  # LoRA too: the engine reads merged weights, rebuilt when the adapters change
        apply_lora(model, 4, 8.0, 0.0, ["q_proj", "v_proj", "down_proj"])
    round_trip(model, htok, encode(htok, ["1+2=", "47+85=", "The answer is"]), share_weights, dtype)
