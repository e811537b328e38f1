"""Mix–Compress–Refine phases, the massive range and cross-layer correlations on planted curves."""

from __future__ import annotations

import math

import pytest
import scipy.stats
import torch

from lens_squash.algebra.phases import detect_phases, layer_correlations, massive_layers


def test_detect_phases_finds_planted_valley():
    entropy = torch.tensor([0.9, 0.88, 0.5, 0.3, 0.32, 0.6, 0.85, 0.9])
    # early 0.9, floor 0.3, threshold 0.6: layers 2, 3, 4 are strictly below, layer 5 is not
    assert detect_phases(entropy) == (2, 5)
    assert detect_phases(torch.tensor([0.9, 0.4, 0.2, 0.1])) == (1, 4)  # no refine phase
    assert detect_phases(torch.tensor([0.9, 0.3, 0.9, 0.2, 0.9])) == (3, 4)  # the run around the minimum


def test_detect_phases_returns_none_without_a_valley():
    assert detect_phases(torch.full((10,), 0.8)) is None
    assert detect_phases(0.8 + 0.01 * torch.randn(10)) is None
    assert detect_phases(torch.linspace(0.2, 0.9, 10)) is None  # minimum is the early level itself


# --- correlations ------------------------------------------------------------------------------------


def test_layer_correlations_pairs_and_lengths():
    norm = torch.tensor([1.0, 5.0, 50.0, 40.0, 2.0, 1.5])  # L + 1 residual entries
    entropy = torch.tensor([0.9, 0.7, 0.2, 0.3, 0.8, 0.85])
    rate = torch.tensor([0.0, 0.25, 0.75, 1.0, 0.5])  # L attention layers
    got = layer_correlations({"first_token_norm": norm, "entropy": entropy, "sink_rate": rate})
    assert set(got) == {"first_token_norm vs entropy", "first_token_norm vs sink_rate", "entropy vs sink_rate"}
    assert got["first_token_norm vs entropy"] == pytest.approx(-1.0)
    assert got["first_token_norm vs sink_rate"] == pytest.approx(
        scipy.stats.spearmanr(norm[:5].numpy(), rate.numpy()).statistic, abs=1e-12
    )
    with pytest.raises(ValueError, match="method"):
        layer_correlations({"a": norm, "b": entropy}, method="kendall")


def test_massive_layers_is_the_run_around_the_peak_strictly_above_the_factor():
    ratio = torch.tensor([1.0, 12.0, 3.0, 20.0, 50.0, 10.0, 11.0])
    # peak at 4; 3 and 4 exceed 10, layer 5 equals it (strict), layers 1 and 6 exceed it but not contiguously
    assert massive_layers(ratio) == (3, 5)
    assert massive_layers(ratio, factor=2.0) == (1, 7)  # every layer but 0 exceeds 2
    assert massive_layers(ratio, factor=50.0) is None
    with pytest.raises(ValueError, match="non-empty"):
        massive_layers(torch.tensor([]))


def test_detect_phases_follows_its_parameters():
    entropy = torch.tensor([0.9, 0.5, 0.8, 0.4, 0.45, 0.9])
    # early 0.9, floor 0.4 at layer 3: threshold 0.65 (fraction ½) takes 3–4; 0.85 (fraction 0.9) also 2
    assert detect_phases(entropy) == (3, 5)
    assert detect_phases(entropy, fraction=0.9) == (1, 5)
    # early level over two layers is 0.7, depth 0.3: a min_depth of 0.35 means no valley
    assert detect_phases(entropy, early_layers=2, min_depth=0.35) is None
    for kwargs in ({"early_layers": 0}, {"fraction": 1.0}):
        with pytest.raises(ValueError):
            detect_phases(entropy, **kwargs)


def test_pearson_correlations_equal_numpy():
    a, b = torch.randn(7, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    got = layer_correlations({"a": a, "b": b}, method="pearson")["a vs b"]
    assert got == pytest.approx(float(scipy.stats.pearsonr(a.numpy(), b.numpy()).statistic), abs=1e-12)


def test_a_single_common_layer_has_no_correlation():
    """A one-layer model: attention curves have one entry, residual ones two; a correlation across one layer
    is undefined (NaN, as for a constant curve), where scipy warns and returns NaN too."""
    got = layer_correlations({"first_token_norm": torch.tensor([1.0, 3.0]), "sink_rate": torch.tensor([0.5])})
    assert list(got) == ["first_token_norm vs sink_rate"] and math.isnan(got["first_token_norm vs sink_rate"])
    two = layer_correlations({"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([2.0, 1.0, 7.0])})
    assert two["a vs b"] == pytest.approx(-1.0)  # two common layers: defined
