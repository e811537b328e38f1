"""Every result's figure kinds: ``(result class, kind) -> builder``, registered once, in one place.

``Result.plot(kind)`` (:mod:`lens_squash.core.results`) imports this module the first time a figure
is drawn — core code never imports the views above it — and dispatches through what it registers.
A builder takes the result (and the figure's own keyword arguments) and returns a ``go.Figure``
with titled axes and a caption; the first kind registered for a class is its default. To add a
figure: write the builder in its concept module, then register it here (a duplicate is refused).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..algebra.compare import Comparison
from ..algebra.flow_paths import FlowPaths, graph_paths
from ..algebra.paths import BoundFlows
from ..algebra.sinks import SinkReport
from ..algebra.softmax_theory import TVDecayResult
from ..algebra.spectral import SpectralReport
from ..algebra.variants import PathBound
from ..core.results import register_figure
from ..edge.flow import SensitivityFlow
from ..edge.jacobian import JacobianResult
from ..edge.trace import Trace
from ..experiments.ablation import AblationResult
from ..experiments.analysis import Analysis
from ..experiments.collapse import CollapseResult
from ..experiments.collapse_windows import WindowSweepResult
from ..experiments.compare_runs import RunComparison
from ..experiments.many import ManyAnalyses
from ..experiments.mixing_result import MixingResult
from ..experiments.synthetic import PECollapseResult, RatioInvarianceResult
from ..experiments.task_results import TASK_FIGURES, TaskResults, task_figure_rows
from ..experiments.task_theory import CopySensitivity, CountCollapse
from ..lab.results import LabGrid, LabRun
from . import flow_views
from .attention_figures import attention_heatmap
from .attention_view import AttentionView, attention_view
from .bound_figures import bound_vs_jacobian
from .bound_panels import bound_truth_from_table
from .collapse_figures import collapse_figure, head_band_figure, pe_figure, tv_decay_figure
from .compare_figures import comparison_runs_figure
from .edge_figures import attention_paths
from .mixing_figures import (
    lab_grid_figure,
    lab_run_figure,
    lab_training_figure,
    mixing_heads_figure,
    mixing_heatmap,
    mixing_jacobian_figure,
    mixing_spread_figure,
)
from .pages import analysis_page, many_page
from .path_graph import connected_paths
from .report_parts import attention_view_html
from .result_figures import comparison_figure_of, prompts_figure
from .sink_figures import sink_figure, sink_report_figure
from .spectral_figures import spectral_report_figure
from .task_figures import TASK_CHARTS
from .task_theory_figures import copy_sensitivity_figure, count_collapse_figure

__all__ = ["HTML_KINDS"]  # importing the module registers every kind

#: kinds that draw a whole HTML page or an HTML/JS view (``_repr_html_``, ``.write(path)``), not a plotly figure
HTML_KINDS: frozenset[str] = frozenset({"page", "head_view"})


def _register(cls: type, kind: str, builder: Callable[..., Any]) -> None:
    register_figure(cls, kind)(builder)


# --------------------------------------------------------------------------------------------------
# a trace, its bounds and its Jacobian
# --------------------------------------------------------------------------------------------------

_NORM_NAMES = {"spectral": "‖J_i‖₂", "frobenius": "‖J_i‖_F", "l1": "‖J_i‖₁ (entrywise)"}


def _patterns(trace: Trace):
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


def _trace_attention(trace: Trace, **kwargs):
    return attention_heatmap(_patterns(trace), trace.str_tokens, **kwargs)


def _jacobian_norm(norm: str | None):
    def draw(result: JacobianResult, **kwargs):
        kind = norm or result.best_norm()
        kwargs.setdefault("truth_name", f"{result.mode} Jacobian {_NORM_NAMES[kind]}")
        kwargs.setdefault("normalised", False)
        kwargs.setdefault("title", f"Sensitivity of position {result.target_pos} to each input position")
        return bound_vs_jacobian(result.str_tokens, result.norms(kind), {}, **kwargs)

    return draw


def _bound_profile(bound: PathBound, **kwargs):
    kwargs.setdefault("normalised", False)
    kwargs.setdefault("title", f"The {bound.variant} bound of position {bound.target_pos} on each input position")
    return bound_vs_jacobian(bound.str_tokens, None, {bound.variant: bound.bound}, **kwargs)


def _bound_flows(bound: PathBound, *, source: int | None = None, **kwargs):
    return attention_paths(bound.flows(source), bound.str_tokens, **kwargs)


def _bound_paths(bound: PathBound, *, k: int = 5, **kwargs):
    """The bound graph's heaviest connected paths, sink route beside content route."""
    return connected_paths(graph_paths(bound.graph, bound.target_pos, k=k, str_tokens=bound.str_tokens), **kwargs)


def _flows_edges(flows: BoundFlows, **kwargs):
    return attention_paths(flows, **kwargs)


_register(Trace, "attention", _trace_attention)
_register(JacobianResult, "norm", _jacobian_norm(None))
for _norm in _NORM_NAMES:
    _register(JacobianResult, _norm, _jacobian_norm(_norm))
_register(PathBound, "profile", _bound_profile)
_register(PathBound, "flows", _bound_flows)
_register(BoundFlows, "edges", _flows_edges)
_register(PathBound, "paths", _bound_paths)
_register(Comparison, "statistics", comparison_figure_of)
_register(SpectralReport, "report", spectral_report_figure)
_register(SinkReport, "curves", sink_report_figure)
_register(TVDecayResult, "tv", tv_decay_figure)


# --------------------------------------------------------------------------------------------------
# the true gradient's flow
# --------------------------------------------------------------------------------------------------

_register(SensitivityFlow, "layers", flow_views.truth_vs_bounds)
_register(SensitivityFlow, "heatmap", flow_views.layer_heatmaps)
_register(SensitivityFlow, "heads", flow_views.head_grid)
_register(SensitivityFlow, "paths", flow_views.path_figure)
_register(FlowPaths, "paths", flow_views.path_figure)
_register(FlowPaths, "connected", connected_paths)
_register(SensitivityFlow, "connected", lambda flow, *, k=5, **kwargs: connected_paths(flow.top_paths(k=k), **kwargs))


# --------------------------------------------------------------------------------------------------
# one prompt's whole analysis, and many prompts
# --------------------------------------------------------------------------------------------------


def _analysis_bounds(analysis: Analysis, **kwargs):
    """The report's "bound vs gradient" figure: each bound against the Jacobian it was compared with."""
    if analysis.table is not None:
        guarantees = {name: bound.guarantee_kind for name, bound in analysis.bounds.items()}
        return bound_truth_from_table(analysis.table, guarantees, analysis.comparisons, **kwargs)
    bounds = {name: bound.bound for name, bound in analysis.bounds.items()}
    return bound_vs_jacobian(analysis.trace.str_tokens, None, bounds, **kwargs)


def _heads(trace: Trace, analysis: Analysis | None, **kwargs):
    """The per-head attention view (an HTML/JS view, not a plotly figure), chips coloured by the
    truth and each variant when an analysis is given."""
    patterns = _patterns(trace)
    if analysis is None:
        return attention_view(patterns, trace.str_tokens, **kwargs)
    return AttentionView(attention_view_html(analysis), (), trace.patterns.shape[1])


def _analysis_spectral(analysis: Analysis, **kwargs):
    if analysis.spectral is None:
        reason = analysis.skipped.get("spectral", "it was not computed")
        raise ValueError(f"this analysis has no spectral report: {reason}")
    return spectral_report_figure(analysis.spectral, **kwargs)


_register(Analysis, "bounds", _analysis_bounds)
_register(Analysis, "attention", lambda analysis, **kwargs: _trace_attention(analysis.trace, **kwargs))
_register(Analysis, "spectral", _analysis_spectral)
_register(Analysis, "sinks", lambda analysis, **kwargs: sink_report_figure(analysis.sinks, **kwargs))
_register(ManyAnalyses, "spearman", lambda many, **kwargs: prompts_figure(many.frame, **kwargs))
_register(RunComparison, "curves", comparison_runs_figure)
# not plotly figures: a whole page (Analysis.show / .report, ManyAnalyses.report) and the per-head HTML view
_register(Analysis, "page", analysis_page)
_register(ManyAnalyses, "page", many_page)
_register(Analysis, "head_view", lambda analysis, **kwargs: _heads(analysis.trace, analysis, **kwargs))
_register(Trace, "head_view", lambda trace, **kwargs: _heads(trace, None, **kwargs))


# --------------------------------------------------------------------------------------------------
# collapse, synthetic models, ablation
# --------------------------------------------------------------------------------------------------


def _collapse_dtypes(result: CollapseResult, *, versus: CollapseResult | None = None, **kwargs):
    """Relative ∞-distance of ``y`` per dtype, each dtype's resolution dashed; ``versus=`` overlays
    another family measured at the same lengths (e.g. ``copy_ones`` against ``copy_ones_commas``)."""
    if versus is None:
        curves = dict(zip(result.dtypes, result.final("inf"), strict=True))
        resolutions = result.resolutions
    else:
        if list(map(int, versus.lengths)) != list(map(int, result.lengths)):
            raise ValueError("versus= needs a result measured at the same lengths; rerun it with this one's lengths")
        both = (result, versus)
        curves = {f"{r.family} ({d})": v for r in both for d, v in zip(r.dtypes, r.final("inf"), strict=True)}
        resolutions = {}
        for r in both:  # one line (or note) per distinct resolution: two float32 families share theirs
            for d in r.dtypes:
                if r.resolutions[d] not in resolutions.values():
                    resolutions[f"{r.family} ({d})"] = r.resolutions[d]
        kwargs.setdefault("title", f"Representational collapse: {result.family} against {versus.family}")
    kwargs.setdefault("y_title", "‖y − y*‖∞ / ‖y‖∞")
    kwargs.setdefault("title", f"Representational collapse: {result.family}")
    return collapse_figure(result.lengths, curves, resolutions, **kwargs)


def _collapse_heads(result: CollapseResult, dtype: str | None = None, **kwargs):
    """Mean and min–max over last-layer heads for one dtype (Fig. 5)."""
    d = result.dtypes.index(dtype) if dtype is not None else 0
    h = result.head_distances[d]
    kwargs.setdefault("name", f"last-layer heads ({result.dtypes[d]})")
    kwargs.setdefault("title", f"Collapse per head: {result.family}")
    return head_band_figure(result.lengths, h.mean(-1), h.min(-1).values, h.max(-1).values, **kwargs)


def _window_sweep(what: str):
    def draw(result: WindowSweepResult, **kwargs):
        values = result.distance if what == "distance" else result.bound_first_share
        kwargs.setdefault("y_title", "‖y − y*‖∞ / ‖y‖∞" if what == "distance" else "rollout bound share on token 0")
        kwargs.setdefault("title", f"Sliding-window attention (App. C.6): {result.family}")
        return collapse_figure(result.lengths, dict(zip(result._labels(), values, strict=True)), **kwargs)

    return draw


def _pe_collapse(result: PECollapseResult, **kwargs):
    kwargs.setdefault("title", f"Collapse by positional encoding ({result.site})")
    return pe_figure(result.lengths, result.mean_std(), **kwargs)


def _ratio_invariance(result: RatioInvarianceResult, **kwargs):
    kwargs.setdefault("y_title", "‖y(k) − y(1)‖ / ‖y(1)‖")
    kwargs.setdefault("title", "Ratio invariance (Prop. B.9)")
    return collapse_figure(list(result.multiples), {"relative distance": result.distances}, **kwargs)


def _ablation_changes(result: AblationResult, **kwargs):
    """Per-layer changes (and both first-token norm ratios), the baseline's phases shaded."""
    curves = {
        "Δ sink rate": result.sink_rate_change,
        "Δ matrix entropy": result.entropy_change,
        "first-token norm ÷ median, baseline": result.baseline.norm_ratio,
        "first-token norm ÷ median, ablated": result.ablated.norm_ratio,
    }
    kwargs.setdefault("log", tuple(name for name in curves if "÷" in name))
    kwargs.setdefault(
        "title", f"Clamping the massive activation of position {result.position} after layer {result.layer}"
    )
    return sink_figure(curves, result.baseline.phases, **kwargs)


def _ablation_jacobian(result: AblationResult, **kwargs):
    """The last token's Jacobian sensitivity per position, baseline against ablated."""
    if result.jacobian_baseline is None:
        raise ValueError("this result has no Jacobians; run ablation_effect with jacobian=True")
    kwargs.setdefault("title", f"Sensitivity of the last token, clamp after layer {result.layer}")
    return bound_vs_jacobian(
        result.str_tokens,
        result.jacobian_baseline,
        {"ablated ‖J‖_F": result.jacobian_ablated},
        truth_name="baseline ‖J‖_F",
        **kwargs,
    )


_register(CollapseResult, "dtypes", _collapse_dtypes)
_register(CollapseResult, "heads", _collapse_heads)
_register(WindowSweepResult, "distance", _window_sweep("distance"))
_register(WindowSweepResult, "bound", _window_sweep("bound"))
_register(PECollapseResult, "distance", _pe_collapse)
_register(RatioInvarianceResult, "distance", _ratio_invariance)
_register(AblationResult, "changes", _ablation_changes)
_register(AblationResult, "jacobian", _ablation_jacobian)
_register(MixingResult, "spread", mixing_spread_figure)
_register(MixingResult, "heatmap", mixing_heatmap)
_register(MixingResult, "heads", mixing_heads_figure)
_register(MixingResult, "jacobian", mixing_jacobian_figure)
_register(LabRun, "training", lab_run_figure)
_register(LabGrid, "sink_share", lab_grid_figure)
_register(LabGrid, "spread", lambda grid, **kwargs: lab_grid_figure(grid, "spread_ratio_mask", **kwargs))
_register(LabGrid, "training", lab_training_figure)


# --------------------------------------------------------------------------------------------------
# tasks
# --------------------------------------------------------------------------------------------------


def _task(kind: str):
    def draw(results: TaskResults, *, tasks=None):
        rows, figure = task_figure_rows(results, kind, tasks)
        return TASK_CHARTS[figure.chart](rows, title=figure.title)

    return draw


for _kind in TASK_FIGURES:  # the paper's Figs. 2, 3, 4 and 11, "accuracy" (Fig. 2) first: the default
    _register(TaskResults, _kind, _task(_kind))
_register(CopySensitivity, "sensitivity", copy_sensitivity_figure)
_register(CountCollapse, "distances", count_collapse_figure)
