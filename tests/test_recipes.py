"""The archetype recipes keep their numbers (slow: each is a full run of minutes; `make test-slow`).

Each threshold sits well below what the recipe measured (README, 'Environments and verifiers: the
archetype recipes'), so a pass does not depend on a lucky seed, and well above what a broken piece
(masking, the verifier, the environment) would leave."""

import pytest

from rlpost.config import load_config
from rlpost.run import train

pytestmark = pytest.mark.slow


def run(tmp_path, recipe, *overrides):
    return train(load_config(recipe, [f"out_dir={tmp_path}", "run_name=r", *overrides]))


def test_tool_recipe_rl_gains_twenty_points_over_sft(tmp_path):
    s = run(tmp_path, "recipes/tool_calculator.yaml")
    assert s["pass@1_rl"] >= s["pass@1_sft"] + 0.20
