"""Shape aliases shared by every module, in TransformerLens's dimension names.

Kept in one place (as inseq does in ``utils/typing.py``) so that signatures across the package read
the same way: ``Float[Tensor, "layer head query_pos key_pos"]`` is an attention stack, and so on.
"""

from __future__ import annotations

from jaxtyping import Float, Int
from torch import Tensor

__all__ = [
    "HeadStack",
    "LayerMatrices",
    "PositionVector",
    "SquareMatrix",
    "TokenIds",
]

#: attention patterns of every layer and head, ``A^(l,h)[query, key]``
HeadStack = Float[Tensor, "layer head query_pos key_pos"]
#: one aggregated ``n×n`` matrix per layer (``A^(l)`` or ``Ā^(l)``)
LayerMatrices = Float[Tensor, "layer query_pos key_pos"]
SquareMatrix = Float[Tensor, "query_pos key_pos"]
PositionVector = Float[Tensor, "pos"]
TokenIds = Int[Tensor, "pos"]
