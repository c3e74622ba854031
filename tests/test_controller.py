"""The controller's generic rules (refilling filtered batches), the critic role, epochs x minibatches."""

import json

import pytest
import torch

from rlpost import get_algorithm
from rlpost.config import RLConfig, RolloutConfig, TrainerConfig, load_config
from rlpost.controller import Controller, Roles
from rlpost.critic import Critic
from rlpost.run import train
from rlpost.reference import Reference
from rlpost.env.reward import Reward
from rlpost.rollout import SamplingParams
from rlpost.rollout.native import NativeEngine
from rlpost.stages.sft import nll_loss
from rlpost.trainer import Trainer
from rlpost.weight_sync import WeightSync


class SpyTrainer(Trainer):
    """Records every batch it is asked to train on."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.seen = []

    def step(self, batch, loss_fn):
        self.seen.append(batch)
        return super().step(batch, loss_fn)


def half_easy_reward(completion, row):
    """Prompts starting with 1 are 'easy' (every sample right: a degenerate group); others depend on the sample."""
    return 1.0 if row["prompt"].startswith("1") else float(len(completion) % 2)


def test_dapo_never_trains_on_a_degenerate_group_and_refills(tiny_gpt):
    model, tok = tiny_gpt
    rows = [{"prompt": f"{a}+{b}=", "answer": "0"} for a in range(10, 30) for b in range(3)]
    engine = NativeEngine(model, tok)
    trainer = SpyTrainer(model, TrainerConfig(lr=1e-3))
    algo = get_algorithm("dapo")
    roles = Roles(engine=engine, reward=Reward(half_easy_reward, tok), algorithm=algo, trainer=trainer,
                  weight_sync=WeightSync(model, engine))
    ctl = Controller(roles, RLConfig(), SamplingParams(max_new_tokens=5),
                     RolloutConfig(prompts_per_step=6, k=4, max_refill_rounds=6),
                     rows=rows, prompt_ids=[tok.encode_prompt(r["prompt"]) for r in rows], seed=0)
    for step in range(1, 4):
        metrics = ctl.step(step)
        batch = trainer.seen[-1]
        for g in batch.group_ids.unique():
            r = batch.rewards[batch.group_ids == g]
            assert r.max() > r.min(), "a degenerate group reached the trainer"
        assert metrics["rollout/trained_groups"] == len(batch.group_ids.unique()) == 6
        assert metrics["rollout/degenerate_group_frac"] > 0  # there was something to drop


def test_trainer_epochs_and_minibatches_take_that_many_optimizer_steps(tiny_gpt):
    model, tok = tiny_gpt
    engine = NativeEngine(model, tok)
    batch = engine.generate([tok.encode_prompt("1+2="), tok.encode_prompt("3+4=")], 4,
                            SamplingParams(max_new_tokens=3))
    trainer = Trainer(model, TrainerConfig(lr=1e-3, epochs=3, minibatches=2))
    metrics = trainer.step(batch, nll_loss)
    assert trainer.steps == 6 and metrics["rollout/logp_mismatch_max"] < 1e-5  # measured before any update


def test_critic_values_are_aligned_and_masked(tiny_gpt):
    model, tok = tiny_gpt
    batch = NativeEngine(model, tok).generate([tok.encode_prompt("12+3=")], 3, SamplingParams(max_new_tokens=4))
    critic = Critic.build(model, "separate")
    torch.nn.init.normal_(critic.head.weight)
    v = critic(batch)
    assert v.shape == batch.input_ids.shape and (v[batch.response_mask == 0] == 0).all()
    # values[b, t] reads the hidden state at t-1
    h = critic.trunk.hidden_states(batch.input_ids, batch.attention_mask,
                                   (batch.attention_mask.cumsum(1) - 1).clamp(min=0))
    t = batch.prompt_width
    assert torch.allclose(v[:, t], critic.head(h[:, t - 1]).squeeze(-1), atol=1e-6)


def test_critic_kinds_share_or_copy_the_trunk(tiny_gpt):
    model, _ = tiny_gpt
    head, separate = Critic.build(model, "head"), Critic.build(model, "separate")
    assert [n for n, _ in head.named_parameters()] == ["head.weight", "head.bias"]  # the trunk is the policy's
    policy_ids = {id(p) for p in model.parameters()}
    assert not policy_ids & {id(p) for p in separate.parameters()}
    with pytest.raises(ValueError, match="must be one of separate, head"):
        Critic.build(model, "shared")


@pytest.mark.parametrize("kind", ["separate", "head"])
def test_ppo_runs_end_to_end_with_either_critic(tmp_path, kind):
    cfg = load_config(None, ["algorithm.name=ppo", f"critic.type={kind}", "sft.steps=20", "sft.batch_size=32",
                             "rl.steps=2", "rl.eval_every=0", "task.num_eval=20", "rollout.prompts_per_step=4",
                             "rollout.k=4", "trainer.epochs=2", "trainer.minibatches=2", "model.n_layer=1",
                             "model.n_embd=32", "model.n_head=2", f"out_dir={tmp_path}", "run_name=ppo"])
    assert train(cfg)["status"] == "ok"
    lines = [json.loads(x) for x in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    rl = [m for m in lines if m["stage"] == "rl"]
    assert len(rl) == 2 and "value/loss" in rl[0] and "value/explained_variance" in rl[0]
    assert rl[0]["time/critic"] > 0


def test_reference_free_algorithms_skip_the_reference(tiny_gpt):
    model, tok = tiny_gpt
    engine = NativeEngine(model, tok)
    with pytest.raises(ValueError, match="reads ref_logp"):
        Controller(Roles(engine=engine, reward=None, algorithm=get_algorithm("grpo", beta=0.1), trainer=None,
                         weight_sync=None), RLConfig(), SamplingParams(), RolloutConfig(), rows=[], prompt_ids=[])
    with pytest.raises(ValueError, match="needs a critic"):
        Controller(Roles(engine=engine, reward=None, algorithm=get_algorithm("ppo"), trainer=None, weight_sync=None,
                         reference=Reference(model)), RLConfig(), SamplingParams(), RolloutConfig(), rows=[],
                   prompt_ids=[])


def test_every_step_attributes_its_wall_clock_to_the_roles(tiny_gpt):
    """Seconds and share per role (shares sum to 1), tokens/s and the engine/trainer mismatch
    are in every step's metrics and on the console line. No assertion depends on how fast anything ran."""
    from rlpost.controller import TIMED
    from rlpost.stages.rl import step_line

    model, tok = tiny_gpt
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(10, 14) for b in range(2)]
    engine = NativeEngine(model, tok)
    algo = get_algorithm("grpo", beta=0.04)
    roles = Roles(engine=engine, reward=Reward(half_easy_reward, tok), algorithm=algo,
                  trainer=Trainer(model, TrainerConfig(lr=1e-3)), weight_sync=WeightSync(model, engine),
                  reference=Reference(model))
    ctl = Controller(roles, RLConfig(), SamplingParams(max_new_tokens=4), RolloutConfig(prompts_per_step=2, k=3),
                     rows=rows, prompt_ids=[tok.encode_prompt(r["prompt"]) for r in rows], seed=0)
    m = ctl.step(1)
    for role in ("rollout", "reward", "reference", "advantages", "train", "sync", "other"):
        assert role in TIMED and m[f"time/{role}"] >= 0.0 and 0.0 <= m[f"time_share/{role}"] <= 1.0
    assert sum(m[f"time_share/{r}"] for r in TIMED) == pytest.approx(1.0, abs=1e-6)
    assert sum(m[f"time/{r}"] for r in TIMED) == pytest.approx(m["time/step"], rel=1e-6)
    assert m["rollout/tokens_per_s"] > 0 and m["step/tokens_per_s"] > 0
    assert 0.0 <= m["rollout/logp_mismatch_mean"] <= m["rollout/logp_mismatch_max"] < 1e-4
    line = step_line(1, m)
    for part in ("roll ", "rew ", "ref ", "adv ", "train ", "sync ", "tok/s gen", "tok/s step", "dlogp max"):
        assert part in line, line
    assert json.loads(json.dumps(m)) == m  # one JSON line in metrics.jsonl


class TwoTurns:
    """Two turns per episode, the observation '=' between them; the episode's reward is the half_easy_reward of its
    last turn (easy prompts: every sample right, a group DAPO drops and refills)."""

    def reset(self, row):
        self.row, self.turns = row, 0
        return row["prompt"]

    def step(self, turn):
        from rlpost.env import Step

        self.turns += 1
        if self.turns < 2:
            return Step(observation="=", info={"calls": 1})
        return Step(reward=half_easy_reward(turn, self.row), done=True, info={"calls": 1})


def _refilling_controller(model, tok, reward) -> Controller:
    """DAPO over 60 addition prompts whose groups are often degenerate, so that steps take refill rounds."""
    rows = [{"prompt": f"{a}+{b}=", "answer": "0"} for a in range(10, 30) for b in range(3)]
    engine = NativeEngine(model, tok)
    roles = Roles(engine=engine, reward=reward, algorithm=get_algorithm("dapo"),
                  trainer=Trainer(model, TrainerConfig(lr=1e-3)), weight_sync=WeightSync(model, engine))
    return Controller(roles, RLConfig(), SamplingParams(max_new_tokens=5),
                      RolloutConfig(prompts_per_step=6, k=4, max_refill_rounds=6),
                      rows=rows, prompt_ids=[tok.encode_prompt(r["prompt"]) for r in rows], seed=0)


def test_the_metrics_of_refill_rounds_are_means_over_their_samples_not_sums(tiny_gpt):
    """Every episode takes 2 turns, 1 tool call and 1 environment token, and none hits the budget: env/turns is
    2.0, env/tool_calls 1.0, env/env_tokens 1.0 however many rounds the step took (summed over the rounds, a step
    with one refill logged 4.0, 2.0 and 2.0)."""
    from rlpost.env import EnvRole

    model, tok = tiny_gpt
    ctl = _refilling_controller(model, tok, EnvRole(make=TwoTurns, tokenizer=tok, max_turns=2, max_tokens=64,
                                                    name="two_turns"))
    refilled = 0
    for step in range(1, 4):
        metrics = ctl.step(step)
        refilled += metrics["rollout/refill_rounds"] > 0
        assert metrics["env/turns"] == 2.0 and metrics["env/tool_calls"] == 1.0 and metrics["env/env_tokens"] == 1.0
        assert metrics["env/budget_frac"] == 0.0 and metrics["env/errors"] == 0.0
    assert refilled  # the rule was exercised


class Counting:
    """half_easy_reward with a running count of its calls, as a judge counts since it was built."""

    def __init__(self):
        import threading

        self.calls, self.lock = 0, threading.Lock()

    def __call__(self, completion, row):
        with self.lock:
            self.calls += 1
        return half_easy_reward(completion, row)

    def metrics(self):
        return {"counting/calls": float(self.calls), "calls": float(self.calls)}


def test_a_verifiers_running_totals_are_logged_as_they_stand_after_the_last_round(tiny_gpt):
    """A verifier's counters are totals since it was built: each refill round reports the total so far, so summing
    the rounds counted the earlier rounds' calls again for every later one."""
    model, tok = tiny_gpt
    counting = Counting()
    ctl = _refilling_controller(model, tok, Reward(counting, tok))
    refilled = 0
    for step in range(1, 4):
        metrics = ctl.step(step)
        refilled += metrics["rollout/refill_rounds"] > 0
        assert metrics["counting/calls"] == metrics["reward/calls"] == counting.calls
    assert refilled and counting.calls > 3 * 6 * 4  # the rule was exercised
