"""The verdict's wording follows the numbers and the registry's guarantee: a proxy is never called a bound, and a
registered bound below the truth anywhere opens the verdict as a violation."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from lens_squash.algebra.compare import compare
from lens_squash.experiments.verdict import VIOLATION_MARK, rank_quality, verdict


def _comparisons(truth, **bounds):
    return {name: compare(torch.tensor(b, dtype=torch.float64), truth, variant=name) for name, b in bounds.items()}


TRUTH = torch.tensor([5.0, 1.0, 2.0, 3.0, 4.0, 6.0, 0.5], dtype=torch.float64)


def test_a_bound_below_the_truth_opens_the_verdict_as_a_violation():
    comparisons = _comparisons(TRUTH, certified=(TRUTH * 10).tolist(), tight=(TRUTH * 0.5).tolist())
    text = verdict(comparisons, {"certified": "bound", "tight": "bound"}, n_positions=7)
    assert text.startswith(f"{VIOLATION_MARK}: `tight` is registered as a bound but sits below the truth at 7 of 7")
    assert "`certified` stays above the truth at every position" in text
    assert "`certified` is registered" not in text


def test_a_bound_below_a_truth_it_does_not_cover_is_named_but_not_a_violation():
    """The certified theorem is about the frozen model's spectral norm: below the full model's Jacobian
    (or a Frobenius sketch) it is reported plainly, never as a violation, and never silently."""
    comparisons = _comparisons(TRUTH, certified=(TRUTH * 0.5).tolist())
    text = verdict(comparisons, {"certified": "bound"}, n_positions=7, covered=False)
    assert VIOLATION_MARK not in text
    assert "`certified` bounds the frozen model's spectral norm, not this truth, and sits below it at 7 of 7" in text
    assert verdict(comparisons, {"certified": "bound"}, n_positions=7).startswith(VIOLATION_MARK)


def test_a_proxy_below_the_truth_is_called_a_proxy_never_a_bound():
    comparisons = _comparisons(TRUTH, rollout=(TRUTH / 100).tolist())
    text = verdict(comparisons, {"rollout": "proxy"})
    assert VIOLATION_MARK not in text
    assert "`rollout` sits below the truth, so it is a proxy, not a bound" in text
    assert "the best ranking is the proxy `rollout`" in text


def test_the_numbers_in_the_verdict_are_the_comparisons_own():
    reversed_ = TRUTH.max() - TRUTH + 0.1
    comparisons = _comparisons(TRUTH, good=(TRUTH * 3).tolist(), bad=reversed_.tolist())
    text = verdict(comparisons, {"good": "proxy", "bad": "proxy"})
    rho_bad, rho_good = comparisons["bad"].spearman, comparisons["good"].spearman
    assert rho_good == pytest.approx(1.0) and rho_bad < 0
    assert f"Spearman {rho_bad:.2f}–{rho_good:.2f}" in text
    assert "top-5 overlap" in text and "5/5" in text
    assert "rank positions well" in text  # the best of them ranks like the truth
    assert "the best ranking is the proxy `good`" in text


def test_rank_quality_thresholds_and_missing_inputs():
    assert [rank_quality(r) for r in (0.9, 0.6, 0.1)] == ["well", "moderately", "poorly"]
    assert "unmeasurably" in rank_quality(math.nan)
    assert "No Jacobian" in verdict({}, {})
    with pytest.raises(ValueError, match="no guarantee"):
        verdict({"x": SimpleNamespace(spearman=0.5, top5_overlap=0.2, violations=0, ratio_min=1.0)}, {})
