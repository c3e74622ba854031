"""Any device: `model.device`, and every role computing on its model's device.

Without a GPU the CPU tests check what can be checked here: resolve_device, and that no role creates a
tensor without naming its device. They run each role with torch's default device set to "meta": a
tensor made without `device=` lands there, and the first operation that mixes it with the batch's CPU
tensors raises. That is exactly the tensor that would sit on the CPU next to CUDA data on a GPU. The
tests marked `cuda` run the roles on a real GPU and are skipped without one.
"""

import copy

import pytest
import torch

from rlpost import get_algorithm
from rlpost.algorithms import available
from rlpost.batch import Batch
from rlpost.config import ConfigError, ModelConfig, TrainerConfig, load_config
from rlpost.critic import Critic
from rlpost.models import load_model, model_device, resolve_device, token_logprobs
from rlpost.reference import Reference
from rlpost.env.reward import Reward
from rlpost.rollout import SamplingParams, build_engine
from rlpost.rollout.native import NativeEngine
from rlpost.stages.sft import nll_loss
from rlpost.trainer import Trainer

ALGORITHMS = sorted(available())
PROMPTS = ("12+34=", "50+50=", "7+8=")


def algorithm(name: str):
    """Each algorithm with a KL term where it has one, so the reference role runs too."""
    return get_algorithm(name, **({} if name in ("ppo", "reinforce_pp", "dapo") else {"beta": 0.04}))


def scored_batch(model, tok, k: int = 3, seed: int = 0):
    """A rollout batch (built on the CPU by the native engine from a CPU copy of `model`) with rewards."""
    engine = build_engine("auto", copy.deepcopy(model).cpu(), tok)
    prompt_ids = [tok.encode_prompt(p) for p in PROMPTS]
    batch = engine.generate(prompt_ids, k, SamplingParams(max_new_tokens=4), seed=seed)
    rows = [{"prompt": p, "answer": "0"} for p in PROMPTS for _ in range(k)]
    batch = batch.replace(meta={**batch.meta, "row": rows})
    batch, _ = Reward(lambda c, row: float(len(c) % 2), tok)(batch)
    return batch


def tiny_llama(folder, device="cpu"):
    model, tok = load_model(ModelConfig(name=folder, device=device))
    return model, tok


# ---------------------------------------------------------------------------- resolve_device, model.device

def test_resolve_device_names_the_key_and_the_valid_values():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("gpu", "cuda:x", "CPU", "mps"):
        with pytest.raises(ValueError, match=r"model.device is .*valid values: auto, cpu, cuda, cuda:N"):
            resolve_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_asking_for_cuda_without_cuda_is_a_clear_error():
    for spec in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(RuntimeError, match=rf"model.device={spec} but CUDA is not available.*model.device=cpu"):
            resolve_device(spec)
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        load_model(ModelConfig(device="cuda"), alphabet="0123456789+=")


def test_load_model_places_the_model_on_model_device():
    model, _ = load_model(ModelConfig(device="cpu", n_layer=1, n_embd=16, n_head=2), alphabet="0123456789+=")
    assert model_device(model) == torch.device("cpu")


def test_config_keys_for_device_and_precision_are_validated():
    cfg = load_config(overrides=["model.device=cpu", "trainer.precision=bf16", "trainer.gradient_checkpointing=true",
                                 "trainer.lr_schedule=cosine", "trainer.warmup_steps=5", "trainer.min_lr_ratio=0.1"])
    assert (cfg.model.device, cfg.trainer.precision, cfg.trainer.gradient_checkpointing) == ("cpu", "bf16", True)
    assert (cfg.trainer.lr_schedule, cfg.trainer.warmup_steps, cfg.trainer.min_lr_ratio) == ("cosine", 5, 0.1)
    assert load_config().model.device == "auto" and load_config().trainer.precision == "fp32"
    for override, message in (
            ("model.device=gpu", r"'model.device' is 'gpu'; valid values: auto, cpu, cuda, cuda:N"),
            ("trainer.precision=fp16", r"'trainer.precision' is 'fp16'; valid values: auto, fp32, bf16"),
            ("trainer.lr_schedule=step", r"'trainer.lr_schedule' is 'step'; valid values: constant, linear, cosine"),
            ("trainer.warmup_steps=-1", r"'trainer.warmup_steps' must be >= 0"),
            ("trainer.min_lr_ratio=2", r"'trainer.min_lr_ratio' must be in \[0, 1\]"),
            ("trainer.gradient_checkpointing=maybe", r"'trainer.gradient_checkpointing' expects bool")):
        with pytest.raises(ConfigError, match=message):
            load_config(overrides=[override])


def test_a_cpu_batch_is_accepted_by_a_cpu_model(tiny_gpt):
    model, tok = tiny_gpt
    batch = scored_batch(model, tok)
    assert batch.input_ids.device == model_device(model) == torch.device("cpu")
    algo = algorithm("grpo")
    batch = algo.compute_advantages(Reference(model)(batch))
    assert batch.ref_logp.device == batch.advantages.device == torch.device("cpu")
    metrics = Trainer(model, TrainerConfig(lr=1e-3)).step(batch, algo.compute_loss)
    assert all(type(v) is float for v in metrics.values())


# ---------------------------------------------------------------------------- no tensor without a device

def run_roles(model, tok, name: str, batch):
    """Reference, critic, advantages, loss and trainer step of algorithm `name`, as the controller runs them."""
    algo = algorithm(name)
    reference = Reference(model) if algo.uses_reference else None
    critic = Critic.build(model, "separate") if algo.uses_critic else None
    trainer = Trainer(model, TrainerConfig(lr=1e-3, epochs=2, minibatches=2), critic=critic)  # the shuffle runs too
    with torch.device("meta"):  # any tensor made without device= lands on "meta" and fails against the CPU
        if reference is not None:
            batch = reference(batch)
        if critic is not None:
            with torch.no_grad():
                batch = batch.replace(values=critic(batch))
        batch = algo.compute_advantages(batch)
        loss, metrics = algo.compute_loss(token_logprobs(model, batch), batch.replace(new_values=batch.values))
        assert loss.device == torch.device("cpu") and all(type(v) is float for v in metrics.values())
        metrics = trainer.step(batch, algo.compute_loss)
    assert all(type(v) is float for v in metrics.values())
    return metrics


@pytest.mark.parametrize("name", ALGORITHMS)
def test_every_role_names_the_device_of_what_it_creates_gpt_mini(tiny_gpt, name):
    model, tok = tiny_gpt
    run_roles(model, tok, name, scored_batch(model, tok))


@pytest.mark.parametrize("name", ["grpo", "ppo"])
def test_every_role_names_the_device_of_what_it_creates_hf_llama(tiny_llama_dir, name):
    model, tok = tiny_llama(tiny_llama_dir)
    run_roles(model, tok, name, scored_batch(model, tok))


def test_sft_preference_and_reward_model_name_their_devices(tiny_gpt):
    from rlpost.preference import get_preference_loss
    from rlpost.preference.data import tokenize_preferences
    from rlpost.env.reward_model import RewardModel
    from rlpost.preference.fit import cache_reference, make_loss_fn

    model, tok = tiny_gpt
    eos = [tok.eos_token_id]
    sft = Batch.for_sft([tok.encode_prompt("1+2="), tok.encode_prompt("30+4=")],
                        [tok.encode_completion("3") + eos, tok.encode_completion("34") + eos], tok.pad_token_id)
    data = tokenize_preferences([{"prompt": "1+2=", "chosen": "3", "rejected": "4", "where": "pair 0"},
                                 {"prompt": "5+5=", "chosen": "10", "rejected": "11", "where": "pair 1"}], tok,
                                max_length=24)
    cache_reference(model, data, tok.pad_token_id)
    pairs = data.batch(data.sequences([0, 1]), tok.pad_token_id)
    trainer, rm = Trainer(model, TrainerConfig(lr=1e-3)), RewardModel.from_policy(model)
    with torch.device("meta"):
        trainer.step(sft, nll_loss)
        trainer.step(pairs, make_loss_fn(get_preference_loss("dpo")))
        assert rm.score(pairs).device == torch.device("cpu")


# ---------------------------------------------------------------------------- on a GPU

def cuda_models(tiny_llama_dir):
    from rlpost.models.gpt_mini import GPT, CharTokenizer, GPTConfig

    torch.manual_seed(0)
    tok = CharTokenizer("0123456789+=")
    gpt = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=24, n_layer=2, n_head=2, n_embd=32)).cuda()
    return {"gpt_mini": (gpt, tok), "hf_llama": tiny_llama(tiny_llama_dir, device="cuda")}


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["gpt_mini", "hf_llama"])
def test_cuda_every_role_and_algorithm(tiny_llama_dir, kind):
    """On CUDA: the reference, both critics, every algorithm's advantages, loss and trainer step, with the
    batch on CUDA (results stay there) and on the CPU (results come back there); fp32 and bf16."""
    model, tok = cuda_models(tiny_llama_dir)[kind]
    assert resolve_device("auto") == torch.device("cuda") and model_device(model).type == "cuda"
    cpu_batch = scored_batch(model, tok)
    for batch_device in ("cuda", "cpu"):
        batch = cpu_batch.to(batch_device)
        for name in ALGORITHMS:
            for precision in ("fp32", "bf16"):
                algo = algorithm(name)
                b = Reference(model, TrainerConfig(precision=precision))(batch) if algo.uses_reference else batch
                critic = None
                if algo.uses_critic:
                    critic = Critic.build(model, "separate" if precision == "fp32" else "head",
                                          TrainerConfig(precision=precision))
                    with torch.no_grad():
                        b = b.replace(values=critic(b))
                    assert b.values.device.type == batch_device and b.values.dtype == torch.float32
                if algo.uses_reference:
                    assert b.ref_logp.device.type == batch_device and b.ref_logp.dtype == torch.float32
                b = algo.compute_advantages(b)
                assert b.advantages.device.type == batch_device
                trainer = Trainer(model, TrainerConfig(lr=1e-4, precision=precision, epochs=2, minibatches=2),
                                  critic=critic)
                metrics = trainer.step(b, algo.compute_loss)
                assert metrics["train/skipped_nonfinite"] == 0.0, (name, precision)
                assert all(type(v) is float for v in metrics.values())
                assert all(p.dtype == torch.float32 and p.device.type == "cuda" for p in model.parameters())
                for state in trainer.optimizer.state.values():
                    assert state["exp_avg"].device.type == "cuda" and state["exp_avg"].dtype == torch.float32


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["gpt_mini", "hf_llama"])
def test_cuda_sft_checkpointing_and_resume(tiny_llama_dir, kind):
    model, tok = cuda_models(tiny_llama_dir)[kind]
    demos = [(tok.encode_prompt(f"{a}+{b}="), tok.encode_completion(str(a + b)) + [tok.eos_token_id])
             for a in range(3) for b in range(3)]
    for precision in ("fp32", "bf16"):  # SFT batches are built on the CPU; the trainer moves them
        sft = Trainer(model, TrainerConfig(lr=1e-3, precision=precision, gradient_checkpointing=True))
        for _ in range(3):
            m = sft.step(Batch.for_sft([p for p, _ in demos], [c for _, c in demos], tok.pad_token_id), nll_loss)
        assert m["train/skipped_nonfinite"] == 0.0 and m["sft/nll"] > 0
    trainer = Trainer(model, TrainerConfig(lr=1e-3))
    batch = scored_batch(model, tok)
    trainer.step(batch, nll_loss)
    state = copy.deepcopy(trainer.state_dict())
    again = Trainer(model, TrainerConfig(lr=1e-3))
    again.load_state_dict(state)
    assert all(s["exp_avg"].device.type == "cuda" for s in again.optimizer.state.values())
    again.step(batch, nll_loss)


@pytest.mark.cuda
def test_cuda_controller_step_with_the_native_engine(tiny_gpt):
    """The whole loop on CUDA: the native engine samples from the CUDA model, every role follows."""
    from rlpost.config import RLConfig, RolloutConfig, TrainerConfig
    from rlpost.controller import Controller, Roles
    from rlpost.weight_sync import WeightSync

    model, tok = tiny_gpt
    model.cuda()
    engine = NativeEngine(model, tok)
    rows = [{"prompt": p, "answer": "0"} for p in PROMPTS]
    for name in ALGORITHMS:
        algo = algorithm(name)
        critic = Critic.build(model, "separate") if algo.uses_critic else None
        roles = Roles(engine=engine, reward=Reward(lambda c, row: float(len(c) % 2), tok), algorithm=algo,
                      trainer=Trainer(model, TrainerConfig(lr=1e-4), critic=critic),
                      weight_sync=WeightSync(model, engine),
                      reference=Reference(model) if algo.uses_reference else None, critic=critic)
        ctl = Controller(roles, RLConfig(), SamplingParams(max_new_tokens=4),
                         RolloutConfig(prompts_per_step=3, k=4, max_refill_rounds=1),
                         rows=rows, prompt_ids=[tok.encode_prompt(p) for p in PROMPTS], seed=0)
        metrics = ctl.step(1)
        assert all(type(v) is float for v in metrics.values()), name
