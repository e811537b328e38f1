"""Figure builders: each figure's data equals the tensors it shows (to the precision its hover shows),
every figure explains itself (caption, titled axes, one tick style), and token text stays escaped."""

from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import scipy.stats
import torch
from plotly.colors import sample_colorscale, unlabel_rgb

from lens_squash.algebra.attention_stream import summarize_attention
from lens_squash.algebra.compare import compare_variants
from lens_squash.algebra.sinks import sink_report
from lens_squash.algebra.softmax_theory import tv_decay_experiment
from lens_squash.core.tokens import token_label
from lens_squash.experiments.task_results import RESULT_COLUMNS, TaskResults
from lens_squash.views.attention_figures import attention_heatmap, block_size
from lens_squash.views.bound_figures import bound_vs_jacobian, comparison_figure
from lens_squash.views.collapse_figures import (
    collapse_figure,
    head_band_figure,
    pe_figure,
    tv_decay_figure,
    tv_figure,
)
from lens_squash.views.compact import compact_figure, rounded
from lens_squash.views.edge_figures import attention_paths
from lens_squash.views.sink_figures import SINK_CURVES, sink_figure, sink_report_figure
from lens_squash.views.spectral_figures import spectral_figure, spectral_report_figure
from lens_squash.views.style import MAX_TICKS, caption_of, math_text, with_caption
from lens_squash.views.task_figures import abs_error_figure, accuracy_figure, answer_histogram

F64 = torch.float64
HOSTILE = "</script><img src=x onerror=alert(1)>"
ESCAPED = "&lt;/script&gt;&lt;img␣src=x␣onerror=alert(1)&gt;"


def causal_patterns(layers=2, heads=3, n=6) -> torch.Tensor:
    scores = torch.randn(layers, heads, n, n, dtype=F64)
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    return torch.softmax(scores.masked_fill(~mask, -math.inf), -1)


def random_flows(layers=2, heads=3, n=6) -> tuple[torch.Tensor, torch.Tensor]:
    return causal_patterns(layers, heads, n) * torch.rand(layers, heads, n, 1, dtype=F64), torch.rand(
        layers, n, dtype=F64
    )


def tokens(n: int) -> list[str]:
    out = [f" t{i}" for i in range(n)]
    out[1] = HOSTILE
    return out


def assert_data(actual, expected, atol=0.0, digits: int | None = None):
    """Equal, or equal to ``digits`` significant digits (a float32 figure of float64 values holds about 7)."""
    rtol = 0.0 if digits is None else 5.0 * 10.0**-digits + 1e-7
    np.testing.assert_allclose(np.asarray(actual, dtype=float), np.asarray(expected, dtype=float), atol=atol, rtol=rtol)


def strings_in(fig: go.Figure) -> list[str]:
    """Every string a figure holds (data and layout), to look for unescaped user text."""
    found = []

    def walk(value):
        if isinstance(value, str):
            found.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)
        elif isinstance(value, np.ndarray) and value.dtype == object:
            for v in value.ravel():
                walk(v)

    walk(fig.to_plotly_json())
    return found


def assert_no_raw_html(fig: go.Figure):
    raw = [s for s in strings_in(fig) if "<script" in s or "<img" in s]
    assert raw == []
    assert "<" not in fig.to_json()  # plotly's encoder writes '<' as \u003c: no tag can open in a <script>


def axes_of(fig: go.Figure) -> dict[str, Any]:
    layout = fig.layout.to_plotly_json()
    return {k: v for k, v in layout.items() if re.fullmatch(r"[xy]axis\d*", k)}


def assert_explains_itself(fig: go.Figure):
    """A caption, a title on every visible axis, power-format exponents (no SI suffixes), no raw TeX."""
    caption = caption_of(fig)
    assert caption and len(caption) > 80, "a figure needs a caption saying what it shows and how to read it"
    assert fig.layout.title.text
    for name, axis in axes_of(fig).items():
        if axis.get("visible") is False:
            continue
        assert (axis.get("title") or {}).get("text"), f"{name} has no title"
        assert axis.get("exponentformat") == "power", f"{name} would mix SI suffixes with exponents"
        assert "_{" not in axis["title"]["text"] and "^{" not in axis["title"]["text"]


# --- tokens, math text, captions, rounding --------------------------------------------------------


def test_math_text_turns_tex_scripts_into_display_text():
    assert math_text("‖y_n(s) − y_{n+1}(s*)‖") == "‖yₙ(s) − yₙ₊₁(s*)‖"
    assert math_text("‖J‖_F") == "‖J‖<sub>F</sub>"  # no Unicode subscript F: plotly's <sub>
    assert math_text("10^{-3}") == "10⁻³"
    assert math_text("<b>_x") == "&lt;b&gt;ₓ"  # user text is escaped first, only our tags are added
    assert math_text("plain") == "plain"


def test_captions_are_stored_on_the_figure_beside_other_meta():
    fig = go.Figure(layout={"meta": {"source": "x"}})
    assert caption_of(fig) is None
    with_caption(fig, "What it shows.\n  How to read it.")
    assert caption_of(fig) == "What it shows. How to read it." and fig.layout.meta["source"] == "x"
    assert caption_of(go.Figure(fig.to_dict())) == caption_of(fig)  # survives serialisation
    hostile = with_caption(go.Figure(), f"The token {HOSTILE} leads.")
    assert caption_of(hostile) == f"The token {HOSTILE} leads."  # plain text back, the report escapes it
    assert_no_raw_html(hostile)
    with pytest.raises(TypeError):
        caption_of({"layout": {}})


def test_rounded_keeps_significant_digits_like_python_formatting():
    rng = np.random.default_rng(0)
    values = rng.standard_normal(500) * 10.0 ** rng.integers(-300, 300, 500)
    for digits in (2, 4, 6):
        expected = np.array([float(f"{v:.{digits}g}") for v in values])  # an independent reference
        got = rounded(values, digits)
        assert got.dtype == np.float64  # 1e-300 … 1e300 does not fit float32
        np.testing.assert_allclose(got, expected, rtol=1e-12)
    moderate = rng.standard_normal(200) * 10.0 ** rng.integers(-20, 20, 200)
    small = rounded(moderate, 4)
    assert small.dtype == np.float32  # plotly writes it as a 4-byte typed array
    np.testing.assert_allclose(small, [float(f"{v:.4g}") for v in moderate], rtol=1e-6)


def test_rounded_never_flushes_or_overflows_and_keeps_nan_inf_and_shape():
    tiny_bound = rounded(np.array([1.234567e-60, 5.0]), 3)
    assert tiny_bound.dtype == np.float64 and tiny_bound[0] == pytest.approx(1.23e-60, rel=1e-12)
    huge = rounded(np.array([3.0e39]), 3)
    assert huge.dtype == np.float64 and np.isfinite(huge).all()
    special = rounded(np.array([[np.nan, np.inf], [-np.inf, 0.0]]))
    assert special.shape == (2, 2) and np.isnan(special[0, 0]) and special[0, 1] == np.inf and special[1, 1] == 0
    subnormal = rounded(torch.tensor([1e-40, 0.5], dtype=torch.float32), 3)
    assert subnormal.dtype == np.float32 and subnormal[0] > 0  # a float32 input stays float32, its subnormals kept
    with pytest.raises(ValueError, match="digits"):
        rounded([1.0], 0)


def test_compact_figure_rounds_numbers_into_typed_arrays_and_leaves_text():
    y = np.random.default_rng(1).random(300)
    fig = go.Figure(
        [
            go.Scatter(x=list(range(300)), y=list(y), text=["a"] * 300, customdata=[f"t{i}" for i in range(300)]),
            go.Heatmap(z=np.random.default_rng(2).random((20, 20)).tolist()),
        ]
    )
    small = compact_figure(fig, digits=3)
    assert_data(small.data[0].y, y, digits=3)
    assert np.asarray(small.data[0].y).dtype == np.float32 and np.asarray(small.data[1].z).dtype == np.float32
    assert np.asarray(small.data[0].x).dtype.kind == "i"  # integers stay integers
    assert list(small.data[0].customdata) == [f"t{i}" for i in range(300)] and list(small.data[0].text) == ["a"] * 300
    data_json = [json.dumps(json.loads(f.to_json())["data"]) for f in (fig, small)]
    assert len(data_json[1]) < len(data_json[0]) / 2 and '"bdata"' in data_json[1]
    assert fig.data[0].y[0] == y[0]  # the original figure is untouched


# --- bound versus Jacobian -------------------------------------------------------------------------


def test_bound_vs_jacobian_shows_each_profile_raw_and_normalised():
    n = 7
    truth, rollout, paper = torch.rand(n) + 0.1, torch.rand(n, dtype=F64) + 0.1, torch.rand(n) + 0.1
    bound_object = SimpleNamespace(bound=paper)  # a PathBound-like object
    fig = bound_vs_jacobian(tokens(n), truth, {"rollout": rollout, "paper": bound_object})
    assert len(fig.data) == 6  # three curves, two panels
    for raw, shape, values in zip(fig.data[:6:2], fig.data[1:6:2], (truth, rollout, paper), strict=True):
        assert_data(raw.x, range(n))
        assert_data(raw.y, values, digits=6)
        assert_data(shape.y, values / values.sum(), digits=6)
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis2.type == "log"
    assert fig.data[0].line.color == "black"
    assert fig.data[0].customdata[1] == ESCAPED
    assert ESCAPED in fig.layout.xaxis2.ticktext and list(fig.layout.xaxis.tickvals) == list(range(n))
    styles = {(t.line.dash, t.marker.symbol) for t in fig.data[::2]}
    assert len(styles) == 3  # every curve its own dash and marker, so overlapping ones stay visible
    assert_explains_itself(fig)
    assert "rollout, paper" in caption_of(fig) and "Bottom panel" in caption_of(fig)
    assert_no_raw_html(fig)


def test_coinciding_curves_are_told_apart_and_the_caption_says_so():
    n = 9
    paper = torch.rand(n, dtype=F64) + 0.1
    fig = bound_vs_jacobian(
        None, torch.rand(n) + 0.1, {"paper": paper, "rollout": paper * 7.5, "value": torch.rand(n, dtype=F64)}
    )
    shapes = {t.name: t for t in fig.data[1::2]}
    assert_data(shapes["paper"].y, shapes["rollout"].y, digits=12)  # the same shape: one would hide the other
    assert shapes["paper"].line.dash != shapes["rollout"].line.dash
    assert shapes["paper"].marker.symbol != shapes["rollout"].marker.symbol
    assert "paper and rollout have the same shape" in caption_of(fig)
    assert "value" not in caption_of(fig).split("same shape")[0].split(".")[-1]


def test_rank_statistics_are_annotated_and_match_scipy():
    n = 12
    generator = torch.Generator().manual_seed(3)
    truth = torch.rand(n, dtype=F64, generator=generator) + 0.1
    bounds = {
        "rollout": truth + 0.3 * torch.rand(n, dtype=F64, generator=generator),
        "value": torch.rand(n, dtype=F64, generator=generator),
    }
    table, comparisons = compare_variants(bounds, truth, str_tokens=tuple(tokens(n)))
    for fig in (comparison_figure(table, comparisons), comparison_figure(table)):
        box = [a.text for a in fig.layout.annotations if "rank agreement" in a.text]
        assert len(box) == 1
        for name, values in bounds.items():
            rho = scipy.stats.spearmanr(values, truth).statistic
            tau = scipy.stats.kendalltau(values, truth).statistic
            assert f"{name}: ρ = {rho:.2f}, τ = {tau:.2f}" in box[0]
        assert "Spearman" in box[0] and "Kendall" in caption_of(fig)
    flat = comparison_figure(table.assign(value=1.0))  # a constant curve has no rank statistic
    assert "value: ρ = n/a" in next(a.text for a in flat.layout.annotations if "rank agreement" in a.text)
    with pytest.raises(ValueError, match="not plotted"):
        bound_vs_jacobian(None, truth, bounds, stats={"paper": comparisons["rollout"]})


def test_bound_vs_jacobian_without_truth_single_panel_and_length_check():
    fig = bound_vs_jacobian(None, None, {"a": [1.0, 2.0, 3.0]}, log=False, normalised=False)
    assert len(fig.data) == 1 and fig.layout.yaxis.type == "linear"
    assert list(fig.data[0].customdata) == ["0", "1", "2"]
    assert fig.layout.yaxis.title.text == "path-sum bound"
    assert_explains_itself(fig)
    with pytest.raises(ValueError, match="positions"):
        bound_vs_jacobian(None, torch.rand(3), {"a": torch.rand(4)})
    with pytest.raises(ValueError, match="nothing to plot"):
        bound_vs_jacobian(None, None, {})


def test_log_axes_label_whole_decades_with_exponents():
    n = 20
    span = torch.logspace(-3, 2, n, dtype=F64)  # five decades
    fig = bound_vs_jacobian(None, span, {}, normalised=False)
    assert fig.layout.yaxis.dtick == 1 and fig.layout.yaxis.exponentformat == "power"
    wide = bound_vs_jacobian(None, torch.logspace(-60, 2, n, dtype=F64), {}, normalised=False)
    assert wide.layout.yaxis.dtick is None  # sixty decades: plotly picks which decades to label
    assert_data(wide.data[0].y, torch.logspace(-60, 2, n, dtype=F64), digits=6)  # 1e-60 is not flushed to 0


def test_every_token_is_labelled_up_to_max_ticks_and_thinned_beyond():
    for n, step in ((89, 1), (MAX_TICKS, 1), (250, 3)):
        fig = bound_vs_jacobian([f"w{i}" for i in range(n)], torch.rand(n) + 0.1, {}, normalised=False)
        assert list(fig.layout.xaxis.tickvals) == list(range(0, n, step))
        assert list(fig.layout.xaxis.ticktext) == [f"w{i}" for i in range(0, n, step)]
        assert list(fig.data[0].customdata) == [f"w{i}" for i in range(n)]  # the hover names every token
        assert fig.layout.xaxis.tickangle == -90


def test_comparison_figure_reads_the_compare_variants_table():
    n = 8
    truth, a, b = torch.rand(n, dtype=F64) + 0.1, torch.rand(n, dtype=F64), torch.rand(n, dtype=F64)
    table, _ = compare_variants({"rollout": a, "value": b}, truth, str_tokens=tuple(tokens(n)))
    fig = comparison_figure(table, normalised=False)
    assert [t.name for t in fig.data] == ["Jacobian (spectral)", "rollout", "value"]
    for trace, values in zip(fig.data, (truth, a, b), strict=True):
        assert_data(trace.y, values, digits=6)


# --- attention heatmap -----------------------------------------------------------------------------


def heatmaps(fig: go.Figure) -> list[go.Heatmap]:
    return [t for t in fig.data if isinstance(t, go.Heatmap)]


def colour_at(colorscale, value: float) -> np.ndarray:
    """The RGB colour plotly gives ``value`` on ``colorscale`` (linear interpolation between stops)."""
    positions = np.array([p for p, _ in colorscale])
    colours = np.array([unlabel_rgb(c) for _, c in colorscale], dtype=float)
    return np.array([np.interp(value, positions, colours[:, k]) for k in range(3)])


def test_attention_heatmap_slider_over_layers_and_heads_as_small_multiples():
    patterns = causal_patterns(layers=2, heads=3, n=5)
    fig = attention_heatmap(patterns, tokens(5))
    maps = heatmaps(fig)
    assert len(maps) == 1 + 2 * (1 + 3)  # "all", then each layer's mean and its three heads
    assert maps[0].name == "mean of all layers and heads"
    assert_data(maps[0].z, patterns.mean((0, 1)).masked_fill(patterns[0, 0] == 0, math.nan), digits=6)
    for l in range(2):
        start = 1 + 4 * l
        assert maps[start].name == f"layer {l}, mean of heads"
        assert_data(np.nan_to_num(maps[start].z, nan=0.0), patterns[l].mean(0), digits=6)
        for h in range(3):
            assert maps[start + 1 + h].name == f"layer {l}, head {h}"
            assert_data(np.nan_to_num(maps[start + 1 + h].z, nan=0.0), patterns[l, h], digits=6)
        assert {maps[start + h].xaxis for h in range(4)} == {"x", "x2", "x3", "x4"}  # one panel each
    upper = np.triu_indices(5, 1)
    assert np.isnan(np.asarray(maps[1].z)[upper]).all()  # the causal mask is blank, not the darkest colour
    steps = fig.layout.sliders[0].steps
    assert [s.label for s in steps] == ["all", "0", "1"] and not fig.layout.updatemenus
    colourbar = len(fig.data) - 1
    for step, members in zip(steps, ([0], [1, 2, 3, 4], [5, 6, 7, 8]), strict=True):
        visible = step.args[0]["visible"]
        assert [i for i, v in enumerate(visible) if v] == [*members, colourbar]
        titles = [a["text"] for a in step.args[1]["annotations"] if a["text"]]
        assert titles == [maps[i].name for i in members]
    assert step.args[1]["xaxis2.visible"] and not steps[0].args[1]["xaxis2.visible"]  # empty panels hidden
    assert [t.visible for t in maps] == [True] + [False] * 8
    assert maps[0].x[1] == f"1: {ESCAPED}" and fig.layout.yaxis.autorange == "reversed"
    assert fig.layout.xaxis.title.text == "key" and fig.layout.yaxis.title.text == "query"  # CircuitsVis rows/columns
    assert_explains_itself(fig)
    assert "slider" in caption_of(fig) and "row = query" in caption_of(fig)
    assert_no_raw_html(fig)


def test_attention_colours_follow_a_log_scale_and_the_colour_bar_says_so():
    patterns = causal_patterns(layers=1, heads=1, n=4)
    fig = attention_heatmap(patterns, layer=0, head=0, floor=1e-4)
    colorscale = fig.layout.coloraxis.colorscale
    assert all(h.coloraxis == "coloraxis" for h in heatmaps(fig)) and not fig.layout.coloraxis.showscale
    viridis = "Viridis"
    for value in (1e-4, 3e-4, 1e-3, 0.02, 0.1, 0.5, 1.0):
        position = (math.log10(value) + 4) / 4  # where a log colour bar from 1e-4 to 1 puts it
        expected = np.array(unlabel_rgb(sample_colorscale(viridis, [position])[0]), dtype=float)
        assert np.abs(colour_at(colorscale, value) - expected).max() < 4.0, value  # within 4/255 per channel
    assert np.abs(colour_at(colorscale, 1e-6) - colour_at(colorscale, 1e-4)).max() == 0  # below the floor: darkest
    bar = fig.data[-1].marker
    assert bar.showscale and (bar.cmin, bar.cmax) == (-4.0, 0.0)
    assert list(bar.colorbar.tickvals) == [-4.0, -3.0, -2.0, -1.0, 0.0]
    assert list(bar.colorbar.ticktext) == [
        "≤ 10<sup>-4</sup>",
        "10<sup>-3</sup>",
        "10<sup>-2</sup>",
        "10<sup>-1</sup>",
        "1",
    ]
    assert "log" in bar.colorbar.title.text
    power = attention_heatmap(patterns, layer=0, head=0, color_scale="power", gamma=0.5)
    for value in (0.01, 0.25, 0.64):
        expected = np.array(unlabel_rgb(sample_colorscale(viridis, [value**0.5])[0]), dtype=float)
        assert np.abs(colour_at(power.layout.coloraxis.colorscale, value) - expected).max() < 4.0
    linear = attention_heatmap(patterns, layer=0, head=0, color_scale="linear")
    expected = np.array(unlabel_rgb(sample_colorscale(viridis, [0.3])[0]), dtype=float)
    assert np.abs(colour_at(linear.layout.coloraxis.colorscale, 0.3) - expected).max() < 4.0
    for bad in ({"color_scale": "sqrt"}, {"floor": 0.0}, {"gamma": 2.0}, {"layer": 1}, {"head": -1}):
        with pytest.raises(ValueError):
            attention_heatmap(patterns, **bad)


def test_a_map_larger_than_the_budget_is_pooled_into_blocks_whose_rows_still_sum_to_one():
    n, block = 23, 5  # 23 positions, at most 25 cells: blocks of 5 positions, 5 × 5 cells
    patterns = causal_patterns(layers=1, heads=1, n=n)
    fig = attention_heatmap(patterns, tokens(n), layer=0, head=0, max_cells=25)
    (heat,) = heatmaps(fig)
    z = np.nan_to_num(np.asarray(heat.z, dtype=np.float64), nan=0.0)
    assert z.shape == (5, 5)
    a = patterns[0, 0].numpy()
    for qb in range(5):  # brute force: mean over the block's queries of their mass on each key block
        queries = range(qb * block, min(n, (qb + 1) * block))
        for kb in range(5):
            keys = range(kb * block, min(n, (kb + 1) * block))
            mass = np.mean([sum(a[q, k] for k in keys) for q in queries])
            assert abs(z[qb, kb] - mass) <= 1e-6 * max(mass, 1e-30)
    np.testing.assert_allclose(z.sum(1), 1.0, rtol=1e-6)  # every pooled row still sums to 1
    assert list(heat.x)[-1].startswith("20–22: ") and list(heat.x)[0].startswith("0–4: ")
    assert "pooled into blocks of 5" in caption_of(fig) and "attention mass" in heat.hovertemplate
    assert block_size(89, 100_000) == 1 and block_size(1000, 100_000) == 4  # only maps over the budget pool
    assert_explains_itself(fig)


def test_attention_heatmap_single_layer_head_and_size_budget():
    patterns = causal_patterns(layers=3, heads=2, n=4)
    one = attention_heatmap(patterns, layer=2, head=1)
    assert len(heatmaps(one)) == 1 and not one.layout.sliders
    assert_data(np.nan_to_num(heatmaps(one)[0].z, nan=0.0), patterns[2, 1], digits=6)
    assert one.layout.xaxis.title.text == "key position"
    layer = attention_heatmap(patterns, layer=1)
    assert [t.name for t in heatmaps(layer)] == ["layer 1, mean of heads", "layer 1, head 0", "layer 1, head 1"]
    assert not layer.layout.sliders  # one layer: its heads side by side, nothing to slide
    head = attention_heatmap(patterns, head=0)
    assert_data(np.nan_to_num(np.stack([t.z for t in heatmaps(head)]), nan=0.0), patterns[:, 0], digits=6)
    assert [s.label for s in head.layout.sliders[0].steps] == ["0", "1", "2"]
    small = attention_heatmap(patterns, max_cells=4 * 16)
    assert len(heatmaps(small)) == 1 + 3 and "left out" in small.layout.title.text
    assert "left out" in caption_of(small)
    tight = attention_heatmap(causal_patterns(layers=7, heads=2, n=4), max_cells=4 * 16)
    assert [s.label for s in tight.layout.sliders[0].steps] == ["all", "0", "3", "6"]  # first and last kept
    assert "3 of 7 layers shown" in tight.layout.title.text and "3 of 7 layers shown" in caption_of(tight)
    assert sum(np.asarray(t.z).size for t in heatmaps(tight)) <= 4 * 16
    for fig in (one, layer, head, small):
        assert_explains_itself(fig)


def test_attention_heatmap_long_prompt_thins_labels_but_keeps_positions_apart():
    n = 130
    patterns = causal_patterns(layers=1, heads=1, n=n)
    fig = attention_heatmap(patterns, ["1"] * n, layer=0, head=0)  # every token the same
    assert len(set(heatmaps(fig)[0].x)) == n  # categories stay unique: "i: token"
    ticks = fig.layout.xaxis.tickvals
    assert len(ticks) <= MAX_TICKS and ticks[1] == "2: 1"
    assert "query %{y}" in heatmaps(fig)[0].hovertemplate  # the hover names every position's token
    assert fig.layout.yaxis.tickangle == 0 and fig.layout.xaxis.tickangle == -90
    every = attention_heatmap(causal_patterns(layers=1, heads=1, n=89), layer=0, head=0)
    assert len(every.layout.xaxis.tickvals) == 89  # the demo's 89 tokens are all labelled


# --- attention paths -------------------------------------------------------------------------------


def edges_of(fig: go.Figure) -> list[dict]:
    return [t.meta for t in fig.data if isinstance(t.meta, dict)]


def brute_force_top(head: torch.Tensor, resid: torch.Tensor, k: int) -> list[tuple]:
    edges = [(float(head[l, h, j, i]), l, h, i, j) for l, h, j, i in np.ndindex(*head.shape)]
    edges += [(float(resid[l, j]), l, None, j, j) for l, j in np.ndindex(*resid.shape)]
    return sorted(edges, key=lambda e: -e[0])[:k]


def test_attention_paths_draws_the_heaviest_edges_with_width_by_flow():
    head, resid = random_flows()
    fig = attention_paths((head, resid), tokens(6), top_k=15)
    edges = edges_of(fig)
    assert len(edges) == 15
    got = sorted(((e["flow"], e["layer"], e["head"], e["from"], e["to"]) for e in edges), key=lambda e: -e[0])
    assert got == brute_force_top(head, resid, 15)
    drawn = [(t.meta["flow"], t.line.width) for t in fig.data if isinstance(t.meta, dict)]
    for trace in fig.data:
        edge = trace.meta
        if not isinstance(edge, dict):
            continue
        assert (trace.x[0], trace.y[0], trace.x[-1], trace.y[-1]) == (
            edge["from"],
            edge["layer"],
            edge["to"],
            edge["layer"] + 1,
        )
        if edge["head"] is None:
            assert trace.x[0] == trace.x[-1] and trace.line.color.startswith("rgba(120")
    # width by flow, read as a reader would: a heavier edge is strictly wider, width differences are
    # proportional to flow differences (one affine scale), every edge stays visible, and only the flows
    # relative to the heaviest matter (ten times every flow draws the same widths)
    flows, widths = np.array(drawn).T
    order = np.argsort(flows)
    assert (np.diff(widths[order]) > 0).all() and widths.min() > 0
    slopes = np.diff(widths[order]) / np.diff(flows[order])
    np.testing.assert_allclose(slopes, slopes[0], rtol=1e-9)
    scaled = attention_paths((head * 10, resid * 10), tokens(6), top_k=15)
    assert sorted(t.line.width for t in scaled.data if isinstance(t.meta, dict)) == pytest.approx(sorted(widths))
    colours = {(t.meta["head"], t.line.color) for t in fig.data if isinstance(t.meta, dict)}
    assert len({head for head, _ in colours}) == len(colours)  # one colour per head
    hostile_target = attention_paths({1: (head, resid)}, tokens(6), title="a & b")
    assert hostile_target.layout.title.text == f"a &amp; b — target 1: {ESCAPED}"  # escaped once, not twice
    nodes = fig.data[0]
    assert len(nodes.x) == 6 * 3 and max(nodes.y) == 2  # levels 0..L
    assert any(ESCAPED in text for text in nodes.text)
    assert_explains_itself(fig)
    assert "at most 15 per target" in caption_of(fig) and "6 positions and 2 layers" in caption_of(fig)
    assert_no_raw_html(fig)


def test_attention_paths_menu_switches_between_targets():
    flows = {5: random_flows(), 3: SimpleNamespace(head_flows=random_flows()[0], residual_flows=torch.rand(2, 6))}
    fig = attention_paths(flows, top_k=4)
    buttons = fig.layout.updatemenus[0].buttons
    assert [b.label for b in buttons] == ["target 5: 5", "target 3: 3"]
    first, second = (b.args[0]["visible"] for b in buttons)
    assert first[0] and second[0]  # the position grid is always shown
    assert not any(a and b for a, b in zip(first[1:], second[1:], strict=True))
    assert [t.visible is not False for t in fig.data] == first
    assert sum(first) - 1 == 4 + 1 and sum(second) - 1 == 4 + 1  # edges + target star
    menu = fig.layout.updatemenus[0]
    assert menu.y >= 1.0 and menu.yanchor == "bottom" and menu.x == 0.0  # above the plot, not over the title
    assert fig.layout.margin.t >= 110 and "menu" in caption_of(fig)
    star = [t for t in fig.data if t.name == "target"]
    assert [(t.x[0], t.y[0]) for t in star] == [(5, 2), (3, 2)]


def test_attention_paths_accepts_path_bound_like_objects_and_infers_the_target():
    head, resid = random_flows(n=5)
    head[-1, :, :4] = 0  # only position 4 receives flow at the top layer
    resid[-1, :4] = 0
    bound = SimpleNamespace(flows=lambda: SimpleNamespace(head_flows=head, residual_flows=resid), str_tokens=tokens(5))
    fig = attention_paths(bound, top_k=3)
    assert "target 4" in fig.layout.title.text
    with pytest.raises(TypeError):
        attention_paths(torch.rand(3))
    with pytest.raises(ValueError, match="residual_flows"):
        attention_paths((head, resid[:, :3]))


def test_attention_paths_on_a_real_rollout_bound(tiny):
    from lens_squash.algebra.variants import path_bound
    from lens_squash.edge.trace import trace

    traced = trace(tiny, torch.arange(1, 8))
    bound = path_bound(traced, "rollout", target_pos=5)
    flows = bound.flows()
    fig = attention_paths(bound, top_k=10)
    assert f"target 5: {token_label(traced.str_tokens[5])}" in fig.layout.title.text
    everything = torch.cat([flows.head_flows.flatten(), flows.residual_flows.flatten()]).double()
    assert_data(sorted((e["flow"] for e in edges_of(fig)), reverse=True), everything.topk(10).values, atol=1e-12)
    for edge in edges_of(fig):  # each drawn edge is the flow tensor's entry at its coordinates
        expected = (
            flows.residual_flows[edge["layer"], edge["to"]]
            if edge["head"] is None
            else flows.head_flows[edge["layer"], edge["head"], edge["to"], edge["from"]]
        )
        assert edge["flow"] == pytest.approx(float(expected), rel=1e-12)
        assert edge["to"] <= 5  # no flow reaches past the target
    for drawn in fig.data:  # a head's self-edge bows sideways; residual and cross edges stay straight
        edge = drawn.meta
        if isinstance(edge, dict):
            bowed = edge["head"] is not None and edge["to"] == edge["from"]
            assert (drawn.x[1] != (edge["from"] + edge["to"]) / 2) == bowed
    from_two = attention_paths(bound.flows(source=2), traced.str_tokens, top_k=200)
    assert f"← source 2: {token_label(traced.str_tokens[2])}" in from_two.layout.title.text
    drawn = edges_of(from_two)
    assert drawn and all(2 <= e["from"] <= e["to"] <= 5 for e in drawn)  # causal paths from 2 to 5 only
    with pytest.raises(ValueError, match="target 5"):
        attention_paths({6: bound})


# --- spectral, collapse, bands, PE, TV, sinks -----------------------------------------------------


def test_spectral_figure_panels_hold_the_curves():
    spectrum, second, tau = torch.rand(3, 5), torch.rand(3), torch.rand(3)
    mass, dist = torch.rand(3), torch.rand(3)
    fig = spectral_figure(
        spectrum=spectrum, second_eigenvalue=second, dobrushin=tau, rollout_mass=mass, rank_one_distance=dist
    )
    by_name = {t.name: t for t in fig.data}
    assert_data(by_name["eigenvalues Λ̃_ii"].y, spectrum.flatten(), digits=6)
    assert_data(by_name["eigenvalues Λ̃_ii"].x, np.repeat(np.arange(3), 5))
    assert_data(by_name["second eigenvalue"].y, second, digits=6)
    assert_data(by_name["τ per layer"].y, tau, digits=6)
    assert_data(by_name["Π τ (bound)"].y, torch.cumprod(tau, 0), digits=6)
    assert_data(by_name["[Π Λ̃]ₙ,₀"].x, [1, 2, 3])
    assert_data(by_name["distance to rank one"].y, dist, digits=6)
    assert fig.layout.yaxis4.type == "log"
    assert by_name["τ per layer"].line.dash != by_name["Π τ (bound)"].line.dash
    assert fig.layout.xaxis.dtick == 1  # whole layers, no "layer 0.5"
    assert_explains_itself(fig)
    assert len(spectral_figure().data) == 0


def test_spectral_report_figure_shows_a_real_report(tiny):
    from lens_squash.algebra.attention import aggregate_heads
    from lens_squash.algebra.paths import rollout_matrices
    from lens_squash.algebra.spectral import analyze_stack
    from lens_squash.edge.trace import trace

    traced = trace(tiny, torch.arange(1, 9))
    report = analyze_stack(rollout_matrices(aggregate_heads(traced.patterns.double())))
    fig = spectral_report_figure(report)
    by_name = {t.name: t for t in fig.data}
    assert_data(by_name["eigenvalues Λ̃_ii"].y, report.spectrum.flatten(), digits=6)
    assert_data(by_name["second eigenvalue"].y, report.second_eigenvalue, digits=6)
    assert_data(by_name["τ per layer"].y, report.dobrushin, digits=6)
    assert_data(by_name["Π τ (bound)"].y, report.cumulative_dobrushin, digits=6)  # the figure's own cumprod
    assert_data(by_name["[Π Λ̃]ₙ,₀"].y, report.rollout_mass, digits=6)
    assert_data(by_name["distance to rank one"].y, report.rank_one_distance, digits=6)
    # the inequality the panel illustrates survives the rounding to what the hover shows
    assert (np.asarray(by_name["distance to rank one"].y) <= np.asarray(by_name["Π τ (bound)"].y) * (1 + 1e-3)).all()


def test_collapse_figure_draws_zeros_at_a_floor_below_everything():
    lengths = [2, 4, 8, 16]
    distances = {"float32": [1e-3, 1e-6, 0.0, 0.0], "bfloat16": torch.tensor([1e-2, 0.0, 0.0, 0.0])}
    resolutions = {"float32": 6e-8, "bfloat16": 3.9e-3}
    fig = collapse_figure(lengths, distances, resolutions)
    line = fig.data[0]
    assert_data(line.y[:2], [1e-3, 1e-6], digits=6)
    assert np.isnan(line.y[2:]).all()
    zeros = fig.data[1]
    assert_data(zeros.x, [8, 16])
    assert zeros.marker.symbol == "x-open"
    floor = zeros.y[0]
    assert floor < 6e-8 and floor > 0 and "exactly 0" in zeros.hovertemplate
    resolution = fig.data[2]
    assert resolution.line.dash == "dash" and list(resolution.y) == [6e-8, 6e-8] and list(resolution.x) == [2, 16]
    assert resolution.line.color == line.line.color
    assert fig.layout.yaxis.type == "log"
    assert_data(fig.data[4].x, [4, 8, 16])  # bfloat16 zeros
    assert fig.data[0].marker.symbol != fig.data[3].marker.symbol  # dtypes differ in marker as well as colour
    assert fig.layout.yaxis.title.text == "‖yₙ(s) − yₙ₊₁(s*)‖"  # no raw y_{n+1}
    assert_explains_itself(fig)
    assert "resolution" in caption_of(fig) and "exactly 0" in caption_of(fig)
    assert fig.layout.xaxis.type == "log" and list(fig.layout.xaxis.tickvals) == lengths  # lengths on a log axis
    # a resolution far below every distance is named, not drawn: it would stretch the axis over empty decades
    far = collapse_figure(
        lengths, {**distances, "float64": [1e-3, 1e-6, 1e-7, 1e-7]}, {**resolutions, "float64": 2.2e-16}
    )
    assert "float64 resolution" not in [t.name for t in far.data]
    assert any("float64 2.2e-16" in a.text for a in far.layout.annotations)
    low, high = far.layout.yaxis.range
    assert high - low <= 8 and low > -16
    fixed = collapse_figure(lengths, {"a": [0.0] * 4}, floor=1e-20, y_title="‖y_{n+1}‖")
    assert list(fixed.data[1].y) == [1e-20] * 4 and fixed.layout.yaxis.title.text == "‖yₙ₊₁‖"
    assert "‖yₙ₊₁‖" in caption_of(fixed)
    with pytest.raises(ValueError, match="lengths"):
        collapse_figure([1, 2], {"a": [1.0]})


def test_head_band_and_pe_figures_hold_their_curves():
    lengths, mean, lo, hi = [1, 2, 4], [1.0, 0.5, 0.2], [0.5, 0.2, 0.1], [2.0, 1.0, 0.5]
    band = head_band_figure(lengths, mean, lo, hi)
    assert_data(band.data[0].y, hi, digits=6)
    assert_data(band.data[1].y, lo, digits=6)
    assert_data(band.data[2].y, mean, digits=6)
    assert band.data[1].fill == "tonexty"
    assert "ₙ₊₁" in band.layout.yaxis.title.text
    assert_explains_itself(band)
    pe = pe_figure(
        lengths, {"rope": (torch.tensor(mean, dtype=F64), torch.tensor([0.1, 0.1, 0.1], dtype=F64))}, log=False
    )
    assert_data(pe.data[0].y, np.add(mean, 0.1), digits=6)
    assert_data(pe.data[1].y, np.subtract(mean, 0.1), digits=6)
    assert_data(pe.data[2].y, mean, digits=6)
    assert pe.data[2].name == "rope"
    assert_explains_itself(pe)
    clipped = pe_figure(lengths, {"x": (mean, [2.0, 2.0, 2.0])})  # log axis: lower band ≤ 0 clipped
    assert (np.asarray(clipped.data[1].y) > 0).all()


def test_tv_figure_matches_the_experiment():
    result = tv_decay_experiment(n_max=40, perturbed=5, seeds=2, lengths=[5, 10, 20, 40])
    fig = tv_decay_figure(result)
    # two legend entries (a line per seed, a bound per seed), the seed named in each hover
    shown = [t.name for t in fig.data if t.showlegend is not False]
    assert shown == ["TV, one line per seed (2)", "Lemma B.2 bound, one per seed"]
    assert ["seed 1" in t.hovertemplate for t in fig.data] == [False, False, True, True]
    assert_data(fig.data[0].y, result.tv[0], digits=6)
    assert_data(fig.data[3].y, result.bound[1], digits=6)
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"
    assert_explains_itself(fig)
    shared = tv_figure([1, 2], torch.rand(3, 2), torch.tensor([1.0, 0.5]))
    assert [t.name for t in shared.data].count("Lemma B.2 bound") == 1


def test_sink_figure_shades_the_three_phases():
    curves = {"first token mass": torch.rand(6), "norm ratio": torch.rand(7) * 100}
    fig = sink_figure(curves, (2, 4), log=("norm ratio",))
    assert_data(fig.data[0].y, curves["first token mass"], digits=6)
    assert_data(fig.data[1].y, curves["norm ratio"], digits=6)
    assert fig.layout.yaxis2.type == "log"
    spans = sorted({(s.x0, s.x1) for s in fig.layout.shapes})
    assert spans == [(-0.5, 1.5), (1.5, 3.5), (3.5, 6.5)]
    assert [a.text for a in fig.layout.annotations if a.text.startswith("<i>")] == [
        "<i>Mix</i>",
        "<i>Compress</i>",
        "<i>Refine</i>",
    ]
    assert fig.layout.yaxis.title.text == "first token mass"  # an unknown curve is titled by its name
    assert_explains_itself(fig)
    assert "Mix, Compress and Refine" in caption_of(fig) and "Log axes: norm ratio" in caption_of(fig)
    assert not sink_figure(curves).layout.shapes


def test_sink_report_figure_reads_the_report():
    patterns = causal_patterns(layers=4, heads=2, n=6)
    summary = summarize_attention(patterns, spectral_atol=None)
    report = sink_report(summary, torch.rand(5, 6) + 1, representations=torch.randn(5, 6, 8, dtype=F64))
    fig = sink_report_figure(report)
    names = [t.name for t in fig.data]
    assert names == ["mean_first_token_attention", "sink_rate", "mixing", "norm_ratio", "entropy", "anisotropy"]
    assert_data(fig.data[0].y, report.mean_first_token_attention, digits=6)
    assert_data(fig.data[5].y, report.anisotropy, digits=6)
    assert fig.layout.yaxis4.type == "log"
    assert [fig.layout[f"yaxis{'' if i == 1 else i}"].title.text for i in range(1, 7)] == [
        SINK_CURVES[name][0] for name in names
    ]
    assert_explains_itself(fig)
    for name in names:
        assert SINK_CURVES[name][1] in caption_of(fig)


# --- tasks -----------------------------------------------------------------------------------------


def task_frame() -> pd.DataFrame:
    rows = []
    answers = {("count", 5): [5, 4, None], ("count", 10): [10, 8, 8], ("copy", 5): [1, 1, 0], ("copy", 10): [1, 0, 0]}
    for (task, length), parsed in answers.items():
        truth = length if task == "count" else 1
        for sample, answer in enumerate(parsed):
            rows.append(
                {
                    "task": task,
                    "style": "zero-shot",
                    "length": length,
                    "sample": sample,
                    "seed": 0,
                    "prompt": HOSTILE,
                    "raw_output": HOSTILE,
                    "parsed_answer": answer,
                    "parse_status": "ok" if answer is not None else "unparsable",
                    "truth": truth,
                    "correct": answer == truth,
                    "abs_error": None if answer is None else abs(answer - truth),
                    "n_prompt_tokens": 9,
                    "n_new_tokens": 3,
                }
            )
    frame = pd.DataFrame(rows, columns=list(RESULT_COLUMNS))
    return frame.astype({"parsed_answer": "Int64", "abs_error": "Int64"})


def test_accuracy_and_error_figures_average_per_task_and_length():
    frame = task_frame()
    accuracy = accuracy_figure(TaskResults(frame))
    by_name = {t.name: t for t in accuracy.data}
    assert_data(by_name["count"].x, [5, 10])
    assert_data(by_name["count"].y, [1 / 3, 1 / 3], digits=6)
    assert_data(by_name["copy"].y, [2 / 3, 1 / 3], digits=6)
    error = {t.name: t for t in abs_error_figure(frame).data}
    assert_data(error["count"].y, [0.5, 4 / 3], digits=6)  # the unparsable answer is left out
    assert_data(error["count"].customdata, [2, 3])
    assert_explains_itself(accuracy)
    assert "exactly right" in caption_of(accuracy)
    assert len({(t.line.dash, t.marker.symbol) for t in accuracy.data}) == len(accuracy.data)
    two_modes = pd.concat([frame, frame.assign(style="few-shot", correct=True)])
    assert {t.name for t in accuracy_figure(two_modes).data} == {
        "count (zero-shot)",
        "count (few-shot)",
        "copy (zero-shot)",
        "copy (few-shot)",
    }


def test_answer_histogram_counts_parsed_answers():
    fig = answer_histogram(task_frame(), task="count")
    bars = [t for t in fig.data if isinstance(t, go.Bar)]
    assert [b.name for b in bars] == ["n = 5 (1 unparsable)", "n = 10"]
    assert dict(zip(bars[1].x, bars[1].y, strict=True)) == {8: 2, 10: 1}
    truths = [t for t in fig.data if isinstance(t, go.Scatter)]
    assert [t.x[0] for t in truths] == [5, 10]
    assert len(answer_histogram(task_frame()).layout.annotations) == 2  # one panel per task
    assert_explains_itself(fig)
    with pytest.raises(ValueError, match="no rows"):
        answer_histogram(task_frame(), task="nope")


def test_answer_histogram_gathers_runaway_answers_past_twice_the_largest_truth():
    """One answer of 1111 among counts up to 10 goes into one bar at 21 (cap 20 + 1), named in its hover,
    so the other bars keep their width; every sample is still counted once."""
    frame = task_frame()
    frame.loc[(frame["task"] == "count") & (frame["length"] == 10) & (frame["sample"] == 0), "parsed_answer"] = 1111
    fig = answer_histogram(frame, task="count")
    bars = [t for t in fig.data if isinstance(t, go.Bar)]
    assert dict(zip(bars[1].x, bars[1].y, strict=True)) == {8: 2, 21: 1}
    assert list(bars[1].customdata) == ["8", "> 20: 1111"]
    assert sum(sum(b.y) for b in bars) == frame[frame["task"] == "count"]["parsed_answer"].notna().sum()
    assert "above 20" in caption_of(fig)
    unparsable = frame.assign(parsed_answer=np.where(frame["length"] == 5, None, frame["parsed_answer"]))
    fig = answer_histogram(unparsable, task="count")
    assert [b.name for b in fig.data if isinstance(b, go.Bar)] == ["n = 10"]  # no bar (and no slot) for length 5
    legend = [t.name for t in fig.data if t.showlegend is not False]
    assert legend == ["n = 5 (3 unparsable)", "n = 10"]  # its truth triangle keeps it in the legend
    assert "above" not in caption_of(answer_histogram(task_frame(), task="count"))


# --- every builder -------------------------------------------------------------------------------


def every_figure() -> list[go.Figure]:
    n = 6
    head, resid = random_flows(n=n)
    return [
        bound_vs_jacobian(tokens(n), torch.rand(n), {HOSTILE: torch.rand(n)}),
        attention_heatmap(causal_patterns(n=n), tokens(n)),
        attention_paths({n - 1: (head, resid)}, tokens(n)),
        spectral_figure(dobrushin=torch.rand(2), title=HOSTILE),
        collapse_figure([1, 2], {HOSTILE: [1.0, 0.0]}, {HOSTILE: 0.1}),
        head_band_figure([1, 2], [1, 1], [0.5, 0.5], [2, 2], name=HOSTILE),
        pe_figure([1, 2], {HOSTILE: ([1, 1], [0, 0])}),
        tv_figure([1, 2], torch.rand(2, 2)),
        sink_figure({HOSTILE: torch.rand(3)}, (1, 2)),
        accuracy_figure(task_frame().assign(task=HOSTILE)),
        abs_error_figure(task_frame()),
        answer_histogram(task_frame()),
    ]


def test_every_figure_serialises_with_user_text_escaped():
    for fig in every_figure():
        assert isinstance(fig, go.Figure)
        assert_no_raw_html(fig)
        html = fig.to_html(full_html=False, include_plotlyjs=False)
        assert html.lower().count("</script") == 1


def test_every_figure_explains_itself_and_sends_typed_arrays():
    for fig in every_figure():
        assert_explains_itself(fig)
        for trace in fig.data:  # numeric data goes as typed arrays, not decimal lists
            for name in ("y", "z"):
                value = trace[name] if name in trace else None
                numeric = value is not None and len(value) > 1 and np.asarray(value).dtype.kind in "fiu"
                if numeric and not isinstance(trace, go.Bar):
                    assert isinstance(value, np.ndarray), (type(trace).__name__, name)


# --- in a real Chromium: the slider and the menus work -------------------------------------------


@pytest.mark.browser
def test_the_layer_slider_and_target_menu_work_in_chromium(tmp_path):
    from lens_squash.views.report import ReportSection, write_report

    from .test_browser import _Browser, _chromium, _load

    binary = _chromium()
    assert binary, "install Chromium (apt-get install -y chromium) or set LENS_SQUASH_CHROMIUM"
    patterns = causal_patterns(layers=3, heads=2, n=7)
    heat = attention_heatmap(patterns, tokens(7))
    paths = attention_paths({6: random_flows(3, 2, 7), 4: random_flows(3, 2, 7)}, tokens(7), top_k=5)
    html_path, _ = write_report(tmp_path, [ReportSection("views", figures=[heat, paths])], {})
    browser = _Browser(binary)
    try:
        page = _load(browser, html_path, 2)
        # apply each slider step and menu button as a click would, and read back what plotly.js shows
        shown = page.evaluate(
            "(async () => { const [heat, paths] = document.querySelectorAll('.js-plotly-plot'); const out = [];"
            " for (const step of heat.layout.sliders[0].steps) { await Plotly.update(heat, ...step.args);"
            "   out.push([heat.data.filter(t => t.type === 'heatmap' && t.visible !== false).map(t => t.name),"
            "             heat.layout.title.text, heat._fullLayout.xaxis2.visible]); }"
            " for (const b of paths.layout.updatemenus[0].buttons) { await Plotly.update(paths, ...b.args);"
            "   out.push([paths.data.filter(t => t.visible !== false && t.name === 'target').map(t => t.x[0])]); }"
            " return out; })()"
        )
        assert page.errors() == []
    finally:
        browser.close()
    steps = [s.label for s in heat.layout.sliders[0].steps]
    assert steps == ["all", "0", "1", "2"]
    assert shown[0][0] == ["mean of all layers and heads"] and shown[0][2] is False  # empty panels hidden
    for l in range(3):
        names, title, second_panel = shown[1 + l]
        assert names == [f"layer {l}, mean of heads", f"layer {l}, head 0", f"layer {l}, head 1"]
        assert f"layer {l}" in title and second_panel is True
    assert shown[4] == [[6]] and shown[5] == [[4]]  # each target's star, one at a time


def test_collapse_band_and_encoding_figures_put_lengths_on_a_log_axis_when_they_span_a_factor_of_four():
    lengths = [2, 8, 32, 128]
    band = head_band_figure(lengths, [1.0, 0.5, 0.2, 0.1], [0.5, 0.2, 0.1, 0.05], [2.0, 1.0, 0.5, 0.3])
    pe = pe_figure(lengths, {"rotary": (np.array([1.0, 0.5, 0.2, 0.1]), np.zeros(4))})
    for fig in (band, pe):
        assert fig.layout.xaxis.type == "log" and list(fig.layout.xaxis.tickvals) == lengths
        assert "log axis" in fig.layout.xaxis.title.text
    narrow = head_band_figure([4, 6, 8], [1.0, 0.5, 0.2], [0.5, 0.2, 0.1], [2.0, 1.0, 0.5])
    assert narrow.layout.xaxis.type != "log"  # lengths within a factor of 2: a linear axis reads better
