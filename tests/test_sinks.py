"""Sink, massive-activation, compression and phase metrics against constructions and naive loops."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.stats
import torch

from lens_squash.sinks import (
    SINK_EPS,
    SINK_EPS_STRICT,
    anisotropy,
    detect_phases,
    first_token_mass,
    key_importance,
    layer_correlations,
    massive_activations,
    massive_layers,
    matrix_entropy,
    mixing_score,
    sink_rate,
    sink_report,
    squared_singular_values,
)

F64 = torch.float64


def planted_sinks(weights, n: int) -> torch.Tensor:
    """Causal patterns where head (l, h) puts exactly ``weights[l][h]`` on token 0 from every query
    q ≥ 1 and spreads the rest uniformly over keys 1 … q."""
    w = torch.as_tensor(weights, dtype=F64)[..., None]  # [layer, head, 1]
    pat = torch.zeros(*w.shape[:2], n, n, dtype=F64)
    pat[..., 0, 0] = 1.0
    for q in range(1, n):
        pat[..., q, 0] = w[..., 0]
        pat[..., q, 1 : q + 1] = (1 - w) / q
    return pat


def random_causal_patterns(layers=2, heads=3, n=9) -> torch.Tensor:
    scores = torch.randn(layers, heads, n, n, dtype=F64)
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    return torch.softmax(scores.masked_fill(~mask, -math.inf), -1)


# --- sinks -------------------------------------------------------------------------------------------


def test_planted_patterns_are_causal_and_row_stochastic():
    pat = planted_sinks([[0.9, 0.5, 0.1]], n=7)
    torch.testing.assert_close(pat.sum(-1), torch.ones(1, 3, 7, dtype=F64))
    assert (pat.triu(1) == 0).all()


def test_first_token_mass_recovers_planted_weights_and_query0_convention():
    weights = torch.tensor([[0.9, 0.5, 0.1], [0.3, 0.8, 0.0]], dtype=F64)
    n = 10
    pat = planted_sinks(weights, n)
    torch.testing.assert_close(first_token_mass(pat), weights, atol=1e-15, rtol=0)
    # including query 0 adds its forced self-attention: (1 + (n - 1) w) / n
    torch.testing.assert_close(first_token_mass(pat, include_first_query=True), (1 + (n - 1) * weights) / n)


def test_sink_rate_is_exact_on_planted_heads():
    weights = [[0.9, 0.5, 0.1, 0.1], [0.9, 0.9, 0.5, 0.1], [0.1, 0.1, 0.1, 0.1]]
    pat = planted_sinks(weights, n=8)
    loose, strict = sink_rate(pat, SINK_EPS), sink_rate(pat, SINK_EPS_STRICT)
    assert loose.per_layer.tolist() == [2 / 4, 3 / 4, 0.0] and loose.overall == 5 / 12
    assert strict.per_layer.tolist() == [1 / 4, 2 / 4, 0.0] and strict.overall == 3 / 12
    assert strict.is_sink.dtype == torch.bool and strict.is_sink[1, :2].all()
    assert "sink rate" in loose._repr_html_()
    with pytest.raises(ValueError, match="eps"):
        sink_rate(pat, 1.5)


def test_key_importance_equals_naive_double_loop():
    pat = random_causal_patterns()
    layers, heads, n, _ = pat.shape
    naive = torch.zeros(layers, heads, n, dtype=F64)
    for k in range(n):
        for i in range(k, n):
            naive[..., k] += pat[..., i, k]
        naive[..., k] /= n - k
    torch.testing.assert_close(key_importance(pat), naive, atol=1e-15, rtol=1e-12)
    torch.testing.assert_close(key_importance(pat)[..., 0], first_token_mass(pat, include_first_query=True))


def test_mixing_score_extremes_and_naive_entropy():
    n = 9
    uniform = torch.ones(n, n, dtype=F64).tril()
    uniform = (uniform / uniform.sum(-1, keepdim=True)).expand(2, 3, n, n)
    torch.testing.assert_close(mixing_score(uniform), torch.ones(2, dtype=F64))
    torch.testing.assert_close(mixing_score(planted_sinks([[1.0, 1.0]], n)), torch.zeros(1, dtype=F64))
    pat = random_causal_patterns(n=n)
    naive = torch.zeros(pat.shape[0], dtype=F64)
    for layer in range(pat.shape[0]):
        rows = [-(r[r > 0] * r[r > 0].log()).sum() for h in range(pat.shape[1]) for r in pat[layer, h, 1:]]
        naive[layer] = torch.stack(rows).mean()
    torch.testing.assert_close(mixing_score(pat, normalize=False), naive, atol=1e-14, rtol=1e-12)


def test_pattern_shape_errors():
    with pytest.raises(ValueError, match="layer, head, query_pos, key_pos"):
        first_token_mass(torch.rand(3, 4, 4))


# --- massive activations -----------------------------------------------------------------------------


def test_massive_activations_ratio_and_top_dims():
    norms = torch.rand(4, 11, dtype=F64) + 1.0
    norms[:, 0] = torch.tensor([1.0, 40.0, 90.0, 2.0], dtype=F64)
    first = torch.randn(4, 32, dtype=F64)
    res = massive_activations(norms, first, k=3)
    for layer in range(4):
        med = float(np.median(norms[layer, 1:].numpy()))  # 10 others: the mean of the two middle values
        assert res.ratio[layer].item() == pytest.approx(norms[layer, 0].item() / med, rel=1e-14)
        order = np.argsort(-np.abs(first[layer].numpy()))[:3]
        assert res.top_dims[layer].tolist() == order.tolist()
        assert res.top_values[layer].tolist() == first[layer, order].tolist()
    assert massive_layers(res.ratio, factor=10.0) == (1, 3)
    assert massive_layers(res.ratio, factor=100.0) is None
    assert "massive" in res._repr_html_()


# --- compression -------------------------------------------------------------------------------------


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
        torch.testing.assert_close(matrix_entropy(x, method="gram"), matrix_entropy(x, method="svd"), atol=1e-12, rtol=0)


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


# --- phases ------------------------------------------------------------------------------------------


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


# --- the report --------------------------------------------------------------------------------------


def test_sink_report_on_a_planted_compression_valley():
    n, d = 12, 16
    massive = torch.tensor([1.0, 1.0, 50.0, 80.0, 60.0, 1.0, 1.0])  # L + 1 = 7 residual streams
    reps = torch.randn(7, n, d, dtype=F64)
    reps[:, 0, 3] += massive.to(F64)
    sink_weights = torch.tensor([0.1, 0.2, 0.9, 0.9, 0.9, 0.2])[:, None].expand(6, 4)
    report = sink_report(planted_sinks(sink_weights, n), reps.norm(dim=-1), representations=reps)
    assert report.phases == (2, 5)
    assert report.massive_range == (2, 5)
    assert report.sink_rate.tolist() == [0, 0, 1, 1, 1, 0]
    assert report.correlations["first_token_norm vs entropy"] < -0.5
    assert report.correlations["first_token_norm vs sink_rate"] > 0.5
    torch.testing.assert_close(report.first_token_mass, sink_weights[:, 0].to(F64))
    json.dumps(report.to_dict(), allow_nan=False)
    assert "SinkReport" in report._repr_html_()
    with pytest.raises(ValueError, match="resid_norms"):
        sink_report(planted_sinks(sink_weights, n), reps.norm(dim=-1)[:3])
