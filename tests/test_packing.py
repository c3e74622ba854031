"""Sequence packing: the packed forward computes what the padded one does, for every algorithm and role."""

import pytest
import torch

from rlpost import Batch, get_algorithm
from rlpost.algorithms import available
from rlpost.critic import Critic
from rlpost.config import ModelConfig, TrainerConfig
from rlpost.models import (HFCausalLM, check_packing, load_model, packing_refusal, resolve_packing, token_logprobs,
                           transformer_blocks)
from rlpost.packing import (even_forwards, micro_batches, pack, padded_positions, padded_micro_batches,
                            single_forward)
from rlpost.schema import ConfigError
from rlpost.reference import Reference
from rlpost.rollout import SamplingParams
from rlpost.trainer import Trainer

ALL = sorted(available())
RESPONSE_LENGTHS = [9, 1, 3, 7, 2, 5, 8, 1, 4, 6, 2, 9]  # long-tailed enough that rows share packed rows


def grouped_batch(vocab: int, prompts: int = 3, k: int = 4, prompt_width: int = 4, seed: int = 0) -> Batch:
    """`prompts` prompts of 2..prompt_width tokens (left-padded), k responses each of RESPONSE_LENGTHS
    (right-padded), with old/ref log-probs, values and 0/1 rewards that vary within each group."""
    g = torch.Generator().manual_seed(seed)
    B, R = prompts * k, max(RESPONSE_LENGTHS)
    T = prompt_width + R
    ids = torch.zeros(B, T, dtype=torch.long)
    attn, resp = torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T, dtype=torch.long)
    for p in range(prompts):
        plen = 2 + p % (prompt_width - 1)
        prompt = torch.randint(3, vocab, (plen,), generator=g)
        for j in range(k):
            b, n = p * k + j, RESPONSE_LENGTHS[(p * k + j) % len(RESPONSE_LENGTHS)]
            ids[b, prompt_width - plen:prompt_width] = prompt
            ids[b, prompt_width:prompt_width + n] = torch.randint(3, vocab, (n,), generator=g)
            attn[b, prompt_width - plen:prompt_width + n] = 1
            resp[b, prompt_width:prompt_width + n] = 1
    logp = -torch.rand(B, T, generator=g) * 2
    return Batch(input_ids=ids, attention_mask=attn, response_mask=resp,
                 old_logp=(logp + 0.1 * torch.randn(B, T, generator=g)) * resp,
                 ref_logp=(logp + 0.1 * torch.randn(B, T, generator=g)) * resp,
                 values=torch.randn(B, T, generator=g) * resp,
                 rewards=torch.tensor([float((b // 2) % 2) for b in range(B)]),
                 group_ids=torch.arange(prompts).repeat_interleave(k))


def _gpt_mini():
    from rlpost.models.gpt_mini import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=16, block_size=16, n_layer=2, n_head=2, n_embd=32))


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return HFCausalLM(Qwen2ForCausalLM(Qwen2Config(vocab_size=40, hidden_size=32, num_hidden_layers=2,
                                                   num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                                   max_position_embeddings=64)))


@pytest.fixture(params=["gpt_mini", "hf_llama", "hf_qwen2"])
def model(request, tiny_llama_dir):
    if request.param == "gpt_mini":
        return _gpt_mini()
    if request.param == "hf_llama":
        return load_model(ModelConfig(name=tiny_llama_dir))[0]
    return _qwen2()


def _vocab(model) -> int:
    return model.config.vocab_size if hasattr(model, "config") else model.hf.config.vocab_size


# ---------------------------------------------------------------------------- the packing itself

def test_pack_keeps_every_real_token_once_with_restarting_positions_and_a_token_budget():
    batch = grouped_batch(vocab=16)
    real = int(batch.attention_mask.sum())
    for budget in (None, 1, 20, 40):
        packs = pack(batch, budget)
        rows = torch.cat([p.rows for p in packs])
        assert sorted(rows.tolist()) == list(range(len(batch)))          # every row in exactly one micro-batch
        assert sum(p.real_tokens for p in packs) == real
        for p in packs:
            assert budget is None or p.positions <= budget or p.input_ids.shape[0] == 1  # a wide row goes alone
            mb = batch.select(p.rows)
            # unpacking the packed token ids gives back the padded rows' real tokens, in place
            assert torch.equal(p.unpack(p.input_ids, shifted=False), mb.input_ids * mb.attention_mask)
            # the forwards (segments) cover every row once and skip only unused tails
            assert [r for a, e, _ in p.segments for r in range(a, e)] == list(range(p.input_ids.shape[0]))
            for a, e, w in p.segments:
                assert (p.src.view(p.input_ids.shape)[a:e, w:] == -1).all() and w <= p.input_ids.shape[1]
            for r in range(p.input_ids.shape[0]):  # positions restart at 0 at each sequence's first token
                starts = p.first[r].nonzero().squeeze(1).tolist()
                assert p.position_ids[r, starts].eq(0).all()
                assert sorted(p.seq_ids[r].unique().tolist())[-1] == len(starts)
    assert len(pack(batch, None)) == 1 and len(pack(batch, None)[0].segments) > 1  # part-filled rows run apart
    # sequences share rows: fewer positions than the padded [B, T]
    assert pack(batch, None)[0].positions <= 0.7 * batch.input_ids.numel()


def test_a_sharded_roles_packed_micro_batch_runs_as_one_forward_with_the_same_scores(model):
    """Under fsdp2 each forward all-gathers the shards, so every rank must run as many forwards as the others:
    single_forward joins a packed micro-batch's segments into one forward, and the scores stay the segments'."""
    batch = grouped_batch(_vocab(model))
    plan = micro_batches(batch, None, None, True)
    assert any(len(p.segments) > 1 for _, _, p in plan)  # part-filled rows run apart when not sharded
    calls = []
    for (rows, mb, p), (_, _, one) in zip(plan, single_forward(plan)):
        assert one.segments == [(0, p.input_ids.shape[0], p.input_ids.shape[1])]
        lp0 = token_logprobs(model, mb, temperature=0.7, packed=p).detach()
        one.run(lambda *x: calls.append(1) or x[0].unsqueeze(-1).float(), one.input_ids)
        lp1 = token_logprobs(model, mb, temperature=0.7, packed=one).detach()
        torch.testing.assert_close(lp1, lp0, rtol=0, atol=1e-5)
    assert len(calls) == len(plan)  # one forward per micro-batch


def _full_rows(vocab: int, B: int, T: int, seed: int = 0) -> Batch:
    """B rows of T real tokens each (no padding: packing cannot save a position), responses after 4 prompt tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    resp = (torch.arange(T) >= 4).long().expand(B, T).clone()
    return Batch(input_ids=ids, attention_mask=torch.ones_like(ids), response_mask=resp)


def test_even_forwards_gives_ranks_that_pack_and_pad_the_same_number_of_forwards():
    """Two ranks' batches for which packing=auto chooses differently (long-tailed rows pack, full rows pad) and a
    rank without rows: with the maximum over the three as the agreement, each runs one forward per micro-batch,
    as many forwards as the others, the padding ones marked not real; every real row is scored once."""
    model = _gpt_mini()
    tailed = grouped_batch(16)
    ranks = [tailed, _full_rows(16, 5, tailed.input_ids.shape[1]), tailed.select([])]
    plans = [micro_batches(b, 2, None, "auto") if len(b) else [] for b in ranks]
    assert all(p is not None for _, _, p in plans[0]) and all(p is None for _, _, p in plans[1])
    assert any(len(p.segments) > 1 for _, _, p in plans[0])  # unsharded, a packed micro-batch runs its segments
    most = max(len(p) for p in plans)
    assert len({len(p) for p in plans}) == 3  # three different counts to even out
    block = transformer_blocks(model)[0]
    for batch, plan in zip(ranks, plans):
        agreed = []
        runs = even_forwards(batch, plan, lambda n: agreed.append(n) or most)
        assert agreed == [len(plan)] and len(runs) == most
        calls = []
        hook = block.register_forward_pre_hook(lambda m, a: calls.append(1))
        try:
            for rows, mb, packed, real in runs:
                assert packed is None or len(packed.segments) == 1
                token_logprobs(model, mb, share_prompt=False, packed=packed)
        finally:
            hook.remove()
        assert len(calls) == most  # what FSDP2's all-gathers pair up on
        real = [rows for rows, _, _, r in runs if r]
        assert len(real) == len(plan) and sorted(torch.cat(real).tolist() if real else []) == list(range(len(batch)))
        for rows, mb, packed, r in runs[len(plan):]:  # padding: the first micro-batch again, or a 2-token row
            assert not r and (mb is runs[0][1] if plan else mb.input_ids.shape == (1, 2))
    # unsharded: the plan itself, segments and all, without any agreement
    assert [(rows, mb, p) for rows, mb, p, _ in even_forwards(tailed, plans[0])] == plans[0]
    assert all(r for *_, r in even_forwards(tailed, plans[0]))


def test_pack_rejects_an_empty_row_and_a_bad_budget():
    batch = grouped_batch(vocab=16)
    mask = batch.attention_mask.clone()
    mask[5] = 0
    with pytest.raises(ValueError, match="row 5 has no real token"):
        pack(batch.replace(attention_mask=mask))
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        pack(batch, 0)


def test_padded_micro_batches_by_token_budget():
    batch = grouped_batch(vocab=16)
    T = batch.input_ids.shape[1]
    sizes = [len(mb) for _, mb, _ in micro_batches(batch, None, 3 * T + 1)]
    assert sizes == [3, 3, 3, 3]
    sizes = [len(mb) for _, mb, _ in micro_batches(batch, 2, 3 * T)]
    assert sizes == [2] * 6
    assert all(mb.global_tokens == batch.num_response_tokens for _, mb, _ in micro_batches(batch, None, 1))


# ---------------------------------------------------------------------------- models

def test_packed_logprobs_and_entropies_equal_the_padded_forward(model):
    batch = grouped_batch(_vocab(model))
    logp0, ent0 = token_logprobs(model, batch, temperature=0.7, with_entropy=True, share_prompt=False)
    mask = batch.attention_mask.bool() & (torch.arange(batch.input_ids.shape[1]) > 0)
    mask[:, 1:] &= batch.attention_mask[:, :-1].bool()   # every real token but each sequence's first
    for budget in (None, 25):
        logp1, ent1 = torch.zeros_like(logp0), torch.zeros_like(ent0)
        for p in pack(batch, budget):
            lp, ent = token_logprobs(model, batch.select(p.rows), temperature=0.7, with_entropy=True, packed=p)
            logp1[p.rows], ent1[p.rows] = lp.detach(), ent.detach()
        torch.testing.assert_close(logp1 * mask, logp0.detach() * mask, rtol=0, atol=1e-5)
        torch.testing.assert_close(ent1 * mask, ent0.detach() * mask, rtol=0, atol=1e-5)


def test_a_model_that_mixes_packed_sequences_is_refused_naming_the_key(model, monkeypatch):
    check_packing(model)  # the three real models keep packed sequences apart
    if not isinstance(model, HFCausalLM):
        return
    plain = model.hidden_states  # an attention that ignores restarting position ids: one causal block
    monkeypatch.setattr(model, "hidden_states", lambda ids, mask=None, pos=None: plain(ids, torch.ones_like(ids)))
    with pytest.raises(ConfigError, match="trainer.packing"):
        check_packing(model)
    with pytest.raises(ConfigError, match="trainer.packing=true: .* does not keep packed sequences apart"):
        Trainer(model, TrainerConfig(lr=1e-3, packing=True))
    # auto (the default) turns packing off for such a model, with its reason at the run's start
    assert Trainer(model, TrainerConfig(lr=1e-3)).packing is False
    assert Reference(model, TrainerConfig()).packing is False
    assert Critic.build(model, "head", TrainerConfig()).packing is False
    assert "does not keep packed sequences apart" in packing_refusal(model)


def test_auto_packs_where_the_model_can_and_says_why_not_elsewhere(model, tmp_path):
    from rlpost.config import load_config
    from rlpost.run import packing_line

    assert packing_refusal(model) is None and resolve_packing("auto", model) == "auto"
    assert Trainer(model, TrainerConfig(lr=1e-3)).packing == "auto"
    cfg = load_config(None, [f"out_dir={tmp_path}"])
    assert packing_line(cfg, model).startswith("rlpost: trainer.packing=auto -> on")
    assert packing_line(load_config(None, ["trainer.packing=false"]), model) is None
    # under fsdp2 too: each rank packs where auto chooses to (rlpost.packing.even_forwards keeps forwards equal)
    assert packing_line(load_config(None, ["trainer.strategy=fsdp2"]), model) == packing_line(cfg, model)
    with pytest.raises(ConfigError, match="packing supports gpt_mini and Hugging Face causal LMs, not Linear"):
        resolve_packing(True, torch.nn.Linear(2, 2))
    assert resolve_packing("auto", torch.nn.Linear(2, 2)) is False
    assert packing_line(cfg, torch.nn.Linear(2, 2)).startswith("rlpost: trainer.packing=auto -> off: packing supports")


@pytest.mark.parametrize("impl", ["eager", "sdpa"])  # flex_attention: no backward on CPU in torch 2.13
def test_hf_attention_implementations_read_packed_position_ids(impl):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = HFCausalLM(LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
                                                    attn_implementation=impl)))
    check_packing(model)
    batch = grouped_batch(40)
    logp0 = token_logprobs(model, batch, share_prompt=False)
    p = pack(batch, None)[0]
    logp1 = torch.zeros_like(logp0)
    logp1[p.rows] = token_logprobs(model, batch.select(p.rows), packed=p)
    torch.testing.assert_close(logp1 * batch.response_mask, logp0 * batch.response_mask, rtol=0, atol=1e-5)


def long_prompt_batch(prompt_len: int, response_lens: list[int], k: int = 4, seed: int = 0) -> Batch:
    """Groups of k rows that share a `prompt_len`-token prompt, responses of `response_lens` tokens."""
    g = torch.Generator().manual_seed(seed)
    n, R = len(response_lens) // k, max(response_lens)
    ids = torch.zeros(n * k, prompt_len + R, dtype=torch.long)
    attn, resp = torch.zeros_like(ids), torch.zeros_like(ids)
    for p in range(n):
        prompt = torch.randint(3, 16, (prompt_len,), generator=g)
        for j in range(k):
            b, length = p * k + j, response_lens[p * k + j]
            ids[b, :prompt_len] = prompt
            ids[b, prompt_len:prompt_len + length] = torch.randint(3, 16, (length,), generator=g)
            attn[b, :prompt_len + length] = 1
            resp[b, prompt_len:prompt_len + length] = 1
    return Batch(input_ids=ids, attention_mask=attn, response_mask=resp,
                 group_ids=torch.arange(n).repeat_interleave(k))


def test_auto_packs_a_batch_only_where_that_computes_fewer_positions():
    # long-tailed responses after short prompts: packing drops the padding (prompts shared or not)
    tailed = grouped_batch(16)
    packed = sum(p.positions for p in pack(tailed, None))
    assert packed < padded_positions(tailed, padded_micro_batches(tailed, None, None), share_prompt=True)
    assert all(p is not None for _, _, p in micro_batches(tailed, None, None, "auto", share_prompt=True))
    # a 12-token prompt shared by 4 short responses: each prompt once (padded) beats a copy per packed row
    shared = long_prompt_batch(12, [1, 2, 2, 3, 3, 1, 2, 2])
    B, T = shared.input_ids.shape
    assert padded_positions(shared, [list(range(B))], share_prompt=True) == 2 * 12 + B * 3 == 48
    assert sum(p.positions for p in pack(shared, None)) > 48
    assert all(p is None for _, _, p in micro_batches(shared, None, None, "auto", share_prompt=True))
    # ... unless the model cannot share prompts (gradient checkpointing): then the packed rows are fewer
    assert padded_positions(shared, [list(range(B))], share_prompt=False) == B * T
    assert all(p is not None for _, _, p in micro_batches(shared, None, None, "auto", share_prompt=False))
    # true and false are as given, whatever the positions
    assert all(p is not None for _, _, p in micro_batches(shared, None, None, True, share_prompt=True))
    assert all(p is None for _, _, p in micro_batches(tailed, None, None, False, share_prompt=True))


def test_a_sharded_reward_model_plans_auto_and_runs_even_forwards(monkeypatch):
    """Sharded, the reward model plans its rows as the trainer and the critic do, auto included, without shared
    prompts, and runs them through even_forwards (every rank as many forwards: tests/test_fsdp_forwards.py); the
    rewards are the plain whole-batch path's."""
    import rlpost.env.reward_model as reward_model

    rm = reward_model.RewardModel(_gpt_mini())
    with torch.no_grad():  # a head at zero scores every row 0
        rm.head.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    batch = grouped_batch(16)
    whole = rm.score(batch)
    assert whole.abs().min() > 0
    plans, agreed = [], []
    monkeypatch.setattr(reward_model, "micro_batches", lambda *a: plans.append(a[3:]) or micro_batches(*a))
    monkeypatch.setattr(reward_model, "even_forwards",
                        lambda b, plan, agree: agreed.append(agree) or even_forwards(b, plan, agree))
    torch.testing.assert_close(rm.score(batch, packing="auto"), whole, rtol=0, atol=1e-5)
    assert plans == [("auto", True)] and agreed == [None]  # unsharded: prompts shared, the plan as it is
    monkeypatch.setattr(reward_model.dist, "is_sharded", lambda m: True)
    torch.testing.assert_close(rm.score(batch, packing="auto"), whole, rtol=0, atol=1e-5)
    assert plans[1] == ("auto", False) and agreed[1] is reward_model.dist.reduce_max


def test_auto_scores_as_the_padded_path_either_way(model):
    """The reference under auto, on a batch it packs and one it keeps padded: the log-probs of padding."""
    for batch in (grouped_batch(_vocab(model)), long_prompt_batch(12, [1, 2, 2, 3, 3, 1, 2, 2])):
        padded = Reference(model, TrainerConfig(packing=False))(batch).ref_logp
        torch.testing.assert_close(Reference(model, TrainerConfig())(batch).ref_logp, padded, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------- roles

def _step(model, algo, batch, **trainer_kw):
    """One trainer step's summed loss and its gradients (captured instead of applied), and the batch's values."""
    critic = Critic.build(model, "head", TrainerConfig(**trainer_kw)) if algo.uses_critic else None
    if critic is not None:
        torch.nn.init.normal_(critic.head.weight, std=0.1, generator=torch.Generator().manual_seed(3))
    trainer = Trainer(model, TrainerConfig(lr=1e-3, grad_clip=0.0, **trainer_kw), SamplingParams(temperature=0.9),
                      critic=critic)
    grads = {}
    trainer.optimizer.step = lambda: grads.update({n: p.grad.clone() for n, p in model.named_parameters()
                                                   if p.grad is not None})
    if critic is not None:
        with torch.no_grad():
            batch = batch.replace(values=critic(batch))
    if algo.needs_proximal_logp:
        batch = batch.replace(rollout_logp=batch.old_logp, old_logp=trainer.logprobs(batch))
    batch = algo.compute_advantages(batch)
    metrics = trainer.step(batch, algo.compute_loss)
    return metrics["train/loss"], grads, batch


@pytest.mark.parametrize("name", ALL)
def test_every_algorithm_packed_loss_and_gradients_equal_the_padded_path(name, model):
    algo = get_algorithm(name, beta=0.05, entropy_coef=0.01)
    batch = grouped_batch(_vocab(model))
    loss0, grads0, b0 = _step(model, algo, batch, micro_batch_size=5, packing=False)
    loss1, grads1, b1 = _step(model, algo, batch, micro_batch_size=5, packing=True, micro_batch_tokens=30)
    assert abs(loss1 - loss0) <= 1e-5 * max(1.0, abs(loss0)), (loss0, loss1)
    assert grads0.keys() == grads1.keys() and grads0
    for n, g in grads0.items():
        torch.testing.assert_close(grads1[n], g, rtol=0, atol=1e-5 * max(1.0, float(g.abs().max())),
                                   msg=f"{name}: gradient of {n}")
    if algo.uses_critic:
        torch.testing.assert_close(b1.values, b0.values, rtol=0, atol=1e-5)
    if algo.needs_proximal_logp:
        torch.testing.assert_close(b1.old_logp, b0.old_logp, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["grpo", "ppo"])
def test_packed_roles_name_the_device_of_what_they_create(name):
    model = _gpt_mini()
    algo = get_algorithm(name, beta=0.05)
    cfg = TrainerConfig(lr=1e-3, epochs=2, minibatches=2, packing=True, micro_batch_tokens=30)
    reference, critic = Reference(model, cfg), Critic.build(model, "separate", cfg) if algo.uses_critic else None
    trainer = Trainer(model, cfg, critic=critic)
    batch = grouped_batch(16)
    with torch.device("meta"):  # any tensor made without device= lands on "meta" and fails against the CPU
        batch = reference(batch)
        if critic is not None:
            with torch.no_grad():
                batch = batch.replace(values=critic(batch))
        batch = batch.replace(old_logp=trainer.logprobs(batch))
        metrics = trainer.step(algo.compute_advantages(batch), algo.compute_loss)
    assert all(type(v) is float and v == v for v in metrics.values())


def test_reference_scores_packed_micro_batches_as_the_whole_padded_batch(model):
    batch = grouped_batch(_vocab(model))
    B, T = batch.input_ids.shape
    whole = Reference(model, TrainerConfig(packing=False), SamplingParams(temperature=0.8))(batch).ref_logp
    for kw, most in ((dict(micro_batch_size=5, packing=False), 5 * T),
                     (dict(micro_batch_tokens=40, packing=False), 40), (dict(packing=True, micro_batch_tokens=30), 30),
                     (dict(packing=True, micro_batch_size=4), 4 * T)):
        ref = Reference(model, TrainerConfig(**kw), SamplingParams(temperature=0.8))
        seen = []
        hook = transformer_blocks(ref.model)[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[:2]))
        try:
            torch.testing.assert_close(ref(batch).ref_logp, whole, rtol=0, atol=1e-5, msg=str(kw))
        finally:
            hook.remove()
        assert max(r * t for r, t in seen) <= most, (kw, seen)  # no forward held more than one micro-batch


def test_the_distillation_teacher_scores_in_micro_batches_as_the_whole_batch():
    from rlpost.env.teacher import TeacherReward
    from rlpost.models.gpt_mini import CharTokenizer

    teacher, tok = _gpt_mini(), CharTokenizer("abcdefghijklm")  # 16 ids, as _gpt_mini's vocabulary
    batch = grouped_batch(16)
    B, T = batch.input_ids.shape
    whole = TeacherReward(teacher, tok)(batch)[0].rewards
    for kw, most in ((dict(micro_batch_size=4), 4 * T), (dict(packing=True, micro_batch_tokens=30), 30)):
        seen = []
        hook = teacher.transformer.h[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[:2]))
        try:
            rewards = TeacherReward(teacher, tok, **kw)(batch)[0].rewards
        finally:
            hook.remove()
        torch.testing.assert_close(rewards, whole, rtol=0, atol=1e-5, msg=str(kw))
        assert max(r * t for r, t in seen) <= most, (kw, seen)


# ---------------------------------------------------------------------------- configuration and a run

def test_config_keys_and_their_range_check():
    from rlpost.config import ConfigError, load_config

    cfg = load_config(None, ["trainer.packing=true", "trainer.micro_batch_tokens=512"])
    assert cfg.trainer.packing is True and cfg.trainer.micro_batch_tokens == 512
    assert load_config(None, ["trainer.packing=false"]).trainer.packing is False
    defaults = load_config(None, [])
    assert defaults.trainer.packing == "auto" and defaults.trainer.micro_batch_tokens is None
    with pytest.raises(ConfigError, match="'trainer.packing' is 'always'; valid values: auto, true, false"):
        load_config(None, ["trainer.packing=always"])
    with pytest.raises(ConfigError, match="'trainer.micro_batch_tokens' must be >= 1 or null, got 0"):
        load_config(None, ["trainer.micro_batch_tokens=0"])


@pytest.mark.slow
def test_a_packed_ppo_run_trains_with_reference_and_critic_in_token_budgeted_micro_batches(tmp_path):
    import json

    from rlpost.config import load_config
    from rlpost.run import train

    tiny = ["sft.steps=30", "sft.batch_size=32", "rl.steps=2", "rl.eval_every=0", "task.num_eval=20",
            "rollout.prompts_per_step=4", "rollout.k=4", "eval.samples_per_prompt=1", "model.n_layer=2",
            "model.n_embd=32", "model.n_head=2", "algorithm.name=ppo", "algorithm.beta=0.04",
            "trainer.packing=true", "trainer.micro_batch_tokens=40", f"out_dir={tmp_path}", "run_name=packed"]
    assert train(load_config(None, tiny))["status"] == "ok"
    rl = [m for m in map(json.loads, open(tmp_path / "packed" / "metrics.jsonl")) if m.get("stage") == "rl"]
    assert len(rl) == 2 and all(torch.isfinite(torch.tensor(m["train/loss"])) for m in rl)
    assert all(m["rollout/logp_mismatch_max"] < 1e-4 for m in rl)  # packed scoring = what the engine sampled
