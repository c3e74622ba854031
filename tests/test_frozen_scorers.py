"""The frozen scorers of an RL step (reward model, process reward model) score in the trainer's micro-batches:
the same scores as one whole-batch forward, and no trunk forward larger than the token budget."""

import pytest
import torch

from rlpost.batch import Batch
from rlpost.env.process_reward_model import ProcessRewardModel
from rlpost.env.reward_model import LearnedReward, RewardModel
from rlpost.models import HFCausalLM, transformer_blocks
from rlpost.models.gpt_mini import GPT, GPTConfig

TOL = 1e-5
RESPONSE_LENGTHS = [9, 1, 3, 7, 2, 5, 8, 1, 4, 6, 2, 9]


def scorer_batch(vocab: int, prompts: int = 3, k: int = 4, prompt_width: int = 4) -> Batch:
    """`prompts` left-padded prompts of 2..prompt_width tokens, k right-padded responses each (long-tailed)."""
    g = torch.Generator().manual_seed(0)
    B, R = prompts * k, max(RESPONSE_LENGTHS)
    T = prompt_width + R
    ids, attn, resp = (torch.zeros(B, T, dtype=torch.long) for _ in range(3))
    for p in range(prompts):
        plen = 2 + p % (prompt_width - 1)
        prompt = torch.randint(3, vocab, (plen,), generator=g)
        for j in range(k):
            b, n = p * k + j, RESPONSE_LENGTHS[(p * k + j) % len(RESPONSE_LENGTHS)]
            ids[b, prompt_width - plen:prompt_width] = prompt
            ids[b, prompt_width:prompt_width + n] = torch.randint(3, vocab, (n,), generator=g)
            attn[b, prompt_width - plen:prompt_width + n] = 1
            resp[b, prompt_width:prompt_width + n] = 1
    return Batch(input_ids=ids, attention_mask=attn, response_mask=resp, meta={"row": [{}] * B})


def trunk(kind: str):
    torch.manual_seed(0)
    if kind == "gpt_mini":
        return GPT(GPTConfig(vocab_size=16, block_size=16, n_layer=2, n_head=2, n_embd=32))
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return HFCausalLM(Qwen2ForCausalLM(Qwen2Config(vocab_size=40, hidden_size=32, num_hidden_layers=2,
                                                   num_attention_heads=4, num_key_value_heads=2,
                                                   intermediate_size=64, max_position_embeddings=64)))


def with_head(model_cls, kind: str):
    """A reward model (or PRM) over a fresh trunk, its head made non-zero so that the scores differ per row."""
    m = model_cls(trunk(kind))
    with torch.no_grad():
        torch.manual_seed(1)
        m.head.weight.normal_()
        m.head.bias.fill_(0.1)
    return m.eval()


class TokensPerForward:
    """Token positions each forward of the trunk computes (read at its first transformer block's input)."""

    def __init__(self, model):
        self.calls: list[int] = []
        block = transformer_blocks(model)[0]
        self.handle = block.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        self.calls.append(h.shape[0] * h.shape[1])

    def close(self):
        self.handle.remove()


def vocab_of(kind: str) -> int:
    return 16 if kind == "gpt_mini" else 40


@pytest.mark.parametrize("kind", ["gpt_mini", "hf_qwen2"])
@pytest.mark.parametrize("packing", [False, True])
def test_learned_reward_scores_in_micro_batches_of_the_token_budget(kind, packing):
    rm = with_head(RewardModel, kind)
    batch = scorer_batch(vocab_of(kind))
    T = batch.input_ids.shape[1]
    whole = LearnedReward(rm, tokenizer=None)
    whole_rewards = rm.score(batch)
    budget = 3 * T
    role = LearnedReward(rm, tokenizer=None, micro_batch_tokens=budget, packing=packing)
    count = TokensPerForward(rm.trunk)
    rewards = rm.score(batch, role.micro_batch_size, role.micro_batch_tokens, role.packing)
    count.close()
    assert torch.allclose(rewards, whole_rewards, atol=TOL, rtol=0), (rewards - whole_rewards).abs().max()
    assert len(count.calls) > 1 and max(count.calls) <= budget, count.calls
    assert whole.micro_batch_tokens is None  # the default: one forward of the whole batch
    # rows at a time (micro_batch_size), as the trainer cuts them
    count = TokensPerForward(rm.trunk)
    by_rows = rm.score(batch, micro_batch_size=5, packing=packing)
    count.close()
    assert torch.allclose(by_rows, whole_rewards, atol=TOL, rtol=0)
    assert max(count.calls) <= 5 * T and len(count.calls) > 1


@pytest.mark.parametrize("kind", ["gpt_mini", "hf_qwen2"])
@pytest.mark.parametrize("packing", [False, True])
def test_prm_step_scores_in_micro_batches_of_the_token_budget(kind, packing):
    prm = with_head(ProcessRewardModel, kind)
    batch = scorer_batch(vocab_of(kind))
    P = batch.prompt_width
    prompts = [[t for t, m in zip(r, a) if m] for r, a in zip(batch.input_ids[:, :P].tolist(),
                                                              batch.attention_mask[:, :P].tolist())]
    responses = [r[:n] for r, n in zip(batch.input_ids[:, P:].tolist(), batch.response_mask.sum(1).tolist())]
    ends = [sorted({0, len(r) // 2, len(r) - 1}) for r in responses]  # two or three steps a response
    whole = prm.step_scores(prompts, responses, ends, pad_id=0)
    T = P + max(map(len, responses))
    budget = 3 * T
    count = TokensPerForward(prm.trunk)
    scores = prm.step_scores(prompts, responses, ends, pad_id=0, micro_batch_tokens=budget, packing=packing)
    count.close()
    assert [len(s) for s in scores] == [len(e) for e in ends]
    flat, flat_whole = torch.tensor(sum(scores, [])), torch.tensor(sum(whole, []))
    assert torch.allclose(flat, flat_whole, atol=TOL, rtol=0), (flat - flat_whole).abs().max()
    assert len(count.calls) > 1 and max(count.calls) <= budget, count.calls


# ---------------------------------------------------------------------------- the offloaded reference

def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("kind", ["gpt_mini", "hf_qwen2"])
@pytest.mark.parametrize("packing", [False, True])
def test_offloaded_reference_streams_one_block_at_a_time_and_scores_the_same(kind, packing):
    from rlpost.config import TrainerConfig
    from rlpost.reference import Reference

    policy = trunk(kind)
    batch = scorer_batch(vocab_of(kind))
    cfg = TrainerConfig(micro_batch_tokens=3 * batch.input_ids.shape[1], packing=packing)
    plain = Reference(policy, cfg)(batch).ref_logp
    ref = Reference(policy, cfg, offload=True)
    off = ref.offload
    homes = {id(t): t.data_ptr() for t in (*ref.model.parameters(), *ref.model.buffers())}
    blocks = transformer_blocks(ref.model)
    root = tensor_bytes(off.root)
    largest_block = max(tensor_bytes([*b.parameters(), *b.buffers()]) for b in blocks)
    seen = []  # (block, bytes on the device) inside each block's forward

    def inside(i):
        return lambda m, args, *rest: seen.append((i, off.device_bytes())) and None

    for i, b in enumerate(blocks):
        b.register_forward_pre_hook(inside(i))
    streamed = ref(batch).ref_logp
    assert torch.equal(streamed, plain)  # the same weights, the same kernels: bit for bit
    assert {i for i, _ in seen} == set(range(len(blocks)))
    # while a block runs, the device holds the root (embeddings, norm, head) and that block alone
    assert all(root < b <= root + largest_block for _, b in seen), (seen, root, largest_block)
    assert off.device_bytes() == 0 and not off.home  # nothing left on the device between forwards
    # the CPU copies are back in place (the same storage: nothing was copied back)
    assert all(t.data_ptr() == homes[id(t)] for t in (*ref.model.parameters(), *ref.model.buffers()))


def test_offload_is_refused_where_there_is_nothing_to_offload(tmp_path):
    from rlpost.config import ConfigError, load_config
    from rlpost.reference import Reference

    with pytest.raises(ConfigError, match=r"reference.offload.*model.device=cpu: nothing to offload to"):
        load_config(None, ["reference.offload=true", "model.device=cpu"])
    with pytest.raises(ConfigError, match=r"reference.offload.*model.lora"):
        load_config(None, ["reference.offload=true", "model.lora.r=4", "model.device=cuda"])
    with pytest.raises(ConfigError, match=r"reference.offload.*trainer.strategy=fsdp2"):
        load_config(None, ["reference.offload=true", "model.device=cuda", "trainer.strategy=fsdp2",
                           "rl.weight_sync=copy"])
    assert load_config(None, ["reference.offload=true", "model.device=cuda"]).reference.offload
    assert not load_config(None, []).reference.offload
    from rlpost.models.lora import apply_lora

    lora = apply_lora(trunk("gpt_mini"), r=4, alpha=8.0, dropout=0.0, target_modules=["c_attn"])
    with pytest.raises(ValueError, match="nothing to offload"):  # the LoRA policy is its own reference
        Reference(lora, offload=True)


def test_offload_on_a_machine_without_a_gpu_is_refused_when_the_rl_stage_starts(tmp_path):
    """model.device=auto resolves to the CPU here: the RL stage refuses the offload before its first step."""
    from rlpost.config import load_config
    from rlpost.run import train

    if torch.cuda.is_available():
        pytest.skip("model.device=auto resolves to the GPU here")
    cfg = load_config(None, [f"out_dir={tmp_path}", "reference.offload=true", "stages=[rl]", "rl.steps=1",
                             "model.n_layer=1", "model.n_embd=16", "model.n_head=2", "rollout.prompts_per_step=2",
                             "rollout.k=2", "task.num_eval=4", "threads=1"])
    with pytest.raises(ValueError, match=r"reference.offload: the policy runs on the CPU.*nothing to offload to"):
        train(cfg)


@pytest.mark.cuda
def test_offloaded_reference_on_a_gpu_keeps_its_weights_pinned_on_the_cpu():
    """The real streaming path: CPU-pinned weights, each block copied to the GPU for its forward and dropped after;
    the same ref_logp as a copy that lives on the GPU, and no reference weight left on the GPU between calls."""
    from rlpost.config import TrainerConfig
    from rlpost.reference import Reference

    policy = trunk("hf_qwen2").cuda()
    batch = scorer_batch(vocab_of("hf_qwen2"))
    cfg = TrainerConfig(micro_batch_size=4)
    resident = Reference(policy, cfg)
    expected = resident(batch).ref_logp
    del resident
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    ref = Reference(policy, cfg, offload=True)
    assert torch.cuda.memory_allocated() == before  # the copy went to the CPU
    assert all(p.device.type == "cpu" and p.is_pinned() for p in ref.model.parameters())
    got = ref(batch).ref_logp
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert got.device == batch.input_ids.device
    assert all(p.device.type == "cpu" for p in ref.model.parameters()) and ref.offload.device_bytes() == 0
