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

from ..core import validate
from ..algebra.compare import Comparison, compare_variants
from ..core.display import compact_repr
from ..edge.jacobian import JacobianResult, jacobian
from ..algebra.paths import rollout_matrices
from ..algebra.sinks import SinkReport, sink_report_from_trace
from ..algebra.spectral import SpectralReport, analyze_stack
from ..core.support import UnsupportedModelError
from ..edge.trace import Trace, as_tokens, trace
from ..algebra.variants import VARIANTS, PathBound, path_bound

__all__ = ["DEFAULT_VARIANTS", "Analysis", "analyze"]

#: the paper's two variants beside the certified bound and the best norm-aware estimate
DEFAULT_VARIANTS = ("paper", "rollout", "certified", "value_rownorm")


@dataclass(frozen=True, eq=False)
class Analysis:
    """Everything ``analyze`` measured for one prompt."""

    trace: Trace
    bounds: dict[str, PathBound]
    #: ``None`` when the model's attention is not row-stochastic (learned sinks); see ``skipped``
    spectral: SpectralReport | None
    jacobian: JacobianResult | None
    table: pd.DataFrame | None
    comparisons: dict[str, Comparison]
    sinks: SinkReport
    seconds: dict[str, float] = field(default_factory=dict)
    #: default variants this model cannot support, with the reason each was skipped
    skipped: dict[str, str] = field(default_factory=dict)

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
        rows += [{"variant": name, "skipped": reason} for name, reason in self.skipped.items()]
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
            "spectral": None if self.spectral is None else self.spectral.to_dict(),
            "sinks": self.sinks.to_dict(),
            "seconds": self.seconds,
            "skipped": dict(self.skipped),
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


def _check_causal(model) -> None:
    cfg = getattr(model, "cfg", None)
    if getattr(cfg, "attention_dir", "causal") != "causal":
        raise UnsupportedModelError(
            f"this model's attention is {cfg.attention_dir!r}, not causal: the over-squashing analysis follows "
            "causal paths to the last token (Theorem B.5) and needs a decoder-only model"
        )


def _plan_variants(model, variants: Sequence[str] | None) -> tuple[tuple[str, ...], dict[str, str]]:
    """The variants to run and the default ones skipped (name → reason).

    Defaults (``variants=None``) skip what the model's architecture cannot support, so one variant
    never takes the analysis down; a variant asked for by name that cannot apply is an error, raised
    before any forward pass.
    """
    names = DEFAULT_VARIANTS if variants is None else _checked_variants(variants)
    certified = [name for name in names if name.startswith("certified")]
    reason = _certified_refusal(model) if certified else None
    if reason is None:
        return names, {}
    if variants is not None:
        raise UnsupportedModelError(f"variant {certified[0]!r} cannot apply to this model: {reason}")
    return tuple(name for name in names if name not in certified), dict.fromkeys(certified, reason)


def _checked_variants(variants: Sequence[str]) -> tuple[str, ...]:
    names = (variants,) if isinstance(variants, str) else tuple(variants)
    known = ", ".join(sorted(VARIANTS))
    if not names:
        raise ValueError(f"variants is empty; pass None for the defaults or some of {known}")
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(map(repr, unknown))}; choose from {known}")
    if len(set(names)) != len(names):
        raise ValueError(f"variants lists a name twice: {list(names)}")
    return names


def _certified_refusal(model) -> str | None:
    """Why the certified bound cannot model this architecture, or None when it can."""
    from ..edge.lipschitz import supports_certified

    try:
        supports_certified(model)
    except UnsupportedModelError as err:
        return str(err)
    return None


def _bounds(traced, model, names, target, seconds, skipped, *, explicit: bool) -> dict[str, PathBound]:
    bounds = {}
    for name in names:
        try:
            bounds[name] = _timed(seconds, f"bound_{name}", path_bound, traced, name, model=model, target=target)
        except UnsupportedModelError as err:
            if explicit:
                raise
            skipped[name] = str(err)
    return bounds


def _spectral(traced: Trace, skipped: dict[str, str]) -> SpectralReport | None:
    """Perron–Frobenius / Dobrushin analysis of the head-mean rollout stack, or None (reason in
    ``skipped``) when the rows are not stochastic by design.

    Lemmas B.6–B.7 and Prop. B.8 are about row-stochastic matrices. Rows that miss 1 by rounding (a
    16-bit model: the trace checked them against its dtype's tolerance) are analysed with that
    tolerance; rows that fall short of 1 by design (learned sinks take a share of every row) are not.
    """
    check = traced.metadata.get("attention_check", {})
    if check.get("substochastic"):
        skipped["spectral"] = (
            "the Perron–Frobenius analysis needs row-stochastic attention, and this model's learned "
            "attention sinks take a share of every row (use_attention_sinks); the path bounds still apply"
        )
        return None
    # the trace's head-mean patterns: no float64 copy of the whole [layer, head, n, n] stack
    stack = rollout_matrices(traced.mean_patterns.double())
    return analyze_stack(stack, atol=max(1e-4, float(check.get("tolerance", 0.0))))


def analyze(
    model,
    prompt,
    *,
    variants: Sequence[str] | None = None,
    jacobian_mode: str | None = "exact",
    n_probes: int = 64,
    chat: bool | None = None,
    target: int = -1,
) -> Analysis:
    """Trace ``prompt``, bound its last token's sensitivity with each variant, and check the bounds
    against the Jacobian (``jacobian_mode`` = ``"exact"``, ``"sketch"`` or ``None`` to skip).

    ``variants=None`` runs :data:`DEFAULT_VARIANTS` that the model supports and records the others in
    :attr:`Analysis.skipped` with the reason; naming a variant that cannot apply is an error.
    """
    seconds: dict[str, float] = {}
    tokens = as_tokens(model, prompt, chat=chat)  # checks the model, the prompt and chat first
    validate.check_target(target, tokens.shape[0])
    _check_causal(model)
    names, skipped = _plan_variants(model, variants)
    needs_weights = any(v.startswith("certified") for v in names)
    traced = _timed(seconds, "trace", trace, model, tokens, chat=chat, lipschitz=needs_weights, keep_resid=True)
    bounds = _bounds(traced, model, names, target, seconds, skipped, explicit=variants is not None)
    spectral = _timed(seconds, "spectral", _spectral, traced, skipped)
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
    return Analysis(traced, bounds, spectral, jac, table, comparisons, sinks, seconds, skipped)
