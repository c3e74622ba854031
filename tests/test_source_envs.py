"""task.sources[i].env: each source's episodes run in its own environment (a one-turn source stays a verifier),
side by side in one rollout; per-source metrics; the entries' env keys checked at config load."""

import dataclasses
import json
import re

import pytest
import torch

from rlpost.batch import Batch
from rlpost.config import ConfigError, load_config
from rlpost.env import Env, EnvError, EnvRole
from rlpost.env.per_source import SourceRoles
from rlpost.env.reward import Reward
from rlpost.env.tools import CalculatorEnv
from rlpost.env.verifiers import SourceRewards, reward_role
from rlpost.models.gpt_mini import CharTokenizer
from rlpost.prompts import SOURCE_KEY
from rlpost.report import build_report
from rlpost.rollout import SamplingParams
from rlpost.rollout.episodes import run_episodes
from rlpost.run import train
from rlpost.stages.rl import sample_records
from rlpost.tasks import answer_match_reward, load_task

from test_report import read_page
from test_resume import resume_after_step_2

CALCULATOR = {"call_open": "?", "call_close": "", "result_open": "=", "result_close": ";", "max_calls": 1,
              "error_text": ""}  # recipes/tool_calculator.yaml's markers


class Solver:
    """An engine that answers each prompt by its text: after a calculator's answer ('=56088;') that answer,
    for a product a call ('?123*456'), for a sum the sum. It records how many samples each call made."""

    version = 0

    def __init__(self, tok):
        self.tok, self.calls = tok, []

    def answer(self, text: str) -> str:
        if text.endswith(";"):
            return re.findall(r"=(\d+);$", text)[0]
        if "*" in text:
            return "?" + text.rstrip("=")
        a, b = text.rstrip("=").split("+")
        return str(int(a) + int(b))

    def generate(self, prompts, k, params, seed=0):
        self.calls.append(len(prompts) * k)
        outs = [self.tok.encode_completion(self.answer(self.tok.decode(p)))[:params.max_new_tokens - 1]
                + [self.tok.eos_token_id] for p in prompts for _ in range(k)]
        width = max(map(len, outs))
        tokens = torch.tensor([o + [self.tok.pad_token_id] * (width - len(o)) for o in outs])
        return Batch.from_sequences(prompts, k, tokens, torch.full(tokens.shape, -0.5),
                                    torch.tensor([len(o) for o in outs]), torch.tensor([True] * len(outs)),
                                    self.tok.pad_token_id, self.version)


ROWS = [{"prompt": "1+1=", "answer": "2", SOURCE_KEY: "add"},
        {"prompt": "123*456=", "answer": "56088", SOURCE_KEY: "tools"},
        {"prompt": "20+2=", "answer": "22", SOURCE_KEY: "add"}]


def mixed(tok, make=lambda: CalculatorEnv(answer_match_reward, **CALCULATOR), on_error="raise"):
    tools = EnvRole(make=make, tokenizer=tok, max_turns=2, max_tokens=30, name="calculator", on_error=on_error)
    return SourceRoles({"add": Reward(answer_match_reward, tok), "tools": tools},
                       SourceRewards({"add": answer_match_reward, "tools": answer_match_reward}))


def rollout(role, tok, rows=ROWS, k=2, engine=None):
    engine = engine or Solver(tok)
    batch, metrics = run_episodes(engine, role, rows, [tok.encode_prompt(r["prompt"]) for r in rows], k,
                                  SamplingParams(max_new_tokens=10), 0)
    return batch, metrics, engine


def test_each_sample_runs_in_its_sources_role_in_one_batch():
    tok = CharTokenizer("0123456789*?=;+")
    batch, metrics, engine = rollout(mixed(tok), tok)
    # the first turn of every source in one engine call (3 rows, 2 samples each), then the tool source's answer
    assert engine.calls == [6, 2]
    assert [r[SOURCE_KEY] for r in batch.meta["row"]] == ["add", "add", "tools", "tools", "add", "add"]
    assert batch.group_ids.tolist() == [0, 0, 1, 1, 2, 2]
    assert batch.meta["turns"] == [1, 1, 2, 2, 1, 1] and batch.rewards.tolist() == [1.0] * 6
    assert batch.meta["completion"] == ["2", "2", "?123*456=56088;56088", "?123*456=56088;56088", "22", "22"]
    # the tool source's rows hold the calculator's tokens, masked; the one-turn rows have none
    P = batch.prompt_width
    env = batch.attention_mask.bool() & ~batch.response_mask.bool()
    env[:, :P] = False
    assert [int(env[b].sum()) for b in range(6)] == [0, 0, 7, 7, 0, 0]
    assert (batch.old_logp[env] == 0).all() and (batch.old_logp[batch.response_mask.bool()] == -0.5).all()
    # the tool source's rows are those its environment makes alone, token for token
    alone, _, _ = rollout(mixed(tok).roles["tools"], tok, [ROWS[1]])
    n = alone.input_ids.shape[1] - alone.prompt_width
    assert torch.equal(batch.input_ids[2:4, P:P + n], alone.input_ids[:, alone.prompt_width:])
    assert torch.equal(batch.response_mask[2:4, P:P + n], alone.response_mask[:, alone.prompt_width:])
    # the environment's metrics over its own episodes, and again under its source's name
    assert metrics["env/turns"] == 2.0 and metrics["env/turns_tools"] == 2.0
    assert metrics["env/env_tokens_tools"] == 7.0 and metrics["env/errors_tools"] == 0.0
    assert metrics["reward/errors"] == 0.0 and not any(k.endswith("_add") for k in metrics)
    # rollouts.jsonl: every sample's turns, the one-turn samples as episodes of one turn
    records = sample_records(1, batch, tok)
    assert [len(r["turns"]) for r in records] == [1, 1, 2, 2, 1, 1]
    assert records[2]["turns"][0]["observation"] == "=56088;" and records[0]["turns"][0]["policy"] == "2"
    assert records[0]["prompt"] == "1+1=" and records[0]["reward"] == 1.0


def test_a_batch_of_one_source_and_a_mix_keep_the_rows_order():
    tok = CharTokenizer("0123456789*?=;+")
    rows = [ROWS[1], ROWS[0], ROWS[1]]  # tools first, twice
    batch, metrics, engine = rollout(mixed(tok), tok, rows, k=1)
    assert [r[SOURCE_KEY] for r in batch.meta["row"]] == ["tools", "add", "tools"]
    assert batch.meta["turns"] == [2, 1, 2] and engine.calls == [3, 2]
    only_add, metrics, _ = rollout(mixed(tok), tok, [ROWS[0], ROWS[2]])
    assert only_add.meta["turns"] == [1] * 4 and "env/turns" not in metrics
    with pytest.raises(ValueError, match=r"row 0 names no source of task.sources \(task_source='nope'"):
        rollout(mixed(tok), tok, [{**ROWS[0], SOURCE_KEY: "nope"}])


class Broken(Env):
    """An environment whose step fails: raises, to test that each source follows its own env_on_error."""

    def reset(self, row):
        return row["prompt"]

    def step(self, turn):
        raise RuntimeError("the tool server is down")


def test_an_environment_that_fails_follows_its_sources_env_on_error():
    tok = CharTokenizer("0123456789*?=;+")
    with pytest.raises(EnvError, match="the tool server is down"):
        rollout(mixed(tok, Broken), tok)
    batch, metrics, _ = rollout(mixed(tok, Broken, on_error="zero"), tok)
    assert batch.meta["env_error"][2] is not None and batch.meta["env_error"][0] is None
    assert batch.rewards.tolist() == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    assert metrics["env/errors"] == 2.0 and metrics["env/errors_tools"] == 2.0
    assert batch.response_mask[2:4].sum() == 0 and batch.response_mask[0].sum() > 0

    class ResetFails(Env):
        def reset(self, row):
            raise RuntimeError("no prompt today")

    # every episode of the source failed before its first turn: the other source's samples keep their layout
    batch, metrics, engine = rollout(mixed(tok, ResetFails, on_error="zero"), tok)
    assert engine.calls == [4] and batch.meta["turns"] == [1, 1, 0, 0, 1, 1] and metrics["env/errors"] == 2.0
    P = batch.prompt_width
    texts = [tok.decode(batch.input_ids[b, :P][batch.attention_mask[b, :P].bool()].tolist()) for b in range(6)]
    assert texts == ["1+1=", "1+1=", "123*456=", "123*456=", "20+2=", "20+2="]


def test_the_run_builds_each_sources_role_from_its_entry(tmp_path, capsys):
    add = tmp_path / "add.jsonl"
    add.write_text("".join(json.dumps({"prompt": f"{a}+1=", "answer": str(a + 1)}) + "\n" for a in range(5)))
    cfg = load_config(None, [f"task.sources=[{{file: {add}, reward: exact}}, {{task: multiply, env: calculator, "
                             f"env_options: {json.dumps(CALCULATOR)}, max_turns: 2, env_on_error: zero}}]",
                             "task.env_timeout_s=5"])
    task = load_task(cfg.task)
    tok = CharTokenizer("0123456789*?=;+")
    role = reward_role(cfg.task, task.verify, tok, 10)
    assert isinstance(role, SourceRoles) and isinstance(role.roles["add"], Reward)
    tools = role.roles["multiply"]
    assert (tools.max_turns, tools.on_error, tools.timeout_s) == (2, "zero", 5.0)
    assert "task.sources[1]" in tools.name
    # a budget too small for the source's turns is reported under the source's own key
    role.roles["multiply"] = dataclasses.replace(tools, max_tokens=16)  # the call (9) and its answer (7): no room
    rows = [ROWS[0], {**ROWS[1], SOURCE_KEY: "multiply"}]
    batch, metrics, _ = rollout(role, tok, rows)
    assert batch.meta["finish_reason"][2:] == ["budget"] * 2 and metrics["env/budget_frac_multiply"] == 1.0
    assert "Set task.sources[1].max_episode_tokens=26" in capsys.readouterr().err
    from rlpost.env import observation_alphabet, response_budget
    assert response_budget(cfg.task, 10) == 2 * 10 + 63  # the tool source's, the larger
    assert set("=;") <= set(observation_alphabet(cfg.task))
    # without an env on any entry the run keeps the one verifier role over every source
    plain = load_config(None, [f"task.sources=[{{file: {add}}}, {{task: multiply}}]"])
    assert isinstance(reward_role(plain.task, load_task(plain.task).verify, CharTokenizer("0123456789*=+"), 10),
                      Reward)


@pytest.mark.parametrize("entries, message", [
    ("[{file: a.jsonl}, {file: b.jsonl, env: nope}]", r"'task.sources\[1\].env': unknown environment 'nope'"),
    ("[{file: b.jsonl, env: calculator, env_options: {colour: red}}]",
     r"'task.sources\[0\].env': task.sources\[0\].env 'calculator': bad task.sources\[0\].env_options \['colour'\]"),
    ("[{file: b.jsonl, env: 'no_such_module_x:Env'}]", r"'task.sources\[0\].env': task.sources\[0\].env "),
    ("[{file: a.jsonl, max_turns: 3}]", r"'task.sources\[0\].max_turns' is a setting of an environment's episodes"),
    ("[{file: a.jsonl, env_options: {a: 1}}]", r"task.sources\[0\].env_options are the options of "),
    ("[{file: b.jsonl, env: calculator, max_turns: 0}]", r"'task.sources\[0\].max_turns' must be >= 1"),
    ("[{file: b.jsonl, env: calculator, env_on_error: skip}]", r"'task.sources\[0\].env_on_error'"),
])
def test_a_sources_env_keys_are_checked_at_config_load(entries, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"task.sources={entries}"])


def test_a_sources_env_keys_default_to_the_runs_and_eval_reward_needs_every_env_to_take_one(tmp_path, monkeypatch):
    cfg = load_config(None, ["task.sources=[{file: a.jsonl, env: calculator}, {file: b.jsonl, env: calculator, "
                             "max_turns: 3}, {file: c.jsonl}]", "task.max_turns=2", "task.env_on_error=zero"])
    (_, _, a), (_, _, b), (_, _, c) = cfg.task.source_configs()
    assert (a.max_turns, b.max_turns, a.env_on_error, b.env_on_error, c.env) == (2, 3, "zero", "zero", None)
    (tmp_path / "own_envs.py").write_text("from rlpost.env import Env\n\nclass SelfScored(Env):\n"
                                          "    def __init__(self, level=1):\n        self.level = level\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="eval.reward.*scores its episodes itself"):
        load_config(None, ["task.sources=[{file: a.jsonl}, {file: b.jsonl, env: 'own_envs:SelfScored'}]",
                           "eval.reward=exact"])
    load_config(None, ["task.sources=[{file: a.jsonl}, {file: b.jsonl, env: calculator}]", "eval.reward=exact"])


RUN = ["stages=[rl, eval]", "rollout.prompts_per_step=4", "rollout.k=4", "rollout.max_new_tokens=4",
       "eval.samples_per_prompt=2", "model.n_layer=1", "model.n_embd=16", "model.n_head=2", "threads=1",
       "rl.eval_every=0", "log.rollouts_every=1"]


def lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_a_run_mixing_a_verifier_source_and_a_tool_source_resumes_exactly(tmp_path):
    """An arithmetic file scored one turn beside the multiply task run against the calculator (2 turns), both by
    a reward with signal for an untrained policy (test_mixture's coin: the completion's length): only the tool
    source's episodes take a second turn, with the calculator's answer between; each source's reward, env
    metrics and held-out pass@1 are logged; a run killed after step 2's checkpoint and resumed writes the same
    metrics, rollouts and checkpoints."""
    add = tmp_path / "add.jsonl"
    add.write_text("".join(json.dumps({"prompt": f"{a}+{a % 7}=", "answer": str(a + a % 7)}) + "\n"
                           for a in range(30)))
    (tmp_path / "add_eval.jsonl").write_text("".join(json.dumps({"prompt": f"{a}+1=", "answer": str(a + 1)}) + "\n"
                                                     for a in range(4)))
    coin = "reward: 'test_mixture:coin'"
    mix = (f"task.sources=[{{file: {add}, eval_file: {tmp_path / 'add_eval.jsonl'}, {coin}}}, {{task: multiply, "
           f"num_eval: 4, {coin}, env: calculator, env_options: {json.dumps(CALCULATOR)}, max_turns: 2}}]")
    cfg = RUN + [mix, "rl.steps=4", "rl.save_every=2"]
    summary = train(load_config(None, cfg + [f"out_dir={tmp_path}", "run_name=ref"]))
    assert summary["status"] == "ok" and set(summary["by_source_pass@1_rl"]) == {"add", "multiply"}
    ref, run = tmp_path / "ref", tmp_path / "killed"
    rl = [m for m in lines(ref / "metrics.jsonl") if m["stage"] == "rl"]
    assert len(rl) == 4 and all("reward/add" in m and "reward/multiply" in m for m in rl)
    assert any(m["train/grad_norm"] > 0 for m in rl)  # the policy moves: the resumed run must follow it exactly
    assert all("env/turns_multiply" in m and "env/errors_multiply" in m and "env/env_tokens_multiply" in m
               for m in rl)
    assert not any(k.endswith("_add") for m in rl for k in m)
    ev = lines(ref / "metrics.jsonl")[-1]
    assert "eval/pass@1_add" in ev and "eval/pass@1_multiply" in ev
    records = lines(ref / "rollouts.jsonl")
    turns = {op: [len(r["turns"]) for r in records if op in r["prompt"]] for op in "+*"}
    assert len(turns["+"]) + len(turns["*"]) == len(records) == 4 * 16
    assert set(turns["+"]) == {1} and max(turns["*"]) == 2  # the untrained policy sometimes writes a call '?'
    called = [r for r in records if len(r["turns"]) == 2]
    assert all(r["turns"][0]["observation"].startswith("=") and r["env_tokens"] > 0 for r in called)
    # rollouts.jsonl as an environment's episodes keep it: the turns are the completion
    assert all("".join(t["policy"] + (t["observation"] or "") for t in r["turns"]) == r["completion"]
               and r["policy_tokens"] == r["response_len"] for r in records)
    text, page = read_page(build_report(str(ref)))  # the report's environment section plots the tool source
    assert page.sections["env"]["imgs"] == 1 and "the environments of task.sources (multiply: calculator)" in text
    assert resume_after_step_2(ref, run) == ["step_2", "final"]


def test_a_learned_reward_rescores_the_mixed_episodes():
    """rl.reward (a reward model, a teacher, a PRM) over a mix: the sources play their episodes, the learned
    scorer rescores the laid-out batch, and the sources' own rewards become the gold."""
    from rlpost.env.source import over_episodes, runs_episodes

    def scorer(batch):
        return batch.replace(rewards=torch.full((len(batch),), 0.25)), {"reward/learned": 0.25}

    tok = CharTokenizer("0123456789*?=;+")
    role = mixed(tok)
    assert runs_episodes(role)
    batch, metrics, _ = rollout(over_episodes(role, scorer), tok)
    assert batch.rewards.tolist() == [0.25] * 6 and batch.meta["gold_reward"] == [1.0] * 6
    assert metrics["reward/learned"] == 0.25 and metrics["env/turns_tools"] == 2.0
    assert batch.meta["completion"][2] == "?123*456=56088;56088"


class PerTurn(CalculatorEnv):
    """The calculator keeping each turn's reward on that turn's last token."""

    per_turn_rewards = True


def test_one_turn_rewards_beside_per_turn_ones_sit_on_the_last_response_token():
    tok = CharTokenizer("0123456789*?=;+")
    batch, _, _ = rollout(mixed(tok, lambda: PerTurn(answer_match_reward, **CALCULATOR)), tok)
    assert batch.rewards.dim() == 2 and batch.rewards.sum(1).tolist() == [1.0] * 6
    last = [int(batch.response_mask[b].nonzero()[-1]) for b in range(6)]
    assert [float(batch.rewards[b, last[b]]) for b in range(6)] == [1.0] * 6
    assert int((batch.rewards != 0).sum()) == 6


def test_eval_reward_scores_every_sources_samples():
    tok = CharTokenizer("0123456789*?=;+")

    def half(completion, row):
        return 0.5

    role = mixed(tok)
    role.roles["tools"] = dataclasses.replace(role.roles["tools"], env_cls=CalculatorEnv,
                                              options={"reward": answer_match_reward, **CALCULATOR})
    batch, _, _ = rollout(role.scored_by(half), tok)
    assert batch.rewards.tolist() == [0.5] * 6 and batch.meta["turns"] == [1, 1, 2, 2, 1, 1]

    class SelfScored(Env):
        def reset(self, row):
            return row["prompt"]

    role = mixed(tok)
    role.roles["tools"] = EnvRole(make=SelfScored, tokenizer=tok, env_cls=SelfScored, name="own")
    with pytest.raises(ValueError, match="task.sources 'tools': environment 'own' scores its episodes itself"):
        role.scored_by(half)


def test_the_sources_metrics_combine_means_by_samples_and_sum_counters():
    from rlpost.env.per_source import _combine

    out = _combine([("a", {"env/turns": 1.0, "env/errors": 1.0, "reward/errors": 2.0, "judge/calls": 8.0}),
                    ("b", {"env/turns": 3.0, "env/errors": 2.0, "reward/errors": 1.0, "reward/math": 0.5})], [2, 6])
    assert out["env/turns"] == (2 * 1.0 + 6 * 3.0) / 8 and out["env/errors"] == 3.0
    assert out["reward/errors"] == 3.0 and out["judge/calls"] == 8.0 and out["reward/math"] == 0.5
    assert (out["env/turns_a"], out["env/turns_b"], out["env/errors_b"]) == (1.0, 3.0, 2.0)
    assert not any(k.startswith(("reward/", "judge/")) and k.endswith(("_a", "_b")) for k in out)


def test_a_learned_rewards_means_over_two_rounds_are_weighted_by_their_samples():
    """A PRM's or a teacher's metrics are means over the batch it rescored: over a step's refill rounds they were
    added up (0.5 and 1.0 logged as 1.5)."""
    from rlpost.env.per_source import combine_metrics

    out = combine_metrics([({"prm/step_score_mean": 0.5, "distill/reverse_kl": 0.2, "reward/errors": 1.0}, 4),
                           ({"prm/step_score_mean": 1.0, "distill/reverse_kl": 0.4, "reward/errors": 2.0}, 12)])
    assert out["prm/step_score_mean"] == pytest.approx((4 * 0.5 + 12 * 1.0) / 16)  # 0.875
    assert out["distill/reverse_kl"] == pytest.approx((4 * 0.2 + 12 * 0.4) / 16) and out["reward/errors"] == 3.0


class HalfWrong(Solver):
    """As Solver, but every second sample of a sum prompt (within its row's k) answers 9: rewards that vary
    inside a one-turn source's groups, while the tool source's groups all succeed."""

    def generate(self, prompts, k, params, seed=0):
        batch = super().generate(prompts, k, params, seed)
        wrong = self.tok.encode_completion("9") + [self.tok.eos_token_id]
        ids = batch.input_ids.clone()
        P = batch.prompt_width
        for i, p in enumerate(prompts):
            if "+" in self.tok.decode(p) and not self.tok.decode(p).endswith(";"):
                row = i * k + 1
                ids[row, P:] = self.tok.pad_token_id
                ids[row, P:P + len(wrong)] = torch.tensor(wrong)
        mask = torch.zeros_like(batch.response_mask)
        mask[:, P:] = ids[:, P:] != self.tok.pad_token_id
        texts = [self.tok.decode(ids[b, P:][mask[b, P:].bool()].tolist()[:-1]) for b in range(len(ids))]
        return batch.replace(input_ids=ids, response_mask=mask, attention_mask=(ids != self.tok.pad_token_id).long(),
                             meta={**batch.meta, "completion": texts})


def test_interleaved_sources_group_each_rows_samples_for_the_advantages():
    """Rows of two sources interleaved (tools, add, tools, add): each sample lands in its own row's group, so
    GRPO's group-normalised advantages are those computed by hand per row, never a neighbour's."""
    from rlpost import get_algorithm

    tok = CharTokenizer("0123456789*?=;+")
    rows = [ROWS[1], ROWS[0], ROWS[1], ROWS[2]]
    batch, _, _ = rollout(mixed(tok), tok, rows, k=3, engine=HalfWrong(tok))
    assert [r[SOURCE_KEY] for r in batch.meta["row"]] == ["tools"] * 3 + ["add"] * 3 + ["tools"] * 3 + ["add"] * 3
    assert batch.group_ids.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert batch.rewards.tolist() == [1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 0, 1]
    trained = get_algorithm("grpo", beta=0.0).compute_advantages(batch)
    mask = trained.response_mask.float()
    adv = ((trained.advantages * mask).sum(1) / mask.sum(1)).tolist()
    # a group [1, 0, 1]: mean 2/3, unbiased std sqrt(1/3); a group of equal rewards: 0
    s = (1 / 3) ** 0.5
    want = [0, 0, 0, (1 / 3) / s, (-2 / 3) / s, (1 / 3) / s] * 2
    assert adv == pytest.approx(want, abs=1e-4)
