"""The RL reward as one key with a registry (rlpost/env/sources.py): the names and options of `rl.reward`, the
old keys as aliases, one reward per run; and the learned sources over task.env's episodes: a reward model
scores the whole episode, a teacher grades the policy's tokens only, a PRM ends steps on the policy's tokens
only, and the environment's own reward is kept as the gold; self-made preference pairs from an environment's
episodes, ranked by its reward, that train only the policy's tokens."""

import json

import pytest
import torch

from rlpost.config import ConfigError, load_config, stage_names
from rlpost.env import EnvRole, Step
from rlpost.env.base import Env
from rlpost.env.process_reward import ProcessReward, episode_steps
from rlpost.env.process_reward_model import ProcessRewardModel, holds_separator
from rlpost.env.reward_model import LearnedReward, RewardModel
from rlpost.env.source import over_episodes
from rlpost.env.sources import SourceInputs, available, build_rl_reward, rl_reward_spec
from rlpost.env.teacher import TeacherReward
from rlpost.models import save_model, token_logprobs
from rlpost.models.gpt_mini import GPT, GPTConfig
from rlpost.preference.data import pairs_from_samples, tokenize_preferences
from rlpost.env.reward import Reward
from rlpost.rollout import SamplingParams, build_engine
from rlpost.rollout.episodes import episodes_in_chunks, run_episodes
from rlpost.run import RunLog, build_context, make_run_dir, train

ROWS = [{"prompt": "12+34=", "answer": "46"}, {"prompt": "7+8=", "answer": "15"}]


class TwoTurns(Env):
    """Two turns; after the first it answers '+1=' (which holds the PRM's separator '+' of these tests);
    0.25 per turn, summed or (per_turn) on each turn's last token."""

    def __init__(self, per_turn=False):
        self.n, self.per_turn_rewards = 0, per_turn

    def reset(self, row):
        return row["prompt"]

    def step(self, turn):
        self.n += 1
        return Step(observation="+1=", reward=0.25 * self.n, done=self.n >= 2)


def env_role(tok, per_turn=False):
    return EnvRole(make=lambda: TwoTurns(per_turn), tokenizer=tok, max_turns=2, max_tokens=14)


def sample(tiny_gpt, reward, k=2):
    model, tok = tiny_gpt
    engine = build_engine("native", model, tok)
    params = SamplingParams(max_new_tokens=4, temperature=1.0)
    return run_episodes(engine, reward, ROWS, [tok.encode_prompt(r["prompt"]) for r in ROWS], k, params, seed=3)


def env_positions(batch):
    """[B, T]: the environment's tokens (attended, after the prompt, not the policy's)."""
    region = torch.zeros_like(batch.attention_mask, dtype=torch.bool)
    region[:, batch.prompt_width:] = True
    return region & batch.attention_mask.bool() & ~batch.response_mask.bool()


def other_gpt(tok, seed=1):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=24, n_layer=2, n_head=2, n_embd=32))


# ---------------------------------------------------------------------------- rl.reward and its aliases

def test_every_source_is_registered_and_the_default_is_the_verifier():
    assert set(available()) == {"verifier", "reward_model", "teacher", "prm"}
    cfg = load_config(None, [])
    assert cfg.rl.reward == {"name": "verifier"}
    assert rl_reward_spec(cfg, stage_names(cfg)) == ("verifier", {}, {})


@pytest.mark.parametrize("alias, explicit, name, options", [
    (["distill.teacher=t", "distill.coef=0.5"], ["rl.reward={name: teacher, teacher: t, coef: 0.5}"], "teacher",
     {"teacher": "t", "coef": 0.5}),
    (["prm.path=p", "prm.reward=score", "prm.separator=/"], ["rl.reward={name: prm, path: p, reward: score, "
                                                             "separator: /}"], "prm",
     {"path": "p", "reward": "score", "separator": "/"}),
    (["reward_model.train=true"], ["rl.reward={name: reward_model}", "reward_model.train=true"], "reward_model", {}),
])
def test_the_old_keys_are_aliases_of_rl_reward(alias, explicit, name, options):
    a, b = load_config(None, alias), load_config(None, explicit)
    assert rl_reward_spec(a, stage_names(a))[:2] == rl_reward_spec(b, stage_names(b))[:2] == (name, options)
    # the old key and the same value in rl.reward agree: one reward, set twice alike
    both = load_config(None, alias + explicit)
    assert rl_reward_spec(both, stage_names(both))[:2] == (name, options)


@pytest.mark.parametrize("overrides, message", [
    (["distill.teacher=t", "rl.reward={name: prm, path: p}"],
     r"rl.reward.name=prm and distill.teacher='t' \(which means rl.reward.name=teacher\) both choose the RL reward"),
    (["distill.teacher=t", "reward_model.train=true"], "a reward_model stage and distill.teacher='t' both choose"),
    (["distill.teacher=t", "rl.reward={name: teacher, teacher: u}"],
     r"rl.reward.teacher='u' and distill.teacher='t' set the same option .* set it once \(rl.reward.teacher\)"),
    (["distill.coef=2", "rl.reward={name: teacher, teacher: u, coef: 3}"], "rl.reward.coef=3 and distill.coef=2"),
    (["rl.reward={name: judge}"], "'rl.reward.name' is 'judge'; valid RL reward sources: prm, reward_model, "
                                  "teacher, verifier"),
    (["rl.reward={path: p}"], "config key 'rl.reward' needs a 'name'"),
    (["rl.reward={name: teacher, teacher: t, temperature: 2}"], r"unknown parameter\(s\) 'temperature' for "
                                                                 r"rl.reward \(name: teacher\)"),
    (["rl.reward={name: teacher, teacher: t, coef: 0}"], "config key 'rl.reward.coef' must be > 0, got 0"),
    (["rl.reward={name: teacher}"], "needs rl.reward.teacher"),
    (["rl.reward={name: prm, path: p, reward: sum}"], "'rl.reward.reward' is 'sum'; valid values: score, delta"),
    (["rl.reward={name: reward_model}"], "which this run does not have"),
    (["rl.reward={name: teacher, teacher: t}", "rl.steps=0"],
     r"rl.reward.teacher is the RL stage's reward; it needs an RL stage"),
    (["distill.teacher=t", "stages=[sft, {rl: {rl.reward: {name: verifier}}}]"], "built once for the whole run"),
    (["rl.reward={name: teacher, teacher: t}", "stages=[sft, {rl: {rollout.temperature: 0.5}}]"],
     "the distillation teacher scores at the run's rollout.temperature"),
])
def test_rl_reward_conflicts_and_bad_options_are_one_clear_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


@pytest.mark.parametrize("overrides", [
    ["distill.teacher=t"], ["prm.path=p"], ["reward_model.train=true"], ["rl.reward={name: teacher, teacher: t}"],
])
def test_a_learned_reward_with_task_env_is_accepted(overrides):
    cfg = load_config(None, ["task.name=multiply", "task.env=calculator"] + overrides)
    assert rl_reward_spec(cfg, stage_names(cfg))[0] != "verifier"


# ---------------------------------------------------------------------------- learned sources over episodes

def test_one_turn_sources_are_the_scorers_themselves(tiny_gpt):
    model, tok = tiny_gpt
    verifier = Reward(lambda completion, row: 1.0, tok)
    inputs = SourceInputs(None, tok, verifier, [r["prompt"] for r in ROWS])
    assert build_rl_reward("verifier", {}, inputs) is verifier
    assert build_rl_reward("reward_model", {}, inputs) is verifier  # until the reward_model stage supplies it
    rm = RewardModel.from_policy(model)
    inputs.reward_model = (rm, tok)
    reward = build_rl_reward("reward_model", {}, inputs)
    assert isinstance(reward, LearnedReward) and reward.gold is verifier.fn


def test_a_reward_model_scores_each_whole_episode_and_keeps_the_envs_reward_as_gold(tiny_gpt):
    model, tok = tiny_gpt
    verifier = env_role(tok)
    rm = RewardModel.from_policy(model)
    torch.nn.init.normal_(rm.head.weight, std=1.0)  # a head that tells sequences apart
    reward = build_rl_reward("reward_model", {}, SourceInputs(None, tok, verifier, [r["prompt"] for r in ROWS],
                                                              reward_model=(rm, tok)))
    assert isinstance(reward, EnvRole) and reward.rescore is not None and verifier.rescore is None
    plain, _ = sample(tiny_gpt, verifier)
    scored, metrics = sample(tiny_gpt, reward)
    assert torch.equal(scored.input_ids, plain.input_ids)  # the same episodes, played by the environment
    assert env_positions(plain).any()  # the episodes hold observations, which the model reads
    torch.testing.assert_close(scored.rewards, rm.score(plain))
    assert scored.meta["gold_reward"] == plain.rewards.tolist() and set(plain.rewards.tolist()) == {0.75}
    assert scored.meta["completion"] == plain.meta["completion"]  # the episode's text, observations included
    assert metrics["env/turns"] == 2.0 and metrics["time/reward"] >= 0.0


def test_a_teacher_grades_only_the_policys_tokens_of_an_episode(tiny_gpt):
    model, tok = tiny_gpt
    verifier = env_role(tok)
    teacher = other_gpt(tok)
    scored, metrics = sample(tiny_gpt, over_episodes(verifier, TeacherReward(teacher, tok, coef=0.5)))
    policy, env = scored.response_mask.bool(), env_positions(scored)
    assert env.any() and policy.any()
    assert (scored.rewards[~policy] == 0).all()  # observations, prompt and padding: no reward
    expected = -0.5 * (scored.old_logp - token_logprobs(teacher, scored, 1.0))
    torch.testing.assert_close(scored.rewards[policy], expected[policy])
    assert scored.meta["gold_reward"] == [0.75] * len(scored)
    assert metrics["distill/reverse_kl"] == pytest.approx(float(-expected[policy].mean() / 0.5), rel=1e-5)


@pytest.mark.parametrize("per_turn", [False, True])
def test_a_prm_ends_steps_on_the_policys_tokens_and_adds_to_the_envs_reward(tiny_gpt, per_turn):
    model, tok = tiny_gpt
    verifier = env_role(tok, per_turn)
    prm = ProcessRewardModel.from_policy(model)
    torch.nn.init.normal_(prm.head.weight, std=1.0)
    plain, _ = sample(tiny_gpt, verifier)
    scored, metrics = sample(tiny_gpt, over_episodes(verifier, ProcessReward(prm, tok, None, coef=1.0, mode="score",
                                                                             separator="+", episodes=True)))
    assert torch.equal(scored.input_ids, plain.input_ids)
    regions, ends = episode_steps(plain, tok, "+")
    P = plain.prompt_width
    observed = 0
    for b, (region, e) in enumerate(zip(regions, ends)):
        policy = plain.response_mask[b, P:P + len(region)].tolist()
        observed += sum(1 for t, p in zip(region, policy) if not p and holds_separator(t, tok, "+"))
        assert all(policy[i] for i in e)  # the observations' '+' end no step
        assert e == sorted({i for i, (t, p) in enumerate(zip(region, policy)) if p and holds_separator(t, tok, "+")}
                           | {max(i for i, p in enumerate(policy) if p)})
    assert observed == len(scored)  # every episode had an observation holding the separator
    scores = prm.step_scores([plain.input_ids[b, :P][plain.attention_mask[b, :P].bool()].tolist()
                              for b in range(len(plain))], regions, ends, tok.pad_token_id)
    env_total = plain.rewards.sum(1) if per_turn else plain.rewards
    assert scored.rewards.dim() == 2 and (scored.rewards[env_positions(scored)] == 0).all()
    torch.testing.assert_close(scored.rewards.sum(1), env_total + torch.tensor([sum(s) for s in scores]))
    if per_turn:  # the environment's rewards stay where it put them: each turn's last token
        process = scored.rewards.clone()
        for b, e in enumerate(ends):
            for j, s in zip(e, scores[b]):
                process[b, P + j] -= s
        torch.testing.assert_close(process, plain.rewards)
    assert scored.meta["gold_reward"] == env_total.tolist()
    assert metrics["prm/steps_per_response"] == pytest.approx(sum(map(len, ends)) / len(scored))


# ---------------------------------------------------------------------------- the run builds it

def test_build_context_makes_the_teacher_the_rl_reward_of_an_environments_episodes(tmp_path):
    common = ["task.name=multiply", "task.num_eval=20", "task.env=calculator", "task.max_turns=2", "model.n_layer=1",
              "model.n_embd=32", "model.n_head=1", f"out_dir={tmp_path}"]
    cfg = load_config(None, common + ["run_name=student"])
    ctx = build_context(cfg, make_run_dir(cfg, "test"), RunLog(str(tmp_path / "student"), write=False))
    assert ctx.rl_reward is ctx.verifier
    save_model(ctx.model, ctx.tokenizer, str(tmp_path / "teacher"))  # the same vocabulary: a fresh gpt_mini's
    for reward in ([f"distill.teacher={tmp_path / 'teacher'}"],
                   [f"rl.reward={{name: teacher, teacher: {tmp_path / 'teacher'}, coef: 0.5}}"]):
        cfg = load_config(None, common + [f"run_name=distill{len(reward[0])}"] + reward)
        run_dir = make_run_dir(cfg, "test")
        ctx = build_context(cfg, run_dir, RunLog(run_dir, write=False))
        assert isinstance(ctx.rl_reward, EnvRole) and isinstance(ctx.rl_reward.rescore.scorer, TeacherReward)
        assert ctx.rl_reward.rescore.scorer.coef == (0.5 if "coef" in reward[0] else 1.0)
        assert ctx.verifier.rescore is None  # evaluation still scores with the environment


# ---------------------------------------------------------------------------- self-made preference pairs

class Parity(TwoTurns):
    """As TwoTurns, but the episode's reward is its last turn's: 1 when it starts with an even digit."""

    def step(self, turn):
        step = super().step(turn)
        return Step(observation=step.observation, reward=float(step.done and turn[:1] in "02468"), done=step.done)


def test_self_made_preference_pairs_rank_an_environments_episodes_and_train_only_the_policys_tokens(tiny_gpt):
    model, tok = tiny_gpt
    verifier = EnvRole(make=Parity, tokenizer=tok, max_turns=2, max_tokens=14)
    engine = build_engine("native", model, tok)
    params = SamplingParams(max_new_tokens=4, temperature=1.0)
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(3) for b in range(4)]
    prompt_ids = [tok.encode_prompt(r["prompt"]) for r in rows]
    pairs, stats = pairs_from_samples(engine, verifier, rows, prompt_ids, k=4, params=params, seed=5,
                                      batch_prompts=6, episodes=True)
    sampled = {}  # the same episodes, as the episode function gives them: ids -> (reward, policy mask)
    for _, batch in episodes_in_chunks(engine, verifier, rows, prompt_ids, 4, params, 5, 6):
        P = batch.prompt_width
        for b in range(len(batch)):
            n = int(batch.attention_mask[b, P:].sum())
            sampled[tuple(batch.input_ids[b, P:P + n].tolist())] = (float(batch.rewards[b]),
                                                                     batch.response_mask[b, P:P + n].tolist())
    assert pairs and stats["pairs/made"] == len(pairs) < len(rows)  # some prompts' episodes all score alike
    assert stats["pairs/all_right"] + stats["pairs/all_wrong"] + len(pairs) == len(rows)
    for pair in pairs:
        chosen, rejected = sampled[tuple(pair["chosen_tokens"])], sampled[tuple(pair["rejected_tokens"])]
        assert chosen[0] > rejected[0]  # ranked by the environment's reward
        assert pair["chosen_policy"] == chosen[1] and pair["rejected_policy"] == rejected[1]
        assert 0 in pair["chosen_policy"] and tok.decode(pair["chosen_tokens"]) == pair["chosen"]
    data = tokenize_preferences(pairs, tok, max_length=None)
    assert data.completions == [t for p in pairs for t in (p["chosen_tokens"], p["rejected_tokens"])]
    batch = data.batch(list(range(len(data.completions))), tok.pad_token_id)
    P = batch.prompt_width
    for s, completion in enumerate(data.completions):
        assert batch.response_mask[s, P:P + len(completion)].tolist() == data.trained[s]  # observations: 0
        assert batch.attention_mask[s, P:P + len(completion)].all()  # ... but read as context
    kto = data.unpaired()  # KTO's mismatched completions keep their own masks
    kl = kto.batch([0, 1], tok.pad_token_id, kl=True)
    assert kl.response_mask[0, P:P + len(kto.kl_completions[0])].tolist() == kto.kl_trained[0] == data.trained[1]


def test_self_made_preference_pairs_with_task_env_are_accepted():
    cfg = load_config(None, ["task.name=multiply", "task.env=calculator", "stages=[sft, preference, rl]"])
    assert "preference" in stage_names(cfg) and cfg.preference.train_file is None


class ClosedOnce:
    """A task.reward that writes a line to `log` when closed: the run must close it once, though two roles
    (the environment's and the learned reward's) hold it."""

    def __init__(self, log):
        self.log = log

    def __call__(self, completion, row):
        return float(completion.strip() == row["answer"])

    def close(self):
        with open(self.log, "a") as f:
            f.write("closed\n")


@pytest.mark.slow
@pytest.mark.parametrize("source", ["teacher", "prm", "reward_model"])
def test_rl_runs_on_an_environments_episodes_rewarded_by_each_learned_source(tmp_path, source):
    common = ["task.name=multiply", "task.num_eval=8", "task.env=calculator", "task.max_turns=2", "model.n_layer=1",
              "model.n_embd=32", "model.n_head=1", f"out_dir={tmp_path}", "sft.steps=0", "rl.steps=2",
              "rl.eval_every=0", "rl.save_every=0", "rollout.prompts_per_step=2", "rollout.k=2",
              "eval.samples_per_prompt=1", "threads=1"]
    cfg = load_config(None, common + ["run_name=student", "rl.steps=0"])
    ctx = build_context(cfg, make_run_dir(cfg, "test"), RunLog(str(tmp_path / "student"), write=False))
    folder = str(tmp_path / source)
    if source == "teacher":
        save_model(ctx.model, ctx.tokenizer, folder)
        extra = [f"rl.reward={{name: teacher, teacher: {folder}}}", "algorithm={name: reinforce_pp, beta: 0}"]
    elif source == "prm":
        ProcessRewardModel.from_policy(ctx.model).save(folder, ctx.tokenizer)
        extra = [f"prm.path={folder}", "prm.separator='*'"]
    else:
        RewardModel.from_policy(ctx.model).save(folder, ctx.tokenizer)
        extra = [f"reward_model.path={folder}"]
    closes = tmp_path / "closes.txt"
    summary = train(load_config(None, common + ["run_name=rl", "task.reward=tests.test_sources:ClosedOnce",
                                                f"task.reward_options={{log: {closes}}}"] + extra))
    assert summary["status"] == "ok" and closes.read_text() == "closed\n"
    steps = [json.loads(line) for line in open(tmp_path / "rl" / "metrics.jsonl") if '"stage": "rl"' in line]
    assert len(steps) == 2 and all("reward/gold_mean" in m and "env/turns" in m for m in steps)
    assert all(("distill/reverse_kl" in m) == (source == "teacher") and ("prm/step_score_mean" in m)
               == (source == "prm") for m in steps)
