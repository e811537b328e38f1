"""Self-contained HTML reports (plus a JSON twin) from plotly figures, text and tables.

``build_report(sections)`` returns one HTML document that works offline: plotly.js is embedded once,
inline, and each figure is a ``<div>`` plus a small ``Plotly.newPlot`` script
(``fig.to_html(full_html=False, include_plotlyjs=False)``). ``write_report`` writes ``report.html``
and ``results.json`` atomically through :mod:`lens_squash.core.records`: a reader never sees a
half-written file, and a failure leaves the previous files untouched.

**Escaping.** Every piece of user text (title, section titles, prompt, tokens, metadata, table
cells) goes through :func:`escape_text`: bidirectional controls (the embeddings, overrides and
isolates U+202A–U+202E, U+2066–U+2069, and the marks U+200E, U+200F, U+061C) are first replaced by
a visible ``⟨U+202E⟩``, so a prompt can never *display* in another order than the model read it
("Trojan Source"); other C0/C1 control characters (tab and newline excepted) are shown the same
way, since HTML would drop or mangle them; then ``html.escape``. Figures carry user text inside their JSON, inside a
``<script>``: plotly's encoder writes ``<``, ``>`` and ``/`` as ``\\u003c``-style escapes, so a token
``</script><script>…`` cannot close the script element; :func:`build_report` checks each figure's
fragment for a stray ``</script`` or ``<!--`` anyway and refuses to embed it. The only unescaped
input is :attr:`ReportSection.trusted_html`, meant for HTML that lens_squash itself produced (a
result's ``_repr_html_``, which escapes its own text).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from ..core.records import target_mode, to_jsonable, write_text_atomic
from ..core.tokens import (
    BIDI_DISPLAY,
    DISPLAY_CONTROLS,
    escape_text,
    neutralize_controls,
    sensitivity_html,
    token_label,
)
from .attention_figures import attention_heatmap
from .report_html import plotly_js, render_figure, render_table, render_text
from .report_parts import attention_view_html, bound_figure, flow_figures, path_figures, truth_column, verdict_html
from .sink_figures import sink_report_figure
from .spectral_figures import spectral_report_figure

__all__ = [
    "BIDI_DISPLAY",
    "DISPLAY_CONTROLS",
    "ATTENTION_CELLS",
    "SECTION_CAPTIONS",
    "SECTION_ORDER",
    "ReportSection",
    "analysis_sections",
    "build_report",
    "collapse_section",
    "escape_text",
    "model_section",
    "neutralize_controls",
    "prompt_section",
    "tasks_section",
    "write_report",
]

#: attention cells the report's heatmap may hold (attention_heatmap's max_cells; a float32 cell is about
#: 5.3 bytes of HTML): the mean of all layers and heads and one layer on the demo's 89-token prompt
#: (about 85 kB; the per-head view beside it carries every layer), one map pooled into blocks of 8
#: positions on a 1000-token prompt
ATTENTION_CELLS = 16_000

#: the usual sections of an over-squashing report, in reading order (any subset may be present)
SECTION_ORDER: tuple[str, ...] = (
    "verdict",
    "model",
    "prompt",
    "bound vs gradient",
    "paths",
    "attention",
    "spectral",
    "sinks",
    "collapse",
    "tasks",
)

#: what each standard section shows and how to read it, printed under its title
SECTION_CAPTIONS: dict[str, str] = {
    "verdict": (
        "The answer in one or two sentences, computed from the numbers below: how well the variants rank input "
        "positions against the Jacobian, which sit below it (a registered bound doing so is a violation; a proxy "
        "may), and which ranks best."
    ),
    "model": "The model's configuration and the library versions the numbers were computed with.",
    "prompt": (
        "The prompt as the model saw it, one numbered chip per token, and the token it predicts next. With a "
        "Jacobian, each chip is coloured by how sensitive the last token's output is to it (white: not at all, "
        "dark red: the most sensitive position); hover a chip for its value."
    ),
    "bound vs gradient": (
        "How sensitive the last token's final representation is to each input position: the Jacobian "
        "norm ‖∂y_n/∂v_i‖ (the truth) against each path-sum variant: every curve divided by its own total, "
        "the ratio variant ÷ truth (under 1 it sits below the truth: a violation for a bound, allowed for a "
        "proxy), and rank against rank; the table gives rank agreement (Spearman, Kendall), top-5 overlap, "
        "bound/true ratios and positions below the truth, and names any default variant skipped and why."
    ),
    "paths": (
        "The heaviest connected paths of a variant's layered graph (and of the true gradient flow, when one "
        "was computed) from input tokens to the last token: the route from the first token (the attention "
        "sink) beside the routes from every other token; every hop (residual, MLP, head) is an edge whose "
        "width grows with the weight of the paths using it, each path labelled with its weight."
    ),
    "attention": (
        "Attention patterns A^(l,h), query positions as rows and key positions as columns (CircuitsVis "
        "convention): every head of a layer as a thumbnail (the slider picks the layer; click one to enlarge "
        "it; hover a token to see what it attends to and what attends to it), then the head-mean maps on a "
        "log colour scale that keeps the first-token column from hiding everything else."
    ),
    "spectral": (
        "Perron–Frobenius view of the head-averaged rollout stack ½(A + I): the last token's mass on the "
        "first token, Dobrushin's coefficient per layer and cumulated, and the depth at which the last "
        "token would see only the first (Prop. B.8)."
    ),
    "sinks": (
        "Attention sinks per layer (heads whose queries put at least ε of their attention on the first "
        "token), massive first-token activations, and the compression (matrix entropy) of the residual stream."
    ),
    "collapse": (
        "Representational collapse: the distance between the final representations of a sequence and the "
        "same sequence with its last token repeated, per dtype, against length; it falls below each dtype's "
        "resolution where the two prompts can no longer be told apart (Theorem 4.2)."
    ),
    "tasks": "Copying and counting accuracy against sequence length, as in the paper's Figures 2, 3 and 11.",
}


@dataclass(frozen=True)
class ReportSection:
    """One section: a title, optional plain text, an optional table, and figures, in that order.

    ``text`` is plain text (escaped; blank lines separate paragraphs). ``table`` is a DataFrame
    (rendered with escaping) or a mapping shown as a two-column key/value table. ``trusted_html`` is
    inserted verbatim: pass only HTML that escapes its own user text (a result's ``_repr_html_()``).
    """

    title: str
    figures: Sequence[go.Figure] = ()
    text: str = ""
    table: pd.DataFrame | Mapping[str, Any] | None = None
    trusted_html: str = ""
    notes: Sequence[str] = field(default_factory=tuple)
    #: plain text under the title (None: :data:`SECTION_CAPTIONS` for a standard title)
    caption: str | None = None


# --------------------------------------------------------------------------------------------------
# section builders
# --------------------------------------------------------------------------------------------------


def model_section(metadata: Mapping[str, Any], *, title: str = "model") -> ReportSection:
    """The model's configuration and the library versions, from ``records.provenance`` metadata."""
    model = dict(metadata.get("model", {}))
    rest = {k: v for k, v in metadata.items() if k != "model"}
    return ReportSection(title=title, table={**{f"model.{k}": v for k, v in model.items()}, **rest})


def prompt_section(
    prompt: str | None,
    str_tokens: Sequence[str] | None = None,
    *,
    predicted: str | None = None,
    sensitivity: Sequence[float] | None = None,
    sensitivity_label: str = "sensitivity",
    title: str = "prompt",
) -> ReportSection:
    """The prompt as text, its tokens as numbered chips, and the predicted next token.

    With ``sensitivity`` (one value per token, e.g. the Jacobian norm of the last token's output with
    respect to each position) the chips are coloured by it, with a colour-scale legend
    (:func:`lens_squash.core.tokens.sensitivity_html`)."""
    parts = []
    if str_tokens is not None and sensitivity is not None:
        parts.append(
            f'<p class="muted">{len(str_tokens)} tokens (spaces shown as ␣), coloured by '
            f"{escape_text(sensitivity_label)}</p>"
        )
        parts.append(sensitivity_html(str_tokens, sensitivity, label=sensitivity_label))
    elif str_tokens is not None:
        chips = "".join(
            f'<span class="tok" title="position {i}"><sub>{i}</sub>{token_label(t, max_len=None)}</span>'
            for i, t in enumerate(str_tokens)
        )
        parts.append(
            f'<p class="muted">{len(str_tokens)} tokens (spaces shown as ␣)</p><div class="tokens">{chips}</div>'
        )
    if predicted is not None:
        parts.append(f"<p>predicted next token: <code>{token_label(predicted, max_len=None)}</code></p>")
    return ReportSection(title=title, text=prompt or "", trusted_html="".join(parts))


def collapse_section(result: Any, *, head_dtype: str | None = None, title: str = "collapse") -> ReportSection:
    """Representational collapse from a ``collapse.CollapseResult`` (read by duck typing): the
    per-dtype summary, the relative ∞-distance of ``y`` per dtype with each resolution (Fig. 6), and
    the last-layer heads' mean and min–max for ``head_dtype`` (default: the first dtype; Fig. 5)."""
    figures = [result.plot("dtypes")]
    if result.head_distances.shape[-1] > 0:  # no heads were recorded (e.g. attention-free sites)
        figures.append(result.plot("heads", head_dtype))
    return ReportSection(title, figures=figures, table=result.summary().reset_index())


def tasks_section(results: Any, *, title: str = "tasks") -> ReportSection:
    """Copying and counting results (a ``tasks.TaskResults``, read by duck typing): each of the
    paper's figures its tasks have rows for (``TaskResults.figures``) and the per-length table."""
    return ReportSection(title, figures=list(results.figures().values()), table=results.accuracy_by_length())


def analysis_sections(
    analysis: Any,
    *,
    prompt: str | None = None,
    path_variants: Sequence[str] | None = None,
    k: int = 5,
    flow: Any = None,
) -> list[ReportSection]:
    """The standard sections for an ``analysis.Analysis`` (read by duck typing): the verdict, model,
    prompt, bound vs gradient (with the per-variant summary), paths, attention, spectral and sinks
    (append :func:`collapse_section` / :func:`tasks_section` for those results).

    ``path_variants`` picks whose graphs' connected paths to draw (default: ``rollout`` and the
    best-ranking variant, those present), sink route beside content route, from the ``k`` heaviest
    paths per input position; a true sensitivity ``flow`` (``lens_squash.flow(...)``) adds its own
    paths first and its per-layer heatmap of truth beside bounds. ``prompt`` defaults to the
    concatenated tokens.
    """
    traced, bounds = analysis.trace, dict(analysis.bounds)
    tokens = tuple(traced.str_tokens)
    verdict = verdict_html(analysis)
    sections = [ReportSection("verdict", trusted_html=verdict)] if verdict else []
    sections.append(model_section(traced.provenance))
    truth = truth_column(analysis)
    sections.append(
        prompt_section(
            "".join(tokens) if prompt is None else prompt,
            tokens,
            predicted=traced.predicted_token,
            sensitivity=None if truth is None else analysis.table[truth].to_numpy(dtype=float),
            sensitivity_label=f"Jacobian norm ‖∂yₙ/∂vᵢ‖ ({str(truth).removeprefix('jacobian_')})",
        )
    )
    summary = analysis.summary() if callable(getattr(analysis, "summary", None)) else None
    skipped = dict(getattr(analysis, "skipped", {}) or {})
    notes = [f"{name} skipped: {reason}" for name, reason in skipped.items() if name != "spectral"]
    figures = [bound_figure(analysis, tokens, bounds), *flow_figures(flow)]
    sections.append(ReportSection("bound vs gradient", figures=figures, table=summary, notes=notes))
    if path_variants is None:
        path_variants = [v for v in dict.fromkeys(("rollout", getattr(analysis, "best_variant", None))) if v in bounds]
        path_variants = path_variants or list(bounds)[:1]
    if traced.patterns is None:  # a long prompt's trace streamed its attention patterns: rows only, no edges to draw
        streamed = (
            "Not drawn: the attention patterns were not saved with this analysis (save(path) keeps them)."
            if "patterns" in traced.provenance.get("dropped", [])
            else f"Not drawn: the {traced.n_tokens}-token trace streamed its attention patterns instead of "
            "keeping them; analyze(..., keep_patterns=True) keeps them (memory grows as layer × head × pos²)."
        )
        sections += [ReportSection("paths", text=streamed), ReportSection("attention", text=streamed)]
    else:
        sections.append(ReportSection("paths", figures=path_figures(bounds, tokens, path_variants, k, flow)))
        # the per-head view first; a budget of cells keeps the mean heatmap small
        mean = attention_heatmap(traced.patterns, tokens, max_cells=ATTENTION_CELLS)
        sections.append(ReportSection("attention", figures=[mean], trusted_html=attention_view_html(analysis)))
    if getattr(analysis, "spectral", None) is not None:
        sections.append(ReportSection("spectral", figures=[spectral_report_figure(analysis.spectral)]))
    elif "spectral" in skipped:
        sections.append(ReportSection("spectral", text=f"Not computed: {skipped['spectral']}."))
    if getattr(analysis, "sinks", None) is not None:
        sections.append(ReportSection("sinks", figures=[sink_report_figure(analysis.sinks)]))
    return sections


# --------------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------------


def _render_section(section: ReportSection, index: int, first_figure: int) -> tuple[str, int]:
    figures = [render_figure(fig, first_figure + i) for i, fig in enumerate(section.figures)]
    notes = "".join(f'<p class="muted">{escape_text(str(n))}</p>' for n in section.notes)
    caption = section.caption if section.caption is not None else SECTION_CAPTIONS.get(section.title, "")
    caption_html = f'<p class="caption">{escape_text(caption)}</p>' if caption else ""
    body = (
        f'<section id="section-{index}"><h2>{escape_text(section.title)}</h2>{caption_html}'
        f"{render_text(section.text)}{section.trusted_html}{render_table(section.table)}{notes}"
        f"{''.join(figures)}</section>"
    )
    return body, first_figure + len(figures)


def _as_section(title: str, value: Any) -> ReportSection:
    """Dict values: a ReportSection, a Figure, a list of Figures, or (figures, text | table)."""
    if isinstance(value, ReportSection):
        return value
    if isinstance(value, go.Figure):
        return ReportSection(title, figures=(value,))
    if isinstance(value, tuple) and len(value) == 2:
        figures, extra = value
        figures = (figures,) if isinstance(figures, go.Figure) else tuple(figures or ())
        if isinstance(extra, str):
            return ReportSection(title, figures=figures, text=extra)
        return ReportSection(title, figures=figures, table=extra)
    if isinstance(value, Iterable) and not isinstance(value, (str, Mapping)):
        return ReportSection(title, figures=tuple(value))
    raise TypeError(f"section {title!r}: pass a ReportSection, a Figure, figures, or (figures, text/table)")


def _sections(sections: Sequence[ReportSection] | Mapping[str, Any]) -> list[ReportSection]:
    if isinstance(sections, Mapping):
        return [_as_section(str(title), value) for title, value in sections.items()]
    out = list(sections)
    for section in out:
        if not isinstance(section, ReportSection):
            raise TypeError(f"sections must be ReportSection objects, got {type(section).__name__}")
    return out


def _flatten(metadata: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in metadata.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1200px;padding:0 24px 48px;color:#222}
h1{font-size:1.6em;margin-top:1.2em}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:2em}
.muted{color:#666;font-size:.9em}.caption{color:#444;font-size:.92em;max-width:60em;margin:.3em 0 .8em}.text{white-space:pre-wrap;font-family:ui-monospace,monospace;background:#f7f7f7;padding:8px;border-radius:4px;overflow-wrap:anywhere}
table.data{border-collapse:collapse;font-size:.85em;margin:8px 0;display:block;max-width:100%;overflow-x:auto}table.data td,table.data th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
table.data code{white-space:pre-wrap;overflow-wrap:anywhere}
.tokens{display:flex;flex-wrap:wrap;gap:3px;font-family:ui-monospace,monospace;font-size:.85em}
.tok{background:#eef;border-radius:3px;padding:1px 4px;white-space:pre}.tok sub{color:#889;margin-right:2px}
.figure{margin:16px 0}nav ol{columns:2}
""".strip()


def build_report(
    sections: Sequence[ReportSection] | Mapping[str, Any],
    *,
    title: str = "lens_squash report",
    metadata: Mapping[str, Any] | None = None,
) -> str:
    """One offline HTML document: plotly.js inline once, a table of contents, metadata, sections.

    ``sections`` is a list of :class:`ReportSection` or a dict ``title -> value`` where the value is
    a section, a Figure, a list of Figures, or ``(figures, text or table)``. Order is kept; the usual
    titles are :data:`SECTION_ORDER`.
    """
    sections = _sections(sections)
    rendered, next_figure = [], 0
    for i, section in enumerate(sections):
        body, next_figure = _render_section(section, i, next_figure)
        rendered.append(body)
    toc = "".join(f'<li><a href="#section-{i}">{escape_text(s.title)}</a></li>' for i, s in enumerate(sections))
    meta = render_table(_flatten(metadata)) if metadata else ""
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f'<meta name="generator" content="lens_squash">\n<title>{escape_text(title)}</title>',
            f"<style>{_STYLE}</style>",
            '<script type="text/javascript">window.PlotlyConfig = {MathJaxConfig: "local"};</script>',
            f'<script type="text/javascript">{plotly_js()}</script>',
            "</head><body>",
            f'<h1>{escape_text(title)}</h1><p class="muted">created {created} · {next_figure} figures · '
            "works offline (plotly.js embedded)</p>",
            f"<nav><ol>{toc}</ol></nav>" if sections else "",
            f"<details><summary>metadata</summary>{meta}</details>" if meta else "",
            *rendered,
            "</body></html>",
        ]
    )


def write_report(
    out_dir: str | os.PathLike,
    sections: Sequence[ReportSection] | Mapping[str, Any],
    results: Mapping[str, Any],
    *,
    title: str = "lens_squash report",
    metadata: Mapping[str, Any] | None = None,
    html_name: str = "report.html",
    json_name: str = "results.json",
) -> tuple[Path, Path]:
    """Write ``report.html`` and ``results.json`` into ``out_dir``; return their paths.

    ``results`` goes to JSON through ``records.to_jsonable`` (tensors become lists, NaN null), with
    ``metadata`` added under ``"metadata"`` unless ``results`` has that key. Both documents are
    rendered in memory first, so an error in any figure or value writes nothing; both are then
    staged next to their targets (``records.write_text_atomic``) and renamed into place together,
    so a failed write leaves the previous pair untouched.
    """
    out_dir = Path(out_dir)
    page = build_report(sections, title=title, metadata=metadata)
    payload = dict(results)
    if metadata is not None:
        payload.setdefault("metadata", metadata)
    text = json.dumps(to_jsonable(payload), indent=1, allow_nan=False, ensure_ascii=False)
    targets = {out_dir / html_name: page, out_dir / json_name: text}
    staged: list[Path] = []
    try:  # stage both (each written atomically), then swap both in: the pair stays consistent
        for path, content in targets.items():
            staged.append(write_text_atomic(path.with_name(f".{path.name}.staged"), content))
        for staged_path, path in zip(staged, targets, strict=True):
            os.chmod(staged_path, target_mode(path))  # the target's mode, not the staging name's
            os.replace(staged_path, path)
    finally:
        for staged_path in staged:
            staged_path.unlink(missing_ok=True)
    return out_dir / html_name, out_dir / json_name
