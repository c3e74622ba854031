"""benchmarks/failure_modes.py: every row's config loads, and the length row's reward pays for length."""
import pytest

from benchmarks import failure_modes as fm
from rlpost.config import load_config
from rlpost.env.verifiers import reward_from_config


@pytest.mark.parametrize("name,recipe,overrides", [(r[0], r[1], r[2]) for r in fm.ROWS])
def test_every_row_config_loads(name, recipe, overrides):
    cfg = load_config(recipe, [*fm.RECIPES[recipe][2], *overrides, "rl.steps=2"])
    if recipe == fm.COT:
        assert cfg.task.name == "multistep" and cfg.rollout.max_new_tokens == 64


def test_length_row_reward_pays_for_length_on_top_of_the_verifier():
    row = next(r for r in fm.ROWS if r[0] == "length explosion")
    cfg = load_config(fm.COT, row[2])
    assert cfg.eval.reward == "math"  # held-out pass@1 is the verifier's, not the length-paying sum
    reward = reward_from_config(cfg.task, None)
    right, gold = "57+32=089;089+18=107;#### 107", {"answer": "107"}
    assert reward(right, gold) == pytest.approx(1.0 + 0.02 * len(right))
    longer = right + "    "  # the line after "####" still reads 107: right, and paid for 4 more characters
    assert reward(longer, gold) == pytest.approx(1.0 + 0.02 * len(longer))
    wrong = right.replace("#### 107", "#### 106")
    assert reward(wrong, gold) == pytest.approx(0.02 * len(wrong))
