"""Prop. B.8: the homogeneous limit ``Λ̃^L → 1·e_0ᵀ`` of one causal attention matrix repeated.

With ``Λ̃ = ½(Λ + I)`` (β_1 = β_2 = σ_ψ = 1), ``Λ̃^L → 1·e_1ᵀ`` (0-based here: ``1·e_0ᵀ``, every token
sees only the first one) when eigenvalue 1 is simple (Lemma B.6, :mod:`lens_squash.algebra.causal`),
at the rate of the second eigenvalue ``λ_2 = max_{i≥1} Λ̃_ii`` (:func:`second_eigenvalue`). Distances
to the limit are max-row total variation, ``max_j (1 − X_{j0})`` (see :mod:`lens_squash.algebra.spectral`,
which extends all of this to a different matrix per layer).
"""

from __future__ import annotations

import math
from itertools import repeat

import torch
from jaxtyping import Float
from torch import Tensor

from ..core.shapes import SquareMatrix
from . import paths
from .causal import _check_square, causal_spectrum, check_causal_stochastic
from .spectral import _check_eps, _propagate, _rate_depth, _second_diagonal

__all__ = [
    "DEFAULT_HORIZON",
    "asymptotic_depth",
    "convergence_errors",
    "depth_to_epsilon",
    "second_eigenvalue",
    "steady_state",
]

#: how many powers of Λ̃ :func:`depth_to_epsilon` computes exactly before it extrapolates
DEFAULT_HORIZON: int = 1024


def _rollout(m: Float[Tensor, "... query_pos key_pos"]) -> Float[Tensor, "... query_pos key_pos"]:
    """``Λ̃ = ½(Λ + I)`` of a checked square matrix (:func:`lens_squash.algebra.paths.rollout_matrices`)."""
    return paths.rollout_matrices(_check_square(m))


def second_eigenvalue(m: Float[Tensor, "... query_pos key_pos"]) -> Float[Tensor, "..."]:
    """``λ_2 = max_{i≥1} Λ̃_ii = max_{i≥1} (1 + Λ_ii)/2`` for the attention matrix ``m = Λ``: the rate at
    which ``Λ̃^L`` approaches ``1·e_0ᵀ`` (1 when eigenvalue 1 is not simple; 0 for one position)."""
    return _second_diagonal(causal_spectrum(_rollout(check_causal_stochastic(m))))


def steady_state(m: SquareMatrix, atol: float = 1e-9) -> SquareMatrix:
    """``lim_{L→∞} Λ̃^L`` for the causal attention matrix ``m = Λ``, without forming any power.

    Row ``j`` is where the chain ``Λ̃`` started at ``j`` is finally absorbed. Absorbing rows are those
    with ``Λ_jj ≥ 1 − atol`` (row 0 always): their limit row is ``e_j``. Every other row leaves itself
    with probability ``1 − Λ̃_jj > 0`` per step and lands on an earlier row, so by first-step analysis
    ``S_j = Σ_{k<j} Λ_jk S_k / (1 − Λ_jj)`` (the ½ of ``Λ̃`` cancels), filled in row order. When
    eigenvalue 1 is simple (Lemma B.6) this is Prop. B.8's ``1·e_0ᵀ``.
    """
    m = check_causal_stochastic(m)
    if m.ndim != 2:
        raise ValueError(f"steady_state takes one matrix [query_pos, key_pos], got shape {tuple(m.shape)}")
    n = m.shape[-1]
    limit = torch.zeros_like(m)
    for j in range(n):
        stay = float(m[j, j])
        if stay >= 1 - atol:
            limit[j, j] = 1.0
        else:
            limit[j] = m[j, :j] @ limit[:j] / (1 - stay)
    return limit


def convergence_errors(m: SquareMatrix, depth: int) -> Float[Tensor, "depth_plus_1"]:
    """``E_L = ‖Λ̃^L − 1e_0ᵀ‖ = max_j (1 − [Λ̃^L]_{j0})`` for ``L = 0 … depth`` (``m = Λ``), O(depth·n²).

    ``E_L = ‖B^L‖_∞`` for ``B = Λ̃[1:, 1:]``, so it is non-increasing and sub-multiplicative, and
    ``E_{L+1} / E_L → λ_2``. Computed from :func:`first_token_gap`, so accurate far below 1e-16.
    """
    m = check_causal_stochastic(m)
    if m.ndim != 2 or depth < 0:
        raise ValueError(f"need one matrix and depth ≥ 0, got shape {tuple(m.shape)}, depth {depth}")
    start = torch.ones(1, m.shape[-1], dtype=m.dtype)
    start[0, 0] = 0.0  # Λ̃^0 = I: every row but the first is entirely off the first token
    gaps = torch.cat([start, _propagate(repeat(_rollout(m), depth), m.shape[-1], m.dtype)[1]])
    return gaps.max(-1).values


def asymptotic_depth(m: SquareMatrix, eps: float) -> float:
    """The rate-only prediction ``⌈log ε / log λ_2⌉`` of Prop. B.8 (``inf`` when ``λ_2 = 1``).

    It ignores the constant in ``E_L ≈ C·λ_2^L`` (and the polynomial factor of repeated diagonal
    values), so it is an estimate; :func:`depth_to_epsilon` is the exact depth.
    """
    _check_eps(eps)
    return _rate_depth(float(second_eigenvalue(m)), eps)


def depth_to_epsilon(m: SquareMatrix, eps: float, *, horizon: int = DEFAULT_HORIZON) -> float:
    """The smallest depth ``L`` with ``‖Λ̃^L − 1e_0ᵀ‖ ≤ eps`` for the causal attention matrix ``m = Λ``.

    Exact, not estimated: ``E_L = ‖B^L‖_∞`` with ``B = Λ̃[1:, 1:]`` is non-increasing in ``L``. The
    first ``max(horizon, n)`` errors cost one matrix–vector product each; beyond them the powers
    ``B^{H·2^i}`` are squared until one reaches ``eps`` and the depth is found by binary lifting,
    O(n³ log L) — so a spectral gap of 1e-9 still costs only ~40 products. Prop. B.8's rate-only
    estimate is :func:`asymptotic_depth`; the two agree up to the constant in ``E_L ≈ C·λ_2^L``.
    Returns ``inf`` when eigenvalue 1 is not simple (``Λ̃^L`` never reaches ``1e_0ᵀ``), 0 for n = 1.
    """
    _check_eps(eps)
    m = check_causal_stochastic(m)
    if m.ndim != 2:
        raise ValueError(f"depth_to_epsilon takes one matrix [query_pos, key_pos], got shape {tuple(m.shape)}")
    n = m.shape[-1]
    if n == 1:
        return 0
    if float(second_eigenvalue(m)) >= 1:
        return math.inf
    steps = max(horizon, n)
    lam = _rollout(m)
    # row sums of B^r are 1 − [Λ̃^r]_{j0} for rows j ≥ 1 (Λ̃ is block lower-triangular around row 0)
    row_sums = _propagate(repeat(lam, steps), n, lam.dtype)[1][:, 1:]  # [r − 1, j − 1]
    reached = torch.nonzero(row_sums.max(-1).values <= eps)
    if len(reached):
        return int(reached[0, 0]) + 1
    powers = [torch.linalg.matrix_power(lam[1:, 1:], steps)]  # B^(steps·2^i)
    while float(powers[-1].sum(-1).max()) > eps:
        if len(powers) > 64:
            return math.inf  # the gap is below float64 resolution
        powers.append(powers[-1] @ powers[-1])
    if len(powers) == 1:  # B^steps computed directly rounds to ≤ eps where the recursion did not
        return steps
    depth, current = steps * 2 ** (len(powers) - 2), powers[-2]
    for i in range(len(powers) - 3, -1, -1):
        candidate = current @ powers[i]
        if float(candidate.sum(-1).max()) > eps:
            current, depth = candidate, depth + steps * 2**i
    # E_depth > eps ≥ E_{depth + steps}: the last stretch is B^depth applied to B^r·1
    errors = (current @ row_sums.T).max(0).values
    return depth + int(torch.nonzero(errors <= eps)[0, 0]) + 1
