"""The archetype tasks: their demonstrations are what their docstrings say, scored by the verifiers the
recipes use, and their demonstrators are as imperfect as configured."""

import pytest

from rlpost.config import load_config
from rlpost.env.tools import CalculatorEnv
from rlpost.env.verifiers import get_reward
from rlpost.tasks import answer_match_reward
from rlpost.tasks.grading import RUBRIC, grading_task
from rlpost.tasks.multiply import multiply_task
from rlpost.tasks.multistep import multistep_task
from rlpost.tasks.programs import functions_task


def play(env, row, turns):
    """Feed a multi-turn demonstration's assistant turns to the env; return (observations, final reward)."""
    env.reset(row)
    seen = []
    for t in turns:
        if t["role"] != "assistant":
            continue
        step = env.step(t["content"])
        if step.done:
            return seen, step.reward
        seen.append(step.observation)
    raise AssertionError("the demonstration never ended the episode")


def test_multiply_demonstrations_replay_against_the_calculator():
    cfg = load_config("recipes/tool_calculator.yaml").task
    task = multiply_task(num_eval=100, error_rate=0.5, num_train=2000)
    rewards = []
    for demo in task.demonstrations:
        env = CalculatorEnv(**cfg.env_options)
        seen, r = play(env, demo, demo["completion"])
        tools = [t["content"] for t in demo["completion"] if t["role"] == "tool"]
        assert seen == tools  # the demonstration's tool turns are exactly what the environment answers
        rewards.append(r)
    assert abs(sum(rewards) / len(rewards) - 0.5) < 0.05  # right = called the tool without a typo
    assert task.demonstrations[0]["prompt"].endswith("=") and len(task.demonstrations[0]["prompt"]) == 8


def test_multistep_demonstrations_carry_their_slips_and_the_math_verifier_reads_the_last_part():
    task = multistep_task(num_eval=100, error_rate=0.35, num_train=3000)
    score = get_reward("math", extract="hash")
    demo = task.demonstrations[0]
    a, b, c = (int(x) for x in demo["prompt"][:-1].split("+"))
    s = demo["completion"].split("=")[1].split(";")[0]
    assert demo["completion"] == f"{a:02d}+{b:02d}={s};{s}+{c:02d}={int(s) + c:03d};#### {int(s) + c:03d}" or \
        int(demo["completion"].rsplit(" ", 1)[1]) != a + b + c
    right = [score(d["completion"], d) for d in task.demonstrations[:400]]
    assert abs(sum(right) / len(right) - 0.65) < 0.07
    assert score("12+30=042;042+05=047;#### 047", {"answer": "47"}) == 1.0
    assert score("12+30=047;047+05=047;#### 052", {"answer": "47"}) == 0.0  # only the part after ####
    score.close()


def test_function_demonstrations_pass_the_sandboxed_tests_exactly_when_they_are_right():
    task = functions_task(num_eval=50, error_rate=0.4)
    score = get_reward("code", extract="whole", timeout_s=5)
    demos = task.demonstrations[:8]
    assert any("*" in d["prompt"][2:] and d["prompt"][1] in "+-" for d in task.train_rows)  # precedence is tested
    x_minus_3_times_2 = {"tests": "assert f(5)==-1", "prompt": "x-3*2;"}
    assert score("def f(x):return x-3*2", x_minus_3_times_2) == 1.0
    for d in demos:
        assert score(d["completion"], d) == float(d["completion"] == d["answer"])
    assert any(d["completion"] != d["answer"] for d in demos) and any(d["completion"] == d["answer"] for d in demos)


def test_grading_rows_are_what_the_judge_recipe_asks_its_judge():
    from rlpost.env.judge import parse_score, render_rubric

    opts = load_config("recipes/judge_arithmetic.yaml").task.reward_options
    assert opts["rubric"] == RUBRIC and (opts["score_min"], opts["score_max"]) == (0, 1)
    task = grading_task(num_eval=50)
    row = task.train_rows[0]
    arithmetic = {"prompt": row["prompt"].split("=")[0] + "=", "answer": None}
    assert row["completion"][-2:] in ("\n1", "\n0") and len(row["completion"]) == 10  # "11 93 55\n0"
    for r in task.train_rows[:50]:  # what the trained judge answers is what the judge reward reads
        assert parse_score(r["completion"], 0, 1) == float(r["completion"][-1])
    candidate = row["prompt"].split("<completion>\n")[1].split("\n")[0]
    arithmetic["answer"] = row["prompt"].split("=")[1].split("|")[0]
    assert render_rubric(RUBRIC, candidate, arithmetic, 0, 1) == row["prompt"]
    assert (row["completion"][-1] == "1") == (answer_match_reward(candidate, arithmetic) == 1.0)


@pytest.mark.parametrize("name", ["multiply", "multistep", "functions"])
def test_error_rate_is_checked(name):
    from rlpost.config import ConfigError, TaskConfig
    from rlpost.tasks import load_task

    with pytest.raises(ConfigError, match=r"'task.demonstrator_error' must be in \[0, 1\].*got 1.5"):
        load_config(None, [f"task.name={name}", "task.demonstrator_error=1.5"])  # refused when the config loads
    with pytest.raises(ValueError, match="demonstrator_error"):  # and by the task itself, built without a config
        load_task(TaskConfig(name=name, demonstrator_error=1.5))
