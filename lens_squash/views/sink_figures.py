"""Per-layer sink, massive-activation and compression curves with the Mix–Compress–Refine phases (Queipo-de-Llano et al.)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from jaxtyping import Float
from plotly.subplots import make_subplots
from torch import Tensor

from ..algebra.attention_stream_metrics import metric_labels
from ..algebra.sinks import SinkReport
from ..core.results import register_figure
from ..experiments.ablation import AblationResult
from ..experiments.analysis import Analysis
from .bound_figures import bound_vs_jacobian
from .style import (
    as_array,
    escape_label,
    finish_layout,
    integer_axis,
    line_style,
    palette_color,
    trace_data,
)

__all__ = [
    "SINK_CURVES",
    "sink_figure",
    "sink_report_figure",
]

_PHASES = (("Mix", "rgba(99,110,250,0.10)"), ("Compress", "rgba(239,85,59,0.12)"), ("Refine", "rgba(0,204,150,0.10)"))

#: per-layer curve name -> (y-axis title, what it measures): the curves of ``sinks.SinkReport``
SINK_CURVES: dict[str, tuple[str, str]] = {
    "mean_first_token_attention": ("mass on token 0", "mean attention that queries 1…n−1 put on the first token"),
    "sink_rate": ("sink heads", "fraction of heads whose first-token mass exceeds ε"),
    "mixing": ("row entropy", "mean normalised attention-row entropy (1: uniform, 0: a point mass)"),
    "norm_ratio": ("‖x₀‖ / median ‖xᵢ‖", "the first token's residual norm over the median of the others"),
    "entropy": ("matrix entropy", "matrix entropy of the residual stream (1: isotropic, 0: rank one)"),
    "anisotropy": ("σ₁² / ‖X‖²", "share of the residual stream's energy in its top direction"),
    "rollout_mass": ("rollout mass on token 0", "the last token's rollout mass on token 0 after layers 0…l"),
    "dobrushin": ("τ(½(A + I))", "Dobrushin coefficient of each layer's rollout matrix"),
}


def sink_figure(
    curves: Mapping[str, Float[Tensor, "layer"]],
    phases: tuple[int, int] | None = None,
    *,
    log: Sequence[str] = (),
    title: str = "Sinks, massive activations and compression by layer",
    labels: Mapping[str, tuple[str, str]] | None = None,
) -> go.Figure:
    """One panel per per-layer curve, sharing the layer axis; Mix–Compress–Refine shaded.

    ``phases = (mix_end, compress_end)`` as returned by ``sinks.detect_phases``: layers
    ``[0, mix_end)`` mix, ``[mix_end, compress_end)`` compress, the rest refine. Curves named in
    ``log`` get a log y axis (norm ratios span orders of magnitude). Curves named as in
    :data:`SINK_CURVES` (or in ``labels``: name -> (y-axis title, description)) get those axis titles
    and descriptions; others are titled by their name.
    """
    named = SINK_CURVES if not labels else {**SINK_CURVES, **labels}
    curves = {str(k): as_array(v, f"curves[{k}]", ndim=1) for k, v in curves.items() if v is not None}
    if not curves:
        raise ValueError("pass at least one per-layer curve")
    n_layers = max(len(v) for v in curves.values())
    height = max(460, 270 * len(curves))
    fig = make_subplots(
        rows=len(curves),
        cols=1,
        shared_xaxes=True,
        vertical_spacing=110 / height,
        subplot_titles=[escape_label(named.get(k, (k, k))[1]) for k in curves],
    )
    for i, (name, values) in enumerate(curves.items()):
        fig.add_trace(
            go.Scatter(
                x=np.arange(len(values)),
                y=trace_data(values),
                mode="lines+markers",
                name=escape_label(name),
                line={"color": palette_color(i)},
                marker={"symbol": line_style(i)[1], "size": 6},
                showlegend=False,
                hovertemplate=f"{escape_label(name)}<br>layer %{{x}}: %{{y:.4g}}<extra></extra>",
            ),
            row=i + 1,
            col=1,
        )
        fig.update_yaxes(
            title_text=escape_label(named.get(name, (name, ""))[0]),
            type="log" if name in log else "linear",
            row=i + 1,
            col=1,
        )
        fig.update_xaxes(title_text="layer", showticklabels=True, row=i + 1, col=1, **integer_axis(n_layers))
    if phases is not None:
        bounds = (0, *phases, n_layers)
        for (label, color), start, end in zip(_PHASES, bounds[:-1], bounds[1:], strict=True):
            if end > start:
                fig.add_vrect(
                    x0=start - 0.5, x1=end - 0.5, fillcolor=color, line_width=0, layer="below", row="all", col=1
                )
                fig.add_annotation(
                    x=(start + end - 1) / 2,
                    y=1.0,
                    yref="paper",
                    yanchor="bottom",
                    yshift=22,
                    text=f"<i>{label}</i>",
                    showarrow=False,
                    font={"size": 12, "color": "#555"},
                )
    caption = (
        "Per-layer profiles of one forward pass, one panel each (x: layer index; curves computed from residual "
        "streams are indexed by the stream entering that layer): "
        + "; ".join(f"{name}: {named.get(name, (name, 'as named'))[1]}" for name in curves)
        + "."
        + (
            " Shading marks the Mix, Compress and Refine phases of depth (Queipo-de-Llano et al.): the Compress "
            "phase is the valley of the matrix entropy."
            if phases is not None
            else ""
        )
        + (f" Log axes: {', '.join(n for n in curves if n in log)}." if any(n in log for n in curves) else "")
    )
    return finish_layout(fig, title, caption=caption, height=height, margin={"t": 110})


_SINK_CURVES = ("mean_first_token_attention", "sink_rate", "mixing", "norm_ratio", "entropy", "anisotropy")


@register_figure(SinkReport, "curves")
def sink_report_figure(report: Any, **kwargs) -> go.Figure:
    """:func:`sink_figure` for a ``sinks.SinkReport`` (its curves, phases, log axis for norm ratios), then
    one panel per registered per-layer metric it holds (labelled as declared; by name if the metric is
    not registered in this process, e.g. a loaded file)."""
    present = report.curves()  # the report names its own curves: a renamed field cannot drop a panel silently
    curves = {name: present[name] for name in _SINK_CURVES if name in present} | dict(report.metrics)
    declared = {name: label for name, label in metric_labels().items() if name in report.metrics}
    kwargs.setdefault("log", ("norm_ratio", *(name for name, (_, _, log) in declared.items() if log)))
    labels = {name: (axis, summary) for name, (axis, summary, _) in declared.items()} | kwargs.pop("labels", {})
    return sink_figure(curves, report.phases, labels=labels, **kwargs)


# --------------------------------------------------------------------------------------------------
# figure kinds: an analysis's sinks, and clamping the massive activation (Result.plot)
# --------------------------------------------------------------------------------------------------


@register_figure(Analysis, "sinks")
def _analysis_sinks(analysis: Analysis, **kwargs):
    return sink_report_figure(analysis.sinks, **kwargs)


@register_figure(AblationResult, "changes")
def _ablation_changes(result: AblationResult, **kwargs):
    """Per-layer changes (and both first-token norm ratios), the baseline's phases shaded."""
    curves = {
        "Δ sink rate": result.sink_rate_change,
        "Δ matrix entropy": result.entropy_change,
        "first-token norm ÷ median, baseline": result.baseline.norm_ratio,
        "first-token norm ÷ median, ablated": result.ablated.norm_ratio,
    }
    kwargs.setdefault("log", tuple(name for name in curves if "÷" in name))
    kwargs.setdefault(
        "title", f"Clamping the massive activation of position {result.position} after layer {result.layer}"
    )
    return sink_figure(curves, result.baseline.phases, **kwargs)


@register_figure(AblationResult, "jacobian")
def _ablation_jacobian(result: AblationResult, **kwargs):
    """The last token's Jacobian sensitivity per position, baseline against ablated."""
    if result.jacobian_baseline is None:
        raise ValueError("this result has no Jacobians; run ablation_effect with jacobian=True")
    kwargs.setdefault("title", f"Sensitivity of the last token, clamp after layer {result.layer}")
    return bound_vs_jacobian(
        result.str_tokens,
        result.jacobian_baseline,
        {"ablated ‖J‖_F": result.jacobian_ablated},
        truth_name="baseline ‖J‖_F",
        **kwargs,
    )
