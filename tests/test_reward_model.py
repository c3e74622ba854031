"""The Bradley–Terry reward model and the RLHF reward role: the loss against its formula, the score read
at the last real token, save/load, fitting, the gold reward logged beside the proxy, and the pipeline."""

import json
import math
import os
import random

import pytest
import torch

from rlpost.config import load_config
from rlpost.models import ModelLoadError, save_model
from rlpost.cli import main
from rlpost.run import train
from rlpost.preference.data import tokenize_preferences
from rlpost.env.reward_model import (LearnedReward, RewardModel, bradley_terry_loss, evaluate_pairs,
                                     fit_reward_model, pair_rewards, task_pairs)
from rlpost.rollout import SamplingParams, build_engine
from rlpost.tasks.arithmetic import arithmetic_task

from test_end_to_end import TINY, read_metrics


def softplus(x):
    return math.log1p(math.exp(x))


def test_bradley_terry_loss_is_minus_log_sigmoid_of_the_margin():
    r_w = torch.tensor([1.0, -0.5, 2.0], requires_grad=True)
    r_l = torch.tensor([0.0, 0.5, 2.0])
    loss, m = bradley_terry_loss(r_w, r_l)
    # -log sigmoid(d) = log(1 + exp(-d)) for margins d = 1, -1, 0
    want = (softplus(-1.0) + softplus(1.0) + math.log(2.0)) / 3
    assert loss.item() == pytest.approx(want, abs=1e-6)
    assert m["rm/accuracy"] == pytest.approx(1 / 3) and m["rm/margin"] == pytest.approx(0.0, abs=1e-7)
    loss.backward()  # d/dr_w of -log sigmoid(d) / n = -sigmoid(-d) / n
    want_grad = [-1 / (1 + math.exp(d)) / 3 for d in (1.0, -1.0, 0.0)]
    assert r_w.grad.tolist() == pytest.approx(want_grad, abs=1e-6)


def test_score_is_read_at_the_last_real_token_and_ignores_padding(tiny_gpt):
    model, tok = tiny_gpt
    rm = RewardModel.from_policy(model)
    torch.nn.init.normal_(rm.head.weight)
    pairs = [{"prompt": "12+3=", "chosen": "15", "rejected": "0015", "where": "line 1"},
             {"prompt": "1+1=", "chosen": "2", "rejected": "3", "where": "line 2"}]
    data = tokenize_preferences(pairs, tok, max_length=24)
    batch = data.batch(data.sequences([0, 1]), tok.pad_token_id)
    scores = rm.score(batch)
    r_w, r_l = pair_rewards(rm, data, [0, 1], tok.pad_token_id)
    assert torch.equal(r_w, scores[0::2]) and torch.equal(r_l, scores[1::2])
    for i in range(len(batch)):  # the same row alone, no padding at all
        ids = batch.input_ids[i][batch.attention_mask[i].bool()][None]
        h = rm.trunk.hidden_states(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None])
        alone = rm.head(h[0, -1]).item()
        assert scores[i].item() == pytest.approx(alone, abs=1e-5)
    # a reward model starting from zero scores everything 0: no preference before training
    assert torch.all(RewardModel.from_policy(model).score(batch) == 0)


def test_fitting_learns_a_preference_and_save_load_round_trips(tiny_gpt, tmp_path):
    model, tok = tiny_gpt
    rng = random.Random(0)
    # a learnable preference: answers starting with 1 beat answers starting with 2
    def pair(i):
        p = f"{rng.randrange(50)}+{rng.randrange(50)}="
        tail = str(rng.randrange(10))
        return {"prompt": p, "chosen": "1" + tail, "rejected": "2" + tail, "where": f"line {i}"}
    train = tokenize_preferences([pair(i) for i in range(256)], tok, max_length=24)
    held_out = tokenize_preferences([pair(i) for i in range(64)], tok, max_length=24)
    rm = RewardModel.from_policy(model)
    pad = tok.pad_token_id
    assert evaluate_pairs(rm, held_out, pad)["rm/eval_accuracy"] == 0.0  # all ties: r_w > r_l never holds
    result = fit_reward_model(rm, train, held_out, pad_id=pad, epochs=2, batch_size=32, lr=3e-3)
    assert result["rm/eval_accuracy"] > 0.95 and result["rm/eval_margin"] > 0
    rm.save(str(tmp_path / "rm"), tok)
    loaded, loaded_tok = RewardModel.load(str(tmp_path / "rm"))
    batch = held_out.batch(held_out.sequences(list(range(8))), pad)
    assert torch.allclose(loaded.score(batch), rm.score(batch), atol=1e-6)
    save_model(model, tok, str(tmp_path / "plain"))
    with pytest.raises(ModelLoadError, match="reward_head"):
        RewardModel.load(str(tmp_path / "plain"))


def test_task_pairs_prefer_the_right_answer_and_flip_the_asked_fraction():
    rows = arithmetic_task(num_eval=50).train_rows[:2000]
    clean = task_pairs(rows, random.Random(0))
    assert all(p["chosen"] == r["answer"] != p["rejected"] for p, r in zip(clean, rows))
    noisy = task_pairs(rows, random.Random(0), label_noise=0.2)
    flipped = sum(p["rejected"] == r["answer"] for p, r in zip(noisy, rows)) / len(rows)
    assert 0.17 < flipped < 0.23


def test_learned_reward_scores_rollouts_and_keeps_the_gold_reward(tiny_gpt):
    model, tok = tiny_gpt
    rm = RewardModel.from_policy(model)
    torch.nn.init.normal_(rm.head.weight)
    engine = build_engine("native", model, tok)
    rows = [{"prompt": "12+30=", "answer": "42"}, {"prompt": "1+1=", "answer": "2"}]
    batch = engine.generate([tok.encode_prompt(r["prompt"]) for r in rows], 3, SamplingParams(max_new_tokens=4),
                            seed=0)
    batch = batch.replace(meta={**batch.meta, "row": [r for r in rows for _ in range(3)]})
    always_one = lambda completion, row: 1.0  # noqa: E731
    scored, metrics = LearnedReward(rm, tok, gold=always_one)(batch)
    with torch.no_grad():
        assert torch.allclose(scored.rewards, rm.score(batch), atol=1e-6)
    assert scored.meta["gold_reward"] == [1.0] * 6 and metrics["reward/errors"] == 0.0


@pytest.mark.parametrize("packing", [False, True])
def test_learned_reward_role_scores_in_the_trainers_micro_batches(tiny_gpt, packing):
    model, tok = tiny_gpt
    rm = RewardModel.from_policy(model)
    torch.nn.init.normal_(rm.head.weight)
    engine = build_engine("native", model, tok)
    rows = [{"prompt": "12+30=", "answer": "42"}, {"prompt": "1+1=", "answer": "2"}]
    prompts = [tok.encode_prompt(r["prompt"]) for r in rows]
    batch = engine.generate(prompts, 3, SamplingParams(max_new_tokens=4), seed=0)
    batch = batch.replace(meta={**batch.meta, "row": [r for r in rows for _ in range(3)]})
    whole, _ = LearnedReward(rm, tok)(batch)
    calls = []
    rm.trunk.transformer.h[0].register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0] * a[0].shape[1]))
    T = batch.input_ids.shape[1]
    micro, _ = LearnedReward(rm, tok, micro_batch_tokens=2 * T, packing=packing)(batch)
    torch.testing.assert_close(micro.rewards, whole.rewards, atol=1e-5, rtol=0)
    assert len(calls) > 1 and max(calls) <= 2 * T, calls


def test_rlhf_pipeline_trains_a_reward_model_and_logs_gold_beside_proxy(tmp_path):
    cfg = load_config(None, TINY + [f"out_dir={tmp_path}", "run_name=rlhf", "reward_model.train=true",
                                    "reward_model.pairs=128", "reward_model.eval_pairs=32", "reward_model.epochs=1",
                                    "reward_model.batch_size=32", "algorithm={name: ppo}"])
    summary = train(cfg)
    assert summary["status"] == "ok" and 0.0 <= summary["rm_pair_accuracy"] <= 1.0
    rl = [m for m in read_metrics(tmp_path / "rlhf") if m["stage"] == "rl"]
    assert all("reward/gold_mean" in m and "value/loss" in m for m in rl)
    assert (tmp_path / "rlhf" / "checkpoints" / "reward_model" / "reward_head.safetensors").exists()
    # a saved reward model is reused by path, through `rlpost rm`'s output as well
    cfg2 = load_config(None, TINY + [f"out_dir={tmp_path}", "run_name=by_path", "sft.steps=0", "rl.steps=1",
                                     f"model.name={tmp_path / 'rlhf' / 'checkpoints' / 'sft'}",
                                     f"reward_model.path={tmp_path / 'rlhf' / 'checkpoints' / 'reward_model'}"])
    assert train(cfg2)["status"] == "ok"


def test_rm_command_reports_pair_accuracy(tiny_gpt, tmp_path):
    model, tok = tiny_gpt
    save_model(model, tok, str(tmp_path / "sft"))
    args = [f"out_dir={tmp_path}", "run_name=rm", f"model.name={tmp_path / 'sft'}", "task.num_eval=40",
            "reward_model.pairs=64", "reward_model.eval_pairs=40", "reward_model.epochs=1",
            "reward_model.batch_size=32"]
    assert main(["rm", *args]) == 0
    on_disk = json.loads((tmp_path / "rm" / "summary.json").read_text())
    assert 0.0 <= on_disk["rm_pair_accuracy"] <= 1.0 and os.path.isdir(on_disk["reward_model"])
    assert any(m["stage"] == "rm_eval" for m in read_metrics(tmp_path / "rm"))
    RewardModel.load(on_disk["reward_model"])
    assert main(["rm", "reward_model.epochs=0"]) == 2  # a bad value is named before any work


def test_rm_command_trains_on_a_pair_file_and_names_bad_rows(tiny_gpt, tmp_path, capsys):
    model, tok = tiny_gpt
    save_model(model, tok, str(tmp_path / "sft"))
    rows = [{"prompt": f"{i}+1=", "chosen": "1" + str(i % 10), "rejected": "2" + str(i % 10)} for i in range(60)]
    rows[3]["rejected"] = rows[3]["chosen"]  # a bad pair: named and skipped
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    args = [f"out_dir={tmp_path}", "run_name=rm_file", f"model.name={tmp_path / 'sft'}", "task.num_eval=40",
            f"preference.train_file={tmp_path / 'pairs.jsonl'}", "reward_model.epochs=1", "reward_model.batch_size=16"]
    assert main(["rm", *args]) == 0
    out = capsys.readouterr().out
    assert "skipped 1 bad pair" in out and "line 4" in out and "53 training pairs" in out and "6 held-out" in out
    (tmp_path / "broken.jsonl").write_text('{"prompt": "1+1=", "chosen": "2"}\nnot json\n')
    assert main(["rm", *args[:-3], "run_name=rm_broken", f"preference.train_file={tmp_path / 'broken.jsonl'}"]) == 1
    err = capsys.readouterr().err
    assert "line 1" in err and "line 2" in err


def test_bad_reward_model_settings_are_named():
    with pytest.raises(ValueError, match="either reward_model.path"):
        load_config(None, ["reward_model.train=true", "reward_model.path=x"])
    with pytest.raises(ValueError, match="label_noise"):
        load_config(None, ["reward_model.train=true", "reward_model.label_noise=0.9"])
