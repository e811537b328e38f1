"""What a trace's attention patterns were checked against: a typed record, filled once at the edge.

``trace`` scans every layer's patterns as they pass (or the stored stack once) and records, with the
dtype they were computed in, the row-sum tolerance of that dtype and whether rows may fall short of 1
by design (learned attention sinks, a fact of the model: ``ModelFacts.sinks``). Everything downstream
(every variant's graph, the spectral analysis) reads this record instead of scanning the
``[layer, head, pos, pos]`` stack again, and never the trace's provenance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.codec import dtype_named
from ..core.display import compact_repr
from ..core.results import Record
from .attention import check_attention, pattern_tolerance
from .spectral import rollout_tolerance

__all__ = ["AttentionCheck", "spectral_atol"]


def spectral_atol(dtype: torch.dtype, n_keys: int, *, substochastic: bool) -> float | None:
    """The row-sum tolerance the spectral analysis gets for patterns computed in ``dtype``, or
    ``None`` when rows fall short of 1 by design (Perron–Frobenius needs stochastic rows)."""
    return None if substochastic else rollout_tolerance(pattern_tolerance(dtype, n_keys))


@dataclass(frozen=True, eq=False)
class AttentionCheck(Record):
    """The patterns' defects (:func:`~lens_squash.algebra.attention.attention_defects`), the dtype they
    were computed in, its tolerance, and whether rows may sum to less than 1 (learned sinks)."""

    dtype: str
    n_keys: int
    tolerance: float
    substochastic: bool
    defects: dict[str, float]

    __repr__ = compact_repr

    @classmethod
    def of(cls, dtype: torch.dtype, n_keys: int, defects: dict[str, float], *, substochastic: bool) -> AttentionCheck:
        """The check of patterns computed in ``dtype`` over ``n_keys`` keys with these defects."""
        name = str(dtype).removeprefix("torch.")
        tolerance = pattern_tolerance(dtype, n_keys)
        return cls(name, int(n_keys), tolerance, bool(substochastic), dict(defects))

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtype_named(self.dtype)

    @property
    def tolerated_row_deviation(self) -> float | None:
        """The rows' largest deviation from 1 when it is within the tolerance (else ``None``)."""
        deviation = self.defects.get("row_deviation", float("nan"))
        return deviation if deviation <= self.tolerance else None

    @property
    def spectral_atol(self) -> float | None:
        """:func:`spectral_atol` of these patterns."""
        return None if self.substochastic else rollout_tolerance(self.tolerance)

    def verify(self, patterns: Tensor | None) -> None:
        """Refuse patterns that are not causal attention within the tolerance (from the recorded
        defects: no scan of ``patterns``, which may be ``None`` for a trace that streamed them)."""
        check_attention(
            patterns,
            defects=self.defects,
            atol=self.tolerance,
            dtype=self.torch_dtype,
            substochastic=self.substochastic,
            n_keys=self.n_keys,
        )

    def summary(self) -> dict[str, object]:
        """What provenance shows of the check (a copy for a reader of results.json; never read back)."""
        return {
            "dtype": self.dtype,
            "tolerance": self.tolerance,
            "substochastic": self.substochastic,
            "tolerated_row_deviation": self.tolerated_row_deviation,
        }
