"""Tokens as safe display text: every token a model produces is untrusted input for HTML.

Plotly renders a subset of HTML inside labels and hover text, and the report and ``_repr_html_``
write tokens into HTML, so every token goes through :func:`token_label` (``repr``-style, spaces
shown as ``␣``, then ``html.escape``): a token ``<b>`` shows literally as ``<b>`` and a token
``<script>`` cannot inject. Free text (a prompt, a title) goes through :func:`escape_text`, which
first shows bidirectional and other control characters as a visible ``⟨U+202E⟩``, so text can
never *display* in another order than the model read it ("Trojan Source").

:func:`sensitivity_html` colours each token by a per-position value (a Jacobian norm, a bound),
inseq-style, with a colour-scale legend; the report's prompt box and the ``_repr_html_`` of
``SensitivityFlow`` and ``Analysis`` use it.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Sequence
from typing import Any

__all__ = [
    "BIDI_DISPLAY",
    "DISPLAY_CONTROLS",
    "SENSITIVITY_SCALES",
    "escape_text",
    "neutralize_controls",
    "sensitivity_colour",
    "sensitivity_html",
    "token_label",
]

#: bidirectional formatting characters: they reorder how the text around them is displayed
BIDI_DISPLAY: frozenset[str] = frozenset(
    chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F, 0x061C)
)
#: characters that must never reach a reader as themselves: the bidi controls, and the C0/C1 controls
#: other than tab, newline and carriage return
DISPLAY_CONTROLS: frozenset[str] = BIDI_DISPLAY | frozenset(
    chr(c) for c in (*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0)) if chr(c) not in "\t\n\r"
)
_CONTROL_RE = re.compile("[" + "".join(re.escape(c) for c in sorted(DISPLAY_CONTROLS)) + "]")


def neutralize_controls(text: Any) -> str:
    """``text`` with every :data:`DISPLAY_CONTROLS` character shown as a visible ``⟨U+XXXX⟩``."""
    return _CONTROL_RE.sub(lambda m: f"⟨U+{ord(m.group()):04X}⟩", str(text))


def escape_text(text: Any) -> str:
    """User text for HTML: controls made visible (:func:`neutralize_controls`), then ``html.escape``."""
    return html.escape(neutralize_controls(text))


def token_label(token: Any, *, max_len: int | None = 40) -> str:
    """A token as safe display text: ``repr`` without quotes, spaces as ``␣``, then HTML-escaped.

    ``repr`` already writes controls (bidi ones included) as ``\\u202e``-style escapes; the controls
    are neutralised once more so that no code path can let one through.
    """
    shown = neutralize_controls(repr(str(token))[1:-1].replace(" ", "␣"))
    if max_len is not None and len(shown) > max_len:
        shown = shown[: max_len - 1] + "…"
    return html.escape(shown, quote=False)


# --------------------------------------------------------------------------------------------------
# tokens coloured by sensitivity
# --------------------------------------------------------------------------------------------------

#: how a value maps to a colour position in [0, 1]: value ÷ max, or its log over ``decades`` decades
SENSITIVITY_SCALES: tuple[str, ...] = ("linear", "log")
# white to deep red, sequential (a sensitivity is never negative): (position, (r, g, b))
_STOPS = (
    (0.0, (255, 255, 255)),
    (0.25, (254, 224, 144)),
    (0.5, (253, 174, 97)),
    (0.75, (244, 109, 67)),
    (1.0, (165, 0, 38)),
)
_MISSING = "#dddddd"


def sensitivity_colour(position: float) -> str:
    """The colour at ``position ∈ [0, 1]`` of the white-to-red scale, as ``#rrggbb``; grey when not finite."""
    if not math.isfinite(position):
        return _MISSING
    position = min(1.0, max(0.0, position))
    for (p0, c0), (p1, c1) in zip(_STOPS, _STOPS[1:], strict=False):
        if position <= p1:
            t = (position - p0) / (p1 - p0)
            return "#" + "".join(f"{round(a + t * (b - a)):02x}" for a, b in zip(c0, c1, strict=True))
    return "#" + "".join(f"{c:02x}" for c in _STOPS[-1][1])


def _positions(values: list[float], scale: str, decades: float) -> list[float]:
    """Each value's place on the colour scale: ÷ the largest finite value, or its log relative to it."""
    finite = [v for v in values if math.isfinite(v)]
    top = max(finite, default=0.0)
    if top <= 0:
        return [0.0 if math.isfinite(v) else math.nan for v in values]
    if scale == "linear":
        return [v / top if math.isfinite(v) else math.nan for v in values]
    return [1.0 + math.log10(max(v / top, 10.0**-decades)) / decades if math.isfinite(v) else math.nan for v in values]


def _legend(label: str, top: float, scale: str, decades: float) -> str:
    gradient = ", ".join(f"{sensitivity_colour(p)} {p:.0%}" for p in (0.0, 0.25, 0.5, 0.75, 1.0))
    low = "0" if scale == "linear" else f"≤ {top * 10.0**-decades:.2g}"
    return (
        f'<div style="font-size:.85em;color:#555;margin-top:4px">{escape_text(label)}: {low} '
        f'<span style="display:inline-block;width:140px;height:.8em;vertical-align:middle;'
        f'border:1px solid #ccc;background:linear-gradient(to right, {gradient})"></span> '
        f"{top:.3g} ({'log' if scale == 'log' else 'linear'} scale; hover a token for its value)</div>"
    )


def sensitivity_html(
    str_tokens: Sequence[str],
    values: Sequence[float],
    *,
    label: str = "sensitivity",
    scale: str = "linear",
    decades: float = 3.0,
) -> str:
    """The tokens as chips coloured by ``values`` (one per token), white (0) to red (the largest), inseq-style.

    Each chip is the escaped token (:func:`token_label`), its position as a subscript, and a hover
    title ``position i · label: value``; each chip is a ``<bdi>`` (a bidi isolate), so no token can
    reorder its neighbours. ``scale="log"`` colours ``log10(value / max)`` over ``decades``
    decades (smaller values share the lightest colour). A legend under the chips gives the scale.
    Styles are inline, so the fragment renders the same in a notebook and in the report.
    """
    if scale not in SENSITIVITY_SCALES:
        raise ValueError(f"scale must be one of {SENSITIVITY_SCALES}, got {scale!r}")
    if not (isinstance(decades, (int, float)) and decades > 0):
        raise ValueError(f"decades must be a positive number (how many decades the log scale spans), got {decades!r}")
    tokens, numbers = list(str_tokens), [float(v) for v in values]
    if len(tokens) != len(numbers):
        raise ValueError(f"got {len(numbers)} values for {len(tokens)} tokens: pass one value per token")
    positions = _positions(numbers, scale, decades)
    name = escape_text(label)
    chips = []
    for i, (token, value, position) in enumerate(zip(tokens, numbers, positions, strict=True)):
        colour = sensitivity_colour(position)
        ink = "#fff" if math.isfinite(position) and position > 0.8 else "#222"
        shown = f"{value:.3g}" if math.isfinite(value) else "n/a"
        # <bdi> isolates each token's direction; the font and white-space are inherited from the row
        chips.append(
            f'<bdi title="position {i} · {name}: {shown}" style="background:{colour};color:{ink};'
            f'border-radius:3px;padding:1px 4px"><sub>{i}</sub>{token_label(token, max_len=None)}</bdi>'
        )
    top = max((v for v in numbers if math.isfinite(v)), default=0.0)
    return (
        f'<div class="lens-squash-tokens" dir="ltr"><div style="display:flex;flex-wrap:wrap;gap:3px;'
        f'font-size:.85em;white-space:pre;font-family:ui-monospace,monospace">{"".join(chips)}</div>'
        f"{_legend(label, top, scale, decades)}</div>"
    )
