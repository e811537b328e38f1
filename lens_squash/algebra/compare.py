"""Bound versus truth: how well a path-sum profile tracks the exact Jacobian norms across positions.

For each variant the question is the paper's (§5): does the bound say where the last token's
sensitivity lives? The measures are rank agreement (Spearman, Kendall τ-b, top-k overlap), the
bound/true ratio (min, median, max), violations (positions where a *guaranteed* bound falls below the
truth, which must never happen), and the U-shape statistic (first and last deciles of positions
against the middle), the shape the exact Jacobian shows on real prompts (DESIGN §9).
"""

from __future__ import annotations

import html
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, field

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from ..core.display import compact_repr
from ..core.results import Record, Result
from .ranks import kendall, spearman, top_k_overlap

__all__ = ["Comparison", "UShape", "compare", "compare_variants", "u_shape"]


@dataclass(frozen=True)
class UShape(Record):
    """Mean of the first and last deciles of positions against the middle (deciles 2–9)."""

    first: float
    middle: float
    last: float

    __repr__ = compact_repr

    @property
    def first_over_middle(self) -> float:
        return self.first / self.middle if self.middle > 0 else float("inf")

    @property
    def last_over_middle(self) -> float:
        return self.last / self.middle if self.middle > 0 else float("inf")


def u_shape(values: Float[Tensor, "pos"]) -> UShape:
    """Decile means of a per-position profile (at least one position per decile band)."""
    values = torch.as_tensor(values, dtype=torch.float64)
    n = values.numel()
    if n < 3:
        raise ValueError(f"a U-shape needs at least 3 positions, got {n}")
    edge = max(1, round(n / 10))
    return UShape(
        first=float(values[:edge].mean()),
        middle=float(values[edge : n - edge].mean()),
        last=float(values[n - edge :].mean()),
    )


@dataclass(frozen=True)
class Comparison(Result):
    """How one variant's profile compares with the exact Jacobian norms over positions."""

    variant: str
    truth: str
    spearman: float
    kendall: float
    top5_overlap: float
    ratio_min: float
    ratio_median: float
    ratio_max: float
    violations: int
    guaranteed: bool
    bound_u: UShape
    truth_u: UShape
    provenance: dict = field(default_factory=dict, compare=False)

    __repr__ = compact_repr

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td>{html.escape(k)}</td><td>{v:.4g}</td></tr>"
            if isinstance(v, float)
            else f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>"
            for k, v in asdict(self).items()
            if not isinstance(v, dict)
        )
        return f"<b>Comparison</b><table>{rows}</table>"


def compare(
    bound: Float[Tensor, "pos"],
    truth: Float[Tensor, "pos"],
    *,
    variant: str = "bound",
    truth_name: str = "spectral",
    guaranteed: bool = False,
    rtol: float = 1e-6,
) -> Comparison:
    """Compare a bound profile with the true per-position sensitivities.

    A violation is a position where ``bound < truth · (1 − rtol)``; ``rtol`` absorbs floating-point
    rounding of the two computations, nothing else.
    """
    bound = torch.as_tensor(bound, dtype=torch.float64)
    truth = torch.as_tensor(truth, dtype=torch.float64)
    if bound.shape != truth.shape:
        raise ValueError(
            f"bound and truth must cover the same positions, got {tuple(bound.shape)} and {tuple(truth.shape)}"
        )
    ratio = bound / truth.clamp_min(torch.finfo(torch.float64).tiny)
    return Comparison(
        variant=variant,
        truth=truth_name,
        spearman=spearman(bound, truth),
        kendall=kendall(bound, truth),
        top5_overlap=top_k_overlap(bound, truth, k=5),
        ratio_min=float(ratio.min()),
        ratio_median=float(ratio.median()),
        ratio_max=float(ratio.max()),
        violations=int((bound < truth * (1 - rtol)).sum()),
        guaranteed=guaranteed,
        bound_u=u_shape(bound),
        truth_u=u_shape(truth),
    )


def compare_variants(
    bounds: Mapping[str, object],
    truth: Float[Tensor, "pos"],
    *,
    str_tokens: tuple[str, ...] | None = None,
    truth_name: str = "spectral",
    guaranteed: Collection[str] = (),
) -> tuple[pd.DataFrame, dict[str, Comparison]]:
    """Per-position table (token, truth, each variant's bound) and one :class:`Comparison` per variant.

    ``bounds`` maps a name to a :class:`~lens_squash.algebra.variants.PathBound` or a plain tensor.
    ``guaranteed`` names the variants that are proven upper bounds *of this truth* (``certified``
    bounds the frozen Jacobian, not the exact one); only their violations are errors.
    """
    truth = torch.as_tensor(truth, dtype=torch.float64)
    table = {"position": range(truth.numel())}
    if str_tokens is not None:
        table["token"] = list(str_tokens)
    table[f"jacobian_{truth_name}"] = truth.tolist()
    summaries = {}
    for name, bound in bounds.items():
        values = getattr(bound, "bound", bound)
        table[name] = torch.as_tensor(values, dtype=torch.float64).tolist()
        summaries[name] = compare(values, truth, variant=name, truth_name=truth_name, guaranteed=name in guaranteed)
    return pd.DataFrame(table), summaries
