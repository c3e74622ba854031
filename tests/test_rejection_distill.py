"""Rejection-sampling SFT (rlpost/stages/rejection.py) and on-policy distillation (rlpost/env/teacher.py): which
samples are kept, that fine-tuning on them raises their likelihood, the stage in a real run (checkpoint, summary,
resume); the distillation reward against hand-computed values, a teacher that is the student, a teacher with
another vocabulary, and a real run whose reverse KL to a trained teacher falls.

Every run is a real `rlpost train` (a process, or the same functions in-process), with tiny models."""

import copy
import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file
from test_resume import comparable, run_to_end, start, wait_for

from rlpost.batch import Batch
from rlpost.checkpoint import list_checkpoints
from rlpost.config import load_config
from rlpost.env.teacher import TeacherReward, check_same_tokenizer, distill_token_rewards
from rlpost.models import save_model, token_logprobs
from rlpost.models.gpt_mini import CharTokenizer
from rlpost.rollout import SamplingParams
from rlpost.rollout.episodes import episodes_in_chunks
from rlpost.run import build_context
from rlpost.runlog import RunLog, make_run_dir
from rlpost.stages.rejection import SAMPLE_SEED, RejectionStage, response_region, select_verified

SMALL = ["model.n_layer=2", "model.n_embd=32", "model.n_head=2", "threads=1", "task.num_eval=30",
         "eval.samples_per_prompt=2"]
TINY = SMALL + ["sft.steps=24", "sft.batch_size=32", "sft.save_every=8", "rl.steps=4", "rl.eval_every=0",
                "rl.save_every=2", "rollout.prompts_per_step=4", "rollout.k=4"]
REJECTION = ["rejection.enabled=true", "rejection.num_prompts=24", "rejection.samples_per_prompt=4",
             "rejection.success_threshold=0.0", "rejection.batch_size=16", "rejection.steps=300"]


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A gpt_mini briefly trained by SFT on the arithmetic task (right now and then: about 6% held-out pass@1)."""
    tmp = tmp_path_factory.mktemp("teacher")
    run_to_end(["sft.steps=200", "sft.batch_size=64", "sft.save_every=0", "rl.steps=0", "model.n_layer=2",
                "model.n_embd=64", "model.n_head=2", "threads=1", "task.num_eval=30", "eval.samples_per_prompt=2",
                f"out_dir={tmp}", "run_name=teacher"], tmp)
    return str(tmp / "teacher" / "checkpoints" / "sft")


def context(overrides, tmp_path, name="run"):
    cfg = load_config(None, overrides + [f"out_dir={tmp_path}", f"run_name={name}"])
    run_dir = make_run_dir(cfg, "test")
    return cfg, build_context(cfg, run_dir, RunLog(run_dir))


# ---------------------------------------------------------------------------- rejection sampling

def test_select_verified_keeps_the_first_distinct_verified_samples_of_each_prompt():
    rewards = [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.5, 1.0]
    responses = [(1,), (2,), (1,), (3,), (4,), (4,), (5,), (6,), (5,), (5,), (6,), (7,)]
    assert select_verified(rewards, responses, 4, 1.0, 2) == [[0, 3], [], [8, 11]]  # 2 repeats 0; 9 repeats 8
    assert select_verified(rewards, responses, 4, 1.0, 1) == [[0], [], [8]]
    assert select_verified(rewards, responses, 4, 0.5, 3) == [[0, 3], [], [8, 10, 11]]
    assert select_verified(rewards, responses, 4, 0.0, 4) == [[0, 1, 3], [4, 6, 7], [8, 10, 11]]


def test_rejection_keeps_exactly_the_verified_samples_and_fine_tuning_raises_their_likelihood(teacher, tmp_path):
    cfg, ctx = context([f"model.name={teacher}", "sft.steps=0", "rl.steps=0", "threads=1", "task.num_eval=30",
                        "rejection.enabled=true", "rejection.num_prompts=48", "rejection.samples_per_prompt=8",
                        "rejection.max_per_prompt=2", "rejection.steps=30", "rejection.batch_size=16",
                        "rejection.lr=0.001"], tmp_path)
    stage = RejectionStage(cfg.rejection, cfg.rollout, cfg.trainer, cfg.eval)
    try:
        kept, metrics = stage.sample(ctx)
        # the same pass drawn here, every sample, and the rule applied by hand
        rows = stage.prompt_rows(ctx)
        params = SamplingParams(max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature)
        expected, verified, drawn = [], 0, 0
        for idx, batch in episodes_in_chunks(ctx.engine, ctx.verifier, rows, ctx.prompt_ids(rows), 8, params,
                                             seed=ctx.seed + SAMPLE_SEED, chunk=cfg.eval.batch_prompts):
            for g, j in enumerate(idx):
                seen = []
                for i in range(8 * g, 8 * g + 8):
                    ids = response_region(batch, i)[0]
                    right = float(batch.rewards[i]) >= 1.0
                    verified += right
                    drawn += 1
                    if right and ids not in seen and len(seen) < 2:
                        seen.append(ids)
                expected += [(j, ids) for ids in seen]
        assert 0 < verified < drawn  # some samples are right, some are not: the filter has work to do
        got = [(next(j for j, r in enumerate(rows) if r["prompt"] == k["prompt"]), k["completion_ids"]) for k in kept]
        assert got == expected
        assert metrics["rejection/pass_rate"] == verified / drawn
        assert metrics["rejection/kept_frac"] == len(expected) / drawn
        for k in kept:  # each kept sample is right by the task's own verifier
            row = next(r for r in rows if r["prompt"] == k["prompt"])
            assert ctx.task.verify(k["completion"], row) >= 1.0 and k["reward"] >= 1.0

        def nll():
            b = Batch.for_sft([k["prompt_ids"] for k in kept], [k["completion_ids"] for k in kept],
                              ctx.tokenizer.pad_token_id)
            with torch.no_grad():
                logp = token_logprobs(ctx.model, b)
            return float(-(logp * b.response_mask).sum() / b.response_mask.sum())

        before = nll()
        stage.run(ctx)
        after = nll()
        assert after < before - 0.05, (before, after)
        written = read_jsonl(os.path.join(ctx.run_dir, "rejection_samples.jsonl"))
        assert [(w["prompt"], w["completion"], w["reward"]) for w in written] == \
               [(k["prompt"], k["completion"], k["reward"]) for k in kept]
    finally:
        ctx.log.close()
        ctx.engine.close()


@pytest.fixture(scope="module")
def rejection_run(tmp_path_factory):
    """SFT -> eval -> RL -> eval -> rejection -> eval, never interrupted."""
    tmp = tmp_path_factory.mktemp("rejection")
    out = run_to_end(TINY + REJECTION + [f"out_dir={tmp}", "run_name=ref"], tmp)
    return tmp / "ref", out


def test_the_rejection_stage_follows_rl_and_ends_with_a_checkpoint_and_a_pass_rate(rejection_run):
    run, out = rejection_run
    assert "stages: sft -> eval -> rl -> eval -> rejection -> eval" in out, out
    assert (run / "checkpoints" / "rejection" / "model.safetensors").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "ok" and "pass@1_rejection" in summary and "pass@1_rl" in summary
    metrics = read_jsonl(run / "metrics.jsonl")
    data = [m for m in metrics if m["stage"] == "rejection_data"]
    assert len(data) == 1 and data[0]["rejection/samples"] == 24 * 4
    assert data[0]["rejection/kept_frac"] == data[0]["rejection/kept"] / 96  # threshold 0: one kept per prompt
    assert data[0]["rejection/kept"] == 24 == summary["rejection_kept"]
    assert [m["step"] for m in metrics if m["stage"] == "rejection"] == [0, 50, 100, 150, 200, 250, 299]
    evals = [m["after"] for m in metrics if m["stage"] == "eval"]
    assert evals == ["sft", "rl", "rejection"]
    assert len(read_jsonl(run / "rejection_samples.jsonl")) == 24


def test_a_run_stopped_inside_the_rejection_stage_resumes_it_from_its_start(rejection_run, tmp_path):
    """No mid-stage checkpoints: SIGTERM inside the stage stops without one, and the resume starts again from
    checkpoints/final (RL's end), giving the same metrics and the same weights as the run never stopped."""
    reference, _ = rejection_run
    run = tmp_path / "stopped"
    p = start(TINY + REJECTION + [f"out_dir={tmp_path}", "run_name=stopped"], tmp_path)
    wait_for(lambda: (run / "rejection_samples.jsonl").is_file(), p)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 143, out
    assert list_checkpoints(run)[-1].name == "final"
    assert not (run / "checkpoints" / "rejection").exists()
    out = run_to_end(["--resume", str(run)], tmp_path)
    assert "resuming from" in out and "final" in out, out
    assert comparable(run) == comparable(reference)
    wa, wb = (load_file(os.path.join(d, "checkpoints", "rejection", "model.safetensors")) for d in (run, reference))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (run, reference))
    assert sa["pass@1_rejection"] == sb["pass@1_rejection"] and sa["status"] == sb["status"] == "ok"
    assert read_jsonl(run / "rejection_samples.jsonl") == read_jsonl(reference / "rejection_samples.jsonl")


# ---------------------------------------------------------------------------- on-policy distillation

def test_distill_token_rewards_are_minus_coef_times_the_log_ratio():
    student = torch.tensor([[0.0, -0.5, -1.0, -2.0], [0.0, -0.25, -4.0, 0.0]])
    teacher = torch.tensor([[-9.0, -0.25, -2.0, -2.0], [0.0, -1.25, -3.0, -7.0]])
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 0]])
    r = distill_token_rewards(student, teacher, mask, coef=2.0)
    # -2 * (ls - lt): (-0.5 + 0.25) -> 0.5, (-1 + 2) -> -2, 0 -> 0; (-0.25 + 1.25) -> -2, (-4 + 3) -> 2
    assert torch.equal(r, torch.tensor([[0.0, 0.5, -2.0, 0.0], [0.0, -2.0, 2.0, 0.0]]))


def test_reinforce_pp_discounts_token_rewards_by_gamma():
    """gamma = 1: the paper's returns-to-go; gamma = 0 (the distill recipe's): each token's own reward."""
    from rlpost.algorithms.reinforce_pp import discounted_returns

    r = torch.tensor([[1.0, 2.0, 3.0, 0.0], [0.0, -4.0, 0.0, 2.0]])
    assert torch.equal(discounted_returns(r, 1.0), torch.tensor([[6.0, 5.0, 3.0, 0.0], [-2.0, -2.0, 2.0, 2.0]]))
    assert torch.equal(discounted_returns(r, 0.5), torch.tensor([[2.75, 3.5, 3.0, 0.0], [-1.75, -3.5, 1.0, 2.0]]))
    assert torch.equal(discounted_returns(r, 0.0), r)


def test_teacher_reward_on_a_hand_built_batch(tmp_path):
    _, ctx = context(SMALL + ["sft.steps=0"], tmp_path)
    try:
        rows = ctx.task.train_rows[:3]
        batch = ctx.engine.generate(ctx.prompt_ids(rows), 2, SamplingParams(max_new_tokens=4), seed=0)
        batch = batch.replace(meta={**batch.meta, "row": [r for r in rows for _ in range(2)]})
        mask = batch.response_mask.bool()
        known = torch.where(mask, -((0.125 * torch.arange(batch.input_ids.numel()).reshape(mask.shape)) % 3.0),
                            torch.zeros(mask.shape))  # made-up student log-probs
        batch = batch.replace(old_logp=known)
        teacher = copy.deepcopy(ctx.model)
        with torch.no_grad():
            lt = token_logprobs(teacher, batch, share_prompt=False)  # the plain forward, every row alone
        scored, metrics = TeacherReward(teacher, ctx.tokenizer, coef=0.5, gold=ctx.task.verify)(batch)
        assert scored.rewards.shape == mask.shape
        expected = torch.where(mask, -0.5 * (known - lt), torch.zeros_like(lt))
        torch.testing.assert_close(scored.rewards, expected, atol=1e-5, rtol=0)
        assert (scored.rewards[~mask] == 0).all()
        assert metrics["distill/reverse_kl"] == pytest.approx(float((known - lt)[mask].mean()), abs=1e-5)
        assert len(scored.meta["gold_reward"]) == len(batch)
    finally:
        ctx.log.close()
        ctx.engine.close()


def test_a_teacher_that_is_the_student_gives_zero_rewards(tmp_path):
    _, ctx = context(SMALL + ["sft.steps=0"], tmp_path)
    try:
        rows = ctx.task.train_rows[:8]
        batch = ctx.engine.generate(ctx.prompt_ids(rows), 4, SamplingParams(max_new_tokens=6), seed=3)
        batch = batch.replace(meta={**batch.meta, "row": [r for r in rows for _ in range(4)]})
        scored, metrics = TeacherReward(copy.deepcopy(ctx.model), ctx.tokenizer)(batch)
        assert scored.rewards.abs().max() < 1e-5  # the engine's and the teacher's float rounding differ by ~1e-7
        assert abs(metrics["distill/reverse_kl"]) < 1e-6
    finally:
        ctx.log.close()
        ctx.engine.close()


def test_a_teacher_with_another_vocabulary_is_refused(tmp_path):
    with pytest.raises(ValueError, match="another vocabulary"):
        check_same_tokenizer(CharTokenizer("0123456789+="), CharTokenizer("0123456789+=-"), ["1+2="])
    _, ctx = context(SMALL + ["sft.steps=0"], tmp_path)
    ctx.log.close()
    ctx.engine.close()
    other = CharTokenizer("9876543210+=")  # the same characters, other ids
    folder = str(tmp_path / "other")
    save_model(copy.deepcopy(ctx.model), other, folder)
    with pytest.raises(ValueError, match="another vocabulary.*other ids"):
        context(SMALL + ["sft.steps=0", f"distill.teacher={folder}"], tmp_path, name="refused")


def test_distilling_a_trained_teacher_lowers_the_reverse_kl(teacher, tmp_path):
    run_to_end(SMALL + ["sft.steps=0", "rl.steps=60", "rl.eval_every=0", "rl.save_every=0",
                        "rollout.prompts_per_step=16", "rollout.k=4",
                        "algorithm={name: reinforce_pp, beta: 0.0, gamma: 0.0}",
                        "trainer.lr=0.003", f"distill.teacher={teacher}", f"out_dir={tmp_path}", "run_name=d"],
               tmp_path)
    steps = [m for m in read_jsonl(tmp_path / "d" / "metrics.jsonl") if m["stage"] == "rl"]
    kl = [m["distill/reverse_kl"] for m in steps]
    assert len(kl) == 60 and all("reward/gold_mean" in m for m in steps)
    first, last = sum(kl[:5]) / 5, sum(kl[-5:]) / 5
    assert last < 0.6 * first, (first, last)
