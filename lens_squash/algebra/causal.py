"""Causal attention matrices: the checks, and what Lemmas B.6 and B.7 say about them.

A causal attention matrix ``Λ`` is lower-triangular and row-stochastic (Barbero et al. 2024, App. B.2):

* **Lemma B.6.** The eigenvalues of a triangular matrix are its diagonal, so the spectrum of ``Λ`` is
  ``diag(Λ)`` (:func:`causal_spectrum`) and the largest eigenvalue is 1 (row 0 is always ``e_0``).
  Eigenvalue 1 is simple when every row but the first has at least two non-zero entries
  (:func:`two_nonzeros_condition`). Exactly: its multiplicity is the number of rows that put all their
  mass on themselves (:func:`eigenvalue_one_multiplicity`); the condition is sufficient, not necessary
  (a row ``e_k`` with ``k < j`` has diagonal 0).
* **Lemma B.7.** Products of row-stochastic matrices are row-stochastic, and products of triangular
  row-stochastic matrices are triangular row-stochastic (:func:`product_closure`); so a stack of
  causal layers composes into a causal row-stochastic matrix (its product:
  :func:`lens_squash.algebra.paths.stack_product`).

:mod:`lens_squash.algebra.spectral` builds the Perron–Frobenius and Dobrushin analysis on these.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..core.shapes import SquareMatrix

__all__ = [
    "causal_spectrum",
    "check_causal_stochastic",
    "eigenvalue_one_multiplicity",
    "is_causal",
    "is_row_stochastic",
    "product_closure",
    "two_nonzeros_condition",
]


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


def eigenvalue_one_multiplicity(m: Float[Tensor, "... query_pos key_pos"], atol: float = 1e-9) -> Int[Tensor, "..."]:
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
