"""LoRA (model.lora, through peft): only the adapters train and the base stays bit-identical; the reference is the
policy's own base with its adapters off (no copy) and scores exactly like a fresh load of the initial model; weight
sync sends the adapters only; the native engines sample the adapted model; checkpoints resume exactly; the final
checkpoint and `rlpost export` are plain merged folders that load without peft."""

import json
import os
import shutil

import pytest
import torch

pytest.importorskip("peft")

from rlpost.checkpoint import list_checkpoints
from rlpost.cli import main
from rlpost.config import ConfigError, ModelConfig, TrainerConfig, load_config
from rlpost.models import ModelLoadError, load_model, load_weights, save_model, token_logprobs
from rlpost.models.lora import (ADAPTER_FILE, adapter_state, adapters_disabled, base_state_dict, is_lora,
                                merged_state_dict)
from rlpost.preference.data import load_preferences
from rlpost.preference.fit import cache_reference
from rlpost.reference import Reference
from rlpost.rollout import SamplingParams, build_engine
from rlpost.run import saved_config, train
from rlpost.stages.sft import nll_loss
from rlpost.trainer import Trainer
from rlpost.weight_sync import WeightSync

ALPHABET = "0123456789+="
SMALL = ["model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.device=cpu"]
LORA = ["model.lora.r=4", "model.lora.alpha=8"]


def gpt_mini(lora: bool = True, seed: int = 0):
    """A fresh gpt_mini (block_size 24), with LoRA adapters r=4 when `lora`; the same base for a given seed."""
    cfg = load_config(None, SMALL + (LORA if lora else []))
    torch.manual_seed(seed)
    return load_model(cfg.model, ALPHABET)


def randomize_adapters(model, seed: int = 1):
    """Non-zero adapters (a fresh B is zero, which would make every LoRA test pass trivially)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in adapter_state(model).values():
            t.copy_(torch.randn(t.shape, generator=g) * 0.3)


def rollout(model, tok, prompts=("12+34=", "50+50="), k=2, temperature=1.0):
    engine = build_engine("auto", model, tok)
    return engine.generate([tok.encode_prompt(p) for p in prompts], k,
                           SamplingParams(max_new_tokens=4, temperature=temperature), seed=0)


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# ---------------------------------------------------------------------------- config

def test_lora_config_keys_are_checked_and_named():
    assert load_config(None, []).model.lora.r == 0  # off by default: full fine-tuning
    cfg = load_config(None, ["model.lora.r=8", "model.lora.target_modules=[c_attn]"])
    assert cfg.model.lora.r == 8 and cfg.model.lora.target_modules == ["c_attn"]
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.lora\.rank'; valid keys under model\.lora: r,"):
        load_config(None, ["model.lora.rank=8"])
    with pytest.raises(ConfigError, match=r"'model\.lora\.r' must be >= 0"):
        load_config(None, ["model.lora.r=-1"])
    with pytest.raises(ConfigError, match=r"'model\.lora\.dropout' must be in \[0, 1\)"):
        load_config(None, ["model.lora.r=4", "model.lora.dropout=1.5"])
    with pytest.raises(ConfigError, match=r"'model\.lora' expects a mapping|config key 'model\.lora': expected"):
        load_config(None, ["model.lora=8"])
    # vLLM takes a LoRA model: it runs the base and the adapters through a LoRARequest (tests/test_engine_vllm.py)
    assert load_config(None, ["model.lora.r=4", "rollout.engine=vllm", "rl.weight_sync=vllm"]).model.lora.r == 4
    with pytest.raises(ValueError, match="names none of this model's linear layers: .*c_attn"):
        load_model(load_config(None, SMALL + ["model.lora.r=4", "model.lora.target_modules=[q_proj]"]).model,
                   ALPHABET)


# ---------------------------------------------------------------------------- training

def test_only_adapters_train_and_the_base_stays_bit_identical():
    model, tok = gpt_mini()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    base = {k: v.clone() for k, v in base_state_dict(model).items()}
    adapters = {k: v.clone() for k, v in adapter_state(model).items()}
    trainer = Trainer(model, TrainerConfig(lr=1e-2))
    batch = rollout(model, tok)
    for _ in range(3):  # SFT-style steps, then a policy-gradient-style one
        trainer.step(batch, nll_loss)
    trainer.step(rollout(model, tok), lambda logp, b: (-(logp * b.response_mask).sum() / b.response_mask.sum(), {}))
    assert all(torch.equal(base[k], v) for k, v in base_state_dict(model).items())
    assert all(not torch.equal(adapters[k], v) for k, v in adapter_state(model).items() if ".lora_B." in k)


@pytest.mark.parametrize("kind", ["gpt_mini", "llama"])
def test_adapter_gradients_are_the_same_under_gradient_checkpointing(kind, tiny_llama_dir):
    from rlpost.models import set_gradient_checkpointing

    if kind == "gpt_mini":
        model, tok = gpt_mini()
    else:
        model, tok = load_model(ModelConfig(name=tiny_llama_dir, lora=load_config(None, LORA).model.lora))
    randomize_adapters(model)
    batch = rollout(model, tok, prompts=("1+2=", "47+85="))

    def adapter_grads(checkpointing: bool):
        set_gradient_checkpointing(model, checkpointing)
        model.train().zero_grad()
        (token_logprobs(model, batch) * batch.response_mask).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, recomputed = adapter_grads(False), adapter_grads(True)
    assert plain.keys() == recomputed.keys() and all(g.abs().max() > 0 for g in plain.values() if g.dim())
    # (an HF model scores without shared prompts under checkpointing: the same function, other float rounding)
    assert all(torch.allclose(plain[n], recomputed[n], rtol=1e-4, atol=1e-4) for n in plain)


# ---------------------------------------------------------------------------- reference

def test_reference_is_the_adapter_free_base_with_no_copy():
    model, tok = gpt_mini(seed=3)
    fresh, _ = gpt_mini(lora=False, seed=3)  # a fresh load of the initial model, no peft at all
    ref = Reference(model)
    assert ref.shares_policy and ref.model is model
    assert {id(p) for p in ref.model.parameters()} == {id(p) for p in model.parameters()}  # no parameter copy
    randomize_adapters(model)
    Trainer(model, TrainerConfig(lr=1e-2)).step(rollout(model, tok), nll_loss)
    batch = rollout(model, tok)
    model.train()
    ref_logp = ref(batch).ref_logp
    with torch.no_grad():
        want = token_logprobs(fresh.eval(), batch) * batch.response_mask
        policy = token_logprobs(model, batch) * batch.response_mask
    assert torch.equal(ref_logp, want)                  # exactly the base model's log-probs
    assert not torch.allclose(policy, want, atol=1e-3)  # while the policy has moved away from it
    assert model.training  # the policy's mode is put back
    assert all(p.requires_grad == (".lora_" in n) for n, p in model.named_parameters())  # flags put back


def test_reference_of_a_hf_model_is_its_base(tiny_llama_dir):
    model, tok = load_model(ModelConfig(name=tiny_llama_dir, lora=load_config(None, LORA).model.lora))
    plain, _ = load_model(ModelConfig(name=tiny_llama_dir))
    assert is_lora(model) and not is_lora(plain)
    randomize_adapters(model)
    batch = rollout(model, tok, prompts=("1+2=", "47+85="))
    with torch.no_grad():
        want = token_logprobs(plain.eval(), batch) * batch.response_mask
    assert torch.equal(Reference(model)(batch).ref_logp, want)


# ---------------------------------------------------------------------------- rollout and weight sync

def test_gpt_mini_native_engine_samples_the_adapted_model():
    model, tok = gpt_mini()
    randomize_adapters(model)
    batch = rollout(model, tok)
    with torch.no_grad():
        logp = token_logprobs(model.eval(), batch)
    m = batch.response_mask.bool()
    assert (logp[m] - batch.old_logp[m]).abs().max() < 1e-5
    with adapters_disabled(model):  # and it is not the base model's distribution
        base = token_logprobs(model, batch)
    assert (base[m] - batch.old_logp[m]).abs().max() > 1e-3


def test_hf_native_engine_uses_merged_lora_weights(tiny_llama_dir):
    model, tok = load_model(ModelConfig(name=tiny_llama_dir, lora=load_config(None, LORA).model.lora))
    randomize_adapters(model)
    prompts = ("1+2=", "47+85=", "The answer is")
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0)
    ids = [tok.encode_prompt(p) for p in prompts]
    native = build_engine("native", model, tok).generate(ids, 1, greedy)
    hf = build_engine("hf", model, tok).generate(ids, 1, greedy)  # transformers.generate: peft's module forward
    assert type(build_engine("auto", model, tok)).__name__ == "HFNativeEngine"
    assert torch.equal(native.input_ids, hf.input_ids)
    with torch.no_grad():
        logp = token_logprobs(model.eval(), native)
    m = native.response_mask.bool()
    assert (logp[m] - native.old_logp[m]).abs().max() < 1e-4
    with adapters_disabled(model):
        base = build_engine("native", model, tok).generate(ids, 1, greedy)
    assert not torch.equal(base.old_logp, native.old_logp)



def test_hf_native_engine_follows_adapters_switched_off_and_on(tiny_llama_dir):
    """The engine caches the merged weights between calls; switching the adapters off (adapters_disabled) or on
    again touches no parameter, and must still reach the next call: a stale cache sampled the adapted model
    while asked for the base, or the reverse."""
    model, tok = load_model(ModelConfig(name=tiny_llama_dir, lora=load_config(None, LORA).model.lora))
    randomize_adapters(model)
    model.eval()
    ids = [tok.encode_prompt(p) for p in ("1+2=", "47+85=")]
    params = SamplingParams(max_new_tokens=6)
    engine = build_engine("native", model, tok)  # pointer: it samples with the module as it is now

    def error(batch):
        with torch.no_grad():
            return float(((token_logprobs(model, batch) - batch.old_logp) * batch.response_mask).abs().max())

    assert error(engine.generate(ids, 2, params, seed=3)) < 1e-4
    with adapters_disabled(model):
        assert error(engine.generate(ids, 2, params, seed=3)) < 1e-4
    assert error(engine.generate(ids, 2, params, seed=3)) < 1e-4

def test_sync_sends_only_the_adapters_and_a_copy_engine_takes_them():
    model, tok = gpt_mini()
    engine = build_engine("auto", model, tok, share_weights=False)
    sync = WeightSync(model, engine)
    adapters = adapter_state(model)
    Trainer(model, TrainerConfig(lr=1e-2)).step(rollout(model, tok), nll_loss)
    metrics = sync.sync()
    assert metrics["sync/bytes"] == nbytes(adapters.values())
    assert metrics["sync/bytes"] < nbytes(model.state_dict().values()) / 5
    assert sync.push()["sync/bytes"] == nbytes({t.data_ptr(): t for t in model.state_dict().values()}.values())
    params = SamplingParams(max_new_tokens=4)
    prompt = [tok.encode_prompt("12+34=")]
    pointer = build_engine("auto", model, tok).generate(prompt, 4, params, seed=5)
    assert torch.equal(engine.generate(prompt, 4, params, seed=5).input_ids, pointer.input_ids)
    some = list(adapters.items())[:2]  # a partial adapter set, or a wrong name, is still refused
    with pytest.raises(ValueError, match="missing: transformer"):
        engine.update_weights(some, 2)
    with pytest.raises(ValueError, match="unexpected: transformer.h.0.attn.c_attn.lora_C"):
        engine.update_weights([*adapters.items(), ("transformer.h.0.attn.c_attn.lora_C.default.weight",
                                                   some[0][1])], 2)
    engine.close()


# ---------------------------------------------------------------------------- checkpoints and export

def test_export_is_a_merged_plain_folder_that_transformers_loads(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = load_model(ModelConfig(name=tiny_llama_dir, lora=load_config(None, LORA).model.lora))
    randomize_adapters(model)
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "exported")
    save_model(model, tok, ckpt)  # a mid-run checkpoint: base + adapters
    assert os.path.isfile(os.path.join(ckpt, ADAPTER_FILE))
    again, _ = load_model(ModelConfig(name=ckpt))  # load_model finds the adapters
    ids = torch.tensor([tok.encode_prompt("47+85=") + tok.encode_completion("132")])
    with torch.no_grad():
        want = model.eval()(ids)
        assert is_lora(again) and torch.equal(again.eval()(ids), want)
    plain, _ = load_model(ModelConfig(name=tiny_llama_dir))
    with pytest.raises(ModelLoadError, match="holds LoRA adapters and this model has none"):
        load_weights(plain, ckpt)  # never its base alone, silently
    assert main(["export", ckpt, "--out", out]) == 0
    assert not any("lora" in f for f in os.listdir(out)) and os.path.isfile(os.path.join(out, "tokenizer.json"))
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not hasattr(hf, "peft_config")
    with torch.no_grad():
        assert (hf(ids).logits - want).abs().max() < 1e-5


def test_gpt_mini_merged_save_loads_without_peft(tmp_path):
    model, tok = gpt_mini()
    randomize_adapters(model)
    folder = str(tmp_path / "merged")
    save_model(model, tok, folder, merged=True)
    plain, _ = load_model(ModelConfig(name=folder))
    ids = torch.tensor([tok.encode_prompt("12+34=046")])
    with torch.no_grad():
        assert not is_lora(plain) and (plain(ids) - model.eval()(ids)).abs().max() < 1e-5
        merged = merged_state_dict(model)
        assert all(".base_layer." not in k and ".lora_" not in k for k in merged)


def test_a_damaged_lora_config_is_named_with_its_file(tmp_path):
    """A LoRA checkpoint's lora_config.json cut short raised a bare JSONDecodeError, and one with a key apply_lora
    does not take a TypeError, naming no file."""
    model, tok = gpt_mini()
    saved = tmp_path / "saved"
    save_model(model, tok, str(saved))
    assert is_lora(load_model(ModelConfig(name=str(saved)))[0])
    cases = [("cut", '{"r": 4, "alp', r"lora_config.json: not valid JSON \(.*\): the LoRA checkpoint is damaged"),
             ("extra", '{"r": 4, "alpha": 8, "dropout": 0, "target_modules": ["c_attn"], "rank": 4}',
              r"lora_config.json: expected an object with the keys alpha, dropout, r, target_modules")]
    for name, text, match in cases:
        folder = tmp_path / name
        shutil.copytree(saved, folder)
        (folder / "lora_config.json").write_text(text)
        with pytest.raises(ModelLoadError, match=f"model folder '{folder}': .*{match}"):
            load_model(ModelConfig(name=str(folder)))


def test_export_refuses_a_folder_holding_another_models_adapters(tmp_path, capsys):
    """Exported into a folder that held a LoRA checkpoint, the merged weights were written beside its stale
    adapters, and the folder loaded back as a LoRA model: those adapters applied over the exported weights."""
    model, tok = gpt_mini()
    save_model(model, tok, str(tmp_path / "lora_ckpt"))
    plain, _ = gpt_mini(lora=False)
    save_model(plain, tok, str(tmp_path / "plain"))
    shutil.copytree(tmp_path / "lora_ckpt", tmp_path / "out")
    assert main(["export", str(tmp_path / "plain"), "--out", str(tmp_path / "out")]) == 1
    assert (f"--out {tmp_path / 'out'} holds {ADAPTER_FILE}, lora_config.json of another model, which would load "
            "over the exported weights") in capsys.readouterr().err
    assert main(["export", str(tmp_path / "plain"), "--out", str(tmp_path / "new")]) == 0
    assert not is_lora(load_model(ModelConfig(name=str(tmp_path / "new")))[0])


# ---------------------------------------------------------------------------- runs

TINY = ["sft.steps=6", "sft.batch_size=16", "sft.save_every=0", "rl.steps=6", "rl.eval_every=0", "rl.save_every=2",
        "rl.keep_checkpoints=3", "task.num_eval=20", "rollout.prompts_per_step=4", "rollout.k=4",
        "eval.samples_per_prompt=1", "threads=1", "sft.lr=1e-2", "trainer.lr=1e-2", *SMALL, *LORA,
        "algorithm.entropy_coef=0.05"]  # a gradient even while every reward is 0 (a barely trained model)


def tiny_cfg(tmp_path, name, *extra):
    return load_config(None, [*TINY, f"out_dir={tmp_path}", f"run_name={name}", *extra])


def test_train_end_to_end_with_lora(tmp_path):
    summary = train(tiny_cfg(tmp_path, "e2e", "rl.weight_sync=copy"))
    run = summary["run_dir"]
    assert summary["status"] == "ok" and "pass@1_rl" in summary
    ck = os.path.join(run, "checkpoints")
    final, sft = os.path.join(ck, "final"), os.path.join(ck, "sft")
    assert not any("lora" in f for f in os.listdir(final) + os.listdir(sft))  # end-of-stage: plain, merged
    assert not os.path.exists(os.path.join(ck, "reference"))                 # the reference is the base: no copy
    step = os.path.join(ck, "step_4")
    from safetensors.torch import load_file

    assert any(".lora_B." in k and v.abs().max() > 0 for k, v in load_file(os.path.join(step, ADAPTER_FILE)).items())

    assert load_file(os.path.join(step, "model.safetensors")).keys() == load_file(
        os.path.join(sft, "model.safetensors")).keys()
    for k, v in load_file(os.path.join(step, "model.safetensors")).items():  # RL left the base (= SFT) alone
        assert torch.equal(v, load_file(os.path.join(sft, "model.safetensors"))[k]), k
    plain, _ = load_model(ModelConfig(name=final))
    assert not is_lora(plain)
    with open(os.path.join(run, "metrics.jsonl")) as f:
        rl = [json.loads(line) for line in f if '"stage": "rl"' in line]
    assert rl and all(m["sync/bytes"] < 40_000 for m in rl)  # adapters only (the model is ~ 100 kB)


def test_dpo_with_lora_runs_and_its_reference_is_the_base(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"{a:02d}+{b:02d}=", "chosen": f"{a + b:03d}",
                                         "rejected": f"{a + b + 1:03d}"}) + "\n" for a in range(4) for b in range(4)))
    summary = train(tiny_cfg(tmp_path, "dpo", "preference.enabled=true", "rl.steps=0",
                             f"preference.train_file={pairs}", "preference.epochs=1", "preference.batch_size=8"))
    assert summary["status"] == "ok" and "pass@1_dpo" in summary
    assert not any("lora" in f for f in os.listdir(os.path.join(summary["run_dir"], "checkpoints", "preference")))
    model, tok = gpt_mini(seed=4)
    fresh, _ = gpt_mini(lora=False, seed=4)
    randomize_adapters(model)
    data, want = (load_preferences(str(pairs), tok, max_length=24) for _ in range(2))
    cache_reference(model, data, tok.pad_token_id)
    cache_reference(fresh, want, tok.pad_token_id)
    assert all(torch.equal(a, b) for a, b in zip(data.ref, want.ref))


def test_resume_from_a_lora_step_checkpoint_is_exact(tmp_path):
    whole = train(tiny_cfg(tmp_path, "whole"))["run_dir"]
    ckpts = [c.name for c in list_checkpoints(whole)]
    assert {"step_2", "step_4", "final"} <= set(ckpts)
    for stop in ("step_2", "step_4"):  # a copy of the run as it stood when that checkpoint was written
        run = str(tmp_path / f"from_{stop}")
        shutil.copytree(whole, run)
        for c in list_checkpoints(run):
            if c.order > next(x for x in list_checkpoints(run) if x.name == stop).order:
                shutil.rmtree(c.path)
        os.remove(os.path.join(run, "summary.json"))
        assert list_checkpoints(run)[-1].name == stop
        summary = train(saved_config(run), resume=run)
        assert summary["status"] == "ok"
        from safetensors.torch import load_file

        a = load_file(os.path.join(whole, "checkpoints", "final", "model.safetensors"))
        b = load_file(os.path.join(run, "checkpoints", "final", "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), stop
        with open(os.path.join(whole, "metrics.jsonl")) as f, open(os.path.join(run, "metrics.jsonl")) as g:
            def strip(m):
                return {k: v for k, v in m.items()
                        if not (k.startswith(("time", "step/", "mem/", "gpu/")) or k.endswith("tokens_per_s"))}
            assert [strip(json.loads(x)) for x in f] == [strip(json.loads(x)) for x in g]
