"""Massive activations: a first token whose residual norm dwarfs every other token's.

Sun et al. (2024) and Queipo-de-Llano, Arroyo, Barbero et al. ("Attention Sinks and Compression
Valleys in LLMs are Two Sides of the Same Coin") trace attention sinks and compression valleys to one
cause: in the middle layers the first token's residual vector grows a few huge coordinates. Measured
from residual norms ``[layer, pos]``: the first token's norm, its ratio to the median norm of the
*other* tokens, and the top-k dimensions of its residual vector. :func:`lens_squash.algebra.phases.massive_layers`
finds the layers where the ratio is massive; :mod:`lens_squash.experiments.ablation` clamps it.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..core.display import compact_repr
from ..core.results import Record

__all__ = ["MassiveActivations", "massive_activations"]

_F64 = torch.float64


@dataclass(frozen=True, eq=False)
class MassiveActivations(Record):
    """First-token residual norm per layer, its ratio to the other tokens' median, top dimensions."""

    first_norm: Float[Tensor, "layer"]
    median_other_norm: Float[Tensor, "layer"]
    ratio: Float[Tensor, "layer"]
    top_dims: Int[Tensor, "layer k"] | None = None
    top_values: Float[Tensor, "layer k"] | None = None

    __repr__ = compact_repr

    def _repr_html_(self) -> str:
        peak = int(self.ratio.argmax())
        dims = "" if self.top_dims is None else f"; top dims there: {self.top_dims[peak].tolist()}"
        return (
            f"<b>massive activations</b>: first-token norm ÷ median peaks at "
            f"{self.ratio[peak]:.1f}× in layer {peak}{html.escape(dims)}"
        )


def massive_activations(
    resid_norms: Float[Tensor, "layer pos"],
    first_resid: Float[Tensor, "layer d_model"] | None = None,
    *,
    k: int = 5,
) -> MassiveActivations:
    """First-token norm, ratio to the median norm of tokens 1 … n-1, and top-``k`` dimensions.

    ``top_dims`` are ranked by ``|value|``; ``top_values`` keep the sign.
    """
    resid_norms = torch.as_tensor(resid_norms).to(_F64)
    if resid_norms.ndim != 2 or resid_norms.shape[-1] < 2:
        raise ValueError(f"resid_norms must be [layer, pos] with pos ≥ 2, got {tuple(resid_norms.shape)}")
    first = resid_norms[:, 0]
    # quantile, not Tensor.median: for an even count the latter returns the lower middle value
    median = torch.quantile(resid_norms[:, 1:], 0.5, dim=-1)
    top_dims = top_values = None
    if first_resid is not None:
        first_resid = torch.as_tensor(first_resid).to(_F64)
        if first_resid.ndim != 2 or first_resid.shape[0] != resid_norms.shape[0]:
            raise ValueError(
                f"first_resid must be [layer, d_model] with the same layers as resid_norms "
                f"({resid_norms.shape[0]}), got {tuple(first_resid.shape)}"
            )
        top_dims = first_resid.abs().topk(min(k, first_resid.shape[-1]), dim=-1).indices
        top_values = first_resid.gather(-1, top_dims)
    return MassiveActivations(first, median, first / median, top_dims, top_values)
