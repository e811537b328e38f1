"""Two analyses side by side: ``compare(a, b)`` for two prompts, or one prompt in two dtypes.

Positions are aligned from the end — the target (the last token) with the target — so two prompts
of different lengths line up where the question is asked, and two dtypes of one prompt line up
token for token. The result keeps, for each side, the tokens, the truth (the Jacobian profile it
was compared with), every common variant's profile and the sink curve (mean attention to the first
token per layer); :meth:`RunComparison.summary` gives each variant's Spearman on both sides, and
``.plot()`` draws the curves side by side (:mod:`lens_squash.views.compare_figures`).
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from ..core.display import compact_repr
from ..core.results import Result

__all__ = ["RunComparison", "compare"]


@dataclass(frozen=True, eq=False)
class RunComparison(Result):
    """Two analyses, aligned from their last token (see the module docstring)."""

    labels: tuple[str, str]
    tokens_a: tuple[str, ...]
    tokens_b: tuple[str, ...]
    #: the truth each side was compared with (``None`` without a Jacobian)
    truth_a: Float[Tensor, "pos_a"] | None
    truth_b: Float[Tensor, "pos_b"] | None
    bounds_a: dict[str, Tensor]
    bounds_b: dict[str, Tensor]
    #: mean attention to the first token per layer (the sink curve)
    sinks_a: Float[Tensor, "layer"]
    sinks_b: Float[Tensor, "layer"]
    spearman_a: dict[str, float]
    spearman_b: dict[str, float]
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def same_tokens(self) -> bool:
        """Whether both sides read the same tokens (two dtypes or settings of one prompt)."""
        return self.tokens_a == self.tokens_b

    @property
    def aligned(self) -> int:
        """How many positions both sides have, counted back from the target."""
        return min(len(self.tokens_a), len(self.tokens_b))

    def summary(self) -> pd.DataFrame:
        """One row per common variant: Spearman against the truth on each side and the change."""
        a, b = self.labels
        rows = [
            {
                "variant": name,
                f"spearman {a}": self.spearman_a.get(name, float("nan")),
                f"spearman {b}": self.spearman_b.get(name, float("nan")),
                "change": self.spearman_b.get(name, float("nan")) - self.spearman_a.get(name, float("nan")),
            }
            for name in self.bounds_a
        ]
        return pd.DataFrame(rows)

    def to_frame(self) -> pd.DataFrame:
        return self.summary()

    __repr__ = compact_repr

    def _repr_html_(self) -> str:
        a, b = (html.escape(x) for x in self.labels)
        what = "the same tokens" if self.same_tokens else f"{len(self.tokens_a)} and {len(self.tokens_b)} tokens"
        head = f"<b>RunComparison</b> {a} vs {b}: {what}, {self.aligned} positions aligned from the last"
        return head + self.summary().to_html(index=False, float_format=lambda v: f"{v:.3f}", na_rep="-")


def _truth(analysis) -> Tensor | None:
    table = analysis.table
    column = next((c for c in (() if table is None else table.columns) if str(c).startswith("jacobian_")), None)
    return None if column is None else torch.tensor(table[column].to_numpy(dtype=float))


def _label(analysis) -> str:
    provenance = analysis.provenance
    return str(provenance.get("dtype") or provenance.get("model", {}).get("dtype", "")) or "run"


def compare(a, b, *, labels: tuple[str, str] | None = None) -> RunComparison:
    """Compare two :class:`~lens_squash.experiments.analysis.Analysis` (two prompts, or one prompt in two
    dtypes). ``labels`` name the sides (default: the dtypes when they differ, else ``"a"``, ``"b"``).
    Only the variants both analyses computed are compared; none in common is an error."""
    common = [name for name in a.bounds if name in b.bounds]
    if not common:
        raise ValueError(
            f"the analyses share no variant ({sorted(a.bounds)} vs {sorted(b.bounds)}); run both with the same variants"
        )
    if labels is None:
        guessed = (_label(a), _label(b))
        labels = guessed if guessed[0] != guessed[1] else ("a", "b")
    if len(labels) != 2 or labels[0] == labels[1]:
        raise ValueError(f"labels must be two different names, got {labels!r}")
    n_a, n_b = a.trace.n_tokens, b.trace.n_tokens
    return RunComparison(
        labels=(str(labels[0]), str(labels[1])),
        tokens_a=tuple(a.trace.str_tokens),
        tokens_b=tuple(b.trace.str_tokens),
        truth_a=_truth(a),
        truth_b=_truth(b),
        bounds_a={name: a.bounds[name].bound[:n_a].double() for name in common},
        bounds_b={name: b.bounds[name].bound[:n_b].double() for name in common},
        sinks_a=a.sinks.mean_first_token_attention.double(),
        sinks_b=b.sinks.mean_first_token_attention.double(),
        spearman_a={name: float(a.comparisons[name].spearman) for name in common if name in a.comparisons},
        spearman_b={name: float(b.comparisons[name].spearman) for name in common if name in b.comparisons},
        provenance={"a": dict(a.provenance), "b": dict(b.provenance)},
    )
