"""The whole over-squashing analysis of one prompt, in one call: ``analyze(model, prompt)``.

It chains the modules in their data-flow order (docs/ARCHITECTURE.md): one traced forward pass, the
path-sum bounds of the requested variants (§5, Theorem B.5 and the norm-aware extensions), the
Perron–Frobenius / Dobrushin analysis of the head-averaged rollout stack (Prop. B.8 and beyond), the
exact or sketched Jacobian norms, their comparison, and the sink / compression profile. The result
is a frozen :class:`Analysis` that renders in Jupyter, plots, and serialises to JSON.
"""

from __future__ import annotations

import html
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from ..algebra.attention_stream import AttentionSummary
from ..algebra.compare import Comparison, compare_variants
from ..algebra.sinks import SinkReport, sink_report
from ..algebra.spectral import SpectralReport, spectral_report
from ..algebra.variant_registry import DEFAULT_VARIANTS, check_variant_names, unsupported_reason, variants_needing
from ..algebra.variants import PathBound
from ..core import validate
from ..core.display import compact_repr
from ..core.results import Result
from ..core.stored import read_json
from ..core.support import UnsupportedModelError
from ..edge.finite import check_finite_values
from ..edge.jacobian import JacobianResult, jacobian
from ..edge.prompts import tokenize
from ..edge.stream import check_fits, stream_bounds
from ..edge.trace import Trace, trace
from .verdict import analysis_verdict

__all__ = ["DEFAULT_VARIANTS", "Analysis", "analyze"]


@dataclass(frozen=True, eq=False)
class Analysis(Result):
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
    def provenance(self) -> dict[str, Any]:
        """How the analysis was made: the trace's provenance (model, dtype, versions, attention check)."""
        return self.trace.provenance

    def __eq__(self, other: object) -> bool:
        """Equal by value: the same fields to the bit (``to_dict``), so ``Analysis.load(saved) == a``."""
        if not isinstance(other, Analysis):
            return NotImplemented
        return self is other or self.to_dict() == other.to_dict()

    __hash__ = None  # equal by value and holding tensors: not hashable

    @property
    def verdict(self) -> str:
        """One or two sentences from the numbers: how well the variants rank positions, which sit
        below the truth (a registered bound doing so is flagged as a violation), the best one."""
        return analysis_verdict(self)

    def show(self):
        """The whole report inline (in Jupyter: the returned page renders itself); ``.write(path)``
        saves it. Drawn by the figure registry's ``"page"`` kind."""
        return self.plot("page")

    def report(self, path: str | os.PathLike) -> Path:
        """Write the self-contained HTML report (verdict, figures, per-head attention) to ``path``."""
        return self.plot("page").write(path)

    @property
    def best_variant(self) -> str | None:
        """The variant whose profile ranks positions most like the Jacobian (Spearman)."""
        if not self.comparisons:
            return None
        return max(self.comparisons, key=lambda name: self.comparisons[name].spearman)

    def summary(self) -> pd.DataFrame:
        """One row per variant: its guarantee (``bound`` or ``proxy``), rank agreement, bound/true
        ratios, positions where the bound is below the Jacobian it is compared with, first-token
        share. ``certified`` bounds the *frozen* model's
        Jacobian, so positions below the exact Jacobian are not violations of its theorem (the
        tests and ``benchmarks/bound_quality.py`` check it against the frozen one)."""
        rows = []
        for name, bound in self.bounds.items():
            row = {"variant": name, "guarantee": bound.guarantee_kind, "first_token_share": bound.first_token_share}
            if name in self.comparisons:
                c = self.comparisons[name]
                row |= {
                    "spearman": c.spearman,
                    "kendall": c.kendall,
                    "top5_overlap": c.top5_overlap,
                    "ratio_min": c.ratio_min,
                    "ratio_median": c.ratio_median,
                    "below_truth": c.violations,
                }
            rows.append(row)
        rows += [{"variant": name, "skipped": reason} for name, reason in self.skipped.items()]
        return pd.DataFrame(rows)

    def to_frame(self) -> pd.DataFrame:
        """:meth:`summary`: one row per variant."""
        return self.summary()

    def _derived(self) -> dict[str, Any]:
        # what a reader of results.json looks for first; from_dict recomputes it
        return {
            "best_variant": self.best_variant,
            "str_tokens": list(self.trace.str_tokens),
            "predicted_token": self.trace.predicted_token,
        }

    @classmethod
    def load(cls, path: str | os.PathLike) -> Analysis:
        """An :class:`Analysis` from :meth:`save`'s file, or from the ``results.json`` that
        ``lens-squash analyze`` writes (``to_dict(heavy=False)`` plus the report's ``"metadata"``,
        which comes back as ``provenance["report"]``). A report's file leaves out the heavy tensors
        (attention patterns, residual streams): ``provenance["dropped"]`` of each part lists them."""
        data = read_json(path)  # errors name the file
        report = data.pop("metadata", None) if isinstance(data, dict) else None
        stored = data.get("trace") if isinstance(data, dict) else None
        if report is not None and isinstance(stored, dict) and isinstance(stored.get("provenance"), dict):
            # into the trace's provenance before it is built: provenance is never written after
            stored["provenance"] = {"report": report, **stored["provenance"]}
        return cls.from_dict(data, source=path)

    __repr__ = compact_repr

    def _repr_html_(self) -> str:
        head = (
            f"<p><b>Verdict.</b> {html.escape(self.verdict)}</p>"
            f"<b>lens_squash Analysis</b>: {self.trace.n_tokens} tokens, "
            f"predicted {html.escape(repr(self.trace.predicted_token))}"
        )
        if self.best_variant:
            head += f"; best-ranking variant: <code>{html.escape(self.best_variant)}</code>"
        from ..core.tokens import sensitivity_html  # the prompt coloured by the true sensitivity

        truth = [c for c in (() if self.table is None else self.table.columns) if str(c).startswith("jacobian_")]
        coloured = (
            ""
            if not truth
            else sensitivity_html(
                self.trace.str_tokens,
                self.table[truth[0]].tolist(),
                label=f"Jacobian norm ({truth[0].removeprefix('jacobian_')})",
            )
        )
        table = self.summary().to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-")
        return head + coloured + table


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
    names = DEFAULT_VARIANTS if variants is None else check_variant_names(variants)
    reasons = {name: unsupported_reason(name, model) for name in names}
    refused = {name: reason for name, reason in reasons.items() if reason is not None}
    if not refused:
        return names, {}
    if variants is not None:
        name, reason = next(iter(refused.items()))
        raise UnsupportedModelError(f"variant {name!r} cannot apply to this model: {reason}")
    return tuple(name for name in names if name not in refused), refused


def _spectral(traced: Trace, summary: AttentionSummary, skipped: dict[str, str]) -> SpectralReport | None:
    """Perron–Frobenius / Dobrushin analysis of the head-mean rollout stack, from the per-layer
    summary, or None (reason in ``skipped``) when the rows are not stochastic by design.

    Lemmas B.6–B.7 and Prop. B.8 are about row-stochastic matrices. Rows that miss 1 by rounding (a
    16-bit model: the trace checked them against its dtype's tolerance) are analysed with that
    tolerance; rows that fall short of 1 by design (learned sinks take a share of every row) are not.
    """
    if traced.attention_check is not None and traced.attention_check.substochastic:
        skipped["spectral"] = (
            "the Perron–Frobenius analysis needs row-stochastic attention, and this model's learned "
            "attention sinks take a share of every row (use_attention_sinks); the path bounds still apply"
        )
        return None
    if summary.spectral is None:
        raise ValueError(summary.spectral_error or "the trace's attention summary took no spectral summary")
    return spectral_report(summary.spectral)


def _sinks(traced: Trace, summary: AttentionSummary) -> SinkReport:
    return sink_report(
        summary,
        traced.resid_norms,
        representations=traced.resid,
        first_resid=traced.first_token_resid,
        provenance={**traced.provenance, "str_tokens": list(traced.str_tokens)},
    )


def analyze(
    model,
    prompt,
    *,
    variants: Sequence[str] | None = None,
    jacobian_mode: str | None = "exact",
    n_probes: int = 64,
    chat: bool | None = None,
    target_pos: int = -1,
    keep_patterns: bool | None = None,
) -> Analysis:
    """Trace ``prompt``, bound its last token's sensitivity with each variant, and check the bounds
    against the Jacobian (``jacobian_mode`` = ``"exact"``, ``"sketch"`` or ``None`` to skip).

    ``variants=None`` runs :data:`DEFAULT_VARIANTS` that the model supports and records the others in
    :attr:`Analysis.skipped` with the reason; naming a variant that cannot apply is an error.

    ``keep_patterns`` (see :func:`lens_squash.edge.trace.trace`): by default per-head patterns are
    kept while they fit in ``KEEP_PATTERNS_BYTES`` (SmolLM2: n ≤ 704); longer prompts stream them,
    so memory grows as ``L·n·d + H·n²``, and their bounds have rows but no flows or paths. Both run
    the same per-layer code, so every number is the same either way. A prompt
    whose estimate exceeds the free memory is refused first, with the longest that fits.
    """
    seconds: dict[str, float] = {}
    # one Tokens value (ids, strings, the chat template as applied), checked before any forward pass and
    # passed down as it is: the trace and the Jacobian read the same tokens without converting again
    tokens = tokenize(model, prompt, chat=chat)
    n_tokens = int(tokens.ids.shape[0])
    validate.check_target(target_pos, n_tokens)
    _check_causal(model)
    names, skipped = _plan_variants(model, variants)
    check_fits(model, n_tokens, keep_patterns=keep_patterns)
    needs_weights = variants_needing(names, "mlp_gains")
    traced = _timed(
        seconds,
        "trace",
        trace,
        model,
        tokens,
        chat=tokens.chat,
        lipschitz=needs_weights,
        keep_resid=True,
        keep_patterns=keep_patterns,
    )
    explicit = variants is not None  # a variant asked for by name that cannot apply is an error
    bounds = _timed(
        seconds,
        "bounds",
        stream_bounds,
        model,
        traced,
        names,
        target_pos=target_pos,
        skipped=None if explicit else skipped,
    )
    # every other per-layer quantity from one summary: taken during a streamed pass, or the stored layers fed in now
    summary = _timed(seconds, "attention_summary", traced.attention_summary)
    spectral = _timed(seconds, "spectral", _spectral, traced, summary, skipped)
    sinks = _timed(seconds, "sinks", _sinks, traced, summary)
    jac, table, comparisons = None, None, {}
    if jacobian_mode is not None:
        jac = _timed(
            seconds,
            f"jacobian_{jacobian_mode}",
            jacobian,
            model,
            tokens,
            mode=jacobian_mode,
            n_probes=n_probes,
            target_pos=target_pos,
        )
        # exact probes give spectral norms (the frozen mode's are what the certified bound covers)
        truth = jac.spectral if jacobian_mode in ("exact", "frozen") else jac.frobenius
        n = truth.shape[0]
        table, comparisons = compare_variants(
            {name: bound.bound[:n] for name, bound in bounds.items()},
            truth,
            str_tokens=traced.str_tokens[:n],
            truth_name="spectral" if jacobian_mode in ("exact", "frozen") else "frobenius",
        )
    reported = {f"the {name} bound": bound.bound for name, bound in bounds.items()}
    check_finite_values(
        reported | {"the Jacobian norms": None if jac is None else truth}, model.cfg.dtype, what="the analysis"
    )
    return Analysis(traced, bounds, spectral, jac, table, comparisons, sinks, seconds, skipped)
