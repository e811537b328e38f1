"""Local Lipschitz constants of a pre-norm block with its attention and norm scales frozen.

DESIGN §3 (certified variant): with patterns and norm scales frozen at their traced values,

    ‖∂x^(l+1)_j / ∂x^(l)_k‖ ≤ m^(l)_j · T^(l)_{jk},
    T^(l)_{jk} = δ_{jk} + Σ_h A^(l,h)_{jk} · ‖P diag(γ1) W_V^h W_O^h‖₂ / s1^(l)_k,
    m^(l)_j   = 1 + ‖J_{MLP∘N2}(x^(l+½)_j)‖,

where ``P`` is LayerNorm's centring (identity for RMSNorm). This module computes the two weight- and
activation-dependent factors: the OV norms (weights only) and the MLP∘N2 Jacobian norm per position.

The MLP Jacobian at position j, in row-vector form, is ``Σ_a W'_a diag(c_a,j) W_out`` with
``W'_a = P diag(γ2) W_a / s2_j`` (a = gate and in for gated MLPs). Its Frobenius norm, which bounds the
spectral norm, follows from a Gram identity without forming any ``d_model × d_model`` matrix:

    ‖Σ_a W'_a diag(c_a) W_out‖_F² = Σ_{a,b} c_aᵀ [(W'_aᵀ W'_b) ∘ (W_out W_outᵀ)] c_b,

which costs O(d_mlp²) per position once the ``d_mlp × d_mlp`` Gram matrices are built per layer.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from .attention import ov_norms

__all__ = ["mlp_gain_gram", "mlp_jacobian_frobenius", "ov_norms", "supports_certified"]


def supports_certified(model) -> None:
    """Refuse architectures the certified bound does not model, saying which and why."""
    cfg = model.cfg
    if getattr(cfg, "parallel_attn_mlp", False):
        raise ValueError("parallel attention+MLP blocks (GPT-J style) are not supported by the certified bound")
    if cfg.normalization_type not in (None, "LN", "LNPre", "RMS", "RMSPre"):
        raise ValueError(f"normalization {cfg.normalization_type!r} is not supported by the certified bound")
    if cfg.act_fn is not None and cfg.act_fn.startswith("solu"):
        raise ValueError("SoLU MLPs normalise inside the activation; the certified bound does not model them")
    if getattr(cfg, "num_experts", None):
        raise ValueError("mixture-of-experts MLPs are not supported by the certified bound")


def _input_matrices(block, centred: bool) -> list[Tensor]:
    """``P diag(γ2) W_a`` for each input matrix of the MLP (gate first when gated)."""
    mlp = block.mlp
    names = ["W_gate", "W_in"] if hasattr(mlp, "W_gate") else ["W_in"]
    gain = getattr(block.ln2, "w", None)
    mats = []
    for name in names:
        w = getattr(mlp, name).detach().double()  # [d_model, d_mlp]
        if gain is not None:
            w = w * gain.detach().double()[:, None]
        if centred:
            w = w - w.mean(dim=0, keepdim=True)
        mats.append(w)
    return mats


def mlp_gain_gram(block, *, centred: bool) -> Float[Tensor, "two_d_mlp two_d_mlp"]:
    """The block's Gram matrix ``[(W'_aᵀ W'_b) ∘ (W_out W_outᵀ)]_{a,b}`` stacked over a, b (float64)."""
    w_in = torch.cat(_input_matrices(block, centred), dim=1)  # [d_model, k·d_mlp]
    w_out = block.mlp.W_out.detach().double()  # [d_mlp, d_model]
    copies = w_in.shape[1] // w_out.shape[0]
    out_gram = w_out @ w_out.T
    return (w_in.T @ w_in) * out_gram.repeat(copies, copies)


def _activation_coefficients(block, pre: Tensor, pre_linear: Tensor | None) -> Tensor:
    """``c`` per position: the MLP's diagonal Jacobian factors, ``[pos, k·d_mlp]``."""
    act = block.mlp.act_fn
    pre = pre.detach().double().requires_grad_(True)
    with torch.enable_grad():
        value = act(pre)
        # The activation is elementwise, so the gradient of its sum is exactly its derivative.
        (slope,) = torch.autograd.grad(value.sum(), pre)
    if pre_linear is None:
        return slope
    return torch.cat([slope * pre_linear.double(), value.detach()], dim=-1)


def mlp_jacobian_frobenius(
    block,
    gram: Tensor,
    pre: Float[Tensor, "pos d_mlp"],
    pre_linear: Float[Tensor, "pos d_mlp"] | None,
    scale2: Float[Tensor, "pos"] | None,
) -> Float[Tensor, "pos"]:
    """``‖J_{MLP∘N2}‖_F`` at every position, with N2's scale frozen at ``scale2`` (float64)."""
    coeff = _activation_coefficients(block, pre, pre_linear)  # [pos, k·d_mlp]
    squared = torch.einsum("pa,ab,pb->p", coeff, gram, coeff).clamp_min(0.0)
    norms = squared.sqrt()
    return norms if scale2 is None else norms / scale2.double()
