"""The probe's MLP checks (:mod:`lens_squash.edge.adapter_probe`): a bridge's MLP, plain, gated or a
mixture of experts, recomputed from the weights the adapter reads must equal what the module returned
on the probe's pass; fused experts' gate map is checked past its clamps. ``u`` is what the MLP read,
``written`` what it added to the residual stream.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..algebra.blocks import INSTEAD
from ..core.support import UnsupportedModelError
from .experts import expert_glu, fused_glu

__all__ = ["RTOL", "check_gate_map", "check_mlp", "check_moe", "close", "gap", "tolerance"]

#: a read fact's prediction must equal the module's output to this, relative (or 20 eps of the dtype)
RTOL = 1e-4


def tolerance(*dtypes: torch.dtype) -> float:
    """:data:`RTOL`, or 20 eps of the coarsest of ``dtypes``: float16/bfloat16 models round at ~1e-3, still
    far from an O(1) error."""
    return max(RTOL, 20 * max(torch.finfo(d).eps if d.is_floating_point else 0.0 for d in dtypes))


def gap(a: Tensor, b: Tensor) -> float:
    """``‖a − b‖ / ‖b‖`` in float64; ``inf`` where the shapes differ. Equal sizes are compared as ``b``'s shape
    (OPT's bridge flattens batch and positions before ln2)."""
    a, b = a.detach().double(), b.detach().double()
    a = a.reshape(b.shape) if a.numel() == b.numel() else a
    return float((a - b).norm()) / max(float(b.norm()), 1e-30) if a.shape == b.shape else float("inf")


def close(a: Tensor, b: Tensor, dtype: torch.dtype | None = None) -> bool:
    """``a ≈ b`` to :func:`tolerance` of the coarser dtype (or of ``dtype``, the one they were computed in)."""
    return gap(a, b) <= tolerance(*([dtype] if dtype is not None else [a.dtype, b.dtype]))


def check_mlp(
    u: Tensor, written: Tensor, block, activation: Callable, mlp_matrices: Callable, mlp_biases: Callable
) -> None:
    """``act(u W_a + b_a) [⊙ (u W_in + b_in)] W_out + b_out`` must equal what the MLP returned."""
    act = activation(block)
    mats, w_out = mlp_matrices(block)
    biases, b_out = mlp_biases(block)
    pre = [u @ w.to(u.dtype) + (0 if b is None else b.to(u.dtype)) for w, b in zip(mats, biases, strict=True)]
    with torch.no_grad():
        hidden = act(pre[0]) if len(pre) == 1 else act(pre[0]) * pre[1]
        out = hidden @ w_out.to(u.dtype) + (0 if b_out is None else b_out.to(u.dtype))
    if not close(out, written):
        raise UnsupportedModelError(
            f"{type(block.mlp).__name__} does not compute act(x W_gate)·(x W_in) W_out (or act(x W_in) W_out) "
            f"from the weights it exposes; {INSTEAD}"
        )


def check_moe(u: Tensor, written: Tensor, routing: Tensor | None, block, experts: Callable) -> None:
    """``Σ_e g_e (glu(u W_gate,e + b_gate,e, u W_in,e + b_in,e) W_out,e + b_out,e)`` with ``g`` the router
    hook's weights must equal what the MoE returned: the expert weights, biases and activation are read
    right and the hook holds the final routing weights (top-k, renormalised), which the certified
    bound's MLP gains and the frozen mode use as they are."""
    if routing is None:
        raise UnsupportedModelError(
            "the certified bound needs a mixture-of-experts router's final weights (hook_expert_weights), which "
            f"this TransformerBridge does not fire; {INSTEAD}"
        )
    check_gate_map(block)
    u = u.reshape(-1, u.shape[-1])
    out = torch.zeros_like(u)
    with torch.no_grad():
        for index, expert in enumerate(experts(block)):
            weight = routing.reshape(u.shape[0], -1)[:, index : index + 1].to(u.dtype)
            gate, up = (_affine(u, linear) for linear in (expert.W_gate, expert.W_in))
            out = out + weight * _affine(expert_glu(expert)(gate, up), expert.W_out)
    if not close(out, written):
        raise UnsupportedModelError(
            f"{type(block.mlp).__name__} does not compute Σ_e g_e glu(x W_gate,e + b, x W_in,e + b) W_out,e + b "
            f"from its experts' weights, biases and activation and its router hook's weights (a shared expert or "
            f"an unknown activation); {INSTEAD}"
        )


def _affine(x: Tensor, linear) -> Tensor:
    """``x Wᵀ + b`` of an ``nn.Linear``-like reading surface (no bias: none added)."""
    out = x @ linear.weight.T.to(x.dtype)
    return out if linear.bias is None else out + linear.bias.to(x.dtype)


def check_gate_map(block) -> None:
    """Fused ``transformers`` experts apply their gate map through ``_apply_gate`` on the fused
    ``[gate, up]`` columns (halves, or GPT-OSS's interleaved pairs): it must equal the map the bound
    differentiates, also past the clamps (inputs span ``±3 L``, so a limit or slope read wrong is off
    by O(1))."""
    fused = getattr(block.mlp, "experts", None)
    if fused is None or isinstance(fused, torch.nn.ModuleList):
        return
    apply_gate = getattr(fused, "_apply_gate", None)
    glu = fused_glu(fused)
    limit = getattr(fused, "limit", None)
    if not callable(apply_gate):
        if isinstance(limit, (int, float)):  # a few recorded tokens may never reach the clamps: no proof
            raise UnsupportedModelError(
                f"{type(fused).__name__} holds a clamp limit but no _apply_gate to check its gate map against "
                f"(transformers older than the experts interface); {INSTEAD}"
            )
        return  # act_fn(gate)·up: the recomputed MoE checks it
    span = 3 * max(float(limit) if isinstance(limit, (int, float)) else 1.0, 1.0)
    ref = fused.gate_up_proj
    x = torch.linspace(-span, span, 128, dtype=torch.float64).to(ref.device, ref.dtype).reshape(2, 64)
    concatenated = bool(getattr(fused, "is_concatenated", True))
    gate, up = (x[:, :32], x[:, 32:]) if concatenated else (x[:, ::2], x[:, 1::2])
    with torch.no_grad():
        theirs, ours = apply_gate(x), glu(gate, up)
    if not close(ours, theirs):
        raise UnsupportedModelError(
            f"{type(fused).__name__}'s gate map is neither act_fn(gate)·up nor GPT-OSS's clamped SwiGLU "
            f"(clamp(up, ±L) + 1)·g σ(α g) with the alpha and limit it holds; {INSTEAD}"
        )


# ------------------------------------------------------------------------------------------------
# Frozen hooks must act
