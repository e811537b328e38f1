"""Bound against truth that can be read: no log axis of the report spans more than 8 decades, shares are each
curve over its own total, ratios are bound over truth with the line at 1, and the labels follow the registry."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lens_squash.edge.models import load_model
from lens_squash.experiments.analysis import analyze
from lens_squash.views.bound_panels import MAX_DECADES, bound_truth_figure, clip_decades, decade_window
from lens_squash.views.report import analysis_sections
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


def test_no_report_panel_spans_more_than_eight_decades():
    analysis = analyze(load_model("tiny-random", n_ctx=256), "Copy: 1 1 1 1 1 0", jacobian_mode="sketch", n_probes=4)
    figures = [fig for s in analysis_sections(analysis) for fig in s.figures]
    checked = [(fig.layout.title.text, name, span) for fig in figures for name, span in log_spans(fig)]
    assert checked  # the bound panels alone have two log axes
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
