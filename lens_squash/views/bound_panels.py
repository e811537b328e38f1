"""Bound against truth that can be read: shares on one axis, the ratio to the truth, rank against rank.

Raw path-sum bounds span tens of decades (``paper`` 1e-10 to 1e60 on SmolLM2) while the Jacobian
spans two, so one raw axis makes the truth look flat. :func:`bound_truth_figure` instead draws

1. each curve as a share of its own total, on one log axis cut to :data:`MAX_DECADES` decades below
   the largest share (smaller shares sit on the bottom edge, marked ▼, their value in the hover);
2. the ratio bound/truth per position on its own log axis with a line at 1: under it the variant is
   below the truth — a violation for a registered ``bound``, allowed for a ``proxy`` (the legend says
   which each variant is); the axis spans at most :data:`MAX_DECADES` decades and always shows 1;
3. one rank-against-rank panel per variant (1 = the most sensitive position): on the diagonal the
   variant orders positions as the truth does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from ..algebra.ranks import rank_average
from ..core.results import register_figure
from ..experiments.analysis import Analysis
from .bound_figures import bound_vs_jacobian
from .style import escape_label, finish_layout, line_style, palette_color, position_labels, token_ticks

__all__ = ["MAX_DECADES", "bound_truth_figure", "bound_truth_from_table", "clip_decades", "decade_window"]

#: no panel's log axis spans more than this many decades
MAX_DECADES = 8

_BELOW = "rgba(220,60,60,0.08)"


def decade_window(
    values: np.ndarray, *, include: float | None = None, decades: int = MAX_DECADES
) -> tuple[float, float]:
    """``(lo, hi)`` in log10 units: the data's range when it spans at most ``decades``; else the top
    ``decades`` (shares: where the mass is), or, with ``include``, ``decades`` centred on it (a ratio
    panel's line at 1)."""
    logs = np.log10(values[np.isfinite(values) & (values > 0)])
    if include is not None:
        logs = np.append(logs, math.log10(include))
    if logs.size == 0:
        return -1.0, 1.0
    lo, hi = float(logs.min()), float(logs.max())
    pad = 0.15
    if hi - lo <= decades - 2 * pad:
        return lo - pad, hi + pad
    if include is None:  # shares: keep the top (where the mass is)
        return hi + pad - decades, hi + pad
    half = decades / 2  # a ratio: the line at 1 in the middle, the rest on the edges
    return math.log10(include) - half, math.log10(include) + half


def clip_decades(values: np.ndarray, window: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Values moved onto the window's edges where they fall outside it, and a mask of those moved."""
    lo, hi = 10 ** window[0], 10 ** window[1]
    safe = np.where(np.isfinite(values) & (values > 0), values, lo)
    clipped = np.clip(safe, lo * 1.0001, hi / 1.0001)
    return clipped, clipped != safe


def _shares(values: np.ndarray) -> np.ndarray:
    total = float(np.nansum(values))
    return values / total if total > 0 else np.full_like(values, np.nan)


def _curve(x, values, window, labels, name, colour, style, *, width=2.0, legend=True, group=None) -> go.Scatter:
    shown, moved = clip_decades(values, window)
    dash, symbol = line_style(style)
    above = moved & (shown >= 10 ** window[1] / 1.001)
    symbols = np.where(above, "triangle-up", np.where(moved, "triangle-down", symbol))
    return go.Scatter(
        x=x,
        y=shown,
        name=escape_label(name),
        legendgroup=escape_label(group or name),
        showlegend=legend,
        mode="lines+markers",
        line={"color": colour, "dash": dash, "width": width},
        marker={"size": np.where(moved, 9.0, 5.0).astype(np.float32), "symbol": symbols.tolist()},
        customdata=np.stack([np.asarray(labels, dtype=object), values.astype(object)], axis=-1),
        hovertemplate="position %{x} · %{customdata[0]}<br>"
        + escape_label(name)
        + ": %{customdata[1]:.4g}<extra></extra>",
    )


def _rank_panel(fig, row, col, truth, values, name, colour, rho) -> None:
    truth_rank = len(truth) + 1 - rank_average(torch.tensor(np.array(truth), dtype=torch.float64)).numpy()
    bound_rank = len(values) + 1 - rank_average(torch.tensor(np.array(values), dtype=torch.float64)).numpy()
    n = len(truth)
    fig.add_trace(
        go.Scatter(
            x=[1, n], y=[1, n], mode="lines", line={"color": "#bbb", "dash": "dot"}, showlegend=False, hoverinfo="skip"
        ),
        row=row,
        col=col,
    )
    fig.add_trace(
        go.Scatter(
            x=truth_rank.astype(np.float32),
            y=bound_rank.astype(np.float32),
            mode="markers",
            marker={"color": colour, "size": 5},
            showlegend=False,
            name=escape_label(name),
            hovertemplate="truth rank %{x:.0f} · " + escape_label(name) + " rank %{y:.0f}<extra></extra>",
        ),
        row=row,
        col=col,
    )
    fig.update_xaxes(title_text="truth rank", range=[0, n + 1], row=row, col=col)
    fig.update_yaxes(title_text="variant rank", range=[0, n + 1], row=row, col=col)


def _guarantee_label(name: str, guarantees: Mapping[str, str]) -> str:
    return f"{name} ({'bound' if guarantees.get(name) == 'bound' else 'proxy'})"


def bound_truth_figure(
    str_tokens: Sequence[str] | None,
    truth: Any,
    bounds: Mapping[str, Any],
    guarantees: Mapping[str, str],
    *,
    stats: Mapping[str, Any] | None = None,
    truth_name: str = "Jacobian",
    title: str = "Where the last token's sensitivity lives: truth against each variant",
) -> go.Figure:
    """Shares, ratio and rank panels (module docstring) for a ``[pos]`` truth and ``name -> [pos]``
    bounds; ``guarantees`` maps each name to ``"bound"`` or ``"proxy"`` (the registry's word),
    ``stats`` to an object with ``spearman`` (computed from the curves when absent)."""
    truth = np.asarray(truth, dtype=np.float64)
    curves = {k: np.asarray(getattr(v, "bound", v), dtype=np.float64) for k, v in bounds.items()}
    if not curves:
        raise ValueError("nothing to compare: pass at least one bound")
    if any(len(v) != len(truth) for v in curves.values()):
        raise ValueError(f"every bound must have {len(truth)} positions, got {[len(v) for v in curves.values()]}")
    missing = sorted(set(curves) - set(guarantees))
    if missing:
        raise ValueError(f"no guarantee ('bound' or 'proxy') for {missing}")
    n, cols = len(truth), min(len(curves), 6)
    labels, x = position_labels(str_tokens, n), np.arange(n)
    specs = [[{"colspan": cols}] + [None] * (cols - 1)] * 2 + [[{}] * cols]
    fig = make_subplots(
        rows=3,
        cols=cols,
        specs=specs,
        row_heights=[0.38, 0.32, 0.30],
        vertical_spacing=0.12,
        subplot_titles=[
            "each curve ÷ its own total (shares of one axis)",
            "bound ÷ truth per position (under the red line: below the truth)",
            *[_rank_title(name, guarantees, stats, curves[name], truth) for name in list(curves)[:cols]],
        ],
    )
    shares = {truth_name: _shares(truth)} | {k: _shares(v) for k, v in curves.items()}
    share_window = decade_window(np.concatenate(list(shares.values())))
    for i, (name, values) in enumerate(shares.items()):
        is_truth = i == 0
        colour = "black" if is_truth else palette_color(i - 1)
        label = name if is_truth else _guarantee_label(name, guarantees)
        fig.add_trace(
            _curve(x, values, share_window, labels, label, colour, i, width=3.5 if is_truth else 2.0), row=1, col=1
        )
    ratios = {k: v / np.maximum(truth, np.finfo(float).tiny) for k, v in curves.items()}
    ratio_window = decade_window(np.concatenate(list(ratios.values())), include=1.0)
    for i, (name, values) in enumerate(ratios.items()):
        label = _guarantee_label(name, guarantees)
        fig.add_trace(
            _curve(x, values, ratio_window, labels, label, palette_color(i), i + 1, legend=False, group=label),
            row=2,
            col=1,
        )
    _ratio_line(fig, ratio_window)
    for i, name in enumerate(list(curves)[:cols]):
        rho = _spearman(stats, name, curves[name], truth)
        _rank_panel(fig, 3, i + 1, truth, curves[name], name, palette_color(i), rho)
    fig.update_yaxes(type="log", range=list(share_window), title_text="share of its total", row=1, col=1)
    fig.update_yaxes(type="log", range=list(ratio_window), title_text="bound ÷ truth", row=2, col=1)
    for row in (1, 2):
        fig.update_xaxes(title_text="input position i", row=row, col=1, **token_ticks(labels))
    caption = _caption(n, truth_name, list(curves), guarantees, list(curves)[cols:])
    return finish_layout(
        fig, title, caption=caption, height=1150, hovermode="closest",
        legend={"orientation": "h", "y": 1.04, "yanchor": "bottom", "x": 0},
        margin={"t": 150},
    )  # fmt: skip


def _spearman(stats, name, values, truth) -> float:
    if stats and name in stats:
        value = stats[name]
        return float(value["spearman"] if isinstance(value, Mapping) else value.spearman)
    from ..algebra.ranks import spearman

    try:
        return spearman(torch.tensor(np.array(values)), torch.tensor(np.array(truth)))
    except ValueError:
        return math.nan


def _rank_title(name, guarantees, stats, values, truth) -> str:
    rho = _spearman(stats, name, values, truth)
    ratio = values / np.maximum(truth, np.finfo(float).tiny)
    spread = f"÷ truth {np.nanmin(ratio):.1g} … {np.nanmax(ratio):.1g}"
    return f"{escape_label(_guarantee_label(name, guarantees))}: ρ = {'n/a' if math.isnan(rho) else f'{rho:.2f}'}<br>{spread}"


def _ratio_line(fig: go.Figure, window: tuple[float, float]) -> None:
    fig.add_hrect(y0=10 ** window[0], y1=1.0, fillcolor=_BELOW, line_width=0, layer="below", row=2, col=1)
    fig.add_hline(
        y=1.0, line={"color": "red", "width": 1.5}, row=2, col=1,
        annotation_text="ratio 1 — below: under the truth (a violation for a bound, allowed for a proxy)",
        annotation_position="bottom right", annotation_font={"size": 11, "color": "#b00"},
    )  # fmt: skip


def _caption(n: int, truth_name: str, names: list[str], guarantees: Mapping[str, str], hidden: list[str]) -> str:
    bounds = [k for k in names if guarantees.get(k) == "bound"]
    proxies = [k for k in names if guarantees.get(k) != "bound"]
    parts = [
        f"Top: over the {n} input positions, the truth ({truth_name}, thick black) and each variant, every curve "
        "divided by its own total, so all share one axis and only where each puts its mass is compared. The axis "
        f"spans at most {MAX_DECADES} decades; a share below it sits on the bottom edge (▼), its value in the hover.",
        "Middle: each variant divided by the truth, per position, on a log axis with a red line at 1. Under the line "
        "the variant is below the truth: "
        + (f"for {', '.join(bounds)}, registered as bounds, that is a violation; " if bounds else "")
        + (f"{', '.join(proxies)} are proxies (shares with no inequality), so that is allowed. " if proxies else "")
        + "Values beyond the axis sit on its edge (▲/▼).",
        "Bottom: rank against rank per variant (1 = the most sensitive position); on the dotted diagonal the variant "
        "orders positions as the truth does; ρ is Spearman's rank correlation.",
    ]
    if hidden:
        parts.append(f"Rank panels not drawn for {', '.join(hidden)} (six at most).")
    return " ".join(parts)


def bound_truth_from_table(table: pd.DataFrame, guarantees: Mapping[str, str], comparisons=None, **kwargs) -> go.Figure:
    """:func:`bound_truth_figure` from ``compare.compare_variants``' per-position table."""
    truth_cols = [c for c in table.columns if str(c).startswith("jacobian_")]
    if not truth_cols:
        raise ValueError("the table has no jacobian_* column: no truth to compare the bounds with")
    skip = {"position", "token", *truth_cols}
    bounds = {c: table[c].to_numpy(dtype=float) for c in table.columns if c not in skip}
    tokens = list(table["token"]) if "token" in table.columns else None
    kwargs.setdefault("truth_name", f"Jacobian ({str(truth_cols[0]).removeprefix('jacobian_')})")
    return bound_truth_figure(
        tokens, table[truth_cols[0]].to_numpy(dtype=float), bounds, guarantees, stats=comparisons, **kwargs
    )


@register_figure(Analysis, "bounds", default=True)
def _analysis_bounds(analysis: Analysis, **kwargs):
    """The report's "bound vs gradient" figure: each bound against the Jacobian it was compared with."""
    if analysis.table is not None:
        guarantees = {name: bound.guarantee_kind for name, bound in analysis.bounds.items()}
        return bound_truth_from_table(analysis.table, guarantees, analysis.comparisons, **kwargs)
    bounds = {name: bound.bound for name, bound in analysis.bounds.items()}
    return bound_vs_jacobian(analysis.trace.str_tokens, None, bounds, **kwargs)
