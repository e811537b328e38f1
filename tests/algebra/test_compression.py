"""Matrix entropy and anisotropy: isotropic and rank-one constructions, numpy's SVD, rotation invariance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lens_squash.algebra.compression import (
    anisotropy,
    compression_curves,
    matrix_entropy,
    squared_singular_values,
)

F64 = torch.float64


@pytest.mark.parametrize("n, d", [(6, 10), (10, 10), (40, 8)])
def test_entropy_is_one_for_isotropic_and_zero_for_rank_one(n, d):
    if n <= d:  # orthogonal rows of equal norm
        iso = 3.0 * torch.linalg.qr(torch.randn(d, d, dtype=F64)).Q[:n]
    else:  # XᵀX ∝ I: stacked copies of a rotated identity, with a tail of whole copies
        q = torch.linalg.qr(torch.randn(d, d, dtype=F64)).Q
        iso = q.repeat(n // d, 1)
    torch.testing.assert_close(matrix_entropy(iso), torch.tensor(1.0, dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close(anisotropy(iso), torch.tensor(1 / min(n, d), dtype=F64), atol=1e-12, rtol=0)
    rank_one = torch.outer(torch.randn(n, dtype=F64), torch.randn(d, dtype=F64))
    assert matrix_entropy(rank_one).abs() < 1e-10
    torch.testing.assert_close(anisotropy(rank_one), torch.tensor(1.0, dtype=F64), atol=1e-12, rtol=0)


def test_svd_path_equals_gram_path():
    for shape in [(3, 40, 8), (3, 5, 8)]:  # n > d (the Gram path's use) and n < d (zero padding)
        x = torch.randn(*shape, dtype=F64) * torch.tensor([1.0, 10.0, 0.1], dtype=F64)[:, None, None]
        torch.testing.assert_close(
            squared_singular_values(x, method="gram"), squared_singular_values(x, method="svd"), atol=1e-10, rtol=1e-10
        )
        torch.testing.assert_close(
            matrix_entropy(x, method="gram"), matrix_entropy(x, method="svd"), atol=1e-12, rtol=0
        )


def test_entropy_matches_numpy_recomputation_and_is_rotation_invariant():
    x = torch.randn(4, 20, 12, dtype=F64)
    x[:, 0] *= 25.0  # a massive first token
    expected = []
    for layer in x.numpy():
        s2 = np.linalg.svd(layer, compute_uv=False) ** 2
        p = s2 / s2.sum()
        expected.append(-(p * np.log(p)).sum() / np.log(12))
    torch.testing.assert_close(matrix_entropy(x), torch.tensor(expected, dtype=F64), atol=1e-12, rtol=0)
    rot = torch.linalg.qr(torch.randn(12, 12, dtype=F64)).Q
    torch.testing.assert_close(matrix_entropy(x @ rot), matrix_entropy(x), atol=1e-12, rtol=0)
    assert (matrix_entropy(x) < matrix_entropy(torch.randn(4, 20, 12, dtype=F64))).all()


def test_entropy_errors_on_zero_matrix():
    with pytest.raises(ValueError, match="all zeros"):
        matrix_entropy(torch.zeros(5, 3))


def test_compression_curves_share_one_spectrum_with_the_two_public_functions():
    x = torch.randn(3, 9, 5, dtype=F64) * torch.tensor([1.0, 4.0, 0.2], dtype=F64)[:, None, None]
    x[1, 0] *= 30.0  # one layer dominated by a massive token: low entropy, high anisotropy
    entropy, aniso = compression_curves(x)
    torch.testing.assert_close(entropy, matrix_entropy(x), atol=1e-14, rtol=0)
    torch.testing.assert_close(aniso, anisotropy(x), atol=1e-14, rtol=0)
    assert entropy[1] < entropy[0] and aniso[1] > aniso[0]
    assert matrix_entropy(torch.randn(1, 7, dtype=F64)) == 0  # a single row is rank one
    with pytest.raises(ValueError, match="method"):
        squared_singular_values(x, method="qr")
