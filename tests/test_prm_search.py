"""Process reward models (rlpost/env/process_reward_model.py, `rlpost prm`) and test-time search (rlpost/search.py,
`rlpost search`).

Step boundaries and the task's own step check against hand-written solutions; Monte-Carlo labels and the
search methods against a policy whose step accuracy is known exactly (`StepSolver`: an engine that solves
the chain-of-thought task one step at a time, each sum right with probability p, else its last digit one
off), so every expected number is computed by hand: with p = 1/2 a sample is right with probability 1/4,
and a step's label is 1/2 after a right first sum and 0 after a wrong one. The PRM's training on a real
trunk, and both commands end to end.
"""

import json
import math
import random

import pytest
import torch

from rlpost.batch import Batch
from rlpost.cli import main
from rlpost.models import encode_prompt
from rlpost.models.gpt_mini import GPT, CharTokenizer, GPTConfig
from rlpost.env.process_reward_model import (ProcessRewardModel, StepExample, evaluate_prm, fit_prm, mc_step_labels,
                                             step_ends)
from rlpost.env.reward_model import RewardModel
from rlpost.search import AGGREGATES, Searcher, StepCheckPRM, markdown_table, run_search
from rlpost.commands.prm import outcome_pairs
from rlpost.tasks.multistep import ALPHABET, multistep_task, step_truth


def VERIFY(completion: str, row: dict) -> float:
    """The final answer after "####" equals the gold one (what `math` with extract=hash checks, without its cost)."""
    try:
        return float(int(completion.rsplit("####", 1)[1]) == int(row["answer"]))
    except (IndexError, ValueError):
        return 0.0


def tokenizer():
    return CharTokenizer(ALPHABET)


class StepSolver:
    """An engine for the chain-of-thought task: from any prefix it writes the next step (with a stop string) or
    every remaining one, each of the two sums right with probability `p` (else its last digit is off), the
    answer step copying the last sum. Its steps' correctness is known, so search results are computable."""

    version, weight_sync_mode = 0, "copy"

    def __init__(self, tok, p: float = 0.5):
        self.tok, self.p, self.calls = tok, p, 0

    def _value(self, right: int, rng) -> int:
        """The right sum, or (a slip) its last digit one higher, mod 10: two slips never cancel."""
        return right if rng.random() < self.p else right - right % 10 + (right % 10 + 1) % 10

    def _rest(self, text: str, one_step: bool, rng) -> str:
        problem, _, partial = text.partition("=")
        a, b, c = (int(x) for x in problem.split("+"))
        steps = partial.split(";")[:-1]
        out = ""
        while True:
            if len(steps) == 0:
                step = f"{a:02d}+{b:02d}={self._value(a + b, rng):03d};"
            elif len(steps) == 1:
                s = int(steps[0].rsplit("=", 1)[1])
                step = f"{s:03d}+{c:02d}={self._value(s + c, rng):03d};"
            else:
                return out + f"#### {steps[1].rsplit('=', 1)[1]}"
            out += step
            steps.append(step[:-1])
            if one_step:
                return out

    def generate(self, prompts, k, params, seed=0):
        rng = random.Random(seed)
        self.calls += 1
        rows, stopped = [], []
        for ids in prompts:
            for _ in range(k):
                text = self._rest(self.tok.decode(ids), bool(params.stop), rng)
                toks = self.tok.encode_completion(text) + ([] if text.endswith(";") else [self.tok.eos_token_id])
                stopped.append(len(toks) <= params.max_new_tokens)
                rows.append(toks[:params.max_new_tokens])
        R = max(len(r) for r in rows)
        tokens = torch.tensor([r + [self.tok.pad_token_id] * (R - len(r)) for r in rows])
        return Batch.from_sequences(prompts, k, tokens, torch.zeros(tokens.shape),
                                    torch.tensor([len(r) for r in rows]), torch.tensor(stopped),
                                    self.tok.pad_token_id, self.version)

    def update_weights(self, named_tensors, version):
        raise NotImplementedError("a scripted solver has no weights")

    def close(self):
        pass


def problems(n=60, seed=0):
    task = multistep_task(seed=seed, num_eval=n, num_train=10)
    return task.eval_rows


# ---------------------------------------------------------------------------- steps and their truth

def test_steps_end_at_each_separator_token_and_at_the_last_token():
    tok = tokenizer()
    ids = tok.encode_completion("57+32=089;089+18=107;#### 107") + [tok.eos_token_id]
    assert step_ends(ids, tok) == [9, 20, len(ids) - 1]
    assert step_ends(tok.encode_completion("57+32=089;"), tok) == [9]      # a partial solution ending in a step
    assert step_ends(tok.encode_completion("57+32"), tok) == [4]           # no separator: one step


def test_the_tasks_own_step_check_on_hand_written_solutions():
    row = {"prompt": "57+32+18=", "answer": "107"}
    assert step_truth("57+32=089;089+18=107;#### 107", row) == [1, 1, 1]
    assert step_truth("57+32=099;099+18=117;#### 117", row) == [0, 0, 0]   # a slip carried through
    assert step_truth("57+32=089;089+18=117;#### 117", row) == [1, 0, 0]   # a slip in the last sum
    assert step_truth("57+32=089;089+18=107;#### 108", row) == [1, 1, 0]   # a wrong copy of the answer
    assert step_truth("57+32=089;089+18=107;", row) == [1, 1]               # a partial solution
    assert step_truth("57+32=0x9;#### 107", row) == [0, 0]                  # unreadable, answer in the wrong place


def test_prm_aggregates_by_hand():
    s = [0.9, 0.2, 0.8]
    assert (AGGREGATES["min"](s), AGGREGATES["last"](s)) == (0.2, 0.8)
    assert AGGREGATES["product"](s) == pytest.approx(0.144)


# ---------------------------------------------------------------------------- Monte-Carlo labels

def test_monte_carlo_labels_match_the_hand_computed_probabilities():
    """With each sum right w.p. 1/2: after a right first sum a continuation ends right w.p. 1/2, after a wrong
    one never; after a right second sum always. 64 rollouts per step estimate those to within sampling noise."""
    tok = tokenizer()
    rows = problems(40)
    ex = mc_step_labels(StepSolver(tok), VERIFY, tok, rows, [encode_prompt(tok, r["prompt"]) for r in rows],
                        solutions=2, rollouts=64, max_new_tokens=32, truth=step_truth)
    assert len(ex) == 80 and all(len(e.ends) == len(e.labels) == len(e.truth) == 3 for e in ex)
    first_right = [e.labels[0] for e in ex if e.truth[0]]
    first_wrong = [e.labels[0] for e in ex if not e.truth[0]]
    assert first_right and first_wrong
    assert max(first_wrong) == 0.0
    mean = sum(first_right) / len(first_right)  # 1/2, standard error 0.5 / sqrt(64 * n)
    assert abs(mean - 0.5) < 4 * 0.5 / math.sqrt(64 * len(first_right))
    assert all(e.labels[1] == float(e.truth[1]) for e in ex)                 # the answer step copies: no chance left
    assert all(e.labels[2] == VERIFY(tok.decode(e.response), e.row) for e in ex)  # the last: its own outcome
    assert all(label * 64 == round(label * 64) for e in ex for label in e.labels)


# ---------------------------------------------------------------------------- the PRM

def test_the_prm_learns_step_labels_at_the_step_ends_and_is_measured_on_held_out_ones():
    """Solutions whose slips a small trunk can see without doing arithmetic (a sum written as 999), labelled as a
    PRM is: a step is right when it and every step before it are. The labels of one solution differ from step to
    step, so the head must read each step at its own end. Held-out step accuracy near 1; the untrained head's
    BCE is log 2."""
    torch.manual_seed(0)
    tok = tokenizer()
    rng = random.Random(0)
    ex = []
    for row in multistep_task(num_eval=10, num_train=700).train_rows:
        a, b, c = (int(x) for x in row["prompt"].rstrip("=").split("+"))
        s, t = (a + b if rng.random() < 0.7 else 999), (a + b + c if rng.random() < 0.7 else 999)
        text = f"{a:02d}+{b:02d}={s:03d};{s:03d}+{c:02d}={t:03d};#### {t}"
        ids = tok.encode_completion(text) + [tok.eos_token_id]
        right = [s != 999, s != 999 and t != 999, s != 999 and t != 999]
        ex.append(StepExample(row, encode_prompt(tok, row["prompt"]), ids, step_ends(ids, tok),
                              [float(x) for x in right], step_truth(text, row)))
    train, held = ex[:600], ex[600:]
    prm = ProcessRewardModel(GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=2, n_head=2,
                                           n_embd=32)))
    before = evaluate_prm(prm, held, tok.pad_token_id)
    assert before["prm/eval_bce"] == pytest.approx(math.log(2), abs=1e-6)     # the head starts at zero
    result = fit_prm(prm, train, held, pad_id=tok.pad_token_id, epochs=4, batch_size=32, lr=3e-3)
    assert result["prm/eval_step_accuracy"] > 0.95, result
    assert result["prm/eval_steps"] == 300 and "prm/eval_truth_accuracy" in result


def test_a_prm_saves_and_loads_and_an_orm_folder_is_not_a_prm(tmp_path):
    tok = tokenizer()
    trunk = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=1, n_head=1, n_embd=16))
    prm = ProcessRewardModel(trunk)
    torch.nn.init.normal_(prm.head.weight)
    prm.save(str(tmp_path / "prm"), tok)
    loaded, _ = ProcessRewardModel.load(str(tmp_path / "prm"))
    ids = tok.encode_completion("57+32=089;089+18=107;#### 107") + [tok.eos_token_id]
    args = ([encode_prompt(tok, "57+32+18=")], [ids], [step_ends(ids, tok)], tok.pad_token_id)
    assert loaded.step_scores(*args)[0] == pytest.approx(prm.step_scores(*args)[0])
    RewardModel(trunk).save(str(tmp_path / "orm"), tok)
    with pytest.raises(Exception, match="not a process reward model.*rlpost prm"):
        ProcessRewardModel.load(str(tmp_path / "orm"))


def test_outcome_pairs_put_each_verified_solution_against_a_wrong_one_of_the_same_problem():
    tok = tokenizer()

    def ex(prompt, text, right):
        return StepExample({"prompt": prompt}, [1], tok.encode_completion(text), [0], [float(right)])

    examples = [ex("1+1+1=", "#### 3", 1), ex("1+1+1=", "#### 4", 0), ex("1+1+1=", "#### 5", 0),
                ex("2+2+2=", "#### 6", 1), ex("2+2+2=", "#### 6", 1), ex("3+3+3=", "#### 1", 0)]
    pairs = outcome_pairs(examples, tok, random.Random(0))
    assert [(p["prompt"], p["chosen"]) for p in pairs] == [("1+1+1=", "#### 3")]   # one right: one pair
    assert pairs[0]["rejected"] in ("#### 4", "#### 5")


# ---------------------------------------------------------------------------- search

def searcher(p=0.5, width=4):
    """The scripted solver searched with the task's own step check as its PRM (the best any PRM could do)."""
    tok = tokenizer()
    return Searcher(StepSolver(tok, p), tok, max_new_tokens=32, prm=StepCheckPRM(tok), width=width, seed=1,
               answer_key=lambda text: text.rsplit("####", 1)[-1].strip() if "####" in text else None)


def accuracy(s, rows, picks):
    return sum(VERIFY(s.tokenizer.decode(r), row) for (r, _), row in zip(picks, rows)) / len(rows)


def test_best_of_n_picks_by_each_aggregate():
    """Three candidates whose step scores make min, last and product each choose a different one."""
    class Fixed(Searcher):
        def prm_scores(self, prompts, responses):
            return [{0: [0.9, 0.2, 0.95], 1: [0.6, 0.6, 0.6], 2: [0.5, 0.9, 0.8]}[r[0]] for r in responses]

    s = Fixed(None, tokenizer(), max_new_tokens=32)
    samples = [[[0, 7], [1, 7, 7], [2]]]
    pick = {m: s.best_of_n([[1]], samples, 3, m)[0] for m in ("bon_prm_min", "bon_prm_last", "bon_prm_product")}
    assert {m: p[0][0] for m, p in pick.items()} == {"bon_prm_min": 1, "bon_prm_last": 0, "bon_prm_product": 2}
    assert all(p[1] == 6 for p in pick.values())                            # tokens: all three samples
    assert s.best_of_n([[1]], samples, 2, "bon_prm_product")[0] == ([1, 7, 7], 5)  # only the first two compete


def test_majority_vote_picks_the_most_common_answer():
    s = searcher()
    tok = s.tokenizer
    sols = [tok.encode_completion(t) for t in ("#### 5", "#### 7", "#### 7", "#### 5", "#### 7")]
    assert tok.decode(s.best_of_n([[1]], [sols], 5, "majority")[0][0]) == "#### 7"
    assert tok.decode(s.best_of_n([[1]], [sols], 2, "majority")[0][0]) == "#### 5"   # a tie: the first seen


def test_with_a_perfect_prm_every_method_reaches_the_hand_computed_accuracy():
    """p = 1/2 per sum: one sample is right w.p. 1/4 and best-of-8 w.p. 1 - (3/4)^8 = 0.90. Beam search (2 beams,
    8 first steps) is right unless all 8 first steps are wrong or both beams' 4 second steps are: 1 - 2^-8 -
    2^-8 ... = 0.99. MCTS, which expands 4 children per node, finds a right path too. Every answer is a finished
    solution, and MCTS spends its token budget."""
    rows = problems(80)
    s = searcher()
    prompts = [encode_prompt(s.tokenizer, r["prompt"]) for r in rows]
    samples = s.sample(prompts, 8)
    one = accuracy(s, rows, s.best_of_n(prompts, samples, 1, "bon_prm_last"))
    eight = accuracy(s, rows, s.best_of_n(prompts, samples, 8, "bon_prm_last"))
    assert abs(one - 0.25) < 4 * math.sqrt(0.25 * 0.75 / 80)
    assert abs(eight - (1 - 0.75 ** 8)) < 4 * math.sqrt(0.9 * 0.1 / 80) + 0.02
    beam = s.beam(prompts, 8)
    assert accuracy(s, rows, beam) >= 0.95
    assert all(s.finished(r) for r, _ in beam)
    mean_len = sum(len(r) for x in samples for r in x) / (8 * len(rows))
    mcts = s.mcts(prompts, 8 * mean_len)
    assert accuracy(s, rows, mcts) >= 0.9
    assert all(8 * mean_len <= t < 8 * mean_len + 2 * 32 for _, t in mcts)
    assert all(s.finished(r) for r, _ in mcts)


def test_at_n_1_beam_search_is_one_sample_and_costs_what_it_generates():
    rows = problems(40)
    s = searcher()
    prompts = [encode_prompt(s.tokenizer, r["prompt"]) for r in rows]
    picks = s.beam(prompts, 1)
    assert all(t == len(r) for r, t in picks)          # one beam, one sample per step: nothing thrown away
    assert abs(accuracy(s, rows, picks) - 0.25) < 4 * math.sqrt(0.25 * 0.75 / 40)


def test_search_table_and_methods_on_a_real_untrained_policy():
    """The real engine and a real (untrained) PRM and ORM: every method runs at every N and reports its tokens."""
    torch.manual_seed(0)
    tok = tokenizer()
    from rlpost.rollout import build_engine

    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=1, n_head=1, n_embd=16))
    rows = problems(6)
    s = Searcher(build_engine("auto", model, tok), tok, max_new_tokens=32, prm=ProcessRewardModel.from_policy(model),
                 orm=RewardModel.from_policy(model), seed=0)
    results = run_search(s, rows, [encode_prompt(tok, r["prompt"]) for r in rows], VERIFY, [1, 4],
                         ["greedy", "majority", "bon_orm", "bon_prm_min", "bon_prm_last", "bon_prm_product", "beam",
                          "mcts"], log=lambda _: None)
    assert len(results) == 1 + 5 * 2 + 2 * 2
    assert all(r["tokens_per_problem"] > 0 for r in results)
    table = markdown_table(results, [1, 4])
    assert table.splitlines()[2].startswith("| greedy |") and "—" in table.splitlines()[2]


# ---------------------------------------------------------------------------- the commands

TINY = ["task.name=multistep", "task.reward=math", "task.reward_options={extract: hash}", "task.num_eval=12",
        "model.n_layer=1", "model.n_embd=16", "model.n_head=1", "threads=1", "rollout.max_new_tokens=32"]


def test_prm_and_search_commands_end_to_end(tmp_path, capsys):
    assert main(["train", *TINY, "sft.steps=20", "sft.batch_size=16", "sft.save_every=0", "rl.steps=0",
                 "eval.samples_per_prompt=1", f"out_dir={tmp_path}", "run_name=sft"]) == 0
    policy = tmp_path / "sft" / "checkpoints" / "sft"
    assert main(["prm", *TINY, f"model.name={policy}", "prm.problems=12", "prm.eval_problems=6", "prm.solutions=2",
                 "prm.rollouts=2", "prm.epochs=1", "prm.batch_size=8", "reward_model.epochs=1",
                 f"out_dir={tmp_path}", "run_name=prm"]) == 0
    summary = json.loads((tmp_path / "prm" / "summary.json").read_text())
    assert 0.0 <= summary["eval_step_accuracy"] <= 1.0 and summary["solutions_labelled"] == 24
    assert "eval_truth_accuracy" in summary and summary["steps_labelled"] >= 24
    assert summary["orm"] is None and "no training problem had both" in summary["orm_skipped"]  # a 0 % policy
    labels = [json.loads(line) for line in (tmp_path / "prm" / "prm_labels.jsonl").read_text().splitlines()]
    assert len(labels) == 36 and all(len(x["steps"]) == len(x["labels"]) for x in labels)
    capsys.readouterr()
    out = tmp_path / "search.json"
    assert main(["search", str(tmp_path / "sft"), "--prm", summary["prm"], "--n", "1", "2", "--problems", "4",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    methods = {r["method"] for r in result["results"]}
    assert methods == {"greedy", "majority", "bon_prm_min", "bon_prm_last", "bon_prm_product", "beam", "mcts"}
    assert result["problems"] == 4 and "| beam |" in printed
    assert main(["search", str(tmp_path / "sft"), "--methods", "bon_orm", "--n", "1", "--problems", "2",
                 "--out", str(out)]) == 1
    assert "needs an outcome reward model (--orm)" in capsys.readouterr().err
    assert main(["search", str(tmp_path / "sft"), "--prm", str(tmp_path / "nowhere"), "--out", str(out)]) == 1
    assert "--prm" in capsys.readouterr().err
    assert main(["search", str(tmp_path / "sft"), "--width", "0", "--out", str(out)]) == 1
    assert "--width and --problems must be >= 1" in capsys.readouterr().err
    assert main(["search", str(tmp_path / "sft"), "--prm", "step-check", "--methods", "beam", "--n", "4",
                 "--problems", "4", "--out", str(out)]) == 0
    assert [r["method"] for r in json.loads(out.read_text())["results"]] == ["beam"]
