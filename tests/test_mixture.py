"""task.sources: several datasets mixed by weight in every RL step, each prompt scored by its own source's
reward, with reward/<source> each step and pass@1_<source> at evaluation; the entries checked at config load;
a mixture (and the recycler's pool) that a resumed run continues exactly."""

import json
import os

import pytest

from rlpost.config import ConfigError, load_config
from rlpost.prompts import SOURCE_KEY
from rlpost.env.verifiers import reward_from_config
from rlpost.run import train
from rlpost.tasks import load_task

from test_resume import comparable, resume_after_step_2


def one(completion, row):
    return 1.0


def zero(completion, row):
    return 0.0


def coin(completion, row):
    """Half the samples right, by their length: groups with signal and groups without."""
    return float(len(completion) % 2)


def write(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


@pytest.fixture
def files(tmp_path):
    add = write(tmp_path / "add.jsonl", [{"prompt": f"{a}+{a % 7}=", "answer": str(a + a % 7)} for a in range(30)])
    add_eval = write(tmp_path / "add_eval.jsonl", [{"prompt": f"{a}+1=", "answer": str(a + 1)} for a in range(6)])
    mul = write(tmp_path / "mul.jsonl", [{"q": f"{a}*3=", "answer": str(3 * a)} for a in range(20)])
    mul_eval = write(tmp_path / "mul_eval.jsonl", [{"q": f"{a}*2=", "answer": str(2 * a)} for a in range(4)])
    return add, add_eval, mul, mul_eval


def sources(files, add=None, mul=None, weight=3):
    add_file, add_eval, mul_file, mul_eval = files
    return (f"task.sources=[{{file: {add_file}, eval_file: {add_eval}, weight: {weight}{add or ''}}}, "
            f"{{file: {mul_file}, eval_file: {mul_eval}, prompt_key: q, name: times{mul or ''}}}]")


def test_each_row_keeps_its_source_its_columns_and_its_reward(files):
    cfg = load_config(None, [sources(files, mul=", reward: exact")])
    task = load_task(cfg.task)
    assert task.mixture == [("add", 3.0, 30), ("times", 1.0, 20)]
    assert [r[SOURCE_KEY] for r in task.train_rows] == ["add"] * 30 + ["times"] * 20
    assert task.train_rows[30]["prompt"] == "0*3=" and len(task.eval_rows) == 10  # mul's own prompt column
    fn = reward_from_config(cfg.task, task.verify)
    assert fn.rewards["times"].fn.__name__ == "answer_match_reward"
    assert fn("6", task.train_rows[3]) == 1.0 and fn("7", task.train_rows[3]) == 0.0  # 3+3
    assert fn("57", task.train_rows[-1]) == 1.0  # 19*3, by the exact reward of its source
    with pytest.raises(ValueError, match="names no source of task.sources"):
        fn("1", {"prompt": "1", "answer": "1"})
    # a file's own column under the key a row's source is kept in is refused, not overwritten
    write(files[0], [{"prompt": "1+1=", "answer": "2", SOURCE_KEY: "openai/gsm8k"}])
    with pytest.raises(ValueError, match=f"task.sources 'add': line 1 has a column '{SOURCE_KEY}'"):
        load_task(cfg.task)


@pytest.mark.parametrize("entries, message", [
    ("[]", "must be a non-empty list"),
    ("[{file: a.jsonl, weight: 0}]", r"task.sources\[0\].weight' must be a positive finite number"),
    ("[{file: a.jsonl, weight: .inf}]", r"task.sources\[0\].weight' must be a positive finite number"),
    ("[{file: a.jsonl, weight: .nan}]", "must be a positive finite number"),
    ("[{file: a.jsonl, weight: true}]", "must be a positive finite number"),
    ("[{file: a.jsonl, weight: -1}]", "must be a positive finite number"),
    ("[{file: a.jsonl}, {file: b/a.jsonl}]", r"'task.sources\[0\]' and 'task.sources\[1\]' are both named 'a'"),
    ("[{file: a.jsonl, name: mean}]", "not one of mean"),
    ("[{file: a.jsonl, name: 'a b'}]", r"task.sources\[0\].name' must be letters"),
    ("[{weight: 2}]", r"task.sources\[0\]' needs a file .* or a task"),
    ("[{file: a.jsonl, train_file: b.jsonl}]", "sets both file and train_file"),
    ("[{file: a.jsonl, colour: red}]", r"unknown config key 'task.sources\[0\].colour'"),
    ("[{file: a.jsonl, reward_workers: 4}]", r"task.sources\[0\].reward_workers' is a setting of the whole run"),
    ("[{file: a.jsonl, env: nope}]", r"task.sources\[0\].env': unknown environment 'nope'"),
    ("[{file: a.jsonl, prompt_key: ''}]", r"task.sources\[0\].prompt_key' must be a non-empty string"),
    ("[{file: a.jsonl, reward: nosuch}]", r"task.sources\[0\].reward'"),
    ("[{task: nosuch}]", r"task.sources\[0\].task' is 'nosuch'"),
    ("[{task: multistep, answer_format_rate: 2}]", r"task.sources\[0\].answer_format_rate' must be in \[0, 1\]"),
    ("[{task: file}]", "needs task.train_file"),
    ("[{file: a.jsonl, max_operand: 0}]", r"task.sources\[0\].max_operand' must be >= 1"),
])
def test_every_entry_is_checked_at_config_load_naming_its_key(entries, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"task.sources={entries}"])


def test_a_key_of_the_entries_set_beside_them_is_refused():
    with pytest.raises(ConfigError, match="'task.train_file' is set beside 'task.sources'"):
        load_config(None, ["task.sources=[{file: a.jsonl}]", "task.train_file=b.jsonl"])
    with pytest.raises(ConfigError, match="'task.reward' is set beside"):
        load_config(None, ["task.sources=[{file: a.jsonl}]", "task.reward=math"])
    # the run's own keys stay where they are, and every source shares them; an embedded task is a source too
    cfg = load_config(None, ["task.sources=[{file: a.jsonl, reward: exact}, {task: arithmetic, weight: 0.5}]",
                             "task.reward_workers=3", "task.reward_on_error=zero"])
    (_, _, a), (name, weight, b) = cfg.task.source_configs()
    assert (a.reward_workers, b.reward_workers, a.reward_on_error, b.name) == (3, 3, "zero", "arithmetic")
    assert (name, weight) == ("arithmetic", 0.5)


RUN = ["stages=[rl, eval]", "rollout.prompts_per_step=4", "rollout.k=4", "rollout.max_new_tokens=4",
       "eval.samples_per_prompt=2", "model.n_layer=1", "model.n_embd=16", "model.n_head=2", "threads=1",
       "rl.eval_every=0"]


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_every_step_mixes_by_weight_and_scores_each_prompt_by_its_source(files, tmp_path):
    """add pays 1 for anything, times 0: with weights 3:1 and 4 prompts a step, every step's mean is 3/4 and
    each source's own mean its reward; held-out pass@1 is reported per source beside the overall one."""
    mix = sources(files, add=", reward: 'test_mixture:one'", mul=", reward: 'test_mixture:zero'")
    cfg = load_config(None, RUN + [mix, "rl.steps=3", f"out_dir={tmp_path}", "run_name=mix"])
    summary = train(cfg)
    rl = [m for m in metrics(tmp_path / "mix") if m["stage"] == "rl"]
    assert [(m["reward/mean"], m["reward/add"], m["reward/times"]) for m in rl] == [(0.75, 1.0, 0.0)] * 3
    assert not any(k.startswith("data/") for k in rl[0])  # rl.recycle_every=0: no pool
    ev = metrics(tmp_path / "mix")[-1]
    assert ev["eval/pass@1_add"] == 1.0 and ev["eval/pass@1_times"] == 0.0
    assert ev["eval/pass@1"] == pytest.approx(6 / 10)  # over all 10 held-out prompts
    assert summary["by_source_pass@1_rl"] == {"add": 1.0, "times": 0.0}


def test_a_mixture_with_recycling_resumes_exactly(files, tmp_path):
    """A run killed after step 2's checkpoint and resumed draws the same prompts (the mixture's position and
    the set-aside pool are in the checkpoint): metrics.jsonl, rollouts.jsonl and the checkpoints are the same.
    Weights 2:1 and 4 prompts a step: a step ends mid-turn of the round robin, whose credit the checkpoint keeps.
    9 training prompts (an epoch of 2.25 steps) and 6 steps: set-aside prompts are skipped on the way round."""
    write(files[0], [{"prompt": f"{a}+1=", "answer": str(a + 1)} for a in range(6)])
    write(files[2], [{"q": f"{a}*3=", "answer": str(3 * a)} for a in range(3)])
    cfg = RUN + [sources(files, add=", reward: 'test_mixture:coin'", mul=", reward: 'test_mixture:one'", weight=2),
                 "rl.steps=6", "rl.save_every=2", "rl.recycle_every=3", "log.rollouts_every=1"]
    assert train(load_config(None, cfg + [f"out_dir={tmp_path}", "run_name=ref"]))["status"] == "ok"
    ref, run = tmp_path / "ref", tmp_path / "killed"
    lines = [m for m in comparable(ref) if m["stage"] == "rl"]
    assert max(m["data/set_aside"] for m in lines) > 0 and max(m["data/recycled"] for m in lines) > 0
    assert [m["data/recycled"] for m in lines][:2] == [0, 0]
    assert "step_4" in resume_after_step_2(ref, run)


def test_a_source_without_training_rows_is_refused_by_name():
    from rlpost.tasks.base import Task
    from rlpost.tasks.mixture import mix
    full = Task("a", [{"prompt": "1+1=", "answer": "2"}], [], [], "12+=", None)
    empty = Task("b", [], [{"prompt": "2+2=", "answer": "4"}], [], "24+=", None)
    with pytest.raises(ValueError, match="task.sources 'empty' has no training rows"):
        mix([("full", 1.0, full), ("empty", 1.0, empty)])


def boom(completion, row):
    raise RuntimeError("this source's reward is broken")


def test_a_sources_reward_that_raises_stops_naming_the_source_and_its_line(tiny_gpt):
    """Several files feed a mixed run: "line 3 of its file" alone would not say which."""
    from rlpost.env.reward import Reward, RewardError
    from rlpost.env.verifiers import SourceRewards
    from test_rewards import batch_of

    _, tok = tiny_gpt
    batch = batch_of(tok, ["1", "2"])
    rows = [{"prompt": "1+1=", "answer": "2", "line": 3, SOURCE_KEY: "add"},
            {"prompt": "2*3=", "answer": "6", "line": 7, SOURCE_KEY: "times"}]
    batch = batch.replace(meta={**batch.meta, "row": rows})
    with pytest.raises(RewardError, match=r"sources\(add: one, times: boom\) failed on sample 1 \(line 7 of source "
                                          r"'times''s file; prompt '2\*3='.*RuntimeError: this source's reward"):
        Reward(SourceRewards({"add": one, "times": boom}), tok)(batch)
    scored, metrics = Reward(SourceRewards({"add": one, "times": boom}), tok, on_error="zero")(batch)
    assert scored.rewards.tolist() == [1.0, 0.0] and metrics["reward/errors"] == 1.0


def job_source_metrics(out: str) -> None:
    """A rank of two: rank 0 sampled source a twice (rewards 1, 0) and b twice (1, 1), rank 1 a four times (1, 1,
    1, 1) and no b; rank 0 counted 1 failed reward and 2 failed episodes (of its source b), rank 1 none. The step's
    line, as every rank logs it after reduce_metrics, goes to OUT.<rank>."""
    import torch

    from rlpost import distributed
    from rlpost.batch import Batch
    from rlpost.controller import source_metrics

    distributed.init()
    rank = distributed.rank()
    sources, rewards = (["a", "a", "b", "b"], [1.0, 0.0, 1.0, 1.0]) if rank == 0 else (["a"] * 4, [1.0] * 4)
    ids = torch.ones((4, 3), dtype=torch.long)
    batch = Batch(input_ids=ids, attention_mask=ids, response_mask=ids, rewards=torch.tensor(rewards),
                  meta={"row": [{"prompt": "p", SOURCE_KEY: s} for s in sources]})
    counted = ({"reward/errors": 1.0, "env/errors": 2.0, "env/errors_b": 2.0, "env/turns": 2.0} if rank == 0 else
               {"reward/errors": 0.0, "env/errors": 0.0, "env/turns": 1.0})
    line = distributed.reduce_metrics({**source_metrics(batch, ["a", "b"]), **counted})
    with open(f"{out}.{rank}", "w") as f:
        json.dump(line, f)
    distributed.destroy()


def test_a_sharded_steps_line_holds_each_sources_mean_and_the_failures_of_every_rank(tmp_path):
    """Sharded (fsdp2), each rank takes every other prompt of the step, so a rank may hold none of a source, or
    another share of it than the other rank: reward/<source> is over all ranks' samples, a 5/6 and b 1.0 (the
    mean of the ranks' means was 0.75 for a, and NaN for b, which rank 1 never sampled). Failed samples are
    counted over the ranks (the mean of the ranks' counts halved them); a per-episode mean stays the mean."""
    import subprocess
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_fsdp import ROOT, free_port

    out = str(tmp_path / "line")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(free_port()), __file__, "source_metrics", out],
                          env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.load(open(f"{out}.{rank}")) for rank in (0, 1)]
    assert lines[0] == lines[1] and lines[0]["reward/a"] == pytest.approx(5 / 6) and lines[0]["reward/b"] == 1.0
    assert {k: lines[0][k] for k in ("reward/errors", "env/errors", "env/errors_b", "env/turns")} == {
        "reward/errors": 1.0, "env/errors": 2.0, "env/errors_b": 2.0, "env/turns": 1.5}


if __name__ == "__main__":
    import sys

    {"source_metrics": job_source_metrics}[sys.argv[1]](*sys.argv[2:])
