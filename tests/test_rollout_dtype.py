"""The rollout in bf16 (rollout.dtype) and trainer.precision=auto: an engine built with dtype='bf16' samples
under the trainer's bf16 numerics, so its old_logp is the bf16 trainer's log-prob; a pointer engine still sees
each optimizer step at once; 'auto' resolves by the hardware and the run says which."""

import copy

import pytest
import torch
from test_devices import PROMPTS

import rlpost.models.precision
from rlpost.config import ConfigError, ModelConfig, load_config
from rlpost.models import autocast, load_model, resolve_precision, resolve_rollout_dtype, token_logprobs
from rlpost.rollout import SamplingParams, build_engine
from rlpost.run import resolve_precisions

pytestmark = pytest.mark.filterwarnings("ignore:trainer.precision=bf16 on a CPU without native bf16")


@pytest.fixture(scope="module")
def gpt():
    from rlpost.models.gpt_mini import GPT, CharTokenizer, GPTConfig

    torch.manual_seed(0)
    tok = CharTokenizer("0123456789+=")
    return GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=24, n_layer=2, n_head=2, n_embd=32)), tok


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    return load_model(ModelConfig(name=tiny_llama_dir))


def scores(model, batch, precision):
    with torch.no_grad(), autocast("cpu", precision):
        return token_logprobs(model, batch)


ENGINES = [("gpt", "native"), ("llama", "native"), ("llama", "hf")]


@pytest.mark.parametrize("name,kind", ENGINES)
def test_bf16_engine_old_logp_is_the_bf16_trainers(request, name, kind):
    model, tok = request.getfixturevalue(name)
    prompts = [tok.encode_prompt(p) for p in PROMPTS]
    params = SamplingParams(max_new_tokens=6, min_new_tokens=6)
    batch = build_engine(kind, model, tok, dtype="bf16").generate(prompts, 4, params, seed=3)
    mask = batch.response_mask.bool()
    to_bf16 = (scores(model, batch, "bf16") - batch.old_logp)[mask].abs()
    to_fp32 = (scores(model, batch, "fp32") - batch.old_logp)[mask].abs()
    # the bf16 trainer recomputes what the bf16 engine drew (KV-cached vs full forward: a few bf16 roundings)
    # while the fp32 trainer sees the bf16 rounding itself: the log-prob mismatch of a low-precision rollout
    assert to_bf16.max() < 2e-3, to_bf16.max()
    # (an fp32 engine's old_logp is within 1e-5 of the fp32 trainer's: test_fp32_engine_is_unchanged_by_default)
    assert to_fp32.mean() > 3 * to_bf16.mean() and to_fp32.max() > 2e-4, (to_fp32.mean(), to_bf16.mean())


@pytest.mark.parametrize("name,kind", ENGINES)
def test_fp32_engine_is_unchanged_by_default(request, name, kind):
    model, tok = request.getfixturevalue(name)
    prompts = [tok.encode_prompt(p) for p in PROMPTS]
    batch = build_engine(kind, model, tok).generate(prompts, 4, SamplingParams(max_new_tokens=6), seed=3)
    mask = batch.response_mask.bool()
    assert (scores(model, batch, "fp32") - batch.old_logp)[mask].abs().max() < 2e-5


@pytest.mark.parametrize("name", ["gpt", "llama"])
@pytest.mark.parametrize("share", [True, False])
def test_bf16_native_engine_samples_with_the_weights_after_each_update(request, name, share):
    model, tok = request.getfixturevalue(name)
    model = copy.deepcopy(model)
    engine = build_engine("native", model, tok, share_weights=share, dtype="bf16")
    assert engine.weight_sync_mode == ("pointer" if share else "copy")
    prompts = [tok.encode_prompt(p) for p in PROMPTS]
    params = SamplingParams(max_new_tokens=5, min_new_tokens=5)
    before = engine.generate(prompts, 2, params, seed=1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # an optimizer step, in place as AdamW makes it
    engine.update_weights(rlpost.rollout.engine.named_weights(model), version=1)
    after = engine.generate(prompts, 2, params, seed=1)
    mask = after.response_mask.bool()
    assert after.policy_version.tolist() == [1] * len(after.policy_version)
    assert (scores(model, after, "bf16") - after.old_logp)[mask].abs().max() < 2e-3  # no stale bf16 copy
    assert (scores(model, before, "bf16") - before.old_logp)[before.response_mask.bool()].abs().max() > 1e-2


def test_bf16_engine_keeps_a_bf16_kv_cache_and_fp32_weights(gpt, llama):
    for model, tok in (gpt, llama):
        engine = build_engine("native", model, tok, dtype="bf16")
        assert engine.new_cache(2, 8).dtype == torch.bfloat16
        assert build_engine("native", model, tok).new_cache(2, 8).dtype == torch.float32
        assert all(p.dtype == torch.float32 for p in model.parameters())  # the trainer's weights are untouched


def test_engine_dtype_is_checked(gpt):
    with pytest.raises(ValueError, match=r"rollout.dtype is 'fp16'.*fp32, bf16"):
        build_engine("native", *gpt, dtype="fp16")


def test_auto_precision_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(rlpost.models.precision, "cpu_has_fast_bf16", lambda: True)
    assert resolve_precision("auto", torch.device("cpu"))[0] == "bf16"
    assert resolve_precision("auto", torch.device("cuda"))[0] == "bf16"
    monkeypatch.setattr(rlpost.models.precision, "cpu_has_fast_bf16", lambda: False)
    precision, why = resolve_precision("auto", torch.device("cpu"))
    assert precision == "fp32" and "no AMX or AVX512-BF16" in why
    assert resolve_precision("auto", torch.device("cuda"))[0] == "bf16"
    assert resolve_precision("bf16", torch.device("cpu"))[0] == "bf16"  # as configured, even where slow
    assert resolve_precision("fp32", torch.device("cuda"))[0] == "fp32"
    assert [resolve_rollout_dtype(d, "bf16") for d in ("auto", "fp32", "bf16")] == ["bf16", "fp32", "bf16"]
    assert resolve_rollout_dtype("auto", "fp32") == "fp32"
    with pytest.raises(ValueError, match="trainer.precision is 'half'; valid values: auto, fp32, bf16"):
        resolve_precision("half", torch.device("cpu"))


@pytest.mark.parametrize("fast", [True, False])
def test_run_resolves_auto_in_its_config_and_says_which(monkeypatch, fast):
    monkeypatch.setattr(rlpost.models.precision, "cpu_has_fast_bf16", lambda: fast)
    cfg = load_config(None, ["trainer.precision=auto", "model.device=cpu",
                             "stages=[sft, {rl: {trainer.precision: auto}}, {rl: {trainer: {precision: auto}}}]",
                             "sft.steps=1", "rl.steps=1"])
    line = resolve_precisions(cfg)
    want = "bf16" if fast else "fp32"
    assert cfg.trainer.precision == cfg.rollout.dtype == want
    assert cfg.stages[1]["rl"]["trainer.precision"] == cfg.stages[2]["rl"]["trainer"]["precision"] == want
    assert f"trainer.precision=auto -> {want}" in line and f"the rollout samples in {want}" in line


def test_default_run_stays_fp32_and_an_explicit_rollout_dtype_wins():
    cfg = load_config(None, ["model.device=cpu"])
    assert (cfg.trainer.precision, cfg.rollout.dtype) == ("fp32", "auto")
    assert "trainer.precision=fp32; the rollout samples in fp32" in resolve_precisions(cfg)
    cfg = load_config(None, ["model.device=cpu", "trainer.precision=bf16", "rollout.dtype=fp32"])
    resolve_precisions(cfg)
    assert (cfg.trainer.precision, cfg.rollout.dtype) == ("bf16", "fp32")


@pytest.mark.parametrize("key,value,valid", [("rollout.dtype", "fp16", "auto, fp32, bf16"),
                                             ("trainer.precision", "half", "auto, fp32, bf16")])
def test_config_names_a_bad_choice(key, value, valid):
    with pytest.raises(ConfigError, match=rf"config key '{key}' is '{value}'; valid values: {valid}"):
        load_config(None, [f"{key}={value}"])


def test_rollout_dtype_is_the_runs_not_a_stages():
    with pytest.raises(ConfigError, match="rollout.dtype"):
        load_config(None, ["stages=[{rl: {rollout.dtype: bf16}}]", "rl.steps=1"])


@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_bf16_native_engine_admits_late_sequences(request, name):
    # under max_num_seqs, a sequence admitted after a row finished decodes at its own cache column while the
    # others are further on: that one-column-per-row cache write stores the fp32 keys into the bf16 cache too
    model, tok = request.getfixturevalue(name)
    prompts = [tok.encode_prompt(p) for p in PROMPTS]
    vocab = tok.vocab_size if name == "gpt" else len(tok.tok)
    stops = list(range(0, vocab, 2))  # rows end at varied lengths
    params = SamplingParams(max_new_tokens=8, max_num_seqs=3, stop_token_ids=stops)
    batch = build_engine("native", model, tok, dtype="bf16").generate(prompts, 4, params, seed=2)
    lengths = batch.response_mask.sum(-1)
    assert len(set(lengths.tolist())) > 1  # the batch went ragged: rows left early and others joined late
    mask = batch.response_mask.bool()
    assert (scores(model, batch, "bf16") - batch.old_logp)[mask].abs().max() < 2e-3
