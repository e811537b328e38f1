"""The value-edge geometry of the sensitivity flow, and each bound's rows layer by layer (pure tensors).

With ``x̂_k`` the normalised input of ``ln1`` and ``s_k`` its scale, the value edge ``(h, j←k)`` for
probe ``r`` is ``(A_jk/s_k)(z − x̂_k (x̂_k·z)/d)`` with ``z = P(γ ⊙ W_V^h ∂z^h_{rj})`` (``P`` the centring
for LayerNorm, ``I`` for RMSNorm). Its squared norm is ::

    (A_jk² / s_k²) · [ ∂zᵀ G^h ∂z − (2/d − ‖x̂_k‖²/d²) (ṽ^h_k · ∂z)² ],
    G^h = W_V^hᵀ diag(γ) P diag(γ) W_V^h,    ṽ^h_k = W_V^hᵀ (γ ⊙ x̂_k),

so the first (frozen-scale) term factorises into ``A_jk / s_k`` times a per-(head, j) norm, and the
projection term needs only ``d_head``-long dot products (:mod:`lens_squash.edge.flow`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from ..core.display import compact_repr
from ..core.results import Record

__all__ = ["ValueGeometry", "bound_layer_rows", "edge_norms", "edge_terms", "head_value_parts", "value_geometry"]


# --------------------------------------------------------------------------------------------------
# the value-edge geometry (pure tensor functions)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ValueGeometry(Record):
    """What the value-edge norms need from one layer's norm and value weights (float64).

    ``gram`` is ``G^h = W_V^hᵀ diag(γ) P diag(γ) W_V^h``; ``vtilde`` is ``ṽ^h_k = W_V^hᵀ (γ ⊙ x̂_k)``;
    ``inv_scale`` is ``1/s_k``; ``coef`` is the projection term's ``2/d − ‖x̂_k‖²/d²`` (0 when the scale
    is frozen or there is no norm).
    """

    gram: Float[Tensor, "head d_head d_head"]
    vtilde: Float[Tensor, "key_pos head d_head"]
    inv_scale: Float[Tensor, "key_pos"]
    coef: Float[Tensor, "key_pos"]

    __repr__ = compact_repr


def value_geometry(
    resid: Float[Tensor, "pos d_model"],
    w_v: Float[Tensor, "head d_model d_head"],
    gain: Float[Tensor, "d_model"] | None,
    scale: Float[Tensor, "pos"] | None,
    *,
    centred: bool,
    frozen: bool,
) -> ValueGeometry:
    """The :class:`ValueGeometry` of one layer from its input, ``W_V`` and ln1's gain and scale."""
    x = resid.double()
    d = x.shape[-1]
    w_v = w_v.double()
    gamma = torch.ones(d, dtype=torch.float64, device=x.device) if gain is None else gain.double()
    if centred:
        x = x - x.mean(-1, keepdim=True)
    if scale is None:  # no norm: N1 = I
        xhat, inv_scale = x, torch.ones(x.shape[0], dtype=torch.float64, device=x.device)
    else:
        inv_scale = 1.0 / scale.double()
        xhat = x * inv_scale[:, None]
    scaled = gamma[None, :, None] * w_v  # diag(γ) W_V^h
    gram = scaled.transpose(1, 2) @ scaled
    if centred:  # P = I − 11ᵀ/d
        col = scaled.sum(1)  # [head, d_head]
        gram = gram - col[:, :, None] * col[:, None, :] / d
    vtilde = torch.einsum("kd,hde->khe", xhat, scaled)
    if frozen or scale is None:
        coef = torch.zeros_like(inv_scale)
    else:
        coef = 2.0 / d - xhat.pow(2).sum(-1) / d**2
    return ValueGeometry(gram, vtilde, inv_scale, coef)


def edge_terms(dz: Tensor, patterns: Tensor, geo: ValueGeometry) -> dict[str, Tensor]:
    """One layer's probe sums: ``t1[h, j] = Σ_r ∂zᵀG∂z``, ``t2[h, j, k] = Σ_r (ṽ_k·∂z_j)²`` and the
    same two for the per-(head, key) value vector ``W^h_k = Σ_j A_jk ∂z_j`` (``k1``, ``k2``)."""
    # in the gradients' dtype (float32 sums of ~1e4 squares are good to ~1e-6), accumulated in float64
    rows, n, heads, d_head = dz.shape
    gram, vtilde = geo.gram.to(dz.dtype), geo.vtilde.to(dz.dtype)
    flat = dz.permute(2, 0, 1, 3).reshape(heads, rows * n, d_head)  # [head, r·j, d_head], one copy
    t1 = ((flat @ gram) * flat).reshape(heads, rows, n, d_head).sum((1, 3))
    # one batched matmul per head: (ṽ_k · ∂z_rj) for every (r, j, k)
    dots = flat @ vtilde.permute(1, 2, 0)  # [head, r·j, k]
    t2 = dots.reshape(heads, rows, n, n).square().sum(1)
    keyed = patterns.to(dz.dtype).transpose(1, 2)[:, None] @ flat.reshape(heads, rows, n, d_head)  # [h, r, k, e]
    k1 = ((keyed @ gram[:, None]) * keyed).sum((1, 3))
    k2 = (keyed * vtilde.permute(1, 0, 2)[:, None]).sum(-1).square().sum(1)
    return {"t1": t1.double(), "t2": t2.double(), "k1": k1.double(), "k2": k2.double()}


def edge_norms(
    patterns: Float[Tensor, "layer head query_pos key_pos"],
    inv_scale: Float[Tensor, "layer key_pos"],
    coef: Float[Tensor, "layer key_pos"],
    t1: Float[Tensor, "layer head query_pos"],
    t2: Float[Tensor, "layer head query_pos key_pos"],
) -> Float[Tensor, "layer head query_pos key_pos"]:
    """``‖edge (l, h, j←k)‖_F = (A_jk / s_k) · sqrt(t1_hj − coef_k · t2_hjk)`` (module docstring)."""
    inner = t1[..., None] - coef[:, None, None, :] * t2
    # the bracket is a squared norm: rounding can take an exactly-zero one a hair below 0
    return patterns.double() * inv_scale[:, None, None, :] * inner.clamp_min(0).sqrt()


def head_value_parts(
    dz: Float[Tensor, "row pos head d_head"],
    patterns: Float[Tensor, "head query_pos key_pos"],
    resid: Float[Tensor, "pos d_model"],
    w_v: Float[Tensor, "head d_model d_head"],
    gain: Float[Tensor, "d_model"] | None,
    scale: Float[Tensor, "pos"] | None,
    *,
    centred: bool,
    frozen: bool,
) -> Float[Tensor, "row head key_pos d_model"]:
    """Each head's value part as vectors, ``(∂N1_k)ᵀ W_V^h Σ_j A_jk ∂z^h_j`` (O(row·head·pos·d²): for
    small models and tests; :func:`flow` keeps only norms)."""
    keyed = torch.einsum("hjk,rjhe->rhke", patterns.double(), dz.double())
    u = torch.einsum("rhke,hde->rhkd", keyed, w_v.double())  # W_V^h W_k, in d_model
    d = resid.shape[-1]
    gamma = torch.ones(d, dtype=torch.float64, device=u.device) if gain is None else gain.double()
    if scale is None:
        return u
    x = resid.double() - resid.double().mean(-1, keepdim=True) if centred else resid.double()
    xhat = x / scale.double()[:, None]
    z = gamma * u
    if centred:
        z = z - z.mean(-1, keepdim=True)
    if not frozen:
        z = z - xhat * (z * xhat).sum(-1, keepdim=True) / d
    return z / scale.double()[:, None]


# --------------------------------------------------------------------------------------------------
# bounds layer by layer
# --------------------------------------------------------------------------------------------------


def bound_layer_rows(graph, target_pos: int) -> Float[Tensor, "layers_covered pos"]:
    """A PathGraph's backward row at every layer: ``o_n · e_nᵀ M^(L-1) ⋯ M^(l)`` for ``l = 0..L``
    (``l = L``: ``o_n e_n``), one vector–matrix product per layer from the factored edges."""
    n_layers, _, n, _ = graph.patterns.shape
    if not -n <= target_pos < n:
        raise ValueError(f"target position {target_pos} is out of range for {n} tokens; use 0..{n - 1} or -1")
    target_pos %= n
    row = torch.zeros(n, dtype=torch.float64)
    row[target_pos] = 1.0
    rows = [row]
    for layer in range(n_layers - 1, -1, -1):
        if graph.left_scale is not None:
            row = row * graph.left_scale[layer].double()
        into = row if graph.query_scale is None else row * graph.query_scale[layer].double()
        heads = torch.einsum("j,hjk->hk", into, graph.patterns[layer].double())
        row = row * graph.residual[layer].double() + (heads * graph.key_scale[layer].double()).sum(0)
        rows.append(row)
    return float(graph.output_scale[target_pos]) * torch.stack(rows[::-1])
