"""Bound against truth that can be read: no log axis of the report spans more than 8 decades, shares are each
curve over its own total, ratios are bound over truth with the line at 1, and the labels follow the registry."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lens_squash.edge.backends import is_bridge
from lens_squash.edge.flow import flow
from lens_squash.edge.models import load_model
from lens_squash.experiments.analysis import analyze
from lens_squash.experiments.collapse import collapse_curve
from lens_squash.views.bound_panels import MAX_DECADES, bound_truth_figure, clip_decades, decade_window
from lens_squash.views.report import analysis_sections, collapse_section
from lens_squash.views.style import caption_of


def log_spans(fig) -> list[tuple[str, float]]:
    """Decades each log axis shows: its set range, else the positive data drawn on it."""
    spans = []
    layout = fig.layout.to_plotly_json()
    for name in (k for k in layout if k.startswith(("xaxis", "yaxis"))):
        axis = fig.layout[name]
        if axis.type != "log":
            continue
        if axis.range is not None:
            spans.append((name, axis.range[1] - axis.range[0]))
            continue
        ref = name.replace("axis", "")
        letter = ref[0]
        ref = letter if ref in ("x1", "y1") else ref
        values = [
            np.asarray(getattr(t, letter), dtype=float).ravel()
            for t in fig.data
            if (getattr(t, f"{letter}axis", None) or letter) == ref and getattr(t, letter, None) is not None
        ]
        values = np.concatenate(values) if values else np.array([])
        values = values[np.isfinite(values) & (values > 0)]
        if values.size:
            spans.append((name, math.log10(values.max() / values.min())))
    return spans


def log_colour_spans(fig) -> list[tuple[str, float]]:
    """Decades each log10-coloured heatmap shows: its colour range (zmax − zmin), else its z data."""
    spans = []
    for trace in fig.data:
        bar = trace.colorbar.title.text if getattr(trace, "colorbar", None) is not None else None
        if trace.type != "heatmap" or "log" not in str(bar or "") + str(trace.hovertemplate or ""):
            continue
        z = np.asarray(trace.z, dtype=float)
        lo = trace.zmin if trace.zmin is not None else np.nanmin(z)
        hi = trace.zmax if trace.zmax is not None else np.nanmax(z)
        spans.append((f"{trace.name} colour", float(hi - lo)))
    return spans


def test_no_report_panel_spans_more_than_eight_decades():
    """Every figure of the report of a tiny model with a flow and a collapse section: every log axis, and
    every log10 colour scale, shows at most 8 decades."""
    model = load_model("tiny-random", n_ctx=256)
    prompt = "Copy: 1 1 1 1 1 0"
    analysis = analyze(model, prompt, jacobian_mode="sketch", n_probes=4)
    sections = analysis_sections(analysis, flow=flow(model, prompt, n_probes=4))
    # a bridge runs collapse in its own dtype only (TransformerLens 4): one curve there, two on a HookedTransformer
    dtypes = ("float32",) if is_bridge(model) else ("float32", "bfloat16")
    sections.append(collapse_section(collapse_curve(model, "count_ones", (2, 4, 8, 16), dtypes)))
    figures = [fig for s in sections for fig in s.figures]
    checked = [
        (fig.layout.title.text, name, span) for fig in figures for name, span in log_spans(fig) + log_colour_spans(fig)
    ]
    assert len(figures) >= 8 and len(checked) >= 6  # bound panels, flow heatmap, attention, collapse, spectral
    assert any("colour" in name for _, name, _ in checked)
    assert all(span <= MAX_DECADES + 1e-9 for _, _, span in checked), checked


def test_seventy_decades_of_bound_are_cut_to_eight_with_every_point_kept_in_the_hover():
    n = 12
    truth = np.linspace(1.0, 3.0, n)
    bounds = {"huge": np.logspace(-10, 60, n), "proxy": truth / 1e3}
    fig = bound_truth_figure(None, truth, bounds, {"huge": "bound", "proxy": "proxy"})
    spans = dict(log_spans(fig))
    assert spans["yaxis"] <= MAX_DECADES and spans["yaxis2"] <= MAX_DECADES
    lo, hi = fig.layout.yaxis2.range
    assert lo < 0 < hi  # the ratio panel always shows its line at 1
    huge = next(t for t in fig.data if t.name == "huge (bound)" and t.yaxis == "y")
    # the true share travels in the hover even where the point sits on the axis edge
    shares = bounds["huge"] / bounds["huge"].sum()
    np.testing.assert_allclose(np.asarray(huge.customdata[:, 1], dtype=float), shares)
    assert (np.asarray(huge.y) >= 10 ** fig.layout.yaxis.range[0]).all()
    # the legend and caption use the registry's words, and say which side of 1 is a violation
    names = {t.name for t in fig.data if t.showlegend is not False}
    assert {"huge (bound)", "proxy (proxy)"} <= names
    assert "violation" in caption_of(fig) and "proxies" in caption_of(fig)
    ratio = next(t for t in fig.data if t.name == "proxy (proxy)" and t.yaxis == "y2")
    np.testing.assert_allclose(np.asarray(ratio.customdata[:, 1], dtype=float), 1e-3)


def test_decade_window_and_clipping():
    values = np.array([1e-20, 1e-3, 1.0])
    lo, hi = decade_window(values)
    assert hi - lo == pytest.approx(MAX_DECADES) and hi > 0  # the top kept: where the mass is
    narrow = decade_window(np.array([0.1, 10.0]))
    assert narrow[0] < -1 and narrow[1] > 1 and narrow[1] - narrow[0] < 3
    ratio = decade_window(np.array([1e30, 1e40]), include=1.0)
    assert ratio[0] < 0 < ratio[1] and ratio[1] - ratio[0] == pytest.approx(MAX_DECADES)
    shown, moved = clip_decades(values, (lo, hi))
    assert moved.tolist() == [True, False, False]
    assert shown[0] >= 10**lo and shown[1:].tolist() == values[1:].tolist()


def test_bounds_without_a_guarantee_or_of_another_length_are_refused():
    with pytest.raises(ValueError, match="no guarantee"):
        bound_truth_figure(None, np.ones(3), {"x": np.ones(3)}, {})
    with pytest.raises(ValueError, match="3 positions"):
        bound_truth_figure(None, np.ones(3), {"x": np.ones(4)}, {"x": "proxy"})
