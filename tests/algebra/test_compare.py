"""lens_squash.algebra.compare: the comparison measures against direct definitions."""

from __future__ import annotations

import pytest
import scipy.stats
import torch

from lens_squash.algebra.compare import compare, compare_variants, u_shape


def test_compare_against_scipy_and_direct_counts():
    gen = torch.Generator().manual_seed(0)
    truth = torch.rand(40, generator=gen, dtype=torch.float64) + 0.1
    bound = truth * (1 + torch.rand(40, generator=gen, dtype=torch.float64))
    bound[[3, 17]] = truth[[3, 17]] * 0.5  # two planted violations
    result = compare(bound, truth, guaranteed=True)
    assert result.spearman == pytest.approx(scipy.stats.spearmanr(bound, truth).statistic, abs=1e-12)
    assert result.kendall == pytest.approx(scipy.stats.kendalltau(bound, truth).statistic, abs=1e-12)
    assert result.violations == 2
    ratio = bound / truth
    assert result.ratio_min == pytest.approx(float(ratio.min())) and result.ratio_max == pytest.approx(
        float(ratio.max())
    )


def test_u_shape_on_a_planted_profile():
    profile = torch.ones(50, dtype=torch.float64)
    profile[:5], profile[-5:] = 4.0, 3.0
    shape = u_shape(profile)
    assert (shape.first_over_middle, shape.last_over_middle) == (4.0, 3.0)
    with pytest.raises(ValueError, match="at least 3"):
        u_shape(torch.ones(2))


def test_compare_variants_table_and_guarantees():
    truth = torch.tensor([3.0, 1.0, 2.0, 5.0])
    table, summary = compare_variants(
        {"exact_copy": truth.clone(), "low": truth / 2}, truth, str_tokens=("a", "b", "c", "d"), guaranteed={"low"}
    )
    assert list(table.columns) == ["position", "token", "jacobian_spectral", "exact_copy", "low"]
    assert summary["exact_copy"].spearman == pytest.approx(1.0) and summary["exact_copy"].violations == 0
    assert summary["low"].guaranteed and summary["low"].violations == 4 and not summary["exact_copy"].guaranteed
    with pytest.raises(ValueError, match="same positions"):
        compare(torch.ones(3), torch.ones(4))
