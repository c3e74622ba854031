"""rlpost/ops.py: the one copy of the masked math, and that nothing else keeps its own."""

import ast
from pathlib import Path

import pytest
import torch

from rlpost.ops import last_token_index, masked_mean, masked_mean_value, masked_sum, masked_whiten

ROOT = Path(__file__).resolve().parents[1] / "rlpost"
MASK = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]])


def test_garbage_off_the_mask_never_leaks():
    x = torch.tensor([[float("nan"), 1.0, 2.0, float("inf")], [5.0, 5.0, 5.0, 5.0], [1.0, 2.0, 3.0, 4.0]])
    assert masked_sum(x, MASK).item() == 13.0
    assert masked_sum(x, MASK, 1).tolist() == [3.0, 0.0, 10.0]
    assert masked_mean(x, MASK.bool(), 1).tolist() == [1.5, 0.0, 2.5]  # a row without tokens gets 0
    assert masked_mean_value(x, MASK) == pytest.approx(13.0 / 6)
    assert masked_mean_value(x, torch.zeros_like(MASK)) == 0.0
    w = masked_whiten(x, MASK)
    assert torch.isfinite(w).all() and (w[MASK == 0] == 0).all()


def test_whiten_is_zero_mean_unit_std_and_zero_when_constant():
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    w = masked_whiten(x, MASK, eps=0.0)[MASK.bool()]
    assert w.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert w.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
    assert (masked_whiten(torch.full((3, 4), 0.7), MASK, eps=0.0) == 0).all()


def test_last_token_index():
    assert last_token_index(torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])).tolist() == [2, 3, 0]


def test_one_copy_of_the_masked_math():
    """No module but ops.py defines a masked_* helper or last_token_index (a second copy drifts)."""
    names = {"masked_sum", "masked_mean", "masked_mean_value", "masked_whiten", "last_token_index"}
    copies = [f"{p.relative_to(ROOT.parent)}:{node.lineno} {node.name}"
              for p in sorted(ROOT.rglob("*.py")) if p.name != "ops.py" or p.parent != ROOT
              for node in ast.walk(ast.parse(p.read_text()))
              if isinstance(node, ast.FunctionDef) and node.name in names]
    assert not copies, "masked math defined outside rlpost/ops.py (import it from there): " + ", ".join(copies)
