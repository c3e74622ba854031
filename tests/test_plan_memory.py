"""`rlpost plan memory` (rlpost/plan/memory.py) checked against things it did not compute itself: parameter
counts of real models built from a config, published parameter counts, hand arithmetic, and bytes measured
on the CPU (AdamW state after one step; the KV cache the native engines allocate)."""

import json

import pytest
import torch

from rlpost.cli import main
from rlpost.models.gpt_mini import GPT, GPTConfig
from rlpost.plan.memory import (DENSE_MODEL_TYPES, ModelShape, Setup, activation_bytes, estimate, kv_cache_bytes,
                                plan, plan_inputs, shape_for, shape_from_config, training_state_bytes)

GiB = 2 ** 30


def hf_model(kind: str, tied: bool, **kw):
    """A tiny Llama or Qwen2 built from a config (nothing downloaded), fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    Config, Model = (LlamaConfig, LlamaForCausalLM) if kind == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    cfg = Config(vocab_size=97, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=112, max_position_embeddings=128, tie_word_embeddings=tied, **kw)
    torch.manual_seed(0)
    return Model(cfg)


def real_count(model) -> int:
    return sum(p.numel() for p in model.parameters())  # a tied weight is one parameter


# ---------------------------------------------------------------------------------------------- parameters

@pytest.mark.parametrize("kind,tied,kw", [("llama", False, {}), ("llama", True, {}), ("qwen2", False, {}),
                                          ("qwen2", True, {}), ("llama", False, {"attention_bias": True,
                                                                                 "mlp_bias": True})])
def test_param_count_equals_real_hf_model(tmp_path, kind, tied, kw):
    model = hf_model(kind, tied, **kw)
    model.config.save_pretrained(tmp_path)          # config.json, as a model folder has it
    shape = shape_for(str(tmp_path))
    assert shape.num_kv_heads == 2 and shape.tie_word_embeddings == tied
    assert shape.num_params() == real_count(model)


def test_param_count_equals_gpt_mini(tmp_path):
    model = GPT(GPTConfig(vocab_size=40, block_size=48, n_layer=3, n_head=4, n_embd=64))
    model.save_pretrained(tmp_path)
    shape = shape_for(str(tmp_path))
    assert shape.num_params() == model.num_params() == real_count(model)
    assert shape.num_kv_heads == shape.num_heads == 4


def test_named_sizes_match_published_counts():
    """Exact totals of the published checkpoints (the sum of their safetensors' tensor sizes)."""
    assert shape_for("llama2-7b").num_params() == 6_738_415_616
    assert shape_for("8b").num_params() == 8_030_261_248          # Llama-3.1-8B
    assert shape_for("7b").num_params() == 7_615_616_512          # Qwen2.5-7B
    assert shape_for("0.5b").num_params() == 494_032_768          # Qwen2.5-0.5B (tied)
    with pytest.raises(ValueError, match="unknown model"):
        shape_for("no-such-model")


# ---------------------------------------------------------------------------------------------- hand arithmetic

def test_18_bytes_per_param_and_sharding():
    state = training_state_bytes(7_000_000_000, "mixed")
    # 2 bf16 weights + 2 bf16 grads + 4 fp32 master + 4 Adam m + 4 Adam v + 2 buffers = 18
    assert sorted(v for k, v in state.items() if k != "total") == sorted(7e9 * b for b in (2, 2, 4, 4, 4, 2))
    assert state["total"] == 126e9                                # 7e9 * 18 = 126 GB
    assert training_state_bytes(7_000_000_000, "fp32")["total"] == 112e9        # 16 B/param
    assert training_state_bytes(7_000_000_000, "mixed", shards=8)["total"] == 126e9 / 8


def test_kv_cache_hand_arithmetic():
    llama2 = shape_for("llama2-7b")   # 32 layers, 32 heads of 128, MHA
    assert kv_cache_bytes(llama2, 4096, 1, 2) == 2 * GiB          # 2*32*32*128*4096*2 bytes
    qwen = shape_for("7b")            # 28 layers, 28 heads, 4 KV heads of 128
    assert kv_cache_bytes(qwen, 1000, 3, 2) == 2 * 28 * 4 * 128 * 1000 * 3 * 2
    assert kv_cache_bytes(qwen, 1000, 3, 2, kv_heads=28) == 7 * kv_cache_bytes(qwen, 1000, 3, 2)  # MHA = 7x GQA
    assert kv_cache_bytes(qwen, 1000, 3, 2, kv_heads=1) * 4 == kv_cache_bytes(qwen, 1000, 3, 2)   # MQA


def test_activation_formula():
    shape = ModelShape("gpt", hidden_size=1024, num_layers=24, num_heads=16, num_kv_heads=16,
                       intermediate_size=4096, vocab_size=50000, tie_word_embeddings=True)
    s, b, h, a = 2048, 2, 1024, 16
    full = activation_bytes(shape, s, b, flash_attention=False)
    assert full["per_layer"] == s * b * h * (34 + 5 * a * s / h)  # Korthikanti et al., 16-bit
    assert activation_bytes(shape, s, b)["per_layer"] == 34 * s * b * h
    ckpt = activation_bytes(shape, s, b, checkpointing=True)
    assert ckpt["layers"] == 24 * 2 * s * b * h + 34 * s * b * h
    assert full["logits"] == 4 * s * b * 50000


def test_7b_on_8x80gb():
    """The worked case of docs/planning.md: Qwen2.5-7B, colocated on 8 x 80 GB, terms added by hand."""
    N = 7_615_616_512
    est = estimate(shape_for("7b"), Setup(gpus=8, gpu_memory_gb=80))
    terms = {t.name: t.per_gpu for t in est.terms}
    assert terms["policy: training state"] == N * 18 / 8
    assert terms["reference"] == N * 2 / 8
    assert terms["rollout: weights"] == N * 2                                # one engine per GPU, full weights
    assert terms["rollout: KV cache"] == 2 * 28 * 4 * 128 * 4096 * 8 * 2     # 64 sequences over 8 engines
    assert est.peak == pytest.approx(sum(terms.values())) and est.fits
    ppo = estimate(shape_for("7b"), Setup(gpus=8, gpu_memory_gb=80, critic=True, reward_model=True))
    assert ppo.peak - est.peak == pytest.approx(N * 18 / 8 + N * 2 / 8)      # + critic state + reward model


def test_disaggregated_places_rollout_on_its_own_gpus():
    est = estimate(shape_for("7b"), Setup(gpus=8, topology="disaggregated", rollout_gpus=2))
    assert (est.trainer_gpus, est.rollout_gpus) == (6, 2)
    N = est.params
    kv = 2 * 28 * 4 * 128 * 4096 * 32 * 2                                    # 64 sequences over 2 engines
    assert est.per_gpu["rollout"] == pytest.approx(N * 2 + kv)
    assert est.per_gpu["trainer"] == pytest.approx(N * 18 / 6 + N * 2 / 6
                                                   + activation_bytes(shape_for("7b"), 4096, 1)["total"])



@pytest.mark.parametrize("flags,says", [
    (["--gpus", "2", "--rollout-tp", "4"], "--rollout-tp 4: one engine spans 4 GPUs, more than the 2 rollout"),
    (["--gpus", "4", "--topology", "disaggregated", "--rollout-gpus", "1", "--rollout-tp", "2"], "more than the 1 "),
    (["--gpus", "2", "--rollout-gpus", "1"], "needs --topology disaggregated or async"),
])
def test_zero3_refuses_a_placement_that_cannot_exist(capsys, flags, says):
    """An engine wider than the rollout GPUs (its weights were divided by a TP size no engine had), or rollout GPUs
    under colocated (silently ignored): exit 2 naming the flag."""
    assert main(["plan", "memory", "7b", "--layout", "zero3", *flags]) == 2
    assert says in capsys.readouterr().err

def test_suggestions_when_it_does_not_fit():
    est = estimate(shape_for("70b"), Setup(gpus=8, critic=True))
    assert not est.fits and est.suggestions
    saves = [s["saves_gb"] for s in est.suggestions if not s["change"].startswith("together")]
    assert saves == sorted(saves, reverse=True) and all(s > 0 for s in saves)
    critic = next(s for s in est.suggestions if s["change"].startswith("no critic"))
    assert critic["saves_gb"] * 1e9 == pytest.approx(est.params * 18 / 8)
    assert est.suggestions[-1]["change"].startswith("together") and est.suggestions[-1]["fits"]


# ---------------------------------------------------------------------------------------------- measured on the CPU

def measured_training_state(model) -> int:
    """Bytes of the parameters, their gradients and AdamW's state after one step (tensors, not RSS)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    params = list(model.parameters())           # unique: a tied weight once
    loss = sum((p.float() ** 2).sum() for p in params)
    loss.backward()
    opt.step()
    state = [t for st in opt.state.values() for t in st.values() if torch.is_tensor(t)]
    return sum(p.nbytes for p in params) + sum(p.grad.nbytes for p in params) + sum(t.nbytes for t in state)


@pytest.mark.parametrize("which,dtype,precision", [("gpt_mini", torch.float32, "fp32"),
                                                   ("llama", torch.float32, "fp32"),
                                                   ("llama", torch.bfloat16, "bf16")])
def test_training_state_matches_measured(tmp_path, which, dtype, precision):
    if which == "gpt_mini":
        model = GPT(GPTConfig(vocab_size=40, block_size=48, n_layer=3, n_head=4, n_embd=64))
        model.save_pretrained(tmp_path)
    else:
        model = hf_model("llama", False)
        model.config.save_pretrained(tmp_path)
    model = model.to(dtype)
    measured = measured_training_state(model)
    predicted = training_state_bytes(shape_for(str(tmp_path)).num_params(), precision)["total"]
    print(f"{which} {precision}: measured {measured:,} B, predicted {predicted:,.0f} B, "
          f"ratio {predicted / measured:.6f}")
    # the only difference: AdamW's `step` counter, one 4-byte scalar per parameter tensor
    assert abs(predicted - measured) <= 0.10 * measured
    assert measured - predicted == 4 * len(list(model.parameters()))


class RecordingCache:
    """Wraps an engine's new_cache to keep every KV cache the scheduler allocates."""

    def __init__(self, engine):
        self.allocated, inner = [], engine.new_cache

        def new_cache(rows, S):
            kv = inner(rows, S)
            self.allocated.append(kv)
            return kv
        engine.new_cache = new_cache


def test_kv_cache_matches_native_engine_gpt_mini(tmp_path):
    from rlpost.models.gpt_mini import CharTokenizer
    from rlpost.rollout import SamplingParams
    from rlpost.rollout.native import NativeEngine

    tok = CharTokenizer("0123456789+=")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=3, n_head=4, n_embd=64)).eval()
    model.save_pretrained(tmp_path)
    engine = NativeEngine(model, tok)
    rec = RecordingCache(engine)
    prompts = [tok.encode_prompt(t) for t in ("1+2=", "47+85=", "9+99=")]      # P = 7 columns (with <bos>)
    engine.generate(prompts, 4, SamplingParams(max_new_tokens=10, temperature=1.0), seed=0)
    batch, seq = 3 * 4, 7 + 10
    largest = max(kv.nbytes for kv in rec.allocated)
    predicted = kv_cache_bytes(shape_for(str(tmp_path)), seq, batch, bytes_per=4)
    print(f"gpt_mini KV: measured {largest:,} B, predicted {predicted:,} B")
    assert largest == predicted


def test_kv_cache_matches_native_engine_llama_gqa(tmp_path):
    from conftest import train_tiny_tokenizer

    from rlpost.models import HFCausalLM, HFTokenizer
    from rlpost.rollout import SamplingParams
    from rlpost.rollout.hf_native import HFNativeEngine

    hf_tok = train_tiny_tokenizer(["1+2=3", "47+85=132", "The answer is 42."])
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(hf_tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=1, intermediate_size=96, max_position_embeddings=64,
                      bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id,
                      pad_token_id=hf_tok.pad_token_id)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg).eval()
    hf.config.save_pretrained(tmp_path)
    tok = HFTokenizer(hf_tok)
    engine = HFNativeEngine(HFCausalLM(hf), tok)
    rec = RecordingCache(engine)
    prompts = [tok.encode_prompt(t) for t in ("1+2=", "The answer is")]
    P = max(map(len, prompts))
    engine.generate(prompts, 3, SamplingParams(max_new_tokens=8, temperature=1.0), seed=0)
    largest = max(kv.nbytes for kv in rec.allocated)
    shape = shape_for(str(tmp_path))
    assert shape.num_kv_heads == 1
    predicted = kv_cache_bytes(shape, P + 8, 2 * 3, bytes_per=4)
    print(f"llama GQA KV: measured {largest:,} B, predicted {predicted:,} B")
    assert largest == predicted


# ---------------------------------------------------------------------------------------------- the command

def test_cli_table_and_json(capsys, tmp_path):
    """The generic ZeRO-3 estimate, now behind --layout zero3."""
    assert main(["plan", "memory", "7b", "--layout", "zero3", "--gpus", "8", "--gpu-memory-gb", "80"]) == 0
    out = capsys.readouterr().out
    assert "policy: training state" in out and "KV cache" in out and "FITS" in out
    assert main(["plan", "memory", "70b", "--layout", "zero3", "--gpus", "8", "--critic", "--reward-model",
                 "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["fits"] is False and d["params"] == shape_for("70b").num_params() and d["suggestions"]
    assert {t["name"] for t in d["terms"]} >= {"critic: training state", "reward model", "rollout: KV cache"}
    assert main(["plan", "memory", "no-such-model", "--layout", "zero3"]) == 2
    assert main(["plan", "memory", "7b", "--layout", "zero3", "--topology", "disaggregated", "--gpus", "1"]) == 2


# ---------------------------------------------------------------------------------------------- rlpost's layout

def rlpost_plan(*inputs, ranks=1, prompt_tokens=128, gpu_gb=80.0):
    from rlpost.plan.memory import plan, plan_inputs

    return plan(*plan_inputs(list(inputs), ranks, prompt_tokens, gpu_gb))


def term(p, name: str) -> float:
    return next(t.bytes for t in p.terms if t.name.startswith(name))


def test_rlpost_layout_shards_the_reference_and_keeps_the_engine_copy_full_on_every_fsdp2_rank():
    """What rlpost does under fsdp2: the policy's state and the reference are sharded, the engine's copy is not;
    the reference's forward gathers the root (embedding + head) and one block at a time."""
    N = 7_615_616_512
    p = rlpost_plan("7b", "trainer.strategy=fsdp2", "rl.weight_sync=copy", ranks=8)
    assert term(p, "policy weights") == N * 4 / 8 and term(p, "policy AdamW") == 2 * N * 4 / 8
    assert term(p, "reference (sharded)") == N * 4 / 8
    assert not any(t.name.startswith("reference (full") for t in p.terms)
    assert term(p, "engine copy (full, every rank)") == N * 4
    # Qwen2.5-7B: untied embedding and head 2 x 152,064 x 3,584, the final RMSNorm 3,584; 28 blocks
    root = 2 * 152_064 * 3_584 + 3_584
    assert term(p, "reference root + one block") == (root + (N - root) // 28) * 4
    half = rlpost_plan("7b", "trainer.strategy=fsdp2", "rl.weight_sync=copy", "model.dtype=bfloat16", ranks=8)
    assert term(half, "reference (sharded)") == N * 2 / 8 and term(half, "policy grads") == N * 2 / 8
    # one process, the default pointer sync: the engine reads the trainer's module, no copy; beta=0: no reference
    one = rlpost_plan("1.5b", "algorithm.beta=0")
    assert not any(t.name.startswith(("engine copy", "reference")) for t in one.terms)
    # LoRA: the reference is the base with adapters off; only the adapters have grads and AdamW state
    lora = rlpost_plan("1.5b", "model.lora.r=8")
    assert term(lora, "reference") == 0
    a = shape_for("1.5b").lora_params(8)
    assert term(lora, "policy grads + AdamW") == 3 * a * 4


def test_rlpost_layout_of_lora_under_fsdp2_is_what_a_rank_holds():
    """LoRA under fsdp2 (once refused at config load): the frozen base and the adapters' state sharded, no reference
    copy (the policy's own root and one block gathered to score it), a full engine copy of the base and adapters,
    no gradient for the frozen root, the embedding or the head."""
    N, R, B = 7_615_616_512, 8, 4
    a = shape_for("7b").lora_params(16)
    root = 2 * 152_064 * 3_584 + 3_584
    block = (N - root) // 28
    p = rlpost_plan("7b", "trainer.strategy=fsdp2", "rl.weight_sync=copy", "model.lora.r=16", ranks=R)
    assert term(p, "policy weights") == (N + a) * B / R
    assert term(p, "policy grads + AdamW") == 3 * a * B / R
    assert term(p, "reference") == 0
    assert term(p, "engine copy") == (N + a) * B
    assert term(p, "policy root + one block (adapters off)") == (root + block) * B
    assert term(p, "fsdp2 gathers") == (root + block + a // 28) * B
    assert term(p, "fsdp2 root") == root * B
    assert not any(t.name.startswith(("embedding gradient", "reference root")) for t in p.terms)
    assert term(p, "log-prob head backward") == 4 * (p.job.logprob_chunk or max(16, (1 << 25) // 152_064)) \
        * 152_064 * 4  # four [chunk, V] fp32 buffers, and no fp32 head gradient (the head is frozen)
    full = rlpost_plan("7b", "trainer.strategy=fsdp2", "rl.weight_sync=copy", ranks=R)
    assert p.peak < full.peak


def test_rlpost_layout_phases_and_formulas():
    """The peak is what is held plus the largest phase; the KV cache and activations follow the config's keys."""
    s = shape_for("1.5b")
    p = rlpost_plan("1.5b", "rollout.prompts_per_step=4", "rollout.k=2", "rollout.max_new_tokens=100",
                    prompt_tokens=28)
    assert term(p, "KV cache") == 2 * s.num_layers * s.num_kv_heads * s.dim * 128 * 8 * 4
    held = sum(t.bytes for t in p.terms if t.phase == "held")
    phases = {}
    for t in p.terms:
        if t.phase != "held":
            phases[t.phase] = phases.get(t.phase, 0) + t.bytes
    assert p.peak == held + max(phases.values()) and p.peak_phase == max(phases, key=phases.get)
    capped = rlpost_plan("1.5b", "rollout.prompts_per_step=4", "rollout.k=2", "rollout.max_new_tokens=100",
                         "rollout.max_num_seqs=2", prompt_tokens=28)
    assert term(capped, "KV cache") == term(p, "KV cache") / 4
    mb = rlpost_plan("1.5b", "rollout.prompts_per_step=4", "rollout.k=2", "trainer.micro_batch_size=2")
    whole = rlpost_plan("1.5b", "rollout.prompts_per_step=4", "rollout.k=2")
    assert term(whole, "activations") == 4 * term(mb, "activations")
    # the reference scores in the same micro-batches: 2 of the 8 rows of 134 tokens (128 prompt + 6) per forward,
    # and micro_batch_tokens caps a padded micro-batch's rows x S (300 // 134 = 2 rows)
    per = 3 * 1536 + 1536 + 2 * 256 + 3 * 8960
    assert term(mb, "reference forward") == 2 * 134 * per * 4 and term(whole, "reference forward") == 8 * 134 * per * 4
    capped = rlpost_plan("1.5b", "rollout.prompts_per_step=4", "rollout.k=2", "trainer.micro_batch_tokens=300",
                         "trainer.packing=false")
    assert term(capped, "reference forward") == 2 * 134 * per * 4
    # packing=auto (the default) may pack any batch: planned at the packed budget, which bounds the padded rows'
    auto = rlpost_plan("1.5b", "rollout.prompts_per_step=4", "rollout.k=2", "trainer.micro_batch_tokens=300")
    assert term(auto, "reference forward") == 300 * per * 4
    ckpt = rlpost_plan("1.5b", "rollout.prompts_per_step=4", "rollout.k=2", "trainer.gradient_checkpointing=true")
    assert term(ckpt, "activations") < term(whole, "activations") / 4
    for t in p.terms:
        assert t.formula, t.name


def test_rlpost_layout_suggests_only_settings_that_exist():
    """Each suggestion is an override `rlpost train` accepts (or more ranks), and the one that fits does fit."""
    from rlpost.config import load_config

    p = rlpost_plan("7b", "trainer.strategy=fsdp2", "rl.weight_sync=copy", "rollout.max_new_tokens=8192", ranks=8)
    assert not p.fits and p.suggestions
    for s in p.suggestions:
        for change in s["change"].removeprefix("smallest change that fits: ").split():
            if "=" in change:
                load_config(None, [change])  # raises ConfigError for a key rlpost does not have
            elif change.startswith("--"):
                assert change == "--ranks", s
    assert not any("offload" in s["change"] for s in p.suggestions)  # refused with fsdp2 (the reference is sharded)


# Qwen2.5-1.5B by hand: N = 1,543,714,304; the root (tied embedding and head 151,936 x 1,536, final RMSNorm 1,536)
# 233,375,232; one block: q 1,536^2 + 1,536, k and v 1,536 x 256 + 256 each, o 1,536^2, MLP 3 x 1,536 x 8,960,
# two RMSNorms 2 x 1,536 = 46,797,824 (and root + 28 blocks = N)
N_15B, ROOT_15B, BLOCK_15B = 1_543_714_304, 233_375_232, 46_797_824


def test_rlpost_layout_reference_in_bf16_offloaded_and_under_lora():
    assert ROOT_15B + 28 * BLOCK_15B == N_15B
    fp32 = rlpost_plan("1.5b")
    assert term(fp32, "reference (full copy)") == N_15B * 4 and term(fp32, "policy weights") == N_15B * 4
    # trainer.precision=bf16: the policy keeps fp32 master weights, the reference is stored in bf16
    bf16 = rlpost_plan("1.5b", "trainer.precision=bf16")
    assert term(bf16, "reference (full copy)") == N_15B * 2 and term(bf16, "policy weights") == N_15B * 4
    assert "bf16 copy" in next(t.formula for t in bf16.terms if t.name.startswith("reference (full"))
    # reference.offload: 0 bytes held on the GPU; its forward streams the root and one block at a time
    off = rlpost_plan("1.5b", "trainer.precision=bf16", "reference.offload=true", "model.device=cuda")
    assert term(off, "reference (offloaded)") == 0
    assert term(off, "reference root + one block") == (ROOT_15B + BLOCK_15B) * 2
    assert off.peak < bf16.peak
    assert not any(t.name.startswith("reference root") for t in bf16.terms)  # a resident copy streams nothing
    # LoRA: the base with the adapters off, nothing held and nothing streamed
    lora = rlpost_plan("1.5b", "model.lora.r=8", "trainer.precision=bf16")
    assert term(lora, "reference") == 0 and not any(t.name.startswith("reference root") for t in lora.terms)


def test_rlpost_layout_suggests_the_offload_only_where_the_run_takes_it():
    from rlpost.config import load_config

    big = ["rollout.max_new_tokens=4096", "rollout.prompts_per_step=64"]
    p = rlpost_plan("7b", *big, "model.device=cuda", gpu_gb=40.0)
    offload = [s for s in p.suggestions if s["change"] == "reference.offload=true"]
    assert not p.fits and len(offload) == 1
    assert offload[0]["saves_gb"] > 0
    load_config(None, ["reference.offload=true", "model.device=cuda"])  # a setting `rlpost train` accepts there
    for refused in (["model.device=cpu"], ["model.lora.r=16", "model.device=cuda"], ["reference.offload=true"]):
        q = rlpost_plan("7b", *big, *refused, gpu_gb=40.0)
        assert not any("offload" in s["change"] for s in q.suggestions), refused


def test_rlpost_layout_plans_packing_keys_ahead_and_refuses_bad_ranks(capsys):
    whole = rlpost_plan("1.5b", "rollout.max_new_tokens=1024")
    packed = rlpost_plan("1.5b", "rollout.max_new_tokens=1024", "trainer.packing=true",
                         "trainer.micro_batch_tokens=2048")
    assert term(packed, "activations") < term(whole, "activations")
    assert "2,048 (trainer.micro_batch_tokens)" in next(t.formula for t in packed.terms
                                                         if t.name.startswith("reference forward"))
    assert main(["plan", "memory", "1.5b", "--ranks", "2"]) == 2
    assert "trainer.strategy=fsdp2" in capsys.readouterr().err
    assert main(["plan", "memory", "1.5b", "trainer.no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err


def test_rlpost_layout_is_the_default_and_reads_recipes(capsys):
    assert main(["plan", "memory", "7b", "trainer.strategy=fsdp2", "--ranks", "8", "rl.weight_sync=copy"]) == 0
    out = capsys.readouterr().out
    assert "reference (sharded)" in out and "formula" in out and "DOES NOT FIT" in out
    assert main(["plan", "memory", "recipes/default.yaml", "--json"]) == 0  # gpt_mini, its vocabulary from the task
    d = json.loads(capsys.readouterr().out)
    assert d["model"] == "gpt_mini" and d["fits"] is True


def test_shape_from_config_dict_keys():
    """config.json without num_key_value_heads (older Llama) means MHA."""
    shape = shape_from_config({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
                               "num_attention_heads": 4, "intermediate_size": 96, "vocab_size": 50})
    assert shape.num_kv_heads == 4 and not shape.tie_word_embeddings


DENSE = dict(vocab_size=1000, hidden_size=256, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=512, max_position_embeddings=2048, pad_token_id=0, bos_token_id=1, eos_token_id=1)


@pytest.mark.parametrize("model_type", DENSE_MODEL_TYPES)
def test_every_planned_model_type_counts_within_a_tenth_of_a_percent(model_type):
    """Each model_type the plan accepts, built by transformers from the same sizes on the meta device: the
    formula's count is exact, or short by the small per-layer norms it leaves out (qwen3's q/k norms)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, **DENSE)
    with torch.device("meta"):
        real = real_count(AutoModelForCausalLM.from_config(cfg))
    assert shape_from_config(cfg.to_dict()).num_params() == pytest.approx(real, rel=1e-3)


@pytest.mark.parametrize("config,says", [
    ({**DENSE, "model_type": "qwen2_moe", "num_experts": 60, "moe_intermediate_size": 1408}, "mixture of experts"),
    ({**DENSE, "model_type": "mixtral", "num_local_experts": 8}, "num_local_experts=8"),
    ({**DENSE, "model_type": "deepseek_v3", "n_routed_experts": 64}, "mixture of experts"),
    ({**DENSE, "model_type": "phi"}, "model_type 'phi' is not one"),       # counted as Llama: +20 %
    ({"model_type": "llava", "text_config": {**DENSE, "model_type": "llama"}}, "multimodal"),
    ({k: v for k, v in DENSE.items() if k != "hidden_size"} | {"model_type": "llama"}, "no 'hidden_size'"),
    ({**DENSE, "model_type": "llama", "num_hidden_layers": 0}, "'num_hidden_layers' must be a whole number >= 1"),
    ({**DENSE, "model_type": "llama", "hidden_size": -5}, "'hidden_size' must be a whole number >= 1, got -5"),
    ({**DENSE, "model_type": "llama", "vocab_size": "150000"}, "'vocab_size' must be a whole number"),
    ({**DENSE, "model_type": "llama", "num_key_value_heads": 3}, "not a multiple of num_key_value_heads 3"),
    ({**DENSE, "model_type": "llama", "hidden_size": 250}, "not a multiple of num_attention_heads 4"),
    ({"n_embd": 64, "n_layer": 0, "n_head": 4, "vocab_size": 50, "n_positions": 32}, "'n_layer' must be"),
    ("{not json", "not valid JSON"),
])
def test_a_config_the_plan_cannot_count_is_refused_naming_the_file_and_the_key(tmp_path, capsys, config, says):
    """A mixture of experts (planned as dense it lost 78-99 % of its parameters), a layout the formulas do not
    count, a multimodal config, a missing key, a size that is not a whole number >= 1 (0 layers was a
    ZeroDivisionError), heads that do not divide: exit 2 with the file and the key, never a table or a traceback."""
    path = tmp_path / "config.json"
    path.write_text(config if isinstance(config, str) else json.dumps(config))
    assert main(["plan", "memory", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and says in err, err
    assert main(["plan", "memory", f"model.name={tmp_path}"]) == 2  # as the config's model, the same answer
    assert says in capsys.readouterr().err


def saved_bytes_of_one_block(model: GPT, s: int, b: int) -> int:
    """Bytes autograd saves for the backward during one transformer block's forward (distinct storages)."""
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
        return t

    x = torch.randn(b, s, model.config.n_embd, requires_grad=True)
    mask = torch.ones(s, s, dtype=torch.bool).tril()[None, None]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.transformer.h[0](x, mask, None, 0)
    return sum(seen.values())


@pytest.mark.parametrize("s,b,h,heads", [(128, 2, 128, 4), (256, 1, 128, 8)])
def test_activation_estimate_vs_saved_tensors(tmp_path, s, b, h, heads):
    """What autograd saves in one gpt_mini block (fp32, eager, CPU) against the per-layer formula with flash
    attention, doubled for fp32. torch's CPU attention keeps no s x s matrix (a*s/h 4 -> 16 changes the
    measured bytes by a few %, the no-flash formula would double), so the flash variant is the one that
    applies; eager PyTorch keeps a few more copies than the formula counts (contiguous q/k/v for attention,
    its output, no dropout masks): measured/predicted is 1.33-1.42 here. The tolerance says so: 1.0-1.5."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=40, block_size=s, n_layer=2, n_head=heads, n_embd=h))
    model.save_pretrained(tmp_path)
    measured = saved_bytes_of_one_block(model, s, b)
    predicted = activation_bytes(shape_for(str(tmp_path)), s, b, flash_attention=True, bytes_per=4)["per_layer"]
    print(f"activations per layer s={s} b={b} h={h} a={heads}: measured {measured:,} B, predicted "
          f"{predicted:,.0f} B, measured/predicted {measured / predicted:.3f}")
    assert 1.0 <= measured / predicted <= 1.5


@pytest.mark.parametrize("which", ["llama", "gpt_mini"])
def test_lora_params_equal_peft_adapters(which):
    """r*(in+out) per adapted matrix, against the adapters peft injects on every linear layer of each block."""
    peft = pytest.importorskip("peft")
    if which == "llama":
        model = hf_model("llama", False)
        shape = shape_from_config(model.config.to_dict())
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    else:
        model = GPT(GPTConfig(vocab_size=40, block_size=48, n_layer=3, n_head=4, n_embd=64))
        shape = shape_from_config(model.hf_config())
        targets = ["c_attn", "c_proj", "c_fc"]
    peft.inject_adapter_in_model(peft.LoraConfig(r=8, target_modules=targets), model)
    adapters = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert shape.lora_params(8) == adapters



@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["o_proj", "down_proj", "gate_proj"]])
def test_the_plan_counts_the_adapters_of_model_lora_target_modules_only(tmp_path, targets):
    """model.lora.target_modules picks the adapted matrices: the plan counted adapters on all seven whatever it
    said (8x the adapters of q_proj and v_proj on Qwen2.5-7B)."""
    peft = pytest.importorskip("peft")
    model = hf_model("llama", False)
    model.config.save_pretrained(tmp_path)
    peft.inject_adapter_in_model(peft.LoraConfig(r=8, target_modules=targets), model)
    adapters = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    shape, job = plan_inputs([str(tmp_path), "model.lora.r=8", f"model.lora.target_modules=[{','.join(targets)}]"])
    assert shape.lora_params(8, targets) == adapters
    terms = {t.name: t.bytes for t in plan(shape, job, suggest=False).terms}
    assert terms["policy grads + AdamW m, v"] == 3 * adapters * 4
    assert terms["policy weights"] == real_count(model) * 4  # the base and its adapters



def test_lora_target_modules_that_name_no_matrix_are_refused(capsys):
    """`rlpost train` refuses target_modules that match none of the model's linear layers; the plan planned them
    as zero adapters."""
    assert main(["plan", "memory", "7b", "model.lora.r=8", "model.lora.target_modules=[qproj]"]) == 2
    assert "names none of Qwen2.5-7B's weight matrices" in capsys.readouterr().err


def test_a_subtracted_term_prints_in_gb_and_a_sequence_past_the_context_is_noted(capsys):
    """Qwen2.5-7B, fp32, one process: the held gradients, 30.5 GB, are subtracted in the train phase (printed as
    -3.05e+04 MB before). 32,768 + 32,768 tokens is past its context of 32,768, which `rlpost train` refuses: the
    plan says so; 1,024 + 31,744 fits the context and gets no note."""
    assert main(["plan", "memory", "7b", "--prompt-tokens", "32768", "rollout.max_new_tokens=32768"]) == 0
    out = capsys.readouterr().out
    assert "-30.5 GB" in out and "e+04 MB" not in out
    assert "65536 tokens, longer than Qwen2.5-7B's context of 32768" in out
    assert main(["plan", "memory", "7b", "--prompt-tokens", "1024", "rollout.max_new_tokens=31744"]) == 0
    assert "context" not in capsys.readouterr().out


def test_a_vllm_engine_has_no_native_kv_cache_in_the_plan_and_a_note_says_what_is_left_out():
    """rollout.engine=vllm: vLLM's weights and KV cache live in its own reservation (gpu_memory_utilization); the
    plan used to add the native engine's KV cache and decode buffers, which that run never allocates."""
    native = plan(*plan_inputs(["0.5b", "rollout.engine=native"]), suggest=False)
    vllm = plan(*plan_inputs(["0.5b", "rollout.engine=vllm"]), suggest=False)
    assert "KV cache" in {t.name for t in native.terms}
    assert not [t for t in vllm.terms if t.phase == "rollout" or t.name.startswith("native engine")]
    assert any("vLLM reserves rollout.vllm_gpu_memory_utilization=0.3 of the GPU" in n for n in vllm.job.notes)
    half = plan(*plan_inputs(["0.5b", "rollout.engine=vllm", "rollout.vllm_gpu_memory_utilization=0.5"]),
                suggest=False)
    assert any("=0.5 of the GPU for them (40.0 GB of 80 GB)" in n for n in half.job.notes), half.job.notes

# ---------------------------------------------------------------------------------------------- against a real job

# two steps: AdamW's state exists from the first optimizer step on, so the second step trains beside it, as every
# later step of a run does (the plan counts it as held)
MEASURED_JOB = ["rl.steps=2", "rollout.prompts_per_step=2", "rollout.k=2", "rollout.max_new_tokens=32",
                "trainer.micro_batch_size=2", "sft.steps=0", "stages=[rl]", "rl.eval_every=0", "rl.save_every=0",
                "task.num_eval=4", "eval.samples_per_prompt=1", "model.device=cpu", "threads=1"]


@pytest.fixture(scope="module")
def qwen_42m(tmp_path_factory):
    """The 42.7 M-parameter random Qwen2 with V = 151,936 (hidden 256, 4 layers), and its longest prompt in tokens."""
    from transformers import AutoTokenizer

    from rlpost.models import HFTokenizer
    from rlpost.plan.measure import qwen_folder
    from rlpost.tasks.arithmetic import arithmetic_task

    folder = qwen_folder(str(tmp_path_factory.mktemp("qwen42m")))
    tok = HFTokenizer(AutoTokenizer.from_pretrained(folder))
    prompt_tokens = max(len(tok.encode_prompt(r["prompt"])) for r in arithmetic_task(num_eval=4).train_rows)
    return folder, prompt_tokens


def test_the_log_prob_heads_chunk_buffers_are_what_the_plan_counts():
    """The chunked head's peak RSS above where it starts, on chunks of 40 MB (above glibc's largest mmap threshold,
    32 MB, so each is mapped and unmapped on its own and the peak RSS counts exactly what is live): the plan's 3 chunk
    buffers for a forward, 4 and the head weight's fp32 gradient for a backward (the previous chunk's two are still
    referenced while the next chunk's are made)."""
    from rlpost.devices import reset_rss_peak, rss_peak_mib
    from rlpost.models.logprobs import chunked_logprobs
    from rlpost.plan.measure import rss_bytes
    from rlpost.plan.memory import logprob_head_bytes

    if not reset_rss_peak():
        pytest.skip("no writable /proc/self/clear_refs: the peak cannot be measured around one pass")
    V, h, c, n = 20000, 64, 500, 1000  # two chunks: the second is computed while the first is referenced
    torch.manual_seed(0)
    hid, w = torch.randn(n, h, requires_grad=True), (torch.randn(V, h) * 0.02).requires_grad_()
    t = torch.randint(0, V, (n,))
    with torch.no_grad():
        chunked_logprobs(hid[:c], w, t[:c], chunk=c)  # the kernels' first-call allocations, before measuring

    def peak(run) -> float:
        base = rss_bytes()
        assert reset_rss_peak()
        run()
        return rss_peak_mib() * 2 ** 20 - base

    with torch.no_grad():
        forward = peak(lambda: chunked_logprobs(hid, w, t, chunk=c, with_entropy=True))
    lp, ent = chunked_logprobs(hid, w, t, chunk=c, with_entropy=True)
    backward = peak(lambda: (lp.sum() + ent.sum()).backward())
    plan_forward = logprob_head_bytes(c, V, backward=False)
    plan_backward = logprob_head_bytes(c, V, backward=True) + V * h * 4
    print(f"\nhead forward: measured {forward / 1e6:.1f} MB, plan {plan_forward / 1e6:.1f} MB; backward: measured "
          f"{backward / 1e6:.1f} MB, plan {plan_backward / 1e6:.1f} MB")
    assert abs(plan_forward / forward - 1) <= 0.08 and abs(plan_backward / backward - 1) <= 0.08, (forward, backward)


def test_the_measured_peak_survives_the_per_role_resets_of_the_peak():
    """The run resets the kernel's peak RSS as each role starts (RoleProbe), which also lowers getrusage's peak; the
    measurement must still see a peak from an earlier role, and say which role it was."""
    from rlpost.devices import RoleProbe, reset_rss_peak
    from rlpost.plan.measure import PeakTracker, peak_rss_bytes, rss_bytes

    if not reset_rss_peak():
        pytest.skip("no writable /proc/self/clear_refs: the peak is never reset here")
    big = 300_000_000
    with PeakTracker() as tracker:
        base = rss_bytes()
        probe = RoleProbe("cpu")
        with probe.role("train"):
            x = torch.ones(big // 4)  # written, so resident
            del x
        with probe.role("sync"):
            pass
        after_reset = peak_rss_bytes()
    assert after_reset - base < big / 2  # what the kernel reports after the reset: the train role's peak is gone
    assert tracker.peak() - base >= 0.9 * big
    assert tracker.phases["train"] - base >= 0.9 * big and tracker.phases["sync"] - base < big / 2


# the 42.7 M job's shape (micro-batches of 8 rows x 262 tokens, more than one per optimizer step) at half its
# prompts and two of its three steps: its micro-batches hold more tokens than one log-prob head chunk
WIDE_JOB = [*MEASURED_JOB, "rollout.prompts_per_step=4", "rollout.k=4", "rollout.max_new_tokens=256",
            "trainer.micro_batch_size=8"]


@pytest.mark.slow
@pytest.mark.parametrize("ranks, shape", [(1, "small"), (2, "small"), (1, "wide")])
def test_plan_matches_the_measured_peak_of_a_real_job(qwen_42m, tmp_path, ranks, shape):
    """`rlpost train` on the CPU (1 process; 2 gloo ranks under torchrun with fsdp2): the plan's per-rank peak is
    within 15 % of the measured peak RSS above the process's baseline (the largest over the ranks)."""
    from rlpost.plan.measure import measure

    folder, prompt_tokens = qwen_42m
    job = [f"model.name={folder}", f"out_dir={tmp_path}", *(WIDE_JOB if shape == "wide" else MEASURED_JOB)]
    if ranks > 1:
        job += ["trainer.strategy=fsdp2", "rl.weight_sync=copy"]
    p = rlpost_plan(*job, ranks=ranks, prompt_tokens=prompt_tokens)
    assert 20e6 <= p.params <= 100e6 and shape_for(folder).vocab_size == 151936
    result = measure(job, ranks=ranks)
    measured = result["peak_above_baseline"]
    phases = max(result["ranks"], key=lambda r: r["peak_above_baseline"])["phases"]
    print(f"\n{shape} job, {ranks} rank(s): plan {p.peak / 1e9:.3f} GB ({p.peak_phase}), measured {measured / 1e9:.3f}"
          f" GB, plan / measured {p.peak / measured:.3f}; measured per role: "
          + ", ".join(f"{k} {v / 1e9:.3f}" for k, v in sorted(phases.items(), key=lambda kv: -kv[1])))
    assert abs(p.peak / measured - 1) <= 0.15, (p.peak, measured)


@pytest.mark.parametrize("args, flag", [
    (["memory", "0.5b", "--gpu-memory-gb", "nan"], "--gpu-memory-gb"),  # was a table of "nan GB", exit 0
    (["memory", "0.5b", "--gpu-memory-gb", "-5"], "--gpu-memory-gb"),
    (["memory", "0.5b", "--gpu-memory-gb", "1e300", "--json"], "--gpu-memory-gb"),  # printed "usable": Infinity
    (["memory", "0.5b", "--headroom", "2"], "--headroom"),
    (["memory", "0.5b", "--prompt-tokens", "-1"], "--prompt-tokens"),
    (["memory", "0.5b", "--layout", "zero3", "--batch", "-1"], "--batch"),
    (["memory", "0.5b", "--layout", "zero3", "--seq-len", "0"], "--seq-len"),
    (["throughput", "--model", "0.5b", "--gpus", "0"], "--gpus"),  # was a ZeroDivisionError
    (["throughput", "--model", "0.5b", "--k", "-1"], "--k"),  # was an IndexError
    (["throughput", "--model", "0.5b", "--mfu", "nan"], "--mfu"),
    (["throughput", "--model", "0.5b", "--mfu", "1.5"], "--mfu"),
])
def test_plan_flags_refuse_numbers_that_mean_nothing(args, flag, capsys):
    with pytest.raises(SystemExit) as e:
        main(["plan", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and "must be in" in err, err


def test_plan_flags_accept_their_boundary_values(capsys):
    assert main(["plan", "memory", "0.5b", "--headroom", "0", "--layout", "zero3", "--lora-rank", "0"]) == 0
    assert main(["plan", "throughput", "--model", "0.5b", "--gpus", "1", "--mfu", "1", "--verifier-s", "0"]) == 0
