"""Plotly figure builders for every lens_squash result, each returning a ``go.Figure``.

The builders take plain tensors, arrays or DataFrames plus labels, so they do not depend on the
result classes; thin ``*_from_*`` wrappers accept the result objects by duck typing (they read
attributes such as ``.bound``, ``.head_flows`` or ``.frame``). Figures are returned, never shown or
written (DESIGN §8); :mod:`lens_squash.report` embeds them in a self-contained HTML file.

| builder | shows | paper |
|---|---|---|
| :func:`bound_vs_jacobian` | per-position Jacobian norm against each variant's path-sum bound | §5, Thm. B.5 |
| :func:`attention_heatmap` | ``A^(l,h)`` with a menu over the layer mean, layer means and heads | §5 |
| :func:`attention_paths` | the heaviest edges of the flow decomposition on a layers × positions grid | DESIGN §3 |
| :func:`spectral_figure` | the spectrum of ``Λ̃^(l)``, Dobrushin coefficients, convergence with depth | Prop. B.8 |
| :func:`collapse_figure` | representational-collapse distance against length, per dtype | Thm. 4.2, Fig. 6 |
| :func:`head_band_figure` | mean, min and max over last-layer heads against length | Fig. 5 |
| :func:`pe_figure` | the synthetic positional-encoding study | Fig. 7 |
| :func:`tv_figure` | softmax total-variation decay with its bound | Lemma B.2, Fig. 9 |
| :func:`sink_figure` | per-layer sink / compression curves with Mix–Compress–Refine phases | Queipo-de-Llano et al. |
| :func:`accuracy_figure`, :func:`abs_error_figure`, :func:`answer_histogram` | task results | Figs. 2–4 |

**Token text is untrusted.** Plotly renders a subset of HTML inside labels and hover text, so every
token goes through :func:`token_label` (``repr``-style, spaces shown as ``␣``, then ``html.escape``):
a token ``<b>`` shows literally as ``<b>`` and a token ``<script>`` cannot inject when the figure is
embedded (plotly's JSON encoder also writes ``<``, ``>`` and ``/`` as ``\\u003c``-style escapes).
Positions are numeric (or unique ``"i: token"`` categories) so repeated tokens never merge.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from plotly.colors import qualitative
from plotly.subplots import make_subplots
from torch import Tensor

__all__ = [
    "MAX_TICKS",
    "SPECTRAL_FIELDS",
    "abs_error_figure",
    "accuracy_figure",
    "answer_histogram",
    "attention_heatmap",
    "attention_paths",
    "bound_vs_jacobian",
    "collapse_figure",
    "comparison_figure",
    "head_band_figure",
    "pe_figure",
    "sink_figure",
    "sink_report_figure",
    "spectral_figure",
    "spectral_report_figure",
    "token_label",
    "tv_decay_figure",
    "tv_figure",
]

#: above this many positions, axes label every k-th token only (hover still shows every token)
MAX_TICKS: int = 60
_PALETTE = qualitative.Plotly
_HEAD_PALETTE = qualitative.Dark24
_RESIDUAL_GREY = "rgba(120,120,120,0.85)"
_TEMPLATE = "plotly_white"


# --------------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------------


def token_label(token: Any, *, max_len: int | None = 40) -> str:
    """A token as safe display text: ``repr`` without quotes, spaces as ``␣``, then HTML-escaped."""
    shown = repr(str(token))[1:-1].replace(" ", "␣")
    if max_len is not None and len(shown) > max_len:
        shown = shown[: max_len - 1] + "…"
    return html.escape(shown, quote=False)


def _escape(text: Any) -> str:
    """User text (names, titles) for plotly's pseudo-HTML labels."""
    return html.escape(str(text), quote=False)


def _array(values: Any, name: str = "values", ndim: int | None = None) -> np.ndarray:
    """Tensors, arrays and lists as a float numpy array (float32 stays float32: half the bytes)."""
    if isinstance(values, Tensor):
        values = values.detach().cpu()
        values = values.float() if values.dtype in (torch.float16, torch.bfloat16) else values
        values = values.numpy()
    out = np.asarray(values)
    if out.dtype != np.float32:
        out = out.astype(np.float64)
    if ndim is not None and out.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(out.shape)}")
    return out


def _labels(str_tokens: Sequence[str] | None, n: int) -> list[str]:
    if str_tokens is None:
        return [str(i) for i in range(n)]
    if len(str_tokens) != n:
        raise ValueError(f"got {len(str_tokens)} tokens for {n} positions")
    return [token_label(t) for t in str_tokens]


def _ticks(labels: Sequence[str], values: Sequence | None = None, max_ticks: int = MAX_TICKS) -> dict:
    """Axis settings that label every token, or every k-th one when there are more than ``max_ticks``."""
    values = list(range(len(labels))) if values is None else list(values)
    step = max(1, math.ceil(len(labels) / max_ticks))
    return {"tickmode": "array", "tickvals": values[::step], "ticktext": list(labels[::step])}


def _color(i: int, palette: Sequence[str] = _PALETTE) -> str:
    return palette[i % len(palette)]


def _layout(fig: go.Figure, title: str, *, suffix: str = "", **kwargs) -> go.Figure:
    """Title (user text, escaped) plus an already-escaped ``suffix``; the shared template."""
    fig.update_layout(title={"text": _escape(title) + suffix}, template=_TEMPLATE, **kwargs)
    return fig


def _bound_values(bound: Any) -> np.ndarray:
    return _array(getattr(bound, "bound", bound), "bound", ndim=1)


# --------------------------------------------------------------------------------------------------
# bound versus Jacobian
# --------------------------------------------------------------------------------------------------


def _profile_trace(x, y, labels, name, i, dash=None, width=2.0) -> go.Scatter:
    return go.Scatter(
        x=x, y=y, name=_escape(name), mode="lines+markers", customdata=labels,
        line={"color": _color(i), "dash": dash, "width": width}, marker={"size": 4},
        legendgroup=_escape(name),
        hovertemplate="position %{x} · %{customdata}<br>%{fullData.name}: %{y:.4g}<extra></extra>",
    )


def bound_vs_jacobian(
    str_tokens: Sequence[str] | None,
    truth: Float[Tensor, "pos"] | None,
    bounds: Mapping[str, Float[Tensor, "pos"]],
    *,
    truth_name: str = "Jacobian ‖∂y_n/∂v_i‖₂",
    log: bool = True,
    normalised: bool = True,
    title: str = "Sensitivity of the last token to each input position",
) -> go.Figure:
    """Per position, the exact Jacobian norm (thick black) and each variant's bound (one colour each).

    ``bounds`` maps a name to a ``[pos]`` tensor or to an object with ``.bound`` (a ``PathBound``).
    The top panel shows raw values (log y by default: the bounds span orders of magnitude); with
    ``normalised`` a second panel divides every curve by its sum, so shapes (the U) compare directly.
    """
    curves: dict[str, np.ndarray] = {}
    if truth is not None:
        curves[truth_name] = _array(truth, "truth", ndim=1)
    curves.update({name: _bound_values(b) for name, b in bounds.items()})
    if not curves:
        raise ValueError("nothing to plot: pass a truth profile or at least one bound")
    n = len(next(iter(curves.values())))
    if any(len(v) != n for v in curves.values()):
        raise ValueError(f"every profile must have {n} positions, got {[len(v) for v in curves.values()]}")
    labels, x = _labels(str_tokens, n), np.arange(n)
    rows = 2 if normalised else 1
    titles = ("raw values", "each curve ÷ its sum (shape only)")[:rows]
    fig = make_subplots(rows=rows, cols=1, shared_xaxes=True, vertical_spacing=0.08, subplot_titles=titles)
    for i, (name, values) in enumerate(curves.items()):
        is_truth = truth is not None and i == 0
        color_index = -1 if is_truth else i
        trace = _profile_trace(x, values, labels, name, color_index, width=3.5 if is_truth else 2.0)
        if is_truth:
            trace.line.color = "black"
        fig.add_trace(trace, row=1, col=1)
        if normalised:
            total = float(np.nansum(values))
            shape = values / total if total > 0 else np.full_like(values, np.nan)
            twin = _profile_trace(x, shape, labels, name, color_index, width=trace.line.width)
            twin.line.color, twin.showlegend = trace.line.color, False
            fig.add_trace(twin, row=2, col=1)
    for row in range(1, rows + 1):
        fig.update_yaxes(type="log" if log else "linear", row=row, col=1)
    fig.update_xaxes(title_text="input position i", row=rows, col=1, **_ticks(labels))
    fig.update_xaxes(**_ticks(labels), row=1, col=1)
    return _layout(fig, title, height=420 * rows, hovermode="x unified", legend={"orientation": "h", "y": -0.15})


def comparison_figure(table: pd.DataFrame, **kwargs) -> go.Figure:
    """:func:`bound_vs_jacobian` from the per-position table of ``compare.compare_variants``."""
    truth_cols = [c for c in table.columns if str(c).startswith("jacobian_")]
    skip = {"position", "token", *truth_cols}
    bounds = {c: table[c].to_numpy(dtype=float) for c in table.columns if c not in skip}
    tokens = list(table["token"]) if "token" in table.columns else None
    truth = table[truth_cols[0]].to_numpy(dtype=float) if truth_cols else None
    if truth_cols:
        kwargs.setdefault("truth_name", f"Jacobian ({str(truth_cols[0]).removeprefix('jacobian_')})")
    return bound_vs_jacobian(tokens, truth, bounds, **kwargs)


# --------------------------------------------------------------------------------------------------
# attention heatmaps
# --------------------------------------------------------------------------------------------------


def _heatmap_options(patterns: np.ndarray, layer: int | None, head: int | None, max_cells: int):
    """(label, matrix) pairs for the menu, and a note when per-head maps were left out."""
    n_layers, n_heads, n, _ = patterns.shape
    if layer is not None and head is not None:
        return [(f"layer {layer}, head {head}", patterns[layer, head])], ""
    if layer is not None:
        return [(f"layer {layer}, mean of heads", patterns[layer].mean(0))] + [
            (f"layer {layer}, head {h}", patterns[layer, h]) for h in range(n_heads)
        ], ""
    if head is not None:
        return [(f"layer {l}, head {head}", patterns[l, head]) for l in range(n_layers)], ""
    options = [("mean of all layers and heads", patterns.mean((0, 1)))]
    options += [(f"layer {l}, mean of heads", patterns[l].mean(0)) for l in range(n_layers)]
    if (len(options) + n_layers * n_heads) * n * n <= max_cells:
        options += [(f"layer {l}, head {h}", patterns[l, h]) for l in range(n_layers) for h in range(n_heads)]
        return options, ""
    return options, " (per-head maps left out for size: pass layer=… or a larger max_cells)"


def attention_heatmap(
    patterns: Float[Tensor, "layer head query_pos key_pos"],
    str_tokens: Sequence[str] | None = None,
    *,
    layer: int | None = None,
    head: int | None = None,
    max_cells: int = 2_000_000,
    title: str = "Attention patterns",
) -> go.Figure:
    """``A^(l,h)`` as a heatmap (query down, key across) with a menu over what to show.

    ``layer`` and ``head`` both set: that one map. ``layer`` only: its head mean and every head.
    ``head`` only: that head in every layer. Neither: the overall mean, each layer's head mean, and
    every head when the total stays under ``max_cells`` entries (the HTML grows with it). One heatmap
    trace per option; the menu toggles visibility. Axis categories are ``"i: token"`` (unique, so
    repeated tokens stay apart); beyond :data:`MAX_TICKS` tokens only every k-th is labelled.
    """
    patterns = _array(patterns, "patterns", ndim=4).astype(np.float32)
    n = patterns.shape[-1]
    categories = [f"{i}: {label}" for i, label in enumerate(_labels(str_tokens, n))]
    options, note = _heatmap_options(patterns, layer, head, max_cells)
    fig = go.Figure()
    for i, (label, matrix) in enumerate(options):
        fig.add_trace(go.Heatmap(
            z=matrix, x=categories, y=categories, name=label, visible=i == 0, colorscale="Viridis",
            zmin=0.0, zmax=1.0, colorbar={"title": {"text": "attention"}},
            hovertemplate="query %{y}<br>key %{x}<br>attention %{z:.4f}<extra></extra>",
        ))
    if len(options) > 1:
        buttons = [
            {"label": label, "method": "update",
             "args": [{"visible": [j == i for j in range(len(options))]}, {"title.text": _escape(title) + " — " + label}]}
            for i, (label, _) in enumerate(options)
        ]
        fig.update_layout(updatemenus=[{"buttons": buttons, "x": 1.0, "xanchor": "right", "y": 1.12, "yanchor": "top"}])
    fig.update_xaxes(title_text="key position", type="category", **_ticks(categories, categories))
    fig.update_yaxes(title_text="query position", type="category", autorange="reversed", **_ticks(categories, categories))
    size = min(900, 300 + 8 * n)
    return _layout(fig, title, suffix=f" — {options[0][0]}{note}", height=size + 100, width=size + 150)


# --------------------------------------------------------------------------------------------------
# attention paths
# --------------------------------------------------------------------------------------------------


def _flow_tensors(flows: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(head_flows [layer, head, q, k], residual_flows [layer, pos])`` from a PathFlows-like
    object, a ``PathBound`` (its ``.flows()``), or a pair of tensors."""
    if hasattr(flows, "head_flows"):
        head, resid = flows.head_flows, flows.residual_flows
    elif callable(getattr(flows, "flows", None)):
        return _flow_tensors(flows.flows())
    elif isinstance(flows, (tuple, list)) and len(flows) == 2:
        head, resid = flows
    else:
        raise TypeError("pass PathFlows, a PathBound, or (head_flows, residual_flows)")
    head, resid = _array(head, "head_flows", ndim=4), _array(resid, "residual_flows", ndim=2)
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


def _edge_trace(edge: dict, labels: list[str], w_max: float, group: str, n_heads: int, show_legend: bool) -> go.Scatter:
    l, h, j, k, w = edge["layer"], edge["head"], edge["to"], edge["from"], edge["flow"]
    kind = "residual" if h is None else f"head {h}"
    text = (f"{group} · layer {l}, {kind}<br>{k} {labels[k]} → {j} {labels[j]}"
            f"<br>flow {w:.4g} ({w / w_max:.1%} of the heaviest)")
    # a head attending to its own position would hide under the vertical residual edge: bow it
    # sideways, each head by its own amount, so every drawn edge stays visible
    bow = 0.0 if h is None or j != k else 0.15 + 0.3 * h / max(1, n_heads - 1)
    return go.Scatter(
        x=[k, (k + j) / 2 + bow, j], y=[l, l + 0.5, l + 1], mode="lines", hoverinfo="text", text=[text] * 3,
        line={"width": 0.75 + 7.25 * w / w_max, "color": _RESIDUAL_GREY if h is None else _color(h, _HEAD_PALETTE),
              "shape": "spline"},
        name=kind, legendgroup=kind, showlegend=show_legend, meta=edge,
    )


def _group_label(flows: Any, target: int, labels: list[str]) -> str:
    """``target j: token``, plus ``← source i: token`` when the flows count paths from one input."""
    label = f"target {target}: {labels[target]}"
    source = getattr(flows, "source", None)
    return label if source is None else f"{label} ← source {int(source)}: {labels[int(source)]}"


def _path_group(flows: Any, labels: list[str], target: int | None, top_k: int) -> tuple[list[go.Scatter], str]:
    head, resid = _flow_tensors(flows)
    own = getattr(flows, "target", None)
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
        traces.append(_edge_trace(edge, labels, w_max, group, head.shape[1], kind not in seen))
        seen.add(kind)
    traces.append(go.Scatter(
        x=[target], y=[head.shape[0]], mode="markers", name="target", showlegend=False,
        marker={"symbol": "star", "size": 16, "color": "crimson"}, hoverinfo="text",
        text=[f"target {target} {labels[target]}"],
    ))
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

    ``flows`` is ``PathFlows`` (``.head_flows [layer, head, q, k]``, ``.residual_flows [layer, pos]``),
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
    labels = _labels(str_tokens, n)
    fig = go.Figure()
    fig.add_trace(go.Scatter(
        x=np.tile(np.arange(n), n_layers + 1), y=np.repeat(np.arange(n_layers + 1), n), mode="markers",
        marker={"size": 4, "color": "lightgrey"}, name="positions", showlegend=False, hoverinfo="text",
        text=[f"level {l} · position {i} {labels[i]}" for l in range(n_layers + 1) for i in range(n)],
    ))
    spans, names = [], []
    for key, group in groups.items():
        traces, name = _path_group(group, labels, key, top_k)
        start = len(fig.data)
        fig.add_traces(traces)
        spans.append((start, len(fig.data)))
        names.append(name)
    for trace in fig.data[spans[0][1]:]:
        trace.visible = False
    if len(groups) > 1:
        buttons = []
        for (start, end), label in zip(spans, names, strict=True):
            visible = [i == 0 or start <= i < end for i in range(len(fig.data))]
            buttons.append({"label": label, "method": "update",
                            "args": [{"visible": visible}, {"title.text": _escape(title) + " — " + label}]})
        fig.update_layout(updatemenus=[{"buttons": buttons, "x": 1.0, "xanchor": "right", "y": 1.15, "yanchor": "top"}])
    fig.update_xaxes(title_text="position", range=[-0.5, n - 0.5], **_ticks(labels))
    fig.update_yaxes(
        title_text="layer (residual stream entering it)", range=[-0.3, n_layers + 0.3],
        tickmode="array", tickvals=list(range(n_layers + 1)),
        ticktext=[str(l) for l in range(n_layers)] + ["output"],
    )
    return _layout(fig, title, suffix=f" — {names[0]}", height=max(450, 22 * n_layers + 250), hovermode="closest",
                   legend={"title": {"text": "edge"}})


# --------------------------------------------------------------------------------------------------
# spectral analysis
# --------------------------------------------------------------------------------------------------


def spectral_figure(
    *,
    spectrum: Float[Tensor, "layer pos"] | None = None,
    second_eigenvalue: Float[Tensor, "layer"] | None = None,
    dobrushin: Float[Tensor, "layer"] | None = None,
    first_token_mass: Float[Tensor, "depth"] | None = None,
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
    fig = make_subplots(rows=2, cols=2, vertical_spacing=0.14, horizontal_spacing=0.1, subplot_titles=(
        "spectrum of Λ̃⁽ˡ⁾ per layer", "Dobrushin τ(Λ̃⁽ˡ⁾) per layer",
        "last token's mass on the first token", "distance of Π Λ̃ to rank one"))
    if spectrum is not None:
        values = _array(spectrum, "spectrum", ndim=2)
        layers = np.repeat(np.arange(values.shape[0]), values.shape[1])
        fig.add_trace(go.Scatter(x=layers, y=values.ravel(), mode="markers", name="eigenvalues Λ̃_ii",
                                 marker={"size": 4, "opacity": 0.4, "color": _color(0)}), row=1, col=1)
    if second_eigenvalue is not None:
        second = _array(second_eigenvalue, "second_eigenvalue", ndim=1)
        fig.add_trace(go.Scatter(x=np.arange(len(second)), y=second, mode="lines+markers",
                                 name="second eigenvalue", line={"color": _color(1)}), row=1, col=1)
    if dobrushin is not None:
        tau = _array(dobrushin, "dobrushin", ndim=1)
        fig.add_trace(go.Scatter(x=np.arange(len(tau)), y=tau, mode="lines+markers", name="τ per layer",
                                 line={"color": _color(2)}), row=1, col=2)
        fig.add_trace(go.Scatter(x=np.arange(len(tau)) + 1, y=np.cumprod(tau), mode="lines", name="Π τ (bound)",
                                 line={"color": _color(2), "dash": "dash"}), row=2, col=2)
    if first_token_mass is not None:
        mass = _array(first_token_mass, "first_token_mass", ndim=1)
        fig.add_trace(go.Scatter(x=np.arange(len(mass)) + depth_start, y=mass, mode="lines+markers",
                                 name="[Π Λ̃]ₙ,₀", line={"color": _color(3)}), row=2, col=1)
    if rank_one_distance is not None:
        dist = _array(rank_one_distance, "rank_one_distance", ndim=1)
        fig.add_trace(go.Scatter(x=np.arange(len(dist)) + depth_start, y=dist, mode="lines+markers",
                                 name="distance to rank one", line={"color": _color(4)}), row=2, col=2)
    fig.update_xaxes(title_text="layer", row=1)
    fig.update_xaxes(title_text="depth (layers composed)", row=2)
    fig.update_yaxes(range=[-0.02, 1.02], row=2, col=1)
    fig.update_yaxes(type="log", row=2, col=2)
    return _layout(fig, title, height=760)


#: spectral_figure argument -> attribute names a SpectralReport-like object may use for it
SPECTRAL_FIELDS: dict[str, tuple[str, ...]] = {
    "spectrum": ("spectrum", "diagonals", "eigenvalues"),
    "second_eigenvalue": ("second_eigenvalue", "second_eigenvalues", "second_largest"),
    "dobrushin": ("dobrushin", "dobrushin_coefficients", "tau"),
    "first_token_mass": ("first_token_mass", "first_token_mass_by_depth", "mass_by_depth"),
    "rank_one_distance": ("rank_one_distance", "distance_to_rank_one", "rank_one_gap"),
}


def spectral_report_figure(report: Any, **kwargs) -> go.Figure:
    """:func:`spectral_figure` for a ``spectral.SpectralReport``-like object, reading the first
    attribute of :data:`SPECTRAL_FIELDS` it has for each panel (``None`` attributes are skipped)."""
    found = {
        arg: next((getattr(report, name) for name in names if getattr(report, name, None) is not None), None)
        for arg, names in SPECTRAL_FIELDS.items()
    }
    if all(v is None for v in found.values()):
        raise ValueError(f"{type(report).__name__} has none of the spectral fields {SPECTRAL_FIELDS}")
    return spectral_figure(**found, **kwargs)


# --------------------------------------------------------------------------------------------------
# representational collapse
# --------------------------------------------------------------------------------------------------


def _floor(distances: Mapping[str, np.ndarray], resolutions: Mapping[str, float]) -> float:
    positive = [v[v > 0] for v in distances.values()] + [np.asarray([r for r in resolutions.values() if r > 0])]
    smallest = min((float(v.min()) for v in positive if v.size), default=1.0)
    return 10.0 ** (math.floor(math.log10(smallest)) - 1)


def collapse_figure(
    lengths: Sequence[int],
    distances: Mapping[str, Float[Tensor, "length"]],
    resolutions: Mapping[str, float] | None = None,
    *,
    floor: float | None = None,
    y_title: str = "‖y_n(s) − y_{n+1}(s*)‖",
    title: str = "Representational collapse with length",
) -> go.Figure:
    """Distance against prompt length per dtype (log y), each dtype's resolution dashed.

    Exactly-zero distances cannot sit on a log axis: they are drawn at ``floor`` (default one decade
    below the smallest positive value or resolution) as open ``x`` markers whose hover says so, and
    the line trace holds ``NaN`` there.
    """
    resolutions = dict(resolutions or {})
    x = _array(lengths, "lengths", ndim=1)
    curves = {str(k): _array(v, f"distances[{k}]", ndim=1).astype(np.float64) for k, v in distances.items()}
    for name, values in curves.items():
        if len(values) != len(x):
            raise ValueError(f"distances[{name!r}] has {len(values)} values for {len(x)} lengths")
    floor = _floor(curves, resolutions) if floor is None else float(floor)
    fig = go.Figure()
    for i, (name, values) in enumerate(curves.items()):
        color, zero = _color(i), values == 0
        fig.add_trace(go.Scatter(
            x=x, y=np.where(zero, np.nan, values), mode="lines+markers", name=_escape(name),
            legendgroup=_escape(name), line={"color": color},
            hovertemplate=f"{_escape(name)}<br>length %{{x}}<br>distance %{{y:.3e}}<extra></extra>",
        ))
        if zero.any():
            fig.add_trace(go.Scatter(
                x=x[zero], y=np.full(int(zero.sum()), floor), mode="markers", legendgroup=_escape(name),
                name=f"{_escape(name)}: exactly 0 (drawn at {floor:.0e})",
                marker={"symbol": "x-open", "size": 10, "color": color},
                hovertemplate=f"{_escape(name)}<br>length %{{x}}<br>distance exactly 0 "
                              f"(drawn at the floor {floor:.0e})<extra></extra>",
            ))
        if name in resolutions:
            fig.add_trace(go.Scatter(
                x=[x.min(), x.max()], y=[resolutions[name]] * 2, mode="lines", legendgroup=_escape(name),
                name=f"{_escape(name)} resolution", line={"color": color, "dash": "dash", "width": 1.5},
                hovertemplate=f"{_escape(name)} resolution %{{y:.3e}}<extra></extra>",
            ))
    fig.update_xaxes(title_text="prompt length n")
    fig.update_yaxes(title_text=_escape(y_title), type="log")
    return _layout(fig, title, height=480)


def head_band_figure(
    lengths: Sequence[int],
    mean: Float[Tensor, "length"],
    minimum: Float[Tensor, "length"],
    maximum: Float[Tensor, "length"],
    *,
    name: str = "last-layer heads",
    log: bool = True,
    y_title: str = "‖y_n(s) − y_{n+1}(s*)‖ per head",
    title: str = "Collapse per attention head (mean, min–max band)",
) -> go.Figure:
    """Figure 5: the mean over heads as a line, the min–max over heads as a shaded band."""
    x = _array(lengths, "lengths", ndim=1)
    arrays = [_array(v, label, ndim=1) for v, label in ((mean, "mean"), (minimum, "minimum"), (maximum, "maximum"))]
    if any(len(a) != len(x) for a in arrays):
        raise ValueError("mean, minimum and maximum need one value per length")
    mean, minimum, maximum = arrays
    label = _escape(name)
    fig = go.Figure([
        go.Scatter(x=x, y=maximum, mode="lines", line={"width": 0}, name=f"{label} max", showlegend=False,
                   legendgroup=label, hovertemplate="max %{y:.3e}<extra></extra>"),
        go.Scatter(x=x, y=minimum, mode="lines", line={"width": 0}, fill="tonexty", name=f"{label} min–max",
                   fillcolor="rgba(99,110,250,0.25)", legendgroup=label, hovertemplate="min %{y:.3e}<extra></extra>"),
        go.Scatter(x=x, y=mean, mode="lines+markers", name=f"{label} mean", line={"color": _color(0)},
                   legendgroup=label, hovertemplate="length %{x}<br>mean %{y:.3e}<extra></extra>"),
    ])
    fig.update_xaxes(title_text="prompt length n")
    fig.update_yaxes(title_text=_escape(y_title), type="log" if log else "linear")
    return _layout(fig, title, height=450, hovermode="x unified")


def pe_figure(
    lengths: Sequence[int],
    curves: Mapping[str, tuple[Float[Tensor, "length"], Float[Tensor, "length"]]],
    *,
    log: bool = True,
    y_title: str = "‖y_n(s) − y_{n+1}(s*)‖",
    title: str = "Collapse by positional encoding (synthetic decoders)",
) -> go.Figure:
    """One line per positional encoding (mean over models) with a ±1 std band."""
    x = _array(lengths, "lengths", ndim=1)
    fig = go.Figure()
    for i, (name, (mean, std)) in enumerate(curves.items()):
        mean, std = _array(mean, "mean", ndim=1), _array(std, "std", ndim=1)
        label, color = _escape(name), _color(i)
        upper, lower = mean + std, mean - std
        if log:  # a band reaching ≤ 0 cannot be drawn on a log axis: clip it at the mean's smallest value
            lower = np.where(lower > 0, lower, np.nanmin(mean[mean > 0]) if (mean > 0).any() else np.nan)
        fig.add_trace(go.Scatter(x=x, y=upper, mode="lines", line={"width": 0}, showlegend=False,
                                 legendgroup=label, name=f"{label} +std", hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=x, y=lower, mode="lines", line={"width": 0}, fill="tonexty",
                                 fillcolor=_rgba(color, 0.2), showlegend=False, legendgroup=label,
                                 name=f"{label} −std", hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=x, y=mean, mode="lines+markers", name=label, legendgroup=label,
                                 line={"color": color}, customdata=std,
                                 hovertemplate=f"{label}<br>length %{{x}}<br>%{{y:.3e}} ± %{{customdata:.1e}}<extra></extra>"))
    fig.update_xaxes(title_text="prompt length n")
    fig.update_yaxes(title_text=_escape(y_title), type="log" if log else "linear")
    return _layout(fig, title, height=450)


def _rgba(color: str, alpha: float) -> str:
    color = color.lstrip("#")
    r, g, b = (int(color[i:i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def tv_figure(
    lengths: Sequence[int],
    tv: Float[Tensor, "seed length"],
    bound: Float[Tensor, "seed length"] | Float[Tensor, "length"] | None = None,
    *,
    seeds: Sequence[int] | None = None,
    title: str = "Softmax total variation between x[:m] and x*[:m] (Lemma B.2)",
) -> go.Figure:
    """Figure 9: the TV of each seed against the prefix length ``m`` (log–log), bounds dashed."""
    x = _array(lengths, "lengths", ndim=1)
    tv = _array(tv, "tv")
    tv = tv[None] if tv.ndim == 1 else tv
    seeds = list(range(tv.shape[0])) if seeds is None else list(seeds)
    bounds = None if bound is None else _array(bound, "bound")
    per_seed = bounds is not None and bounds.ndim == 2
    fig = go.Figure()
    for i, seed in enumerate(seeds):
        fig.add_trace(go.Scatter(x=x, y=tv[i], mode="lines", name=f"seed {seed}", line={"color": _color(i)},
                                 legendgroup=f"seed {seed}", hovertemplate="m %{x}<br>TV %{y:.3e}<extra></extra>"))
        if bounds is not None and (per_seed or i == 0):
            name = f"bound, seed {seed}" if per_seed else "bound"
            fig.add_trace(go.Scatter(x=x, y=bounds[i] if per_seed else bounds, mode="lines", name=name,
                                     legendgroup=f"seed {seed}", line={"color": _color(i), "dash": "dash"},
                                     hovertemplate="m %{x}<br>bound %{y:.3e}<extra></extra>"))
    fig.update_xaxes(title_text="prefix length m", type="log")
    fig.update_yaxes(title_text="total variation", type="log")
    return _layout(fig, title, height=450)


def tv_decay_figure(result: Any, **kwargs) -> go.Figure:
    """:func:`tv_figure` for a ``softmax_theory.TVDecayResult``."""
    return tv_figure(result.lengths, result.tv, result.bound, seeds=result.seeds, **kwargs)


# --------------------------------------------------------------------------------------------------
# sinks and phases
# --------------------------------------------------------------------------------------------------

_PHASES = (("Mix", "rgba(99,110,250,0.10)"), ("Compress", "rgba(239,85,59,0.12)"), ("Refine", "rgba(0,204,150,0.10)"))


def sink_figure(
    curves: Mapping[str, Float[Tensor, "layer"]],
    phases: tuple[int, int] | None = None,
    *,
    log: Sequence[str] = (),
    title: str = "Sinks, massive activations and compression by layer",
) -> go.Figure:
    """One panel per per-layer curve, sharing the layer axis; Mix–Compress–Refine shaded.

    ``phases = (mix_end, compress_end)`` as returned by ``sinks.detect_phases``: layers
    ``[0, mix_end)`` mix, ``[mix_end, compress_end)`` compress, the rest refine. Curves named in
    ``log`` get a log y axis (norm ratios span orders of magnitude).
    """
    curves = {str(k): _array(v, f"curves[{k}]", ndim=1) for k, v in curves.items() if v is not None}
    if not curves:
        raise ValueError("pass at least one per-layer curve")
    n_layers = max(len(v) for v in curves.values())
    height = max(400, 200 * len(curves))
    fig = make_subplots(rows=len(curves), cols=1, shared_xaxes=True, vertical_spacing=45 / height,
                        subplot_titles=[_escape(k) for k in curves])
    for i, (name, values) in enumerate(curves.items()):
        fig.add_trace(go.Scatter(x=np.arange(len(values)), y=values, mode="lines+markers", name=_escape(name),
                                 line={"color": _color(i)}, showlegend=False,
                                 hovertemplate=f"{_escape(name)}<br>layer %{{x}}: %{{y:.4g}}<extra></extra>"),
                      row=i + 1, col=1)
        if name in log:
            fig.update_yaxes(type="log", row=i + 1, col=1)
    if phases is not None:
        bounds = (0, *phases, n_layers)
        for (label, color), start, end in zip(_PHASES, bounds[:-1], bounds[1:], strict=True):
            if end > start:
                fig.add_vrect(x0=start - 0.5, x1=end - 0.5, fillcolor=color, line_width=0, layer="below",
                              row="all", col=1)
                fig.add_annotation(x=(start + end - 1) / 2, y=1.0, yref="paper", yanchor="bottom", yshift=22,
                                   text=f"<i>{label}</i>", showarrow=False, font={"size": 12, "color": "#555"})
    fig.update_xaxes(title_text="layer", row=len(curves), col=1)
    return _layout(fig, title, height=height, margin={"t": 110})


_SINK_CURVES = ("first_token_mass", "sink_rate", "mixing", "norm_ratio", "entropy", "anisotropy")


def sink_report_figure(report: Any, **kwargs) -> go.Figure:
    """:func:`sink_figure` for a ``sinks.SinkReport`` (its curves, phases, log axis for norm ratios)."""
    curves = {name: getattr(report, name, None) for name in _SINK_CURVES}
    kwargs.setdefault("log", ("norm_ratio",))
    return sink_figure(curves, getattr(report, "phases", None), **kwargs)


# --------------------------------------------------------------------------------------------------
# copying and counting tasks
# --------------------------------------------------------------------------------------------------


def _task_frame(results: Any) -> pd.DataFrame:
    frame = getattr(results, "frame", results)
    if not isinstance(frame, pd.DataFrame):
        raise TypeError("pass a TaskResults or its DataFrame")
    missing = {"task", "length"} - set(frame.columns)
    if missing:
        raise ValueError(f"the results frame lacks columns {sorted(missing)}")
    frame = frame.copy()
    modes = frame["mode"] if "mode" in frame.columns else pd.Series([""] * len(frame), index=frame.index)
    several = frame.assign(_mode=modes).groupby("task")["_mode"].nunique() > 1
    frame["series"] = [f"{t} ({m})" if several.get(t, False) else str(t) for t, m in zip(frame["task"], modes, strict=True)]
    return frame


def _per_length_figure(frame: pd.DataFrame, column: str, y_title: str, title: str, y_range=None) -> go.Figure:
    fig = go.Figure()
    for i, (series, group) in enumerate(frame.groupby("series", sort=True)):
        stats = group.groupby("length")[column].agg(["mean", "count"]).reset_index()
        fig.add_trace(go.Scatter(
            x=stats["length"].to_numpy(), y=stats["mean"].to_numpy(dtype=float), customdata=stats["count"].to_numpy(),
            mode="lines+markers", name=_escape(series), line={"color": _color(i)},
            hovertemplate=f"{_escape(series)}<br>length %{{x}}<br>{y_title} %{{y:.3g}} (n = %{{customdata}})<extra></extra>",
        ))
    fig.update_xaxes(title_text="sequence length")
    fig.update_yaxes(title_text=y_title, range=y_range)
    return _layout(fig, title, height=450)


def accuracy_figure(results: Any, *, title: str = "Accuracy against sequence length") -> go.Figure:
    """Figure 2: the fraction of correct answers per task (and mode) and length."""
    frame = _task_frame(results)
    frame["correct"] = frame["correct"].astype(float)
    return _per_length_figure(frame, "correct", "accuracy", title, y_range=[-0.03, 1.03])


def abs_error_figure(results: Any, *, title: str = "Mean absolute error against sequence length") -> go.Figure:
    """Figure 3: the mean absolute error of parsed answers (unparsable answers left out)."""
    frame = _task_frame(results)
    frame["abs_error"] = pd.to_numeric(frame["abs_error"], errors="coerce").astype(float)
    return _per_length_figure(frame.dropna(subset=["abs_error"]), "abs_error", "mean |answer − truth|", title)


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
    height = max(400, 320 * len(series_names))
    fig = make_subplots(rows=len(series_names), cols=1, subplot_titles=[_escape(s) for s in series_names],
                        vertical_spacing=90 / height)
    for row, series in enumerate(series_names, start=1):
        group = frame[frame["series"] == series]
        for i, length in enumerate(lengths):
            rows = group[group["length"] == length]
            if rows.empty:
                continue
            answers = pd.to_numeric(rows[column], errors="coerce").dropna().astype(int)
            counts = answers.value_counts().sort_index()
            unparsable = len(rows) - len(answers)
            name = f"n = {length}" + (f" ({unparsable} unparsable)" if unparsable else "")
            fig.add_trace(go.Bar(x=counts.index.to_numpy(), y=counts.to_numpy(), name=name, legendgroup=f"n{length}",
                                 showlegend=row == 1, marker={"color": _color(i)},
                                 hovertemplate=f"length {length}<br>answer %{{x}}: %{{y}} samples<extra></extra>"),
                          row=row, col=1)
            truths = rows["truth"].unique() if "truth" in rows.columns else []
            if len(truths) == 1:
                fig.add_trace(go.Scatter(x=[int(truths[0])], y=[0], mode="markers", legendgroup=f"n{length}",
                                         showlegend=False, name=f"truth, n = {length}",
                                         marker={"symbol": "triangle-up", "size": 12, "color": _color(i)},
                                         hovertemplate=f"true answer for length {length}: %{{x}}<extra></extra>"),
                              row=row, col=1)
        fig.update_xaxes(title_text="parsed answer", row=row, col=1)
        fig.update_yaxes(title_text="samples", row=row, col=1)
    return _layout(fig, title, barmode="group", height=height)
