"""What a light result file keeps of a long vector: its ``k`` largest entries, exactly, and nothing else.

A field declared with :func:`lens_squash.core.codec.top_k` (``Trace.last_logits``: 49,152 numbers for
SmolLM2, most of a report's ``results.json``) is written by ``to_dict(heavy=False)`` as a
:class:`TopK`: the ``k`` largest values with their indices and the vector's length. It loads back as
that :class:`TopK`, never as a full-length vector padded with made-up values; ``to_dict()`` (heavy,
the default of ``save``) keeps the whole vector.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .display import compact_repr
from .results import Record

__all__ = ["TopK"]


@dataclass(frozen=True, eq=False)
class TopK(Record):
    """The ``k`` largest entries of a vector of ``size`` numbers, largest first (ties: lower index first)."""

    values: Float[Tensor, "k"]
    indices: Int[Tensor, "k"]
    #: the length of the whole vector
    size: int

    def __post_init__(self):
        if self.values.shape != self.indices.shape or self.values.ndim != 1:
            raise ValueError(f"values {tuple(self.values.shape)} and indices {tuple(self.indices.shape)} differ")
        if self.values.numel() and not (0 <= int(self.indices.min()) and int(self.indices.max()) < self.size):
            raise ValueError(f"an index lies outside the vector's {self.size} entries")

    @classmethod
    def of(cls, vector: Float[Tensor, "n"], k: int) -> TopK:
        """The top ``k`` of 1-D ``vector`` (all of it when shorter); NaN is refused, not ranked."""
        vector = vector.detach().cpu()
        if vector.is_floating_point() and bool(vector.isnan().any()):
            raise ValueError("a vector holding NaN has no top entries; check the values first")
        order = torch.sort(vector, descending=True, stable=True).indices[:k]
        return cls(vector[order].clone(), order, int(vector.shape[0]))

    __repr__ = compact_repr
