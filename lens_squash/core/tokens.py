"""Tokens as safe display text: every token a model produces is untrusted input for HTML.

Plotly renders a subset of HTML inside labels and hover text, and the report and ``_repr_html_``
write tokens into HTML, so every token goes through :func:`token_label` (``repr``-style, spaces
shown as ``␣``, then ``html.escape``): a token ``<b>`` shows literally as ``<b>`` and a token
``<script>`` cannot inject.
"""

from __future__ import annotations

import html
from typing import Any

__all__ = ["token_label"]


def token_label(token: Any, *, max_len: int | None = 40) -> str:
    """A token as safe display text: ``repr`` without quotes, spaces as ``␣``, then HTML-escaped."""
    shown = repr(str(token))[1:-1].replace(" ", "␣")
    if max_len is not None and len(shown) > max_len:
        shown = shown[: max_len - 1] + "…"
    return html.escape(shown, quote=False)
