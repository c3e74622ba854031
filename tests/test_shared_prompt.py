"""Scoring rows that share a prompt once per prompt (rlpost.models.token_logprobs): the same log-probs,
entropies and gradients as the plain forward over every row, for gpt_mini and a Hugging Face Llama."""

import pytest
import torch

from rlpost import Batch
from rlpost.config import ModelConfig
from rlpost.models import load_model, token_logprobs
from rlpost.packing import shared_prompt


def layout_batch(vocab: int, pad: int = 0) -> Batch:
    """Five rows, prompt columns :4, response columns 4:8. Rows 0, 1 and 3 share a left-padded prompt;
    row 2 and row 4 each have their own; responses have different lengths (right padding)."""
    a, b, c = [pad, 5, 6, 7], [8, 9, 10, 11], [pad, pad, 12, 13]
    prompts = [a, a, b, a, c]
    responses = [[4, 5, 6], [7, 8], [3, 4, 5, 6], [9, 9, 9, 9], [3]]
    ids = torch.full((5, 8), pad)
    mask = torch.zeros((5, 8), dtype=torch.long)
    resp = torch.zeros((5, 8), dtype=torch.long)
    for r, (p, x) in enumerate(zip(prompts, responses)):
        ids[r, :4] = torch.tensor(p)
        mask[r, :4] = torch.tensor([int(t != pad) for t in p])
        ids[r, 4:4 + len(x)] = torch.tensor(x)
        mask[r, 4:4 + len(x)] = 1
        resp[r, 4:4 + len(x)] = 1
    assert int(ids.max()) < vocab
    return Batch(input_ids=ids, attention_mask=mask, response_mask=resp)


def test_shared_prompt_finds_the_rows_of_each_prompt():
    P, first, owner = shared_prompt(layout_batch(16))
    assert P == 4
    assert owner[0] == owner[1] == owner[3]
    assert len({int(owner[0]), int(owner[2]), int(owner[4])}) == 3 == len(first)
    assert [int(first[owner[r]]) for r in range(5)] == [0, 0, 2, 0, 4]  # each prompt's first row


def test_shared_prompt_is_none_without_repeats_or_responses():
    batch = layout_batch(16)
    distinct = batch.select(torch.tensor([0, 2, 4]))
    assert shared_prompt(distinct) is None
    no_response = batch.replace(response_mask=torch.zeros_like(batch.response_mask))
    assert shared_prompt(no_response) is None
    # the same token ids under a different attention mask are a different prompt
    masked = batch.attention_mask.clone()
    masked[1, 0] = 1
    P, first, owner = shared_prompt(batch.replace(attention_mask=masked))
    assert owner[1] != owner[0] and owner[3] == owner[0]


def _gpt_mini():
    from rlpost.models.gpt_mini import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=16, block_size=16, n_layer=2, n_head=2, n_embd=32))


def _hf_llama(folder):
    model, _ = load_model(ModelConfig(name=folder))
    return model


@pytest.mark.parametrize("kind", ["gpt_mini", "hf_llama"])
def test_shared_prompt_scoring_equals_the_plain_forward(kind, tiny_llama_dir, monkeypatch):
    model = _gpt_mini() if kind == "gpt_mini" else _hf_llama(tiny_llama_dir)
    batch = layout_batch(16)
    calls = []
    shared_forward = model.forward_shared_prompt
    monkeypatch.setattr(model, "forward_shared_prompt", lambda *a, **kw: calls.append(1) or shared_forward(*a, **kw))
    torch.manual_seed(1)
    w_logp, w_ent = torch.randn(5, 8), torch.randn(5, 8)   # every column, prompt ones included

    def run(share):
        model.zero_grad(set_to_none=True)
        logp, ent = token_logprobs(model, batch, temperature=0.7, with_entropy=True, share_prompt=share)
        ((logp * w_logp).sum() + (ent * w_ent).sum()).backward()
        return logp.detach(), ent.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    logp0, ent0, grads0 = run(share=False)
    assert not calls
    logp1, ent1, grads1 = run(share=True)
    assert calls == [1]                                     # the shared path did run
    assert torch.all(logp0[:, 0] == 0) and torch.all(logp1[:, 0] == 0)
    torch.testing.assert_close(logp1, logp0, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent1, ent0, rtol=0, atol=1e-5)
    for name, g in grads0.items():  # float sums in another order: error ~1e-7 of the tensor's largest entry
        torch.testing.assert_close(grads1[name], g, rtol=1e-4, atol=1e-6 * max(1.0, float(g.abs().max())),
                                   msg=f"gradient of {name}")


@pytest.mark.parametrize("kind", ["gpt_mini", "hf_llama"])
def test_value_heads_and_reward_models_read_shared_prompts_alike(kind, tiny_llama_dir):
    """trunk_hidden_states (the critic's and the reward model's trunk pass) equals the plain pass: the
    hidden states, the critic's values and their gradients, and the reward model's scores."""
    from rlpost.critic import Critic
    from rlpost.models import position_ids_for, trunk_hidden_states
    from rlpost.env.reward_model import RewardModel

    model = _gpt_mini() if kind == "gpt_mini" else _hf_llama(tiny_llama_dir)
    batch = layout_batch(16)
    plain = model.hidden_states(batch.input_ids, batch.attention_mask, position_ids_for(batch.attention_mask))
    torch.testing.assert_close(trunk_hidden_states(model, batch), plain, rtol=0, atol=1e-5)
    torch.testing.assert_close(trunk_hidden_states(model, batch, share_prompt=False), plain, rtol=0, atol=0)

    critic = Critic.build(model, "separate")
    torch.nn.init.normal_(critic.head.weight)             # a head that reads the hidden state
    grads = []
    for share in (False, True):
        critic.zero_grad(set_to_none=True)
        if share:
            values = critic(batch)
        else:
            h = trunk_hidden_states(critic.trunk, batch, share_prompt=False)
            values = torch.nn.functional.pad(critic.head(h.float()).squeeze(-1)[:, :-1], (1, 0)) * batch.response_mask
        values.sum().backward()
        grads.append((values.detach(),
                      {n: p.grad.clone() for n, p in critic.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=0, atol=1e-4)
    assert grads[1][1].keys() == grads[0][1].keys()
    for name, g in grads[0][1].items():   # a head of std 1 makes large gradients: compare at their scale
        torch.testing.assert_close(grads[1][1][name], g, rtol=0, atol=1e-6 * float(g.abs().max()),
                                   msg=f"gradient of {name}")

    rm = RewardModel.from_policy(model)
    torch.nn.init.normal_(rm.head.weight)
    with torch.no_grad():
        torch.testing.assert_close(rm.score(batch), rm(batch.input_ids, batch.attention_mask), rtol=0, atol=1e-5)


def test_gradient_checkpointing_scores_without_sharing(tiny_llama_dir, monkeypatch):
    model = _hf_llama(tiny_llama_dir)
    batch = layout_batch(16)
    plain = token_logprobs(model, batch, share_prompt=False)
    enable = getattr(model.hf, "activation_checkpointing_enable", None) or model.hf.gradient_checkpointing_enable
    enable()
    model.train()
    assert not model.can_share_prompt
    monkeypatch.setattr(model, "forward_shared_prompt", lambda *a: pytest.fail("shared path under checkpointing"))
    torch.testing.assert_close(token_logprobs(model, batch), plain, rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gpt_mini", "hf_llama"])
def test_compiled_model_scores_and_trains_like_the_eager_one(kind, tiny_llama_dir, tmp_path):
    """trainer.compile: the same log-probs and gradients (shared-prompt and plain paths), unchanged
    parameter names, and a checkpoint that loads back."""
    import copy

    from rlpost.models import compile_model, save_model

    eager = _gpt_mini() if kind == "gpt_mini" else _hf_llama(tiny_llama_dir)
    compiled = compile_model(copy.deepcopy(eager))
    assert list(compiled.state_dict()) == list(eager.state_dict())
    batch = layout_batch(16)
    for share in (True, False):
        grads = []
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
            logp = token_logprobs(model, batch, share_prompt=share)
            (logp * batch.response_mask).sum().backward()
            grads.append((logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        torch.testing.assert_close(grads[1][0], grads[0][0], rtol=0, atol=1e-5)
        for name, g in grads[0][1].items():
            torch.testing.assert_close(grads[1][1][name], g, rtol=1e-4, atol=1e-6, msg=f"gradient of {name}")
    if kind == "hf_llama":
        from rlpost.models import HFTokenizer
        from transformers import AutoTokenizer

        save_model(compiled, HFTokenizer(AutoTokenizer.from_pretrained(tiny_llama_dir)), str(tmp_path / "ckpt"))
        reloaded = _hf_llama(str(tmp_path / "ckpt"))
        for (n, a), b in zip(eager.named_parameters(), reloaded.parameters()):
            torch.testing.assert_close(a, b, msg=n)
