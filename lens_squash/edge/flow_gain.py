"""The value-edge inputs the flow reads from weights: ln1's effective gain (checked) and the head grouping.

The value-edge norms use ``γ``, the gain ``ln1`` multiplies its normalised input by. Where the stored
weight is that gain depends on the backend and family (a bridge over Gemma keeps HF's ``w`` with an
effective gain ``1 + w``), so the gain is not taken on trust: :func:`ln1_gain` runs ``ln1`` on the
layer's input once and checks that its output is ``x̂ ⊙ γ + b``. A gain it cannot confirm is refused.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..core.support import UnsupportedModelError

__all__ = ["head_groups", "ln1_gain"]


def head_groups(n_heads: int, value_heads: int) -> Int[Tensor, "head"]:
    """For each query head the value head it reads (grouped-query attention: consecutive query heads
    share one, as TransformerLens and ``transformers`` both expand)."""
    if value_heads < 1 or n_heads % value_heads:
        raise UnsupportedModelError(f"{value_heads} value heads do not divide the {n_heads} query heads")
    return torch.arange(n_heads) // (n_heads // value_heads)


def _stated_gain(norm) -> Tensor | None:
    gain = getattr(norm, "w", None)
    if gain is None:
        return None
    gain = gain.detach().double()
    # TransformerLens 4's bridge norms say when the weight is stored as an offset from 1 (Gemma)
    return 1.0 + gain if getattr(norm, "uses_weight_offset", False) else gain


def ln1_gain(
    model,
    layer: int,
    resid: Float[Tensor, "pos d_model"],
    scale: Float[Tensor, "pos"] | None,
    *,
    centred: bool,
) -> Float[Tensor, "d_model"] | None:
    """Block ``layer``'s ln1 gain ``γ`` (``None``: no gain, or no norm), after checking on ``resid`` that
    ``ln1(x) = x̂ ⊙ γ + b`` to float32 resolution; ``UnsupportedModelError`` when it is not."""
    if scale is None:
        return None
    norm = model.blocks[layer].ln1
    gain = _stated_gain(norm)
    with torch.no_grad():
        out = norm(resid[None].to(model.cfg.dtype))[0].double()
    x = resid.double()
    xhat = (x - x.mean(-1, keepdim=True) if centred else x) / scale.double()[:, None]
    bias = getattr(norm, "b", None)
    expected = xhat if gain is None else xhat * gain.to(xhat.device)
    if bias is not None:
        expected = expected + bias.detach().double().to(xhat.device)
    gap = float((out - expected).abs().max())
    if gap > 1e-4 * max(float(out.abs().max()), 1e-30):
        raise UnsupportedModelError(
            f"block {layer}'s ln1 output is not x̂ ⊙ w + b with its stored weights (off by {gap:.3g}): the flow "
            "cannot read this norm's effective gain; use jacobian(model, prompt) instead"
        )
    return None if gain is None else gain.to(resid.device)
