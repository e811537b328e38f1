"""Quadratic forms from a symmetric matrix's lower block columns equal the dense form."""

from __future__ import annotations

import pytest
import torch

from lens_squash.algebra.symmetric_forms import LowerBlocks, lower_blocks, lower_blocks_from_dense, quadratic_form

F64 = torch.float64


def _psd(size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(size + 3, size, generator=g, dtype=F64)
    return w.T @ w


@pytest.mark.parametrize("size, n_blocks", [(1, 8), (3, 8), (7, 8), (17, 8), (64, 8), (100, 3), (50, 1), (9, 16)])
def test_the_blocked_form_equals_the_dense_one(size, n_blocks):
    gram = _psd(size, seed=size)
    coeff = torch.randn(13, size, generator=torch.Generator().manual_seed(1), dtype=F64)
    dense = torch.einsum("pa,ab,pb->p", coeff, gram, coeff)
    blocked = quadratic_form(coeff, lower_blocks_from_dense(gram, n_blocks=n_blocks))
    torch.testing.assert_close(blocked, dense, rtol=1e-12, atol=0)


def test_only_the_lower_triangle_is_read_and_stored_at_about_half_the_bytes():
    gram = _psd(96, seed=0)
    poisoned = gram.clone()
    upper = torch.ones(96, 96, dtype=torch.bool).triu(1)
    poisoned[upper] = float("nan")  # blocks on and below the diagonal, never the strict upper ones
    blocks = lower_blocks_from_dense(gram, n_blocks=8)
    coeff = torch.randn(4, 96, dtype=F64)
    # the diagonal blocks hold their own upper halves, so poison only whole blocks above them
    for start, stop in zip(blocks.starts[:-1], blocks.starts[1:], strict=True):
        poisoned[start:stop, start:stop] = gram[start:stop, start:stop]
    torch.testing.assert_close(
        quadratic_form(coeff, lower_blocks_from_dense(poisoned)), quadratic_form(coeff, blocks), rtol=0, atol=0
    )
    assert blocks.nbytes == sum(12 * (96 - 12 * i) for i in range(8)) * 8  # (B + 1)/2B of 96² doubles
    assert blocks.nbytes / gram.nbytes == pytest.approx(9 / 16)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="square"):
        lower_blocks_from_dense(torch.zeros(3, 4, dtype=F64))
    with pytest.raises(ValueError, match=r"\[pos, 5\]"):
        quadratic_form(torch.zeros(2, 4, dtype=F64), lower_blocks_from_dense(torch.eye(5, dtype=F64)))
    with pytest.raises(ValueError, match="not"):
        lower_blocks(4, lambda start, stop: torch.zeros(1, 1, dtype=F64))
    assert isinstance(lower_blocks_from_dense(torch.eye(2, dtype=F64)), LowerBlocks)
