"""Multi-turn episodes: env tokens masked, sampled ids verbatim, log-probs that the trainer reproduces,
zero gradient on env tokens in every algorithm, env failures named or counted, the one-turn case
equal to the verifier path, tool environments and multi-turn demonstrations."""

import json
import time

import pytest
import torch

from rlpost.algorithms import available, get_algorithm
from rlpost.batch import Batch
from rlpost.env import EnvRole, Step, VerifierEnv
from rlpost.env.base import Env
from rlpost.env.calls import call_all
from rlpost.env.tools import CalculatorEnv, calculate, CalculatorError
from rlpost.env.episodes import EnvError, encode_observation
from rlpost.env.reward import Reward
from rlpost.models import encode_demonstration, token_logprobs
from rlpost.rollout import SamplingParams, build_engine
from rlpost.rollout.episodes import run_episodes
from rlpost.tasks import answer_match_reward

ROWS = [{"prompt": "12+34=", "answer": "46"}, {"prompt": "7+8=", "answer": "15"}]


class Scripted(Env):
    """Answers every turn with the observation '+1=' until `turns` turns; reward = number of turns taken,
    per turn 0.25 (so the per-turn placement can be checked)."""

    per_turn_rewards = False

    def __init__(self, turns=3, obs="+1=", per_turn=False):
        self.turns, self.obs, self.n = turns, obs, 0
        self.per_turn_rewards = per_turn

    def reset(self, row):
        self.row = row
        return row["prompt"]

    def step(self, turn):
        self.n += 1
        return Step(observation=self.obs, reward=0.25, done=self.n >= self.turns)


class ScriptedEngine:
    """Answers turn n of every episode with turns[n] (canonical token ids) and eos, cut to the turn's
    max_new_tokens or, for the turns in `cut`, without its eos: rows the episode function builds from it
    can be compared with what they must be, token for token."""

    version = 0

    def __init__(self, tok, turns: list[str], cut: tuple[int, ...] = ()):
        self.tok, self.turns, self.cut, self.calls = tok, turns, cut, 0

    def generate(self, prompts, k, params, seed=0):
        n, self.calls = self.calls, self.calls + 1
        ids = self.tok.encode_completion(self.turns[n]) + ([] if n in self.cut else [self.tok.eos_token_id])
        stopped = n not in self.cut and len(ids) <= params.max_new_tokens
        ids = ids[:params.max_new_tokens]
        tokens = torch.tensor([ids for _ in prompts for _ in range(k)])
        return Batch.from_sequences(prompts, k, tokens, torch.zeros(tokens.shape),
                                    torch.tensor([len(ids)] * len(tokens)), torch.tensor([stopped] * len(tokens)),
                                    self.tok.pad_token_id, self.version)


def role(tok, make, **kw):
    kw.setdefault("max_turns", 3)
    kw.setdefault("max_tokens", 15)
    return EnvRole(make=make, tokenizer=tok, **kw)


def episodes(tiny_gpt, make=Scripted, k=2, max_new=4, seed=0, **kw):
    model, tok = tiny_gpt
    engine = build_engine("native", model, tok)
    params = SamplingParams(max_new_tokens=max_new, temperature=1.0)
    prompt_ids = [tok.encode_prompt(r["prompt"]) for r in ROWS]
    return run_episodes(engine, role(tok, make, **kw), ROWS, prompt_ids, k, params, seed)


def env_positions(batch, b):
    """Columns of row b that hold environment tokens (after the prompt, attended, not the policy's)."""
    P = batch.prompt_width
    cols = torch.arange(batch.input_ids.shape[1])
    return ((cols >= P) & batch.attention_mask[b].bool() & ~batch.response_mask[b].bool()).nonzero().flatten()


def test_env_tokens_are_masked_and_the_row_decodes_to_the_transcript(tiny_gpt):
    batch, metrics = episodes(tiny_gpt)
    _, tok = tiny_gpt
    obs = tok.encode_completion("+1=")
    for b in range(len(batch)):
        transcript = batch.meta["transcript"][b]
        env_turns = [t for t in transcript if t["role"] == "env"]
        assert len(env_turns) == batch.meta["turns"][b] - 1 or batch.meta["finish_reason"][b] == "budget"
        cols = env_positions(batch, b)
        ids = batch.input_ids[b, cols].tolist()
        assert ids == obs * (len(ids) // len(obs)) and len(ids) == len(obs) * len(env_turns)
        assert (batch.old_logp[b, cols] == 0).all()
        # the whole attended row is the prompt and the transcript, in order
        attended = batch.input_ids[b][batch.attention_mask[b].bool()].tolist()
        assert tok.decode(attended) == "".join(t["text"] for t in transcript)
        assert batch.meta["completion"][b] == "".join(t["text"] for t in transcript[1:])
    assert metrics["env/turns"] > 1 and metrics["env/env_tokens"] > 0


def test_trainer_recomputes_the_engines_old_logp_on_every_policy_token_across_turns(tiny_gpt):
    model, _ = tiny_gpt
    batch, _ = episodes(tiny_gpt, k=3, seed=5)
    assert max(batch.meta["turns"]) == 3
    with torch.no_grad():
        logp = token_logprobs(model, batch, temperature=1.0)
    m = batch.response_mask.bool()
    assert m.sum() > 0
    assert (logp[m] - batch.old_logp[m]).abs().max().item() <= 1e-4


def test_rewards_sum_over_turns_or_stay_on_each_turns_last_token(tiny_gpt):
    batch, _ = episodes(tiny_gpt)
    assert batch.rewards.dim() == 1
    assert torch.allclose(batch.rewards, 0.25 * torch.tensor(batch.meta["turns"], dtype=torch.float))
    batch, _ = episodes(tiny_gpt, make=lambda: Scripted(per_turn=True))
    assert batch.rewards.shape == batch.input_ids.shape
    for b in range(len(batch)):
        cols = batch.rewards[b].nonzero().flatten()
        assert len(cols) == batch.meta["turns"][b]
        assert batch.response_mask[b, cols].all()                   # on policy tokens
        nxt = cols + 1                                              # each followed by env tokens or the end
        assert all(c >= batch.input_ids.shape[1] or not batch.response_mask[b, c] for c in nxt.tolist())


@pytest.mark.parametrize("name", sorted(available()))
def test_env_tokens_get_zero_gradient_in_every_algorithm(tiny_gpt, name):
    model, _ = tiny_gpt
    batch, _ = episodes(tiny_gpt, k=4, seed=3, make=lambda: Scripted(turns=2))
    g = torch.Generator().manual_seed(0)
    batch = batch.replace(rewards=torch.rand(len(batch), generator=g),  # varied, so every group has signal
                          ref_logp=batch.old_logp.clone(), values=torch.zeros_like(batch.old_logp))
    algo = get_algorithm(name, beta=0.05, entropy_coef=0.01)
    batch = algo.compute_advantages(batch)
    with torch.no_grad():
        base = token_logprobs(model, batch)
    logp = (base + 0.05 * torch.randn(base.shape, generator=g)).requires_grad_(True)  # ratios != 1 as well
    trainer_fields = dict(entropy=torch.ones_like(base).requires_grad_(True), new_values=torch.zeros_like(base),
                          returns=batch.returns if batch.returns is not None else torch.zeros_like(base))
    loss, _ = algo.compute_loss(logp, batch.replace(**trainer_fields))
    loss.backward()
    for b in range(len(batch)):
        cols = env_positions(batch, b)
        assert len(cols) > 0
        assert (logp.grad[b, cols] == 0).all() and (trainer_fields["entropy"].grad[b, cols] == 0).all()
    assert logp.grad[batch.response_mask.bool()].abs().sum() > 0


def test_one_turn_verifier_env_is_the_verifier_path(tiny_gpt):
    model, tok = tiny_gpt
    params = SamplingParams(max_new_tokens=4)
    prompt_ids = [tok.encode_prompt(r["prompt"]) for r in ROWS]
    a, _ = run_episodes(build_engine("native", model, tok), Reward(answer_match_reward, tok), ROWS, prompt_ids, 4,
                        params, 11)
    env = role(tok, lambda: VerifierEnv(answer_match_reward), max_turns=1, max_tokens=4)
    b, _ = run_episodes(build_engine("native", model, tok), env, ROWS, prompt_ids, 4, params, 11)
    for field in ("input_ids", "attention_mask", "response_mask", "old_logp", "rewards", "group_ids"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert a.meta["completion"] == b.meta["completion"]


def test_token_budget_caps_the_response_region(tiny_gpt):
    batch, _ = episodes(tiny_gpt, make=lambda: Scripted(turns=99), max_tokens=9, max_turns=99)
    widths = batch.attention_mask.sum(1) - torch.tensor([len(p) for p in [[1] * 7, [1] * 5] for _ in range(2)])
    assert (widths <= 9).all()
    assert set(batch.meta["finish_reason"]) <= {"budget", "length", "stop"}


class Raises(Scripted):
    def step(self, turn):
        if self.row["prompt"].startswith("7"):
            raise RuntimeError("tool crashed")
        return super().step(turn)


class Hangs(Scripted):
    def step(self, turn):
        if self.row["prompt"].startswith("7"):
            time.sleep(30)
        return super().step(turn)


def test_an_env_that_raises_is_named_with_its_episode(tiny_gpt):
    with pytest.raises(EnvError, match=r"episode 2 \(prompt '7\+8=', turn 1.*RuntimeError: tool crashed"):
        episodes(tiny_gpt, make=Raises)


def test_an_env_that_raises_or_hangs_scores_zero_and_is_counted_with_on_error_zero(tiny_gpt):
    batch, metrics = episodes(tiny_gpt, make=Raises, on_error="zero")
    assert metrics["env/errors"] == 2 and metrics["env/timeouts"] == 0
    assert batch.rewards[2:].eq(0).all() and batch.response_mask[2:].eq(0).all()
    assert "tool crashed" in batch.meta["env_error"][2] and batch.meta["env_error"][0] is None
    t = time.monotonic()
    batch, metrics = episodes(tiny_gpt, make=Hangs, on_error="zero", timeout_s=0.5)
    assert time.monotonic() - t < 20  # the hung steps were abandoned, not waited for (30 s each)
    assert metrics["env/timeouts"] == 2 and "timed out" in batch.meta["env_error"][3]
    with pytest.raises(EnvError, match="timed out"):
        episodes(tiny_gpt, make=Hangs, timeout_s=0.5)


def test_call_all_keeps_order_and_replaces_hung_workers():
    def slow(i):
        return lambda: (time.sleep(5) if i == 0 else None, i)[1]

    out = call_all([slow(i) for i in range(6)], timeout_s=0.5, workers=1)  # one worker: the hung one is replaced
    assert out[0].timed_out and [r.value for r in out[1:]] == [1, 2, 3, 4, 5]
    out = call_all([lambda: 1 / 0, lambda: 2], timeout_s=None, workers=1)
    assert isinstance(out[0].error, ZeroDivisionError) and out[1].value == 2


def test_chat_message_observations_append_only_the_templates_glue(tiny_llama_dir):
    from rlpost.config import ModelConfig
    from rlpost.models import load_model

    model, tok = load_model(ModelConfig(name=tiny_llama_dir))
    tok.tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
                             "{% if add_generation_prompt %}assistant: {% endif %}")
    obs = [{"role": "tool", "content": "42"}]
    glue = encode_observation(tok, obs, after_eos=True)  # the turn's sampled </s> closed it: the glue starts after
    assert tok.tok.decode(glue) == "\ntool: 42</s>\nassistant: "
    closing = encode_observation(tok, obs)  # a turn cut before its </s> gets the template's close as well
    assert tok.tok.decode(closing) == "</s>\ntool: 42</s>\nassistant: "

    class ToolTalk(Scripted):
        def reset(self, row):
            return [{"role": "user", "content": row["prompt"]}]

        def step(self, turn):
            self.n += 1
            return Step(observation=[{"role": "tool", "content": "42"}], done=self.n >= 2)

    engine = build_engine("native", model, tok)
    batch, _ = run_episodes(engine, EnvRole(make=ToolTalk, tokenizer=tok, max_turns=2, max_tokens=40), ROWS,
                            [[0]] * 2, 2, SamplingParams(max_new_tokens=4), 0)
    first = tok.tok.apply_chat_template([{"role": "user", "content": ROWS[0]["prompt"]}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False)
    row = batch.input_ids[0][batch.attention_mask[0].bool()].tolist()
    assert row[:len(first)] == list(first)
    assert batch.meta["turns"][0] == 2  # the first turn ran out of budget or ended on eos: either way a second one
    cols = env_positions(batch, 0)
    ended = batch.input_ids[0, cols[0] - 1].item() == tok.eos_token_id
    assert batch.input_ids[0, cols].tolist() == (glue if ended else closing)
    with torch.no_grad():
        logp = token_logprobs(model, batch)
    m = batch.response_mask.bool()
    assert (logp[m] - batch.old_logp[m]).abs().max().item() <= 1e-4


def test_calculator_is_exact_and_refuses_anything_but_arithmetic():
    assert calculate("123*456") == "56088" and calculate("(2+3)**3 - 1") == "124" and calculate("1/4") == "0.25"
    assert calculate("7//2") == "3" and calculate("-7 % 3") == "2" and calculate("2/3") == "0.6666666667"
    for bad in ("__import__('os')", "x + 1", "9**9**9", "1/0", "10**61", "[1]", "open('f')"):
        with pytest.raises(CalculatorError):
            calculate(bad)
    assert calculate("1_000") == "1000" and calculate("2**-2") == "0.25"  # "1_000" used to read as 10


@pytest.mark.parametrize("call", ["0**-1", "0.0**-2", "1e999", "1e999-1e999", "1" + "+1" * 100_000,
                                  "-" * 100_000 + "1", "1" + "*1" * 5_000, "1\x00", "9" * 4000 + "**64",
                                  "9" * 4000, "9" * 61])
def test_calculator_refuses_hostile_calls_instead_of_crashing_the_episode(call):
    # each used to raise ZeroDivisionError, OverflowError, RecursionError, MemoryError or ValueError (a result
    # past 4300 digits written out to count them) out of step(), which ends the run under env_on_error=raise:
    # a call the policy writes is never the run's error; and a number is refused past MAX_DIGITS, written or not
    with pytest.raises(CalculatorError):
        calculate(call)
    env = CalculatorEnv()
    env.reset({"prompt": "p", "answer": "6"})
    assert env.step(f"<calc>{call}</calc>").observation == "<result>error</result>"


def test_calculator_env_answers_calls_and_scores_the_final_turn():
    env = CalculatorEnv(call_open="?", call_close="", result_open="=", result_close=";", max_calls=1)
    assert env.reset({"prompt": "12*34=", "answer": "408"}) == "12*34="
    s = env.step("?12*34")
    assert (s.observation, s.reward, s.done) == ("=408;", 0.0, False)
    s = env.step("?1+1")  # past max_calls: this turn is the answer, and it is wrong
    assert s.done and s.reward == 0.0
    env.reset({"prompt": "12*34=", "answer": "408"})
    assert env.step("408").reward == 1.0
    xml = CalculatorEnv()
    xml.reset({"prompt": "p", "answer": "6"})
    assert xml.step("let me see <calc>2*3</calc>").observation == "<result>6</result>"
    assert xml.step("<calc>oops</calc>").observation == "<result>error</result>"


@pytest.mark.parametrize("option, value", [("max_result_chars", -1), ("max_result_chars", 0), ("max_calls", -1),
                                           ("max_calls", 1.5), ("max_calls", True)])
def test_a_tool_envs_limits_are_checked_when_the_run_is_configured(option, value):
    """max_result_chars=-1 was taken as given and cut the last character off every answer ('=5608;' for 56088)."""
    from rlpost.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=f"{option} must be a whole number >= "):
        load_config("recipes/tool_calculator.yaml", [f"task.env_options.{option}={value}"])
    no_calls = load_config("recipes/tool_calculator.yaml", ["task.env_options.max_calls=0"])  # a tool never called
    assert no_calls.task.env_options["max_calls"] == 0


def test_multi_turn_demonstrations_train_only_the_assistant_turns(tiny_gpt):
    _, tok = tiny_gpt
    turns = [{"role": "assistant", "content": "12"}, {"role": "tool", "content": "=3"},
             {"role": "assistant", "content": "3"}]
    ids, trained = encode_demonstration(tok, turns)
    E = tok.eos_token_id
    assert ids == tok.encode("12") + [E] + tok.encode("=3") + tok.encode("3") + [E]
    assert trained == [1, 1, 1, 0, 0, 1, 1]
    assert encode_demonstration(tok, "46") == (tok.encode("46") + [E], [1, 1, 1])
    batch = Batch.for_sft([tok.encode_prompt("1+2=")], [ids], tok.pad_token_id, [trained])
    P = batch.prompt_width
    assert batch.response_mask[0, P:].tolist() == trained and batch.attention_mask[0, P:].sum() == len(ids)
    with pytest.raises(ValueError, match="segment 0"):
        encode_demonstration(tok, [{"content": "x"}])


def test_env_names_resolve_and_bad_ones_are_named(tmp_path, monkeypatch):
    from rlpost.env import load_env
    from rlpost.env.tools import PythonToolEnv

    assert load_env("calculator") is CalculatorEnv and load_env("python") is PythonToolEnv
    with pytest.raises(ValueError, match="shipped: calculator, python"):
        load_env("chess")
    (tmp_path / "my_envs.py").write_text("def not_a_class(): pass\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="must name a class"):
        load_env("my_envs:not_a_class")
    with pytest.raises(ValueError, match="task.env 'my_envs:Missing'"):
        load_env("my_envs:Missing")


def test_python_tool_env_runs_calls_in_the_sandbox():
    from rlpost.env.tools import PythonToolEnv

    env = PythonToolEnv(timeout_s=5)
    env.reset({"prompt": "p", "answer": "42"})
    assert env.step("let me compute <python>print(6*7)</python>").observation == "<output>42</output>"
    assert env.step("<python>print(1/0)</python>").observation == "<output>error: " \
        "exit_nonzero</output>"
    s = env.step("42")
    assert s.done and s.reward == 1.0


def test_a_tool_that_prints_what_gpt_mini_cannot_spell_answers_in_escapes_instead_of_stopping_the_run():
    """The policy's program decides what the python tool prints: a tab or an 'é' (outside PRINTABLE, the
    alphabet a fresh gpt_mini gets for this env) used to make an observation the tokenizer could not encode,
    an EnvError that stops the run whatever task.env_on_error says."""
    from rlpost.env import PRINTABLE
    from rlpost.env.tools import PythonToolEnv
    from rlpost.models.gpt_mini import CharTokenizer
    from rlpost.stages.rl import sample_records

    tok = CharTokenizer(PRINTABLE)
    env = EnvRole(make=lambda: PythonToolEnv(answer_match_reward, timeout_s=5), tokenizer=tok, max_turns=2,
                  max_tokens=200, name="python")
    rows = [{"prompt": "p", "answer": "7"}]
    engine = ScriptedEngine(tok, ["<python>print(chr(120) + chr(9) + chr(233) + chr(20013))</python>", "7"])
    batch, _ = run_episodes(engine, env, rows, [tok.encode_prompt("p")], 1, SamplingParams(max_new_tokens=80), 0)
    assert batch.rewards.tolist() == [1.0]
    assert sample_records(1, batch, None)[0]["turns"][0]["observation"] == "<output>x\\t\\xe9\\u4e2d</output>"
    calc = CalculatorEnv(alphabet="0123456789=;", **{**CALCULATOR, "error_text": "?", "max_calls": 2})  # no "."
    calc.reset(rows[0])
    assert calc.step("?2*3").observation == "=6;" and calc.step("?1/4").observation == "=?;"


# ---------------------------------------------------------------------------- the episode token budget

CALCULATOR = {"call_open": "?", "call_close": "", "result_open": "=", "result_close": ";", "max_calls": 1,
              "error_text": ""}  # recipes/tool_calculator.yaml's


def calculator_episodes(budget, k=4, runs=1):
    """k episodes of '123*456=' against the recipe's calculator: the policy calls '?123*456' (9 tokens with
    eos), the tool answers '=56088;' (7), the policy answers '56088' (6); rollout.max_new_tokens is 10."""
    from rlpost.models.gpt_mini import CharTokenizer

    tok = CharTokenizer("0123456789*?=;")
    env = EnvRole(make=lambda: CalculatorEnv(answer_match_reward, **CALCULATOR), tokenizer=tok, max_turns=2,
                  max_tokens=budget, name="calculator")
    rows = [{"prompt": "123*456=", "answer": "56088"}]
    out = []
    for _ in range(runs):
        out.append(run_episodes(ScriptedEngine(tok, ["?123*456", "56088"]), env, rows,
                                [tok.encode_prompt(rows[0]["prompt"])], k, SamplingParams(max_new_tokens=10), 0))
    return out


def test_the_default_episode_budget_leaves_room_for_the_environments_observations():
    from rlpost.config import TaskConfig
    from rlpost.env import response_budget

    task = TaskConfig(env="calculator", env_options=CALCULATOR, max_turns=2)
    # two turns of 10 and the calculator's longest answer between them: '=' + 60 digits and a sign + ';'
    assert response_budget(task, 10) == 2 * 10 + 63
    [(batch, metrics)] = calculator_episodes(response_budget(task, 10))
    assert batch.meta["turns"] == [2] * 4 and batch.rewards.tolist() == [1.0] * 4
    assert metrics["env/budget_frac"] == 0.0
    scripted = TaskConfig(env="tests.test_env_episodes:Scripted", max_turns=3)  # declares nothing: max_new_tokens
    assert response_budget(scripted, 10) == 3 * 10 + 2 * 10
    assert response_budget(TaskConfig(env="calculator", max_turns=2, max_episode_tokens=26), 10) == 26


def test_episodes_stopped_by_the_budget_are_counted_and_warned_about_once(capsys):
    from rlpost.controller import rollout_metrics

    # the old default, max_turns * max_new_tokens = 20: the answer turn gets 4 tokens of the 6 it needs
    (batch, metrics), (_, again) = calculator_episodes(20, runs=2)
    assert batch.meta["finish_reason"] == ["budget"] * 4 and batch.rewards.tolist() == [0.0] * 4
    assert metrics["env/budget_frac"] == 1.0 and again["env/budget_frac"] == 1.0
    assert rollout_metrics(batch)["rollout/truncated_frac"] == 1.0
    err = capsys.readouterr().err
    assert err.count("warning") == 1  # once per run, not once per step
    assert "4 of 4 episodes" in err and "task.max_episode_tokens=26" in err
    [(batch, metrics)] = calculator_episodes(26)  # the value it names is enough
    assert batch.rewards.tolist() == [1.0] * 4 and metrics["env/budget_frac"] == 0.0
    assert "warning" not in capsys.readouterr().err


def test_an_observation_that_leaves_no_room_stops_the_episode_by_budget(capsys):
    (batch, metrics), = calculator_episodes(16)  # 9 + 7: no token left for the answer
    assert batch.meta["finish_reason"] == ["budget"] * 4 and batch.meta["turns"] == [1] * 4
    assert metrics["env/budget_frac"] == 1.0
    assert "task.max_episode_tokens=26" in capsys.readouterr().err


# ---------------------------------------------------------------------------- what gpt_mini can spell

def build(tmp_path, overrides):
    from rlpost.config import load_config
    from rlpost.run import build_context
    from rlpost.runlog import RunLog, make_run_dir

    runs = tmp_path / "runs"  # a new run directory each time: a run never writes into another one's
    n = len(list(runs.iterdir())) if runs.is_dir() else 0
    cfg = load_config(None, ["task.name=multiply", "task.num_eval=20", "task.max_turns=2", "model.n_layer=1",
                             "model.n_embd=32", "model.n_head=1", f"out_dir={runs}", f"run_name=vocab{n}"]
                      + overrides)
    run_dir = make_run_dir(cfg, "test")
    return build_context(cfg, run_dir, RunLog(run_dir, write=False))


def test_a_fresh_gpt_mini_spells_what_the_environment_may_answer_before_training(tmp_path):
    # the calculator's default markers are not in the multiply task's alphabet ("0123456789*?=;")
    ctx = build(tmp_path, ["task.env=calculator"])
    assert ctx.tokenizer.decode(ctx.tokenizer.encode("<result>-1.5e+61</result>")) == "<result>-1.5e+61</result>"
    from rlpost.config import TaskConfig
    from rlpost.env import PRINTABLE, observation_alphabet

    assert observation_alphabet(TaskConfig(env="calculator", env_options=CALCULATOR)) == "0123456789-.e+=;"
    assert observation_alphabet(TaskConfig(env="tests.test_env_episodes:Scripted")) == PRINTABLE  # declares none
    assert observation_alphabet(TaskConfig()) == ""


def test_a_saved_gpt_mini_that_cannot_spell_the_environments_answers_fails_before_training(tmp_path):
    from rlpost.config import ModelConfig
    from rlpost.models import build_gpt_mini, save_model

    model, tok = build_gpt_mini(ModelConfig(n_layer=1, n_embd=32, n_head=1, block_size=128), "0123456789*?=;")
    save_model(model, tok, str(tmp_path / "saved"))
    lacks = r"task.env 'calculator' may answer with the character '-' .*'.e\+<rsult>/o'.*lacks"
    with pytest.raises(ValueError, match=lacks):
        build(tmp_path, ["task.env=calculator", f"model.name={tmp_path / 'saved'}", "stages=[rl]"])
    recipe = ("task.env_options={call_open: '?', call_close: '', result_open: '=', result_close: ';', "
              "error_text: '', max_calls: 1}")  # recipes/tool_calculator.yaml's markers: only a result's '-.e+' lack
    with pytest.raises(ValueError, match=r"the character '-' \(and 3 more: '.e\+'\)"):
        build(tmp_path, ["task.env=calculator", f"model.name={tmp_path / 'saved'}", "stages=[rl]", recipe])
    model, tok = build_gpt_mini(ModelConfig(n_layer=1, n_embd=32, n_head=1, block_size=128), "0123456789*?=;-.e+")
    save_model(model, tok, str(tmp_path / "spells"))
    ctx = build(tmp_path, ["task.env=calculator", f"model.name={tmp_path / 'spells'}", "stages=[rl]", recipe])
    assert ctx.tokenizer.chars == "0123456789*?=;-.e+"
    # an env that answers with fewer characters says so (this policy cannot write a '-', '.' or 'e')
    ctx = build(tmp_path, ["task.env=calculator", f"model.name={tmp_path / 'saved'}", "stages=[rl]",
                           recipe[:-1] + ", alphabet: '0123456789=;'}"])
    assert ctx.tokenizer.chars == "0123456789*?=;"


def test_eval_reward_scores_the_final_turn_of_task_env_episodes():
    """eval.reward with task.env: the environment scores its final turn with the eval reward in place of the
    run's. The policy calls the calculator, then answers 99999: wrong for the run's exact reward, right for an
    eval reward that asks for nines."""
    from rlpost.config import load_config
    from rlpost.env.verifiers import eval_reward_role, reward_role
    from rlpost.heldout import evaluate
    from rlpost.models.gpt_mini import CharTokenizer

    tok = CharTokenizer("0123456789*?=;")
    options = "{call_open: '?', call_close: '', result_open: '=', result_close: ';', max_calls: 1}"
    cfg = load_config(None, ["task.env=calculator", f"task.env_options={options}", "task.max_turns=2",
                             "task.max_episode_tokens=30", "eval.reward=format",
                             "eval.reward_options={pattern: '9+'}"])
    rows = [{"prompt": "123*456=", "answer": "56088"}]
    run_role = reward_role(cfg.task, answer_match_reward, tok, 10)
    eval_role = eval_reward_role(cfg.eval, run_role)
    assert isinstance(eval_role, EnvRole) and eval_role.max_turns == 2 and eval_role is not run_role
    results = [evaluate(ScriptedEngine(tok, ["?123*456", "99999"]), role, rows, [tok.encode_prompt(rows[0]["prompt"])],
                        samples=2, temperature=1.0, max_new_tokens=10) for role in (run_role, eval_role)]
    assert [r["mean_reward"] for r in results] == [0.0, 1.0]
    assert results[1]["pass@1"] == 1.0


def test_eval_reward_is_refused_for_an_environment_that_scores_itself(tmp_path, monkeypatch):
    from rlpost.config import ConfigError, load_config

    (tmp_path / "own_envs.py").write_text("from rlpost.env import Env\n\nclass SelfScored(Env):\n"
                                          "    def __init__(self, level=1):\n        self.level = level\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="eval.reward.*scores its episodes itself"):
        load_config(None, ["task.env=own_envs:SelfScored", "eval.reward=exact"])
    load_config(None, ["task.env=own_envs:SelfScored"])  # without eval.reward it is fine


# ---------------------------------------------------------------------------- the turns rollouts.jsonl keeps

def test_rollout_records_keep_each_turn_with_its_reward_finish_and_tokens():
    from rlpost.stages.rl import sample_records

    [(batch, metrics)] = calculator_episodes(26, k=2)
    records = sample_records(5, batch, None)
    assert len(records) == 2 and metrics["env/tool_calls"] == 1.0
    r = records[0]
    assert r["turns"] == [
        {"policy": "?123*456", "policy_tokens": 9, "finish": "stop", "reward": 0.0, "env": "continue",
         "observation": "=56088;", "env_tokens": 7},
        {"policy": "56088", "policy_tokens": 6, "finish": "stop", "reward": 1.0, "env": "done",
         "observation": None, "env_tokens": 0}]
    assert (r["policy_tokens"], r["env_tokens"], r["response_len"]) == (15, 7, 15)
    assert r["env_info"] == {"calls": 1} and "env_error" not in r and r["reward"] == 1.0
    json.dumps(records)  # one line each in rollouts.jsonl
    # the old default budget cuts the answer turn; an observation that leaves no room ends the episode
    [(batch, _)] = calculator_episodes(20, k=1)
    turns = sample_records(1, batch, None)[0]["turns"]
    assert [(t["finish"], t["env"]) for t in turns] == [("stop", "continue"), ("budget", "done")]
    [(batch, _)] = calculator_episodes(16, k=1)
    turns = sample_records(1, batch, None)[0]["turns"]
    assert [(t["finish"], t["env"], t["observation"]) for t in turns] == [("stop", "budget", None)]


class RaisesOnSecondStep(Scripted):
    def step(self, turn):
        if self.n == 1 and self.row["prompt"].startswith("7"):
            raise RuntimeError("tool crashed late")
        return super().step(turn)


def test_rollout_records_of_a_failed_episode_name_the_failed_turn_and_count_no_reward(tiny_gpt):
    from rlpost.stages.rl import sample_records

    batch, metrics = episodes(tiny_gpt, make=RaisesOnSecondStep, on_error="zero", max_turns=2)
    records = sample_records(1, batch, tiny_gpt[1])
    for r in records[:2]:  # '12+34=': two turns (the env would take three), 0.25 each
        assert [t["env"] for t in r["turns"]] == ["continue", "max_turns"]
        assert [t["reward"] for t in r["turns"]] == [0.25] * 2 and r["reward"] == 0.5
        assert [t["observation"] for t in r["turns"]] == ["+1=", None] and r["env_tokens"] == 3
        assert r["policy_tokens"] == sum(t["policy_tokens"] for t in r["turns"]) == r["response_len"]
    for r in records[2:]:  # '7+8=': the second step raised: the turns stay, the failed one says so
        assert [t["env"] for t in r["turns"]] == ["continue", "error"]
        assert [t["reward"] for t in r["turns"]] == [None, None] and r["reward"] == 0.0
        assert "tool crashed late" in r["env_error"] and r["finish_reason"] == "error"
    assert metrics["env/errors"] == 2 and "env/tool_calls" not in metrics


def test_one_turn_records_stay_as_they_were(tiny_gpt):
    """The verifier path (no environment) writes the fields it always wrote, and no turns."""
    from rlpost.stages.rl import sample_records

    model, tok = tiny_gpt
    engine = build_engine("native", model, tok)
    reward = Reward(answer_match_reward, tok)
    batch, _ = run_episodes(engine, reward, ROWS, [tok.encode_prompt(r["prompt"]) for r in ROWS], 2,
                            SamplingParams(max_new_tokens=4), 0)
    for r in sample_records(1, batch, tok):
        assert set(r) == {"step", "group", "prompt", "completion", "reward", "finish_reason", "policy_version",
                          "old_logp_mean", "old_logp_min", "response_len", "answer"}
