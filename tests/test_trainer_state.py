"""The learning-rate schedule, and resuming a Trainer from its state_dict bit-identically."""

import copy
import io
import math

import pytest
import torch
from test_devices import scored_batch

from rlpost import get_algorithm
from rlpost.config import TrainerConfig
from rlpost.critic import Critic
from rlpost.reference import Reference
from rlpost.schedule import LRSchedule
from rlpost.stages.sft import nll_loss
from rlpost.trainer import Trainer

# ---------------------------------------------------------------------------- LRSchedule


def test_schedules_hand_computed():
    constant = LRSchedule("constant", warmup_steps=4)
    assert [constant.factor(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    linear = LRSchedule("linear", warmup_steps=2, total_steps=6)
    assert [linear.factor(s) for s in range(8)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    linear_floor = LRSchedule("linear", warmup_steps=0, total_steps=4, min_lr_ratio=0.2)
    assert [linear_floor.factor(s) for s in range(5)] == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])
    cosine = LRSchedule("cosine", warmup_steps=0, total_steps=4, min_lr_ratio=0.1)
    c = math.cos(math.pi / 4)  # 1 + cos(pi * frac) at frac 0, 1/4, 1/2, 3/4, 1: 2, 1 + c, 1, 1 - c, 0
    assert [cosine.factor(s) for s in range(6)] == pytest.approx(
        [1.0, 0.1 + 0.45 * (1 + c), 0.55, 0.1 + 0.45 * (1 - c), 0.1, 0.1])


def test_sft_schedule_is_the_one_sft_always_had():
    """The SFT stage's LRSchedule('cosine', 50, 1000, 0.1) equals the inline formula it replaced, exactly."""
    steps, warmup = 1000, 50
    schedule = LRSchedule("cosine", warmup, total_steps=steps, min_lr_ratio=0.1)
    for step in range(steps):
        frac = (step - warmup) / max(steps - warmup, 1)
        old = (step + 1) / warmup if step < warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * frac))
        assert schedule.factor(step) == old, step


def test_schedule_errors_name_the_key():
    with pytest.raises(ValueError, match=r"trainer.lr_schedule is 'step'; valid values: constant, linear, cosine"):
        LRSchedule("step")
    with pytest.raises(ValueError, match=r"lr_schedule=cosine decays over the run: it needs total_steps"):
        LRSchedule("cosine", warmup_steps=3)
    with pytest.raises(ValueError, match=r"trainer.warmup_steps must be >= 0"):
        LRSchedule("constant", warmup_steps=-1)
    with pytest.raises(ValueError, match=r"trainer.min_lr_ratio must be in \[0, 1\]"):
        LRSchedule("linear", total_steps=3, min_lr_ratio=1.5)


def test_trainer_applies_the_schedule_to_every_param_group_at_each_optimizer_step(tiny_gpt):
    model, tok = tiny_gpt
    critic = Critic.build(model, "head")
    schedule = LRSchedule("linear", warmup_steps=1, total_steps=5)
    trainer = Trainer(model, TrainerConfig(lr=1e-2, lr_schedule="linear", warmup_steps=1, minibatches=2),
                      critic=critic, critic_lr=1e-1, total_steps=5)
    algo = get_algorithm("ppo")
    batch = Reference(model)(scored_batch(model, tok))
    with torch.no_grad():
        batch = algo.compute_advantages(batch.replace(values=critic(batch)))
    lrs, critic_lrs = [], []
    for _ in range(3):  # 2 optimizer steps each
        trainer.step(batch, lambda logp, b: (lrs.append(trainer.optimizer.param_groups[0]["lr"]),
                                             critic_lrs.append(trainer.optimizer.param_groups[1]["lr"]),
                                             algo.compute_loss(logp, b))[-1])
    factors = [schedule.factor(s) for s in range(6)]  # 1.0 (warm-up), 1, 0.75, 0.5, 0.25, 0
    assert lrs == pytest.approx([1e-2 * f for f in factors]) and trainer.steps == 6
    assert critic_lrs == pytest.approx([1e-1 * f for f in factors])


def test_set_lr_sets_the_base_that_the_schedule_scales(tiny_gpt):
    model, tok = tiny_gpt
    trainer = Trainer(model, TrainerConfig(lr=1.0, warmup_steps=4))
    trainer.set_lr(0.4)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.1)  # 0.4 x warm-up 1/4
    assert trainer.step(scored_batch(model, tok), nll_loss)["train/lr"] == pytest.approx(0.1)


# ---------------------------------------------------------------------------- resuming


def batches(model, tok, algo, n=3):
    """n scored batches made before any training (so both runs train on the same data)."""
    out = []
    reference = Reference(model)
    critic = Critic.build(model, "separate") if algo.uses_critic else None
    for seed in range(n):
        b = reference(scored_batch(model, tok, seed=seed))
        if critic is not None:
            with torch.no_grad():
                b = b.replace(values=critic(b))
        out.append(algo.compute_advantages(b))
    return out


def build(model, algo, critic_from=None):
    critic = Critic.build(model, "separate") if algo.uses_critic else None
    if critic is not None and critic_from is not None:
        critic.load_state_dict(critic_from)
    cfg = TrainerConfig(lr=1e-2, epochs=2, minibatches=2, lr_schedule="cosine", warmup_steps=2, min_lr_ratio=0.1)
    trainer = Trainer(model, cfg, critic=critic, seed=3, total_steps=12)
    return trainer, critic


@pytest.mark.parametrize("name", ["grpo", "ppo"])
def test_a_rebuilt_trainer_continues_bit_identically(tiny_gpt, name):
    """3 steps in one go == 1 step, save (trainer state through torch.save, weights apart), a new model and
    Trainer loaded from them, 2 more steps: every parameter and every metric equal, bit for bit. Epochs x
    minibatches shuffle with the generator; the cosine schedule and AdamW's moments carry over; PPO's
    separate critic is the optimizer's second param group."""
    model, tok = tiny_gpt
    algo = get_algorithm(name)
    data = batches(model, tok, algo)
    start = copy.deepcopy(model.state_dict())

    trainer, critic = build(model, algo)
    straight = [trainer.step(b, algo.compute_loss) for b in data]
    final = {n: p.detach().clone() for n, p in model.named_parameters()}
    final_critic = copy.deepcopy(critic.state_dict()) if critic is not None else None

    model.load_state_dict(start)
    trainer, critic = build(model, algo)
    resumed = [trainer.step(data[0], algo.compute_loss)]
    saved = io.BytesIO()
    torch.save(trainer.state_dict(), saved)
    weights = copy.deepcopy(model.state_dict())
    critic_weights = copy.deepcopy(critic.state_dict()) if critic is not None else None
    trainer.step(data[1], algo.compute_loss)  # the old trainer goes on: nothing it does may leak into the new one

    from rlpost.models.gpt_mini import GPT

    torch.manual_seed(123)  # a differently initialised model, then the saved weights
    new_model = GPT(model.config)
    new_model.load_state_dict(weights)
    new_trainer, _ = build(new_model, algo, critic_from=critic_weights)
    saved.seek(0)
    new_trainer.load_state_dict(torch.load(saved, weights_only=True))
    assert new_trainer.steps == 4 and new_trainer.nonfinite_in_a_row == 0  # epochs x minibatches per trainer.step
    resumed += [new_trainer.step(b, algo.compute_loss) for b in data[1:]]

    for n, p in new_model.named_parameters():
        assert torch.equal(p, final[n]), n
    if critic is not None:
        for n, v in new_trainer.critic.state_dict().items():
            assert torch.equal(v, final_critic[n]), n
    assert resumed == straight


def test_adamw_is_fused_and_a_state_saved_unfused_resumes_unfused(tiny_gpt):
    """An unsharded trainer's AdamW is torch's fused kernel, and its update is AdamW's formula (hand-computed
    first step: m = (1 - b1) g, v = (1 - b2) g^2, p <- p (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps), where
    m_hat = g, v_hat = g^2). A trainer state saved by the per-parameter loop (a run started before the optimizer
    was fused) resumes on that loop: the flag travels with the state, so the resumed run stays bit-identical."""
    model, _ = tiny_gpt
    cfg = TrainerConfig(lr=1e-2, weight_decay=0.1)
    trainer = Trainer(model, cfg)
    assert all(g["fused"] for g in trainer.optimizer.param_groups)
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    grads = [torch.randn_like(p) for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    trainer.optimizer.step()
    for p, p0, g in zip(params, before, grads):
        want = p0 * (1 - 1e-2 * 0.1) - 1e-2 * g / (g.abs() + 1e-8)
        assert torch.allclose(p, want, rtol=1e-5, atol=1e-7)
    old = torch.optim.AdamW(params, lr=1e-2)  # what Trainer built before: foreach / fused unset
    state = {**trainer.state_dict(), "optimizer": old.state_dict()}
    resumed = Trainer(model, cfg)
    resumed.load_state_dict(state)
    assert all(not g["fused"] for g in resumed.optimizer.param_groups)


@pytest.mark.parametrize("case", ["lora", "critic", "bf16"])
def test_fused_adamw_steps_as_the_loop_does(tiny_gpt, case):
    """The fused kernel against torch's per-parameter loop, four steps with weight decay from the same gradients,
    after a non-finite loss that Trainer.step skipped (nothing reaches the optimizer): LoRA adapters (the only
    trainable parameters), a PPO critic as a second param group (its own lr), pure-bf16 parameters
    (model.dtype=bfloat16: the kernel does its arithmetic in fp32 where the loop rounds each op to bf16, so they
    agree to two bf16 roundings)."""
    from rlpost.models.gpt_mini import GPT
    from rlpost.models.lora import apply_lora

    model0, tok = tiny_gpt
    algo = get_algorithm("ppo" if case == "critic" else "grpo")
    batch = batches(model0, tok, algo, n=1)[0]

    def nan_loss(logp, b, *rest):
        out, metrics = algo.compute_loss(logp, b, *rest)
        return out * float("nan"), metrics

    def run(fused: bool):
        model = GPT(model0.config)
        model.load_state_dict(model0.state_dict())
        torch.manual_seed(0)  # the same adapters and critic head in both runs
        if case == "lora":
            apply_lora(model, 4, 8.0, 0.0, ["c_attn", "c_proj"])
        if case == "bf16":
            model = model.to(torch.bfloat16)
        critic = Critic.build(model, "separate") if algo.uses_critic else None
        trainer = Trainer(model, TrainerConfig(lr=1e-2, weight_decay=0.1), critic=critic, critic_lr=3e-3)
        assert all(g["fused"] for g in trainer.optimizer.param_groups)
        for g in trainer.optimizer.param_groups:
            g["fused"] = True if fused else None
        assert trainer.step(batch, nan_loss)["train/skipped_nonfinite"] == 1.0 and not trainer.optimizer.state
        trained = [p for g in trainer.optimizer.param_groups for p in g["params"]]
        start = [p.detach().clone() for p in trained]
        gen = torch.Generator().manual_seed(1)
        for _ in range(4):
            for p in trained:
                p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
            trainer.optimizer.step()
        assert not any(torch.equal(p, p0) for p, p0 in zip(trained, start))
        return trainer, trained

    fused, trained = run(True)
    _, loop = run(False)
    if case == "lora":  # only the adapters train: A [4, in] and B [out, 4] of 3 layers in each of 2 blocks
        assert len(trained) == 12 and all(4 in p.shape for p in trained)
    if case == "critic":
        assert [g["lr"] for g in fused.optimizer.param_groups] == [1e-2, 3e-3]
    bf16 = case == "bf16"
    assert all(p.dtype == (torch.bfloat16 if bf16 else torch.float32) for p in trained)
    for a, b in zip(trained, loop):
        torch.testing.assert_close(a.float(), b.float(), rtol=2 ** -6 if bf16 else 1e-5, atol=1e-3 if bf16 else 1e-7)


def test_a_state_saved_by_the_per_parameter_loop_continues_bit_identically(tiny_gpt):
    """A run started before AdamW was fused (its checkpoint's param groups say fused: None), resumed by a trainer
    that builds a fused AdamW: the resumed steps are the loop's, bit for bit, the PPO critic's group too (the
    fused kernel's rounding differs from the loop's in the last bits, so a resume that went fused would not be)."""
    model, tok = tiny_gpt
    algo = get_algorithm("ppo")
    data = batches(model, tok, algo)
    start = copy.deepcopy(model.state_dict())

    def built_by_the_loop(m, critic_from=None):  # what Trainer built before the fused kernel
        trainer, critic = build(m, algo, critic_from)
        for g in trainer.optimizer.param_groups:
            g["fused"] = None
        return trainer, critic

    trainer, critic = built_by_the_loop(model)
    straight = [trainer.step(b, algo.compute_loss) for b in data]
    final = {n: p.detach().clone() for n, p in model.named_parameters()}
    final_critic = copy.deepcopy(critic.state_dict())

    model.load_state_dict(start)
    trainer, critic = built_by_the_loop(model)
    resumed = [trainer.step(data[0], algo.compute_loss)]
    state = copy.deepcopy(trainer.state_dict())
    weights, critic_weights = copy.deepcopy(model.state_dict()), copy.deepcopy(critic.state_dict())

    from rlpost.models.gpt_mini import GPT

    new_model = GPT(model.config)
    new_model.load_state_dict(weights)
    new_trainer, _ = build(new_model, algo, critic_from=critic_weights)
    assert all(g["fused"] for g in new_trainer.optimizer.param_groups)  # a fresh trainer is fused
    new_trainer.load_state_dict(state)
    assert len(new_trainer.optimizer.param_groups) == 2
    assert all(not g["fused"] for g in new_trainer.optimizer.param_groups)
    resumed += [new_trainer.step(b, algo.compute_loss) for b in data[1:]]
    for n, p in new_model.named_parameters():
        assert torch.equal(p, final[n]), n
    for n, v in new_trainer.critic.state_dict().items():
        assert torch.equal(v, final_critic[n]), n
    assert resumed == straight


def test_critic_state_dict_holds_its_own_weights_only(tiny_gpt):
    model, _ = tiny_gpt
    assert list(Critic.build(model, "head").state_dict()) == ["head.weight", "head.bias"]  # the trunk is the policy's
    separate = Critic.build(model, "separate").state_dict()
    assert {"head.weight", "head.bias"} < set(separate) and any(k.startswith("trunk.") for k in separate)


def test_a_state_that_does_not_fit_is_named(tiny_gpt):
    model, _ = tiny_gpt
    with_critic = Trainer(model, TrainerConfig(lr=1e-3), critic=Critic.build(model, "separate")).state_dict()
    with pytest.raises(ValueError, match="does not fit this model and critic"):
        Trainer(model, TrainerConfig(lr=1e-3)).load_state_dict(with_critic)
    with pytest.raises(ValueError, match="trainer state lacks generator, steps"):
        Trainer(model, TrainerConfig(lr=1e-3)).load_state_dict({k: v for k, v in with_critic.items()
                                                 if k not in ("steps", "generator")})


# ---------------------------------------------------------------------------- SFT's optimizer


def supervised_stage(section: str, overrides: list[str]):
    from rlpost.config import load_config
    from rlpost.stages.rejection import RejectionStage
    from rlpost.stages.sft import SFTStage

    cfg = load_config(None, overrides)
    if section == "sft":
        return SFTStage(cfg.sft, cfg.trainer)
    return RejectionStage(cfg.rejection, cfg.rollout, cfg.trainer, cfg.eval)


@pytest.mark.parametrize("section", ["sft", "rejection"])
def test_supervised_stages_take_their_optimizer_from_their_own_section(tiny_gpt, section):
    """SFT's AdamW and schedule were literals in SupervisedStage.build_trainer; they are `sft.*` (and, for
    rejection-sampling SFT, `rejection.*`) keys whose defaults are those literals, and RL's `trainer.*`
    optimizer keys do not leak into them."""
    from types import SimpleNamespace

    model, _ = tiny_gpt
    ctx = SimpleNamespace(model=model)
    stage = supervised_stage(section, [f"{section}.steps=40", "trainer.weight_decay=0.3", "trainer.grad_clip=7"])
    stage.build_trainer(ctx, seed=0)
    group, trainer = stage.trainer.optimizer.param_groups[0], stage.trainer
    assert (group["betas"], group["weight_decay"], trainer.grad_clip) == ((0.9, 0.95), 0.1, 1.0)
    assert trainer.schedule.state_dict() == {"kind": "cosine", "warmup_steps": stage.cfg.warmup_steps,
                                             "total_steps": 40, "min_lr_ratio": 0.1}
    stage = supervised_stage(section, [f"{section}.steps=40", f"{section}.lr=0.01", f"{section}.weight_decay=0.05",
                                       f"{section}.adam_beta1=0.8", f"{section}.adam_beta2=0.99",
                                       f"{section}.grad_clip=0.5", f"{section}.min_lr_ratio=0.2",
                                       f"{section}.warmup_steps=0"])
    stage.build_trainer(ctx, seed=0)
    group, trainer = stage.trainer.optimizer.param_groups[0], stage.trainer
    assert (group["betas"], group["weight_decay"], trainer.grad_clip, trainer.base_lrs) == ((0.8, 0.99), 0.05, 0.5,
                                                                                            [0.01])
    assert trainer.schedule.min_lr_ratio == 0.2 and trainer.schedule.factor(40) == pytest.approx(0.2)  # the floor
