"""Process rewards in RL (rlpost/env/process_reward.py): the PRM's step rewards placed at the step ends against
hand-computed tensors, the config combinations that are refused, and a short real RL run with `prm.path`."""

import json
import math
import re

import pytest
import torch

from rlpost.batch import Batch
from rlpost.cli import main
from rlpost.config import ConfigError, load_config
from rlpost.models import encode_prompt
from rlpost.models.gpt_mini import GPT, CharTokenizer, GPTConfig
from rlpost.env.process_reward_model import ProcessRewardModel
from rlpost.env.process_reward import ProcessReward, process_token_rewards
from rlpost.env.reward import Reward
from rlpost.tasks.multistep import ALPHABET

TINY = ["task.name=multistep", "task.reward=math", "task.reward_options={extract: hash}", "task.num_eval=8",
        "model.n_layer=1", "model.n_embd=16", "model.n_head=1", "threads=1", "rollout.max_new_tokens=32",
        "sft.steps=0", "eval.samples_per_prompt=1"]


def verify(completion: str, row: dict) -> float:
    try:
        return float(int(completion.rsplit("####", 1)[1]) == int(row["answer"]))
    except (IndexError, ValueError):
        return 0.0


def constant_prm(tok, bias: float) -> ProcessRewardModel:
    """A PRM whose head ignores the trunk: sigmoid(bias) at every step."""
    trunk = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=1, n_embd=16))
    prm = ProcessRewardModel.from_policy(trunk)
    with torch.no_grad():
        prm.head.weight.zero_()
        prm.head.bias.fill_(bias)
    return prm


def hand_batch(tok):
    """Two rows of unequal prompt and response lengths: a right 3-step solution and a wrong 2-step one."""
    rows = [{"prompt": "57+32+18=", "answer": "107"}, {"prompt": "1+2+3=", "answer": "6"}]
    texts = ["57+32=089;089+18=107;#### 107", "1+2=003;#### 7"]
    prompts = [encode_prompt(tok, r["prompt"]) for r in rows]
    responses = [tok.encode(t) + [tok.eos_token_id] for t in texts]
    batch = Batch.for_sft(prompts, responses, tok.pad_token_id)
    return batch.replace(meta={"row": rows}), prompts, responses


def test_step_rewards_sit_at_the_step_ends_with_hand_computed_values():
    tok = CharTokenizer(ALPHABET)
    batch, prompts, responses = hand_batch(tok)
    P, p = batch.prompt_width, 1 / (1 + math.exp(-0.5))
    assert P == len(prompts[0]) and len(prompts[1]) < P  # the second prompt is left-padded
    for mode, coef in (("score", 0.5), ("delta", 2.0)):
        reward = ProcessReward(constant_prm(tok, 0.5), tok, Reward(verify, tok), coef=coef, mode=mode)
        scored, metrics = reward(batch)
        expected = torch.zeros(batch.input_ids.shape)
        # row 0: ";" at response tokens 9 and 20, eos (the last step's end and the outcome 1.0) at 29
        # row 1: ";" at response token 7, eos at 14; its answer is wrong: outcome 0
        for b, ends, outcome in ((0, [9, 20, 29], 1.0), (1, [7, 14], 0.0)):
            assert len(responses[b]) == ends[-1] + 1
            for j, e in enumerate(ends):
                expected[b, P + e] = coef * (p if mode == "score" or j == 0 else 0.0)
            expected[b, P + ends[-1]] += outcome
        torch.testing.assert_close(scored.rewards, expected, atol=1e-6, rtol=0)
        assert (scored.rewards[:, :P] == 0).all()  # nothing on prompt or left padding
        assert (scored.rewards[1, P + 15:] == 0).all()  # nothing on the right padding of the shorter row
        assert scored.meta["gold_reward"] == [1.0, 0.0]
        assert metrics["prm/step_score_mean"] == pytest.approx(p, abs=1e-6)
        assert metrics["prm/final_score_mean"] == pytest.approx(p, abs=1e-6)
        assert metrics["prm/steps_per_response"] == 2.5
        process = coef * p * (2.5 if mode == "score" else 1.0)  # delta: each response's steps sum to coef * s_n
        assert metrics["prm/process_reward_mean"] == pytest.approx(process, abs=1e-6)


@pytest.mark.parametrize("packing", [False, True])
def test_process_reward_role_scores_in_the_trainers_micro_batches(packing):
    tok = CharTokenizer(ALPHABET)
    batch, _, _ = hand_batch(tok)
    torch.manual_seed(0)
    prm = ProcessRewardModel.from_policy(GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=1,
                                                       n_embd=16)))
    torch.nn.init.normal_(prm.head.weight)
    whole, whole_metrics = ProcessReward(prm, tok, Reward(verify, tok))(batch)
    calls = []
    prm.trunk.transformer.h[0].register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0] * a[0].shape[1]))
    T = batch.input_ids.shape[1]
    micro, metrics = ProcessReward(prm, tok, Reward(verify, tok), micro_batch_tokens=T, packing=packing)(batch)
    torch.testing.assert_close(micro.rewards, whole.rewards, atol=1e-5, rtol=0)
    assert metrics["prm/step_score_mean"] == pytest.approx(whole_metrics["prm/step_score_mean"], abs=1e-6)
    assert len(calls) == 2 and max(calls) <= T, calls  # one row per forward


def test_score_and_delta_with_scores_that_differ_per_step():
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, 2:8], mask[1, 2:5] = True, True  # prompt width 2; row 1's response is 3 tokens
    r = process_token_rewards(torch.tensor([1.0, 0.0]), [[1, 3, 5], [2]], [[0.2, 0.5, 0.9], [0.4]], mask, 2,
                              coef=1.0, mode="delta")
    expected = torch.zeros(2, 8)
    expected[0, 3], expected[0, 5], expected[0, 7] = 0.2, 0.3, 1.0 + 0.4
    expected[1, 4] = 0.4
    torch.testing.assert_close(r, expected)
    torch.testing.assert_close(r[0].sum(), torch.tensor(1.0 + 0.9))  # the increments telescope
    r = process_token_rewards(torch.tensor([1.0, 0.0]), [[1, 3, 5], [2]], [[0.2, 0.5, 0.9], [0.4]], mask, 2,
                              coef=0.5, mode="score")
    expected[0, 3], expected[0, 5], expected[0, 7], expected[1, 4] = 0.1, 0.25, 1.45, 0.2
    torch.testing.assert_close(r, expected)


@pytest.mark.parametrize("overrides,message", [
    (["prm.path=x", "distill.teacher=y"], "prm.path='x' and distill.teacher='y' both choose the RL reward"),
    (["prm.path=x", "reward_model.path=y"], "prm.path='x' and a reward_model stage both choose the RL reward"),
    (["prm.path=x", "reward_model.train=true"], "prm.path='x' and a reward_model stage both choose the RL reward"),
    (["prm.path=x", "rl.reward={name: teacher, teacher: y}"], "rl.reward.name=teacher and prm.path='x'"),
    (["prm.path=x", "rl.reward={name: prm, path: z}"], "rl.reward.path='z' and prm.path='x' set the same option"),
    (["rl.reward={name: prm}"], "needs rl.reward.path"),
    (["prm.path=x", "rl.steps=0"], r"needs an RL stage \(rl.steps >= 1\)"),
    (["prm.reward=sum"], "'prm.reward' is 'sum'; valid values: score, delta"),
])
def test_config_combinations_that_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


@pytest.fixture(scope="module")
def prm_folder(tmp_path_factory):
    """An untrained PRM made from the tiny policy's own trunk and tokenizer (what `rlpost prm` would save)."""
    from rlpost.models import load_model
    from rlpost.tasks.multistep import multistep_task

    cfg = load_config(None, TINY)
    task = multistep_task(num_eval=8)
    model, tok = load_model(cfg.model, task.alphabet, rows=task.train_rows + task.eval_rows, max_new_tokens=32)
    folder = str(tmp_path_factory.mktemp("prm") / "prm")
    ProcessRewardModel.from_policy(model).save(folder, tok)
    return folder, model


def test_a_prm_with_another_tokenizer_is_refused(prm_folder, tmp_path, capsys):
    _, model = prm_folder
    folder = str(tmp_path / "other")
    ProcessRewardModel.from_policy(model).save(folder, CharTokenizer(ALPHABET[::-1]))  # same characters, other ids
    assert main(["train", *TINY, "rl.steps=1", f"prm.path={folder}", f"out_dir={tmp_path}", "run_name=refused"]) == 1
    assert re.search(r"prm.path .* another vocabulary.*other ids.*the PRM scores", capsys.readouterr().err)


def test_a_short_rl_run_with_process_rewards_logs_them(prm_folder, tmp_path):
    folder, _ = prm_folder
    assert main(["train", *TINY, "rl.steps=2", "rl.eval_every=0", "rl.save_every=0", "rollout.prompts_per_step=4",
                 "rollout.k=2", "algorithm={name: reinforce_pp, gamma: 1.0}", f"prm.path={folder}",
                 "prm.coef=0.5", f"out_dir={tmp_path}", "run_name=p"]) == 0
    lines = [json.loads(x) for x in (tmp_path / "p" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if m.get("stage") == "rl"]
    assert len(steps) == 2
    for m in steps:
        assert 0.0 < m["prm/step_score_mean"] < 1.0 and m["prm/steps_per_response"] >= 1.0
        assert "reward/gold_mean" in m and "prm/process_reward_mean" in m
