"""Over-mixing figures (Barbero et al. 2025): how far one replaced token spreads with and without the
sink, the linear (Jacobian) picture beside it, per-head sink attention against spread, and the
training lab's sink strength and spread ratio per grid cell."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..core.results import register_figure
from ..experiments.mixing_result import SETTING_LABELS, MixingResult
from ..lab.results import SINK_SHARE_EPS, LabGrid, LabRun
from .report import ReportSection
from .style import escape_label, finish_layout, line_style, palette_color, trace_data

__all__ = [
    "lab_grid_figure",
    "lab_run_figure",
    "lab_training_figure",
    "mixing_heads_figure",
    "mixing_heatmap",
    "mixing_jacobian_figure",
    "mixing_section",
    "mixing_spread_figure",
]


def _line(fig, x, y, name: str, i: int, **where) -> None:
    dash, symbol = line_style(i)
    fig.add_trace(
        go.Scatter(
            x=trace_data(x),
            y=trace_data(y),
            name=escape_label(name),
            mode="lines+markers",
            line={"color": palette_color(i), "dash": dash},
            marker={"symbol": symbol},
        ),
        **where,
    )


@register_figure(MixingResult, "spread")
def mixing_spread_figure(result: MixingResult, *, title: str | None = None) -> go.Figure:
    """Mean relative change after the replaced position, and how many positions pass the threshold,
    per residual stream, one line per setting."""
    fig = make_subplots(
        rows=1, cols=2, subplot_titles=("mean relative change", f"positions changed > {result.threshold:g}")
    )
    layers = np.arange(result.n_layers + 1)
    for i, setting in enumerate(result.settings):
        _line(fig, layers, result.mean_change(setting), SETTING_LABELS[setting], i, row=1, col=1)
        fig.add_trace(
            go.Bar(
                x=layers,
                y=trace_data(result.spread(setting)),
                name=escape_label(setting),
                marker_color=palette_color(i),
                showlegend=False,
            ),
            row=1,
            col=2,
        )
    fig.update_yaxes(type="log", title_text="‖h′ − h‖ / ‖h‖ (mean over i > k)", row=1, col=1)
    fig.update_yaxes(title_text="positions i > k", row=1, col=2)
    fig.update_xaxes(title_text="residual stream (entering layer l)")
    caption = (
        f"Token {result.position} replaced by {len(result.replacements)} token(s); the change of every later "
        "position's residual stream, with the sink and with it removed. A sink that lets heads do nothing "
        "should keep the change smaller with it than without it."
    )
    return finish_layout(
        fig, title or "Over-mixing: spread of one replaced token by layer", caption=caption, barmode="group"
    )


@register_figure(MixingResult, "heatmap")
def mixing_heatmap(result: MixingResult, setting: str = "sink", *, title: str | None = None) -> go.Figure:
    """``log10`` relative change per residual stream and position for one setting."""
    if setting not in result.change:
        raise ValueError(f"no {setting!r} setting in this result; it holds {list(result.change)}")
    values = result.change[setting].double().clamp_min(1e-12).log10().numpy()
    labels = [escape_label(t) for t in result.str_tokens[result.position :]]
    fig = go.Figure(
        go.Heatmap(
            z=values,
            x=list(range(len(labels))),
            y=list(range(values.shape[0])),
            colorbar={"title": "log₁₀ change"},
            colorscale="Viridis",
        )
    )
    fig.update_xaxes(title_text=f"position − {result.position}", tickvals=list(range(len(labels))), ticktext=labels)
    fig.update_yaxes(title_text="residual stream (entering layer l)")
    caption = f"{SETTING_LABELS[setting]}: ‖h′ − h‖ / ‖h‖ at every layer and every position from the replaced one on."
    return finish_layout(fig, title or f"Relative change per layer and position ({setting})", caption=caption)


@register_figure(MixingResult, "jacobian")
def mixing_jacobian_figure(result: MixingResult, *, title: str | None = None) -> go.Figure:
    """The finite change and ``‖∂h_l,i / ∂x_k‖_F`` side by side, mean over positions after ``k``."""
    if result.jacobian is None:
        raise ValueError("this result has no Jacobian norms; run mixing(..., jacobian=True)")
    fig = make_subplots(rows=1, cols=2, subplot_titles=("finite replacement", "Jacobian ‖∂h_l,i / ∂x_k‖_F"))
    layers = np.arange(result.n_layers + 1)
    for i, setting in enumerate(result.jacobian):
        _line(fig, layers, result.mean_change(setting), setting, i, row=1, col=1)
        _line(fig, layers[1:], result.jacobian_mean(setting)[1:], f"{setting} (Jacobian)", i, row=1, col=2)
    fig.update_yaxes(type="log", title_text="mean relative change", row=1, col=1)
    fig.update_yaxes(type="log", title_text="mean ‖J‖_F over i > k", row=1, col=2)
    fig.update_xaxes(title_text="residual stream (entering layer l)")
    how = "exact" if result.jacobian_probes is None else f"estimated from {result.jacobian_probes} Gaussian probes"
    caption = f"The finite perturbation beside the linear picture ({how}), with the sink and with it removed."
    return finish_layout(fig, title or "Over-mixing: finite change and Jacobian", caption=caption)


@register_figure(MixingResult, "heads")
def mixing_heads_figure(result: MixingResult, *, title: str | None = None) -> go.Figure:
    """Per head: attention to the sink against the change it writes at later positions."""
    sink, spread = result.sink_attention.numpy(), result.head_spread.numpy()
    fig = go.Figure()
    for layer in range(sink.shape[0]):
        fig.add_trace(
            go.Scatter(
                x=sink[layer],
                y=spread[layer],
                mode="markers",
                name=f"layer {layer}",
                marker={"color": palette_color(layer), "symbol": line_style(layer)[1]},
                text=[f"L{layer}H{h}" for h in range(sink.shape[1])],
            )
        )
    fig.update_xaxes(title_text="mean attention to position 0 (queries 1…n−1)")
    fig.update_yaxes(type="log", title_text="head spread: mean ‖Δ(z_h W_O)ᵢ‖ / ‖h_l,i‖, i > k")
    caption = (
        f"Each point a head. Spearman over heads {result.head_correlation:+.3f}: negative means heads that "
        "attend to the sink spread the perturbation less."
    )
    return finish_layout(fig, title or "Sink attention against perturbation spread, per head", caption=caption)


def mixing_section(result: MixingResult) -> ReportSection:
    """The report section of one :class:`MixingResult` (for ``analyze``'s report when asked, and ``mixing``)."""
    figures = [mixing_spread_figure(result), mixing_heads_figure(result), mixing_heatmap(result)]
    if result.jacobian is not None:
        figures.insert(1, mixing_jacobian_figure(result))
    notes = tuple(f"{setting} skipped: {why}" for setting, why in result.skipped.items())
    return ReportSection(
        "over-mixing", figures=figures, table=result.to_frame(), trusted_html=result._repr_html_(), notes=notes
    )


@register_figure(LabRun, "training")
def lab_run_figure(run: LabRun, *, title: str | None = None) -> go.Figure:
    """One run across training: held-out loss, sink share and each layer's first-token attention."""
    fig = make_subplots(
        rows=1,
        cols=3,
        subplot_titles=("held-out loss", f"share of heads > {SINK_SHARE_EPS}", "attention to position 0"),
    )
    steps = run.steps.numpy()
    _line(fig, steps, run.loss, "loss", 0, row=1, col=1)
    _line(fig, steps, run.sink_share, "sink share", 1, row=1, col=2)
    for layer in range(run.head_attention.shape[1]):
        _line(fig, steps, run.first_token_attention[:, layer], f"layer {layer}", layer + 2, row=1, col=3)
    fig.update_xaxes(title_text="training step")
    fig.update_yaxes(title_text="cross-entropy (nats)", row=1, col=1)
    fig.update_yaxes(title_text="share of heads", row=1, col=2)
    fig.update_yaxes(title_text="mean attention", row=1, col=3)
    return finish_layout(
        fig,
        title or f"Sinks across training: {run.label}",
        caption="Measured on held-out rows of the run's own packing.",
    )


@register_figure(LabGrid, "training")
def lab_training_figure(grid: LabGrid, *, title: str | None = None) -> go.Figure:
    """Sink share across training, one line per run."""
    fig = go.Figure()
    for i, run in enumerate(grid.runs):
        _line(fig, run.steps, run.sink_share, run.label, i)
    fig.update_xaxes(title_text="training step")
    fig.update_yaxes(title_text=f"share of heads with attention to position 0 > {SINK_SHARE_EPS}")
    return finish_layout(
        fig, title or "Sink formation across training", caption="Every run of the grid on its held-out rows."
    )


@register_figure(LabGrid, "sink_share", default=True)
def lab_grid_figure(grid: LabGrid, column: str = "sink_share", *, title: str | None = None) -> go.Figure:
    """One grid column (``sink_share``, ``first_token_attention``, ``spread_ratio_mask`` …) per cell,
    one marker per seed."""
    frame = grid.to_frame()
    if column not in frame.columns:
        raise ValueError(f"the grid has no column {column!r}; it has {list(frame.columns)}")
    frame = frame.assign(cell=[f"ctx {r.n_ctx} · L{r.n_layers} · {r.packing}" for r in frame.itertuples()])
    fig = go.Figure()
    for i, seed in enumerate(sorted(frame.seed.unique())):
        part = frame[frame.seed == seed]
        fig.add_trace(
            go.Scatter(
                x=part.cell,
                y=part[column],
                mode="markers",
                name=f"seed {seed}",
                marker={"size": 10, "color": palette_color(i), "symbol": line_style(i)[1]},
            )
        )
    fig.update_xaxes(title_text="cell (context length · depth · packing)")
    fig.update_yaxes(title_text=escape_label(column.replace("_", " ")))
    caption = "spread ratio: mean change without the sink over with it (> 1: the sink held the perturbation back)."
    return finish_layout(fig, title or f"Training lab: {column.replace('_', ' ')} per cell", caption=caption)


@register_figure(LabGrid, "spread")
def _lab_grid_spread(grid: LabGrid, **kwargs) -> go.Figure:
    return lab_grid_figure(grid, "spread_ratio_mask", **kwargs)
