"""`rlpost curate`: exact and near duplicates, decontamination, the pass-rate band and its histogram, on
hand-made rows with known answers; then the command end to end on a tiny gpt_mini checkpoint."""

import json
import os
import subprocess
import sys

import pytest

from rlpost.cli import main
from rlpost.config import ModelConfig, TaskConfig
from rlpost.curate import (contamination, curate, exact_duplicates, histogram, jaccard, minhash_signatures,
                           near_duplicates, normalise, shingles)
from rlpost.tasks import load_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def flat(text):
    """Each line with its runs of spaces as one."""
    return [" ".join(line.split()) for line in text.splitlines()]


# ---------------------------------------------------------------------------- duplicates

def test_exact_duplicates_after_normalising_case_and_whitespace():
    texts = [normalise(t) for t in ["What is  2+2?", "what is 2+2?", "What is 2+3?", " WHAT IS 2+2? "]]
    assert texts[0] == "what is 2+2?"
    assert exact_duplicates(texts) == [None, 0, None, 0]


def test_near_duplicates_by_character_shingle_jaccard():
    france = normalise("What is the capital of France?")   # 30 characters: 26 distinct 5-grams
    shout = normalise("What is the capital of France?!")   # the same 26 and "nce?!"
    spain = normalise("What is the capital of Spain?")     # 25 5-grams; 19 lie inside "what is the capital of "
    assert len(shingles(france)) == 26 and len(shingles(spain)) == 25
    assert jaccard(shingles(france), shingles(shout)) == 26 / 27
    assert jaccard(shingles(france), shingles(spain)) == 19 / (26 + 25 - 19)
    assert near_duplicates([france, shout, spain], 0.9) == [None, (0, 26 / 27), None]
    assert near_duplicates([france, shout, spain], 0.5) == [None, (0, 26 / 27), (0, 19 / 32)]
    assert near_duplicates([france, shout, spain], 0.97) == [None, None, None]  # 26/27 = 0.963
    # a later text is compared with the kept ones only: a chain of small edits keeps every other link
    chain = ["abcdefghijklmnopqrst", "abcdefghijklmnopqrsX", "abcdefghijklmnopqrXY"]
    # 16 5-grams each; neighbours share 15 (J = 15/17), the ends 14 (J = 14/18)
    found = near_duplicates(chain, 0.8)
    assert found == [None, (0, 15 / 17), None]


def test_near_duplicates_agree_with_the_quadratic_scan():
    """MinHash + LSH only proposes candidates (each confirmed exactly): on this set it finds what comparing
    every pair finds, at three thresholds."""
    import random

    rng = random.Random(0)
    base = ["".join(rng.choice("abcde ") for _ in range(rng.randrange(8, 40))) for _ in range(60)]
    texts = base + [t[:-1] + "z" for t in base[:30]] + [t + "q" for t in base[:20]]
    for t in (0.6, 0.8, 0.9):
        found = near_duplicates(texts, t)
        kept: list[int] = []
        for i, x in enumerate(texts):  # the same greedy rule, by brute force over every kept text
            sims = [(j, jaccard(shingles(x), shingles(texts[j]))) for j in kept]
            first = next(((j, s) for j, s in sims if s >= t), None)
            assert (found[i] is None) == (first is None), (t, i)
            if first is None:
                kept.append(i)


# ---------------------------------------------------------------------------- contamination

def test_minhash_of_a_long_prompt_holds_a_chunk_of_hashes_not_all_of_them():
    """One signature used to build a [shingles, 128] uint64 matrix at once: 1 GB of temporaries for a 1 MB
    prompt (a 10 MB one ran out of memory). It is computed a chunk at a time, to the same values: the
    signature of a union is the elementwise minimum of its parts' signatures."""
    import tracemalloc

    import numpy as np

    big = [f"{i:07d}" for i in range(100_000)]  # 100k shingles: 100 MB at once, 4 MB a chunk
    tracemalloc.start()
    try:
        sig = minhash_signatures([set(big)])[0]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 40e6, peak
    parts = minhash_signatures([set(big[:7]), set(big[7:50_000]), set(big[50_000:])])
    assert (np.minimum.reduce(parts) == sig).all()
    assert (minhash_signatures([{"abcde", "bcdef"}, {"x"}])[1] == minhash_signatures([{"x"}])[0]).all()


def test_a_shared_13_gram_contaminates_and_12_shared_words_do_not():
    letters = "a b c d e f g h i j k l m n o"  # 15 words
    train = ["x y a b c d e f g h i j k l m z",   # a..m: 13 shared words in a row
             "x a b c d e f g h i j k l y z",     # a..l: 12
             "Compute 12+34= now",                # the whole short eval prompt "12+34=" inside it
             "12+3=",                             # short, and not inside any eval prompt
             "b c d",                             # short, and inside the long eval prompt
             "12 + 34 ="]                         # the short eval prompt, spaced differently: the same words
    assert contamination(train, [letters, "12+34="], n=13) == [0, None, 1, None, 0, 1]
    assert contamination(train, [letters, "12+34="], n=12) == [0, 0, 1, None, 0, 1]


# ---------------------------------------------------------------------------- band and histogram

def test_the_band_keeps_prompts_the_model_sometimes_solves():
    rows = [{"prompt": f"problem {i}", "answer": "1", "line": i + 1} for i in range(6)]
    rates = [0.0, 0.125, 0.5, 0.875, 1.0, 0.9]
    result = curate(rows, pass_rates=lambda rs: [rates[int(r["prompt"].split()[1])] for r in rs], band=(0.1, 0.9))
    assert [r["prompt"] for r in result.kept] == ["problem 1", "problem 2", "problem 3", "problem 5"]
    assert [r["pass_rate"] for r in result.kept] == [0.125, 0.5, 0.875, 0.9]
    assert [(r["prompt"], p) for r, p in result.out_of_band] == [("problem 0", 0.0), ("problem 4", 1.0)]
    narrow = curate(rows, pass_rates=lambda rs: [rates[int(r["prompt"].split()[1])] for r in rs], band=(0.5, 0.5))
    assert [r["prompt"] for r in narrow.kept] == ["problem 2"]
    with pytest.raises(ValueError, match="--band must satisfy 0 <= lo <= hi <= 1"):
        curate(rows, band=(0.9, 0.1))


def test_the_histogram_counts_buckets_and_their_mean_signal():
    text = histogram([0.0, 0.0, 0.125, 0.5, 0.5, 1.0], (0.1, 0.9), width=10)
    lines = flat(text)
    assert "p = 0 2 33.3% 0.000 ##########" in lines
    assert "0 < p < 0.1 0 0.0% -" in lines
    assert "0.1 <= p < 0.2 1 16.7% 0.109 #####" in lines        # 0.125 * 0.875 = 0.109375
    assert "0.5 <= p < 0.6 2 33.3% 0.250 ##########" in lines
    assert "p = 1 1 16.7% 0.000 #####" in lines
    assert len(lines) == 1 + 12 + 1
    # (0.109375 + 0.25 + 0.25) / 6 = 0.1016; over the 3 in the band: 0.6094 / 3 = 0.2031
    assert lines[-1] == ("signal density (mean p(1-p), at most 0.25): 0.102 over all 6 prompts, 0.203 over the 3 "
                         "in the band [0.1, 0.9]")


def test_filters_run_in_order_and_count_each_row_once():
    rows = [{"prompt": p, "line": i + 1} for i, p in enumerate(
        ["add 3 and 4", "ADD 3 and 4", "please add the numbers 12 and 30 and write the sum",
         "please add the numbers 12 and 30 and write the sum!", "add 9 and 1", "add 2 and 2"])]
    result = curate(rows, [{"prompt": "add 9 and 1", "row": 1}], near_dup=0.9, ngram=13)
    assert result.counts() == {"read": 6, "exact_duplicates": 1, "near_duplicates": 1, "contaminated": 1,
                               "too_long": 0, "out_of_band": 0, "kept": 3}
    assert [(a["line"], b["line"]) for a, b in result.exact] == [(2, 1)]
    assert [(a["line"], b["line"]) for a, b, _ in result.near] == [(4, 3)]
    assert [(a["line"], b["row"]) for a, b in result.contaminated] == [(5, 1)]
    assert [r["line"] for r in result.kept] == [1, 3, 6]
    assert curate(rows, near_dup=0).counts()["kept"] == 5  # 0: the near-duplicate filter is off


# ---------------------------------------------------------------------------- the command

REWARD = '''import collections

calls = collections.Counter()


def score(completion, row):
    """1 for easy rows, 0 for hard ones, and every other sample of a mixed one, whatever the completion."""
    if row["kind"] == "easy":
        return 1.0
    if row["kind"] == "hard":
        return 0.0
    calls[row["prompt"]] += 1
    return float(calls[row["prompt"]] % 2)
'''

LONG = "please add the numbers 12 and 30 and write the sum, then add 1 more to it"
TRAIN = [("add 3 and 4", "mixed"), ("add 3 and 4", "mixed"), ("add 5 and 6", "easy"), ("add 7 and 8", "hard"),
         ("please add the numbers 12 and 30 and write the sum", "mixed"),
         ("please add the numbers 12 and 30 and write the sum!", "mixed"), ("add 9 and 1", "mixed"),
         ("add 2 and 2", "mixed"), (LONG, "mixed")]


def write_data(tmp_path):
    with open(tmp_path / "train.jsonl", "w") as f:
        for prompt, kind in TRAIN:
            f.write(json.dumps({"prompt": prompt, "answer": "0", "kind": kind}) + "\n")
    (tmp_path / "eval.jsonl").write_text(json.dumps({"prompt": "add 9 and 1", "answer": "10"}) + "\n")
    (tmp_path / "mixed_reward.py").write_text(REWARD)


@pytest.fixture
def checkpoint(tmp_path):
    """An untrained gpt_mini saved to a folder; block_size 64 leaves room for 60-character prompts + 3 tokens."""
    from rlpost.models import build_gpt_mini, save_model

    alphabet = "".join(sorted({c for p, _ in TRAIN for c in p} | set("0123456789")))
    model, tok = build_gpt_mini(ModelConfig(n_layer=1, n_head=1, n_embd=16, block_size=64), alphabet)
    save_model(model, tok, str(tmp_path / "ckpt"))
    return str(tmp_path / "ckpt")


def test_rlpost_curate_end_to_end_on_a_gpt_mini_checkpoint(tmp_path, checkpoint):
    write_data(tmp_path)
    assert len(LONG) + 1 + 3 > 64  # bos + prompt + max_new_tokens: too long for the checkpoint
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "rlpost.cli", "curate", "--model", checkpoint, "--train", "train.jsonl",
           "--eval", "eval.jsonl", "--out", "out/curated.jsonl", "-k", "4", "--reward", "mixed_reward:score",
           "--max-new-tokens", "3", "--device", "cpu", "--report", "report.json", "rollout.temperature=1.0"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = flat(proc.stdout)
    for expected in ["read 9", "exact duplicates -1 e.g. line 2 = line 1",
                     "near duplicates -1 e.g. line 6 ~ line 5 (0.98) (Jaccard >= 0.9 of character 5-grams)",
                     "contaminated -1 e.g. line 7 ~ eval line 1 (13-gram overlap with eval.jsonl)",
                     "too long -1 e.g. line 9 (74 tokens)", "kept 3"]:
        assert any(line.startswith(expected) for line in lines), (expected, proc.stdout)
    assert any(line.startswith("out of band -2 e.g. line 3 (p=1.00); line 4 (p=0.00)") for line in lines)
    assert "0.5 <= p < 0.6 3 60.0% 0.250 ##############################" in lines
    assert "p = 0 1 20.0% 0.000 ##########" in lines and "p = 1 1 20.0% 0.000 ##########" in lines
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["counts"] == {"read": 9, "exact_duplicates": 1, "near_duplicates": 1, "contaminated": 1,
                                "too_long": 1, "out_of_band": 2, "kept": 3}
    # each pass rate with the row it belongs to (the rows the first four filters kept)
    assert dict(zip(report["pass_rate_rows"], report["pass_rates"])) == {
        "line 1": 0.5, "line 3": 1.0, "line 4": 0.0, "line 5": 0.5, "line 8": 0.5}
    # the train loader reads the output back
    task = load_task(TaskConfig(name="file", train_file=str(tmp_path / "out" / "curated.jsonl")))
    assert [r["prompt"] for r in task.train_rows] == ["add 3 and 4",
                                                     "please add the numbers 12 and 30 and write the sum",
                                                     "add 2 and 2"]
    assert all(r["pass_rate"] == 0.5 and r["kind"] == "mixed" and r["answer"] == "0" for r in task.train_rows)


def test_rlpost_curate_without_a_model_writes_parquet(tmp_path, capsys, monkeypatch):
    write_data(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["curate", "--no-model", "--train", "train.jsonl", "--eval", "eval.jsonl",
                 "--out", "curated.parquet"]) == 0
    out = capsys.readouterr().out
    assert "out of band - (--no-model)" in flat(out)
    task = load_task(TaskConfig(name="file", train_file=str(tmp_path / "curated.parquet")))
    assert [r["prompt"] for r in task.train_rows] == ["add 3 and 4", "add 5 and 6", "add 7 and 8",
                                                     "please add the numbers 12 and 30 and write the sum",
                                                     "add 2 and 2", LONG]
    assert "pass_rate" not in task.train_rows[0]
    # needs --model or --no-model; a missing file is named
    assert main(["curate", "--train", "train.jsonl", "--out", "x.jsonl"]) == 1
    assert "give --model" in capsys.readouterr().err
    assert main(["curate", "--no-model", "--train", "nope.jsonl", "--out", "x.jsonl"]) == 1
    assert "prompt file not found: nope.jsonl" in capsys.readouterr().err


def test_curate_writes_the_kept_rows_under_the_columns_they_came_from(tmp_path, capsys, monkeypatch):
    """GSM8K's `question` stays `question`, so the recipe that names it (task.prompt_key) reads the output."""
    monkeypatch.chdir(tmp_path)
    with open("train.jsonl", "w") as f:
        for q in ["Tom has 3 apples and buys 4 more. How many now?", "Tom has 3 apples and buys 4 more. How many now?",
                  "A box holds 6 eggs. How many eggs are in 5 boxes?"]:
            f.write(json.dumps({"question": q, "solution": "3 + 4 = 7\n#### 7", "source": "hand"}) + "\n")
    assert main(["curate", "--no-model", "--train", "train.jsonl", "--out", "out.parquet",
                 "--prompt-key", "question", "--answer-key", "solution"]) == 0
    assert "train on them with `rlpost train task.name=file task.train_file=out.parquet`" in capsys.readouterr().out
    import pyarrow.parquet as pq

    assert pq.read_table("out.parquet").column_names == ["question", "solution", "source"]
    with pytest.warns(UserWarning, match="GSM8K's form"):  # no task.reward: the exact match cannot score these
        rows = load_task(TaskConfig(name="file", train_file="out.parquet", prompt_key="question",
                                    answer_key="solution")).train_rows
    assert [r["prompt"] for r in rows] == ["Tom has 3 apples and buys 4 more. How many now?",
                                          "A box holds 6 eggs. How many eggs are in 5 boxes?"]
    assert rows[0]["answer"] == "3 + 4 = 7\n#### 7" and rows[0]["source"] == "hand"


def test_curate_refuses_rows_its_reward_cannot_score_and_an_out_file_that_is_its_input(tmp_path, capsys,
                                                                                      monkeypatch):
    """Under the math reward a '####' with nothing after it is no gold: curate used to keep (or, with a model,
    sample and then crash on) such rows, and `--out` naming the input overwrote it with the kept rows alone."""
    monkeypatch.chdir(tmp_path)
    rows = [{"question": "Tom has 3 apples and buys 4 more. How many now?", "answer": "3 + 4 = 7\n#### 7"},
            {"question": "A box holds 6 eggs. How many eggs are in 5 boxes?", "answer": "6 * 5 = 30\n#### "}]
    with open("train.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    keys = ["--prompt-key", "question", "--reward", "math"]
    assert main(["curate", "--no-model", "--train", "train.jsonl", "--out", "out.jsonl", *keys]) == 1
    assert "line 2: 'answer' (the gold answer of the math reward) has nothing after its last '####'" in \
        capsys.readouterr().err
    assert not os.path.exists("out.jsonl")
    with open("train.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows[:1] + rows[:1])
    before = open("train.jsonl").read()
    assert main(["curate", "--no-model", "--train", "train.jsonl", "--out", "./train.jsonl", *keys]) == 1
    assert "--out ./train.jsonl is the --train file" in capsys.readouterr().err
    assert open("train.jsonl").read() == before
    # an --out that cannot be written is refused before the model loads and samples, not after
    assert main(["curate", "--model", "./no_such_model", "--train", "train.jsonl", "--out", "kept.csv", *keys]) == 1
    assert "cannot write kept.csv: the extension must be .jsonl, .json or .parquet" in capsys.readouterr().err
    # so is one whose folder is a file, or that is a folder: both failed after the sampling ('File exists', ...)
    # rows whose columns --out cannot hold (a parquet timestamp in JSON, mixed types in a parquet column): the
    # same, where json.dumps / pyarrow failed with a bare TypeError after the sampling
    import datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"question": [rows[0]["question"]], "answer": [rows[0]["answer"]],
                             "when": [datetime.datetime(2024, 1, 1)]}), "dated.parquet")
    assert main(["curate", "--model", "./no_such_model", "--train", "dated.parquet", "--out", "kept.jsonl",
                 *keys]) == 1
    assert "cannot write kept.jsonl: column 'when' holds datetime values, which JSON cannot hold; write a .parquet " \
        "file instead" in capsys.readouterr().err
    with open("mixed.jsonl", "w") as f:
        f.writelines(json.dumps({**rows[0], "id": i}) + "\n" for i in (1, "a"))
    assert main(["curate", "--model", "./no_such_model", "--train", "mixed.jsonl", "--out", "kept.parquet",
                 *keys]) == 1
    assert "cannot write kept.parquet: column 'id' holds values of more than one type" in capsys.readouterr().err
    assert not os.path.exists("kept.jsonl") and not os.path.exists("kept.parquet")
    os.makedirs("a_folder.jsonl")
    for out, why in (("train.jsonl/kept.jsonl", "train.jsonl is a file, not a folder"),
                     ("a_folder.jsonl", "it is a folder")):
        assert main(["curate", "--model", "./no_such_model", "--train", "train.jsonl", "--out", out, *keys]) == 1
        assert f"cannot write {out}: " in (err := capsys.readouterr().err) and why in err, err


TWO_TURN_ENV = '''from rlpost.env import Env, Step

resets, steps = {}, 0


class Twice(Env):
    """Two turns: the first is answered with a space, the second scored by the row's kind as mixed_reward does
    (1 easy, 0 hard, every other episode of a mixed row), whatever the policy wrote."""

    alphabet = " "
    observation_tokens = 1

    def reset(self, row):
        resets[row["prompt"]] = n = resets.get(row["prompt"], 0) + 1
        self.row, self.n, self.turns = row, n, 0
        return row["prompt"]

    def step(self, turn):
        global steps
        steps += 1
        self.turns += 1
        if self.turns == 1:
            return Step(observation=" ")
        kind = self.row["kind"]
        return Step(reward=1.0 if kind == "easy" else 0.0 if kind == "hard" else float(self.n % 2), done=True)
'''


def test_rlpost_curate_runs_task_env_episodes_for_the_pass_rates(tmp_path, checkpoint, monkeypatch, capsys):
    """With task.env, a prompt's pass rate is its episodes' (every turn of them), scored by the environment."""
    write_data(tmp_path)
    (tmp_path / "turns_env.py").write_text(TWO_TURN_ENV)
    monkeypatch.chdir(tmp_path)
    assert main(["curate", "--model", checkpoint, "--train", "train.jsonl", "--eval", "eval.jsonl",
                 "--out", "curated.jsonl", "-k", "4", "--max-new-tokens", "3", "--device", "cpu",
                 "--report", "report.json", "task.env=turns_env:Twice", "task.max_turns=2"]) == 0
    import turns_env  # the module the run loaded (the working directory is on sys.path)

    report = json.loads((tmp_path / "report.json").read_text())
    assert report["counts"] == {"read": 9, "exact_duplicates": 1, "near_duplicates": 1, "contaminated": 1,
                                "too_long": 1, "out_of_band": 2, "kept": 3}
    # each pass rate with the row it belongs to (the rows the first four filters kept)
    assert dict(zip(report["pass_rate_rows"], report["pass_rates"])) == {
        "line 1": 0.5, "line 3": 1.0, "line 4": 0.0, "line 5": 0.5, "line 8": 0.5}
    assert sorted(report["pass_rates"]) == [0.0, 0.5, 0.5, 0.5, 1.0]
    assert turns_env.steps == 5 * 4 * 2  # 5 prompts scored, 4 episodes each, 2 turns each
    assert "kept 3" in " ".join(flat(capsys.readouterr().out))


# ---------------------------------------------------------------------------- gold check

def test_check_gold_names_the_rows_whose_own_gold_does_not_verify(tmp_path, capsys, monkeypatch):
    """A demonstration that ends on another number than its answer, and a row the reward raises on, are data
    bugs: counted, named by line, written to --out; the exit code says so only under --strict."""
    monkeypatch.chdir(tmp_path)
    rows = [{"prompt": "2+2=", "answer": "4", "completion": "4"},
            {"prompt": "3+3=", "answer": "6", "completion": "7"},          # the demonstration is wrong
            {"prompt": "5+5=", "answer": "10"},                            # no demonstration: the answer itself
            {"prompt": "1+1=", "answer": "2", "completion": "2\nso 2"}]
    with open("train.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    assert main(["curate", "--check-gold", "--train", "train.jsonl", "--out", "bad.jsonl"]) == 0
    out = flat(capsys.readouterr().out)
    assert "rlpost curate --check-gold: train.jsonl: 3 of 4 rows' gold verifies under the exact first-line match " \
           "(a row passes when its gold scores >= 0.5)" in out
    assert "line 2: scored 0 < 0.5; gold '7'" in out
    assert [json.loads(line)["prompt"] for line in open("bad.jsonl")] == ["3+3="]
    assert main(["curate", "--check-gold", "--strict", "--train", "train.jsonl"]) == 1
    capsys.readouterr()
    # a reward that fails on a row: that row is named with the error; a clean file passes --strict
    with open("gold_reward.py", "w") as f:
        f.write("def score(completion, row):\n"
                "    if row['answer'] == '10':\n        raise KeyError('units')\n"
                "    return float(completion.strip().split()[0] == row['answer'])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["curate", "--check-gold", "--strict", "--train", "train.jsonl", "--reward", "gold_reward:score",
                 "--report", "gold.json"]) == 1
    out = flat(capsys.readouterr().out)
    assert "line 3: the verifier raised KeyError: 'units'; gold '10'" in out
    assert json.load(open("gold.json"))["rows"] == [
        {"where": "line 2", "why": "scored 0 < 0.5"},
        {"where": "line 3", "why": "the verifier raised KeyError: 'units'"}]
    with open("clean.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows if r["answer"] != "6")
    assert main(["curate", "--check-gold", "--strict", "--train", "clean.jsonl"]) == 0
    # without --check-gold, the filters still need --out
    assert main(["curate", "--no-model", "--train", "train.jsonl"]) == 1
    assert "give --out" in capsys.readouterr().err


def write_two_sources(tmp_path, env: str | None = None):
    """Two files mixed by task.sources, each with its own columns and reward: `math` (prompt / answer, the exact
    match) whose line 2's demonstration is wrong, and `qa` (q / a, a reward module that reads a lower-cased answer)."""
    with open(tmp_path / "math.jsonl", "w") as f:
        for prompt, answer, completion in [("2+2=", "4", "4"), ("3+3=", "6", "7"), ("5+5=", "10", "10")]:
            f.write(json.dumps({"prompt": prompt, "answer": answer, "completion": completion}) + "\n")
    with open(tmp_path / "qa.jsonl", "w") as f:
        for q, a in [("capital of France?", "PARIS"), ("capital of Spain?", "Madrid")]:
            f.write(json.dumps({"q": q, "a": a}) + "\n")
    (tmp_path / "lower_reward.py").write_text(
        "def score(completion, row):\n    return float(completion.strip().lower() == row['answer'].lower())\n")
    qa = {"file": "qa.jsonl", "prompt_key": "q", "answer_key": "a", "reward": "lower_reward:score"}
    if env:
        qa["env"] = env
    recipe = {"task": {"sources": [{"file": "math.jsonl", "weight": 2}, qa]}}
    (tmp_path / "mix.yaml").write_text(json.dumps(recipe))  # JSON is YAML


def test_check_gold_checks_every_source_with_its_own_columns_and_reward(tmp_path, capsys, monkeypatch):
    """Under task.sources each source's rows are read with its own columns and scored by its own reward: `qa`'s
    'PARIS' passes its case-blind reward (the exact match would fail it), `math`'s line 2 fails and is reported,
    written and counted under `math` alone."""
    write_two_sources(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["curate", "--check-gold", "--recipe", "mix.yaml", "--out", "bad.jsonl", "--report", "gold.json"]) == 0
    out = flat(capsys.readouterr().out)
    assert "rlpost curate --check-gold: task.sources[0] 'math' (math.jsonl): 2 of 3 rows' gold verifies under the " \
           "exact first-line match (a row passes when its gold scores >= 0.5)" in out
    assert "line 2: scored 0 < 0.5; gold '7'" in out
    assert "rlpost curate --check-gold: task.sources[1] 'qa' (qa.jsonl): 2 of 2 rows' gold verifies under " \
           "lower_reward:score (a row passes when its gold scores >= 0.5)" in out
    assert out.count("line 2: scored 0 < 0.5; gold '7'") == 1  # under math only
    assert "rlpost curate --check-gold: 4 of 5 rows' gold verifies over the 2 sources" in out
    # each source's failing rows under its own columns, in a file of its own
    assert [json.loads(line) for line in open("bad.math.jsonl")] == [{"prompt": "3+3=", "answer": "6",
                                                                      "completion": "7"}]
    assert open("bad.qa.jsonl").read() == ""
    report = json.load(open("gold.json"))
    assert report["checked"] == 5 and report["failed"] == 1
    assert report["sources"]["math"]["rows"] == [{"where": "line 2", "why": "scored 0 < 0.5"}]
    assert report["sources"]["qa"] == {"checked": 2, "failed": 0, "out": "bad.qa.jsonl", "rows": []}
    assert main(["curate", "--check-gold", "--strict", "--recipe", "mix.yaml"]) == 1
    capsys.readouterr()
    # the sources name their files: --train beside them, or the filters (one file, one task's columns), refused
    assert main(["curate", "--check-gold", "--recipe", "mix.yaml", "--train", "math.jsonl"]) == 1
    assert "with task.sources each source names its own (task.sources[i].file): leave out --train" in \
        capsys.readouterr().err
    assert main(["curate", "--no-model", "--recipe", "mix.yaml", "--out", "x.jsonl"]) == 1
    assert "curate each source's file on its own" in capsys.readouterr().err
    # without task.sources, --train is still needed
    assert main(["curate", "--check-gold"]) == 1
    assert "give --train" in capsys.readouterr().err


def test_check_gold_checks_an_embedded_source_with_its_tasks_verifier(tmp_path, capsys, monkeypatch):
    """A source that is an embedded task (no file): its generated rows, scored by the task's own verifier,
    every one right."""
    write_two_sources(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["curate", "--check-gold", "task.sources=[{file: math.jsonl}, {task: arithmetic}]"]) == 0
    out = flat(capsys.readouterr().out)
    head = next(line for line in out if "task.sources[1] 'arithmetic' (task arithmetic)" in line)
    checked = int(head.split("): ")[1].split()[2])
    assert checked > 0 and head.endswith(f"{checked} of {checked} rows' gold verifies under the arithmetic task's "
                                         "verifier (a row passes when its gold scores >= 0.5)")
    assert f"rlpost curate --check-gold: {checked + 2} of {checked + 3} rows' gold verifies over the 2 sources" in out


def test_check_gold_refuses_a_source_with_an_env_naming_it(tmp_path, capsys, monkeypatch):
    """An environment scores episodes, not one completion: the source is refused by its place in task.sources
    before any source is scored, as task.env is without sources."""
    write_two_sources(tmp_path, env="web")
    monkeypatch.chdir(tmp_path)
    assert main(["curate", "--check-gold", "--recipe", "mix.yaml", "--out", "bad.jsonl"]) == 1
    captured = capsys.readouterr()
    assert "task.sources[1] ('qa') names an env (web), which scores episodes" in captured.err
    assert captured.out == "" and not os.path.exists("bad.math.jsonl")
