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
    """Every position carries its own value, so a window of the wrong width (any but 5 of 50) or a
    shifted one changes the three means: the decile bands are exactly positions 0–4, 5–44 and 45–49."""
    profile = torch.arange(50, dtype=torch.float64) ** 2
    shape = u_shape(profile)
    assert shape.first == float(profile[:5].mean()) and shape.middle == float(profile[5:45].mean())
    assert shape.last == float(profile[45:].mean())
    assert (shape.first, shape.middle, shape.last) == (6.0, 29340 / 40, 2211.0)  # Σk² by hand over each band
    assert shape.first_over_middle == shape.first / shape.middle
    odd = u_shape(torch.arange(24, dtype=torch.float64))  # round(2.4) = 2: a band of two at each end
    assert (odd.first, odd.middle, odd.last) == (0.5, 11.5, 22.5)
    flat = torch.ones(50, dtype=torch.float64)
    flat[:5], flat[-5:] = 4.0, 3.0
    assert (u_shape(flat).first_over_middle, u_shape(flat).last_over_middle) == (4.0, 3.0)
    with pytest.raises(ValueError, match="at least 3"):
        u_shape(torch.ones(2))


def test_comparison_top5_overlap_and_ratio_median_by_hand():
    """On 11 positions: the bound's top five {0, 4, 8, 9, 10} share three with the truth's {6, 7, 8, 9,
    10}, and the eleven ratios' median is the sixth smallest."""
    truth = torch.arange(1.0, 12.0, dtype=torch.float64)  # top five: positions 6..10
    bound = truth.clone()
    bound[0], bound[5], bound[6], bound[7] = 100.0, 0.5, 0.75, 0.6  # 0 and 4 join the top five, 6 and 7 leave
    result = compare(bound, truth)
    assert result.top5_overlap == 3 / 5
    ratios = sorted(float(b / t) for b, t in zip(bound, truth, strict=True))
    assert result.ratio_median == ratios[5] == 1.0 and result.ratio_min == 0.6 / 8 and result.ratio_max == 100.0
    scaled = compare(bound * 10, truth)  # a bound ×10 moves every ratio, not the ranks
    assert scaled.ratio_median == 10.0 and scaled.top5_overlap == result.top5_overlap
    even = compare(torch.tensor([1.0, 2.0, 8.0, 4.0]), torch.ones(4))
    assert even.ratio_median == 2.0  # torch's median of an even count is the lower middle value


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
