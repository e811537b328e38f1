"""Compression of a representation matrix: its singular spectrum, matrix entropy and anisotropy.

Queipo-de-Llano, Arroyo, Barbero et al. ("Attention Sinks and Compression Valleys in LLMs are Two
Sides of the Same Coin") find *compression valleys*: middle layers where the token representations
``X[pos, d_model]`` (not centred) collapse onto few directions. With singular values ``σ_j`` of
``X``, ``p_j = σ_j² / ‖X‖_F²``:

* matrix entropy ``H = -Σ p_j log p_j / log min(n, d)``: 1 for isotropic data, 0 for rank one;
* anisotropy ``σ_1² / ‖X‖_F²``: the share of energy in the top direction.

The spectrum comes from the SVD of the ``n × d`` matrix, or from the eigenvalues of the smaller Gram
matrix when ``n > d`` (cheaper; float64; tiny negative eigenvalues from rounding are clamped to 0).
Every function takes one ``[pos, d_model]`` matrix or a ``[layer, pos, d_model]`` stack.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["anisotropy", "compression_curves", "matrix_entropy", "squared_singular_values"]

_F64 = torch.float64
Method = Literal["auto", "svd", "gram"]


def _check_matrix_stack(x: Tensor, name: str) -> Tensor:
    """``x`` as it is (converted to float64 one matrix at a time where it is used: a long prompt's
    ``[layers_covered, pos, d_model]`` stack in float64 is 1.2 GB for SmolLM2 at n = 8192)."""
    x = torch.as_tensor(x)
    if x.ndim not in (2, 3):
        raise ValueError(f"{name} must be [pos, d_model] or [layer, pos, d_model], got {tuple(x.shape)}")
    return x


def squared_singular_values(
    x: Float[Tensor, "*layer pos d_model"],
    *,
    method: Method = "auto",
) -> Float[Tensor, "*layer rank"]:
    """``σ_j²`` of each ``[pos, d_model]`` matrix, descending, in float64.

    ``"gram"`` uses the eigenvalues of the smaller Gram matrix (``XᵀX``, ``d × d``, when ``n ≥ d``;
    ``XXᵀ``, ``n × n``, otherwise: same non-zero spectrum); ``"svd"`` uses ``svdvals(X)``; ``"auto"``
    picks Gram when ``n > d`` (there it is several times cheaper than the SVD of the tall matrix).
    """
    x = _check_matrix_stack(x, "x")
    if method not in ("auto", "svd", "gram"):
        raise ValueError(f"method must be 'auto', 'svd' or 'gram', got {method!r}")
    if x.ndim == 3:
        return torch.stack([_squared_singular_values(matrix.to(_F64), method) for matrix in x])
    return _squared_singular_values(x.to(_F64), method)


def _squared_singular_values(x: Float[Tensor, "pos d_model"], method: Method) -> Float[Tensor, "rank"]:
    n, d = x.shape
    if method == "auto":
        method = "gram" if n > d else "svd"
    if method == "svd":
        return torch.linalg.svdvals(x) ** 2
    gram = x.T @ x if n >= d else x @ x.T
    eig = torch.linalg.eigvalsh(gram).clamp_min(0.0)  # rounding gives tiny negatives
    return eig.flip(-1)[: min(n, d)]


def _spectrum_distribution(x: Tensor, method: Method) -> Tensor:
    s2 = squared_singular_values(x, method=method)
    total = s2.sum(-1, keepdim=True)
    if (total == 0).any():
        raise ValueError("a representation matrix is all zeros: its spectrum (and entropy) is undefined")
    return s2 / total


def _entropy(p: Tensor, rank_bound: int, *, normalize: bool) -> Tensor:
    h = -(p * p.clamp_min(1e-300).log()).sum(-1)  # 0 · log 0 = 0
    if not normalize:
        return h
    return h / math.log(rank_bound) if rank_bound > 1 else torch.zeros_like(h)


def matrix_entropy(
    x: Float[Tensor, "*layer pos d_model"],
    *,
    normalize: bool = True,
    method: Method = "auto",
) -> Float[Tensor, "*layer"]:
    """``-Σ p_j log p_j`` with ``p_j = σ_j²/‖X‖_F²``, divided by ``log min(n, d)`` when normalising.

    A single row or column (``min(n, d) = 1``) is rank one: its normalised entropy is defined as 0.
    """
    return _entropy(_spectrum_distribution(x, method), min(x.shape[-2:]), normalize=normalize)


def anisotropy(
    x: Float[Tensor, "*layer pos d_model"],
    *,
    method: Method = "auto",
) -> Float[Tensor, "*layer"]:
    """``σ_1² / ‖X‖_F²``: the share of energy in the top direction (1 for rank one)."""
    return _spectrum_distribution(x, method)[..., 0]


def compression_curves(
    x: Float[Tensor, "*layer pos d_model"],
    *,
    method: Method = "auto",
) -> tuple[Float[Tensor, "*layer"], Float[Tensor, "*layer"]]:
    """Normalised :func:`matrix_entropy` and :func:`anisotropy` from ONE spectrum per matrix."""
    x = _check_matrix_stack(x, "x")
    p = _spectrum_distribution(x, method)
    return _entropy(p, min(x.shape[-2:]), normalize=True), p[..., 0]
