"""Plotly figure builders for every lens_squash result, each returning a ``go.Figure`` that explains itself.

The builders take plain tensors, arrays or DataFrames plus labels, so they do not depend on the
result classes; thin ``*_from_*`` wrappers accept the result objects by duck typing (they read
attributes such as ``.bound``, ``.head_flows`` or ``.frame``). Figures are returned, never shown or
written (DESIGN §8); :mod:`lens_squash.views.report` embeds them in a self-contained HTML file and
:mod:`lens_squash.views.export` writes them as PNG / SVG / PDF.

| builder | shows | paper |
|---|---|---|
| :func:`bound_vs_jacobian` | per-position Jacobian norm against each variant's path-sum bound | §5, Thm. B.5 |
| :func:`attention_heatmap` | ``A^(l,h)``: a layer slider, the heads of a layer as small multiples | §5 |
| :func:`attention_paths` | the heaviest edges of the flow decomposition on a layers × positions grid | DESIGN §3 |
| :func:`spectral_figure` | the spectrum of ``Λ̃^(l)``, Dobrushin coefficients, convergence with depth | Prop. B.8 |
| :func:`collapse_figure` | representational-collapse distance against length, per dtype | Thm. 4.2, Fig. 6 |
| :func:`head_band_figure` | mean, min and max over last-layer heads against length | Fig. 5 |
| :func:`pe_figure` | the synthetic positional-encoding study | Fig. 7 |
| :func:`tv_figure` | softmax total-variation decay with its bound | Lemma B.2, Fig. 9 |
| :func:`sink_figure` | per-layer sink / compression curves with Mix–Compress–Refine phases | Queipo-de-Llano et al. |
| :func:`accuracy_figure`, :func:`abs_error_figure`, :func:`answer_histogram` | task results | Figs. 2–4 |

**Figures that explain themselves.** Every builder titles every axis, writes ticks in one scientific
style (``10⁻³``, never SI suffixes such as ``10B`` or ``100p`` beside ``10⁶⁰``), draws curves with
distinct dash styles and markers so that coinciding curves stay visible, and stores a plain-language
caption (what the figure shows and how to read it) in ``fig.layout.meta["caption"]``: read it with
:func:`caption_of`, set it with :func:`with_caption`. Captions are plain text (escape them before
putting them into HTML). Attention views follow TransformerLens / CircuitsVis: query rows (top to
bottom), key columns, token labels; their colour scale is logarithmic by default because the first
token's column would saturate a linear one.

**Size.** Numeric data goes in as numpy arrays, which plotly serialises as base64 typed arrays
instead of decimal lists (float32 data, such as attention, in four bytes a value), at the precision
it came in: no figure holds a number less exact than its input. :func:`compact_figure` turns any
figure's lists into typed arrays, float64 into float32 where every value fits its range (a bound of
``1e-60`` stays float64 rather than flushing to zero), and optionally rounds to the digits the
hover shows (:func:`rounded`), which helps only a gzip-compressed transfer.

**Token text is untrusted.** Plotly renders a subset of HTML inside labels and hover text, so every
token goes through :func:`token_label` (``repr``-style, spaces shown as ``␣``, then ``html.escape``):
a token ``<b>`` shows literally as ``<b>`` and a token ``<script>`` cannot inject when the figure is
embedded (plotly's JSON encoder also writes ``<``, ``>`` and ``/`` as ``\\u003c``-style escapes).
Positions are numeric (or unique ``"i: token"`` categories) so repeated tokens never merge.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from plotly.colors import qualitative, sample_colorscale
from plotly.subplots import make_subplots
from torch import Tensor

from ..algebra import ranks

__all__ = [
    "COLOR_SCALES",
    "MAX_TICKS",
    "SINK_CURVES",
    "SPECTRAL_FIELDS",
    "abs_error_figure",
    "accuracy_figure",
    "answer_histogram",
    "attention_heatmap",
    "attention_paths",
    "bound_vs_jacobian",
    "caption_of",
    "collapse_figure",
    "compact_figure",
    "comparison_figure",
    "head_band_figure",
    "math_text",
    "pe_figure",
    "rounded",
    "sink_figure",
    "sink_report_figure",
    "spectral_figure",
    "spectral_report_figure",
    "token_label",
    "tv_decay_figure",
    "tv_figure",
    "with_caption",
]

#: above this many positions, axes label every k-th token only (hover still shows every token)
MAX_TICKS: int = 100
_PALETTE = qualitative.Plotly
_HEAD_PALETTE = qualitative.Dark24
_DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")
_SYMBOLS = ("circle", "square", "diamond", "triangle-up", "x", "cross", "triangle-down", "star", "pentagon", "hexagon")
_RESIDUAL_GREY = "rgba(120,120,120,0.85)"
_TEMPLATE = "plotly_white"
_HOVER_DIGITS = 4  # significant digits every hover shows (``%{y:.4g}``), so the data is rounded to them


# --------------------------------------------------------------------------------------------------
# shared helpers: labels, captions, math text, rounding
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


_SUBSCRIPTS = dict(zip("0123456789+-=()aehijklmnoprstuvx", "₀₁₂₃₄₅₆₇₈₉₊₋₌₍₎ₐₑₕᵢⱼₖₗₘₙₒₚᵣₛₜᵤᵥₓ", strict=True))
_SUPERSCRIPTS = dict(zip("0123456789+-=()in", "⁰¹²³⁴⁵⁶⁷⁸⁹⁺⁻⁼⁽⁾ⁱⁿ", strict=True))
_SCRIPT = re.compile(r"([_^])(?:\{([^{}]*)\}|([A-Za-z0-9]))")


def math_text(text: Any) -> str:
    """TeX-style sub- and superscripts (``y_{n+1}``, ``x_i``, ``10^{-3}``) as display text, HTML-escaped.

    Unicode sub/superscript characters where every character has one (``yₙ₊₁``: they survive SVG and
    PDF export and copy-paste), plotly's ``<sub>``/``<sup>`` otherwise (``‖J‖<sub>F</sub>``). Meant
    for axis titles written as math; names such as ``first_token_mass`` should not go through it.
    """
    def script(match: re.Match) -> str:
        body = match.group(2) if match.group(2) is not None else match.group(3)
        table, tag = (_SUBSCRIPTS, "sub") if match.group(1) == "_" else (_SUPERSCRIPTS, "sup")
        if body and all(ch in table for ch in body):
            return "".join(table[ch] for ch in body)
        return f"<{tag}>{body}</{tag}>"

    return _SCRIPT.sub(script, _escape(text))


def with_caption(fig: go.Figure, caption: str) -> go.Figure:
    """Store a plain-language caption (what the figure shows, how to read it) on ``fig``; returns ``fig``.

    The caption is plain text. It is stored HTML-escaped in ``fig.layout.meta["caption"]``, like every
    other user string in a figure (it may quote token or variant names); :func:`caption_of` gives the
    plain text back.
    """
    if not isinstance(fig, go.Figure):
        raise TypeError(f"with_caption takes a plotly go.Figure, got {type(fig).__name__}")
    meta = dict(fig.layout.meta) if isinstance(fig.layout.meta, dict) else {}
    meta["caption"] = _escape(" ".join(str(caption).split()))
    fig.update_layout(meta=meta)
    return fig


def caption_of(fig: go.Figure) -> str | None:
    """The caption :func:`with_caption` stored on ``fig``, as plain text (escape it before writing it
    into HTML), or ``None`` when the figure has none."""
    if not isinstance(fig, go.Figure):
        raise TypeError(f"caption_of takes a plotly go.Figure, got {type(fig).__name__}")
    meta = fig.layout.meta
    caption = meta.get("caption") if isinstance(meta, dict) else None
    return None if caption is None else html.unescape(caption)


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


def _data(values: Any) -> np.ndarray:
    """Trace data as a numpy array at the precision it came in (float32 or float64): plotly writes it
    as a base64 typed array, about half the bytes of a decimal list for float32, and every digit
    stays. (Decimal rounding would not shrink a typed array: a float32 is four bytes either way.)"""
    return _array(values)


_F32 = np.finfo(np.float32)


def rounded(values: Any, digits: int = _HOVER_DIGITS) -> np.ndarray:
    """``values`` rounded to ``digits`` significant digits, as a numpy array for plotly's typed arrays.

    The result is ``float32`` when ``digits ≤ 6`` (float32 holds about 7) and the values fit it
    (float32 input, or every finite non-zero magnitude in float32's normal range), else ``float64``:
    a bound of ``1e-60`` or ``1e60`` keeps its value instead of flushing to 0 or overflowing. NaN
    and ±inf pass through.

    What shrinks a figure is the typed array and float32, not the rounding: an 89 × 89 heatmap's data
    is 161 kB as a decimal list of float64, 85 kB as a float64 typed array, 42 kB as float32, and
    still 42 kB rounded to 3 digits (rounding only helps where the page is gzip-compressed in
    transit: 31 kB → 24 kB). The builders therefore keep the digits they are given; this helper and
    :func:`compact_figure` are for callers that want the smaller compressed size.
    """
    if isinstance(digits, bool) or not isinstance(digits, int) or digits < 1:
        raise ValueError(f"digits must be a positive int, got {digits!r}")
    source = _array(values)
    arr = source.astype(np.float64).ravel()
    out = arr.copy()
    nonzero = np.isfinite(arr) & (arr != 0)
    if nonzero.any():
        exponent = digits - 1 - np.floor(np.log10(np.abs(arr[nonzero])))
        # scale in two factors so that 10**exponent never overflows, even for subnormal inputs
        first = np.minimum(exponent, 290.0)
        second = exponent - first
        scaled = arr[nonzero] * 10.0 ** first * 10.0 ** second
        out[nonzero] = np.round(scaled) / 10.0 ** second / 10.0 ** first
    magnitudes = np.abs(out[np.isfinite(out) & (out != 0)])
    # float32 input held no more range than float32 (its subnormals included); float64 input must
    # fit float32's normal range, where every value keeps its ~7 significant digits
    in_range = magnitudes.size == 0 or (magnitudes.max() <= _F32.max
                                        and (source.dtype == np.float32 or magnitudes.min() >= _F32.tiny))
    fits = digits <= 6 and in_range
    out = out.reshape(source.shape)
    return out.astype(np.float32) if fits else out


_NUMERIC_FIELDS = ("x", "y", "z", "customdata")


def _numeric(value) -> np.ndarray | None:
    """``value`` as a float array when it is numeric data (not strings, not dates), else ``None``."""
    if value is None or isinstance(value, (str, bytes, dict)):
        return None
    arr = np.asarray(value)
    if arr.dtype.kind in "fiu" and arr.size:
        return arr
    if arr.dtype == object and arr.size:
        try:
            return np.asarray([np.nan if v is None else float(v) for v in arr.ravel()]).reshape(arr.shape)
        except (TypeError, ValueError):
            return None
    return None


def compact_figure(fig: go.Figure, digits: int = 6) -> go.Figure:
    """A copy of ``fig`` whose numeric trace data (``x``, ``y``, ``z``, ``customdata``) is held as
    numpy arrays, so plotly writes compact typed arrays: float32 where every value fits it, rounded
    to ``digits`` significant digits (6, the default, is float32's own precision; 4 is what the
    hovers show). Integer data stays integer; strings, dates and layout are untouched."""
    if not isinstance(fig, go.Figure):
        raise TypeError(f"compact_figure takes a plotly go.Figure, got {type(fig).__name__}")
    out = go.Figure(fig)
    for trace in out.data:
        for name in _NUMERIC_FIELDS:
            if name not in trace:
                continue
            arr = _numeric(trace[name])
            if arr is None:
                continue
            trace[name] = arr if arr.dtype.kind in "iu" else rounded(arr, digits)
    return out


def _labels(str_tokens: Sequence[str] | None, n: int) -> list[str]:
    if str_tokens is None:
        return [str(i) for i in range(n)]
    if len(str_tokens) != n:
        raise ValueError(f"got {len(str_tokens)} tokens for {n} positions")
    return [token_label(t) for t in str_tokens]


def _ticks(labels: Sequence[str], values: Sequence | None = None, max_ticks: int = MAX_TICKS, *,
           axis: str = "x") -> dict:
    """Axis settings that label every token (smaller, and turned upright on an x axis, when there
    are many), or every k-th one beyond ``max_ticks`` (the hover of every trace names every token)."""
    values = list(range(len(labels))) if values is None else list(values)
    step = max(1, math.ceil(len(labels) / max_ticks))
    shown = list(labels[::step])
    size = 11 if len(shown) <= 40 else 9 if len(shown) <= 70 else 8
    crowded = len(shown) > 12 or sum(len(label) for label in shown) > 60
    return {"tickmode": "array", "tickvals": values[::step], "ticktext": shown, "tickfont": {"size": size},
            "tickangle": -90 if axis == "x" and crowded else 0}


def _log_axis(*curves: np.ndarray) -> dict:
    """A log axis that labels whole decades only when the data spans a few of them (no "2" and "5"
    between decades); across many decades plotly's own choice of decades stays."""
    values = np.concatenate([np.ravel(c) for c in curves]) if curves else np.array([])
    values = values[np.isfinite(values) & (values > 0)]
    if values.size and 1.5 <= math.log10(values.max() / values.min()) <= 12:
        return {"type": "log", "dtick": 1}
    return {"type": "log"}


def _integer_axis(n: int) -> dict:
    """Ticks on whole layer or depth indices (a layer 0.5 does not exist)."""
    return {"tick0": 0, "dtick": max(1, math.ceil(n / 30))}


def _color(i: int, palette: Sequence[str] = _PALETTE) -> str:
    return palette[i % len(palette)]


def _style(i: int) -> tuple[str, str]:
    """The ``i``-th (dash, marker symbol) pair: curves that coincide still look different."""
    return _DASHES[i % len(_DASHES)], _SYMBOLS[i % len(_SYMBOLS)]


_AXIS_FORMAT = {"exponentformat": "power", "showexponent": "all"}


def _layout(fig: go.Figure, title: str, *, suffix: str = "", caption: str | None = None, **kwargs) -> go.Figure:
    """Title (user text, escaped) plus an already-escaped ``suffix``; the shared template, one
    scientific tick style on every axis, and the caption."""
    fig.update_layout(title={"text": _escape(title) + suffix}, template=_TEMPLATE, **kwargs)
    fig.update_xaxes(**_AXIS_FORMAT)
    fig.update_yaxes(**_AXIS_FORMAT)
    if caption is not None:
        with_caption(fig, caption)
    return fig


def _bound_values(bound: Any) -> np.ndarray:
    return _array(getattr(bound, "bound", bound), "bound", ndim=1)


def _stat(stats: Any, name: str) -> float:
    value = stats.get(name) if isinstance(stats, Mapping) else getattr(stats, name, None)
    return math.nan if value is None else float(value)


def _fmt_stat(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}"


# --------------------------------------------------------------------------------------------------
# bound versus Jacobian
# --------------------------------------------------------------------------------------------------


def _profile_trace(x, y, labels, name, color, style: int, width=2.0) -> go.Scatter:
    dash, symbol = _style(style)
    return go.Scatter(
        x=x, y=_data(y), name=_escape(name), mode="lines+markers", customdata=labels,
        line={"color": color, "dash": dash, "width": width}, marker={"size": 6, "symbol": symbol},
        legendgroup=_escape(name),
        hovertemplate="position %{x} · %{customdata}<br>%{fullData.name}: %{y:.4g}<extra></extra>",
    )


def _shape(values: np.ndarray) -> np.ndarray:
    total = float(np.nansum(values))
    return values / total if total > 0 else np.full_like(values, np.nan)


def _coinciding(curves: Mapping[str, np.ndarray]) -> list[tuple[str, str]]:
    """Pairs of curves whose shapes (each ÷ its sum) agree to 0.1 %: drawn on top of each other."""
    names, shapes = list(curves), {k: _shape(v) for k, v in curves.items()}
    return [(a, b) for i, a in enumerate(names) for b in names[i + 1:]
            if np.allclose(shapes[a], shapes[b], rtol=1e-3, atol=0, equal_nan=True)]


def _stats_text(stats: Mapping[str, Any], truth_name: str) -> str:
    lines = ["<b>rank agreement</b>", f"with {_escape(truth_name)}", "(Spearman ρ, Kendall τ)"]
    for name, value in stats.items():
        lines.append(f"{_escape(name)}: ρ = {_fmt_stat(_stat(value, 'spearman'))}, "
                     f"τ = {_fmt_stat(_stat(value, 'kendall'))}")
    return "<br>".join(lines)


def _bound_caption(n: int, truth_name: str | None, names: list[str], log: bool, normalised: bool,
                   same: list[tuple[str, str]], stats: Mapping[str, Any] | None) -> str:
    parts = [f"Each curve is a sensitivity profile over the {n} input positions of the prompt (x axis; the "
             "token is under each tick and in the hover)."]
    if truth_name is not None:
        parts.append(f"Thick black: {truth_name}, the true sensitivity of the last token's final "
                     "representation to each input position.")
    if names:
        parts.append(f"Coloured, each with its own dash and marker: the path-sum bound of {', '.join(names)} "
                     "(Theorem B.5 and its variants); a bound is an upper estimate and may sit orders of magnitude "
                     "above the truth.")
    parts.append(f"Top panel: raw values{' on a log axis' if log else ''}.")
    if normalised:
        parts.append("Bottom panel: each curve divided by its own sum, so only the shape is compared: a bound "
                     "that ranks positions well follows the black curve there.")
    for a, b in same:
        parts.append(f"{a} and {b} have the same shape and overlap; tell them apart by dash and marker.")
    if stats:
        parts.append("The box gives each bound's Spearman and Kendall rank correlation with the truth across "
                     "positions (1: same order, 0: unrelated, n/a: a constant curve).")
    return " ".join(parts)


def bound_vs_jacobian(
    str_tokens: Sequence[str] | None,
    truth: Float[Tensor, "pos"] | None,
    bounds: Mapping[str, Float[Tensor, "pos"]],
    *,
    truth_name: str = "Jacobian ‖∂yₙ/∂vᵢ‖₂",
    stats: Mapping[str, Any] | None = None,
    log: bool = True,
    normalised: bool = True,
    title: str = "Sensitivity of the last token to each input position",
) -> go.Figure:
    """Per position, the exact Jacobian norm (thick black) and each variant's bound (one colour,
    dash style and marker each).

    ``bounds`` maps a name to a ``[pos]`` tensor or to an object with ``.bound`` (a ``PathBound``).
    The top panel shows raw values (log y by default: the bounds span orders of magnitude); with
    ``normalised`` a second panel divides every curve by its sum, so shapes (the U) compare directly.
    ``stats`` maps a bound's name to its rank statistics against the truth (a ``compare.Comparison``
    or a mapping with ``spearman`` and ``kendall``); they are written in a box on the top panel.
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
    unknown = sorted(set(stats or {}) - set(bounds))
    if unknown:
        raise ValueError(f"stats name bounds that are not plotted: {unknown}; plotted: {sorted(bounds)}")
    labels, x = _labels(str_tokens, n), np.arange(n)
    rows = 2 if normalised else 1
    titles = ("raw values", "each curve ÷ its sum (shape only)")[:rows]
    fig = make_subplots(rows=rows, cols=1, shared_xaxes=True, vertical_spacing=0.16, subplot_titles=titles)
    for i, (name, values) in enumerate(curves.items()):
        is_truth = truth is not None and i == 0
        color = "black" if is_truth else _color(i - (truth is not None))
        trace = _profile_trace(x, values, labels, name, color, i, width=3.5 if is_truth else 2.0)
        fig.add_trace(trace, row=1, col=1)
        if normalised:
            twin = _profile_trace(x, _shape(values), labels, name, color, i, width=trace.line.width)
            twin.showlegend = False
            fig.add_trace(twin, row=2, col=1)
    raw_title = ("Jacobian norm and bounds" if truth is not None and bounds else
                 "Jacobian norm" if truth is not None else "path-sum bound")
    fig.update_yaxes(title_text=raw_title, row=1, col=1,
                     **(_log_axis(*curves.values()) if log else {"type": "linear"}))
    if normalised:
        shapes = [_shape(v) for v in curves.values()]
        fig.update_yaxes(title_text="fraction of the curve's sum", row=2, col=1,
                         **(_log_axis(*shapes) if log else {"type": "linear"}))
    for row in range(1, rows + 1):
        fig.update_xaxes(title_text="input position i", showticklabels=True, row=row, col=1, **_ticks(labels))
    if stats:  # in the right margin, where no curve can run under it
        fig.add_annotation(text=_stats_text(stats, truth_name), xref="paper", yref="paper", x=1.02, y=1.0,
                           xanchor="left", yanchor="top", showarrow=False, align="left", font={"size": 11},
                           bgcolor="rgba(255,255,255,0.9)", bordercolor="#888", borderwidth=1)
    bound_curves = {k: v for k, v in curves.items() if k in bounds}
    same = _coinciding(bound_curves)
    caption = _bound_caption(n, truth_name if truth is not None else None, list(bounds), log, normalised, same, stats)
    return _layout(fig, title, caption=caption, height=460 * rows, hovermode="x unified",
                   legend={"orientation": "h", "y": -0.22 if rows == 2 else -0.4},
                   margin={"r": 230 if stats else 80})


def _table_stats(table: pd.DataFrame, truth_col: str, names: Sequence[str]) -> dict[str, dict[str, float]]:
    """Spearman and Kendall of each bound column against the truth column (lens_squash.algebra.ranks,
    the functions ``compare.compare`` uses), NaN where a curve is constant or not finite."""
    truth = torch.tensor(table[truth_col].to_numpy(dtype=float))
    out = {}
    for name in names:
        bound = torch.tensor(table[name].to_numpy(dtype=float))
        try:
            out[name] = {"spearman": ranks.spearman(bound, truth), "kendall": ranks.kendall(bound, truth)}
        except ValueError:  # NaN / inf, or fewer than two positions: no rank statistic to show
            out[name] = {"spearman": math.nan, "kendall": math.nan}
    return out


def comparison_figure(table: pd.DataFrame, comparisons: Mapping[str, Any] | None = None, **kwargs) -> go.Figure:
    """:func:`bound_vs_jacobian` from the per-position table of ``compare.compare_variants``, with the
    rank statistics annotated: from ``comparisons`` (``compare_variants``' second value) when given,
    else computed from the table with :mod:`lens_squash.algebra.ranks`."""
    truth_cols = [c for c in table.columns if str(c).startswith("jacobian_")]
    skip = {"position", "token", *truth_cols}
    bounds = {c: table[c].to_numpy(dtype=float) for c in table.columns if c not in skip}
    tokens = list(table["token"]) if "token" in table.columns else None
    truth = table[truth_cols[0]].to_numpy(dtype=float) if truth_cols else None
    if truth_cols:
        kwargs.setdefault("truth_name", f"Jacobian ({str(truth_cols[0]).removeprefix('jacobian_')})")
        if comparisons is not None:
            kwargs.setdefault("stats", {k: v for k, v in comparisons.items() if k in bounds})
        else:
            kwargs.setdefault("stats", _table_stats(table, truth_cols[0], list(bounds)))
    return bound_vs_jacobian(tokens, truth, bounds, **kwargs)


# --------------------------------------------------------------------------------------------------
# attention heatmaps
# --------------------------------------------------------------------------------------------------

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
        return [[t, c] for t, c in zip(np.linspace(0, 1, 11), sample_colorscale("Viridis", list(np.linspace(0, 1, 11))), strict=True)]
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
        x=[None], y=[None], mode="markers", name="colour scale", showlegend=False, hoverinfo="skip",
        marker={"color": [low], "colorscale": "Viridis", "cmin": low, "cmax": high, "showscale": True,
                "colorbar": {"title": {"text": label, "side": "right"}, "tickvals": tickvals, "ticktext": ticktext,
                             "len": 0.9}},
    )


def _heatmap_steps(patterns: np.ndarray, layer: int | None, head: int | None, max_cells: int):
    """``[(slider label, view name, [(panel name, matrix), …]), …]`` and a note when heads were left out."""
    n_layers, n_heads, n, _ = patterns.shape
    if layer is not None and head is not None:
        name = f"layer {layer}, head {head}"
        return [(str(layer), name, [(name, patterns[layer, head])])], ""
    if head is not None:
        return [(str(l), f"layer {l}, head {head}", [(f"layer {l}, head {head}", patterns[l, head])])
                for l in range(n_layers)], ""
    layers = [layer] if layer is not None else list(range(n_layers))
    overall = layer is None
    with_heads = (len(layers) * (n_heads + 1) + overall) * n * n <= max_cells
    notes = [] if with_heads or n_heads == 1 else ["per-head maps left out for size"]
    if not with_heads and overall:
        kept = _spread(layers, max(1, max_cells // (n * n) - 1))
        if len(kept) < len(layers):
            notes.append(f"{len(kept)} of {len(layers)} layers shown")
        layers = kept
    steps = [("all", "mean of all layers and heads", [("mean of all layers and heads", patterns.mean((0, 1)))])] if overall else []
    for l in layers:
        panels = [(f"layer {l}, mean of heads", patterns[l].mean(0))]
        if with_heads:
            panels += [(f"layer {l}, head {h}", patterns[l, h]) for h in range(n_heads)]
        steps.append((str(l), f"layer {l}" + (", mean of heads and each head" if with_heads else ", mean of heads"), panels))
    note = f" ({'; '.join(notes)}: pass layer=… or a larger max_cells)" if notes else ""
    return steps, note


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
        out.append({"text": _escape(names[p]) if p < len(names) else "", "x": sum(x_domain) / 2, "y": y_domain[1],
                    "xref": "paper", "yref": "paper", "xanchor": "center", "yanchor": "bottom", "showarrow": False,
                    "font": {"size": 11}})
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
    patterns = _array(patterns, "patterns", ndim=4).astype(np.float32)
    n_layers, n_heads, n, _ = patterns.shape
    _checked_index(layer, n_layers, "layer")
    _checked_index(head, n_heads, "head")
    categories = [f"{i}: {label}" for i, label in enumerate(_labels(str_tokens, n))]
    steps, note = _heatmap_steps(patterns, layer, head, max_cells)
    n_panels = max(len(panels) for _, _, panels in steps)
    cols = min(n_panels, 5)
    rows = math.ceil(n_panels / cols)
    fig = make_subplots(rows=rows, cols=cols, horizontal_spacing=0.05, vertical_spacing=0.1 if rows > 1 else 0.0)
    colorscale = _attention_colorscale(color_scale, floor, gamma)
    spans = []
    for s, (_, _, panels) in enumerate(steps):
        start = len(fig.data)
        for p, (name, matrix) in enumerate(panels):
            fig.add_trace(go.Heatmap(
                z=_data(np.where(matrix == 0, np.nan, matrix)), x=categories, y=categories, name=_escape(name),
                visible=s == 0, colorscale=colorscale, zmin=0.0, zmax=1.0, showscale=False, hoverongaps=False,
                hovertemplate=f"{_escape(name)}<br>query %{{y}}<br>key %{{x}}<br>attention %{{z:.3g}}<extra></extra>",
            ), row=p // cols + 1, col=p % cols + 1)
        spans.append((start, len(fig.data)))
    fig.add_trace(_colorbar_trace(color_scale, floor, gamma), row=1, col=1)
    small = n_panels > 1
    max_ticks = 12 if small else MAX_TICKS
    for p in range(n_panels):
        row, col = p // cols + 1, p % cols + 1
        # small multiples share their tokens: tick labels on the outer panels only, titles on all
        fig.update_xaxes(title_text="key" if small else "key position", type="category", row=row, col=col,
                         showticklabels=not small or p + cols >= n_panels,
                         **_ticks(categories, categories, max_ticks))
        fig.update_yaxes(title_text="query" if small else "query position", type="category", autorange="reversed",
                         row=row, col=col, showticklabels=not small or col == 1,
                         **_ticks(categories, categories, max_ticks, axis="y"))
    annotations = [_panel_annotations(fig, [name for name, _ in panels], cols, n_panels) for _, _, panels in steps]
    full_titles = [_escape(title) + " — " + _escape(view) + note for _, view, _ in steps]
    if len(steps) > 1:
        slider_steps = [
            {"label": label, "method": "update",
             "args": [{"visible": [start <= i < end or i == len(fig.data) - 1 for i in range(len(fig.data))]},
                      {"title.text": full_titles[s], "annotations": annotations[s],
                       **_panel_visibility(end - start, n_panels)}]}
            for s, ((label, _, _), (start, end)) in enumerate(zip(steps, spans, strict=True))
        ]
        fig.update_layout(sliders=[{"active": 0, "steps": slider_steps, "currentvalue": {"prefix": "layer: "},
                                    "pad": {"t": 130 if small else 150}, "x": 0.0, "len": 1.0}])
    fig.update_layout(**_panel_visibility(spans[0][1] - spans[0][0], n_panels))
    panel = max(170, min(300, 1000 // cols)) if small else min(900, 300 + 8 * n)
    slider_room = 170 if len(steps) > 1 else 0
    caption = _heatmap_caption(n, steps, color_scale, floor, gamma, note)
    return _layout(fig, title, suffix=" — " + _escape(steps[0][1]) + note, caption=caption, annotations=annotations[0],
                   height=rows * panel + 150 + slider_room, width=cols * panel + 200)


def _heatmap_caption(n: int, steps, color_scale: str, floor: float, gamma: float, note: str) -> str:
    scale = {"log": f"a logarithmic colour scale (values at or below {floor:g} share the darkest colour)",
             "power": f"a power colour scale (colour ∝ attention^{gamma:g}, which spreads small values out)",
             "linear": "a linear colour scale"}[color_scale]
    parts = [f"Attention patterns over the {n} tokens: row = query position (the token that attends, top to "
             "bottom), column = key position (the token attended to); each row sums to 1 over the keys at or before "
             f"the query. Colours use {scale}; blank cells are exactly 0 (the causal mask hides later keys). "
             "Hover a cell for its query, key and attention value. A bright first column is an attention sink."]
    if len(steps) > 1:
        parts.append("The slider below picks the layer ('all' averages every layer and head).")
    if max(len(p) for _, _, p in steps) > 1:
        parts.append("Small multiples show the layer's mean over heads, then each head.")
    if note:
        parts.append(f"To keep the figure small, {note.strip(' ()').split(':')[0]}; pass layer= to see one layer "
                     "and its heads.")
    return " ".join(parts)


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
        x=np.array([k, (k + j) / 2 + bow, j]), y=np.array([l, l + 0.5, l + 1]), mode="lines", hoverinfo="text", text=[text] * 3,
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
        # under the title, above the plot, on the left: it can neither hide the title nor the legend
        fig.update_layout(updatemenus=[{"buttons": buttons, "x": 0.0, "xanchor": "left", "y": 1.01, "yanchor": "bottom",
                                        "pad": {"b": 4}}])
    fig.update_xaxes(title_text="position", range=[-0.5, n - 0.5], **_ticks(labels))
    fig.update_yaxes(
        title_text="layer (residual stream entering it)", range=[-0.3, n_layers + 0.3],
        tickmode="array", tickvals=list(range(n_layers + 1)),
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
    return _layout(fig, title, suffix=f" — {names[0]}", caption=caption, height=max(450, 22 * n_layers + 250),
                   hovermode="closest", legend={"title": {"text": "edge"}},
                   margin={"t": 110 if len(groups) > 1 else 80})


# --------------------------------------------------------------------------------------------------
# spectral analysis
# --------------------------------------------------------------------------------------------------


def _line(x, y, name, i, *, dash=None, row=None, col=None, hover="%{y:.4g}", mode="lines+markers") -> go.Scatter:
    own_dash, symbol = _style(i)
    return go.Scatter(x=x, y=_data(y), mode=mode, name=name, line={"color": _color(i), "dash": dash or own_dash},
                      marker={"symbol": symbol, "size": 6},
                      hovertemplate=f"{name}<br>%{{x}}: {hover}<extra></extra>")


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
    fig = make_subplots(rows=2, cols=2, vertical_spacing=0.17, horizontal_spacing=0.12, subplot_titles=(
        "spectrum of Λ̃⁽ˡ⁾ per layer", "Dobrushin τ(Λ̃⁽ˡ⁾) per layer",
        "last token's mass on the first token", "distance of Π Λ̃ to rank one"))
    if spectrum is not None:
        values = _array(spectrum, "spectrum", ndim=2)
        layers = np.repeat(np.arange(values.shape[0]), values.shape[1])
        fig.add_trace(go.Scatter(x=layers, y=_data(values.ravel()), mode="markers", name="eigenvalues Λ̃_ii",
                                 marker={"size": 4, "opacity": 0.4, "color": _color(0)},
                                 hovertemplate="layer %{x}: eigenvalue %{y:.4g}<extra></extra>"), row=1, col=1)
    if second_eigenvalue is not None:
        second = _array(second_eigenvalue, "second_eigenvalue", ndim=1)
        fig.add_trace(_line(np.arange(len(second)), second, "second eigenvalue", 1), row=1, col=1)
    if dobrushin is not None:
        tau = _array(dobrushin, "dobrushin", ndim=1)
        fig.add_trace(_line(np.arange(len(tau)), tau, "τ per layer", 2), row=1, col=2)
        fig.add_trace(_line(np.arange(len(tau)) + 1, np.cumprod(tau), "Π τ (bound)", 2, dash="dash"), row=2, col=2)
    if first_token_mass is not None:
        mass = _array(first_token_mass, "first_token_mass", ndim=1)
        fig.add_trace(_line(np.arange(len(mass)) + depth_start, mass, "[Π Λ̃]ₙ,₀", 3), row=2, col=1)
    if rank_one_distance is not None:
        dist = _array(rank_one_distance, "rank_one_distance", ndim=1)
        fig.add_trace(_line(np.arange(len(dist)) + depth_start, dist, "distance to rank one", 4), row=2, col=2)
    n_layers = max((len(_array(v)) for v in (second_eigenvalue, dobrushin, first_token_mass, rank_one_distance)
                    if v is not None), default=1)
    fig.update_xaxes(title_text="layer l", row=1, **_integer_axis(n_layers))
    fig.update_xaxes(title_text="depth (layers composed)", row=2, **_integer_axis(n_layers))
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
    return _layout(fig, title, caption=caption, height=800)


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

_COLLAPSE_DISTANCE = "‖yₙ(s) − yₙ₊₁(s*)‖"


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
    y_title: str = _COLLAPSE_DISTANCE,
    title: str = "Representational collapse with length",
) -> go.Figure:
    """Distance against prompt length per dtype (log y), each dtype's resolution dashed.

    Exactly-zero distances cannot sit on a log axis: they are drawn at ``floor`` (default one decade
    below the smallest positive value or resolution) as open ``x`` markers whose hover says so, and
    the line trace holds ``NaN`` there. ``y_title`` may use TeX-style subscripts (:func:`math_text`).
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
            x=x, y=_data(np.where(zero, np.nan, values)), mode="lines+markers", name=_escape(name),
            legendgroup=_escape(name), line={"color": color, "dash": _style(i)[0]},
            marker={"symbol": _style(i)[1], "size": 6},
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
                x=np.array([x.min(), x.max()]), y=np.full(2, float(resolutions[name])), mode="lines", legendgroup=_escape(name),
                name=f"{_escape(name)} resolution", line={"color": color, "dash": "dash", "width": 1.5},
                hovertemplate=f"{_escape(name)} resolution %{{y:.3e}}<extra></extra>",
            ))
    fig.update_xaxes(title_text="prompt length n")
    fig.update_yaxes(title_text=math_text(y_title), type="log")
    caption = (
        f"How far apart the last token's representations of two prompts that differ only by a repeated last token "
        f"are ({_plain(y_title)}, log axis), as the prompt grows (x), one curve per {'series' if len(curves) > 1 else 'run'}"
        " (Theorem 4.2: the distance shrinks with length). "
        + ("A dashed horizontal line is the resolution of that floating-point format: below it the two "
           "representations are as good as identical. " if resolutions else "")
        + ("Open x markers on the bottom line mean the distance is exactly 0 (a log axis cannot show 0): the "
           "representations have collapsed. " if any((v == 0).any() for v in curves.values()) else "")
        + "Hover a point for its value."
    )
    return _layout(fig, title, caption=caption, height=480)


def _plain(text: str) -> str:
    """Axis math for a plain-text caption: the Unicode sub/superscripts where they exist."""
    return html.unescape(re.sub(r"</?su[bp]>", "", math_text(text)))


def head_band_figure(
    lengths: Sequence[int],
    mean: Float[Tensor, "length"],
    minimum: Float[Tensor, "length"],
    maximum: Float[Tensor, "length"],
    *,
    name: str = "last-layer heads",
    log: bool = True,
    y_title: str = "‖yₙ(s) − yₙ₊₁(s*)‖ per head",
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
        go.Scatter(x=x, y=_data(maximum), mode="lines", line={"width": 0}, name=f"{label} max", showlegend=False,
                   legendgroup=label, hovertemplate="max %{y:.3e}<extra></extra>"),
        go.Scatter(x=x, y=_data(minimum), mode="lines", line={"width": 0}, fill="tonexty", name=f"{label} min–max",
                   fillcolor="rgba(99,110,250,0.25)", legendgroup=label, hovertemplate="min %{y:.3e}<extra></extra>"),
        go.Scatter(x=x, y=_data(mean), mode="lines+markers", name=f"{label} mean", line={"color": _color(0)},
                   legendgroup=label, hovertemplate="length %{x}<br>mean %{y:.3e}<extra></extra>"),
    ])
    fig.update_xaxes(title_text="prompt length n")
    fig.update_yaxes(title_text=math_text(y_title), type="log" if log else "linear")
    caption = (f"The representational-collapse distance measured at each attention head of the last layer ({name}) "
               "against prompt length (cf. the paper's Figure 5): the line is the mean over heads, the shaded band "
               "spans the smallest to the largest head. A narrow band means every head collapses alike.")
    return _layout(fig, title, caption=caption, height=450, hovermode="x unified")


def pe_figure(
    lengths: Sequence[int],
    curves: Mapping[str, tuple[Float[Tensor, "length"], Float[Tensor, "length"]]],
    *,
    log: bool = True,
    y_title: str = _COLLAPSE_DISTANCE,
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
        fig.add_trace(go.Scatter(x=x, y=_data(upper), mode="lines", line={"width": 0}, showlegend=False,
                                 legendgroup=label, name=f"{label} +std", hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=x, y=_data(lower), mode="lines", line={"width": 0}, fill="tonexty",
                                 fillcolor=_rgba(color, 0.2), showlegend=False, legendgroup=label,
                                 name=f"{label} −std", hoverinfo="skip"))
        dash, symbol = _style(i)
        fig.add_trace(go.Scatter(x=x, y=_data(mean), mode="lines+markers", name=label, legendgroup=label,
                                 line={"color": color, "dash": dash}, marker={"symbol": symbol, "size": 6},
                                 customdata=_data(std),
                                 hovertemplate=f"{label}<br>length %{{x}}<br>%{{y:.3e}} ± %{{customdata:.1e}}<extra></extra>"))
    fig.update_xaxes(title_text="prompt length n")
    fig.update_yaxes(title_text=math_text(y_title), type="log" if log else "linear")
    caption = ("Representational collapse in small untrained decoders that differ only in their positional encoding "
               "(cf. the paper's Figure 7): each line is the mean distance over the seeded models, the band ±1 "
               "standard deviation. A curve that falls faster with length collapses sooner.")
    return _layout(fig, title, caption=caption, height=450)


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
        fig.add_trace(go.Scatter(x=x, y=_data(tv[i]), mode="lines+markers", name=f"seed {seed}",
                                 line={"color": _color(i)}, marker={"symbol": _style(i)[1], "size": 5},
                                 legendgroup=f"seed {seed}", hovertemplate="m %{x}<br>TV %{y:.3e}<extra></extra>"))
        if bounds is not None and (per_seed or i == 0):
            name = f"bound, seed {seed}" if per_seed else "bound"
            fig.add_trace(go.Scatter(x=x, y=_data(bounds[i] if per_seed else bounds), mode="lines", name=name,
                                     legendgroup=f"seed {seed}", line={"color": _color(i), "dash": "dash"},
                                     hovertemplate="m %{x}<br>bound %{y:.3e}<extra></extra>"))
    fig.update_xaxes(title_text="prefix length m", type="log")
    fig.update_yaxes(title_text="total variation", type="log")
    caption = ("Total-variation distance between the softmax of a score vector and of the same vector with one entry "
               "changed, over the first m entries (log–log; Lemma B.2, cf. the paper's Figure 9): one solid curve per "
               "seed, the lemma's bound dashed. The distance decays as the prefix grows, and stays under its bound.")
    return _layout(fig, title, caption=caption, height=450)


def tv_decay_figure(result: Any, **kwargs) -> go.Figure:
    """:func:`tv_figure` for a ``softmax_theory.TVDecayResult``."""
    return tv_figure(result.lengths, result.tv, result.bound, seeds=result.seeds, **kwargs)


# --------------------------------------------------------------------------------------------------
# sinks and phases
# --------------------------------------------------------------------------------------------------

_PHASES = (("Mix", "rgba(99,110,250,0.10)"), ("Compress", "rgba(239,85,59,0.12)"), ("Refine", "rgba(0,204,150,0.10)"))

#: per-layer curve name -> (y-axis title, what it measures): the curves of ``sinks.SinkReport``
SINK_CURVES: dict[str, tuple[str, str]] = {
    "first_token_mass": ("mass on token 0", "mean attention that queries 1…n−1 put on the first token"),
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
) -> go.Figure:
    """One panel per per-layer curve, sharing the layer axis; Mix–Compress–Refine shaded.

    ``phases = (mix_end, compress_end)`` as returned by ``sinks.detect_phases``: layers
    ``[0, mix_end)`` mix, ``[mix_end, compress_end)`` compress, the rest refine. Curves named in
    ``log`` get a log y axis (norm ratios span orders of magnitude). Curves named as in
    :data:`SINK_CURVES` get its axis titles and descriptions; others are titled by their name.
    """
    curves = {str(k): _array(v, f"curves[{k}]", ndim=1) for k, v in curves.items() if v is not None}
    if not curves:
        raise ValueError("pass at least one per-layer curve")
    n_layers = max(len(v) for v in curves.values())
    height = max(460, 270 * len(curves))
    fig = make_subplots(rows=len(curves), cols=1, shared_xaxes=True, vertical_spacing=110 / height,
                        subplot_titles=[_escape(SINK_CURVES.get(k, (k, k))[1]) for k in curves])
    for i, (name, values) in enumerate(curves.items()):
        fig.add_trace(go.Scatter(x=np.arange(len(values)), y=_data(values), mode="lines+markers", name=_escape(name),
                                 line={"color": _color(i)}, marker={"symbol": _style(i)[1], "size": 6}, showlegend=False,
                                 hovertemplate=f"{_escape(name)}<br>layer %{{x}}: %{{y:.4g}}<extra></extra>"),
                      row=i + 1, col=1)
        fig.update_yaxes(title_text=_escape(SINK_CURVES.get(name, (name, ""))[0]), type="log" if name in log else "linear",
                         row=i + 1, col=1)
        fig.update_xaxes(title_text="layer", showticklabels=True, row=i + 1, col=1, **_integer_axis(n_layers))
    if phases is not None:
        bounds = (0, *phases, n_layers)
        for (label, color), start, end in zip(_PHASES, bounds[:-1], bounds[1:], strict=True):
            if end > start:
                fig.add_vrect(x0=start - 0.5, x1=end - 0.5, fillcolor=color, line_width=0, layer="below",
                              row="all", col=1)
                fig.add_annotation(x=(start + end - 1) / 2, y=1.0, yref="paper", yanchor="bottom", yshift=22,
                                   text=f"<i>{label}</i>", showarrow=False, font={"size": 12, "color": "#555"})
    caption = (
        "Per-layer profiles of one forward pass, one panel each (x: layer index; curves computed from residual "
        "streams are indexed by the stream entering that layer): "
        + "; ".join(f"{name}: {SINK_CURVES.get(name, (name, 'as named'))[1]}" for name in curves) + "."
        + (" Shading marks the Mix, Compress and Refine phases of depth (Queipo-de-Llano et al.): the Compress "
           "phase is the valley of the matrix entropy." if phases is not None else "")
        + (f" Log axes: {', '.join(n for n in curves if n in log)}." if any(n in log for n in curves) else "")
    )
    return _layout(fig, title, caption=caption, height=height, margin={"t": 110})


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


def _per_length_figure(frame: pd.DataFrame, column: str, y_title: str, title: str, caption: str,
                       y_range=None) -> go.Figure:
    fig = go.Figure()
    for i, (series, group) in enumerate(frame.groupby("series", sort=True)):
        stats = group.groupby("length")[column].agg(["mean", "count"]).reset_index()
        dash, symbol = _style(i)
        fig.add_trace(go.Scatter(
            x=stats["length"].to_numpy(), y=_data(stats["mean"].to_numpy(dtype=float)),
            customdata=stats["count"].to_numpy(), mode="lines+markers", name=_escape(series),
            line={"color": _color(i), "dash": dash}, marker={"symbol": symbol, "size": 7},
            hovertemplate=f"{_escape(series)}<br>length %{{x}}<br>{y_title} %{{y:.3g}} (n = %{{customdata}})<extra></extra>",
        ))
    fig.update_xaxes(title_text="sequence length")
    fig.update_yaxes(title_text=y_title, range=y_range)
    return _layout(fig, title, caption=caption, height=450)


def accuracy_figure(results: Any, *, title: str = "Accuracy against sequence length") -> go.Figure:
    """Figure 2: the fraction of correct answers per task (and mode) and length."""
    frame = _task_frame(results)
    frame["correct"] = frame["correct"].astype(float)
    caption = ("The fraction of the model's answers that are exactly right (y) at each sequence length (x), one line "
               "per task (cf. the paper's Figure 2); hover a point for the number of samples behind it.")
    return _per_length_figure(frame, "correct", "accuracy", title, caption, y_range=[-0.03, 1.03])


def abs_error_figure(results: Any, *, title: str = "Mean absolute error against sequence length") -> go.Figure:
    """Figure 3: the mean absolute error of parsed answers (unparsable answers left out)."""
    frame = _task_frame(results)
    frame["abs_error"] = pd.to_numeric(frame["abs_error"], errors="coerce").astype(float)
    caption = ("The mean absolute difference between the model's parsed answer and the true one (y) at each sequence "
               "length (x), one line per task (cf. the paper's Figure 3); answers that could not be parsed as a number "
               "are left out, and the hover gives how many samples remain.")
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
    caption = ("How often the model gave each answer (x: the parsed answer, y: the number of samples), one panel per "
               "task and one bar colour per sequence length (cf. the paper's Figure 4); a triangle on the axis marks "
               "the true answer of that length. The legend counts the answers that could not be parsed.")
    return _layout(fig, title, caption=caption, barmode="group", height=height)
