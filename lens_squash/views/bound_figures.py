"""Bound against gradient: the per-position Jacobian norm beside each variant's path-sum bound (§5, Thm. B.5)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from plotly.subplots import make_subplots
from torch import Tensor

from ..algebra import ranks
from ..algebra.variants import PathBound
from ..core.results import register_figure
from ..edge.jacobian import JacobianResult
from .style import (
    as_array,
    escape_label,
    finish_layout,
    line_style,
    log_axis,
    palette_color,
    position_labels,
    token_ticks,
    trace_data,
)

__all__ = [
    "bound_vs_jacobian",
    "comparison_figure",
]


def _bound_values(bound: Any) -> np.ndarray:
    return as_array(getattr(bound, "bound", bound), "bound", ndim=1)


def _stat(stats: Any, name: str) -> float:
    value = stats.get(name) if isinstance(stats, Mapping) else getattr(stats, name, None)
    return math.nan if value is None else float(value)


def _fmt_stat(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}"


# --------------------------------------------------------------------------------------------------
# bound versus Jacobian
# --------------------------------------------------------------------------------------------------


def _profile_trace(x, y, labels, name, color, style: int, width=2.0) -> go.Scatter:
    dash, symbol = line_style(style)
    return go.Scatter(
        x=x,
        y=trace_data(y),
        name=escape_label(name),
        mode="lines+markers",
        customdata=labels,
        line={"color": color, "dash": dash, "width": width},
        marker={"size": 6, "symbol": symbol},
        legendgroup=escape_label(name),
        hovertemplate="position %{x} · %{customdata}<br>%{fullData.name}: %{y:.4g}<extra></extra>",
    )


def _shape(values: np.ndarray) -> np.ndarray:
    total = float(np.nansum(values))
    return values / total if total > 0 else np.full_like(values, np.nan)


def _coinciding(curves: Mapping[str, np.ndarray]) -> list[tuple[str, str]]:
    """Pairs of curves whose shapes (each ÷ its sum) agree to 0.1 %: drawn on top of each other."""
    names, shapes = list(curves), {k: _shape(v) for k, v in curves.items()}
    return [
        (a, b)
        for i, a in enumerate(names)
        for b in names[i + 1 :]
        if np.allclose(shapes[a], shapes[b], rtol=1e-3, atol=0, equal_nan=True)
    ]


def _stats_text(stats: Mapping[str, Any], truth_name: str) -> str:
    lines = ["<b>rank agreement</b>", f"with {escape_label(truth_name)}", "(Spearman ρ, Kendall τ)"]
    for name, value in stats.items():
        lines.append(
            f"{escape_label(name)}: ρ = {_fmt_stat(_stat(value, 'spearman'))}, τ = {_fmt_stat(_stat(value, 'kendall'))}"
        )
    return "<br>".join(lines)


def _bound_caption(
    n: int,
    truth_name: str | None,
    names: list[str],
    *,
    log: bool,
    normalised: bool,
    same: list[tuple[str, str]],
    stats: Mapping[str, Any] | None,
) -> str:
    parts = [
        f"Each curve is a sensitivity profile over the {n} input positions of the prompt (x axis; the "
        "token is under each tick and in the hover)."
    ]
    if truth_name is not None:
        parts.append(
            f"Thick black: {truth_name}, the true sensitivity of the last token's final "
            "representation to each input position."
        )
    if names:
        parts.append(
            f"Coloured, each with its own dash and marker: the path-sum bound of {', '.join(names)} "
            "(Theorem B.5 and its variants); a bound is an upper estimate and may sit orders of magnitude "
            "above the truth."
        )
    parts.append(f"{'Top panel' if normalised else 'Y axis'}: raw values{' on a log axis' if log else ''}.")
    if normalised:
        parts.append(
            "Bottom panel: each curve divided by its own sum, so only the shape is compared: a bound "
            "that ranks positions well follows the black curve there."
        )
    for a, b in same:
        parts.append(f"{a} and {b} have the same shape and overlap; tell them apart by dash and marker.")
    if stats:
        parts.append(
            "The box gives each bound's Spearman and Kendall rank correlation with the truth across "
            "positions (1: same order, 0: unrelated, n/a: a constant curve)."
        )
    return " ".join(parts)


def bound_vs_jacobian(
    str_tokens: Sequence[str] | None,
    truth: Float[Tensor, "pos"] | None,
    bounds: Mapping[str, Float[Tensor, "pos"]],
    *,
    truth_name: str = "Jacobian ‖∂yₙ/∂vᵢ‖₂",
    stats: Mapping[str, Any] | None = None,
    log: bool = True,
    normalised: bool = True,
    title: str = "Sensitivity of the last token to each input position",
) -> go.Figure:
    """Per position, the exact Jacobian norm (thick black) and each variant's bound (one colour,
    dash style and marker each).

    ``bounds`` maps a name to a ``[pos]`` tensor or to an object with ``.bound`` (a ``PathBound``).
    The top panel shows raw values (log y by default: the bounds span orders of magnitude); with
    ``normalised`` a second panel divides every curve by its sum, so shapes (the U) compare directly.
    ``stats`` maps a bound's name to its rank statistics against the truth (a ``compare.Comparison``
    or a mapping with ``spearman`` and ``kendall``); they are written in a box on the top panel.
    """
    curves: dict[str, np.ndarray] = {}
    if truth is not None:
        curves[truth_name] = as_array(truth, "truth", ndim=1)
    curves.update({name: _bound_values(b) for name, b in bounds.items()})
    if not curves:
        raise ValueError("nothing to plot: pass a truth profile or at least one bound")
    n = len(next(iter(curves.values())))
    if any(len(v) != n for v in curves.values()):
        raise ValueError(f"every profile must have {n} positions, got {[len(v) for v in curves.values()]}")
    unknown = sorted(set(stats or {}) - set(bounds))
    if unknown:
        raise ValueError(f"stats name bounds that are not plotted: {unknown}; plotted: {sorted(bounds)}")
    labels, x = position_labels(str_tokens, n), np.arange(n)
    rows = 2 if normalised else 1
    titles = ("raw values", "each curve ÷ its sum (shape only)")[:rows]
    fig = make_subplots(rows=rows, cols=1, shared_xaxes=True, vertical_spacing=0.16, subplot_titles=titles)
    for i, (name, values) in enumerate(curves.items()):
        is_truth = truth is not None and i == 0
        color = "black" if is_truth else palette_color(i - (truth is not None))
        trace = _profile_trace(x, values, labels, name, color, i, width=3.5 if is_truth else 2.0)
        fig.add_trace(trace, row=1, col=1)
        if normalised:
            twin = _profile_trace(x, _shape(values), labels, name, color, i, width=trace.line.width)
            twin.showlegend = False
            fig.add_trace(twin, row=2, col=1)
    raw_title = (
        "Jacobian norm and bounds"
        if truth is not None and bounds
        else "Jacobian norm"
        if truth is not None
        else "path-sum bound"
    )
    fig.update_yaxes(title_text=raw_title, row=1, col=1, **(log_axis(*curves.values()) if log else {"type": "linear"}))
    if normalised:
        shapes = [_shape(v) for v in curves.values()]
        fig.update_yaxes(
            title_text="fraction of the curve's sum", row=2, col=1, **(log_axis(*shapes) if log else {"type": "linear"})
        )
    for row in range(1, rows + 1):
        fig.update_xaxes(title_text="input position i", showticklabels=True, row=row, col=1, **token_ticks(labels))
    if stats:  # in the right margin, where no curve can run under it
        fig.add_annotation(
            text=_stats_text(stats, truth_name),
            xref="paper",
            yref="paper",
            x=1.02,
            y=1.0,
            xanchor="left",
            yanchor="top",
            showarrow=False,
            align="left",
            font={"size": 11},
            bgcolor="rgba(255,255,255,0.9)",
            bordercolor="#888",
            borderwidth=1,
        )
    bound_curves = {k: v for k, v in curves.items() if k in bounds}
    same = _coinciding(bound_curves)
    caption = _bound_caption(
        n,
        truth_name if truth is not None else None,
        list(bounds),
        log=log,
        normalised=normalised,
        same=same,
        stats=stats,
    )
    return finish_layout(
        fig,
        title,
        caption=caption,
        height=460 * rows,
        hovermode="x unified",
        legend={"orientation": "h", "y": -0.22 if rows == 2 else -0.4},
        margin={"r": 230 if stats else 80},
    )


def _table_stats(table: pd.DataFrame, truth_col: str, names: Sequence[str]) -> dict[str, dict[str, float]]:
    """Spearman and Kendall of each bound column against the truth column (lens_squash.algebra.ranks,
    the functions ``compare.compare`` uses), NaN where a curve is constant or not finite."""
    truth = torch.tensor(table[truth_col].to_numpy(dtype=float))
    out = {}
    for name in names:
        bound = torch.tensor(table[name].to_numpy(dtype=float))
        try:
            out[name] = {"spearman": ranks.spearman(bound, truth), "kendall": ranks.kendall(bound, truth)}
        except ValueError:  # NaN / inf, or fewer than two positions: no rank statistic to show
            out[name] = {"spearman": math.nan, "kendall": math.nan}
    return out


def comparison_figure(table: pd.DataFrame, comparisons: Mapping[str, Any] | None = None, **kwargs) -> go.Figure:
    """:func:`bound_vs_jacobian` from the per-position table of ``compare.compare_variants``, with the
    rank statistics annotated: from ``comparisons`` (``compare_variants``' second value) when given,
    else computed from the table with :mod:`lens_squash.algebra.ranks`."""
    truth_cols = [c for c in table.columns if str(c).startswith("jacobian_")]
    skip = {"position", "token", *truth_cols}
    bounds = {c: table[c].to_numpy(dtype=float) for c in table.columns if c not in skip}
    tokens = list(table["token"]) if "token" in table.columns else None
    truth = table[truth_cols[0]].to_numpy(dtype=float) if truth_cols else None
    if truth_cols:
        kwargs.setdefault("truth_name", f"Jacobian ({str(truth_cols[0]).removeprefix('jacobian_')})")
        if comparisons is not None:
            kwargs.setdefault("stats", {k: v for k, v in comparisons.items() if k in bounds})
        else:
            kwargs.setdefault("stats", _table_stats(table, truth_cols[0], list(bounds)))
    return bound_vs_jacobian(tokens, truth, bounds, **kwargs)


# --------------------------------------------------------------------------------------------------
# figure kinds: a Jacobian's norms and a bound's profile (Result.plot)
# --------------------------------------------------------------------------------------------------

_NORM_NAMES = {"spectral": "‖J_i‖₂", "frobenius": "‖J_i‖_F", "l1": "‖J_i‖₁ (entrywise)"}


def _jacobian_norm(norm: str | None):
    def draw(result: JacobianResult, **kwargs):
        kind = norm or result.best_norm()
        kwargs.setdefault("truth_name", f"{result.mode} Jacobian {_NORM_NAMES[kind]}")
        kwargs.setdefault("normalised", False)
        kwargs.setdefault("title", f"Sensitivity of position {result.target_pos} to each input position")
        return bound_vs_jacobian(result.str_tokens, result.norms(kind), {}, **kwargs)

    return draw


register_figure(JacobianResult, "norm")(_jacobian_norm(None))
for _norm in _NORM_NAMES:
    register_figure(JacobianResult, _norm)(_jacobian_norm(_norm))


@register_figure(PathBound, "profile", default=True)
def _bound_profile(bound: PathBound, **kwargs):
    kwargs.setdefault("normalised", False)
    kwargs.setdefault("title", f"The {bound.variant} bound of position {bound.target_pos} on each input position")
    return bound_vs_jacobian(bound.str_tokens, None, {bound.variant: bound.bound}, **kwargs)
