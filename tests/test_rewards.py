"""The reward registry (get_reward by name or module:function, with options), weighted sums with each
component logged, threaded scoring, and the config keys that pick them."""

import textwrap
import threading

import pytest
import torch

from rlpost.config import ConfigError, load_config
from rlpost.env.reward import Reward, RewardError
from rlpost.env.verifiers import REWARDS, WeightedRewards, get_reward, reward_from_config


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        def brevity(completion, row, max_chars=4):
            return 1.0 if len(completion) <= max_chars else 0.0

        class Contains:
            def __init__(self, needle="7"):
                self.needle = needle
            def __call__(self, completion, row):
                return float(self.needle in completion)
    """))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_shipped_names_resolve_and_unknown_names_list_them():
    assert set(REWARDS) == {"exact", "math", "code", "judge", "format"}
    assert get_reward("exact")("46\nmore", {"answer": "46"}) == 1.0
    assert get_reward("exact")("046", {"answer": "46"}) == 1.0  # by value
    # exactly: as floats these two integers are one number, so a last digit guessed wrong used to score 1.0
    assert get_reward("exact")("12345678901234567891", {"answer": "12345678901234567890"}) == 0.0
    assert get_reward("exact")("46.0", {"answer": "46"}) == 1.0 and get_reward("exact")("sNaN", {"answer": "4"}) == 0.0
    with pytest.raises(ValueError, match="shipped: exact, math, code, judge, format"):
        get_reward("nope")


def test_user_functions_and_classes_take_options(user_module):
    assert get_reward("my_rewards:brevity")("12345", {}) == 0.0
    assert get_reward("my_rewards:brevity", max_chars=9)("12345", {}) == 1.0
    assert get_reward("my_rewards:Contains", needle="3")("123", {}) == 1.0
    with pytest.raises(ValueError, match="takes no option"):
        get_reward("my_rewards:brevity", width=3)
    with pytest.raises(ValueError, match="bad options"):
        get_reward("my_rewards:Contains", colour="red")


def test_weighted_sum_is_hand_computed_and_labels_repeat_safely(user_module):
    w = WeightedRewards([{"name": "exact", "weight": 2.0}, {"name": "my_rewards:brevity", "weight": -0.5},
                         {"name": "my_rewards:brevity", "weight": 1.0, "max_chars": 1}])
    row = {"answer": "46"}
    assert w.components("46", row) == {"exact": 1.0, "brevity": 1.0, "brevity_2": 0.0}
    assert w("46", row) == pytest.approx(2.0 - 0.5 + 0.0)
    assert w("4", row) == pytest.approx(0.0 - 0.5 + 1.0)
    for bad, match in (([], "empty"), ([{"weight": 1}], "name"), ([{"name": "exact", "weight": "x"}], "number")):
        with pytest.raises(ValueError, match=match):
            WeightedRewards(bad)


def batch_of(tok, texts):
    from rlpost.batch import Batch

    ids = [tok.encode_completion(t) for t in texts]
    T = max(map(len, ids))
    x = torch.zeros((len(ids), T), dtype=torch.long)
    m = torch.zeros((len(ids), T), dtype=torch.long)
    for i, s in enumerate(ids):
        x[i, :len(s)], m[i, :len(s)] = torch.tensor(s), 1
    rows = [{"prompt": "p", "answer": "46"}] * len(ids)
    return Batch(input_ids=x, attention_mask=m, response_mask=m, meta={"row": rows})


def test_reward_role_logs_each_component_and_scores_in_threads(tiny_gpt, user_module):
    _, tok = tiny_gpt
    w = WeightedRewards([{"name": "exact", "weight": 1.0}, {"name": "my_rewards:brevity", "weight": 0.5,
                                                               "max_chars": 2}])
    batch, metrics = Reward(w, tok, workers=3)(batch_of(tok, ["46", "460", "47", "46"]))
    assert batch.rewards.tolist() == [1.5, 0.0, 0.5, 1.5]
    assert metrics["reward/exact"] == 0.5 and metrics["reward/brevity"] == 0.75

    seen = set()

    def where(completion, row):
        seen.add(threading.current_thread().name)
        return 1.0

    Reward(where, tok, workers=4)(batch_of(tok, ["1"] * 8))
    assert len(seen) > 1  # really ran on several threads
    with pytest.raises(RewardError, match="failed on sample 1"):
        Reward(lambda c, r: 1 / len(c) if c != "0" else 1 / 0, tok, workers=2)(batch_of(tok, ["1", "0"]))


def test_config_picks_one_reward_or_a_weighted_sum(user_module):
    cfg = load_config(None, ["task.reward=my_rewards:brevity", "task.reward_options={max_chars: 9}"])
    assert reward_from_config(cfg.task, None)("123456789", {}) == 1.0
    cfg = load_config(None, ["task.rewards=[{name: exact, weight: 1}, {name: my_rewards:brevity, weight: 0.1}]"])
    assert isinstance(reward_from_config(cfg.task, None), WeightedRewards)
    default = lambda completion, row: 0.5  # noqa: E731 - the task's own verifier, as a Verifier
    assert reward_from_config(load_config(None, []).task, default).fn is default
    with pytest.raises(ConfigError, match="not both"):
        load_config(None, ["task.reward=exact", "task.rewards=[{name: exact}]"])
    with pytest.raises(ConfigError, match="reward_options"):
        load_config(None, ["task.reward_options={a: 1}"])
    with pytest.raises(ConfigError, match="env_on_error"):
        load_config(None, ["task.env_on_error=skip"])
    load_config(None, ["task.env=calculator", "reward_model.train=true"])  # a reward model scores episodes too


def test_eval_reward_scores_pass_at_1_by_another_reward_than_the_runs(tiny_gpt, user_module):
    from types import SimpleNamespace

    from rlpost.stages.evaluate import EvalStage

    _, tok = tiny_gpt
    run_reward = Reward(lambda c, r: 0.0, tok)
    ctx = SimpleNamespace(verifier=run_reward, tokenizer=tok)
    cfg = load_config(None, ["eval.reward=my_rewards:brevity", "eval.reward_options={max_chars: 1}"])
    stage = EvalStage(cfg.eval, cfg.rollout, "rl")
    scorer = stage.scorer(ctx)
    assert scorer is not run_reward and scorer is stage.scorer(ctx)  # built once
    batch, _ = scorer(batch_of(tok, ["4", "46"]))
    assert batch.rewards.tolist() == [1.0, 0.0]
    assert EvalStage(load_config(None, []).eval, cfg.rollout, "rl").scorer(ctx) is run_reward
    with pytest.raises(ConfigError, match="eval.reward_options"):
        load_config(None, ["eval.reward_options={a: 1}"])


def test_eval_reward_calls_are_handled_as_the_runs_reward_calls_are(tiny_gpt):
    """eval.reward's role used to drop task.reward_on_error, task.reward_workers and task.reward_timeout_s: a sample
    the run scores as a failure (zero) stopped the run at its first evaluation, and a reward that needs the main
    thread (task.reward_timeout_s=null, for signal.alarm) ran in a worker thread under a 60 s limit."""
    from rlpost.env.verifiers import eval_reward_role

    _, tok = tiny_gpt
    cfg = load_config(None, ["eval.reward=exact"])
    role = eval_reward_role(cfg.eval, Reward(lambda c, r: 0.0, tok, on_error="zero", workers=3, timeout_s=7.0))
    assert (role.on_error, role.workers, role.timeout_s) == ("zero", 3, 7.0)
    out, metrics = role.scored_by(lambda c, r: 1.0 if c == "46" else 1 / 0)(batch_of(tok, ["46", "4"]))
    assert out.rewards.tolist() == [1.0, 0.0] and metrics["reward/errors"] == 1.0

    def main_thread_only(completion, row):
        assert threading.current_thread() is threading.main_thread(), "not called in the main thread"
        return 1.0

    alarm_role = Reward(lambda c, r: 0.0, tok, timeout_s=None).scored_by(main_thread_only)
    assert alarm_role(batch_of(tok, ["46"]))[0].rewards.tolist() == [1.0]


def test_format_reward_checks_the_shape_of_the_whole_completion_not_the_answer():
    fmt = get_reward("format")  # reasoning, then "#### <number>" and nothing after
    for right in ("57+32=089;089+18=107;#### 107", "57+32=089;089+18=107;#### 999", "so it is\n#### -3.5",
                  "  a;#### 7\n"):
        assert fmt(right, {"answer": "107"}) == 1.0, right
    for wrong in ("57+32=089;089+18=107", "#### 107", "57+32=089;#### 107;", "x #### 107 apples", "x ####",
                  "x #### 1#### 2x", ""):
        assert fmt(wrong, {"answer": "107"}) == 0.0, wrong
    tags = get_reward("format", pattern=r"<think>.+</think>\s*<answer>.+</answer>")
    assert tags("<think>7+8=15</think> <answer>15</answer>", {}) == 1.0
    assert tags("<think>7+8=15</think>15", {}) == 0.0
    with pytest.raises(ValueError, match="not a regular expression"):
        get_reward("format", pattern="(")
    w = WeightedRewards([{"name": "math", "weight": 1.0, "extract": "hash"}, {"name": "format", "weight": 0.5}])
    assert w.components("57+32=089;089+18=107;#### 107", {"answer": "107"}) == {"math": 1.0, "format": 1.0}
    assert w("57+32=089;089+18=107;#### 106", {"answer": "107"}) == 0.5
    assert w("57+32=089;089+18=107", {"answer": "107"}) == 0.0


def test_default_format_check_agrees_with_its_regular_expression():
    """The linear check gives what re.fullmatch(REASONING_THEN_ANSWER, ..., re.DOTALL) gives, on strings built
    from the characters that matter (so that near misses are common)."""
    import random
    import re

    from rlpost.env.format import REASONING_THEN_ANSWER, reasoning_then_answer

    slow = re.compile(REASONING_THEN_ANSWER, re.DOTALL)
    rng = random.Random(0)
    alphabet = ["#", "####", " ", "-", "1", "23", ".", "x", "\n"]
    matched = 0
    for _ in range(5000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        expected = slow.fullmatch(text) is not None
        matched += expected
        assert reasoning_then_answer(text) == expected, repr(text)
    assert matched > 100   # the sample holds matches as well as misses


def test_format_reward_cannot_stall_the_process():
    """The default shape on a completion that made the old pattern backtrack for seconds (re holds the GIL, so
    a thread timeout could not stop it), and a user's catastrophic pattern, bounded by its timeout_s."""
    import time

    fmt = get_reward("format")
    text = "#### 1." * (32_000 // 7)   # the old pattern: ~30 s here (quadratic; 2 s at 8,000 characters)
    start = time.monotonic()
    assert fmt(text, {}) == 0.0 and fmt(text + "#### 3", {}) == 1.0
    assert time.monotonic() - start < 1.0   # linear: milliseconds
    nested = get_reward("format", pattern=r"(a|aa)+b", timeout_s=0.2)   # exponential backtracking
    start = time.monotonic()
    assert nested("a" * 40, {}) == 0.0
    assert time.monotonic() - start < 0.2 + 5.0   # generous slack for a loaded machine; unbounded it runs for days
    assert nested.metrics() == {"format/timeouts": 1.0}
    assert nested("aaab", {}) == 1.0
    with pytest.raises(ValueError, match="timeout_s must be a number of seconds > 0"):
        get_reward("format", pattern="a", timeout_s=0)


def test_a_users_verifier_object_keeps_its_hooks_and_the_role_calls_them(tiny_gpt):
    """A user's class that does not subclass Verifier: its range, parts, counters, answer extraction and close
    are read once when it is wrapped, and the role calls them (no attribute is probed at scoring time)."""
    _, tok = tiny_gpt

    class Mine:
        reward_range = (-1.0, 1.0)

        def __init__(self):
            self.closed = False

        def __call__(self, completion, row):
            return 1.0

        def components(self, completion, row):
            return {"a": 1.0, "b": 0.25}

        def combine(self, parts):
            return parts["a"] - parts["b"]

        def metrics(self):
            return {"mine/calls": 3}

        def final_answer(self, completion):
            return completion[-1:]

        def close(self):
            self.closed = True

    mine = Mine()
    role = Reward(mine, tok)
    batch, metrics = role(batch_of(tok, ["12", "3"]))
    assert batch.rewards.tolist() == [0.75, 0.75]
    assert (metrics["reward/a"], metrics["reward/b"], metrics["mine/calls"]) == (1.0, 0.25, 3.0)
    assert role.fn.reward_range == (-1.0, 1.0) and role.final_answer("123") == "3"
    role.close()
    assert mine.closed


def test_every_reward_role_runs_the_same_episode_loop(tiny_gpt):
    """A role that only scores sampled batches (as the learned rewards do) gets the one-turn episodes by
    default: the engine's batch, sampled with the same call as the verifier's, then its score."""
    from rlpost.env import RewardRole
    from rlpost.rollout import SamplingParams, build_engine
    from rlpost.rollout.episodes import run_episodes
    from rlpost.tasks import answer_match_reward

    model, tok = tiny_gpt

    class Lengths(RewardRole):
        def __call__(self, batch):
            return batch.replace(rewards=batch.response_mask.sum(1).float()), {"lengths/seen": float(len(batch))}

    rows = [{"prompt": "1+2=", "answer": "3"}, {"prompt": "4+4=", "answer": "8"}]
    ids = [tok.encode_prompt(r["prompt"]) for r in rows]
    params = SamplingParams(max_new_tokens=4)
    a, ma = run_episodes(build_engine("native", model, tok), Lengths(), rows, ids, 3, params, 5)
    b, mb = run_episodes(build_engine("native", model, tok), Reward(answer_match_reward, tok), rows, ids, 3, params, 5)
    assert torch.equal(a.input_ids, b.input_ids) and a.meta["row"] == b.meta["row"]
    assert a.rewards.tolist() == a.response_mask.sum(1).float().tolist() and ma["lengths/seen"] == 6.0
    assert {"time/rollout", "time/reward"} <= set(ma) and {"time/rollout", "time/reward", "reward/errors"} <= set(mb)
    Lengths().close()  # a role without a verifier has nothing to close


def test_a_reward_that_returns_a_string_or_none_is_named_not_parsed(tiny_gpt):
    """float() would take "1" (and "nan", " inf ") from a reward function as a score: a string or None is no
    reward, named with its sample (raise), or scored as a failure and counted (zero); a weighted sum names the
    term. A number of any type (bool, int, a NumPy or torch scalar) is one."""
    import numpy as np

    _, tok = tiny_gpt
    batch = batch_of(tok, ["46", "47"])
    for value, shown in (("1", "str '1'"), (None, "NoneType None"), (b"1", "bytes b'1'"), ("nan", "str 'nan'")):
        with pytest.raises(RewardError, match=f"failed on sample 0 .*TypeError: returned {shown}, not a number"):
            Reward(lambda c, r, v=value: v, tok)(batch)
        out, metrics = Reward(lambda c, r, v=value: v if c == "47" else 1.0, tok, on_error="zero")(batch)
        assert out.rewards.tolist() == [1.0, 0.0] and metrics["reward/errors"] == 1.0
    w = WeightedRewards([{"name": "exact", "weight": 1.0}])
    w.terms = [("exact", 1.0, lambda c, r: "1")]
    with pytest.raises(RewardError, match="TypeError: term 'exact' returned str '1', not a number"):
        Reward(w, tok)(batch)
    for value in (True, 1, np.float32(1.0), torch.tensor(1.0)):
        assert Reward(lambda c, r, v=value: v, tok)(batch)[0].rewards.tolist() == [1.0, 1.0]
