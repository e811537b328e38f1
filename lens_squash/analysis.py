"""The whole over-squashing analysis of one prompt, in one call: ``analyze(model, prompt)``.

It chains the modules in their data-flow order (docs/ARCHITECTURE.md): one traced forward pass, the
path-sum bounds of the requested variants (§5, Theorem B.5 and the norm-aware extensions), the
Perron–Frobenius / Dobrushin analysis of the head-averaged rollout stack (Prop. B.8 and beyond), the
exact or sketched Jacobian norms, their comparison, and the sink / compression profile. The result
is a frozen :class:`Analysis` that renders in Jupyter, plots, and serialises to JSON.
"""

from __future__ import annotations

import html
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from .compare import Comparison, compare_variants
from .display import compact_repr
from .jacobian import JacobianResult, jacobian
from .paths import rollout_matrices
from .sinks import SinkReport, sink_report_from_trace
from .spectral import SpectralReport, analyze_stack
from .trace import Trace, trace
from .variants import PathBound, path_bound

__all__ = ["DEFAULT_VARIANTS", "Analysis", "analyze"]

#: the paper's two variants beside the certified bound and the best norm-aware estimate
DEFAULT_VARIANTS = ("paper", "rollout", "certified", "value_rownorm")


@dataclass(frozen=True, eq=False)
class Analysis:
    """Everything ``analyze`` measured for one prompt."""

    trace: Trace
    bounds: dict[str, PathBound]
    spectral: SpectralReport
    jacobian: JacobianResult | None
    table: pd.DataFrame | None
    comparisons: dict[str, Comparison]
    sinks: SinkReport
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def best_variant(self) -> str | None:
        """The variant whose profile ranks positions most like the Jacobian (Spearman)."""
        if not self.comparisons:
            return None
        return max(self.comparisons, key=lambda name: self.comparisons[name].spearman)

    def summary(self) -> pd.DataFrame:
        """One row per variant: rank agreement, bound/true ratios, positions where the bound is below
        the Jacobian it is compared with, first-token share. ``certified`` bounds the *frozen* model's
        Jacobian, so positions below the exact Jacobian are not violations of its theorem (the
        tests and ``benchmarks/bound_quality.py`` check it against the frozen one)."""
        rows = []
        for name, bound in self.bounds.items():
            row = {"variant": name, "first_token_share": bound.first_token_share}
            if name in self.comparisons:
                c = self.comparisons[name]
                row |= {
                    "spearman": c.spearman, "kendall": c.kendall, "top5_overlap": c.top5_overlap,
                    "ratio_min": c.ratio_min, "ratio_median": c.ratio_median, "below_truth": c.violations,
                }
            rows.append(row)
        return pd.DataFrame(rows)

    def to_dict(self) -> dict[str, Any]:
        return {
            "metadata": self.trace.metadata,
            "tokens": self.trace.tokens,
            "str_tokens": list(self.trace.str_tokens),
            "predicted_token": self.trace.predicted_token,
            "bounds": {name: bound.to_dict() for name, bound in self.bounds.items()},
            "jacobian": None if self.jacobian is None else self.jacobian.to_dict(),
            "comparisons": {name: c.to_dict() for name, c in self.comparisons.items()},
            "best_variant": self.best_variant,
            "spectral": self.spectral.to_dict(),
            "sinks": self.sinks.to_dict(),
            "seconds": self.seconds,
        }

    __repr__ = compact_repr

    def _repr_html_(self) -> str:
        head = (
            f"<b>lens_squash Analysis</b>: {self.trace.n_tokens} tokens, "
            f"predicted {html.escape(repr(self.trace.predicted_token))}"
        )
        if self.best_variant:
            head += f"; best-ranking variant: <code>{html.escape(self.best_variant)}</code>"
        return head + self.summary().to_html(index=False, float_format=lambda v: f"{v:.4g}")


def _timed(seconds: dict[str, float], name: str, fn, *args, **kwargs):
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    seconds[name] = round(time.perf_counter() - started, 3)
    return result


def analyze(
    model,
    prompt,
    *,
    variants: Sequence[str] = DEFAULT_VARIANTS,
    jacobian_mode: str | None = "exact",
    n_probes: int = 64,
    chat: bool | None = None,
    target: int = -1,
) -> Analysis:
    """Trace ``prompt``, bound its last token's sensitivity with each variant, and check the bounds
    against the Jacobian (``jacobian_mode`` = ``"exact"``, ``"sketch"`` or ``None`` to skip)."""
    seconds: dict[str, float] = {}
    needs_weights = any(v.startswith("certified") for v in variants)
    traced = _timed(seconds, "trace", trace, model, prompt, chat=chat, lipschitz=needs_weights, keep_resid=True)
    bounds = {
        name: _timed(seconds, f"bound_{name}", path_bound, traced, name, model=model, target=target)
        for name in variants
    }
    # the trace's head-mean patterns: no float64 copy of the whole [layer, head, n, n] stack
    stack = rollout_matrices(traced.mean_patterns.double())
    spectral = _timed(seconds, "spectral", analyze_stack, stack)
    sinks = _timed(seconds, "sinks", sink_report_from_trace, traced)
    jac, table, comparisons = None, None, {}
    if jacobian_mode is not None:
        jac = _timed(
            seconds, f"jacobian_{jacobian_mode}", jacobian, model, traced.tokens, mode=jacobian_mode,
            n_probes=n_probes, target_pos=target,
        )
        truth = jac.spectral if jacobian_mode == "exact" else jac.frobenius
        n = truth.shape[0]
        table, comparisons = compare_variants(
            {name: bound.bound[:n] for name, bound in bounds.items()}, truth,
            str_tokens=traced.str_tokens[:n], truth_name="spectral" if jacobian_mode == "exact" else "frobenius",
        )
    return Analysis(traced, bounds, spectral, jac, table, comparisons, sinks, seconds)
