"""Masked tensor math: the one copy every loss, metric and scorer uses.

A leaf module (it imports torch only), so any layer may import it: the algorithms, the trainer, SFT,
the preference losses, the learned scorers. Masked entries are replaced with zeros (torch.where), never
multiplied by the mask, so an inf or NaN off the mask (padding garbage) cannot leak into a sum.
"""

from __future__ import annotations

import torch


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of x over mask (over everything, or along `dim`), with masked entries replaced (not multiplied)
    so inf/NaN there cannot leak in."""
    kept = torch.where(mask.bool(), x, torch.zeros_like(x))
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Mean of x over mask along `dim` (e.g. each row's mean over its response tokens); a row with no
    masked entry gets 0."""
    return masked_sum(x, mask, dim) / mask.bool().sum(dim).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / (std + eps) over the masked entries (population std); zero off the mask, and zero
    everywhere when the masked entries are all equal (with eps = 0 that would be 0 / 0)."""
    m = mask.bool()
    n = m.sum().clamp(min=1)
    mean = masked_sum(x, m) / n
    var = masked_sum((x - mean) ** 2, m) / n
    scale = var.sqrt() + eps
    return torch.where(m & (scale > 0), (x - mean) / scale, torch.zeros_like(x))


@torch.no_grad()
def masked_mean_value(x: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of x over mask as a float (for metrics); 0.0 when the mask is empty."""
    n = mask.sum().item()
    return masked_sum(x.float(), mask).item() / n if n else 0.0


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Column of each row's last masked (response) token. [B]"""
    T = mask.shape[1]
    return (T - 1) - mask.flip(1).float().argmax(1)
