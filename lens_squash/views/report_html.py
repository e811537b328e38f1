"""HTML pieces of a report: one figure (compact, captioned, checked), a table, paragraphs, plotly.js.

Everything a user or a model wrote reaches the page escaped, with bidi and other invisible controls
shown as ``⟨U+XXXX⟩`` (:mod:`lens_squash.core.tokens`), inside figure JSON too.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import plotly.offline

from ..core.display import missing_as_nan
from ..core.records import to_jsonable
from ..core.tokens import BIDI_DISPLAY, escape_text, neutralize_controls
from .compact import compact_figure
from .style import HOVER_DIGITS, caption_of

__all__ = ["plotly_js", "render_figure", "render_table", "render_text"]

_FIGURE_CONFIG = {"displaylogo": False, "responsive": True}


@functools.lru_cache(maxsize=1)
def plotly_js() -> str:
    source = plotly.offline.get_plotlyjs()
    if "</script" in source.lower():  # would end the inline <script> early; never seen in plotly.js
        raise RuntimeError("this plotly.js build contains '</script' and cannot be inlined safely")
    return source


def _check_fragment(fragment: str) -> str:
    """A figure fragment must hold exactly one script element and nothing that could end it early."""
    lower = fragment.lower()
    if lower.count("<script") != 1 or lower.count("</script") != 1 or "<!--" in lower:
        raise ValueError(
            "a figure's HTML contains '<script', '</script' or '<!--' inside its data; refusing to embed "
            "it (plotly should escape '<' in its JSON — is this plotly version supported?)"
        )
    return fragment


# a JSON \\uXXXX escape of a bidi control, not preceded by an odd number of backslashes (which would
# make it the literal text "\\u202e" typed by a user)
_JSON_BIDI_RE = re.compile(r"(?<!\\)((?:\\\\)*)\\u(202[a-eA-E]|206[6-9]|200[eEfF]|061[cC])")


def _neutralize_fragment(fragment: str) -> str:
    """Bidi controls inside a figure's JSON (plotly writes them as ``\\u202e`` escapes) shown as
    ``⟨U+202E⟩``, so figure titles and legends cannot reorder either."""
    fragment = _JSON_BIDI_RE.sub(lambda m: f"{m.group(1)}⟨U+{m.group(2).upper()}⟩", fragment)
    return "".join(f"⟨U+{ord(c):04X}⟩" if c in BIDI_DISPLAY else c for c in fragment)


def render_figure(fig: go.Figure, index: int) -> str:
    if not isinstance(fig, go.Figure):
        raise TypeError(f"sections hold plotly Figures, got {type(fig).__name__}")
    # numbers rounded to the digits the hovers show, as typed arrays (float32 where the values fit)
    fragment = compact_figure(fig, digits=HOVER_DIGITS).to_html(
        full_html=False,
        include_plotlyjs=False,
        div_id=f"lens-squash-figure-{index}",
        config=_FIGURE_CONFIG,
    )
    caption = caption_of(fig)
    below = f'<p class="caption">{escape_text(caption)}</p>' if caption else ""
    return f'<div class="figure">{_neutralize_fragment(_check_fragment(fragment))}{below}</div>'


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return escape_text(f"{value:.6g}")
    if isinstance(value, (Mapping, list, tuple)):
        return f"<code>{escape_text(json.dumps(to_jsonable(value), ensure_ascii=False))}</code>"
    return escape_text(str(value))


_HEADER = re.compile(r"(<th[^>]*>)([^<]*)(</th>)")


def render_table(table: pd.DataFrame | Mapping[str, Any] | None) -> str:
    if table is None:
        return ""
    if isinstance(table, pd.DataFrame):
        # a named index labels the rows (a summary's dtype or encoding): a column, since index=False
        if any(name is not None for name in table.index.names):
            table = table.reset_index()
        # escape=True escapes cells and headers; controls are made visible first; the formatter keeps floats short
        table = (
            missing_as_nan(table)
            .rename(columns=neutralize_controls)
            .map(lambda v: neutralize_controls(v) if isinstance(v, str) else v)
        )
        page = table.to_html(
            escape=True,
            index=False,
            border=0,
            classes="data",
            float_format=lambda v: f"{v:.4g}",
            max_rows=200,
            na_rep="-",
        )
        # long snake_case headers (same_nontrivial_prediction) may wrap after an underscore, so a
        # dozen columns fit the page instead of scrolling sideways
        return _HEADER.sub(lambda m: m.group(1) + m.group(2).replace("_", "_<wbr>") + m.group(3), page)
    rows = "".join(f"<tr><th>{escape_text(str(k))}</th><td>{_cell(v)}</td></tr>" for k, v in table.items())
    return f'<table class="data kv">{rows}</table>'


def render_text(text: str) -> str:
    paragraphs = [p for p in re.split(r"\n\s*\n", str(text)) if p.strip()]
    return "".join(f'<p class="text">{escape_text(p)}</p>' for p in paragraphs)
