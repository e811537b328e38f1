"""Task behaviour against the theory: the answer digit's sensitivity and counting collapse (§3 ↔ Thm. 4.2, 5.1).

Builders for :class:`~lens_squash.experiments.task_theory.CopySensitivity` and
:class:`~lens_squash.experiments.task_theory.CountCollapse`; :mod:`.registry` makes them their
``plot()`` kinds. Both take the result's ``frame`` (one row per task and length, or per ``n``).
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..core.results import register_figure
from ..experiments.task_theory import CopySensitivity, CountCollapse
from .style import escape_label, finish_layout, line_style, palette_color

__all__ = ["copy_sensitivity_figure", "count_collapse_figure", "lines_figure"]


def lines_figure(
    frame: pd.DataFrame,
    series: str,
    panels: list[tuple[str, str]],
    title: str,
    *,
    log_y: bool = True,
    caption: str | None = None,
) -> go.Figure:
    """One panel per ``(column, y title)``: that column against ``length``, one line per ``series`` value."""
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[escape_label(t) for _, t in panels])
    for i, (name, group) in enumerate(frame.groupby(series, sort=True)):
        group = group.sort_values("length")
        dash, symbol = line_style(i)
        for col, (column, y_title) in enumerate(panels, start=1):
            label = escape_label(str(name))
            fig.add_trace(
                go.Scatter(
                    x=group["length"].to_numpy(), y=group[column].to_numpy(dtype=float), mode="lines+markers",
                    name=label, legendgroup=label, showlegend=col == 1,
                    line={"color": palette_color(i), "dash": dash}, marker={"symbol": symbol},
                    hovertemplate=f"{label}<br>length %{{x}}<br>{escape_label(y_title)} %{{y:.3g}}<extra></extra>",
                ),
                row=1, col=col,
            )  # fmt: skip
            fig.update_yaxes(title_text=escape_label(y_title), type="log" if log_y else None, row=1, col=col)
            fig.update_xaxes(title_text="sequence length", row=1, col=col)
    return finish_layout(fig, title, caption=caption, height=420)


@register_figure(CopySensitivity, "sensitivity")
def copy_sensitivity_figure(result: Any, **kwargs) -> go.Figure:
    """Jacobian norm and path bound at the answer position against length, first vs last digit."""
    variant = result.provenance.get("variant", "bound")
    kwargs.setdefault(
        "caption",
        (
            "For each copying task (one line each) and sequence length: left, the Frobenius norm of the last "
            "token's Jacobian with respect to the answer digit's input; middle, the path bound at that position; "
            "right, the bound's share on the answer position. Falling curves mean the answer is harder to read "
            "out of the last token (paper §3.1 against Thm. 5.1)."
        ),
    )
    return lines_figure(
        result.frame, "task",
        [("jacobian_frobenius", "‖∂y_n/∂v_answer‖_F"), ("bound", f"path bound ({variant})"),
         ("bound_share", "bound share of the answer position")],
        "Sensitivity of the last token to the answer digit (paper §3.1 ↔ Thm. 5.1)", **kwargs,
    )  # fmt: skip


@register_figure(CountCollapse, "distances")
def count_collapse_figure(result: Any, *, title: str | None = None) -> go.Figure:
    """The three distances against ``n`` (log scale) with the dtype's resolution as a dashed line."""
    frame = result.frame
    fig = go.Figure()
    for i, (column, name) in enumerate([("dist_inf", "‖·‖∞"), ("dist_1", "‖·‖₁"), ("dist_2", "‖·‖₂")]):
        dash, symbol = line_style(i)
        fig.add_trace(
            go.Scatter(
                x=frame["n"],
                y=frame[column].astype(float),
                mode="lines+markers",
                name=name,
                line={"color": palette_color(i), "dash": dash},
                marker={"symbol": symbol},
            )
        )
    fig.add_trace(
        go.Scatter(
            x=frame["n"],
            y=frame["resolution"].astype(float),
            mode="lines",
            name="dtype resolution",
            line={"dash": "dash", "color": "grey"},
        )
    )
    task = str(result.provenance.get("task", "count_ones"))
    fig.update_xaxes(title_text="n (ones in the prompt)")
    fig.update_yaxes(title_text="‖y(n) − y(n+1)‖", type="log")
    caption = (
        "Distance between the last token's final representations for the counting prompt with n ones and "
        "with n + 1 ones, in three norms. Below the dashed dtype resolution the two prompts are numerically "
        "the same to the model: it cannot count past that n (representational collapse, Thm. 4.2)."
    )
    return finish_layout(
        fig, title or f"Representational collapse on {task}: n vs n + 1 ones (Thm. 4.2)", caption=caption, height=420
    )
