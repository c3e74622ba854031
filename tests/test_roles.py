"""Unit tests of the reward, reference, trainer and weight-sync roles."""

import copy
import math
import sys

import pytest
import torch

from rlpost.config import TrainerConfig
from rlpost.reference import Reference
from rlpost.env.reward import Reward, RewardError, load_reward_fn
from rlpost.rollout import SamplingParams
from rlpost.rollout.native import NativeEngine
from rlpost.stages.sft import nll_loss
from rlpost.tasks.arithmetic import arithmetic_task
from rlpost.trainer import NonFiniteLossError, Trainer
from rlpost.weight_sync import WeightSync


def rollout(model, tok, prompts=("12+34=", "50+50="), k=2, seed=0):
    engine = NativeEngine(model, tok)
    batch = engine.generate([tok.encode_prompt(p) for p in prompts], k, SamplingParams(max_new_tokens=4), seed=seed)
    rows = [{"prompt": p, "answer": "0"} for p in prompts for _ in range(k)]
    return batch.replace(meta={**batch.meta, "row": rows})


# ---------------------------------------------------------------------------- reward

def test_reward_scores_decoded_completions(tiny_gpt):
    model, tok = tiny_gpt
    batch = rollout(model, tok)
    seen = []
    scored, metrics = Reward(lambda c, row: seen.append((c, row["prompt"])) or len(c), tok)(batch)
    assert scored.rewards.tolist() == [float(len(c)) for c in scored.meta["completion"]]
    assert [p for _, p in seen] == ["12+34="] * 2 + ["50+50="] * 2 and metrics["reward/errors"] == 0


def test_arithmetic_verifier_compares_values():
    task = arithmetic_task(num_eval=10)
    row = {"prompt": "07+85=", "answer": "092"}
    assert task.verify("092", row) == 1.0 and task.verify("92", row) == 1.0
    assert task.verify("093", row) == 0.0 and task.verify("", row) == 0.0 and task.verify("9+2", row) == 0.0


def test_reward_that_raises_names_the_sample(tiny_gpt):
    model, tok = tiny_gpt
    batch = rollout(model, tok)

    def flaky(completion, row):
        if row["prompt"] == "50+50=":
            raise KeyError("gold")
        return 1.0

    with pytest.raises(RewardError, match=r"failed on sample 2 \(prompt '50\+50=', completion .*KeyError"):
        Reward(flaky, tok)(batch)
    scored, metrics = Reward(flaky, tok, on_error="zero")(batch)
    assert scored.rewards.tolist() == [1.0, 1.0, 0.0, 0.0] and metrics["reward/errors"] == 2


def test_non_finite_reward_is_an_error(tiny_gpt):
    model, tok = tiny_gpt
    with pytest.raises(RewardError, match="non-finite"):
        Reward(lambda c, r: math.nan, tok)(rollout(model, tok))


def test_reward_spec_loading():
    assert load_reward_fn("rlpost.tasks:answer_match")("5", "5") == 1.0
    with pytest.raises(ValueError, match="module:function"):
        load_reward_fn("nocolon")
    with pytest.raises(ValueError, match="cannot load"):
        load_reward_fn("rlpost.tasks:nope")


def test_reward_module_is_found_in_the_working_directory(tmp_path, monkeypatch):
    """As `python -m` would: the console script does not put the working directory on sys.path."""
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".")])  # as under the console script
    (tmp_path / "cwd_reward_module.py").write_text("def score(completion, row):\n    return 0.5\n")
    monkeypatch.chdir(tmp_path)
    assert load_reward_fn("cwd_reward_module:score")("x", {}) == 0.5
    with pytest.raises(ValueError, match=f"working directory {tmp_path}"):
        load_reward_fn("no_such_reward_module:score")


# ---------------------------------------------------------------------------- reference

def test_reference_is_frozen_while_the_policy_trains(tiny_gpt):
    model, tok = tiny_gpt
    ref = Reference(model)
    assert all(not p.requires_grad for p in ref.model.parameters())
    batch = rollout(model, tok)
    before = ref(batch).ref_logp
    trainer = Trainer(model, TrainerConfig(lr=1e-2))
    for _ in range(3):
        trainer.step(batch, nll_loss)
    after = ref(batch).ref_logp
    assert torch.equal(before, after) and (before[batch.response_mask == 0] == 0).all()
    assert before.grad_fn is None


# ---------------------------------------------------------------------------- trainer

def test_trainer_takes_any_loss_callable_and_changes_weights(tiny_gpt):
    model, tok = tiny_gpt
    before = [p.detach().clone() for p in model.parameters()]
    trainer = Trainer(model, TrainerConfig(lr=1e-2))
    metrics = trainer.step(rollout(model, tok), lambda logp, b: (-logp.sum(), {"x": 2.0}))
    assert metrics["x"] == 2.0 and metrics["train/skipped_nonfinite"] == 0.0
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_trainer_reports_engine_trainer_mismatch_near_zero(tiny_gpt):
    model, tok = tiny_gpt
    metrics = Trainer(model, TrainerConfig(lr=0.0)).step(rollout(model, tok), nll_loss)
    assert metrics["rollout/logp_mismatch_max"] < 1e-5


def test_micro_batching_equals_one_large_batch(tiny_gpt):
    model, tok = tiny_gpt
    batch = rollout(model, tok, prompts=("1+1=", "22+3=", "45+67="), k=3)

    def gradient(micro_batch_size):  # what Trainer.step accumulates, caught by hooks before it steps
        m = copy.deepcopy(model)
        grads = {n: torch.zeros_like(p) for n, p in m.named_parameters()}
        for n, p in m.named_parameters():
            p.register_hook(lambda g, n=n: grads[n].add_(g))
        Trainer(m, TrainerConfig(lr=0.0, grad_clip=0.0, micro_batch_size=micro_batch_size)).step(batch, nll_loss)
        return torch.cat([g.flatten() for g in grads.values()])

    full, accumulated = gradient(None), gradient(2)
    assert full.abs().sum() > 0 and torch.allclose(full, accumulated, atol=1e-6)


def test_non_finite_loss_skips_the_update_then_stops(tiny_gpt):
    model, tok = tiny_gpt
    batch = rollout(model, tok)
    trainer = Trainer(model, TrainerConfig(lr=1e-2, max_nonfinite_steps=2))
    before = [p.detach().clone() for p in model.parameters()]
    nan_loss = lambda logp, b: ((logp * b.response_mask).sum() * float("nan"), {})  # noqa: E731
    metrics = trainer.step(batch, nan_loss)
    assert metrics["train/skipped_nonfinite"] == 1.0
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # nothing applied
    trainer.step(batch, nll_loss)  # a good step resets the count
    trainer.step(batch, nan_loss)
    with pytest.raises(NonFiniteLossError, match="2 non-finite"):
        trainer.step(batch, nan_loss)


# ---------------------------------------------------------------------------- weight sync

@pytest.mark.parametrize("mode", ["pointer", "copy"])
def test_weight_sync_delivers_fresh_weights_and_versions(tiny_gpt, mode):
    model, tok = tiny_gpt
    engine = NativeEngine(model, tok, share_weights=mode == "pointer")
    sync = WeightSync(model, engine)
    assert sync.mode == mode  # the engine's own way
    prompt, params = [tok.encode_prompt("1+1=")], SamplingParams(max_new_tokens=3, temperature=0.0)
    before = engine.generate(prompt, 2, params)
    assert before.policy_version.tolist() == [0, 0] and engine.version == 0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    fresh = NativeEngine(model, tok).generate(prompt, 2, params)  # what the new weights sample
    assert not torch.equal(fresh.old_logp, before.old_logp)
    if mode == "copy":  # before the sync the engine still has the old weights
        assert torch.equal(engine.generate(prompt, 2, params).old_logp, before.old_logp)
    metrics = sync.sync()
    assert metrics["sync/version"] == 1.0 and engine.version == 1
    assert (metrics["sync/bytes"] > 0) == (mode == "copy")
    batch = engine.generate(prompt, 2, params)
    assert torch.equal(batch.input_ids, fresh.input_ids) and torch.allclose(batch.old_logp, fresh.old_logp)
    assert batch.policy_version.tolist() == [1, 1]


# ---------------------------------------------------------------------------- greedy rollouts

@pytest.mark.parametrize("name, options", [("grpo", {"beta": 0.1}), ("ppo", {"beta": 0.1}),
                                           ("grpo", {"rollout_correction": "tis"})])
def test_greedy_rollouts_score_finite_through_every_scorer(tiny_gpt, name, options):
    """rollout.temperature=0: the engine reports old_logp under the untempered policy, and every scorer handed
    the same SamplingParams (the reference, the trainer's loss and its proximal log-probs, a distillation
    teacher) scores at that temperature: finite log-probs, KL and loss, and the trainer sees what the engine
    reported. Scoring at the sampling temperature itself (logits / 0) made every one of them NaN."""
    from rlpost import get_algorithm
    from rlpost.critic import Critic
    from rlpost.env.teacher import TeacherReward

    model, tok = tiny_gpt
    params = SamplingParams(max_new_tokens=4, temperature=0.0)
    prompts = ["12+34=", "50+50=", "7+8="]
    batch = NativeEngine(model, tok).generate([tok.encode_prompt(p) for p in prompts], 2, params, seed=0)
    assert torch.equal(batch.input_ids[0], batch.input_ids[1])  # greedy: a prompt's samples are the same
    batch = batch.replace(rewards=torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0]))
    cfg, algo = TrainerConfig(lr=1e-2), get_algorithm(name, **options)
    critic = Critic.build(model, "separate", cfg) if algo.uses_critic else None
    reference = Reference(model, cfg, params) if algo.uses_reference else None
    trainer = Trainer(model, cfg, params, critic=critic)
    teacher = TeacherReward(copy.deepcopy(model), tok, params=params)
    _, distill = teacher(batch.replace(meta={**batch.meta, "row": [{}] * len(batch)}))
    assert distill["distill/reverse_kl"] == pytest.approx(0.0, abs=1e-5)  # the same policy, scored alike
    if reference is not None:
        batch = reference(batch)
        assert torch.isfinite(batch.ref_logp).all()
    if critic is not None:
        with torch.no_grad():
            batch = batch.replace(values=critic(batch))
    if algo.needs_proximal_logp:
        batch = batch.replace(rollout_logp=batch.old_logp, old_logp=trainer.logprobs(batch))
        assert torch.isfinite(batch.old_logp).all()
        assert (batch.old_logp - batch.rollout_logp).abs().max() < 1e-4
    metrics = trainer.step(algo.compute_advantages(batch), algo.compute_loss)
    assert metrics["train/skipped_nonfinite"] == 0.0
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert metrics["train/grad_norm"] > 0 and metrics["rollout/logp_mismatch_max"] < 1e-4
    if reference is not None:
        assert metrics["loss/kl_ref"] == pytest.approx(0.0, abs=1e-5)  # the first step: policy == reference
