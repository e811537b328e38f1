"""lens_squash.algebra.ranks: rank statistics against scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from lens_squash.algebra.ranks import kendall, pearson, rank_average, spearman, top_k_overlap

F64 = torch.float64


def test_rank_and_spearman_match_scipy_with_ties():
    a = torch.tensor([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0, 5.0, 3.0, 5.0], dtype=F64)
    b = torch.tensor([2.0, 7.0, 1.0, 8.0, 2.0, 8.0, 1.0, 8.0, 2.0, 8.0, 4.0], dtype=F64)
    np.testing.assert_array_equal(rank_average(a).numpy(), scipy.stats.rankdata(a.numpy()))
    assert spearman(a, b) == pytest.approx(scipy.stats.spearmanr(a.numpy(), b.numpy()).statistic, abs=1e-12)
    assert pearson(a, b) == pytest.approx(scipy.stats.pearsonr(a.numpy(), b.numpy()).statistic, abs=1e-12)
    x = torch.randn(30, dtype=F64)
    assert spearman(x, x.exp()) == pytest.approx(1.0, abs=1e-12)  # invariant to monotone maps
    assert math.isnan(spearman(x, torch.ones(30)))


def test_kendall_and_top_k_overlap_match_scipy_and_sets():
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        a = torch.randint(0, 8, (60,), generator=gen).double()  # many ties
        b = a + torch.randint(0, 4, (60,), generator=gen).double()
        assert kendall(a, b, chunk=7) == pytest.approx(
            scipy.stats.kendalltau(a.numpy(), b.numpy()).statistic, abs=1e-12
        )
    x = torch.arange(10.0)
    assert top_k_overlap(x, x, k=3) == 1.0 and top_k_overlap(x, -x, k=3) == 0.0
    y = x.clone()
    y[9], y[0] = -1.0, 100.0  # top three of y: {0, 8, 7}; of x: {9, 8, 7}
    assert top_k_overlap(x, y, k=3) == 2 / 3 and top_k_overlap(y, x, k=3) == 2 / 3
    assert top_k_overlap(x, y, k=1) == 0.0 and top_k_overlap(x, y, k=4) == 3 / 4  # {9,8,7,6} vs {0,8,7,6}
    for seed in range(20):  # against the set definition on random profiles, every k
        gen = torch.Generator().manual_seed(seed)
        a, b = torch.randn(12, generator=gen, dtype=F64), torch.randn(12, generator=gen, dtype=F64)
        for k in range(1, 13):
            top_a = set(sorted(range(12), key=lambda i: -float(a[i]))[:k])
            top_b = set(sorted(range(12), key=lambda i: -float(b[i]))[:k])
            assert top_k_overlap(a, b, k=k) == len(top_a & top_b) / k
    assert top_k_overlap(x, y, k=50) == 1.0  # k beyond n: every position, so full overlap
