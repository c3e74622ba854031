"""A reward function that hangs cannot hang a run: task.reward_timeout_s bounds each call, the hung call's
thread is abandoned and replaced, and task.reward_on_error decides what the sample gets (raise: the run
stops naming the reward, the row and the prompt; zero: 0, counted in reward/timeouts).

The hanging rewards wait on an Event that is never set (sleeping forever), so each test leaves daemon
threads behind; one test checks that such a thread does not keep the interpreter from exiting."""

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import pytest

from rlpost.config import ConfigError, load_config
from rlpost.env.calls import call_all
from rlpost.env.reward import Reward, RewardError
from rlpost.env.verifiers import reward_role
from test_rewards import batch_of

FOREVER = threading.Event()   # never set: waiting on it is sleeping forever
SLACK_S = 5.0                 # generous: the suite runs on a loaded 2-core machine


def hangs_on_zero(completion, row):
    """1.0, except that a completion "0" never returns."""
    if completion == "0":
        FOREVER.wait()
    return 1.0


def hangs_always(completion, row):
    FOREVER.wait()


def rows_from_a_file(batch):
    """The rows as the file readers give them: each with its line number."""
    rows = [{**row, "prompt": f"What is {n}+1?", "line": n + 3} for n, row in enumerate(batch.meta["row"])]
    return batch.replace(meta={**batch.meta, "row": rows})


@pytest.mark.parametrize("workers", [1, 4])
def test_a_hung_sample_scores_zero_and_is_counted_while_the_others_score(tiny_gpt, workers):
    _, tok = tiny_gpt
    reward = Reward(hangs_on_zero, tok, on_error="zero", workers=workers, timeout_s=0.3)
    t0 = time.monotonic()
    batch, metrics = reward(batch_of(tok, ["1", "0", "1", "0", "1", "1"]))
    elapsed = time.monotonic() - t0
    assert batch.rewards.tolist() == [1.0, 0.0, 1.0, 0.0, 1.0, 1.0]
    assert metrics["reward/timeouts"] == 2.0 and metrics["reward/errors"] == 2.0
    assert elapsed < 2 * 0.3 + SLACK_S  # at most the two hung calls' timeouts, one after the other
    # the next batch gets fresh threads and its own results: nothing of the abandoned calls leaks into it
    batch, metrics = reward(batch_of(tok, ["1", "1"]))
    assert batch.rewards.tolist() == [1.0, 1.0] and metrics["reward/timeouts"] == 0.0


@pytest.mark.parametrize("workers", [1, 4])
def test_a_reward_that_sleeps_forever_stops_the_batch_one_timeout_after_it_starts(tiny_gpt, workers):
    """on_error=raise: the first timeout ends the batch; the rest are not waited for one by one (8 hung
    samples with one worker would otherwise take 8 timeouts)."""
    _, tok = tiny_gpt
    reward = Reward(hangs_always, tok, workers=workers, timeout_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(RewardError) as err:
        reward(rows_from_a_file(batch_of(tok, ["1"] * 8)))
    assert time.monotonic() - t0 < 0.5 + SLACK_S
    message = str(err.value)
    assert "reward function hangs_always timed out after 0.5 s (task.reward_timeout_s)" in message
    assert "sample 0 (line 3 of its file; prompt 'What is 0+1?'" in message  # the row and the prompt
    assert "task.reward_on_error=zero" in message  # what to do about it


@pytest.mark.parametrize("workers", [1, 4])
def test_a_reward_that_raises_still_stops_naming_the_sample_or_scores_zero(tiny_gpt, workers):
    _, tok = tiny_gpt

    def crashes_on_zero(completion, row):
        if completion == "0":
            raise ZeroDivisionError("checker crashed")
        return 1.0 if completion == "1" else float("nan")

    texts = ["1", "1", "0", "1"]
    with pytest.raises(RewardError, match=r"failed on sample 2 \(prompt 'p', .*ZeroDivisionError: checker crashed"):
        Reward(crashes_on_zero, tok, workers=workers, timeout_s=5)(batch_of(tok, texts))
    with pytest.raises(RewardError, match="failed on sample 1 .*non-finite"):
        Reward(crashes_on_zero, tok, workers=workers, timeout_s=5)(batch_of(tok, ["1", "2"]))
    batch, metrics = Reward(crashes_on_zero, tok, on_error="zero", workers=workers,
                            timeout_s=5)(batch_of(tok, texts + ["2"]))
    assert batch.rewards.tolist() == [1.0, 1.0, 0.0, 1.0, 0.0]
    assert metrics["reward/errors"] == 2.0 and metrics["reward/timeouts"] == 0.0


def test_no_limit_scores_in_the_calling_thread_and_bad_limits_are_refused(tiny_gpt):
    _, tok = tiny_gpt
    seen = []
    Reward(lambda c, r: seen.append(threading.current_thread()) or 1.0, tok, timeout_s=None)(batch_of(tok, ["1"]))
    assert seen == [threading.main_thread()]  # a reward that needs the main thread (signal.alarm) still works
    Reward(lambda c, r: seen.append(threading.current_thread()) or 1.0, tok)(batch_of(tok, ["1"]))
    assert seen[-1] is not threading.main_thread()  # timed: in a worker thread
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="timeout_s must be > 0"):
            Reward(hangs_always, tok, timeout_s=bad)


def test_the_config_key_reaches_the_role_and_is_checked(tiny_gpt):
    _, tok = tiny_gpt
    assert load_config(None, []).task.reward_timeout_s == 60.0
    cfg = load_config(None, ["task.reward_timeout_s=1.5", "task.reward_on_error=zero", "task.reward_workers=3"])
    role = reward_role(cfg.task, hangs_always, tok, 4)
    assert (role.timeout_s, role.on_error, role.workers) == (1.5, "zero", 3)
    assert reward_role(load_config(None, ["task.reward_timeout_s=null"]).task, hangs_always, tok, 4).timeout_s is None
    with pytest.raises(ConfigError, match="'task.reward_timeout_s' must be > 0"):
        load_config(None, ["task.reward_timeout_s=0"])


def test_an_abandoned_call_never_writes_its_late_result_and_its_thread_ends():
    release, threads = threading.Event(), []

    def late():
        threads.append(threading.current_thread())
        release.wait()
        return "late"

    out = call_all([late, lambda: "on time"], timeout_s=0.2, workers=1)
    assert out[0].timed_out and out[1].value == "on time"  # the hung worker was replaced
    later = call_all([lambda: "next"], timeout_s=5, workers=1)
    release.set()  # the abandoned call returns now
    threads[0].join(timeout=SLACK_S)
    assert not threads[0].is_alive()  # it returned, dropped its result and ended
    assert out[0].timed_out and out[0].value is None and [r.value for r in later] == ["next"]


def test_stop_on_failure_cancels_what_has_not_finished():
    ran = []
    out = call_all([lambda: ran.append(0), lambda: 1 / 0, lambda: ran.append(2)], timeout_s=5, workers=1,
                   stop_on_failure=True)
    assert ran == [0] and out[0].ok and isinstance(out[1].error, ZeroDivisionError) and out[2].cancelled
    out = call_all([lambda: 1 / 0, lambda: 2], timeout_s=None, workers=1, stop_on_failure=True)
    assert isinstance(out[0].error, ZeroDivisionError) and out[1].cancelled and not out[1].ok


def test_the_interpreter_exits_with_an_abandoned_call_still_sleeping(tmp_path):
    """The threads are daemons: a ThreadPoolExecutor's exit hook would join the sleeping one forever."""
    calls_py = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "rlpost", "env", "calls.py")
    script = textwrap.dedent(f"""
        import importlib.util, sys, threading
        spec = importlib.util.spec_from_file_location("calls", {calls_py!r})  # alone: no torch import, fast
        calls = sys.modules["calls"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(calls)

        out = calls.call_all([threading.Event().wait, lambda: 7], timeout_s=0.2, workers=4)
        print("timed out:", out[0].timed_out, "value:", out[1].value, flush=True)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "timed out: True value: 7" in done.stdout


def test_a_limit_below_what_an_http_judge_may_take_warns(tiny_gpt):
    _, tok = tiny_gpt
    judge = {"name": "judge", "url": "http://127.0.0.1:9/v1", "timeout_s": 10, "retries": 2, "backoff_s": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the judge's defaults fit in the default limit
        default = load_config(None, ["task.reward=judge", "task.reward_options={url: 'http://127.0.0.1:9/v1'}"])
        assert reward_role(default.task, None, tok, 4).fn.call_limit_s == 3 * 15 + 0.5 * 3 < 60
    cfg = load_config(None, [f"task.rewards=[{judge}, {{name: exact}}]", "task.reward_timeout_s=30"])
    with pytest.warns(UserWarning, match=r"task.reward_timeout_s=30 is below the 33 s a call of the reward may take"):
        reward_role(cfg.task, None, tok, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reward_role(load_config(None, [f"task.rewards=[{judge}]", "task.reward_timeout_s=40"]).task, None, tok, 4)


HANGING_REWARD = """
import threading

def score(completion, row):
    threading.Event().wait()   # sleeps forever
"""


@pytest.mark.slow
@pytest.mark.parametrize("on_error, workers", [("zero", 1), ("zero", 4), ("raise", 1), ("raise", 4)])
def test_a_train_run_with_a_reward_that_sleeps_forever_ends(tmp_path, on_error, workers):
    """A real `rlpost train` (no SFT, one RL step of 4 samples, 2 held-out prompts evaluated before and after)
    with a user reward file that never returns and task.reward_timeout_s=1: zero finishes, every sample
    scored 0 and counted; raise stops with the error at the first evaluation. Either way the process exits
    with the hung threads still asleep."""
    (tmp_path / "hang.py").write_text(HANGING_REWARD)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = ["train", "task.reward=hang:score", "task.reward_timeout_s=1", f"task.reward_on_error={on_error}",
            f"task.reward_workers={workers}", "sft.steps=0", "rl.steps=1", "rl.eval_every=0", "task.num_eval=2",
            "eval.samples_per_prompt=1", "rollout.prompts_per_step=2", "rollout.k=2", "model.n_layer=1",
            "model.n_embd=16", "model.n_head=2", f"out_dir={tmp_path / 'runs'}", "run_name=hang"]
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "rlpost", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    wall = time.monotonic() - t0
    print(f"{on_error}, {workers} worker(s): {wall:.1f} s")
    # zero: 8 hung calls (2 + 4 + 2), one timeout per round of `workers`; raise: the first one stops it.
    # Start-up and the step take ~5 s alone; 60 s of slack for a loaded machine, far below the 300 s hang guard
    rounds = (2 + 4 + 2 if workers == 1 else 3) if on_error == "zero" else 1
    assert wall < rounds * 1.0 + 60
    summary = json.loads((tmp_path / "runs" / "hang" / "summary.json").read_text())
    if on_error == "zero":
        assert done.returncode == 0, done.stderr[-2000:]
        assert summary["status"] == "ok" and summary["pass@1_rl"] == 0.0
        rl = [json.loads(line) for line in open(tmp_path / "runs" / "hang" / "metrics.jsonl")]
        rl = [m for m in rl if m["stage"] == "rl"]
        assert rl[0]["reward/timeouts"] == 4.0 and rl[0]["reward/mean"] == 0.0
    else:
        assert done.returncode != 0
        assert "reward function score timed out after 1 s (task.reward_timeout_s) on sample 0" in done.stderr
        assert summary["status"].startswith("failed: RewardError")


def test_scoring_the_demonstrator_at_load_time_is_bounded_too(tmp_path, monkeypatch):
    """A file task whose held-out rows carry completions scores them under the run's reward when it loads."""
    from rlpost.config import TaskConfig
    from rlpost.tasks import load_task

    rows = ['{"prompt": "1+1=", "answer": "2", "completion": "2"}', '{"prompt": "2+2=", "answer": "4", '
            '"completion": "0"}']
    (tmp_path / "train.jsonl").write_text(rows[0] + "\n")
    (tmp_path / "held.jsonl").write_text("\n".join(rows) + "\n")
    (tmp_path / "hang_on_zero.py").write_text(HANGING_REWARD.replace("def score(completion, row):\n",
                                                                     "def score(completion, row):\n"
                                                                     "    if completion != '0':\n"
                                                                     "        return 1.0\n"))
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = TaskConfig(name="file", train_file=str(tmp_path / "train.jsonl"), eval_file=str(tmp_path / "held.jsonl"),
                     reward="hang_on_zero:score", reward_timeout_s=0.3)
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"held.jsonl line 2: the reward failed on the held-out row's completion.*"
                                         r"TimeoutError: it ran past task.reward_timeout_s=0.3 s"):
        load_task(cfg)
    assert time.monotonic() - start < 0.3 + SLACK_S


def test_a_reward_that_keeps_hanging_stops_the_run_before_threads_run_out(tiny_gpt, monkeypatch):
    """on_error=zero scores each hung call 0, but each keeps a thread for good: past a bound the run stops
    with an error saying so, instead of failing later to start a thread at all."""
    import rlpost.env.reward
    from rlpost.env.calls import hung_calls

    _, tok = tiny_gpt
    release = threading.Event()

    def hangs_until_released(completion, row):
        release.wait()
        return 1.0

    before = hung_calls()
    monkeypatch.setattr(rlpost.env.reward, "MAX_HUNG_CALLS", before + 3)
    reward = Reward(hangs_until_released, tok, on_error="zero", workers=4, timeout_s=0.2)
    try:
        _, metrics = reward(batch_of(tok, ["1", "1"]))  # 2 hung: under the bound
        assert metrics["reward/timeouts"] == 2.0 and hung_calls() >= before + 1  # (another test's may return)
        with pytest.raises(RewardError, match=r"calls of the reward ran past task.reward_timeout_s and are still "
                                              r"running in abandoned threads.*hangs_until_released keeps hanging"):
            reward(batch_of(tok, ["1"] * 4))  # 6 hung: over it
    finally:
        release.set()
    deadline = time.monotonic() + SLACK_S
    while hung_calls() > before and time.monotonic() < deadline:  # released, the threads return and end
        time.sleep(0.01)
    assert hung_calls() <= before


def hangs_or_penalises(completion, row):
    """A reward that can be negative: -1 for an honest (wrong) answer, and a completion "0" hangs."""
    if completion == "0":
        FOREVER.wait()
    return -1.0


def crashes_or_penalises(completion, row):
    if completion == "0":
        raise ValueError("cannot parse")
    return -1.0


@pytest.mark.parametrize("fn", [hangs_or_penalises, crashes_or_penalises])
def test_a_failure_never_scores_above_an_honest_wrong_answer(tiny_gpt, fn):
    """on_error=zero and a reward that can be negative: a sample that hangs or crashes the reward scores the
    batch's lowest reward, not 0, or a policy would learn to hang instead of answering."""
    _, tok = tiny_gpt
    batch, metrics = Reward(fn, tok, on_error="zero", workers=2, timeout_s=0.3)(batch_of(tok, ["1", "0", "1"]))
    assert batch.rewards.tolist() == [-1.0, -1.0, -1.0] and metrics["reward/errors"] == 1.0


def test_a_failure_scores_the_lowest_the_reward_declares(tiny_gpt):
    """A weighted sum of declared ranges (here code in [0, 1] weighted 1, and a user term in [-1, 0] weighted
    0.5) can go down to -0.5: a failed sample scores that, even in a batch whose honest rewards are all higher."""
    from rlpost.env.verifiers import WeightedRewards

    _, tok = tiny_gpt

    def in_range(completion, row):
        if completion == "0":
            raise ValueError("cannot parse")
        return 0.0
    in_range.reward_range = (-1.0, 0.0)
    sys.modules["penalty_terms"] = type(sys)("penalty_terms")
    sys.modules["penalty_terms"].in_range = in_range
    try:
        fn = WeightedRewards([{"name": "exact", "weight": 1.0}, {"name": "penalty_terms:in_range", "weight": 0.5}])
        assert fn.reward_range == (-0.5, 1.0)
        batch, _ = Reward(fn, tok, on_error="zero")(batch_of(tok, ["1", "0"]))
    finally:
        del sys.modules["penalty_terms"]
    assert batch.rewards.tolist()[1] == -0.5


def test_failures_of_a_nonnegative_reward_still_score_zero(tiny_gpt):
    _, tok = tiny_gpt
    batch, _ = Reward(crashes_on_zero_or_one, tok, on_error="zero")(batch_of(tok, ["1", "0", "1"]))
    assert batch.rewards.tolist() == [1.0, 0.0, 1.0]


def crashes_on_zero_or_one(completion, row):
    if completion == "0":
        raise ValueError("cannot parse")
    return 1.0


def test_a_wrongly_declared_range_still_cannot_make_a_failure_pay(tiny_gpt):
    _, tok = tiny_gpt

    def claims_nonnegative(completion, row):
        if completion == "0":
            raise ValueError("cannot parse")
        return -2.0
    claims_nonnegative.reward_range = (0.0, 1.0)
    batch, _ = Reward(claims_nonnegative, tok, on_error="zero")(batch_of(tok, ["1", "0"]))
    assert batch.rewards.tolist() == [-2.0, -2.0]
