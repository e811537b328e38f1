"""Rank statistics used to compare sensitivity profiles: average ranks, Spearman, Kendall τ-b, Pearson.

Kept dependency-free (torch only, no scipy at run time) and with scipy's conventions: ties get their
average rank, and a constant input gives NaN. Kendall's τ-b is computed over all pairs in O(n²) memory
chunks, which is exact and fast enough for the n ≤ a few thousand positions a prompt has.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["kendall", "pearson", "rank_average", "spearman", "top_k_overlap"]

_F64 = torch.float64


def _as_curve(curve, name: str) -> Tensor:
    curve = torch.as_tensor(curve).to(_F64)
    if curve.ndim != 1 or curve.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D curve, got shape {tuple(curve.shape)}")
    if not torch.isfinite(curve).all():
        raise ValueError(f"{name} contains NaN or inf; recompute it in float32 or float64")
    return curve


def _pair(a, b) -> tuple[Tensor, Tensor]:
    a, b = _as_curve(a, "a"), _as_curve(b, "b")
    if a.shape != b.shape or a.numel() < 2:
        raise ValueError(f"need two curves of the same length ≥ 2, got {a.numel()} and {b.numel()}")
    return a, b


def rank_average(x: Float[Tensor, "n"]) -> Float[Tensor, "n"]:
    """1-based ranks with ties given their average rank (``scipy.stats.rankdata`` 'average')."""
    x = _as_curve(x, "x")
    _, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).to(_F64)  # last rank of each group of equal values
    return (ends - (counts.to(_F64) - 1) / 2)[inverse]


def pearson(a: Float[Tensor, "n"], b: Float[Tensor, "n"]) -> float:
    """Pearson correlation; NaN when either input is constant (as scipy)."""
    a, b = _pair(a, b)
    a, b = a - a.mean(), b - b.mean()
    denom = float(a.norm() * b.norm())
    return float((a * b).sum()) / denom if denom > 0 else math.nan


def spearman(a: Float[Tensor, "n"], b: Float[Tensor, "n"]) -> float:
    """Spearman correlation: Pearson on average ranks."""
    a, b = _pair(a, b)
    return pearson(rank_average(a), rank_average(b))


def kendall(a: Float[Tensor, "n"], b: Float[Tensor, "n"], *, chunk: int = 1024) -> float:
    """Kendall's τ-b (ties corrected, as ``scipy.stats.kendalltau``); NaN for a constant input."""
    a, b = _pair(a, b)
    concordance = tied_a = tied_b = 0.0
    for start in range(0, a.numel(), chunk):
        da = torch.sign(a[start : start + chunk, None] - a[None, :])
        db = torch.sign(b[start : start + chunk, None] - b[None, :])
        concordance += float((da * db).sum())
        tied_a += float((da == 0).sum())
        tied_b += float((db == 0).sum())
    pairs = a.numel() * a.numel()  # ordered pairs, the diagonal counted as ties in both
    denom = math.sqrt((pairs - tied_a) * (pairs - tied_b))
    return concordance / denom if denom > 0 else math.nan


def top_k_overlap(a: Float[Tensor, "n"], b: Float[Tensor, "n"], k: int = 5) -> float:
    """Fraction of ``a``'s ``k`` largest positions that are also among ``b``'s ``k`` largest."""
    a, b = _pair(a, b)
    k = min(k, a.numel())
    top_a = set(torch.topk(a, k).indices.tolist())
    top_b = set(torch.topk(b, k).indices.tolist())
    return len(top_a & top_b) / k
