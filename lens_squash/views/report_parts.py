"""The parts of an analysis report that show the answer: the verdict, bound vs truth, connected paths,
the per-head attention view, the flow's heatmap. :func:`lens_squash.views.report.analysis_sections`
puts them into sections; each reads the analysis by duck typing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go

from ..algebra.flow_paths import graph_paths
from ..core.results import register_figure
from ..core.tokens import escape_text
from ..edge.trace import Trace
from ..experiments.analysis import Analysis
from ..experiments.verdict import VIOLATION_MARK, analysis_verdict
from .attention_figures import trace_patterns
from .attention_view import AttentionView, attention_view
from .bound_figures import bound_vs_jacobian
from .bound_panels import bound_truth_from_table
from .flow_views import layer_heatmaps
from .path_graph import connected_paths

__all__ = [
    "VIEW_BYTES",
    "attention_view_html",
    "bound_figure",
    "flow_figures",
    "path_figures",
    "truth_column",
    "verdict_html",
]


#: base64 bytes the report's per-head view may carry (the report's data stays near 1 MB beyond
#: plotly.js): every layer of SmolLM2 (30 × 9 heads, 89 tokens) fits in 15 steps of √a (287 kB;
#: 31 steps take 421 kB, 255 take 915 kB); a tiny model keeps all 255
VIEW_BYTES = 320_000


def truth_column(analysis: Any) -> str | None:
    """The table's ``jacobian_*`` column (the truth), or ``None`` without a Jacobian."""
    table = getattr(analysis, "table", None)
    return next((c for c in (table.columns if table is not None else ()) if str(c).startswith("jacobian_")), None)


def verdict_html(analysis: Any) -> str | None:
    """The verdict as a highlighted paragraph (a violation in red), or ``None`` for an object that
    carries no comparisons (nothing to judge)."""
    if not hasattr(analysis, "comparisons"):
        return None
    text = analysis_verdict(analysis)
    colour = "#fde8e8;border-color:#c00" if VIOLATION_MARK in text else "#eef6ee;border-color:#393"
    return (
        f'<p class="verdict" style="background:{colour};border-left:4px solid;padding:8px 12px">{escape_text(text)}</p>'
    )


def _guarantees(bounds: Mapping[str, Any]) -> dict[str, str]:
    return {name: getattr(bound, "guarantee_kind", "proxy") for name, bound in bounds.items()}


def bound_figure(analysis: Any, tokens: Sequence[str], bounds: Mapping[str, Any]) -> go.Figure:
    """Shares, ratio and ranks against the truth; without a Jacobian, the bounds' own profiles."""
    if truth_column(analysis) is None:
        return bound_vs_jacobian(tokens, None, bounds)
    return bound_truth_from_table(analysis.table, _guarantees(bounds), getattr(analysis, "comparisons", None))


def path_figures(
    bounds: Mapping[str, Any], tokens: Sequence[str], variants: Sequence[str], k: int, flow=None
) -> list[go.Figure]:
    """Connected paths, sink route beside content route: the true flow's (when given), then each variant's."""
    figures = []
    if flow is not None:
        figures.append(connected_paths(flow.top_paths(k=k), title="Heaviest connected paths of the true gradient flow"))
    for name in variants:
        bound = bounds[name]
        paths = graph_paths(bound.graph, bound.target_pos, k=k, str_tokens=tokens)
        kind = getattr(bound, "guarantee_kind", "proxy")
        figures.append(
            connected_paths(
                paths, title=f"Heaviest connected paths of the {name} graph ({kind}) → position {bound.target_pos}"
            )
        )
    return figures


def attention_view_html(analysis: Any) -> str:
    """The per-head view of the trace's patterns, its chips colourable by the truth and each variant."""
    traced = analysis.trace
    colourings = {}
    column = truth_column(analysis)
    if column is not None:
        colourings[f"truth ({str(column).removeprefix('jacobian_')} Jacobian)"] = analysis.table[column].to_numpy(
            dtype=float
        )
    n = traced.n_tokens
    colourings.update({name: bound.bound[:n] for name, bound in dict(analysis.bounds).items()})
    return attention_view(traced.patterns, traced.str_tokens, colourings, max_bytes=VIEW_BYTES).html


def flow_figures(flow: Any) -> list[go.Figure]:
    """The flow's per-layer heatmap of truth beside bounds (where the bounds stop ranking like the gradient)."""
    return [] if flow is None else [layer_heatmaps(flow)]


# --------------------------------------------------------------------------------------------------
# figure kinds: the per-head attention view, an HTML/JS view (not a plotly figure)
# --------------------------------------------------------------------------------------------------


@register_figure(Trace, "head_view", html=True)
def _trace_heads(trace: Trace, **kwargs):
    return attention_view(trace_patterns(trace), trace.str_tokens, **kwargs)


@register_figure(Analysis, "head_view", html=True)
def _analysis_heads(analysis: Analysis, **kwargs):
    """The per-head view with chips coloured by the truth and each variant."""
    patterns = trace_patterns(analysis.trace)  # refuses a trace that kept no patterns, saying why
    return AttentionView(attention_view_html(analysis), (), patterns.shape[1])
