"""The heaviest edges of a path-sum bound's flow decomposition on a layers × positions grid (DESIGN §3).

The connected-path view of the same flows (and of the true gradient flow) is
:func:`lens_squash.views.flow_views.path_figure`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go

from ..algebra.paths import BoundFlows
from ..algebra.variants import PathBound
from ..core.results import register_figure
from .style import (
    HEAD_PALETTE,
    RESIDUAL_GREY,
    as_array,
    escape_label,
    finish_layout,
    palette_color,
    position_labels,
    token_ticks,
)

__all__ = [
    "attention_paths",
]


def _flow_tensors(flows: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(head_flows [layer, head, q, k], residual_flows [layer, pos])`` from a BoundFlows-like
    object, a ``PathBound`` (its ``.flows()``), or a pair of tensors."""
    if hasattr(flows, "head_flows"):
        head, resid = flows.head_flows, flows.residual_flows
    elif callable(getattr(flows, "flows", None)):
        return _flow_tensors(flows.flows())
    elif isinstance(flows, (tuple, list)) and len(flows) == 2:
        head, resid = flows
    else:
        raise TypeError("pass BoundFlows, a PathBound, or (head_flows, residual_flows)")
    head, resid = as_array(head, "head_flows", ndim=4), as_array(resid, "residual_flows", ndim=2)
    if resid.shape != (head.shape[0], head.shape[-1]):
        raise ValueError(f"residual_flows must be [layer, pos] = {(head.shape[0], head.shape[-1])}, got {resid.shape}")
    return head.astype(np.float64), resid.astype(np.float64)


def _top_edges(head: np.ndarray, resid: np.ndarray, top_k: int) -> list[dict]:
    """The ``top_k`` heaviest positive edges, heaviest first: head edges ``(l, h, j ← k)`` and
    residual edges ``(l, j ← j)``."""
    weights = np.concatenate([head.ravel(), resid.ravel()])
    top_k = min(top_k, weights.size)
    candidates = np.argpartition(-weights, top_k - 1)[:top_k] if top_k else np.array([], dtype=int)
    edges = []
    for index in candidates[np.argsort(-weights[candidates], kind="stable")]:
        w = float(weights[index])
        if not w > 0:
            break
        if index < head.size:
            l, h, j, k = (int(v) for v in np.unravel_index(index, head.shape))
        else:
            l, j = (int(v) for v in np.unravel_index(index - head.size, resid.shape))
            h, k = None, j
        edges.append({"layer": l, "head": h, "to": j, "from": k, "flow": w})
    return edges


def _infer_target(head: np.ndarray, resid: np.ndarray) -> int:
    inflow = resid[-1] + head[-1].sum(axis=(0, 2))  # what enters each position at the top level
    return int(np.argmax(inflow))


def _edge_trace(
    edge: dict, labels: list[str], w_max: float, group: str, n_heads: int, *, show_legend: bool
) -> go.Scatter:
    l, h, j, k, w = edge["layer"], edge["head"], edge["to"], edge["from"], edge["flow"]
    kind = "residual" if h is None else f"head {h}"
    text = (
        f"{group} · layer {l}, {kind}<br>{k} {labels[k]} → {j} {labels[j]}"
        f"<br>flow {w:.4g} ({w / w_max:.1%} of the heaviest)"
    )
    # a head attending to its own position would hide under the vertical residual edge: bow it
    # sideways, each head by its own amount, so every drawn edge stays visible
    bow = 0.0 if h is None or j != k else 0.15 + 0.3 * h / max(1, n_heads - 1)
    return go.Scatter(
        x=np.array([k, (k + j) / 2 + bow, j]),
        y=np.array([l, l + 0.5, l + 1]),
        mode="lines",
        hoverinfo="text",
        text=[text] * 3,
        line={
            "width": 0.75 + 7.25 * w / w_max,
            "color": RESIDUAL_GREY if h is None else palette_color(h, HEAD_PALETTE),
            "shape": "spline",
        },
        name=kind,
        legendgroup=kind,
        showlegend=show_legend,
        meta=edge,
    )


def _group_label(flows: Any, target: int, labels: list[str]) -> str:
    """``target j: token``, plus ``← source i: token`` when the flows count paths from one input."""
    label = f"target {target}: {labels[target]}"
    source = getattr(flows, "source", None)
    return label if source is None else f"{label} ← source {int(source)}: {labels[int(source)]}"


def _path_group(flows: Any, labels: list[str], target: int | None, top_k: int) -> tuple[list[go.Scatter], str]:
    head, resid = _flow_tensors(flows)
    own = getattr(flows, "target_pos", None)
    if target is not None and own is not None and int(own) != int(target):
        raise ValueError(f"flows under key {target} were computed for target {own}; key each by its own target")
    target = own if target is None else target
    target = _infer_target(head, resid) if target is None else int(target)
    group = _group_label(flows, target, labels)
    edges = _top_edges(head, resid, top_k)
    w_max = edges[0]["flow"] if edges else 1.0
    seen: set[str] = set()
    traces = []
    for edge in sorted(edges, key=lambda e: e["flow"]):  # heaviest drawn last, on top
        kind = "residual" if edge["head"] is None else f"head {edge['head']}"
        traces.append(_edge_trace(edge, labels, w_max, group, head.shape[1], show_legend=kind not in seen))
        seen.add(kind)
    traces.append(
        go.Scatter(
            x=[target],
            y=[head.shape[0]],
            mode="markers",
            name="target",
            showlegend=False,
            marker={"symbol": "star", "size": 16, "color": "crimson"},
            hoverinfo="text",
            text=[f"target {target} {labels[target]}"],
        )
    )
    return traces, group


def attention_paths(
    flows: Any,
    str_tokens: Sequence[str] | None = None,
    *,
    top_k: int = 40,
    title: str = "Heaviest attention paths",
) -> go.Figure:
    """The flow decomposition of a path-sum bound as a layers × positions graph.

    Node ``(i, l)`` is position ``i`` in the residual stream entering layer ``l`` (``l = L`` is the
    output). A head edge of layer ``l`` runs from key ``k`` at level ``l`` to query ``j`` at level
    ``l+1``; a residual edge is vertical, and a head attending to its own position bows sideways
    (by an amount set by the head) so it does not hide under the residual edge. Only the ``top_k``
    heaviest edges are drawn, width ∝ flow (divided by the heaviest), coloured by head (residual
    grey); each edge's ``meta`` holds its layer, head (``None`` for residual), from/to positions and
    flow. Flows of paths from one input (``PathBound.flows(source=i)``) are labelled with the source.

    ``flows`` is ``BoundFlows`` (``.head_flows [layer, head, q, k]``, ``.residual_flows [layer, pos]``),
    a ``PathBound`` (its ``.flows()``), a ``(head_flows, residual_flows)`` pair, or a dict
    ``{target_pos: flows}``: then one trace group per target and a menu switches between them.
    """
    groups = flows if isinstance(flows, Mapping) else {None: flows}
    if not groups:
        raise ValueError("pass at least one set of flows")
    if str_tokens is None:
        str_tokens = getattr(next(iter(groups.values())), "str_tokens", None)
    head0, _ = _flow_tensors(next(iter(groups.values())))
    n_layers, n = head0.shape[0], head0.shape[-1]
    labels = position_labels(str_tokens, n)
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=np.tile(np.arange(n), n_layers + 1),
            y=np.repeat(np.arange(n_layers + 1), n),
            mode="markers",
            marker={"size": 4, "color": "lightgrey"},
            name="positions",
            showlegend=False,
            hoverinfo="text",
            text=[f"level {l} · position {i} {labels[i]}" for l in range(n_layers + 1) for i in range(n)],
        )
    )
    spans, names = [], []
    for key, group in groups.items():
        traces, name = _path_group(group, labels, key, top_k)
        start = len(fig.data)
        fig.add_traces(traces)
        spans.append((start, len(fig.data)))
        names.append(name)
    for trace in fig.data[spans[0][1] :]:
        trace.visible = False
    if len(groups) > 1:
        buttons = []
        for (start, end), label in zip(spans, names, strict=True):
            visible = [i == 0 or start <= i < end for i in range(len(fig.data))]
            buttons.append(
                {
                    "label": label,
                    "method": "update",
                    "args": [{"visible": visible}, {"title.text": escape_label(title) + " — " + label}],
                }
            )
        # under the title, above the plot, on the left: it can neither hide the title nor the legend
        fig.update_layout(
            updatemenus=[
                {"buttons": buttons, "x": 0.0, "xanchor": "left", "y": 1.01, "yanchor": "bottom", "pad": {"b": 4}}
            ]
        )
    fig.update_xaxes(title_text="position", range=[-0.5, n - 0.5], **token_ticks(labels))
    fig.update_yaxes(
        title_text="layer (residual stream entering it)",
        range=[-0.3, n_layers + 0.3],
        tickmode="array",
        tickvals=list(range(n_layers + 1)),
        ticktext=[str(l) for l in range(n_layers)] + ["output"],
    )
    caption = (
        f"The heaviest edges (at most {top_k} per target) of the path-sum bound's flow decomposition "
        f"(DESIGN §3) over {n} positions and {n_layers} layers. A dot is a position (x) in the residual stream "
        "entering a layer (y; the top row is the output). A coloured curve is an attention head moving flow from "
        "a key position at one level to a query position at the next; a grey vertical line is the residual "
        "connection. Width is proportional to the flow, relative to the heaviest edge; the red star is the target "
        "token whose sensitivity is decomposed. Hover an edge for its layer, head, positions and flow."
        + (" The menu above the plot switches between targets." if len(groups) > 1 else "")
    )
    return finish_layout(
        fig,
        title,
        suffix=f" — {names[0]}",
        caption=caption,
        height=max(450, 22 * n_layers + 250),
        hovermode="closest",
        legend={"title": {"text": "edge"}},
        margin={"t": 110 if len(groups) > 1 else 80},
    )


# --------------------------------------------------------------------------------------------------
# figure kinds: a bound's flow decomposition (Result.plot)
# --------------------------------------------------------------------------------------------------


@register_figure(PathBound, "flows")
def _bound_flows(bound: PathBound, *, source: int | None = None, **kwargs):
    return attention_paths(bound.flows(source), bound.str_tokens, **kwargs)


@register_figure(BoundFlows, "edges")
def _flows_edges(flows: BoundFlows, **kwargs):
    return attention_paths(flows, **kwargs)
