"""Sink, massive-activation, compression and phase metrics against constructions and naive loops."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import scipy.stats
import torch

from lens_squash.experiments.ablation import ablation_effect, clamp_hooks, clamp_massive_activation
from lens_squash.edge.models import format_prompt
from lens_squash.algebra.sinks import (
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
    rollout_dobrushin,
    rollout_first_token_mass,
    sink_analysis,
    sink_layer_links,
    sink_rate,
    sink_report,
    sink_report_from_trace,
    squared_singular_values,
)
from lens_squash.algebra.spectral import first_token_column, lazy

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


def test_report_describes_phases_massive_range_and_undefined_correlations_in_words():
    n, d = 12, 16
    massive = torch.tensor([1.0, 1.0, 50.0, 80.0, 60.0, 1.0, 1.0])
    reps = torch.randn(7, n, d, dtype=F64)
    reps[:, 0, 3] += massive.to(F64)
    sink_weights = torch.tensor([0.1, 0.2, 0.9, 0.9, 0.9, 0.2])[:, None].expand(6, 4)
    report = sink_report(planted_sinks(sink_weights, n), reps.norm(dim=-1), representations=reps)
    assert report.phases == (2, 5)  # the planted valley, in words with inclusive ends
    assert report.phase_text() == "residual streams: mix 0–1, compress 2–4, refine 5–6"
    peak = int(report.norm_ratio.argmax())
    assert report.massive_text().startswith("massive first-token activation in residual streams 2–4")
    assert f"at {peak})" in report.massive_text()
    # a constant sink-rate curve (no sinks at all) makes its correlations undefined: said, not "nan"
    flat = sink_report(planted_sinks(torch.full((6, 4), 0.05), n), torch.ones(7, n, dtype=F64), representations=reps)
    assert flat.massive_range is None and flat.massive_text().startswith("no massive activation")
    undefined = [name for name, v in flat.correlations.items() if math.isnan(v)]
    assert undefined, "the flat curves should make some correlation undefined"
    lines = flat.correlation_lines()
    assert len(lines) == len(flat.correlations) and not any("nan" in line for line in lines)
    assert sum("undefined (one of the curves is constant" in line for line in lines) == len(undefined)
    assert "nan" not in flat._repr_html_() and "None" not in flat._repr_html_()


def test_phase_text_for_a_valley_at_either_end_and_none():
    report = sink_report(planted_sinks(torch.full((3, 2), 0.5), 6), torch.ones(4, 6, dtype=F64))
    assert report.phases is None and report.phase_text().startswith("no compression valley")
    shaped = dataclasses.replace(report, entropy=torch.ones(4, dtype=F64), phases=(0, 4))
    assert shaped.phase_text() == ("residual streams: no mix phase, compress 0–3, no refine phase "
                                   "(the valley reaches the output)")


# --- links to over-squashing -------------------------------------------------------------------------


def naive_dobrushin(p: torch.Tensor) -> float:
    n = p.shape[0]
    return max(0.5 * float((p[j] - p[k]).abs().sum()) for j in range(n) for k in range(n))


def test_rollout_first_token_mass_equals_the_explicit_matrix_product():
    pat = random_causal_patterns(layers=4, heads=3, n=8)
    stack = 0.5 * (pat.mean(1) + torch.eye(8, dtype=F64))
    mass = rollout_first_token_mass(pat)
    for depth in range(4):
        product = torch.eye(8, dtype=F64)
        for layer in range(depth + 1):
            product = stack[layer] @ product  # Λ̃^(depth) … Λ̃^(0)
        assert mass[depth].item() == pytest.approx(product[-1, 0].item(), abs=1e-15)
    torch.testing.assert_close(mass, first_token_column(lazy(pat.mean(1)))[:, -1], atol=1e-15, rtol=0)
    # a perfect sink in every head sends all of the last token's mass to token 0 as depth grows
    full_sinks = rollout_first_token_mass(planted_sinks([[1.0, 1.0]] * 20, 6))
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
    report = sink_report(pat, norms)
    torch.testing.assert_close(report.rollout_mass, rollout_first_token_mass(pat))
    torch.testing.assert_close(report.dobrushin, rollout_dobrushin(pat))
    # sink layers pull the last token's rollout mass onto token 0 and contract less (rows agree on token 0)
    assert report.links["rollout mass gain | sink layers"] > report.links["rollout mass gain | other layers"]
    assert report.links["dobrushin | sink layers"] < report.links["dobrushin | other layers"]
    assert report.correlations["sink_rate vs dobrushin"] < 0
    assert report.entropy is None and report.top_dims is None
    json.dumps(report.to_dict(), allow_nan=False)  # NaN correlations (constant curves) become null
    assert sink_report(pat, norms, over_squashing=False).dobrushin is None


# --- model-facing: one traced pass against run_with_cache ---------------------------------------------


def direct_recomputation(model, tokens: torch.Tensor) -> dict:
    """The report's curves recomputed independently from ``run_with_cache`` with numpy."""
    _, cache = model.run_with_cache(tokens[None])
    L = model.cfg.n_layers
    pats = np.stack([cache["pattern", layer][0].double().numpy() for layer in range(L)])
    resid = np.stack([cache["resid_pre", layer][0].double().numpy() for layer in range(L)]
                     + [cache["resid_post", L - 1][0].double().numpy()])
    n, d = resid.shape[1:]
    entropy = []
    for x in resid:
        s2 = np.linalg.svd(x, compute_uv=False) ** 2
        p = s2[s2 > 0] / s2.sum()
        entropy.append(-(p * np.log(p)).sum() / np.log(min(n, d)))
    norms = np.linalg.norm(resid, axis=-1)
    mass = pats[:, :, 1:, 0].mean(-1)  # [layer, head]
    product, rollout, tau, mixing = np.eye(n), [], [], []
    for layer in range(L):
        lazy = 0.5 * (pats[layer].mean(0) + np.eye(n))
        product = lazy @ product
        rollout.append(product[-1, 0])
        tau.append(0.5 * np.abs(lazy[:, None, :] - lazy[None, :, :]).sum(-1).max())  # every pair of rows
        rows = pats[layer][:, 1:, :]
        with np.errstate(divide="ignore", invalid="ignore"):
            row_entropy = -np.where(rows > 0, rows * np.log(rows), 0.0).sum(-1)
        mixing.append((row_entropy / np.log(np.arange(2, n + 1))).mean())
    return {
        "first_token_mass": mass.mean(-1), "sink_rate": (mass > SINK_EPS).mean(-1),
        "first_token_norm": norms[:, 0], "norm_ratio": norms[:, 0] / np.median(norms[:, 1:], axis=-1),
        "entropy": np.array(entropy), "rollout_mass": np.array(rollout), "dobrushin": np.array(tau),
        "mixing": np.array(mixing),
        "top_dim": np.abs(resid[:, 0]).argmax(-1),
    }


def assert_report_matches(report, expected: dict, rtol: float) -> None:
    for name in ("first_token_mass", "sink_rate", "first_token_norm", "norm_ratio", "entropy", "rollout_mass",
                 "dobrushin", "mixing"):
        np.testing.assert_allclose(getattr(report, name).numpy(), expected[name], rtol=rtol, atol=rtol, err_msg=name)
    assert report.top_dims[:, 0].tolist() == expected["top_dim"].tolist()


def test_sink_analysis_agrees_with_run_with_cache_on_a_tiny_model(tiny):
    tokens = torch.randint(0, tiny.cfg.d_vocab, (12,))
    report = sink_analysis(tiny, tokens)
    assert_report_matches(report, direct_recomputation(tiny, tokens), rtol=1e-10)
    assert report.metadata["model"]["n_layers"] == 2 and len(report.metadata["str_tokens"]) == 12
    assert report.plot().data and "SinkReport" in report._repr_html_()
    json.dumps(report.to_dict(), allow_nan=False)


def test_sink_report_from_trace_needs_the_residual_stream(tiny):
    from lens_squash.edge.trace import trace

    with pytest.raises(ValueError, match="keep_resid=True"):
        sink_report_from_trace(trace(tiny, torch.arange(6)))


@pytest.mark.slow
def test_sink_analysis_and_clamp_on_smollm2(smollm2):
    tokens = format_prompt(smollm2, "Copy the last digit: 1 1 1 1 1 0", chat=False)
    expected = direct_recomputation(smollm2, tokens)
    result = ablation_effect(smollm2, tokens, 11, jacobian=False)  # baseline: sink_analysis
    assert_report_matches(result.baseline, expected, rtol=2e-4)  # float32 model: trace and cache agree to rounding
    # SmolLM2's first token turns massive in block 11; the clamp brings it back to the median token norm
    before, after = result.baseline.norm_ratio[12].item(), result.ablated.norm_ratio[12].item()
    assert before > 10 and after == pytest.approx(1.0, rel=1e-5)
    assert result.first_token_norm_change[12] < 0 and (result.first_token_norm_change[:12] == 0).all()


# --- ablation ------------------------------------------------------------------------------------------


def test_disabled_clamp_changes_nothing(tiny):
    tokens = torch.randint(0, tiny.cfg.d_vocab, (10,))[None]
    reference = tiny(tokens)
    for layer, factor in [(None, None), (0, 1.0), (1, 1.0)]:
        with clamp_massive_activation(tiny, layer, factor=factor) as hooks:
            assert torch.equal(tiny(tokens), reference)
        assert len(hooks) == (0 if layer is None else 1)
    assert not tiny.list_hooks()  # removed on exit
    with clamp_massive_activation(tiny, 0):  # the default clamp does change the output
        assert not torch.equal(tiny(tokens), reference)


def test_clamp_rescales_the_first_token_at_that_layer_only(tiny):
    tokens = torch.randint(0, tiny.cfg.d_vocab, (11,))[None]
    _, clean = tiny.run_with_cache(tokens)
    with clamp_massive_activation(tiny, 0):
        _, cache = tiny.run_with_cache(tokens)
    before, after = clean["resid_post", 0][0], cache["resid_post", 0][0]
    median = float(np.median(before[1:].norm(dim=-1).numpy()))
    assert after[0].norm().item() == pytest.approx(median, rel=1e-12)  # the typical token norm
    torch.testing.assert_close(after[0] / after[0].norm(), before[0] / before[0].norm())  # direction kept
    assert torch.equal(after[1:], before[1:])
    torch.testing.assert_close(cache["resid_pre", 1], cache["resid_post", 0])  # the next layer reads it
    with clamp_massive_activation(tiny, -1, target_norm=0.5):
        _, cache = tiny.run_with_cache(tokens)
    assert cache["resid_post", 1][0, 0].norm().item() == pytest.approx(0.5, rel=1e-12)


def test_clamp_top_dims_sets_them_to_their_median(tiny):
    tokens = torch.randint(0, tiny.cfg.d_vocab, (9,))[None]
    _, clean = tiny.run_with_cache(tokens)
    x = clean["resid_post", 0][0]
    top = x[0].abs().topk(3).indices
    with clamp_massive_activation(tiny, 0, dims=3):
        _, cache = tiny.run_with_cache(tokens)
    after = cache["resid_post", 0][0, 0]
    expected = x[0].clone()
    expected[top] = torch.tensor(np.median(x[1:, top].numpy(), axis=0))
    torch.testing.assert_close(after, expected, atol=1e-14, rtol=0)


def test_clamp_option_errors(tiny):
    for kwargs, match in [({"factor": 2.0, "dims": 1}, "at most one"), ({"target_norm": -1.0}, "≥ 0"),
                          ({"dims": 0}, "k largest")]:
        with pytest.raises(ValueError, match=match):
            clamp_hooks(tiny, 0, **kwargs)
    with pytest.raises(ValueError, match="blocks"):
        clamp_hooks(tiny, 5)


def test_ablation_effect_measures_the_clamped_model(tiny):
    tokens = torch.randint(0, tiny.cfg.d_vocab, (10,))
    result = ablation_effect(tiny, tokens, 0, jacobian=False)
    with clamp_massive_activation(tiny, 0):
        ablated = sink_analysis(tiny, tokens)
    baseline = sink_analysis(tiny, tokens)
    torch.testing.assert_close(result.sink_rate_change, ablated.sink_rate - baseline.sink_rate)
    torch.testing.assert_close(result.entropy_change, ablated.entropy - baseline.entropy)
    torch.testing.assert_close(result.entropy_change[:1], torch.zeros(1, dtype=F64))  # before the clamp
    # the stream entering layer 1 is the clamped one: its first token now has the median norm
    others = tiny.run_with_cache(tokens[None])[1]["resid_post", 0][0, 1:].norm(dim=-1)
    assert result.ablated.first_token_norm[1].item() == pytest.approx(float(np.median(others.numpy())), rel=1e-12)
    json.dumps(result.to_dict(), allow_nan=False)
    assert "AblationResult" in result._repr_html_() and result.plot().data
    with pytest.raises(ValueError, match="no Jacobians"):
        result.plot_jacobian()


def test_jacobian_pass_honours_the_clamp(tiny):
    from lens_squash.edge.jacobian import jacobian

    tokens = torch.randint(0, tiny.cfg.d_vocab, (6,))
    # factor 0 on the last token after the last block makes y_n = ln_final(0): constant in every input
    with clamp_massive_activation(tiny, -1, position=-1, factor=0.0):
        zeroed = jacobian(tiny, tokens, mode="sketch", n_probes=4).frobenius
    assert torch.equal(zeroed, torch.zeros(6, dtype=F64))
    identity = ablation_effect(tiny, tokens, 0, factor=1.0, jacobian=True, n_probes=16)
    assert (identity.jacobian_baseline > 0).all()
    assert torch.equal(identity.jacobian_ablated, identity.jacobian_baseline)  # same probes, same model
    # 16 orthonormal probes in d_model = 16 recover the exact Frobenius norms of the clean model
    torch.testing.assert_close(identity.jacobian_baseline, jacobian(tiny, tokens, mode="exact").frobenius)
    assert len(identity.plot_jacobian().data) == 4


def test_sink_analysis_refuses_a_single_token_before_tracing(monkeypatch):
    from lens_squash.algebra import sinks
    from lens_squash.edge.models import tiny_model

    model = tiny_model(n_layers=1, n_heads=2, d_model=16, d_vocab=32, seed=0)

    def no_trace(*args, **kwargs):
        pytest.fail("traced a one-token prompt")

    monkeypatch.setattr(sinks, "trace", no_trace)
    with pytest.raises(ValueError, match="single token; sinks compare the first token with later ones"):
        sinks.sink_analysis(model, torch.tensor([3]))
