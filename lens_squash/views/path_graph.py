"""Connected paths as a contribution graph (after llm-transparency-tool): the sink route beside the content route.

:func:`connected_paths` draws the heaviest paths of a :class:`~lens_squash.algebra.flow_paths.FlowPaths`
(the true gradient's, from ``flow(...).top_paths()``, or a bound's graph, from ``graph_paths``) in two
panels: paths that start at the first token (the attention sink) and paths that start anywhere else
(content). Each panel is cropped to the positions its paths touch, one column per position, one
row per layer's residual stream (input at the bottom, the target's output on top). Every hop of
every drawn path is one visible edge — residual grey, MLP orange, attention head blue, labelled
``L3·H5`` where it moves between positions — whose width grows with the summed weight of the drawn
paths using it, and every path is labelled at its source with its rank and weight. Because hops are
only ever drawn whole paths at a time, the edges always connect a source column to the target.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..algebra.flow_paths import FlowPaths, graph_paths
from ..algebra.variants import PathBound
from ..core.results import register_figure
from ..core.tokens import token_label
from ..edge.flow import SensitivityFlow
from .style import escape_label, finish_layout

__all__ = ["HOP_COLOURS", "connected_paths", "route_paths"]

#: colour by kind of hop
HOP_COLOURS = {"residual": "rgba(110,110,110,0.9)", "mlp": "rgba(230,130,0,0.9)", "head": "rgba(31,119,180,0.9)"}
_KIND_NAMES = {"residual": "residual stream", "mlp": "MLP", "head": "attention head"}


def _kind(hop: Any) -> str:
    return hop if hop in ("residual", "mlp") else "head"


def route_paths(paths: Any, *, per_route: int = 5, sinks: Sequence[int] = (0,)) -> tuple[list, list]:
    """The ``per_route`` heaviest paths (by weight) starting at a sink position, and those starting elsewhere."""
    if isinstance(per_route, bool) or not isinstance(per_route, int) or per_route < 1:
        raise ValueError(f"per_route must be a positive integer, got {per_route!r}")
    every = sorted((p for ps in paths.paths.values() for p in ps), key=lambda p: p.weight, reverse=True)
    sink = [p for p in every if p.source in sinks][:per_route]
    content = [p for p in every if p.source not in sinks][:per_route]
    return sink, content


def _merged_hops(selected: list) -> dict[tuple, dict[str, Any]]:
    """(layer, hop, key, query) → summed weight and the ranks of the drawn paths that use it."""
    merged: dict[tuple, dict[str, Any]] = {}
    for rank, path in enumerate(selected, 1):
        for layer, hop in enumerate(path.hops):
            key = (layer, hop, path.positions[layer], path.positions[layer + 1])
            entry = merged.setdefault(key, {"weight": 0.0, "paths": []})
            entry["weight"] += path.weight
            entry["paths"].append(rank)
    return merged


def _hop_xy(column: dict[int, int], layer: int, hop: Any, key: int, query: int) -> tuple[list[float], list[float]]:
    x0, x1 = column[key], column[query]
    if hop == "mlp":  # beside the residual edge of the same position, so both stay visible
        return [x0 + 0.14, x1 + 0.14], [layer, layer + 1]
    if hop != "residual" and key == query:  # a head attending to its own position: a bow
        return [x0, x0 - 0.28, x1], [layer, layer + 0.5, layer + 1]
    return [x0, x1], [layer, layer + 1]


def _panel(fig, col: int, selected: list, labels: list[str], n_layers: int, top: float, shown: set) -> dict:
    columns = sorted({pos for p in selected for pos in p.positions})
    column = {pos: i for i, pos in enumerate(columns)}
    merged = _merged_hops(selected)
    for (layer, hop, key, query), entry in sorted(merged.items(), key=lambda item: _kind(item[0][1]) != "head"):
        kind = _kind(hop)
        xs, ys = _hop_xy(column, layer, hop, key, query)
        where = f"layer {layer} " + (f"head {hop}" if kind == "head" else _KIND_NAMES[kind])
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                mode="lines",
                line={"color": HOP_COLOURS[kind], "width": 1.5 + 7.0 * math.sqrt(entry["weight"] / top)},
                name=_KIND_NAMES[kind],
                legendgroup=kind,
                showlegend=kind not in shown,
                meta={"layer": layer, "hop": str(hop), "key": key, "query": query, "panel": col},
                # labels are token_label's, already escaped: escaping again would show "&lt;" for "<"
                hovertemplate=(
                    f"{escape_label(where)}<br>{key} {labels[key]} → {query} {labels[query]}"
                    f"<br>weight of drawn paths {entry['weight']:.3g} (paths {', '.join(map(str, entry['paths']))})"
                    "<extra></extra>"
                ),
            ),
            row=1,
            col=col,
        )
        shown.add(kind)
        if kind == "head" and key != query:
            fig.add_annotation(
                x=(xs[0] + xs[-1]) / 2, y=layer + 0.5, text=f"L{layer}·H{hop}", showarrow=False,
                font={"size": 9, "color": "#114"}, bgcolor="rgba(255,255,255,0.7)", row=1, col=col,
            )  # fmt: skip
    _source_labels(fig, col, selected, column)
    ticks = {"tickmode": "array", "tickvals": list(range(len(columns))), "tickangle": -45 if len(columns) > 6 else 0}
    fig.update_xaxes(
        title_text="position (only those a drawn path touches)", range=[-0.8, len(columns) - 0.4],
        ticktext=[f"{p}: {labels[p]}" for p in columns], row=1, col=col, **ticks,
    )  # fmt: skip
    fig.update_yaxes(range=[-0.6 - 0.45 * _stack(selected), n_layers + 0.4], row=1, col=col)
    return {"columns": columns, "edges": [list(map(str, k)) for k in merged]}


def _stack(selected: list) -> int:
    """How many path labels pile up under the busiest source."""
    counts: dict[int, int] = {}
    for p in selected:
        counts[p.source] = counts.get(p.source, 0) + 1
    return max(counts.values(), default=0)


def _source_labels(fig, col: int, selected: list, column: dict[int, int]) -> None:
    below: dict[int, int] = {}
    for rank, path in enumerate(selected, 1):
        level = below.get(path.source, 0)
        below[path.source] = level + 1
        fig.add_annotation(
            x=column[path.source], y=-0.35 - 0.45 * level, text=f"#{rank} {path.weight:.3g} ({100 * path.share:.2g}%)",
            showarrow=False, font={"size": 10}, xanchor="center", row=1, col=col,
        )  # fmt: skip


@register_figure(FlowPaths, "connected")
def connected_paths(
    paths: Any, *, per_route: int = 5, sinks: Sequence[int] = (0,), title: str | None = None
) -> go.Figure:
    """Sink route and content route side by side (module docstring). ``paths`` is a ``FlowPaths``;
    ``per_route`` paths per panel, ``sinks`` the positions whose paths form the sink route.
    ``fig.layout.meta["panels"]`` lists each panel's columns and drawn hops."""
    sink, content = route_paths(paths, per_route=per_route, sinks=sinks)
    if not sink and not content:
        raise ValueError(f"no path to draw: the {paths.kind} paths to position {paths.target_pos} are empty")
    labels = [token_label(t, max_len=16) for t in paths.str_tokens] or [str(i) for i in range(paths.target_pos + 1)]
    # widths relative to the heaviest drawn hop (hops shared by several paths sum their weights)
    top = max(e["weight"] for sel in (sink, content) if sel for e in _merged_hops(sel).values()) or 1.0
    sink_names = ", ".join(str(s) for s in sinks)
    fig = make_subplots(
        rows=1,
        cols=2,
        horizontal_spacing=0.14,  # room for the right panel's own layer axis title
        subplot_titles=(
            f"sink route: paths from position {sink_names}",
            "content routes: paths from every other position",
        ),
    )
    shown: set[str] = set()
    panels = []
    for col, selected in ((1, sink), (2, content)):
        if selected:
            panels.append(_panel(fig, col, selected, labels, paths.n_layers, top, shown))
        else:
            panels.append({"columns": [], "edges": []})
            fig.add_annotation(
                text="no path here",
                x=0.5,
                y=0.5,
                xref=f"x{'' if col == 1 else col} domain",
                yref=f"y{'' if col == 1 else col} domain",
                showarrow=False,
            )
    level_ticks = {"tickmode": "array", "tickvals": list(range(paths.n_layers + 1))}
    level_text = [f"layer {i}" for i in range(paths.n_layers)] + ["output"]
    fig.update_yaxes(title_text="residual stream entering layer", ticktext=level_text, row=1, col=1, **level_ticks)
    fig.update_yaxes(title_text="residual stream entering layer", ticktext=level_text, row=1, col=2, **level_ticks)
    fig.layout.meta = {"panels": panels, "target": paths.target_pos, "n_layers": paths.n_layers}
    return finish_layout(
        fig,
        title or f"Heaviest connected paths of the {paths.kind} → position {paths.target_pos}",
        caption=_caption(paths, len(sink), len(content), sink_names),
        height=max(520, 26 * paths.n_layers + 300),
        legend={"orientation": "h", "y": -0.18, "title": {"text": "hop: "}},
        hovermode="closest",
    )


def _caption(paths: Any, n_sink: int, n_content: int, sink_names: str) -> str:
    weight = (
        "a path's weight is the product of its hops' shares of the gradient flow (the fraction of the target's flow "
        "that follows it)"
        if "flow" in paths.kind or "gradient" in paths.kind
        else f"a path's weight is its exact term of the {paths.kind} path sum"
    )
    return (
        f"The heaviest connected paths of the {paths.kind} from input tokens (bottom) to position {paths.target_pos} "
        f"(top): left, the {n_sink} heaviest starting at position {sink_names} (the attention sink); right, the "
        f"{n_content} heaviest starting anywhere else. Each panel keeps only the positions its paths touch. Every hop "
        "of every drawn path is an edge: grey the residual stream, orange an MLP, blue an attention head (labelled "
        "L·H where it moves between positions). Edge width grows with the summed weight of the drawn paths using it; "
        f"{weight}. Under each source, #rank weight (its share of all paths from that source). "
        "Hover an edge for its layer, head and tokens."
    )


# --------------------------------------------------------------------------------------------------
# figure kinds: the heaviest connected paths of a bound and of a flow (Result.plot)
# --------------------------------------------------------------------------------------------------


@register_figure(PathBound, "paths")
def _bound_paths(bound: PathBound, *, k: int = 5, **kwargs):
    """The bound graph's heaviest connected paths, sink route beside content route."""
    return connected_paths(graph_paths(bound.graph, bound.target_pos, k=k, str_tokens=bound.str_tokens), **kwargs)


@register_figure(SensitivityFlow, "connected")
def _flow_connected(flow: SensitivityFlow, *, k: int = 5, **kwargs):
    return connected_paths(flow.top_paths(k=k), **kwargs)
