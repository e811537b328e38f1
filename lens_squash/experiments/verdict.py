"""The verdict an analysis opens with: one or two sentences computed from its numbers.

A reader of a report should not have to read a table to learn the answer. :func:`verdict` states,
from the per-variant :class:`~lens_squash.algebra.compare.Comparison` against the Jacobian, how well
the variants rank positions (Spearman range, top-5 overlap), which of them sit below the truth and
what that means, and which ranks best. The wording follows each variant's registered guarantee
(:mod:`lens_squash.algebra.variant_registry`): a ``proxy`` is never called a bound, and a ``bound``
that sits below the truth anywhere is flagged as a violation, first and loudly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["VIOLATION_MARK", "analysis_verdict", "rank_quality", "verdict"]

#: how a violated bound opens the verdict (searchable in reports and logs)
VIOLATION_MARK = "⚠ VIOLATION"

#: Spearman thresholds for the wording of the ranking sentence (at least: word)
_QUALITY = ((0.8, "well"), (0.5, "moderately"), (-math.inf, "poorly"))


def rank_quality(spearman: float) -> str:
    """``well`` / ``moderately`` / ``poorly`` for a Spearman ρ (``unmeasurable`` for NaN)."""
    if math.isnan(spearman):
        return "unmeasurably (a constant curve)"
    return next(word for floor, word in _QUALITY if spearman >= floor)


def _names(names: Sequence[str]) -> str:
    quoted = [f"`{n}`" for n in names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} and {quoted[-1]}"


def _range(values: Sequence[float], fmt: str) -> str:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return "n/a"
    lo, hi = min(finite), max(finite)
    return format(lo, fmt) if format(lo, fmt) == format(hi, fmt) else f"{format(lo, fmt)}–{format(hi, fmt)}"


def _ranking(comparisons: Mapping[str, Any], truth: str) -> str:
    rhos = [float(c.spearman) for c in comparisons.values()]
    overlaps = [round(5 * float(c.top5_overlap)) for c in comparisons.values()]
    finite = [r for r in rhos if not math.isnan(r)]
    quality = rank_quality(max(finite) if finite else math.nan)
    lo, hi = min(overlaps), max(overlaps)
    overlap = f"{lo}/5" if lo == hi else f"{lo}/5–{hi}/5"
    return f"The variants rank positions {quality} here (Spearman {_range(rhos, '.2f')}, top-5 overlap {overlap} with the {truth})"


def _below(
    comparisons: Mapping[str, Any], guarantees: Mapping[str, str], n: int | None, *, covered: bool = True
) -> list[str]:
    """The violation sentence first (bounds below the truth they cover), then the proxies below it.

    ``covered=False``: the truth is not the quantity the bounds promise to cover (the certified bound
    is a theorem about the *frozen* model's spectral norm; the full model's Jacobian, or a Frobenius
    estimate, is another quantity), so a bound below it is reported plainly, not as a violation."""
    out = []
    of = f" of {n}" if n else ""
    for name, c in comparisons.items():
        if guarantees.get(name) == "bound" and c.violations > 0 and covered:
            out.append(
                f"{VIOLATION_MARK}: `{name}` is registered as a bound but sits below the truth at "
                f"{c.violations}{of} positions (smallest bound/truth ratio {c.ratio_min:.3g})"
            )
        elif guarantees.get(name) == "bound" and c.violations > 0:
            out.append(
                f"`{name}` bounds the frozen model's spectral norm, not this truth, and sits below it at "
                f"{c.violations}{of} positions (no violation: compare with jacobian_mode='frozen' to check the theorem)"
            )
    proxies = [n_ for n_, c in comparisons.items() if guarantees.get(n_) != "bound" and c.violations > 0]
    if proxies:
        verb = "sits" if len(proxies) == 1 else "sit"
        out.append(
            f"{_names(proxies)} {verb} below the truth, so {'it is a proxy' if len(proxies) == 1 else 'they are proxies'}, not {'a bound' if len(proxies) == 1 else 'bounds'}"
        )
    held = [n_ for n_, c in comparisons.items() if guarantees.get(n_) == "bound" and c.violations == 0]
    if held:
        out.append(
            f"{_names(held)} stay{'s' if len(held) == 1 else ''} above the truth at every position, as a bound must"
        )
    return out


def verdict(
    comparisons: Mapping[str, Any],
    guarantees: Mapping[str, str],
    *,
    truth: str = "Jacobian",
    n_positions: int | None = None,
    best: str | None = None,
    covered: bool = True,
) -> str:
    """One or two sentences from the comparisons (objects with ``spearman``, ``top5_overlap`` as a
    fraction, ``violations`` and ``ratio_min``) and each variant's guarantee (``"bound"`` or
    ``"proxy"``); ``best`` defaults to the highest Spearman; ``covered``: whether the truth is the
    quantity the bounds promise to cover (see :func:`_below`). Empty comparisons: says so."""
    if not comparisons:
        return "No Jacobian was computed, so no variant was checked against the truth; the profiles are unverified."
    unknown = sorted(set(comparisons) - set(guarantees))
    if unknown:
        raise ValueError(f"no guarantee given for {unknown}: every compared variant needs 'bound' or 'proxy'")
    first = _ranking(comparisons, truth)
    below = _below(comparisons, guarantees, n_positions, covered=covered)
    violations = [s for s in below if s.startswith(VIOLATION_MARK)]
    rest = [s for s in below if not s.startswith(VIOLATION_MARK)]
    if best is None:
        best = max(
            comparisons, key=lambda k: -math.inf if math.isnan(comparisons[k].spearman) else comparisons[k].spearman
        )
    c = comparisons[best]
    kind = "bound" if guarantees[best] == "bound" else "proxy"
    tail = f"the best ranking is the {kind} `{best}` (Spearman {c.spearman:.2f}, top-5 overlap {round(5 * c.top5_overlap)}/5)"
    sentences = [f"{s}." for s in violations] + [f"{'; '.join([first, *rest, tail])}."]
    return " ".join(sentences)


def analysis_verdict(analysis: Any) -> str:
    """:func:`verdict` for an ``Analysis`` (read by duck typing): guarantees from each bound's
    registered kind, the truth named by its mode (a sketch is an estimate, and says so)."""
    comparisons = dict(getattr(analysis, "comparisons", {}) or {})
    guarantees = {name: bound.guarantee_kind for name, bound in analysis.bounds.items() if name in comparisons}
    jac = getattr(analysis, "jacobian", None)
    mode = getattr(jac, "mode", None)
    truth = {
        "exact": "exact Jacobian ‖∂yₙ/∂vᵢ‖₂",
        "sketch": "sketched Jacobian ‖∂yₙ/∂vᵢ‖_F (an estimate)",
        "frozen": "frozen-model Jacobian ‖∂yₙ/∂vᵢ‖₂",
    }.get(mode, "Jacobian")
    n = None if getattr(analysis, "table", None) is None else len(analysis.table)
    best = getattr(analysis, "best_variant", None)
    # the certified theorem covers the frozen model's spectral norms, which only the frozen mode measures
    return verdict(comparisons, guarantees, truth=truth, n_positions=n, best=best, covered=mode == "frozen")
