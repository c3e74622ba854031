"""The examples in examples/ run: each is loaded from its file and run for a few steps with tiny settings."""

import importlib.util
import math
import os

import torch

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def load_example(name: str):
    """examples/<name>.py as a module (examples/ is not a package: it is what a reader runs from a checkout)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_grpo_minimal_runs_the_whole_loop():
    """A short SFT warm-up makes some answers right, so GRPO has groups to learn from: every step logs a
    reward, the policy moves away from the frozen reference, and each step's sync stamps a new version."""
    example = load_example("grpo_minimal")
    steps = 3
    threads = torch.get_num_threads()
    # one thread: on a loaded 2-core machine two OpenMP threads spin against other jobs and took 14x the
    # CPU time (62 s against 4.4 s) for the same run
    torch.set_num_threads(1)
    try:
        out = example.main(["--steps", str(steps), "--sft-steps", "40", "--sft-batch", "64", "--prompts", "16",
                            "--k", "8", "--eval-rows", "20", "--eval-samples", "1"])
    finally:
        torch.set_num_threads(threads)
    rewards = out["rewards"]
    assert len(rewards) == steps and all(0.0 <= r <= 1.0 for r in rewards), rewards
    assert sum(rewards) > 0, f"no sample was right in {steps} steps of 128: GRPO had nothing to learn from"
    assert out["weight_sync"].version == steps and out["engine"].version == steps
    policy, frozen = out["model"].state_dict(), out["reference"].model.state_dict()
    assert policy.keys() == frozen.keys()
    assert any(not torch.equal(policy[k], frozen[k]) for k in policy), "GRPO left the SFT weights unchanged"
    assert all(0.0 <= v <= 1.0 and math.isfinite(v) for v in out["pass@1"].values()), out["pass@1"]
