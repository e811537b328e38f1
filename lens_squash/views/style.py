"""The look every lens_squash figure shares: palettes, line styles, tick and axis settings, captions.

**Figures that explain themselves.** Every builder titles every axis, writes ticks in one scientific
style (``10⁻³``, never SI suffixes such as ``10B`` or ``100p`` beside ``10⁶⁰``), draws curves with
distinct dash styles and markers so that coinciding curves stay visible, and stores a plain-language
caption (what the figure shows and how to read it) in ``fig.layout.meta["caption"]``: read it with
:func:`caption_of`, set it with :func:`with_caption`. Captions are plain text (escape them before
putting them into HTML).

**Token text is untrusted.** Every token goes through :func:`lens_squash.core.tokens.token_label`;
names and titles through :func:`escape_label`. Positions are numeric (or unique ``"i: token"``
categories) so repeated tokens never merge.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.colors import qualitative
from torch import Tensor

from ..core.tokens import token_label

__all__ = [
    "AXIS_FORMAT",
    "HEAD_PALETTE",
    "HOVER_DIGITS",
    "MAX_TICKS",
    "PALETTE",
    "RESIDUAL_GREY",
    "TEMPLATE",
    "as_array",
    "caption_of",
    "escape_label",
    "finish_layout",
    "integer_axis",
    "line_style",
    "log_axis",
    "math_text",
    "palette_color",
    "position_labels",
    "token_ticks",
    "trace_data",
    "with_caption",
]

#: above this many positions, axes label every k-th token only (hover still shows every token)
MAX_TICKS: int = 100
PALETTE = qualitative.Plotly
HEAD_PALETTE = qualitative.Dark24
_DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")
_SYMBOLS = ("circle", "square", "diamond", "triangle-up", "x", "cross", "triangle-down", "star", "pentagon", "hexagon")
RESIDUAL_GREY = "rgba(120,120,120,0.85)"
TEMPLATE = "plotly_white"
HOVER_DIGITS = 4  # significant digits every hover shows (``%{y:.4g}``), so the data is rounded to them


def escape_label(text: Any) -> str:
    """User text (names, titles) for plotly's pseudo-HTML labels."""
    return html.escape(str(text), quote=False)


_SUBSCRIPTS = dict(zip("0123456789+-=()aehijklmnoprstuvx", "₀₁₂₃₄₅₆₇₈₉₊₋₌₍₎ₐₑₕᵢⱼₖₗₘₙₒₚᵣₛₜᵤᵥₓ", strict=True))
_SUPERSCRIPTS = dict(zip("0123456789+-=()in", "⁰¹²³⁴⁵⁶⁷⁸⁹⁺⁻⁼⁽⁾ⁱⁿ", strict=True))
_SCRIPT = re.compile(r"([_^])(?:\{([^{}]*)\}|([A-Za-z0-9]))")


def math_text(text: Any) -> str:
    """TeX-style sub- and superscripts (``y_{n+1}``, ``x_i``, ``10^{-3}``) as display text, HTML-escaped.

    Unicode sub/superscript characters where every character has one (``yₙ₊₁``: they survive SVG and
    PDF export and copy-paste), plotly's ``<sub>``/``<sup>`` otherwise (``‖J‖<sub>F</sub>``). Meant
    for axis titles written as math; names such as ``rollout_mass`` should not go through it.
    """

    def script(match: re.Match) -> str:
        body = match.group(2) if match.group(2) is not None else match.group(3)
        table, tag = (_SUBSCRIPTS, "sub") if match.group(1) == "_" else (_SUPERSCRIPTS, "sup")
        if body and all(ch in table for ch in body):
            return "".join(table[ch] for ch in body)
        return f"<{tag}>{body}</{tag}>"

    return _SCRIPT.sub(script, escape_label(text))


def with_caption(fig: go.Figure, caption: str) -> go.Figure:
    """Store a plain-language caption (what the figure shows, how to read it) on ``fig``; returns ``fig``.

    The caption is plain text. It is stored HTML-escaped in ``fig.layout.meta["caption"]``, like every
    other user string in a figure (it may quote token or variant names); :func:`caption_of` gives the
    plain text back.
    """
    if not isinstance(fig, go.Figure):
        raise TypeError(f"with_caption takes a plotly go.Figure, got {type(fig).__name__}")
    meta = dict(fig.layout.meta) if isinstance(fig.layout.meta, dict) else {}
    meta["caption"] = escape_label(" ".join(str(caption).split()))
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


def as_array(values: Any, name: str = "values", ndim: int | None = None) -> np.ndarray:
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


def trace_data(values: Any) -> np.ndarray:
    """Trace data as a numpy array at the precision it came in (float32 or float64): plotly writes it
    as a base64 typed array, about half the bytes of a decimal list for float32, and every digit
    stays. (Decimal rounding would not shrink a typed array: a float32 is four bytes either way.)"""
    return as_array(values)


def position_labels(str_tokens: Sequence[str] | None, n: int) -> list[str]:
    if str_tokens is None:
        return [str(i) for i in range(n)]
    if len(str_tokens) != n:
        raise ValueError(f"got {len(str_tokens)} tokens for {n} positions")
    return [token_label(t) for t in str_tokens]


def token_ticks(
    labels: Sequence[str], values: Sequence | None = None, max_ticks: int = MAX_TICKS, *, axis: str = "x"
) -> dict:
    """Axis settings that label every token (smaller, and turned upright on an x axis, when there
    are many), or every k-th one beyond ``max_ticks`` (the hover of every trace names every token)."""
    values = list(range(len(labels))) if values is None else list(values)
    step = max(1, math.ceil(len(labels) / max_ticks))
    shown = list(labels[::step])
    size = 11 if len(shown) <= 40 else 9 if len(shown) <= 70 else 8
    crowded = len(shown) > 12 or sum(len(label) for label in shown) > 60
    return {
        "tickmode": "array",
        "tickvals": values[::step],
        "ticktext": shown,
        "tickfont": {"size": size},
        "tickangle": -90 if axis == "x" and crowded else 0,
    }


def log_axis(*curves: np.ndarray) -> dict:
    """A log axis that labels whole decades only when the data spans a few of them (no "2" and "5"
    between decades); across many decades plotly's own choice of decades stays."""
    values = np.concatenate([np.ravel(c) for c in curves]) if curves else np.array([])
    values = values[np.isfinite(values) & (values > 0)]
    if values.size and 1.5 <= math.log10(values.max() / values.min()) <= 12:
        return {"type": "log", "dtick": 1}
    return {"type": "log"}


def integer_axis(n: int) -> dict:
    """Ticks on whole layer or depth indices (a layer 0.5 does not exist)."""
    return {"tick0": 0, "dtick": max(1, math.ceil(n / 30))}


def palette_color(i: int, palette: Sequence[str] = PALETTE) -> str:
    return palette[i % len(palette)]


def line_style(i: int) -> tuple[str, str]:
    """The ``i``-th (dash, marker symbol) pair: curves that coincide still look different."""
    return _DASHES[i % len(_DASHES)], _SYMBOLS[i % len(_SYMBOLS)]


AXIS_FORMAT = {"exponentformat": "power", "showexponent": "all"}


def finish_layout(fig: go.Figure, title: str, *, suffix: str = "", caption: str | None = None, **kwargs) -> go.Figure:
    """Title (user text, escaped) plus an already-escaped ``suffix``; the shared template, one
    scientific tick style on every axis, and the caption."""
    fig.update_layout(title={"text": escape_label(title) + suffix}, template=TEMPLATE, **kwargs)
    fig.update_xaxes(**AXIS_FORMAT)
    fig.update_yaxes(**AXIS_FORMAT)
    if caption is not None:
        with_caption(fig, caption)
    return fig
