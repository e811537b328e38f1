"""What a bridge's attention writes, recomputed from the facts the certified bound reads (see
:func:`lens_squash.edge.adapter_probe.probe_bridge`, which compares it with what the module returned).

The certified bound models attention as ``Σ_h A_h (u W_V^h + b_V^h) W_O^h`` plus a constant: the
pattern ``A`` from ``hook_pattern``, ``W_V``/``W_O`` as the bridge exposes them. An architecture whose
attention writes something else (a latent or low-rank value path, an output multiplier, a gate on the
heads) fails the comparison and the bound is refused, even for families nobody listed.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from ..algebra.blocks import INSTEAD
from ..core.support import UnsupportedModelError

#: the probe's tolerance (:mod:`lens_squash.edge.adapter_probe`): 1e-4 relative, or 20 eps of the model's dtype
_RTOL = 1e-4

__all__ = ["attention_write", "check_attention", "positionwise_spread", "readable"]


def readable(module, name: str) -> bool:
    """Whether ``module.name`` reads as a tensor: TransformerLens raises ``NotImplementedError`` for ``W_V``
    on multi-head latent attention (DeepSeek-V2/V3), which ``hasattr`` does not catch."""
    try:
        return isinstance(getattr(module, name), Tensor)
    except (AttributeError, NotImplementedError, RuntimeError):
        return False


def _per_head(weight: Tensor, n_heads: int) -> Tensor:
    # GQA: one matrix per key/value head, read by n_heads / n_kv consecutive query heads
    return weight if weight.shape[0] == n_heads else weight.repeat_interleave(n_heads // weight.shape[0], dim=0)


def attention_write(
    u: Float[Tensor, "batch pos d_model"],
    pattern: Float[Tensor, "batch head query key"],
    w_v: Float[Tensor, "head_or_kv d_model d_head"],
    b_v: Float[Tensor, "head_or_kv d_head"] | None,
    w_o: Float[Tensor, "head d_head d_model"],
    clip: float | None,
) -> Float[Tensor, "batch pos d_model"]:
    """``Σ_h A_h (u W_V^h + b_V^h) W_O^h`` in float64, values clamped to ``±clip`` where the model clamps them."""
    n_heads = pattern.shape[1]
    u = u.double()
    v = torch.einsum("bpd,hde->bhpe", u, _per_head(w_v.detach().double(), n_heads))
    if b_v is not None:
        v = v + _per_head(b_v.detach().double(), n_heads)[None, :, None, :]
    if clip is not None:
        v = v.clamp(-clip, clip)
    z = pattern.double() @ v
    return torch.einsum("bhqe,hed->bqd", z, w_o.detach().double())


def positionwise_spread(residual: Float[Tensor, "batch pos d_model"]) -> float:
    """How far ``residual`` is from one vector repeated at every position (an output bias ``b_O``, or
    ``b_V W_O`` under rows that sum to 1): the part no constant explains."""
    residual = residual.double()
    return float((residual - residual.mean(-2, keepdim=True)).norm())


def check_attention(block, u: Tensor, written: Tensor, pattern: Tensor, clip: float | None) -> None:
    """Refuse unless what ``block``'s attention wrote is :func:`attention_write` plus one constant vector."""
    attn = block.attn
    b_v = attn.b_V if readable(attn, "b_V") else None
    try:
        predicted = attention_write(u, pattern, attn.W_V, b_v, attn.W_O, clip)
        spread = positionwise_spread(written.double().reshape(predicted.shape) - predicted)
    except RuntimeError:  # shapes that do not line up (a sink column in the pattern, a fused layout)
        spread = float("inf")
    rtol = max(_RTOL, 20 * torch.finfo(written.dtype).eps)
    if not spread <= rtol * max(float(written.double().norm()), 1e-30):
        raise UnsupportedModelError(
            f"the attention of {type(block).__name__} does not write Σ_h A_h x W_V W_O from its pattern and the "
            f"W_V / W_O it exposes (an output multiplier, a gate or a latent value path); {INSTEAD}"
        )
