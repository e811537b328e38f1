"""Figures for results that are a handful of statistics: one comparison, and many prompts at once.

:func:`comparison_figure_of` draws one :class:`~lens_squash.algebra.compare.Comparison` (how a
bound's profile ranks positions against the Jacobian, and how far above it it sits);
:func:`prompts_figure` draws a :class:`~lens_squash.experiments.many.ManyAnalyses` table, one
point per prompt for each variant. :mod:`.registry` makes them those results' ``plot()`` kinds.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..algebra.compare import Comparison
from ..core.results import register_figure
from ..experiments.many import ManyAnalyses
from .style import escape_label, finish_layout, line_style, log_axis, palette_color

__all__ = ["comparison_figure_of", "prompts_figure"]

_RANKS = (("spearman", "Spearman ρ"), ("kendall", "Kendall τ"), ("top5_overlap", "top-5 overlap"))
_RATIOS = (("ratio_min", "min"), ("ratio_median", "median"), ("ratio_max", "max"))


@register_figure(Comparison, "statistics")
def comparison_figure_of(comparison: Any, *, title: str | None = None) -> go.Figure:
    """Two panels: the rank agreements on [−1, 1], and the bound ÷ truth ratios on a log axis."""
    fig = make_subplots(
        rows=1, cols=2, subplot_titles=["rank agreement with the truth", "bound ÷ truth over positions"]
    )
    stats = _statistics(comparison)
    ranks = [stats[name] for name, _ in _RANKS]
    ratios = [stats[name] for name, _ in _RATIOS]
    fig.add_trace(
        go.Bar(
            x=[label for _, label in _RANKS],
            y=ranks,
            name="rank agreement",
            marker={"color": palette_color(0)},
            hovertemplate="%{x}: %{y:.4g}<extra></extra>",
        ),
        row=1,
        col=1,
    )
    fig.add_trace(
        go.Bar(
            x=[label for _, label in _RATIOS],
            y=ratios,
            name="bound ÷ truth",
            marker={"color": palette_color(1)},
            hovertemplate="%{x}: %{y:.4g}<extra></extra>",
        ),
        row=1,
        col=2,
    )
    fig.update_yaxes(title_text="agreement (1: same order)", range=[-1.05, 1.05], row=1, col=1)
    fig.update_yaxes(title_text="bound ÷ truth", **log_axis(np.asarray(ratios)), row=1, col=2)
    fig.update_xaxes(title_text="statistic", row=1, col=1)
    fig.update_xaxes(title_text="over positions", row=1, col=2)
    below = int(comparison.violations)
    caption = (
        f"How the {comparison.variant} bound's per-position profile compares with the {comparison.truth} "
        "Jacobian norms. Left: rank agreements (Spearman, Kendall, and the share of the five most sensitive "
        "positions both pick); 1 means the bound orders positions exactly as the Jacobian does. Right: the "
        "smallest, median and largest ratio of bound to truth; a guaranteed bound keeps every ratio at or "
        f"above 1. {below} position(s) lie below the truth."
    )
    return finish_layout(
        fig,
        title or f"{comparison.variant} against the {comparison.truth} Jacobian",
        caption=caption,
        showlegend=False,
        height=380,
    )


def _statistics(c: Any) -> dict[str, float]:
    return {
        "spearman": float(c.spearman),
        "kendall": float(c.kendall),
        "top5_overlap": float(c.top5_overlap),
        "ratio_min": float(c.ratio_min),
        "ratio_median": float(c.ratio_median),
        "ratio_max": float(c.ratio_max),
    }


def prompts_figure(frame: Any, *, column: str = "spearman", title: str | None = None) -> go.Figure:
    """``column`` of the many-prompt table, one point per prompt, grouped by variant."""
    if column not in frame.columns:
        raise ValueError(f"the table has no column {column!r}; use one of {list(frame.columns)}")
    fig = go.Figure()
    rows = frame[frame[column].notna()] if len(frame) else frame
    for i, (variant, group) in enumerate(rows.groupby("variant", sort=False)):
        dash, symbol = line_style(i)
        labels = [escape_label(str(p)) for p in group.get("prompt", group.index)]
        fig.add_trace(
            go.Box(
                y=group[column].astype(float).to_numpy(),
                name=escape_label(str(variant)),
                boxpoints="all",
                jitter=0.3,
                marker={"color": palette_color(i), "symbol": symbol},
                text=labels,
                hovertemplate="%{text}<br>%{y:.4g}<extra>" + escape_label(str(variant)) + "</extra>",
            )
        )
    fig.update_xaxes(title_text="variant")
    fig.update_yaxes(title_text=escape_label(column))
    caption = (
        f"The {column} column of the many-prompt table: one point per prompt for each variant, with the "
        "box showing the quartiles. A variant whose points sit high and close together ranks positions like "
        "the Jacobian on every prompt, not just on average."
    )
    return finish_layout(
        fig,
        title or f"{column} per variant over {frame['prompt_index'].nunique() if len(frame) else 0} prompts",
        caption=caption,
        showlegend=False,
        height=420,
    )


@register_figure(ManyAnalyses, "spearman", default=True)
def _many_spearman(many: ManyAnalyses, **kwargs):
    return prompts_figure(many.frame, **kwargs)
