"""Figures of the sensitivity flow (:mod:`lens_squash.edge.flow`): every builder returns a plotly Figure
with a caption (``style.caption_of``) and titled axes; nothing is shown.

* :func:`truth_vs_bounds` — the true ``‖∂y/∂x^(l)_k‖_F`` above each bound's row at the same layer, on
  one shared position axis, a menu switching the layer;
* :func:`layer_heatmaps` — ``[layer × position]`` heatmaps of the truth beside each bound's rows;
* :func:`head_grid` — small multiples, one per (layer, head), of where the gradient flow enters each
  head (by query position) and where it leaves it (by key position);
* :func:`path_figure` — the connected heaviest paths: every hop of every drawn path, cross-position
  hops always visible, one legend entry per (layer, head) in order, hover naming layer, head, query
  and key tokens and each share.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from ..algebra.flow_paths import FlowPaths
from ..core.results import register_figure
from ..core.tokens import token_label
from ..edge.flow import SensitivityFlow
from .style import with_caption

__all__ = ["head_grid", "layer_heatmaps", "path_figure", "truth_vs_bounds"]

_PALETTE = qualitative.Plotly
_HEADS = qualitative.Dark24
_GREY = "rgba(120,120,120,0.8)"
_MLP = "rgba(200,120,0,0.8)"
_TEMPLATE = "plotly_white"


def _labels(flow) -> list[str]:
    return [token_label(t, max_len=20) for t in flow.str_tokens]


def _ticks(labels: list[str], max_ticks: int = 100) -> dict:
    step = max(1, math.ceil(len(labels) / max_ticks))
    shown = math.ceil(len(labels) / step)
    return {
        "tickmode": "array",
        "tickvals": list(range(0, len(labels), step)),
        "ticktext": labels[::step],
        "tickfont": {"size": 11 if shown <= 40 else 8},
        "tickangle": -90 if shown > 12 else 0,
    }


def _level_name(level: int, n_layers: int) -> str:
    return "output (final resid_post)" if level == n_layers else f"layer {level} (resid_pre)"


def _share(values: np.ndarray) -> np.ndarray:
    total = values.sum(-1, keepdims=True)
    return np.divide(values, total, out=np.zeros_like(values), where=total > 0)


# --------------------------------------------------------------------------------------------------
# truth beside bounds, one layer at a time
# --------------------------------------------------------------------------------------------------


@register_figure(SensitivityFlow, "layers", default=True)
def truth_vs_bounds(flow, layer: int = 0, *, title: str | None = None) -> go.Figure:
    """Top: the true sensitivity of ``y`` to each position at ``layer`` (log axis). Bottom: the same as
    a share of its row beside each bound's row as a share, on the same position axis. A menu picks the
    layer (``0..L``, ``L`` the final stream)."""
    layer = flow.check_layer(layer)
    L, labels = flow.n_layers, _labels(flow)
    x = np.arange(flow.n_tokens)
    truth = flow.sensitivity.double().numpy()
    bounds = {name: rows.double().numpy() for name, rows in flow.bounds.items()}
    fig = make_subplots(
        rows=2,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.08,
        subplot_titles=("true sensitivity ‖∂y/∂x⁽ˡ⁾ₖ‖_F", "share of each row: truth (black) and bounds"),
    )
    per_level = 2 + len(bounds)
    for level in range(L + 1):
        visible = level == layer
        hover = "position %{x} · %{customdata}<br>%{fullData.name}: %{y:.4g}<extra></extra>"
        fig.add_trace(
            go.Scatter(
                x=x,
                y=truth[level],
                customdata=labels,
                mode="lines+markers",
                name="truth",
                line={"color": "black"},
                marker={"size": 4},
                visible=visible,
                hovertemplate=hover,
                legendgroup="truth",
            ),
            row=1,
            col=1,
        )
        fig.add_trace(
            go.Scatter(
                x=x,
                y=_share(truth[level]),
                customdata=labels,
                mode="lines",
                name="truth (share)",
                line={"color": "black", "dash": "dot"},
                visible=visible,
                hovertemplate=hover,
                legendgroup="truth",
            ),
            row=2,
            col=1,
        )
        for i, (name, rows) in enumerate(bounds.items()):
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=_share(rows[level]),
                    customdata=labels,
                    mode="lines",
                    name=name,
                    line={"color": _PALETTE[i % len(_PALETTE)]},
                    visible=visible,
                    hovertemplate=hover,
                    legendgroup=name,
                ),
                row=2,
                col=1,
            )
    buttons = [
        {
            "label": _level_name(level, L),
            "method": "update",
            "args": [{"visible": [t // per_level == level for t in range(per_level * (L + 1))]}],
        }
        for level in range(L + 1)
    ]
    fig.update_layout(
        updatemenus=[{"buttons": buttons, "active": layer, "x": 1.0, "xanchor": "right", "y": 1.12, "yanchor": "top"}]
    )
    fig.update_yaxes(type="log", title_text="‖∂y/∂x⁽ˡ⁾ₖ‖_F", row=1, col=1)
    fig.update_yaxes(type="log", title_text="share of the row", row=2, col=1)
    fig.update_xaxes(title_text="position k", row=2, col=1, **_ticks(labels))
    fig.update_layout(
        template=_TEMPLATE,
        height=720,
        hovermode="x unified",
        title={"text": title or f"Truth and bounds layer by layer → position {flow.target_pos}"},
    )
    return with_caption(
        fig,
        (
            f"How sensitive the representation y of position {flow.target_pos} is to the residual stream at each "
            "position, at the layer chosen in the menu. Top: the true gradient norm ‖∂y/∂x_k‖_F "
            f"({flow.mode}, {flow.n_probes} probes), log scale. Bottom: each curve divided by its sum, so the true "
            "profile (black, dotted) and each bound's backward row e_nᵀ Ā⁽ᴸ⁻¹⁾…Ā⁽ˡ⁾ share one scale: where a bound's "
            "curve sits above the black one it over-credits that position."
        ),
    )


# --------------------------------------------------------------------------------------------------
# layer × position heatmaps
# --------------------------------------------------------------------------------------------------


@register_figure(SensitivityFlow, "heatmap")
def layer_heatmaps(flow, *, title: str | None = None) -> go.Figure:
    """One ``[layer × position]`` heatmap per source (truth first, then each bound), every layer's row
    divided by its maximum and shown as log10, so each layer's ranking of positions reads directly."""
    sources = {"truth": flow.sensitivity.double().numpy()}
    sources.update({name: rows.double().numpy() for name, rows in flow.bounds.items()})
    labels, L = _labels(flow), flow.n_layers
    categories = [f"{i}: {label}" for i, label in enumerate(labels)]  # unique even where tokens repeat
    fig = make_subplots(
        rows=1, cols=len(sources), shared_yaxes=True, horizontal_spacing=0.03, subplot_titles=list(sources)
    )
    for col, (name, values) in enumerate(sources.items(), start=1):
        peak = values.max(-1, keepdims=True)
        rel = np.divide(values, peak, out=np.zeros_like(values), where=peak > 0)
        z = np.log10(np.maximum(rel, 1e-6))
        # the hover reads the token from the category axis and the value from numeric customdata:
        # a label per cell (as object customdata) made this figure ten times larger
        fig.add_trace(
            go.Heatmap(
                z=z,
                x=categories,
                y=np.arange(L + 1),
                zmin=-6,
                zmax=0,
                colorscale="Viridis",
                customdata=values,
                showscale=col == 1,
                colorbar={"title": {"text": "log10(÷ layer max)"}},
                hovertemplate=(
                    f"{name}<br>level %{{y}} · position %{{x}}<br>"
                    "value %{customdata:.4g} · log10 share of max %{z:.2f}<extra></extra>"
                ),
            ),
            row=1,
            col=col,
        )
        ticks = _ticks(labels, 30)
        ticks["tickvals"] = [categories[i] for i in ticks["tickvals"]]
        fig.update_xaxes(title_text="position k", type="category", row=1, col=col, **ticks)
    fig.update_yaxes(
        title_text="layer (resid_pre; top = output)",
        tickmode="array",
        tickvals=list(range(L + 1)),
        ticktext=[str(level) for level in range(L)] + ["out"],
        row=1,
        col=1,
    )
    fig.update_layout(
        template=_TEMPLATE,
        height=max(420, 16 * L + 200),
        width=min(1200, max(700, 330 * len(sources))),  # a report's column: wider would need a scrollbar
        title={"text": title or f"Sensitivity of position {flow.target_pos}: layer × position"},
    )
    return with_caption(
        fig,
        (
            "Each panel is a [layer × position] map of how strongly y depends on the residual stream at that "
            "layer and position: the true gradient norm (left) beside each bound's backward row. Every layer's "
            "row is divided by its largest entry and shown as log10, so bright cells are the positions that "
            "layer ranks highest; compare the panels row by row to see at which depth a bound stops ranking "
            "positions like the gradient."
        ),
    )


# --------------------------------------------------------------------------------------------------
# per-head small multiples
# --------------------------------------------------------------------------------------------------


@register_figure(SensitivityFlow, "heads")
def head_grid(flow, layers: list[int] | None = None, *, max_layers: int = 6, title: str | None = None) -> go.Figure:
    """Small multiples, rows = layers, columns = heads: the value-edge flow entering head ``h`` at each
    query position (``Σ_k ‖edge_{h,j,k}‖``, solid) and leaving it at each key position (the head's
    value part ``‖Σ_j edge_{h,j,k}‖``, dotted). ``layers`` defaults to the ``max_layers`` layers whose
    heads carry the most value flow."""
    edges = flow.edges.double()
    if layers is None:
        order = edges.sum((1, 2, 3)).argsort(descending=True)[:max_layers]
        layers = sorted(int(i) for i in order)
    layers = [flow.check_layer(layer, with_output=False) for layer in layers]
    if not layers:
        raise ValueError("pass at least one layer")
    entering = edges.sum(-1).numpy()  # [layer, head, query]
    leaving = flow.value_heads.double().numpy()  # [layer, head, key]
    H, labels = flow.n_heads, _labels(flow)
    fig = make_subplots(
        rows=len(layers),
        cols=H,
        shared_xaxes=True,
        shared_yaxes=True,
        horizontal_spacing=0.01,
        vertical_spacing=0.03,
        column_titles=[f"head {h}" for h in range(H)],
        row_titles=[f"layer {l}" for l in layers],
    )
    x = np.arange(flow.n_tokens)
    for r, layer in enumerate(layers, start=1):
        for h in range(H):
            first = r == 1 and h == 0
            for values, name, dash in (
                (entering[layer, h], "enters at query j", "solid"),
                (leaving[layer, h], "leaves at key k", "dot"),
            ):
                fig.add_trace(
                    go.Scatter(
                        x=x,
                        y=values,
                        customdata=labels,
                        mode="lines",
                        name=name,
                        legendgroup=name,
                        showlegend=first,
                        line={"color": _HEADS[h % len(_HEADS)], "dash": dash, "width": 1.2},
                        hovertemplate=(
                            f"layer {layer} · head {h} · {name}<br>position %{{x}} %{{customdata}}"
                            "<br>flow %{y:.4g}<extra></extra>"
                        ),
                    ),
                    row=r,
                    col=h + 1,
                )
    fig.update_xaxes(title_text="position", row=len(layers))
    fig.update_yaxes(title_text="flow (‖·‖_F)", col=1)
    fig.update_layout(
        template=_TEMPLATE,
        height=max(360, 150 * len(layers) + 150),
        width=max(800, 150 * H),
        title={"text": title or f"Where the gradient flow enters each head → position {flow.target_pos}"},
    )
    return with_caption(
        fig,
        (
            "One small panel per (layer, head). Solid: how much of the true gradient flow enters the head at "
            "each query position j (the summed norms of its value edges j←k); dotted: how much it delivers to "
            "each key position k (the norm of the head's value part at k). A head whose dotted curve peaks at "
            "position 0 sends its flow into the attention sink; peaks elsewhere are content edges."
        ),
    )


# --------------------------------------------------------------------------------------------------
# connected paths
# --------------------------------------------------------------------------------------------------


def _hop_edges(selected) -> dict[tuple, dict[str, Any]]:
    """Every hop of every selected path, merged: key (layer, hop, key_pos, query_pos)."""
    merged: dict[tuple, dict[str, Any]] = {}
    for path in selected:
        for layer, hop in enumerate(path.hops):
            key = (layer, hop, path.positions[layer], path.positions[layer + 1])
            entry = merged.setdefault(key, {"flow": 0.0, "share": path.shares[layer], "paths": 0})
            entry["flow"] += path.share
            entry["paths"] += 1
    return merged


def _edge_style(hop, layer: int) -> tuple[str, str, int]:
    """(colour, legend name, legend rank) per (layer, head); residual and MLP one entry each."""
    if hop == "residual":
        return _GREY, "residual", 0
    if hop == "mlp":
        return _MLP, "MLP", 1
    return _HEADS[(layer * 7 + int(hop)) % len(_HEADS)], f"layer {layer} head {hop}", 10 + 1000 * layer + int(hop)


@register_figure(SensitivityFlow, "paths")
@register_figure(FlowPaths, "paths", default=True)
def path_figure(
    paths, *, k: int = 5, min_share: float = 0.05, max_paths: int = 60, title: str | None = None
) -> go.Figure:
    """The connected heaviest paths of a :class:`flow_paths.FlowPaths` (or of a ``SensitivityFlow``:
    its :meth:`top_paths` with ``k`` per source). Paths are selected by share of flow
    (:func:`flow_paths.select_paths`) and every hop of every selected path is drawn; the drawn hops are
    listed in ``fig.layout.meta["edges"]``."""
    from ..algebra.flow_paths import select_paths

    if hasattr(paths, "top_paths") and not hasattr(paths, "paths"):
        paths = paths.top_paths(k=k)
    selected = select_paths([p for ps in paths.paths.values() for p in ps], min_share=min_share, max_paths=max_paths)
    labels = [token_label(t, max_len=20) for t in paths.str_tokens] or [str(i) for i in range(len(paths.paths))]
    L, n = paths.n_layers, len(labels)
    merged = _hop_edges(selected)
    top_flow = max((e["flow"] for e in merged.values()), default=1.0) or 1.0
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=np.tile(np.arange(n), L + 1),
            y=np.repeat(np.arange(L + 1), n),
            mode="markers",
            hoverinfo="skip",
            marker={"size": 3, "color": "lightgrey"},
            showlegend=False,
            name="positions",
        )
    )
    shown = set()
    for (layer, hop, key, query), entry in sorted(
        merged.items(), key=lambda item: _edge_style(item[0][1], item[0][0])[2]
    ):
        colour, name, rank = _edge_style(hop, layer)
        cross = key != query
        bow = 0.0 if cross or hop in ("residual", "mlp") else 0.25 + 0.05 * (int(hop) % 4)
        offset = 0.12 if hop == "mlp" else 0.0
        xs = [key + offset, query + bow + offset, query + offset] if bow else [key + offset, query + offset]
        ys = [layer, layer + 0.5, layer + 1] if bow else [layer, layer + 1]
        # cross-position hops never thinner than 2 px: they are what the figure is for
        width = max(2.0 if cross else 0.8, 8.0 * entry["flow"] / top_flow)
        where = name if name.startswith("layer") else f"layer {layer}, {name}"  # the layer, for every hop
        hover = (
            f"{where}<br>query {query} {labels[query]} ← key {key} {labels[key]}"
            f"<br>hop share {entry['share']:.3g} · flow of drawn paths {entry['flow']:.3g} "
            f"({entry['paths']} path{'s' if entry['paths'] > 1 else ''})<extra></extra>"
        )
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                mode="lines",
                line={"color": colour, "width": width},
                name=name,
                legendgroup=name,
                legendrank=rank,
                showlegend=name not in shown,
                hovertemplate=hover,
                meta={"layer": layer, "hop": hop, "key": key, "query": query, "share": entry["share"]},
            )
        )
        shown.add(name)
    fig.update_xaxes(title_text="position", range=[-0.5, n - 0.5], **_ticks(labels))
    fig.update_yaxes(
        title_text="layer (residual stream entering it)",
        range=[-0.3, L + 0.3],
        tickmode="array",
        tickvals=list(range(L + 1)),
        ticktext=[str(level) for level in range(L)] + ["output"],
    )
    fig.update_layout(
        template=_TEMPLATE,
        height=max(450, 22 * L + 250),
        hovermode="closest",
        legend={"title": {"text": "hop"}, "traceorder": "normal"},
        title={"text": title or f"Heaviest connected paths ({paths.kind}) → position {paths.target_pos}"},
    )
    fig.layout.meta = {"edges": [list(key) for key in merged]}
    pattern = ""
    if getattr(paths, "pattern_share", None) is not None:
        pattern = (
            f" The pattern (query/key) part, {float(paths.pattern_share.mean()):.1%} of the part norms on "
            "average per layer, has no per-edge attribution and is not drawn."
        )
    return with_caption(
        fig,
        (
            f"The {len(selected)} heaviest connected paths of the {paths.kind} from the input positions (bottom) to "
            f"position {paths.target_pos} (top), selected by share of flow (every path with at least {min_share:.0%} of the "
            "heaviest path's share). Every hop of every drawn path is drawn: vertical grey lines are residual hops, "
            "orange ones MLP hops, coloured lines head hops (one legend entry per layer and head, in layer order); "
            "slanted lines move between positions. Width is the summed share of the drawn paths using the hop; "
            "hover for the layer, head, query and key tokens and each share." + pattern
        ),
    )
