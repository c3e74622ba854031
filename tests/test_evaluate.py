"""Evaluation: the unbiased pass@k and maj@k against hand-computed values, successes rather than mean
partial credit, and `rlpost eval` end to end on a saved checkpoint."""

import json
import math
import textwrap

import pytest

from rlpost.heldout import majority_success, pass_at_k


def test_pass_at_k_is_the_unbiased_estimator():
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2))  # 0.7
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)           # pass@1 is the success rate
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 4, 1) == 1.0
    assert pass_at_k(8, 6, 3) == 1.0                           # fewer than k failures: some draw passes
    assert pass_at_k(8, 1, 4) == pytest.approx(0.5)            # 1 - C(7,4)/C(8,4) = 1 - 35/70
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_majority_vote():
    assert majority_success(["7", "8", "7"], [True, False, True])
    assert not majority_success(["8", "7", "8"], [False, True, False])
    assert majority_success(["7", "8"], [True, False])            # a tie goes to the answer seen first
    assert not majority_success([None, None], [False, False])
    assert majority_success([None, None, "7"], [False, False, True])  # no answer never wins a vote


@pytest.fixture
def checkpoint(tmp_path, monkeypatch):
    from rlpost.config import ModelConfig
    from rlpost.models import build_gpt_mini, save_model
    from rlpost.tasks.arithmetic import ALPHABET

    model, tok = build_gpt_mini(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16), ALPHABET)
    save_model(model, tok, str(tmp_path / "ckpt"))
    # rewards that do not depend on the (untrained) model: by prompt, and a constant partial credit
    (tmp_path / "by_prompt.py").write_text(textwrap.dedent("""
        def even_first_digit(completion, row):
            return 1.0 if int(row["prompt"][0]) % 2 == 0 else 0.0
        def half(completion, row):
            return 0.5
    """))
    monkeypatch.chdir(tmp_path)
    return str(tmp_path / "ckpt")


def test_rlpost_eval_counts_successes_and_writes_eval_json(checkpoint, tmp_path, capsys):
    from rlpost.cli import main
    from rlpost.tasks.arithmetic import arithmetic_task

    keys = ["task.num_eval=40", "rollout.max_new_tokens=4"]
    assert main(["eval", checkpoint, *keys, "task.reward=by_prompt:even_first_digit", "--k", "1", "4",
                 "--out", "e.json"]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    rows = arithmetic_task(num_eval=40).eval_rows
    even = sum(int(r["prompt"][0]) % 2 == 0 for r in rows) / len(rows)  # every sample of such a prompt passes
    assert result["pass@1"] == pytest.approx(even) and result["pass@4"] == pytest.approx(even)
    assert result["maj@4"] == pytest.approx(even) and result["mean_reward"] == pytest.approx(even)
    assert result["prompts"] == 40 and result["samples"] == 4 and 1 <= result["mean_length"] <= 4
    assert "pass@4" in capsys.readouterr().out

    # partial credit is not a pass: pass@1 counts successes, the mean reward is reported beside it
    assert main(["eval", checkpoint, *keys, "task.reward=by_prompt:half", "--out", "h.json"]) == 0
    half = json.loads((tmp_path / "h.json").read_text())
    assert half["pass@1"] == 0.0 and half["mean_reward"] == pytest.approx(0.5)
    assert main(["eval", checkpoint, *keys, "task.reward=by_prompt:half", "eval.success_threshold=0.5",
                 "--out", "h2.json"]) == 0
    assert json.loads((tmp_path / "h2.json").read_text())["pass@1"] == 1.0
    # k above the samples is named
    assert main(["eval", checkpoint, *keys, "--k", "8", "--samples", "4"]) == 1
    assert "between 1 and the samples" in capsys.readouterr().err


def test_an_out_that_cannot_be_written_is_refused_before_sampling_and_a_folder_gets_eval_json(checkpoint, tmp_path,
                                                                                             capsys, monkeypatch):
    """--out in a folder that is a file or not there failed with a bare OSError once every prompt had been sampled
    (hours on a real model), and an --out that is a folder with IsADirectoryError."""
    import rlpost.heldout as heldout
    from rlpost.cli import main

    keys = ["task.num_eval=4", "rollout.max_new_tokens=4", "--samples", "1"]
    (tmp_path / "a_file").write_text("")
    sampled = []
    with monkeypatch.context() as m:
        m.setattr(heldout, "load_task", lambda *a: sampled.append(a) or None)  # no work may start
        for out, why in (("a_file/eval.json", "a_file is a file"), ("no_folder/eval.json", "no_folder is not there")):
            assert main(["eval", checkpoint, *keys, "--out", out]) == 1
            assert f"--out {out}: " in (err := capsys.readouterr().err) and why in err, err
    assert sampled == []
    (tmp_path / "results").mkdir()
    assert main(["eval", checkpoint, *keys, "--out", "results"]) == 0
    assert json.loads((tmp_path / "results" / "eval.json").read_text())["prompts"] == 4


def test_rlpost_eval_on_a_run_directory_uses_its_config_and_newest_weights(tmp_path, monkeypatch):
    from rlpost.cli import main
    from rlpost.config import load_config
    from rlpost.run import train

    monkeypatch.chdir(tmp_path)
    s = train(load_config(None, ["out_dir=runs", "run_name=r", "task.num_eval=30", "sft.steps=2", "rl.steps=1",
                                 "rl.eval_every=0", "model.n_layer=1", "model.n_embd=16", "model.n_head=2",
                                 "rollout.prompts_per_step=4", "rollout.k=2", "eval.samples_per_prompt=2"]))
    assert main(["eval", "runs/r", "--k", "1", "2"]) == 0
    result = json.loads((tmp_path / "runs" / "r" / "eval.json").read_text())
    assert result["checkpoint"].endswith("checkpoints/final") and result["prompts"] == 30
    assert result["pass@1"] == pytest.approx(s["pass@1_rl"])  # the pipeline's evaluation, same samples


def test_maj_at_k_votes_on_the_rewards_final_answer_or_the_first_line():
    from rlpost.env import RewardRole
    from rlpost.env.reward import Reward
    from rlpost.env.verifiers import get_reward

    math = Reward(get_reward("math", extract="hash"), None)  # maj@k asks the role, which asks its verifier
    assert math.final_answer("12+30=042;042+05=047;#### 047") == "047"
    code = Reward(get_reward("code", extract="whole"), None)  # its `extract` option is a string, not an extractor
    assert code.final_answer("def f(x):return x\nmore") == "def f(x):return x"
    assert RewardRole().final_answer("  \n") is None  # a role without a verifier (a learned reward)
    math.close()


@pytest.mark.parametrize("flags", [["--samples", "0"], ["--samples", "-2"], ["--k", "0"], ["--k", "1", "-1"]])
def test_rlpost_eval_refuses_a_count_below_one_before_loading_anything(flags, capsys):
    """--samples 0 was read as unset (the largest k) and the run went on; a negative count failed only after the
    checkpoint had loaded, with a message about k."""
    from rlpost.cli import main

    with pytest.raises(SystemExit) as e:
        main(["eval", "no/such/run", *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flags[0]}: must be a whole number >= 1" in err, err


class ThreeSamples:
    """Turn n of sample j is turns[n][j] (and eos): three episodes of one prompt, their texts told apart."""

    version = 0

    def __init__(self, tok, turns: list[list[str]]):
        self.tok, self.turns, self.calls = tok, turns, 0

    def generate(self, prompts, k, params, seed=0):
        import torch

        from rlpost.batch import Batch

        texts, self.calls = self.turns[self.calls], self.calls + 1
        ids = [self.tok.encode_completion(t) + [self.tok.eos_token_id] for t in texts]
        width = max(map(len, ids))
        tokens = torch.tensor([i + [self.tok.pad_token_id] * (width - len(i)) for i in ids])
        return Batch.from_sequences(prompts, k, tokens, torch.zeros(tokens.shape), torch.tensor(list(map(len, ids))),
                                    torch.ones(len(ids), dtype=torch.bool), self.tok.pad_token_id, self.version)


def test_maj_at_k_of_environment_episodes_votes_on_their_final_turn():
    """Three calculator episodes of 2*3: the first looks up 1+1 and answers 7, the others 2*3 and 3*2 and answer 6.
    Voting on the final turns, 6 wins two to one; on the whole completions (each holds its own look-up) the three
    were all different, and the tie went to the first, wrong one: maj@3 was 0."""
    from rlpost.env import EnvRole
    from rlpost.env.tools import CalculatorEnv
    from rlpost.heldout import evaluate
    from rlpost.models.gpt_mini import CharTokenizer
    from rlpost.tasks import answer_match_reward

    tok = CharTokenizer("0123456789+*?=;")
    options = {"call_open": "?", "call_close": "", "result_open": "=", "result_close": ";", "max_calls": 1}
    role = EnvRole(make=lambda: CalculatorEnv(answer_match_reward, **options), tokenizer=tok, max_turns=2,
                   max_tokens=40, name="calculator")
    engine = ThreeSamples(tok, [["?1+1", "?2*3", "?3*2"], ["7", "6", "6"]])
    rows = [{"prompt": "2*3=", "answer": "6"}]
    result = evaluate(engine, role, rows, [tok.encode_prompt("2*3=")], samples=3, temperature=1.0,
                      max_new_tokens=10, ks=(1, 3))
    assert result["pass@1"] == pytest.approx(2 / 3) and result["maj@3"] == 1.0 and result["maj@1"] == 0.0


def test_maj_at_k_of_a_mixed_task_votes_with_each_rows_own_sources_extraction():
    """task.sources: a math source's samples vote on math's final answer, as they would alone. SourceRewards had no
    extraction of its own, so the vote was on first lines: three different ones, the tie to the first (wrong)."""
    from rlpost.env.reward import Reward
    from rlpost.env.verifiers import SourceRewards, get_reward
    from rlpost.heldout import evaluate
    from rlpost.models.gpt_mini import CharTokenizer
    from rlpost.prompts import SOURCE_KEY
    from rlpost.tasks import answer_match_reward

    tok = CharTokenizer("0123456789#xyz \n")
    math = get_reward("math", extract="hash")
    role = Reward(SourceRewards({"sums": math, "plain": answer_match_reward}), tok)
    engine = ThreeSamples(tok, [["z\n#### 5", "x\n#### 47", "y\n#### 47"]])
    rows = [{"prompt": "47", "answer": "#### 47", SOURCE_KEY: "sums"}]
    try:
        result = evaluate(engine, role, rows, [tok.encode_prompt("47")], samples=3, temperature=1.0,
                          max_new_tokens=10, ks=(3,))
    finally:
        math.close()
    assert result["pass@3"] == 1.0 and result["maj@3"] == 1.0 and result["pass@3_sums"] == 1.0
