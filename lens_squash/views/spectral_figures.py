"""Perron–Frobenius and Dobrushin analysis of the rollout stack (Prop. B.8): spectrum, τ, convergence with depth."""

from __future__ import annotations

from typing import Any

import numpy as np
import plotly.graph_objects as go
from jaxtyping import Float
from plotly.subplots import make_subplots
from torch import Tensor

from ..algebra.spectral import SpectralReport
from ..core.results import register_figure
from ..experiments.analysis import Analysis
from .style import (
    as_array,
    finish_layout,
    integer_axis,
    line_style,
    palette_color,
    trace_data,
)

__all__ = [
    "spectral_figure",
    "spectral_report_figure",
]


def _line(x, y, name, i, *, dash=None, row=None, col=None, hover="%{y:.4g}", mode="lines+markers") -> go.Scatter:
    own_dash, symbol = line_style(i)
    return go.Scatter(
        x=x,
        y=trace_data(y),
        mode=mode,
        name=name,
        line={"color": palette_color(i), "dash": dash or own_dash},
        marker={"symbol": symbol, "size": 6},
        hovertemplate=f"{name}<br>%{{x}}: {hover}<extra></extra>",
    )


def spectral_figure(
    *,
    spectrum: Float[Tensor, "layer pos"] | None = None,
    second_eigenvalue: Float[Tensor, "layer"] | None = None,
    dobrushin: Float[Tensor, "layer"] | None = None,
    rollout_mass: Float[Tensor, "depth"] | None = None,
    rank_one_distance: Float[Tensor, "depth"] | None = None,
    depth_start: int = 1,
    title: str = "Perron–Frobenius and Dobrushin analysis of the rollout stack",
) -> go.Figure:
    """Four panels (each left empty when its data is ``None``).

    * spectrum of each layer's ``Λ̃^(l)`` (its diagonal: eigenvalues of a triangular matrix) as dots,
      with the second-largest eigenvalue ``max_{i≥2} Λ̃_ii`` (the convergence rate) as a line;
    * Dobrushin's coefficient ``τ(Λ̃^(l))`` per layer;
    * the last token's mass on the first token ``[Π Λ̃]_{n,0}`` by depth;
    * distance of the product to rank one by depth and the cumulative product ``Π τ`` that bounds it
      (log y). Depth curves start at ``depth_start`` (1: after the first layer).
    """
    fig = make_subplots(
        rows=2,
        cols=2,
        vertical_spacing=0.17,
        horizontal_spacing=0.12,
        subplot_titles=(
            "spectrum of Λ̃⁽ˡ⁾ per layer",
            "Dobrushin τ(Λ̃⁽ˡ⁾) per layer",
            "last token's mass on the first token",
            "distance of Π Λ̃ to rank one",
        ),
    )
    if spectrum is not None:
        values = as_array(spectrum, "spectrum", ndim=2)
        layers = np.repeat(np.arange(values.shape[0]), values.shape[1])
        fig.add_trace(
            go.Scatter(
                x=layers,
                y=trace_data(values.ravel()),
                mode="markers",
                name="eigenvalues Λ̃_ii",
                marker={"size": 4, "opacity": 0.4, "color": palette_color(0)},
                hovertemplate="layer %{x}: eigenvalue %{y:.4g}<extra></extra>",
            ),
            row=1,
            col=1,
        )
    if second_eigenvalue is not None:
        second = as_array(second_eigenvalue, "second_eigenvalue", ndim=1)
        fig.add_trace(_line(np.arange(len(second)), second, "second eigenvalue", 1), row=1, col=1)
    if dobrushin is not None:
        tau = as_array(dobrushin, "dobrushin", ndim=1)
        fig.add_trace(_line(np.arange(len(tau)), tau, "τ per layer", 2), row=1, col=2)
        fig.add_trace(_line(np.arange(len(tau)) + 1, np.cumprod(tau), "Π τ (bound)", 2, dash="dash"), row=2, col=2)
    if rollout_mass is not None:
        mass = as_array(rollout_mass, "rollout_mass", ndim=1)
        fig.add_trace(_line(np.arange(len(mass)) + depth_start, mass, "[Π Λ̃]ₙ,₀", 3), row=2, col=1)
    if rank_one_distance is not None:
        dist = as_array(rank_one_distance, "rank_one_distance", ndim=1)
        fig.add_trace(_line(np.arange(len(dist)) + depth_start, dist, "distance to rank one", 4), row=2, col=2)
    n_layers = max(
        (len(as_array(v)) for v in (second_eigenvalue, dobrushin, rollout_mass, rank_one_distance) if v is not None),
        default=1,
    )
    fig.update_xaxes(title_text="layer l", row=1, **integer_axis(n_layers))
    fig.update_xaxes(title_text="depth (layers composed)", row=2, **integer_axis(n_layers))
    fig.update_yaxes(title_text="eigenvalue (diagonal of Λ̃⁽ˡ⁾)", row=1, col=1)
    fig.update_yaxes(title_text="τ(Λ̃⁽ˡ⁾)", row=1, col=2)
    fig.update_yaxes(title_text="[Π Λ̃]ₙ,₀", range=[-0.02, 1.02], row=2, col=1)
    fig.update_yaxes(title_text="distance (log scale)", type="log", row=2, col=2)
    caption = (
        "The rollout stack Λ̃⁽ˡ⁾ = ½(A⁽ˡ⁾ + I) (Prop. B.8), head-averaged attention per layer. Top left: each layer's "
        "eigenvalues (its diagonal, since the matrix is triangular) as dots and the second-largest as a line; "
        "the further it is below 1, the faster a deep stack forgets everything but the first token. Top right: "
        "Dobrushin's ergodicity coefficient τ of each layer (0: the layer maps every row to the same distribution, "
        "1: no contraction). Bottom left: the share of the last token's rollout on the first token after the first d "
        "layers; near 1 is Prop. B.8's degenerate limit. Bottom right: how far the product is from rank one "
        "(every token reading the same distribution), with the cumulative Π τ that bounds it (dashed)."
    )
    return finish_layout(fig, title, caption=caption, height=800)


def _report_fields(report: Any) -> dict[str, Any]:
    """The five ``SpectralReport`` fields the panels draw, read by name (not looked up among aliases:
    a renamed field must fail here, loudly, rather than drop its panel)."""
    try:
        fields = {
            "spectrum": report.spectrum,
            "second_eigenvalue": report.second_eigenvalue,
            "dobrushin": report.dobrushin,
            "rollout_mass": report.rollout_mass,
            "rank_one_distance": report.rank_one_distance,
        }
    except AttributeError as err:
        raise ValueError(
            f"spectral_report_figure takes a lens_squash.algebra.spectral.SpectralReport; "
            f"{type(report).__name__} has no spectral field {err.name!r} (build one with "
            "lens_squash.algebra.spectral.analyze_stack, or call spectral_figure with the panels you have)"
        ) from err
    empty = [name for name, value in fields.items() if value is None]
    if empty:
        raise ValueError(
            f"spectral field(s) {empty} of {type(report).__name__} are None: every panel needs its "
            "data (call spectral_figure with the panels you have)"
        )
    return fields


@register_figure(SpectralReport, "report")
def spectral_report_figure(report: Any, **kwargs) -> go.Figure:
    """:func:`spectral_figure` for a ``spectral.SpectralReport``: its ``spectrum``, ``second_eigenvalue``,
    ``dobrushin``, ``rollout_mass`` (drawn as the first-token mass by depth) and ``rank_one_distance``,
    each of which must be present."""
    return spectral_figure(**_report_fields(report), **kwargs)


@register_figure(Analysis, "spectral")
def _analysis_spectral(analysis: Analysis, **kwargs):
    if analysis.spectral is None:
        reason = analysis.skipped.get("spectral", "it was not computed")
        raise ValueError(f"this analysis has no spectral report: {reason}")
    return spectral_report_figure(analysis.spectral, **kwargs)
