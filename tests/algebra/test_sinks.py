"""Attention sinks, mixing, rollout mass and Dobrushin, and the SinkReport, against constructions and naive loops."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from lens_squash.algebra.attention_stream import summarize_attention
from lens_squash.algebra.paths import rollout_matrices
from lens_squash.algebra.phases import sink_layer_links
from lens_squash.algebra.sinks import (
    SINK_EPS,
    SINK_EPS_STRICT,
    first_token_attention,
    key_importance,
    mixing_score,
    rollout_dobrushin,
    rollout_mass,
    sink_rate,
    sink_report,
)
from lens_squash.algebra.spectral import first_token_column

from ..reference import assert_json_carries

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


def test_planted_patterns_hold_exactly_the_planted_rows():
    # every other test trusts this construction: check each entry, not just that rows sum to 1
    weights = [[0.9, 0.5, 0.1], [0.0, 1.0, 0.3]]
    n = 7
    pat = planted_sinks(weights, n)
    for layer, head in [(l, h) for l in range(2) for h in range(3)]:
        w = weights[layer][head]
        assert pat[layer, head, 0].tolist() == [1.0] + [0.0] * (n - 1)
        for q in range(1, n):
            row = [w] + [(1 - w) / q] * q + [0.0] * (n - 1 - q)
            assert pat[layer, head, q].tolist() == pytest.approx(row, abs=1e-15)


def test_first_token_attention_equals_a_loop_over_queries():
    pat = random_causal_patterns(layers=3, heads=2, n=8)
    for include, first in [(False, 1), (True, 0)]:
        naive = torch.zeros(3, 2, dtype=F64)
        for layer in range(3):
            for head in range(2):
                naive[layer, head] = sum(pat[layer, head, q, 0] for q in range(first, 8)) / (8 - first)
        torch.testing.assert_close(first_token_attention(pat, include_first_query=include), naive, atol=1e-15, rtol=0)


def test_first_token_attention_recovers_planted_weights_and_query0_convention():
    weights = torch.tensor([[0.9, 0.5, 0.1], [0.3, 0.8, 0.0]], dtype=F64)
    n = 10
    pat = planted_sinks(weights, n)
    torch.testing.assert_close(first_token_attention(pat), weights, atol=1e-15, rtol=0)
    # including query 0 adds its forced self-attention: (1 + (n - 1) w) / n
    torch.testing.assert_close(first_token_attention(pat, include_first_query=True), (1 + (n - 1) * weights) / n)


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
    torch.testing.assert_close(key_importance(pat)[..., 0], first_token_attention(pat, include_first_query=True))


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
        first_token_attention(torch.rand(3, 4, 4))


# --- the report --------------------------------------------------------------------------------------


def report_of(patterns: torch.Tensor, resid_norms: torch.Tensor, **kwargs):
    """The one builder, fed the stack's per-layer summary (its layers streamed through AttentionStream)."""
    return sink_report(summarize_attention(patterns, spectral_atol=None), resid_norms, **kwargs)


def test_the_reports_curves_are_the_pure_functions_of_the_patterns():
    """The summary's per-layer accumulators against the whole-stack functions, computed independently."""
    pat = random_causal_patterns(layers=5, heads=3, n=11)
    pat[2, 1, 1:, 0] = 0.9  # one planted sink head (rows renormalised below)
    pat[2, 1, 1:, 1:] *= 0.1 / pat[2, 1, 1:, 1:].sum(-1, keepdim=True)
    pat[2, 1].tril_()
    report = report_of(pat, torch.rand(6, 11, dtype=F64) + 1)
    heads = first_token_attention(pat)
    torch.testing.assert_close(report.mean_first_token_attention, heads.mean(-1), atol=1e-15, rtol=0)
    rate = sink_rate(pat, SINK_EPS)
    assert torch.equal(report.sink_rate, rate.per_layer) and report.sink_rate_overall == rate.overall
    assert rate.per_layer[2] > 0  # the planted head counts
    torch.testing.assert_close(report.mixing, mixing_score(pat), atol=1e-14, rtol=0)
    torch.testing.assert_close(report.rollout_mass, rollout_mass(pat), atol=1e-15, rtol=0)
    torch.testing.assert_close(report.dobrushin, rollout_dobrushin(pat), atol=1e-14, rtol=0)
    with pytest.raises(ValueError, match="at least 2"):
        report_of(pat[..., :1, :1], torch.ones(6, 1, dtype=F64))


def test_sink_report_on_a_planted_compression_valley():
    n, d = 12, 16
    massive = torch.tensor([1.0, 1.0, 50.0, 80.0, 60.0, 1.0, 1.0])  # L + 1 = 7 residual streams
    reps = torch.randn(7, n, d, dtype=F64)
    reps[:, 0, 3] += massive.to(F64)
    sink_weights = torch.tensor([0.1, 0.2, 0.9, 0.9, 0.9, 0.2])[:, None].expand(6, 4)
    report = report_of(planted_sinks(sink_weights, n), reps.norm(dim=-1), representations=reps)
    assert report.phases == (2, 5)
    assert report.massive_range == (2, 5)
    assert report.sink_rate.tolist() == [0, 0, 1, 1, 1, 0]
    assert report.correlations["first_token_norm vs entropy"] < -0.5
    assert report.correlations["first_token_norm vs sink_rate"] > 0.5
    torch.testing.assert_close(report.mean_first_token_attention, sink_weights[:, 0].to(F64))
    assert_json_carries(report)  # every curve, the phases and the correlations, by value
    assert "SinkReport" in report._repr_html_()
    with pytest.raises(ValueError, match="resid_norms"):
        report_of(planted_sinks(sink_weights, n), reps.norm(dim=-1)[:3])


def test_report_describes_phases_massive_range_and_undefined_correlations_in_words():
    n, d = 12, 16
    massive = torch.tensor([1.0, 1.0, 50.0, 80.0, 60.0, 1.0, 1.0])
    reps = torch.randn(7, n, d, dtype=F64)
    reps[:, 0, 3] += massive.to(F64)
    sink_weights = torch.tensor([0.1, 0.2, 0.9, 0.9, 0.9, 0.2])[:, None].expand(6, 4)
    report = report_of(planted_sinks(sink_weights, n), reps.norm(dim=-1), representations=reps)
    assert report.phases == (2, 5)  # the planted valley, in words with inclusive ends
    assert report.phase_text() == "residual streams: mix 0–1, compress 2–4, refine 5–6"
    peak = int(report.norm_ratio.argmax())
    assert report.massive_text().startswith("massive first-token activation in residual streams 2–4")
    assert f"at {peak})" in report.massive_text()
    # a constant sink-rate curve (no sinks at all) makes its correlations undefined: said, not "nan"
    flat = report_of(planted_sinks(torch.full((6, 4), 0.05), n), torch.ones(7, n, dtype=F64), representations=reps)
    assert flat.massive_range is None and flat.massive_text().startswith("no massive activation")
    undefined = [name for name, v in flat.correlations.items() if math.isnan(v)]
    assert undefined, "the flat curves should make some correlation undefined"
    lines = flat.correlation_lines()
    assert len(lines) == len(flat.correlations) and not any("nan" in line for line in lines)
    assert sum("undefined (one of the curves is constant" in line for line in lines) == len(undefined)
    assert "nan" not in flat._repr_html_() and "None" not in flat._repr_html_()
    assert_json_carries(flat)  # the undefined correlations are stored as NaN (null or "nan"), the rest by value


def test_phase_text_for_a_valley_at_either_end_and_none():
    report = report_of(planted_sinks(torch.full((3, 2), 0.5), 6), torch.ones(4, 6, dtype=F64))
    assert report.phases is None and report.phase_text().startswith("no compression valley")
    shaped = dataclasses.replace(report, entropy=torch.ones(4, dtype=F64), phases=(0, 4))
    assert shaped.phase_text() == (
        "residual streams: no mix phase, compress 0–3, no refine phase (the valley reaches the output)"
    )


# --- links to over-squashing -------------------------------------------------------------------------


def naive_dobrushin(p: torch.Tensor) -> float:
    n = p.shape[0]
    return max(0.5 * float((p[j] - p[k]).abs().sum()) for j in range(n) for k in range(n))


def test_rollout_mass_equals_the_explicit_matrix_product():
    pat = random_causal_patterns(layers=4, heads=3, n=8)
    stack = 0.5 * (pat.mean(1) + torch.eye(8, dtype=F64))
    mass = rollout_mass(pat)
    for depth in range(4):
        product = torch.eye(8, dtype=F64)
        for layer in range(depth + 1):
            product = stack[layer] @ product  # Λ̃^(depth) … Λ̃^(0)
        assert mass[depth].item() == pytest.approx(product[-1, 0].item(), abs=1e-15)
    torch.testing.assert_close(mass, first_token_column(rollout_matrices(pat.mean(1)))[:, -1], atol=1e-15, rtol=0)
    # a perfect sink in every head sends all of the last token's mass to token 0 as depth grows
    full_sinks = rollout_mass(planted_sinks([[1.0, 1.0]] * 20, 6))
    assert (full_sinks.diff() > 0).all() and full_sinks[-1] > 1 - 1e-5


def test_rollout_dobrushin_equals_pairwise_definition_and_the_weakest_sink():
    pat = random_causal_patterns(layers=3, heads=2, n=9)
    stack = 0.5 * (pat.mean(1) + torch.eye(9, dtype=F64))
    tau = rollout_dobrushin(pat)
    expected = torch.tensor([naive_dobrushin(p) for p in stack], dtype=F64)
    torch.testing.assert_close(tau, expected, atol=1e-14, rtol=0)
    torch.testing.assert_close(tau, 1 - 0.5 * pat.mean(1)[:, 1:, 0].min(-1).values, atol=1e-15, rtol=0)
    assert (tau >= 0.5 - 1e-15).all()  # lazy: row j keeps ½ on j, where every earlier row is 0
    # float32 rows sum to 1 only within rounding: still the pairwise value, to float32 precision
    tau32 = rollout_dobrushin(pat.float())
    torch.testing.assert_close(tau32, expected, atol=1e-6, rtol=0)


def test_sink_layer_links_groups_layers_by_sink_rate():
    rate = torch.tensor([0.0, 1.0, 0.75, 0.25])
    tau = torch.tensor([0.9, 0.6, 0.5, 0.8], dtype=F64)
    mass = torch.tensor([0.1, 0.5, 0.8, 0.85], dtype=F64)  # gains 0.1, 0.4, 0.3, 0.05
    links = sink_layer_links(rate, tau, mass)
    assert links["n sink layers"] == 2
    assert links["dobrushin | sink layers"] == pytest.approx(0.55)
    assert links["dobrushin | other layers"] == pytest.approx(0.85)
    assert links["rollout mass gain | sink layers"] == pytest.approx(0.35)
    assert links["rollout mass gain | other layers"] == pytest.approx(0.075)
    assert math.isnan(sink_layer_links(torch.zeros(4), tau, mass)["dobrushin | sink layers"])


def test_sink_report_links_sink_layers_to_over_squashing():
    n, layers = 10, 6
    sink_weights = torch.tensor([0.05, 0.05, 0.95, 0.95, 0.95, 0.05])[:, None].expand(layers, 3)
    pat = planted_sinks(sink_weights, n)
    norms = torch.rand(layers + 1, n, dtype=F64) + 1.0
    report = report_of(pat, norms)
    torch.testing.assert_close(report.rollout_mass, rollout_mass(pat))
    torch.testing.assert_close(report.dobrushin, rollout_dobrushin(pat))
    # sink layers pull the last token's rollout mass onto token 0 and contract less (rows agree on token 0)
    assert report.links["rollout mass gain | sink layers"] > report.links["rollout mass gain | other layers"]
    assert report.links["dobrushin | sink layers"] < report.links["dobrushin | other layers"]
    assert report.correlations["sink_rate vs dobrushin"] < 0
    assert report.entropy is None and report.top_dims is None
    # the planted layers make the sink-rate curve 0/1 valued; every value, NaN as null, survives JSON
    loaded = assert_json_carries(report)
    assert loaded["links"]["n sink layers"] == 3.0 and loaded["entropy"] is None
    assert report_of(pat, norms, over_squashing=False).dobrushin is None
