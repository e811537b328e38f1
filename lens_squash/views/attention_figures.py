"""Attention patterns ``A^(l,h)`` as heatmaps, TransformerLens / CircuitsVis style (§5).

Query rows (top to bottom), key columns, token labels; a layer slider, the heads of a layer as
small multiples; a logarithmic colour scale by default because the first token's column would
saturate a linear one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from jaxtyping import Float
from plotly.colors import sample_colorscale
from plotly.subplots import make_subplots
from torch import Tensor

from ..core.results import register_figure
from ..edge.trace import Trace
from ..experiments.analysis import Analysis
from .style import (
    MAX_TICKS,
    as_array,
    escape_label,
    finish_layout,
    position_labels,
    token_ticks,
    trace_data,
)

__all__ = ["attention_heatmap", "block_size", "pooled", "trace_patterns", "COLOR_SCALES"]

#: colour scales for attention: name -> (value -> colour position in [0, 1]) given ``floor`` and ``gamma``
COLOR_SCALES: tuple[str, ...] = ("log", "power", "linear")
_STOPS = 48  # enough stops that plotly's linear interpolation between them follows a log or power curve


def _color_position(values: np.ndarray, scale: str, floor: float, gamma: float) -> np.ndarray:
    """Where each attention value sits on the colour bar, 0 (bottom) to 1 (top)."""
    if scale == "log":
        return np.clip(np.log10(np.maximum(values, floor)) / -math.log10(floor) + 1.0, 0.0, 1.0)
    if scale == "power":
        return np.clip(values, 0.0, 1.0) ** gamma
    return np.clip(values, 0.0, 1.0)


def _attention_colorscale(scale: str, floor: float, gamma: float) -> list[list]:
    """A colour scale over the raw attention value ``z ∈ [0, 1]`` whose colours follow ``scale``:
    the stops sit at the values whose colour positions are evenly spaced, so the heatmap keeps the
    exact attention in ``z`` (and in its hover) while its colours are logarithmic or a power."""
    if scale == "linear":
        return [
            [t, c]
            for t, c in zip(
                np.linspace(0, 1, 11), sample_colorscale("Viridis", list(np.linspace(0, 1, 11))), strict=True
            )
        ]
    ts = np.linspace(0.0, 1.0, _STOPS + 1)
    values = floor ** (1.0 - ts) if scale == "log" else ts ** (1.0 / gamma)
    colors = sample_colorscale("Viridis", list(ts))
    stops = [[0.0, colors[0]]] if values[0] > 0 else []
    stops += [[float(v), c] for v, c in zip(values, colors, strict=True)]
    stops[-1][0] = 1.0
    return stops


def _colorbar_ticks(scale: str, floor: float, gamma: float) -> tuple[list[float], list[str], str]:
    if scale == "log":
        decades = list(range(round(math.log10(floor)), 1))
        text = ["1" if d == 0 else f"10<sup>{d}</sup>" for d in decades]
        text[0] = "≤ " + text[0]
        return [float(d) for d in decades], text, "attention (log scale)"
    values = [0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0] if scale == "power" else [0.0, 0.25, 0.5, 0.75, 1.0]
    positions = _color_position(np.asarray(values), scale, floor, gamma)
    label = f"attention (power scale, γ = {gamma:g})" if scale == "power" else "attention"
    return [float(p) for p in positions], [f"{v:g}" for v in values], label


def _colorbar_trace(scale: str, floor: float, gamma: float) -> go.Scatter:
    """An empty trace that only draws the colour bar, in the coordinates the ticks are read in
    (``log₁₀ attention`` for the log scale): the heatmaps themselves hold raw attention."""
    tickvals, ticktext, label = _colorbar_ticks(scale, floor, gamma)
    low = math.log10(floor) if scale == "log" else 0.0
    high = 0.0 if scale == "log" else 1.0
    return go.Scatter(
        x=[None],
        y=[None],
        mode="markers",
        name="colour scale",
        showlegend=False,
        hoverinfo="skip",
        marker={
            "color": [low],
            "colorscale": "Viridis",
            "cmin": low,
            "cmax": high,
            "showscale": True,
            "colorbar": {
                "title": {"text": label, "side": "right"},
                "tickvals": tickvals,
                "ticktext": ticktext,
                "len": 0.9,
            },
        },
    )


def _heatmap_steps(patterns: np.ndarray, layer: int | None, head: int | None, max_cells: int, side: int):
    """``[(slider label, view name, [(panel name, matrix), …]), …]`` and a note when heads were left out;
    each map will be drawn as ``side × side`` cells (fewer than the positions when pooled)."""
    n_layers, n_heads, _, _ = patterns.shape
    n = side
    if layer is not None and head is not None:
        name = f"layer {layer}, head {head}"
        return [(str(layer), name, [(name, patterns[layer, head])])], ""
    if head is not None:
        return [
            (str(l), f"layer {l}, head {head}", [(f"layer {l}, head {head}", patterns[l, head])])
            for l in range(n_layers)
        ], ""
    layers = [layer] if layer is not None else list(range(n_layers))
    overall = layer is None
    with_heads = (len(layers) * (n_heads + 1) + overall) * n * n <= max_cells
    notes = [] if with_heads or n_heads == 1 else ["per-head maps left out for size"]
    if not with_heads and overall:
        kept = _spread(layers, max(1, max_cells // (n * n) - 1))
        if len(kept) < len(layers):
            notes.append(f"{len(kept)} of {len(layers)} layers shown")
        layers = kept
    steps = (
        [("all", "mean of all layers and heads", [("mean of all layers and heads", patterns.mean((0, 1)))])]
        if overall
        else []
    )
    for l in layers:
        panels = [(f"layer {l}, mean of heads", patterns[l].mean(0))]
        if with_heads:
            panels += [(f"layer {l}, head {h}", patterns[l, h]) for h in range(n_heads)]
        steps.append(
            (str(l), f"layer {l}" + (", mean of heads and each head" if with_heads else ", mean of heads"), panels)
        )
    note = f" ({'; '.join(notes)}: pass layer=… or a larger max_cells)" if notes else ""
    return steps, note


def block_size(n: int, max_cells: int) -> int:
    """Positions per block so that one ``n × n`` map pooled into blocks fits ``max_cells`` cells (1: no pooling)."""
    return max(1, math.ceil(n / max(1, math.isqrt(max_cells))))


def pooled(matrix: Float[np.ndarray, "query_pos key_pos"], block: int) -> Float[np.ndarray, "query_block key_block"]:
    """Attention pooled into ``block × block`` cells: the mean over a block's queries of the mass they
    put on a block of keys, so every pooled row still sums to what the rows summed to (1)."""
    if block == 1:
        return matrix
    n = matrix.shape[-1]
    m = -(-n // block)
    padded = np.zeros((m * block, m * block), dtype=np.float64)
    padded[:n, :n] = matrix
    mass = padded.reshape(m, block, m, block).sum(axis=(1, 3))  # summed over the block's queries and keys
    rows = np.minimum(block, n - np.arange(m) * block)  # the last block may hold fewer queries
    return (mass / rows[:, None]).astype(np.float32)


def _block_categories(labels: Sequence[str], block: int) -> list[str]:
    """``"i: token"`` per position, or ``"i–j: token…"`` per block (unique either way)."""
    if block == 1:
        return [f"{i}: {label}" for i, label in enumerate(labels)]
    n = len(labels)
    return [f"{s}–{min(s + block, n) - 1}: {labels[s]}…" for s in range(0, n, block)]


def _spread(layers: list[int], count: int) -> list[int]:
    """``count`` of ``layers``, evenly spread, the first and the last always among them."""
    if count >= len(layers):
        return layers
    if count == 1:
        return [layers[-1]]
    picks = np.unique(np.round(np.linspace(0, len(layers) - 1, count)).astype(int))
    return [layers[i] for i in picks]


def _checked_index(value: int | None, size: int, name: str) -> None:
    if value is not None and not (isinstance(value, int) and 0 <= value < size):
        raise ValueError(f"{name} must be an int in 0…{size - 1}, got {value!r}")


def _panel_annotations(fig: go.Figure, names: Sequence[str], cols: int, n_panels: int) -> list[dict]:
    """Titles above each small multiple (one step's), placed from the subplot domains."""
    if n_panels == 1:
        return []
    out = []
    for p in range(n_panels):
        suffix = "" if p == 0 else str(p + 1)
        x_domain, y_domain = fig.layout[f"xaxis{suffix}"].domain, fig.layout[f"yaxis{suffix}"].domain
        out.append(
            {
                "text": escape_label(names[p]) if p < len(names) else "",
                "x": sum(x_domain) / 2,
                "y": y_domain[1],
                "xref": "paper",
                "yref": "paper",
                "xanchor": "center",
                "yanchor": "bottom",
                "showarrow": False,
                "font": {"size": 11},
            }
        )
    return out


def _panel_visibility(shown: int, n_panels: int) -> dict:
    """Layout keys that hide the axes of the small multiples a slider step leaves empty."""
    if n_panels == 1:
        return {}
    out = {}
    for p in range(n_panels):
        suffix = "" if p == 0 else str(p + 1)
        out[f"xaxis{suffix}.visible"] = out[f"yaxis{suffix}.visible"] = p < shown
    return out


def attention_heatmap(
    patterns: Float[Tensor, "layer head query_pos key_pos"],
    str_tokens: Sequence[str] | None = None,
    *,
    layer: int | None = None,
    head: int | None = None,
    color_scale: str = "log",
    floor: float = 1e-4,
    gamma: float = 0.5,
    max_cells: int = 1_000_000,
    title: str = "Attention patterns",
) -> go.Figure:
    """``A^(l,h)`` as heatmaps, CircuitsVis-style: query rows (top to bottom), key columns, tokens on both.

    Layer and head are two separate choices: a slider picks the layer, and the layer's heads are
    shown side by side as small multiples beside their mean. ``layer`` and ``head`` both set: that
    one map. ``layer`` only: its head mean and every head, no slider. ``head`` only: that head, a
    slider over layers. Neither: a slider over "all" (the mean of every layer and head) and each
    layer, with the heads included when the total stays under ``max_cells`` entries (a float32 cell
    costs about 5.3 bytes of HTML); when even the layer means exceed it, evenly spread layers (the
    first and last among them) are kept, and the title and caption say so. The colour scale is
    ``"log"`` by default (down to ``floor``; the first-token column would saturate a linear scale),
    or ``"power"`` (``A^gamma``) or ``"linear"``; ``z`` and the hover always hold the attention
    itself (float32, shown to 3 significant digits), and cells that are exactly 0 (the
    causal mask) are left blank. Axis categories are ``"i: token"`` (unique, so repeated tokens stay
    apart); beyond :data:`MAX_TICKS` tokens only every k-th is labelled, the hover names every one.
    """
    if color_scale not in COLOR_SCALES:
        raise ValueError(f"color_scale must be one of {COLOR_SCALES}, got {color_scale!r}")
    if not 0 < floor < 1:
        raise ValueError(f"floor must be in (0, 1) (the smallest attention the log scale resolves), got {floor!r}")
    if not 0 < gamma <= 1:
        raise ValueError(f"gamma must be in (0, 1] (smaller spreads small attention further), got {gamma!r}")
    patterns = as_array(patterns, "patterns", ndim=4).astype(np.float32)
    n_layers, n_heads, n, _ = patterns.shape
    _checked_index(layer, n_layers, "layer")
    _checked_index(head, n_heads, "head")
    # one map larger than the budget is pooled into blocks of positions (a 1000-token map is 4 MB)
    block = block_size(n, max_cells)
    categories = _block_categories(position_labels(str_tokens, n), block)
    side = len(categories)
    steps, note = _heatmap_steps(patterns, layer, head, max_cells, side)
    n_panels = max(len(panels) for _, _, panels in steps)
    cols = min(n_panels, 5)
    rows = math.ceil(n_panels / cols)
    fig = make_subplots(rows=rows, cols=cols, horizontal_spacing=0.05, vertical_spacing=0.1 if rows > 1 else 0.0)
    colorscale = _attention_colorscale(color_scale, floor, gamma)
    hover = (
        "query %{y}<br>key %{x}<br>attention %{z:.3g}"
        if block == 1
        else "queries %{y}<br>keys %{x}<br>attention mass %{z:.3g} (mean over the queries)"
    )
    spans = []
    for s, (_, _, panels) in enumerate(steps):
        start = len(fig.data)
        for p, (name, matrix) in enumerate(panels):
            fig.add_trace(
                go.Heatmap(
                    z=trace_data(np.where((cells := pooled(matrix, block)) == 0, np.nan, cells)),
                    x=categories,
                    y=categories,
                    name=escape_label(name),
                    visible=s == 0,
                    coloraxis="coloraxis",
                    hoverongaps=False,
                    hovertemplate=f"{escape_label(name)}<br>{hover}<extra></extra>",
                ),
                row=p // cols + 1,
                col=p % cols + 1,
            )
        spans.append((start, len(fig.data)))
    # one colour axis for every map: the scale's 49 stops are written once, not once per heatmap
    fig.update_layout(coloraxis={"colorscale": colorscale, "cmin": 0.0, "cmax": 1.0, "showscale": False})
    fig.add_trace(_colorbar_trace(color_scale, floor, gamma), row=1, col=1)
    small = n_panels > 1
    max_ticks = 12 if small else MAX_TICKS
    for p in range(n_panels):
        row, col = p // cols + 1, p % cols + 1
        # small multiples share their tokens: tick labels on the outer panels only, titles on all
        fig.update_xaxes(
            title_text="key" if small else "key position",
            type="category",
            row=row,
            col=col,
            showticklabels=not small or p + cols >= n_panels,
            **token_ticks(categories, categories, max_ticks),
        )
        fig.update_yaxes(
            title_text="query" if small else "query position",
            type="category",
            autorange="reversed",
            row=row,
            col=col,
            showticklabels=not small or col == 1,
            **token_ticks(categories, categories, max_ticks, axis="y"),
        )
    annotations = [_panel_annotations(fig, [name for name, _ in panels], cols, n_panels) for _, _, panels in steps]
    # the note (what was left out for size) goes on a second, smaller line: on one line it ran past the figure
    second = f"<br><span style='font-size:12px'>{note.strip()}</span>" if note else ""
    full_titles = [escape_label(title) + " — " + escape_label(view) + second for _, view, _ in steps]
    if len(steps) > 1:
        slider_steps = [
            {
                "label": label,
                "method": "update",
                "args": [
                    {"visible": [start <= i < end or i == len(fig.data) - 1 for i in range(len(fig.data))]},
                    {
                        "title.text": full_titles[s],
                        "annotations": annotations[s],
                        **_panel_visibility(end - start, n_panels),
                    },
                ],
            }
            for s, ((label, _, _), (start, end)) in enumerate(zip(steps, spans, strict=True))
        ]
        fig.update_layout(
            sliders=[
                {
                    "active": 0,
                    "steps": slider_steps,
                    "currentvalue": {"prefix": "layer: "},
                    "pad": {"t": 130 if small else 150},
                    "x": 0.0,
                    "len": 1.0,
                }
            ]
        )
    fig.update_layout(**_panel_visibility(spans[0][1] - spans[0][0], n_panels))
    panel = max(170, min(300, 1000 // cols)) if small else min(900, 300 + 8 * side)
    slider_room = 170 if len(steps) > 1 else 0
    caption = _heatmap_caption(n, steps, color_scale, floor, gamma, note, block)
    return finish_layout(
        fig,
        title,
        suffix=full_titles[0].removeprefix(escape_label(title)),
        caption=caption,
        annotations=annotations[0],
        height=rows * panel + 150 + slider_room,
        width=cols * panel + 200,
    )


def _heatmap_caption(n: int, steps, color_scale: str, floor: float, gamma: float, note: str, block: int) -> str:
    scale = {
        "log": f"a logarithmic colour scale (values at or below {floor:g} share the darkest colour)",
        "power": f"a power colour scale (colour ∝ attention^{gamma:g}, which spreads small values out)",
        "linear": "a linear colour scale",
    }[color_scale]
    parts = [
        f"Attention patterns over the {n} tokens: row = query position (the token that attends, top to "
        "bottom), column = key position (the token attended to); each row sums to 1 over the keys at or before "
        f"the query. Colours use {scale}; blank cells are exactly 0 (the causal mask hides later keys). "
        "Hover a cell for its query, key and attention value. A bright first column is an attention sink."
    ]
    if block > 1:
        parts.append(
            f"The {n} positions are pooled into blocks of {block} to keep the figure small: a cell is the "
            "attention mass a block of queries puts on a block of keys, averaged over the queries (rows "
            "still sum to 1); pass a larger max_cells for every position."
        )
    if len(steps) > 1:
        parts.append("The slider below picks the layer ('all' averages every layer and head).")
    if max(len(p) for _, _, p in steps) > 1:
        parts.append("Small multiples show the layer's mean over heads, then each head.")
    if note:
        parts.append(
            f"To keep the figure small, {note.strip(' ()').split(':')[0]}; pass layer= to see one layer and its heads."
        )
    return " ".join(parts)


# --------------------------------------------------------------------------------------------------
# figure kinds: a trace's and an analysis's patterns (Result.plot)
# --------------------------------------------------------------------------------------------------


def trace_patterns(trace: Trace):
    """The trace's per-head patterns, or a message saying why there are none and how to get them."""
    if trace.patterns is not None:
        return trace.patterns
    if "patterns" in trace.provenance.get("dropped", []):
        raise ValueError(
            "the attention patterns were not saved (a report's results.json and save(heavy=False) leave them out); "
            "rerun analyze(...) or load a file saved with heavy fields (result.save(path))"
        )
    raise ValueError(
        f"this {trace.n_tokens}-token trace streamed its attention patterns instead of keeping them; "
        "rerun with keep_patterns=True (memory grows as layer × head × pos²)"
    )


@register_figure(Trace, "attention", default=True)
def _trace_attention(trace: Trace, **kwargs):
    return attention_heatmap(trace_patterns(trace), trace.str_tokens, **kwargs)


@register_figure(Analysis, "attention")
def _analysis_attention(analysis: Analysis, **kwargs):
    return _trace_attention(analysis.trace, **kwargs)
