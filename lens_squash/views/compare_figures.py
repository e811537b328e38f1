"""Two analyses side by side (:class:`lens_squash.experiments.compare_runs.RunComparison`): the truth, each
variant and the sink curve of both sides, positions aligned from the target."""

from __future__ import annotations

from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..core.results import register_figure
from ..core.tokens import token_label
from ..experiments.compare_runs import RunComparison
from .bound_panels import clip_decades, decade_window
from .style import escape_label, finish_layout, palette_color

__all__ = ["comparison_runs_figure"]


def _shares(values: Any) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    total = values.sum()
    return values / total if total > 0 else np.full_like(values, np.nan)


def _side(fig, row, x, values, tokens, name, colour, dash, window, *, legend=True) -> None:
    shown, _ = clip_decades(values, window)
    fig.add_trace(
        go.Scatter(
            x=x,
            y=shown,
            name=escape_label(name),
            legendgroup=escape_label(name),
            showlegend=legend,
            mode="lines+markers",
            line={"color": colour, "dash": dash, "width": 2},
            marker={"size": 4},
            customdata=np.stack([np.asarray(tokens, dtype=object), values.astype(object)], axis=-1),
            hovertemplate="%{x} from the target · %{customdata[0]}<br>"
            + escape_label(name)
            + ": %{customdata[1]:.4g}<extra></extra>",
        ),
        row=row,
        col=1,
    )


@register_figure(RunComparison, "curves")
def comparison_runs_figure(result: Any, *, title: str | None = None) -> go.Figure:
    """Row 1: the truth of each side as a share of its total; row 2: every common variant likewise
    (side a solid, side b dashed, one colour per variant); row 3: the sink curve of each side."""
    a, b = result.labels
    fig = make_subplots(
        rows=3,
        cols=1,
        vertical_spacing=0.1,
        subplot_titles=(
            "truth: the Jacobian profile, each ÷ its own total",
            "each variant ÷ its own total",
            "sink curve: mean attention to the first token per layer",
        ),
    )
    sides = (
        (a, result.tokens_a, result.truth_a, result.bounds_a, "solid"),
        (b, result.tokens_b, result.truth_b, result.bounds_b, "dash"),
    )
    every = [_shares(v) for _, _, t, bounds, _ in sides for v in ([t] if t is not None else []) + list(bounds.values())]
    window = decade_window(np.concatenate(every))
    for label, tokens, truth, bounds, dash in sides:
        x = np.arange(len(tokens)) - (len(tokens) - 1)  # 0 is the target: both sides aligned from the end
        names = [token_label(t, max_len=20) for t in tokens]
        if truth is not None:
            _side(fig, 1, x, _shares(truth), names, f"truth ({label})", "black", dash, window)
        for i, (name, values) in enumerate(bounds.items()):
            _side(fig, 2, x, _shares(values), names, f"{name} ({label})", palette_color(i), dash, window)
    for label, sinks, dash in ((a, result.sinks_a, "solid"), (b, result.sinks_b, "dash")):
        fig.add_trace(
            go.Scatter(
                x=np.arange(len(sinks)), y=np.asarray(sinks, dtype=np.float64), name=f"sink curve ({escape_label(label)})",
                mode="lines+markers", line={"color": "#7f3c8d", "dash": dash},
                hovertemplate="layer %{x}: %{y:.3f}<extra>" + escape_label(label) + "</extra>",
            ),
            row=3, col=1,
        )  # fmt: skip
    for row in (1, 2):
        fig.update_yaxes(type="log", range=list(window), title_text="share of its total", row=row, col=1)
        fig.update_xaxes(title_text="position relative to the target (0 = last token)", row=row, col=1)
    fig.update_yaxes(title_text="attention to token 0", range=[0, 1.02], row=3, col=1)
    fig.update_xaxes(title_text="layer", row=3, col=1)
    same = "the same tokens" if result.same_tokens else f"{len(result.tokens_a)} and {len(result.tokens_b)} tokens"
    caption = (
        f"Two analyses, {a} (solid) and {b} (dashed), reading {same}; positions are aligned from the last token "
        "(0), so the target lines up with the target. Top: the truth of each side as a share of its own total; "
        "middle: each variant the same way, one colour per variant; the axis spans at most 8 decades, smaller "
        "shares sit on its bottom edge (hover for values). Bottom: the mean attention to the first token per "
        "layer, the attention sink, on each side."
    )
    return finish_layout(
        fig, title or f"{a} against {b}", caption=caption, height=1000, hovermode="closest",
        legend={"orientation": "h", "y": -0.08},
    )  # fmt: skip
