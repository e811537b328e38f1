"""Representational collapse (Thm. 4.2, Figs. 5–7) and softmax total-variation decay (Lemma B.2, Fig. 9)."""

from __future__ import annotations

import html
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from jaxtyping import Float
from torch import Tensor

from ..algebra.softmax_theory import TVDecayResult
from ..core.results import register_figure
from ..experiments.collapse import CollapseResult
from ..experiments.collapse_windows import WindowSweepResult
from ..experiments.synthetic import PECollapseResult, RatioInvarianceResult
from .style import (
    as_array,
    escape_label,
    finish_layout,
    line_style,
    math_text,
    palette_color,
    trace_data,
)

__all__ = [
    "collapse_figure",
    "head_band_figure",
    "pe_figure",
    "tv_decay_figure",
    "tv_figure",
]

_COLLAPSE_DISTANCE = "‖yₙ(s) − yₙ₊₁(s*)‖"


def _floor(distances: Mapping[str, np.ndarray], resolutions: Mapping[str, float]) -> float:
    positive = [v[v > 0] for v in distances.values()] + [np.asarray([r for r in resolutions.values() if r > 0])]
    smallest = min((float(v.min()) for v in positive if v.size), default=1.0)
    return 10.0 ** (math.floor(math.log10(smallest)) - 1)


def collapse_figure(
    lengths: Sequence[int],
    distances: Mapping[str, Float[Tensor, "length"]],
    resolutions: Mapping[str, float] | None = None,
    *,
    floor: float | None = None,
    y_title: str = _COLLAPSE_DISTANCE,
    title: str = "Representational collapse with length",
) -> go.Figure:
    """Distance against prompt length per dtype (log y), each dtype's resolution dashed.

    Exactly-zero distances cannot sit on a log axis: they are drawn at ``floor`` (default one decade
    below the smallest positive value or resolution) as open ``x`` markers whose hover says so, and
    the line trace holds ``NaN`` there. ``y_title`` may use TeX-style subscripts (:func:`math_text`).
    """
    resolutions = dict(resolutions or {})
    x = as_array(lengths, "lengths", ndim=1)
    curves = {str(k): as_array(v, f"distances[{k}]", ndim=1).astype(np.float64) for k, v in distances.items()}
    for name, values in curves.items():
        if len(values) != len(x):
            raise ValueError(f"distances[{name!r}] has {len(values)} values for {len(x)} lengths")
    near = _near(curves, resolutions)  # resolutions worth a line: the axis reaches down to them
    floor = _floor(curves, near) if floor is None else float(floor)
    off_axis: list[str] = []
    shown_range = _data_decades({**curves, **{f"{k} resolution": np.array([r]) for k, r in near.items()}}, floor)
    fig = go.Figure()
    for i, (name, values) in enumerate(curves.items()):
        color, zero = palette_color(i), values == 0
        # open markers growing with i, lines thinning: curves that coincide stay visible, one inside the other
        fig.add_trace(
            go.Scatter(
                x=x,
                y=trace_data(np.where(zero, np.nan, values)),
                mode="lines+markers",
                name=escape_label(name),
                legendgroup=escape_label(name),
                line={"color": color, "dash": line_style(i)[0], "width": max(1.0, 3.0 - 0.6 * i)},
                marker={"symbol": f"{line_style(i)[1]}-open", "size": 7 + 4 * i, "line": {"width": 1.5}},
                hovertemplate=f"{escape_label(name)}<br>length %{{x}}<br>distance %{{y:.3e}}<extra></extra>",
            )
        )
        if zero.any():
            fig.add_trace(
                go.Scatter(
                    x=x[zero],
                    y=np.full(int(zero.sum()), floor),
                    mode="markers",
                    legendgroup=escape_label(name),
                    name=f"{escape_label(name)}: exactly 0 (drawn at {floor:.0e})",
                    marker={"symbol": "x-open", "size": 10, "color": color},
                    hovertemplate=f"{escape_label(name)}<br>length %{{x}}<br>distance exactly 0 "
                    f"(drawn at the floor {floor:.0e})<extra></extra>",
                )
            )
        if name in resolutions and not _inside(float(resolutions[name]), shown_range):
            off_axis.append(f"{name} {float(resolutions[name]):.1e}")
        elif name in resolutions:
            fig.add_trace(
                go.Scatter(
                    x=np.array([x.min(), x.max()]),
                    y=np.full(2, float(resolutions[name])),
                    mode="lines",
                    legendgroup=escape_label(name),
                    name=f"{escape_label(name)} resolution",
                    line={"color": color, "dash": "dash", "width": 1.5},
                    hovertemplate=f"{escape_label(name)} resolution %{{y:.3e}}<extra></extra>",
                )
            )
    fig.update_xaxes(title_text="prompt length n (log axis)", **_length_axis(x))
    fig.update_yaxes(title_text=math_text(y_title), type="log", range=list(shown_range), dtick=1)
    if off_axis:  # a resolution far below every distance would stretch the axis over empty decades
        fig.add_annotation(
            text="resolution below the axis: " + ", ".join(escape_label(t) for t in off_axis),
            xref="paper", yref="paper", x=0, y=0, xanchor="left", yanchor="bottom", showarrow=False,
            font={"size": 11, "color": "#555"},
        )  # fmt: skip
    caption = (
        f"How far apart the last token's representations of two prompts that differ only by a repeated last token "
        f"are ({_plain(y_title)}, log axis), as the prompt grows (x, log axis), one curve per {'series' if len(curves) > 1 else 'run'}"
        " (Theorem 4.2: the distance shrinks with length). "
        + (
            "A dashed horizontal line is the resolution of that floating-point format: below it the two "
            "representations are as good as identical (a resolution far below every distance is named at the "
            "bottom instead of stretching the axis). "
            if resolutions
            else ""
        )
        + (
            "Open x markers on the bottom line mean the distance is exactly 0 (a log axis cannot show 0): the "
            "representations have collapsed. "
            if any((v == 0).any() for v in curves.values())
            else ""
        )
        + "Hover a point for its value."
    )
    return finish_layout(fig, title, caption=caption, height=480)


def _data_decades(curves: Mapping[str, np.ndarray], floor: float) -> tuple[float, float]:
    """log10 range of the distances (zeros at ``floor``), padded, at most 8 decades (the top kept)."""
    values = np.concatenate([np.where(v == 0, floor, v) for v in curves.values()] or [np.ones(1)])
    values = values[np.isfinite(values) & (values > 0)]
    if not values.size:
        return -1.0, 1.0
    lo, hi = math.log10(values.min()) - 0.3, math.log10(values.max()) + 0.3
    return max(lo, hi - 8.0), hi


def _near(curves: Mapping[str, np.ndarray], resolutions: Mapping[str, float]) -> dict[str, float]:
    """Resolutions within three decades of the smallest positive distance: the ones worth a line."""
    positive = np.concatenate([v[v > 0] for v in curves.values()] or [np.ones(1)])
    smallest = float(positive.min()) if positive.size else 1.0
    return {k: float(r) for k, r in resolutions.items() if k in curves and r > 0 and r >= smallest / 1e3}


def _inside(value: float, window: tuple[float, float]) -> bool:
    return value > 0 and window[0] <= math.log10(value) <= window[1] + 1.0


def _length_axis(x: np.ndarray) -> dict:
    """A log length axis ticked at the lengths run (at most 12 of them), as plain integers."""
    lengths = sorted({int(v) for v in x if v > 0})
    if not lengths or lengths[0] == lengths[-1]:
        return {}
    step = max(1, math.ceil(len(lengths) / 12))
    ticks = lengths[::step]
    return {"type": "log", "tickmode": "array", "tickvals": ticks, "ticktext": [str(t) for t in ticks]}


def _length_title_and_axis(x: np.ndarray) -> dict:
    """Lengths on a log axis (as the distance curves are) where they span a factor of 4 or more."""
    positive = x[x > 0]
    if positive.size and positive.max() >= 4 * positive.min():
        return {"title_text": "prompt length n (log axis)", **_length_axis(x)}
    return {"title_text": "prompt length n"}


def _plain(text: str) -> str:
    """Axis math for a plain-text caption: the Unicode sub/superscripts where they exist."""
    return html.unescape(re.sub(r"</?su[bp]>", "", math_text(text)))


def head_band_figure(
    lengths: Sequence[int],
    mean: Float[Tensor, "length"],
    minimum: Float[Tensor, "length"],
    maximum: Float[Tensor, "length"],
    *,
    name: str = "last-layer heads",
    log: bool = True,
    y_title: str = "‖yₙ(s) − yₙ₊₁(s*)‖ per head",
    title: str = "Collapse per attention head (mean, min–max band)",
) -> go.Figure:
    """Figure 5: the mean over heads as a line, the min–max over heads as a shaded band."""
    x = as_array(lengths, "lengths", ndim=1)
    arrays = [as_array(v, label, ndim=1) for v, label in ((mean, "mean"), (minimum, "minimum"), (maximum, "maximum"))]
    if any(len(a) != len(x) for a in arrays):
        raise ValueError("mean, minimum and maximum need one value per length")
    mean, minimum, maximum = arrays
    label = escape_label(name)
    fig = go.Figure(
        [
            go.Scatter(
                x=x,
                y=trace_data(maximum),
                mode="lines",
                line={"width": 0},
                name=f"{label} max",
                showlegend=False,
                legendgroup=label,
                hovertemplate="max %{y:.3e}<extra></extra>",
            ),
            go.Scatter(
                x=x,
                y=trace_data(minimum),
                mode="lines",
                line={"width": 0},
                fill="tonexty",
                name=f"{label} min–max",
                fillcolor="rgba(99,110,250,0.25)",
                legendgroup=label,
                hovertemplate="min %{y:.3e}<extra></extra>",
            ),
            go.Scatter(
                x=x,
                y=trace_data(mean),
                mode="lines+markers",
                name=f"{label} mean",
                line={"color": palette_color(0)},
                legendgroup=label,
                hovertemplate="length %{x}<br>mean %{y:.3e}<extra></extra>",
            ),
        ]
    )
    fig.update_xaxes(**_length_title_and_axis(x))
    fig.update_yaxes(title_text=math_text(y_title), type="log" if log else "linear")
    caption = (
        f"The representational-collapse distance measured at each attention head of the last layer ({name}) "
        "against prompt length (cf. the paper's Figure 5): the line is the mean over heads, the shaded band "
        "spans the smallest to the largest head. A narrow band means every head collapses alike."
    )
    return finish_layout(fig, title, caption=caption, height=450, hovermode="x unified")


def pe_figure(
    lengths: Sequence[int],
    curves: Mapping[str, tuple[Float[Tensor, "length"], Float[Tensor, "length"]]],
    *,
    log: bool = True,
    y_title: str = _COLLAPSE_DISTANCE,
    title: str = "Collapse by positional encoding (synthetic decoders)",
) -> go.Figure:
    """One line per positional encoding (mean over models) with a ±1 std band."""
    x = as_array(lengths, "lengths", ndim=1)
    fig = go.Figure()
    for i, (name, (mean, std)) in enumerate(curves.items()):
        mean, std = as_array(mean, "mean", ndim=1), as_array(std, "std", ndim=1)
        label, color = escape_label(name), palette_color(i)
        upper, lower = mean + std, mean - std
        if log:  # a band reaching ≤ 0 cannot be drawn on a log axis: clip it at the mean's smallest value
            lower = np.where(lower > 0, lower, np.nanmin(mean[mean > 0]) if (mean > 0).any() else np.nan)
        fig.add_trace(
            go.Scatter(
                x=x,
                y=trace_data(upper),
                mode="lines",
                line={"width": 0},
                showlegend=False,
                legendgroup=label,
                name=f"{label} +std",
                hoverinfo="skip",
            )
        )
        fig.add_trace(
            go.Scatter(
                x=x,
                y=trace_data(lower),
                mode="lines",
                line={"width": 0},
                fill="tonexty",
                fillcolor=_rgba(color, 0.2),
                showlegend=False,
                legendgroup=label,
                name=f"{label} −std",
                hoverinfo="skip",
            )
        )
        dash, symbol = line_style(i)
        fig.add_trace(
            go.Scatter(
                x=x,
                y=trace_data(mean),
                mode="lines+markers",
                name=label,
                legendgroup=label,
                line={"color": color, "dash": dash},
                marker={"symbol": symbol, "size": 6},
                customdata=trace_data(std),
                hovertemplate=f"{label}<br>length %{{x}}<br>%{{y:.3e}} ± %{{customdata:.1e}}<extra></extra>",
            )
        )
    fig.update_xaxes(**_length_title_and_axis(x))
    fig.update_yaxes(title_text=math_text(y_title), type="log" if log else "linear")
    caption = (
        "Representational collapse in small untrained decoders that differ only in their positional encoding "
        "(cf. the paper's Figure 7): each line is the mean distance over the seeded models, the band ±1 "
        "standard deviation. A curve that falls faster with length collapses sooner."
    )
    return finish_layout(fig, title, caption=caption, height=450)


def _rgba(color: str, alpha: float) -> str:
    color = color.lstrip("#")
    r, g, b = (int(color[i : i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def tv_figure(
    lengths: Sequence[int],
    tv: Float[Tensor, "seed length"],
    bound: Float[Tensor, "seed length"] | Float[Tensor, "length"] | None = None,
    *,
    seeds: Sequence[int] | None = None,
    title: str = "Softmax total variation between x[:m] and x*[:m] (Lemma B.2)",
) -> go.Figure:
    """Figure 9: the TV of each seed against the prefix length ``m`` (log–log), bounds dashed."""
    x = as_array(lengths, "lengths", ndim=1)
    tv = as_array(tv, "tv")
    tv = tv[None] if tv.ndim == 1 else tv
    seeds = list(range(tv.shape[0])) if seeds is None else list(seeds)
    bounds = None if bound is None else as_array(bound, "bound")
    per_seed = bounds is not None and bounds.ndim == 2
    fig = go.Figure()
    for i, seed in enumerate(seeds):
        fig.add_trace(
            go.Scatter(
                x=x,
                y=trace_data(tv[i]),
                mode="lines+markers",
                name=f"TV, one line per seed ({len(seeds)})" if i == 0 else f"seed {seed}",
                showlegend=i == 0,  # one entry per kind of line, the seed in the hover: a sane legend
                line={"color": palette_color(i)},
                marker={"symbol": line_style(i)[1], "size": 5},
                legendgroup="tv",
                hovertemplate=f"seed {seed}<br>m %{{x}}<br>TV %{{y:.3e}}<extra></extra>",
            )
        )
        if bounds is not None and (per_seed or i == 0):
            name = "Lemma B.2 bound, one per seed" if per_seed else "Lemma B.2 bound"
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=trace_data(bounds[i] if per_seed else bounds),
                    mode="lines",
                    name=name,
                    showlegend=i == 0,
                    legendgroup="bound",
                    line={"color": palette_color(i), "dash": "dash"},
                    hovertemplate=f"seed {seed}<br>m %{{x}}<br>bound %{{y:.3e}}<extra></extra>",
                )
            )
    fig.update_xaxes(title_text="prefix length m", type="log")
    fig.update_yaxes(title_text="total variation", type="log")
    caption = (
        "Total-variation distance between the softmax of a score vector and of the same vector with one entry "
        "changed, over the first m entries (log–log; Lemma B.2, cf. the paper's Figure 9): one solid curve per "
        "seed, the lemma's bound dashed. The distance decays as the prefix grows, and stays under its bound."
    )
    return finish_layout(fig, title, caption=caption, height=450)


@register_figure(TVDecayResult, "tv")
def tv_decay_figure(result: Any, **kwargs) -> go.Figure:
    """:func:`tv_figure` for a ``softmax_theory.TVDecayResult``."""
    return tv_figure(result.lengths, result.tv, result.bound, seeds=result.seeds, **kwargs)


# --------------------------------------------------------------------------------------------------
# figure kinds: collapse, sliding windows, positional encodings (Result.plot)
# --------------------------------------------------------------------------------------------------


@register_figure(CollapseResult, "dtypes")
def _collapse_dtypes(result: CollapseResult, *, versus: CollapseResult | None = None, **kwargs):
    """Relative ∞-distance of ``y`` per dtype, each dtype's resolution dashed; ``versus=`` overlays
    another family measured at the same lengths (e.g. ``copy_ones`` against ``copy_ones_commas``)."""
    if versus is None:
        curves = dict(zip(result.dtypes, result.final("inf"), strict=True))
        resolutions = result.resolutions
    else:
        if list(map(int, versus.lengths)) != list(map(int, result.lengths)):
            raise ValueError("versus= needs a result measured at the same lengths; rerun it with this one's lengths")
        both = (result, versus)
        curves = {f"{r.family} ({d})": v for r in both for d, v in zip(r.dtypes, r.final("inf"), strict=True)}
        resolutions = {}
        for r in both:  # one line (or note) per distinct resolution: two float32 families share theirs
            for d in r.dtypes:
                if r.resolutions[d] not in resolutions.values():
                    resolutions[f"{r.family} ({d})"] = r.resolutions[d]
        kwargs.setdefault("title", f"Representational collapse: {result.family} against {versus.family}")
    kwargs.setdefault("y_title", "‖y − y*‖∞ / ‖y‖∞")
    kwargs.setdefault("title", f"Representational collapse: {result.family}")
    return collapse_figure(result.lengths, curves, resolutions, **kwargs)


@register_figure(CollapseResult, "heads")
def _collapse_heads(result: CollapseResult, dtype: str | None = None, **kwargs):
    """Mean and min–max over last-layer heads for one dtype (Fig. 5)."""
    d = result.dtypes.index(dtype) if dtype is not None else 0
    h = result.head_distances[d]
    kwargs.setdefault("name", f"last-layer heads ({result.dtypes[d]})")
    kwargs.setdefault("title", f"Collapse per head: {result.family}")
    return head_band_figure(result.lengths, h.mean(-1), h.min(-1).values, h.max(-1).values, **kwargs)


def _window_sweep(what: str):
    def draw(result: WindowSweepResult, **kwargs):
        values = result.distance if what == "distance" else result.bound_first_share
        kwargs.setdefault("y_title", "‖y − y*‖∞ / ‖y‖∞" if what == "distance" else "rollout bound share on token 0")
        kwargs.setdefault("title", f"Sliding-window attention (App. C.6): {result.family}")
        return collapse_figure(result.lengths, dict(zip(result._labels(), values, strict=True)), **kwargs)

    return draw


register_figure(WindowSweepResult, "distance")(_window_sweep("distance"))
register_figure(WindowSweepResult, "bound")(_window_sweep("bound"))


@register_figure(PECollapseResult, "distance")
def _pe_collapse(result: PECollapseResult, **kwargs):
    kwargs.setdefault("title", f"Collapse by positional encoding ({result.site})")
    return pe_figure(result.lengths, result.mean_std(), **kwargs)


@register_figure(RatioInvarianceResult, "distance")
def _ratio_invariance(result: RatioInvarianceResult, **kwargs):
    kwargs.setdefault("y_title", "‖y(k) − y(1)‖ / ‖y(1)‖")
    kwargs.setdefault("title", "Ratio invariance (Prop. B.9)")
    return collapse_figure(list(result.multiples), {"relative distance": result.distances}, **kwargs)
