"""Copying and counting results against sequence length (the paper's Figs. 2–4)."""

from __future__ import annotations

from typing import Any

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..core.results import register_figure
from ..experiments.task_results import TASK_FIGURES, TaskResults, task_figure_rows
from .style import (
    escape_label,
    finish_layout,
    line_style,
    palette_color,
    trace_data,
)

__all__ = [
    "TASK_CHARTS",
    "abs_error_figure",
    "accuracy_figure",
    "answer_histogram",
]


def _task_frame(results: Any) -> pd.DataFrame:
    frame = getattr(results, "frame", results)
    if not isinstance(frame, pd.DataFrame):
        raise TypeError("pass a TaskResults or its DataFrame")
    missing = {"task", "length"} - set(frame.columns)
    if missing:
        raise ValueError(f"the results frame lacks columns {sorted(missing)}")
    frame = frame.copy()
    modes = frame["style"] if "style" in frame.columns else pd.Series([""] * len(frame), index=frame.index)
    several = frame.assign(_mode=modes).groupby("task")["_mode"].nunique() > 1
    frame["series"] = [
        f"{t} ({m})" if several.get(t, False) else str(t) for t, m in zip(frame["task"], modes, strict=True)
    ]
    return frame


def _per_length_figure(
    frame: pd.DataFrame, column: str, y_title: str, title: str, caption: str, y_range=None
) -> go.Figure:
    fig = go.Figure()
    for i, (series, group) in enumerate(frame.groupby("series", sort=True)):
        stats = group.groupby("length")[column].agg(["mean", "count"]).reset_index()
        dash, symbol = line_style(i)
        fig.add_trace(
            go.Scatter(
                x=stats["length"].to_numpy(),
                y=trace_data(stats["mean"].to_numpy(dtype=float)),
                customdata=stats["count"].to_numpy(),
                mode="lines+markers",
                name=escape_label(series),
                line={"color": palette_color(i), "dash": dash},
                marker={"symbol": symbol, "size": 7},
                hovertemplate=f"{escape_label(series)}<br>length %{{x}}<br>{y_title} %{{y:.3g}} (n = %{{customdata}})<extra></extra>",
            )
        )
    fig.update_xaxes(title_text="sequence length")
    fig.update_yaxes(title_text=y_title, range=y_range)
    return finish_layout(fig, title, caption=caption, height=450)


def accuracy_figure(results: Any, *, title: str = "Accuracy against sequence length") -> go.Figure:
    """Figure 2: the fraction of correct answers per task (and mode) and length."""
    frame = _task_frame(results)
    frame["correct"] = frame["correct"].astype(float)
    caption = (
        "The fraction of the model's answers that are exactly right (y) at each sequence length (x), one line "
        "per task (cf. the paper's Figure 2); hover a point for the number of samples behind it."
    )
    return _per_length_figure(frame, "correct", "accuracy", title, caption, y_range=[-0.03, 1.03])


def abs_error_figure(results: Any, *, title: str = "Mean absolute error against sequence length") -> go.Figure:
    """Figure 3: the mean absolute error of parsed answers (unparsable answers left out)."""
    frame = _task_frame(results)
    frame["abs_error"] = pd.to_numeric(frame["abs_error"], errors="coerce").astype(float)
    caption = (
        "The mean absolute difference between the model's parsed answer and the true one (y) at each sequence "
        "length (x), one line per task (cf. the paper's Figure 3); answers that could not be parsed as a number "
        "are left out, and the hover gives how many samples remain."
    )
    return _per_length_figure(frame.dropna(subset=["abs_error"]), "abs_error", "mean |answer − truth|", title, caption)


def answer_histogram(
    results: Any,
    *,
    task: str | None = None,
    title: str = "Distribution of the model's answers",
) -> go.Figure:
    """Figure 4: how often each parsed answer occurs, one panel per task (and mode), one bar trace per
    length; a triangle marks the true answer where it is the same for every sample of a length."""
    frame = _task_frame(results)
    column = "parsed_answer" if "parsed_answer" in frame.columns else "parsed"
    if task is not None:
        frame = frame[frame["task"] == task]
        if frame.empty:
            raise ValueError(f"no rows for task {task!r}")
    series_names = sorted(frame["series"].unique())
    lengths = sorted(frame["length"].unique())
    cap = _answer_cap(frame)
    height = max(400, 320 * len(series_names))
    fig = make_subplots(
        rows=len(series_names),
        cols=1,
        subplot_titles=[escape_label(s) for s in series_names],
        vertical_spacing=90 / height,
    )
    for row, series in enumerate(series_names, start=1):
        group = frame[frame["series"] == series]
        for i, length in enumerate(lengths):
            rows = group[group["length"] == length]
            if rows.empty:
                continue
            answers = pd.to_numeric(rows[column], errors="coerce").dropna().astype(int)
            # one runaway answer (a 1111 among counts up to 80) would squeeze every bar into a line:
            # answers beyond the cap are gathered in one bar just past it, their values in its hover
            counts = answers.clip(upper=cap + 1).value_counts().sort_index()
            beyond = sorted(answers[answers > cap].unique())
            unparsable = len(rows) - len(answers)
            name = f"n = {length}" + (f" ({unparsable} unparsable)" if unparsable else "")
            shown = [f"> {cap}: {', '.join(map(str, beyond))}" if x > cap else str(x) for x in counts.index]
            # every reply unparsable: no bar (an empty one takes a slot of the group, a zero one narrows every
            # bar); the truth's triangle carries the length and its count into the legend instead
            if not counts.empty:
                fig.add_trace(
                    go.Bar(
                        x=counts.index.to_numpy(),
                        y=counts.to_numpy(),
                        customdata=shown,
                        name=name,
                        legendgroup=f"n{length}",
                        showlegend=row == 1,
                        marker={"color": palette_color(i)},
                        hovertemplate=f"length {length}<br>answer %{{customdata}}: %{{y}} samples<extra></extra>",
                    ),
                    row=row,
                    col=1,
                )
            truths = rows["truth"].unique() if "truth" in rows.columns else []
            if len(truths) == 1:
                fig.add_trace(
                    go.Scatter(
                        x=[int(truths[0])],
                        y=[0],
                        mode="markers",
                        legendgroup=f"n{length}",
                        showlegend=row == 1 and counts.empty,
                        name=name if counts.empty else f"truth, n = {length}",
                        marker={"symbol": "triangle-up", "size": 12, "color": palette_color(i)},
                        hovertemplate=f"true answer for length {length}: %{{x}}<extra></extra>",
                    ),
                    row=row,
                    col=1,
                )
        fig.update_xaxes(title_text="parsed answer", row=row, col=1)
        fig.update_yaxes(title_text="samples", row=row, col=1)
    caption = (
        "How often the model gave each answer (x: the parsed answer, y: the number of samples), one panel per "
        "task and one bar colour per sequence length (cf. the paper's Figure 4); a triangle on the axis marks "
        "the true answer of that length. The legend counts the answers that could not be parsed."
    )
    if (pd.to_numeric(frame[column], errors="coerce") > cap).any():
        caption += f" Answers above {cap} (twice the largest true answer) are gathered in the bar at {cap + 1}."
    return finish_layout(fig, title, caption=caption, barmode="group", height=height)


def _answer_cap(frame: pd.DataFrame) -> int:
    """Twice the largest true answer (at least 10): the histogram's x-axis ends just past it."""
    truths = pd.to_numeric(frame["truth"], errors="coerce").dropna() if "truth" in frame.columns else pd.Series()
    return max(10, 2 * int(truths.max())) if len(truths) else 10**9


#: chart name (``TaskFigure.chart``) -> builder(rows, *, title)
TASK_CHARTS = {"accuracy": accuracy_figure, "abs_error": abs_error_figure, "histogram": answer_histogram}


# --------------------------------------------------------------------------------------------------
# figure kinds: the paper's task figures (Result.plot)
# --------------------------------------------------------------------------------------------------


def _task(kind: str):
    def draw(results: TaskResults, *, tasks=None):
        rows, figure = task_figure_rows(results, kind, tasks)
        return TASK_CHARTS[figure.chart](rows, title=figure.title)

    return draw


for _kind in TASK_FIGURES:  # the paper's Figs. 2, 3, 4 and 11, "accuracy" (Fig. 2) first: the default
    register_figure(TaskResults, _kind)(_task(_kind))
