"""Perron–Frobenius and Dobrushin analysis of causal attention (Barbero et al. 2024, App. B.2).

A causal attention matrix ``Λ`` is lower-triangular and row-stochastic. The paper's spectral results:

* **Lemma B.6.** The eigenvalues of a triangular matrix are its diagonal, so the spectrum of ``Λ`` is
  ``diag(Λ)`` (:func:`causal_spectrum`) and the largest eigenvalue is 1 (row 0 is always ``e_0``).
  Eigenvalue 1 is simple when every row but the first has at least two non-zero entries
  (:func:`two_nonzeros_condition`). Exactly: its multiplicity is the number of rows that put all their
  mass on themselves (:func:`eigenvalue_one_multiplicity`); the condition is sufficient, not necessary
  (a row ``e_k`` with ``k < j`` has diagonal 0).
* **Lemma B.7.** Products of row-stochastic matrices are row-stochastic, and products of triangular
  row-stochastic matrices are triangular row-stochastic (:func:`product_closure`); so a stack of
  causal layers composes into a causal row-stochastic matrix (:func:`stack_product`).
* **Prop. B.8.** With ``Λ̃ = ½(Λ + I)`` (β_1 = β_2 = σ_ψ = 1), ``Λ̃^L → 1·e_1ᵀ`` (0-based here:
  ``1·e_0ᵀ``, every token sees only the first one) when eigenvalue 1 is simple, at the rate of the
  second eigenvalue ``λ_2 = max_{i≥1} Λ̃_ii`` (:func:`steady_state`, :func:`second_eigenvalue`,
  :func:`convergence_errors`, :func:`depth_to_epsilon`).

Distances to the limit are *max-row total variation*, ``‖X − 1e_0ᵀ‖ = max_j ½‖X_j − e_0‖₁``, which for
a row-stochastic ``X`` is ``max_j (1 − X_{j0})``: the largest share of any row that is *not* on the
first token. ``1·e_0ᵀ`` is the only rank-one causal row-stochastic matrix (row 0 of a causal matrix is
``e_0``), so this is also the product's distance to rank one.

Real models have a different matrix at every layer, so the homogeneous Prop. B.8 is extended to the
inhomogeneous product ``P^(d) = Λ̃^(d) … Λ̃^(0)`` with Dobrushin's ergodicity coefficient
``τ(P) = ½ max_{j,k} ‖P_j − P_k‖₁ ∈ [0, 1]`` (:func:`dobrushin`). It is sub-multiplicative,
``τ(PQ) ≤ τ(P) τ(Q)``, and sandwiches the distance to rank one: ``τ(P)/2 ≤ ‖P − 1e_0ᵀ‖ ≤ τ(P)``, so
``‖P^(d) − 1e_0ᵀ‖ ≤ Π_{l≤d} τ(Λ̃^(l))``. Column 0 of ``P^(d)`` obeys ``c^(d) = Λ̃^(d) c^(d−1)``, so the
first-token mass of *every* position at *every* depth costs one matrix–vector product per layer,
O(L·n²) (:func:`first_token_column`); the full product is only built on request (:func:`stack_product`).

:func:`analyze_stack` bundles all of it for a stack of rollout matrices into a :class:`SpectralReport`.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from . import paths
from ..core.display import compact_repr
from ..core.records import to_jsonable
from ..core.shapes import LayerMatrices, SquareMatrix

__all__ = [
    "SpectralReport",
    "analyze_stack",
    "asymptotic_depth",
    "causal_spectrum",
    "check_causal_stochastic",
    "convergence_errors",
    "depth_to_epsilon",
    "dobrushin",
    "eigenvalue_one_multiplicity",
    "first_token_column",
    "first_token_gap",
    "is_causal",
    "is_row_stochastic",
    "lazy",
    "product_closure",
    "second_eigenvalue",
    "stack_product",
    "steady_state",
    "two_nonzeros_condition",
]

#: rows per Dobrushin chunk: the ``cdist`` output stays ``chunk × n`` (2 MB at n = 2048, float64)
DOBRUSHIN_CHUNK: int = 128
#: how many powers of Λ̃ :func:`depth_to_epsilon` computes exactly before it extrapolates
DEFAULT_HORIZON: int = 1024


# --------------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------------


def _check_square(m: Tensor) -> Tensor:
    m = torch.as_tensor(m)
    if m.ndim < 2 or m.shape[-1] != m.shape[-2] or m.shape[-1] == 0:
        raise ValueError(f"expected square matrices [..., query_pos, key_pos], got shape {tuple(m.shape)}")
    if not m.is_floating_point():
        m = m.double()
    if not torch.isfinite(m).all():
        raise ValueError("matrix contains NaN or inf; rerun the model in float32 or float64")
    return m


def _above_diagonal(m: Tensor) -> float:
    return float(m.triu(1).abs().max())


def is_causal(m: Float[Tensor, "... query_pos key_pos"], atol: float = 1e-8) -> bool:
    """Whether every matrix is lower-triangular: no mass above the diagonal beyond ``atol``."""
    return _above_diagonal(_check_square(m)) <= atol


def is_row_stochastic(m: Float[Tensor, "... query_pos key_pos"], atol: float = 1e-8) -> bool:
    """Whether every matrix is non-negative with rows summing to 1, both within ``atol``."""
    m = _check_square(m)
    return float(m.min()) >= -atol and float((m.sum(-1) - 1).abs().max()) <= atol


def check_causal_stochastic(m: Float[Tensor, "... query_pos key_pos"], atol: float = 1e-6) -> Tensor:
    """Return ``m`` if it is causal (lower-triangular) and row-stochastic; else say what is wrong."""
    m = _check_square(m)
    above = _above_diagonal(m)
    if above > atol:
        raise ValueError(
            f"causal-only analysis; this matrix has mass above the diagonal (max {above:.3g}); trace a "
            "causal (decoder-only) model: Lemmas B.6–B.7 and Prop. B.8 need lower-triangular attention"
        )
    if float(m.min()) < -atol:
        raise ValueError(
            f"matrix has negative entries (min {float(m.min()):.3g}); pass attention probabilities "
            "(blocks.{l}.attn.hook_pattern) or rollout matrices ½(A + I), not scores"
        )
    deviation = float((m.sum(-1) - 1).abs().max())
    if deviation > atol:
        raise ValueError(
            f"rows must sum to 1 (max deviation {deviation:.3g}); pass softmax patterns A or rollout "
            "matrices ½(A + I), not scores or the paper's Ā = A/β₁ + I (rows sum to 1 + 1/β₁)"
        )
    return m


# --------------------------------------------------------------------------------------------------
# Lemma B.6: spectrum and the multiplicity of eigenvalue 1
# --------------------------------------------------------------------------------------------------


def causal_spectrum(m: Float[Tensor, "... query_pos key_pos"], atol: float = 1e-6) -> Float[Tensor, "... pos"]:
    """Eigenvalues of lower-triangular matrices: their diagonals (no eigen-solver needed)."""
    m = _check_square(m)
    above = _above_diagonal(m)
    if above > atol:
        raise ValueError(
            f"causal-only analysis; this matrix has mass above the diagonal (max {above:.3g}), so its "
            "diagonal is not its spectrum; trace a causal model or use torch.linalg.eigvals"
        )
    return m.diagonal(dim1=-2, dim2=-1)


def eigenvalue_one_multiplicity(
    m: Float[Tensor, "... query_pos key_pos"], atol: float = 1e-9
) -> Int[Tensor, "..."]:
    """Algebraic multiplicity of eigenvalue 1 (Lemma B.6): diagonal entries within ``atol`` of 1.

    For a causal row-stochastic matrix ``Λ_jj = 1`` means row ``j`` is ``e_j`` (it attends only to
    itself), so the count is 1 (row 0) plus the number of such rows. Eigenvalue 1 of a stochastic
    matrix is semisimple, so this is also the geometric multiplicity.
    """
    diagonal = causal_spectrum(check_causal_stochastic(m, atol=max(atol, 1e-6)))
    return ((diagonal - 1).abs() <= atol).sum(-1)


def two_nonzeros_condition(m: Float[Tensor, "... query_pos key_pos"], atol: float = 0.0) -> Bool[Tensor, "..."]:
    """Lemma B.6's sufficient condition: every row but the first has ≥ 2 entries above ``atol``.

    Then no row ``j ≥ 1`` can be ``e_j``, so ``Λ_jj < 1`` and eigenvalue 1 is simple.
    """
    return _two_nonzeros(_check_square(m), atol)


def _two_nonzeros(m: Tensor, atol: float) -> Tensor:
    return ((m.abs() > atol).sum(-1)[..., 1:] >= 2).all(-1)


# --------------------------------------------------------------------------------------------------
# Lemma B.7: products stay (causal) row-stochastic
# --------------------------------------------------------------------------------------------------


def product_closure(a: SquareMatrix, b: SquareMatrix, atol: float = 1e-9) -> dict[str, bool]:
    """Lemma B.7 on one pair: which of its hypotheses ``a, b`` meet and what ``a @ b`` satisfies.

    The lemma says ``factors_row_stochastic ⇒ product_row_stochastic`` and
    ``factors_row_stochastic ∧ factors_causal ⇒ product_causal ∧ product_row_stochastic``.
    """
    a, b = _check_square(a), _check_square(b)
    if a.shape != b.shape:
        raise ValueError(f"factors must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    product = a @ b
    return {
        "factors_row_stochastic": is_row_stochastic(a, atol) and is_row_stochastic(b, atol),
        "factors_causal": is_causal(a, atol) and is_causal(b, atol),
        "product_row_stochastic": is_row_stochastic(product, atol),
        "product_causal": is_causal(product, atol),
    }


def stack_product(stack: LayerMatrices, atol: float = 1e-6) -> SquareMatrix:
    """The full product ``Λ̃^(L−1) … Λ̃^(0)`` (later layers on the left), causal row-stochastic by
    Lemma B.7. O(L·n³): for small ``n`` and tests; :func:`first_token_column` is the cheap path."""
    stack = check_causal_stochastic(stack, atol)
    if stack.ndim != 3 or stack.shape[0] == 0:
        raise ValueError(f"stack must be [layer, query_pos, key_pos] with a layer, got shape {tuple(stack.shape)}")
    return paths.stack_product(stack).to(stack.dtype)


# --------------------------------------------------------------------------------------------------
# Prop. B.8: the homogeneous limit of Λ̃ = ½(Λ + I)
# --------------------------------------------------------------------------------------------------


def lazy(m: Float[Tensor, "... query_pos key_pos"]) -> Float[Tensor, "... query_pos key_pos"]:
    """``Λ̃ = ½(Λ + I)``: one layer of Prop. B.8 (residual and attention weighted equally)."""
    return paths.rollout_matrices(_check_square(m))


def _second_diagonal(diagonal: Float[Tensor, "... pos"]) -> Float[Tensor, "..."]:
    # One position has no second eigenvalue; 0 makes every rate-based formula give "already converged".
    if diagonal.shape[-1] < 2:
        return diagonal.new_zeros(diagonal.shape[:-1])
    return diagonal[..., 1:].max(-1).values


def second_eigenvalue(m: Float[Tensor, "... query_pos key_pos"]) -> Float[Tensor, "..."]:
    """``λ_2 = max_{i≥1} Λ̃_ii = max_{i≥1} (1 + Λ_ii)/2`` for the attention matrix ``m = Λ``: the rate at
    which ``Λ̃^L`` approaches ``1·e_0ᵀ`` (1 when eigenvalue 1 is not simple; 0 for one position)."""
    return _second_diagonal(causal_spectrum(lazy(check_causal_stochastic(m))))


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
    gaps = torch.cat([start, _propagate(repeat(lazy(m), depth), m.shape[-1], m.dtype)[1]])
    return gaps.max(-1).values


def asymptotic_depth(m: SquareMatrix, eps: float) -> float:
    """The rate-only prediction ``⌈log ε / log λ_2⌉`` of Prop. B.8 (``inf`` when ``λ_2 = 1``).

    It ignores the constant in ``E_L ≈ C·λ_2^L`` (and the polynomial factor of repeated diagonal
    values), so it is an estimate; :func:`depth_to_epsilon` is the exact depth.
    """
    _check_eps(eps)
    return _rate_depth(float(second_eigenvalue(m)), eps)


def _rate_depth(lam: float, eps: float) -> float:
    """``⌈log ε / log λ⌉``: layers for ``λ^L ≤ ε`` (``inf`` for λ ≥ 1, 0 for λ ≤ 0)."""
    if lam >= 1:
        return math.inf
    if lam <= 0:
        return 0
    return math.ceil(math.log(eps) / math.log(lam))


def _check_eps(eps: float) -> None:
    if not 0 < eps < 1:
        raise ValueError(f"eps must lie in (0, 1), got {eps}")


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
    lam = lazy(m)
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


# --------------------------------------------------------------------------------------------------
# the inhomogeneous stack: Dobrushin coefficients and the first-token column
# --------------------------------------------------------------------------------------------------


def _dobrushin_one(m: SquareMatrix, chunk: int, causal: bool) -> Tensor:
    n = m.shape[-1]
    cumulative = m.cumsum(-1)
    best = m.new_zeros(())
    for j0 in range(0, n, chunk):
        j1 = min(n, j0 + chunk)
        # Causal rows j < j1 are zero beyond column j1, so only those columns need comparing; the
        # other row's remaining mass (its tail) is added as is. Pairs with k < j0 were seen when
        # k's chunk ran (τ is symmetric in j, k).
        width = j1 if causal else n
        l1 = torch.cdist(m[None, j0:j1, :width], m[None, j0:, :width], p=1)[0]
        if causal and width < n:
            l1 = l1 + (cumulative[j0:, -1] - cumulative[j0:, width - 1])[None, :]
        best = torch.maximum(best, l1.max())
    return 0.5 * best


def _is_causal_stochastic(m: SquareMatrix, atol: float | None) -> bool:
    # by default the tolerance follows the dtype (1e-9 in float64), so only rows stochastic to working
    # precision take the closed form; float32 softmax rows cast to float64 need an explicit atol
    atol = max(1e-9, 100 * torch.finfo(m.dtype).eps) if atol is None else atol
    return bool(_above_diagonal(m) == 0 and (m >= 0).all() and (m.sum(-1) - 1).abs().max() <= atol)


def dobrushin(
    p: Float[Tensor, "... query_pos key_pos"],
    *,
    chunk: int = DOBRUSHIN_CHUNK,
    method: str = "auto",
    atol: float | None = None,
) -> Float[Tensor, "..."]:
    """Dobrushin's coefficient ``τ(P) = ½ max_{j,k} ‖P_j − P_k‖₁`` of each matrix.

    ``method="pairwise"`` is exact for any matrix, O(n³) (about n³/6 for causal ones, which compare
    only the columns a row can reach), in row chunks of ``chunk`` so memory stays O(chunk·n).
    ``"auto"`` uses the O(n) closed form ``τ = 1 − min_j P_{j0}`` for causal row-stochastic matrices:
    ``τ = 1 − min_{j,k} Σ_i min(P_ji, P_ki)``; row 0 is ``e_0``, so the pair ``(0, k)`` overlaps by
    ``P_k0``, and any pair overlaps by at least ``min(P_j0, P_k0)`` on column 0. A causal matrix whose
    rows sum to 1 within ``atol`` (default: 100 machine epsilons of its dtype) takes the closed form
    on its rows divided by their sums (what float32 softmax rows approximate).
    For row-stochastic ``P``: ``τ ∈ [0, 1]``, 0 iff ``P`` has rank one, and ``τ(PQ) ≤ τ(P)τ(Q)``.
    """
    p = _check_square(p)
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of rows, got {chunk}")
    if method not in ("auto", "pairwise"):
        raise ValueError(f"method must be 'auto' or 'pairwise', got {method!r}")
    flat = p.reshape(-1, *p.shape[-2:])
    values = [
        1.0 - (m[:, 0] / m.sum(-1)).min() if method == "auto" and _is_causal_stochastic(m, atol)
        else _dobrushin_one(m, chunk, causal=_above_diagonal(m) == 0)
        for m in flat
    ]
    return torch.stack(values).reshape(p.shape[:-2]) if values else p.new_zeros(p.shape[:-2])


def _first_token_recursion(stack: LayerMatrices) -> tuple[Tensor, Tensor]:
    stack = _check_square(stack)
    if stack.ndim != 3:
        raise ValueError(f"stack must be [layer, query_pos, key_pos], got shape {tuple(stack.shape)}")
    return _propagate(stack, stack.shape[-1], stack.dtype)


def _propagate(layers: Iterable[Tensor], n: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    # Column 0 of P^(d) and its complement 1 − column, carried together: Λ̃1 = 1 gives the
    # complement the same recursion, and carrying it avoids the cancellation of 1 − (mass ≈ 1)
    # that would floor distances at ~1e-16.
    state = torch.zeros(n, 2, dtype=dtype)
    state[0, 0], state[1:, 1] = 1.0, 1.0
    states = []
    for layer in layers:
        state = layer @ state
        states.append(state)
    states = torch.stack(states) if states else state.new_zeros(0, n, 2)
    return states[..., 0], states[..., 1]


def first_token_column(stack: LayerMatrices) -> Float[Tensor, "depth pos"]:
    """Column 0 of ``P^(d) = Λ̃^(d) … Λ̃^(0)`` for every depth: row ``d`` holds every position's mass
    on the first token after ``d + 1`` layers. ``c^(d) = Λ̃^(d) c^(d−1)``, ``c^(−1) = e_0``: O(L·n²)."""
    return _first_token_recursion(stack)[0]


def first_token_gap(stack: LayerMatrices) -> Float[Tensor, "depth pos"]:
    """``1 −`` :func:`first_token_column`, computed without cancellation (``g^(d) = Λ̃^(d) g^(d−1)``,
    ``g^(−1) = 1 − e_0``): each position's mass *not* on the first token, accurate to tiny values.
    Its maximum over positions is ``‖P^(d) − 1e_0ᵀ‖``, the product's distance to rank one."""
    return _first_token_recursion(stack)[1]


# --------------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SpectralReport:
    """Perron–Frobenius and Dobrushin analysis of a stack of rollout matrices ``Λ̃^(l)``.

    Per layer: ``spectrum`` (the diagonal of ``Λ̃^(l)``), ``second_eigenvalue``, ``multiplicity`` of
    eigenvalue 1, whether ``two_nonzeros`` (Lemma B.6) holds, ``repeated_layer_depth`` (Prop. B.8's
    rate-only depth if that layer were repeated, ``inf`` when eigenvalue 1 is not simple) and
    ``dobrushin`` ``τ(Λ̃^(l))``. Per depth ``d = 1 … L`` (index ``d − 1``): ``cumulative_dobrushin``
    ``Π_{l<d} τ``, the ``target``'s ``first_token_mass`` ``[P^(d)]_{target,0}`` and
    ``rank_one_distance`` ``‖P^(d) − 1e_0ᵀ‖ ≤ cumulative_dobrushin``.

    ``depth_to_first_token`` is the number of layers after which the target puts at least ``1 − eps``
    on the first token. When the stack is too shallow it is ``extrapolated``: assuming further layers
    contract at the stack's geometric-mean Dobrushin rate ``ρ = (Π τ)^{1/L}``, the gap after ``m``
    more layers is at most ``ρ^m · min(2‖P^(L) − 1e_0ᵀ‖, Π τ)`` (from ``τ(QP) ≤ τ(Q)τ(P)`` and
    ``τ ≤ 2·distance``), and the smallest ``L + m`` bringing that below ``eps`` is reported. It is
    ``inf`` when ``ρ = 1`` (no contraction, e.g. a layer whose eigenvalue 1 is not simple).
    """

    spectrum: Float[Tensor, "layer pos"]
    second_eigenvalue: Float[Tensor, "layer"]
    multiplicity: Int[Tensor, "layer"]
    two_nonzeros: Bool[Tensor, "layer"]
    repeated_layer_depth: Float[Tensor, "layer"]
    dobrushin: Float[Tensor, "layer"]
    cumulative_dobrushin: Float[Tensor, "depth"]
    first_token_mass: Float[Tensor, "depth"]
    rank_one_distance: Float[Tensor, "depth"]
    depth_to_first_token: float
    extrapolated: bool
    target: int
    eps: float
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return self.spectrum.shape[0]

    @property
    def n_tokens(self) -> int:
        return self.spectrum.shape[1]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON: tensors as lists, ``inf`` as ``null``."""
        return {name: to_jsonable(value) for name, value in self.__dict__.items()}

    __repr__ = compact_repr

    def _repr_html_(self) -> str:
        depth = self.depth_to_first_token
        shown = "never (no contraction)" if math.isinf(depth) else f"{depth}" + (
            " (extrapolated)" if self.extrapolated else "")
        rows = [
            ("layers × positions", f"{self.n_layers} × {self.n_tokens}"),
            ("layers with simple eigenvalue 1", f"{int((self.multiplicity == 1).sum())} of {self.n_layers}"),
            ("second eigenvalue (min … max)",
             f"{float(self.second_eigenvalue.min()):.4f} … {float(self.second_eigenvalue.max()):.4f}"),
            ("Dobrushin τ per layer (min … max)", f"{float(self.dobrushin.min()):.4f} … {float(self.dobrushin.max()):.4f}"),
            ("Π τ over the stack", f"{float(self.cumulative_dobrushin[-1]):.3e}"),
            (f"position {self.target}'s mass on the first token", f"{float(self.first_token_mass[-1]):.6f}"),
            ("distance of the product to rank one", f"{float(self.rank_one_distance[-1]):.3e}"),
            (f"depth until position {self.target} sees only the first token (ε = {self.eps:g})", shown),
        ]
        body = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in rows)
        return f"<b>lens_squash SpectralReport</b><table>{body}</table>"

    def plot(self, **kwargs):
        """The four-panel spectral figure (:func:`lens_squash.views.spectral_figures.spectral_report_figure`)."""
        from ..views.spectral_figures import spectral_report_figure  # plotly is only needed when plotting

        return spectral_report_figure(self, **kwargs)


def _depth_to_first_token(
    gaps: Float[Tensor, "depth"], distance: Float[Tensor, "depth"], cumulative: Float[Tensor, "depth"], eps: float
) -> tuple[float, bool]:
    reached = torch.nonzero(gaps <= eps)
    if len(reached):
        return int(reached[0, 0]) + 1, False
    n_layers = len(gaps)
    total = float(cumulative[-1])
    if total >= 1:
        return math.inf, True
    rate = total ** (1 / n_layers)
    start = min(2 * float(distance[-1]), total)
    more = max(1, math.ceil(math.log(eps / start) / math.log(rate)))
    while start * rate**more > eps:  # guard the ceil against rounding
        more += 1
    return n_layers + more, True


def analyze_stack(
    stack: Float[Tensor, "layer query_pos key_pos"],
    *,
    target: int = -1,
    eps: float = 1e-6,
    atol: float = 1e-4,
    unit_atol: float = 1e-6,
    metadata: dict[str, Any] | None = None,
) -> SpectralReport:
    """Spectral and Dobrushin analysis of the rollout matrices ``Λ̃^(l) = ½(A^(l) + I)`` of one prompt.

    ``atol`` is the tolerance of the causal / row-stochastic check (float32 softmax rows are off by
    ~1e-7·√n); ``unit_atol`` decides which diagonal entries count as eigenvalue 1. Computed in float64,
    O(L·n²): the Dobrushin coefficients take :func:`dobrushin`'s closed form on the row-normalised layers.
    """
    _check_eps(eps)
    stack = check_causal_stochastic(torch.as_tensor(stack), atol).to(torch.float64)
    if stack.ndim != 3:
        raise ValueError(f"stack must be [layer, query_pos, key_pos], got shape {tuple(stack.shape)}")
    n_layers, n = stack.shape[0], stack.shape[-1]
    if n_layers == 0:
        raise ValueError("stack has no layers; pass one rollout matrix per layer")
    target = paths._check_target(target, n)
    spectrum = stack.diagonal(dim1=-2, dim2=-1).clone()  # not a view that keeps the stack alive
    second = _second_diagonal(spectrum)
    # entries above the diagonal within atol are treated as zero (the check above allowed them)
    tau = dobrushin(stack.tril(), atol=atol)
    cumulative = torch.cumprod(tau, 0)
    column, gap = _propagate(stack, n, stack.dtype)  # the stack was checked above
    mass = column[:, target]
    distance = gap.max(-1).values
    depth, extrapolated = _depth_to_first_token(gap[:, target], distance, cumulative, eps)
    repeated = torch.tensor([float(_rate_depth(lam, eps)) for lam in second.tolist()], dtype=torch.float64)
    return SpectralReport(
        spectrum=spectrum,
        second_eigenvalue=second,
        multiplicity=((spectrum - 1).abs() <= unit_atol).sum(-1),
        two_nonzeros=_two_nonzeros(stack, 0.0),
        repeated_layer_depth=repeated,
        dobrushin=tau,
        cumulative_dobrushin=cumulative,
        first_token_mass=mass,
        rank_one_distance=distance,
        depth_to_first_token=depth,
        extrapolated=extrapolated,
        target=target,
        eps=eps,
        metadata=dict(metadata or {}),
    )
