"""The native HF engine on every family it covers (rlpost/rollout/families/), each a tiny random model built
from `transformers` with its differences made to matter: q/k norms (Qwen3, Gemma 3), sliding windows smaller
than the sequence (Mistral, Qwen3's upper layer, Gemma's local layers, Phi-3), soft-capped scores and logits
(Gemma 2 and 3), (1 + weight) norms and an embedding scale (Gemma), fused projections and partial rotary
(Phi-3), rope_type llama3 (Llama 3). Per family: greedy output equals `transformers.generate`; sampled
old_logp equals a fresh forward within 1e-5 in fp32 (per-row and shared-prompt attention, a shared prefix, capped and
uncapped batches); rollout.engine=auto picks it and says so; a few GRPO steps raise a simple reward.
And what a config may say that the model does not do (Gemma 3's attn_logit_softcapping) or the engine does
not (bidirectional attention), and a LoRA adapter on the LM head."""

import pytest
import torch

from conftest import encode, hf_greedy, train_tiny_tokenizer
from rlpost import get_algorithm
from rlpost.models import HFCausalLM, HFTokenizer, token_logprobs
from rlpost.models.lora import apply_lora
from rlpost.rollout import SamplingParams, build_engine, engine_choice
from rlpost.rollout.hf_native import HFNativeEngine
from rlpost.rollout.scheduler import shared_prefix_lengths

PROMPTS = ["1+2=", "47+85=", "9+99=", "The answer is"]
WINDOW = 5  # tokens: prompts of 3-6 tokens + 12 generated, so every windowed layer drops columns


@pytest.fixture(scope="module")
def tok():
    return train_tiny_tokenizer([f"{a}+{b}={a + b}" for a in range(60) for b in range(60)] + ["The answer is 42."])


def _config(name, tok):
    import transformers as tf

    common = dict(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                  initializer_range=0.1)  # logits and scores large enough for the soft-caps to bite
    if name == "llama3":
        return tf.LlamaForCausalLM, tf.LlamaConfig(**common, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8})
    if name == "mistral":
        return tf.MistralForCausalLM, tf.MistralConfig(**common, head_dim=16, sliding_window=WINDOW)
    if name == "qwen3":  # layer 0 full, layer 1 sliding; q/k norms on a head_dim (24) that is not hidden / heads
        return tf.Qwen3ForCausalLM, tf.Qwen3Config(**common, head_dim=24, use_sliding_window=True,
                                                   sliding_window=WINDOW, max_window_layers=1)
    if name == "gemma2":
        return tf.Gemma2ForCausalLM, tf.Gemma2Config(**common, head_dim=16, sliding_window=WINDOW,
                                                     query_pre_attn_scalar=32, attn_logit_softcapping=1.0,
                                                     final_logit_softcapping=2.0)
    if name == "gemma3":  # 3 layers: local, global, local (their RoPE bases differ too)
        return tf.Gemma3ForCausalLM, tf.Gemma3TextConfig(
            **{**common, "num_hidden_layers": 3}, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=32,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"], final_logit_softcapping=2.0)
    if name == "phi3":
        return tf.Phi3ForCausalLM, tf.Phi3Config(**common, partial_rotary_factor=0.5, sliding_window=WINDOW)
    raise KeyError(name)


FAMILIES = ["llama3", "mistral", "qwen3", "gemma2", "gemma3", "phi3"]


def build(name, tok, seed=0):
    cls, cfg = _config(name, tok)
    torch.manual_seed(seed)
    hf = cls(cfg)
    with torch.no_grad():  # norms start at 1 (Gemma: at 0, i.e. 1 + 0): make every norm weight count
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.3)
    return HFCausalLM(hf).eval(), HFTokenizer(tok)


@pytest.fixture(scope="module", params=FAMILIES)
def model(request, tok):
    return request.param, *build(request.param, tok)


@pytest.mark.parametrize("texts", [PROMPTS, ["12+34=", "56+78="]], ids=["left-padded", "no-padding"])
def test_greedy_equals_transformers_generate(model, texts):
    name, m, tok = model
    prompts = encode(tok, texts)
    params = SamplingParams(max_new_tokens=12, min_new_tokens=12, temperature=0.0)
    batch = HFNativeEngine(m, tok).generate(prompts, 2, params)
    P = max(map(len, prompts))
    want = hf_greedy(m, tok, prompts, 12, min_new_tokens=12)
    assert torch.equal(batch.input_ids[0::2, P:], want) and torch.equal(batch.input_ids[1::2, P:], want)


@pytest.mark.parametrize("mode,temperature", [("per-row", 1.0), ("shared-prompt", 0.7), ("max_num_seqs=3", 1.0),
                                              ("prefix-cache", 1.0)])
def test_sampled_old_logp_equals_a_fresh_forward(model, mode, temperature):
    name, m, tok = model
    engine = HFNativeEngine(m, tok)
    prompts = encode(tok, PROMPTS)
    if mode == "shared-prompt":
        engine.shared_attention_min = 1  # every prompt read from the shared table (windows mask it too)
    if mode == "prefix-cache":  # a shared leading block is prefilled once, in a pass of its own width
        engine.prefix_block = 4
        prompts = encode(tok, ["1+1=2 2+2=4 3+3=6 " + t for t in PROMPTS])
        assert min(shared_prefix_lengths(prompts, 4)) > WINDOW
    params = SamplingParams(max_new_tokens=12, temperature=temperature, max_num_seqs=3 if mode == "max_num_seqs=3"
                            else 0)
    batch = engine.generate(prompts, 4, params, seed=7)
    assert batch.response_mask.sum(1).max() > WINDOW  # the windows drop columns
    logp = token_logprobs(m, batch, temperature) * batch.response_mask
    assert (logp - batch.old_logp).abs().max() <= 1e-5


def test_auto_picks_the_native_engine_and_says_why(model, capsys):
    name, m, tok = model
    model_type = m.hf.config.model_type
    assert engine_choice(m) == ("native", f"native ({model_type})")
    assert isinstance(build_engine("auto", m, tok), HFNativeEngine)
    assert f"rollout.engine=auto: native ({model_type})" in capsys.readouterr().out


def test_auto_falls_back_to_hf_and_says_why(tok, capsys):
    from transformers import Phi3Config, Phi3ForCausalLM

    from rlpost.rollout.hf_generate import HFGenerateEngine

    cfg = Phi3Config(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=2, intermediate_size=64, pad_token_id=tok.pad_token_id,
                     max_position_embeddings=64, original_max_position_embeddings=32,
                     rope_parameters={"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                                      "rope_theta": 10000.0, "original_max_position_embeddings": 32})
    longrope = HFCausalLM(Phi3ForCausalLM(cfg))
    assert isinstance(build_engine("auto", longrope, HFTokenizer(tok)), HFGenerateEngine)
    assert "rollout.engine=auto: hf: model_type 'phi3': rope_type 'longrope'" in capsys.readouterr().out
    with pytest.raises(ValueError, match="rope_type 'longrope'.*rollout.engine=hf"):
        build_engine("native", longrope, HFTokenizer(tok))


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_a_few_grpo_steps_learn(name, tok):
    """GRPO on the native engine's samples raises the share of even token ids in the responses."""
    from rlpost.config import TrainerConfig
    from rlpost.trainer import Trainer

    m, htok = build(name, tok, seed=1)
    m.train()
    engine = build_engine("native", m, htok)  # pointer: it samples with the trainer's weights as they step
    algo = get_algorithm("grpo", beta=0.0)
    trainer = Trainer(m, TrainerConfig(lr=1e-2))
    prompts, params = encode(htok, PROMPTS), SamplingParams(max_new_tokens=6, min_new_tokens=6)

    def reward(batch):
        even = ((batch.input_ids % 2 == 0) & batch.response_mask.bool()).sum(1)
        return even.float() / batch.response_mask.sum(1).clamp(min=1)

    before = reward(engine.generate(prompts, 16, params, seed=1000)).mean()
    for step in range(8):
        batch = engine.generate(prompts, 8, params, seed=step)
        batch = algo.compute_advantages(batch.replace(rewards=reward(batch)))
        trainer.step(batch, algo.compute_loss)
    after = reward(engine.generate(prompts, 16, params, seed=1000)).mean()
    print(f"{name}: share of even tokens {float(before):.3f} -> {float(after):.3f}")
    assert after > before + 0.1, (float(before), float(after))  # ~4 sigma of the 384 tokens scored


def _old_logp_error(m, tok, seed=7):
    """max |old_logp - the trainer's log-probs| of a sampled batch (k=2, 12 tokens, temperature 1)."""
    batch = HFNativeEngine(m, tok).generate(encode(tok, PROMPTS), 2, SamplingParams(max_new_tokens=12), seed=seed)
    with torch.no_grad():
        return float(((token_logprobs(m, batch) - batch.old_logp) * batch.response_mask).abs().max())


def test_gemma3_attention_is_not_soft_capped_whatever_the_config_says(tok):
    """Gemma 3's attention never reads attn_logit_softcapping (transformers passes no softcap to its attention,
    eager or sdpa); an engine that capped its scores anyway sampled from another model than the trainer scores."""
    cls, cfg = _config("gemma3", tok)
    cfg.attn_logit_softcapping = 1.0  # small enough that capping the scores would move every log-prob
    torch.manual_seed(0)
    m, htok = HFCausalLM(cls(cfg)).eval(), HFTokenizer(tok)
    assert _old_logp_error(m, htok) <= 1e-5


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_bidirectional_gemma_stays_on_transformers_generate(name, tok):
    """use_bidirectional_attention (an encoder's attention, e.g. EmbeddingGemma) is not what the native engine
    computes: auto falls back to transformers.generate and says why; native refuses."""
    cls, cfg = _config(name, tok)
    cfg.use_bidirectional_attention = True
    m, htok = HFCausalLM(cls(cfg)), HFTokenizer(tok)
    assert engine_choice(m)[0] == "hf" and "use_bidirectional_attention" in engine_choice(m)[1]
    with pytest.raises(ValueError, match="use_bidirectional_attention.*rollout.engine=hf"):
        build_engine("native", m, htok)


@pytest.mark.parametrize("name", ["llama3", "gemma2", "phi3"])  # one per family file; Gemma 2's head is tied
@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")  # peft's, on Gemma 2
def test_a_lora_adapter_on_the_lm_head_is_sampled_with(name, tok):
    """model.lora.target_modules may name lm_head (an nn.Linear): the engine reads the head as its merged
    weight too, as every other projection, so old_logp is the adapted model's."""
    pytest.importorskip("peft")
    m, htok = build(name, tok)
    apply_lora(m, r=4, alpha=8, dropout=0.0, target_modules=["lm_head", "o_proj"])
    with torch.no_grad():  # peft starts B at 0 (no change): make the adapters count
        for n, p in m.hf.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    assert _old_logp_error(m, htok) <= 1e-5
