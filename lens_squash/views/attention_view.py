"""Every head of a layer at a glance, CircuitsVis style, offline: a small self-contained HTML/JS view.

:func:`attention_view` returns an :class:`AttentionView` (it renders itself in Jupyter through
``_repr_html_``; :meth:`AttentionView.write` saves a page; the report embeds it) showing

* a grid of thumbnails, one per head of the layer a slider picks (queries are rows, keys columns);
* one enlarged head: click a thumbnail to enlarge it;
* the prompt as token chips: hover a chip to outline its row (what it attends to) and its column
  (what attends to it) in the enlarged head, and to colour the chips by those two attentions; at
  rest the chips are coloured by any per-position profile given (the truth, or any variant).

No CDN and no library: the patterns travel as one byte per weight (``round(255·√a)``, so small
weights stay visible; fewer steps under a byte budget), the lower triangle only when the patterns are causal (every decoder's), deflated
(zlib) and base64 in the page; the browser inflates them with its own ``DecompressionStream``
(Chromium 80+, Firefox 113+, Safari 16.4+; an older browser shows a line saying so instead of
the view) and draws them on ``<canvas>``. Mostly-zero attention deflates well: SmolLM2's 30 × 9
heads on an 89-token prompt drop from 2.9 MB of base64 to a few hundred kB. Token text reaches the page only
through ``textContent``, after :func:`lens_squash.core.tokens.token_label` neutralised its controls.
The view's state is mirrored in ``data-layer`` / ``data-head`` / ``data-hover`` attributes on its
root element (the browser tests read them).
"""

from __future__ import annotations

import base64
import html
import json
import uuid
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.records import write_text_atomic
from ..core.tokens import token_label
from .style import as_array

__all__ = ["LEVELS", "MAX_WEIGHTS", "AttentionView", "attention_view"]

#: attention weights a view carries at most (one byte each); beyond it, evenly spread layers are kept
MAX_WEIGHTS = 3_000_000
#: the steps of √a a view may quantise to, finest first: a byte budget takes the finest that fits
LEVELS = (255, 127, 63, 31, 15)


@dataclass(frozen=True)
class AttentionView:
    """The view's HTML fragment (a ``<div>`` with its own ``<style>`` and ``<script>``)."""

    html: str
    layers: tuple[int, ...]
    n_heads: int

    def _repr_html_(self) -> str:
        return self.html

    def __repr__(self) -> str:  # one line: the page itself is megabytes
        return f"AttentionView({len(self.layers)} layers × {self.n_heads} heads, {len(self.html) / 1e6:.1f} MB of HTML)"

    def write(self, path: str | Path) -> Path:
        """A standalone page holding the view (atomic write); returns the path."""
        page = f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>attention</title></head><body>{self.html}</body></html>'
        return write_text_atomic(Path(path), page)


def _kept_layers(n_layers: int, per_layer: int, max_weights: int) -> list[int]:
    fit = max(1, max_weights // max(per_layer, 1))
    if fit >= n_layers:
        return list(range(n_layers))
    return sorted({round(i * (n_layers - 1) / max(fit - 1, 1)) for i in range(fit)})


def _packed(roots: np.ndarray, *, causal: bool, max_bytes: int | None) -> tuple[str | None, int]:
    """√a (``roots``, in [0, 1]) as base64 of deflated bytes in the finest :data:`LEVELS` that fit
    ``max_bytes``; ``(None, 0)`` when none fits."""
    rows, keys = np.tril_indices(roots.shape[-1])
    for levels in LEVELS:
        quantised = np.rint(levels * roots).astype(np.uint8)
        kept = quantised[:, :, rows, keys] if causal else quantised
        text = base64.b64encode(zlib.compress(kept.tobytes(), 9)).decode("ascii")
        if max_bytes is None or len(text) <= max_bytes:
            return text, levels
    return None, 0


def _script_json(value: Any) -> str:
    """JSON safe inside a ``<script>``: no ``<``, ``>`` or ``&`` survives to end the element."""
    text = json.dumps(value, ensure_ascii=True, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def attention_view(
    patterns: Any,
    str_tokens: Sequence[str],
    colourings: Mapping[str, Any] | None = None,
    *,
    max_weights: int = MAX_WEIGHTS,
    max_bytes: int | None = None,
    title: str = "Attention per head",
) -> AttentionView:
    """The view (module docstring) of ``patterns`` ``[layer, head, query_pos, key_pos]``.
    ``colourings`` maps a name (``"Jacobian"``, a variant) to one value per position.

    ``max_bytes`` caps the weights' base64: the finest of :data:`LEVELS` steps of √a that fits is
    taken (the view's note says when fewer than 255), and when even the coarsest does not fit, fewer
    evenly spread layers (the note says how many were left out)."""
    weights = as_array(patterns, "patterns", ndim=4)
    n_layers, n_heads, n, n_keys = weights.shape
    if n != n_keys or n != len(str_tokens):
        raise ValueError(f"patterns must be [layer, head, {len(str_tokens)}, {len(str_tokens)}], got {weights.shape}")
    if not np.isfinite(weights).all() or (weights < 0).any():
        raise ValueError("attention patterns must be finite and non-negative")
    layers = _kept_layers(n_layers, n_heads * n * n, max_weights)
    # causal patterns (every decoder's) travel as their lower triangle, row-major: query q's keys 0..q
    # start at q(q+1)/2; anything else (weight above the diagonal) travels whole
    causal = not np.triu(weights, 1).any()
    packed, levels = _packed(np.sqrt(np.clip(weights[layers], 0, 1)), causal=causal, max_bytes=max_bytes)
    while packed is None:  # not even the coarsest steps fit: keep fewer layers
        layers = _kept_layers(n_layers, n_heads * n * n, max(1, len(layers) // 2) * n_heads * n * n)
        packed, levels = _packed(
            np.sqrt(np.clip(weights[layers], 0, 1)), causal=causal, max_bytes=None if len(layers) == 1 else max_bytes
        )
    profiles = {}
    for name, values in (colourings or {}).items():
        values = as_array(values, name, ndim=1)
        if len(values) != n:
            raise ValueError(f"colouring {name!r} has {len(values)} values for {n} tokens")
        top = float(np.nanmax(values)) if np.isfinite(values).any() else 0.0
        profiles[str(name)] = [float(v / top) if top > 0 and np.isfinite(v) else 0.0 for v in values]
    data = {
        "layers": layers,
        "heads": n_heads,
        "n": n,
        "tokens": [html.unescape(token_label(t, max_len=24)) for t in str_tokens],
        "profiles": profiles,
        "weights": packed,
        "levels": levels,
        "causal": causal,
        "title": str(title),
        "dropped": n_layers - len(layers),
    }
    root = f"ls-attn-{uuid.uuid4().hex[:12]}"
    fragment = (
        f'<div class="ls-attn" id="{root}" data-layer="{layers[0]}" data-head="0" data-hover="">'
        f"<style>{_STYLE.replace('ROOT', root)}</style>"
        f'<script type="text/javascript">({_SCRIPT})(document.getElementById("{root}"), {_script_json(data)});</script>'
        "</div>"
    )
    return AttentionView(fragment, tuple(layers), n_heads)


_STYLE = """
#ROOT{font-family:system-ui,sans-serif;font-size:13px;color:#222;margin:8px 0}
#ROOT .bar{display:flex;gap:16px;align-items:center;flex-wrap:wrap;margin-bottom:6px}
#ROOT .grid{display:flex;flex-wrap:wrap;gap:6px}
#ROOT .thumb{display:flex;flex-direction:column;align-items:center;cursor:pointer;border:2px solid transparent;padding:2px}
#ROOT .thumb.sel{border-color:#1f77b4}#ROOT .thumb canvas{image-rendering:pixelated;width:84px;height:84px;border:1px solid #ccc}
#ROOT .main{display:flex;gap:16px;flex-wrap:wrap;margin-top:8px}
#ROOT .big{image-rendering:pixelated;width:420px;height:420px;border:1px solid #999}
#ROOT .chips{display:flex;flex-wrap:wrap;gap:2px;max-width:640px;align-content:flex-start;font-family:ui-monospace,monospace;font-size:12px}
#ROOT .chip{padding:1px 3px;border-radius:3px;border-bottom:3px solid transparent;white-space:pre;cursor:default}
#ROOT .chip sub{color:#889;margin-right:1px}#ROOT .note{color:#555;font-size:12px;max-width:60em}
""".strip()

# the view's behaviour: decode the bytes once, draw thumbnails per layer, enlarge on click, link hover
_SCRIPT = r"""
function (root, d) {
  var raw = atob(d.weights), packed = new Uint8Array(raw.length);
  for (var i = 0; i < raw.length; i++) packed[i] = raw.charCodeAt(i);
  function el(tag, cls, text) { var e = document.createElement(tag); if (cls) e.className = cls; if (text !== undefined) e.textContent = text; return e; }
  if (typeof DecompressionStream === 'undefined') {
    root.appendChild(el('p', 'note', 'This browser cannot inflate the attention view (no DecompressionStream); ' +
      'open the page in Chromium 80+, Firefox 113+ or Safari 16.4+.'));
    return;
  }
  var stream = new Blob([packed]).stream().pipeThrough(new DecompressionStream('deflate'));
  new Response(stream).arrayBuffer().then(function (buffer) { show(new Uint8Array(buffer)); });
  function show(bytes) {
  if (d.levels !== 255) for (var j = 0; j < bytes.length; j++) bytes[j] = Math.round(bytes[j] * 255 / d.levels);
  var n = d.n, H = d.heads, T = d.causal ? n * (n + 1) / 2 : n * n, li = 0, head = 0, hover = -1;
  // causal: the lower triangle only, as a key after its query holds no attention
  function byte(l, h, q, k) {
    if (!d.causal) return bytes[(l * H + h) * T + q * n + k];
    return k > q ? 0 : bytes[(l * H + h) * T + q * (q + 1) / 2 + k];
  }
  function at(l, h, q, k) { var v = byte(l, h, q, k) / 255; return v * v; }
  function draw(canvas, l, h, mark) {
    var ctx = canvas.getContext('2d'), img = ctx.createImageData(n, n);
    for (var q = 0; q < n; q++) for (var k = 0; k < n; k++) {
      var b = byte(l, h, q, k), o = (q * n + k) * 4, lit = mark >= 0 && (q === mark || k === mark);
      img.data[o] = 255 - b * 0.88; img.data[o + 1] = 255 - b * 0.53; img.data[o + 2] = 255 - b * 0.29; img.data[o + 3] = 255;
      if (lit) { img.data[o] = Math.min(255, img.data[o] + 40); img.data[o + 1] *= 0.75; img.data[o + 2] *= 0.6; }
    }
    ctx.putImageData(img, 0, 0);
  }
  var bar = el('div', 'bar'), label = el('span', 'layer-label'), slider = el('input'), pick = el('select', 'colour-by');
  slider.type = 'range'; slider.min = 0; slider.max = d.layers.length - 1; slider.value = 0; slider.className = 'layer-slider';
  var none = el('option', null, 'attention of the hovered token'); none.value = ''; pick.appendChild(none);
  Object.keys(d.profiles).forEach(function (k) { var o = el('option', null, 'colour by ' + k); o.value = k; pick.appendChild(o); });
  if (Object.keys(d.profiles).length) pick.value = Object.keys(d.profiles)[0];
  bar.appendChild(el('b', null, d.title)); bar.appendChild(label); bar.appendChild(slider); bar.appendChild(pick);
  root.appendChild(bar);
  var grid = el('div', 'grid'); root.appendChild(grid);
  var main = el('div', 'main'), side = el('div'), big = el('canvas', 'big'), bigLabel = el('div', 'big-label');
  big.width = n; big.height = n; side.appendChild(bigLabel); side.appendChild(big);
  var chips = el('div', 'chips'); main.appendChild(side); main.appendChild(chips); root.appendChild(main);
  var note = el('p', 'note', 'Rows are query positions, columns key positions. Click a head to enlarge it; hover a token to outline ' +
    'what it attends to (its row; chip shading) and what attends to it (its column; chip underline).' +
    (d.dropped ? ' ' + d.dropped + ' layers were left out to keep the page small; the slider steps through the kept ones.' : '') +
    (d.levels !== 255 ? ' To keep the page small the weights are drawn in ' + d.levels + ' steps of √(attention).' : ''));
  root.appendChild(note);
  var thumbs = [];
  for (var h = 0; h < H; h++) (function (h) {
    var box = el('div', 'thumb'), c = el('canvas'); c.width = n; c.height = n;
    box.appendChild(c); box.appendChild(el('span', null, 'head ' + h)); box.dataset.head = h;
    box.addEventListener('click', function () { head = h; render(); });
    grid.appendChild(box); thumbs.push({ box: box, canvas: c });
  })(h);
  var chipEls = d.tokens.map(function (t, i) {
    var c = el('span', 'chip'), s = el('sub', null, String(i)); c.appendChild(s); c.appendChild(document.createTextNode(t));
    c.dataset.pos = i;
    c.addEventListener('mouseenter', function () { hover = i; render(); });
    c.addEventListener('mouseleave', function () { hover = -1; render(); });
    chips.appendChild(c); return c;
  });
  function tint(v, rgb) { return 'rgba(' + rgb + ',' + Math.max(0, Math.min(1, v)).toFixed(3) + ')'; }
  function render() {
    var l = d.layers[li];
    root.dataset.layer = l; root.dataset.head = head; root.dataset.hover = hover < 0 ? '' : String(hover);
    label.textContent = 'layer ' + l;
    thumbs.forEach(function (t, h) { draw(t.canvas, li, h, -1); t.box.classList.toggle('sel', h === head); });
    draw(big, li, head, hover);
    bigLabel.textContent = 'layer ' + l + ', head ' + head + (hover >= 0 ? ' · token ' + hover : '');
    var prof = d.profiles[pick.value];
    chipEls.forEach(function (c, k) {
      if (hover >= 0) {
        c.style.background = tint(Math.sqrt(at(li, head, hover, k)), '31,119,180');
        c.style.borderBottomColor = tint(Math.sqrt(at(li, head, k, hover)), '230,130,0');
      } else {
        c.style.background = prof ? tint(prof[k], '200,30,30') : '#eef';
        c.style.borderBottomColor = 'transparent';
      }
      c.style.outline = k === hover ? '2px solid #222' : '';
    });
  }
  slider.addEventListener('input', function () { li = +slider.value; render(); });
  pick.addEventListener('change', render);
  render();
  root.dataset.ready = '1';
  }
}
""".strip()
