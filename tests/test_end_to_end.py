"""The full pipeline through the same controller: gpt_mini, a Hugging Face Llama, failures, the CLI."""

import json
import os
import subprocess
import sys

import pytest
import torch

from rlpost.cli import main
from rlpost.config import load_config
from rlpost.run import train
from rlpost.env.reward import RewardError

TINY = ["sft.steps=30", "sft.batch_size=32", "rl.steps=3", "rl.eval_every=2", "task.num_eval=40",
        "rollout.prompts_per_step=4", "rollout.k=4", "eval.samples_per_prompt=2", "model.n_layer=2",
        "model.n_embd=32", "model.n_head=2"]


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def starts_with_seven(completion, row):
    return float(completion.startswith("7"))


def test_gpt_mini_pipeline_writes_a_complete_run_directory(tmp_path):
    cfg = load_config(None, TINY + [f"out_dir={tmp_path}", "run_name=smoke"])
    summary = train(cfg)
    run = tmp_path / "smoke"
    assert summary["status"] == "ok"
    on_disk = json.loads((run / "summary.json").read_text())
    for key in ("demonstrator_accuracy", "pass@1_sft", "pass@1_rl", "wall_seconds"):
        assert isinstance(on_disk[key], float) and on_disk[key] >= 0
    assert (run / "config.yaml").exists()
    rl = [m for m in read_metrics(run) if m["stage"] == "rl"]
    assert [m["step"] for m in rl] == [1, 2, 3] and "eval/pass@1" in rl[1]
    for key in ("reward/mean", "reward/std", "loss/kl_ref", "train/entropy", "loss/clip_frac_high",
                "rollout/response_len_mean", "rollout/tokens_per_s", "rollout/logp_mismatch_max", "time/rollout",
                "time/train", "time_share/rollout", "sync/version"):
        assert key in rl[0], key
    assert rl[0]["rollout/logp_mismatch_max"] < 1e-4  # engine and trainer agree in fp32
    from rlpost.models.gpt_mini import GPT
    GPT.from_pretrained(run / "checkpoints" / "final")


def test_rl_raises_a_reward_it_can_reach(tmp_path):
    """No SFT, a reward for answers starting with 7 (about 1 in 10 at first): GRPO must climb it."""
    cfg = load_config(None, TINY + ["sft.steps=0", "rl.steps=40", "rl.eval_every=0", "rollout.prompts_per_step=8",
                                    "trainer.lr=3e-3", "task.reward=test_end_to_end:starts_with_seven",
                                    f"out_dir={tmp_path}", "run_name=climb"])
    train(cfg)
    rewards = [m["reward/mean"] for m in read_metrics(tmp_path / "climb") if m["stage"] == "rl"]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert first < 0.3 and last > first + 0.4, rewards


def test_hf_llama_runs_grpo_through_the_same_controller(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = load_config(None, TINY + [f"model.name={tiny_llama_dir}", "sft.steps=3", f"out_dir={tmp_path}",
                                    "run_name=llama", "rollout.max_new_tokens=4"])
    summary = train(cfg)
    assert summary["status"] == "ok"
    rl = [m for m in read_metrics(tmp_path / "llama") if m["stage"] == "rl"]
    assert len(rl) == 3 and rl[-1]["sync/version"] == 3.0 and rl[0]["rollout/logp_mismatch_max"] < 1e-4
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "llama" / "checkpoints" / "final")  # loads in transformers
    start = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert any(not torch.equal(a, b) for a, b in zip(final.parameters(), start.parameters()))


def bad_reward(completion, row):
    raise ZeroDivisionError("checker crashed")


def test_a_reward_that_raises_stops_the_run_and_keeps_everything(tmp_path):
    cfg = load_config(None, TINY + [f"out_dir={tmp_path}", "run_name=broken",
                                    "task.reward=test_end_to_end:bad_reward"])
    with pytest.raises(RewardError, match="failed on sample 0 .*ZeroDivisionError: checker crashed"):
        train(cfg)
    run = tmp_path / "broken"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"].startswith("failed: RewardError")
    assert (run / "checkpoints" / "last" / "model.safetensors").exists()
    assert any(m["stage"] == "sft" for m in read_metrics(run))  # the SFT metrics are still there


def test_cli_reports_config_errors_and_lists_algorithms(capsys):
    assert main(["train", "rl.stepz=3"]) == 2
    assert "unknown config key 'rl.stepz'" in capsys.readouterr().err
    assert main(["algorithms"]) == 0
    assert "grpo" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "rollout.k" in out and "algorithm" in out


def test_cli_runs_a_recipe_with_overrides(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("rl: {steps: 2}\n")
    assert main(["train", str(recipe), *TINY[:2], "rl.eval_every=0", "task.num_eval=40", "rollout.k=2",
                 "rollout.prompts_per_step=4", "model.n_layer=1", "model.n_embd=32", f"out_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "held-out pass@1" in out and "after RL" in out
    runs = [d for d in os.listdir(tmp_path) if d.startswith("r-")]
    assert len(runs) == 1 and len([m for m in read_metrics(tmp_path / runs[0]) if m["stage"] == "rl"]) == 2


def test_cli_imports_the_reward_module_from_the_working_directory(tmp_path):
    """The `rlpost` console script is a file in the venv's bin folder: Python puts that folder on sys.path,
    not the working directory. A script in another folder calling cli.main is the same situation (a
    `python -c` would put the working directory on sys.path and hide the problem)."""
    work, bin_dir = tmp_path / "work", tmp_path / "bin"
    work.mkdir()
    bin_dir.mkdir()
    (work / "my_module.py").write_text("import pathlib\n\n"
                                       "def score(completion, row):\n"
                                       "    pathlib.Path('scored').touch()\n"
                                       "    return 1.0\n")
    (bin_dir / "rlpost_script.py").write_text("import sys\nfrom rlpost.cli import main\nsys.exit(main())\n")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    args = ["train", "task.reward=my_module:score", "sft.steps=0", "rl.steps=1", "rl.eval_every=0",
            "task.num_eval=2", "eval.samples_per_prompt=1", "rollout.prompts_per_step=2", "rollout.k=2",
            "model.n_layer=1", "model.n_embd=16", "model.n_head=2", f"out_dir={tmp_path / 'runs'}"]
    done = subprocess.run([sys.executable, str(bin_dir / "rlpost_script.py"), *args], cwd=work, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (work / "scored").exists()  # the user's function scored the samples


@pytest.mark.slow
def test_default_recipe_beats_the_demonstrator(tmp_path):
    """The central claim on the embedded default: RL exceeds its imperfect demonstrations."""
    summary = train(load_config(None, [f"out_dir={tmp_path}", "run_name=default"]))
    assert summary["pass@1_rl"] >= summary["demonstrator_accuracy"] + 0.10
    assert summary["pass@1_rl"] >= summary["pass@1_sft"] + 0.15


@pytest.mark.slow
def test_trainer_compile_runs_grpo_on_an_hf_model(tiny_llama_dir, tmp_path):
    cfg = load_config(None, TINY + [f"model.name={tiny_llama_dir}", "sft.steps=0", "rl.steps=2", "rl.eval_every=0",
                                    "trainer.compile=true", f"out_dir={tmp_path}", "run_name=compiled",
                                    "rollout.max_new_tokens=4"])
    summary = train(cfg)
    assert summary["status"] == "ok"
    rl = [m for m in read_metrics(tmp_path / "compiled") if m["stage"] == "rl"]
    assert len(rl) == 2 and all(m["rollout/logp_mismatch_max"] < 1e-4 for m in rl)
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(tmp_path / "compiled" / "checkpoints" / "final")
