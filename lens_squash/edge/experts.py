"""Mixture-of-experts experts as the certified bound reads them: ``W_gate``, ``W_in``, ``W_out`` in
``nn.Linear`` layout (weight ``[out, in]``, bias or None) and the elementwise map ``glu(gate, up)``
from the two projections to what ``W_out`` reads.

A HookedTransformer's experts are such modules already. ``transformers`` fuses an MoE's experts
into 3-D tensors; :class:`FusedExpert` views expert ``e`` of them, in the layout the experts module
declares (``is_transposed``: ``x @ W`` instead of ``W x``; ``is_concatenated``: gate and up halves
instead of interleaved columns, GPT-OSS's), with the biases it holds (``gate_up_proj_bias``,
``down_proj_bias``). GPT-OSS's experts compute ``(clamp(up, ±L) + 1) · g σ(α g)``, ``g = clamp(gate,
max=L)``, with ``α`` and ``L`` on the module (from ``swiglu_alpha`` and ``swiglu_limit``). Nothing here
is trusted on its own: the adapter's probe (:mod:`lens_squash.edge.adapter_probe`) recomputes the MoE
from these views and the router hook's weights and compares the module's own gate map with
:func:`clamped_glu`, and refuses the certified bound when either differs.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable

import torch
from jaxtyping import Float
from torch import Tensor

from ..algebra.blocks import INSTEAD
from ..core.support import UnsupportedModelError

__all__ = ["FusedExpert", "clamped_glu", "expert_glu", "fused_glu", "moe_experts"]


def clamped_glu(
    gate: Float[Tensor, "pos d_mlp"], up: Float[Tensor, "pos d_mlp"], *, alpha: float, limit: float
) -> Float[Tensor, "pos d_mlp"]:
    """GPT-OSS's expert activation: ``(clamp(up, −L, L) + 1) · g σ(α g)`` with ``g = clamp(gate, max=L)``."""
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * gate * torch.sigmoid(gate * alpha)


def _act_times_up(act_fn: Callable, gate: Tensor, up: Tensor) -> Tensor:
    return act_fn(gate) * up


def expert_glu(expert) -> Callable[[Tensor, Tensor], Tensor]:
    """The expert's elementwise map ``(gate, up) ↦ hidden``: a fused view's own, TransformerLens 3's
    GPT-OSS expert's clamped GLU (its module constants), else ``act_fn(gate) · up``."""
    glu = getattr(expert, "glu", None)
    if glu is not None:
        return glu
    if type(expert).__name__ == "GptOssExpert":  # TL 3's GPT-OSS expert hard-codes α and L as module constants
        from transformer_lens.components.mlps.gpt_oss_moe import GPT_OSS_ALPHA, GPT_OSS_LIMIT

        return functools.partial(clamped_glu, alpha=GPT_OSS_ALPHA, limit=GPT_OSS_LIMIT)
    return functools.partial(_act_times_up, expert.act_fn)


class _Linear:
    """``nn.Linear``'s reading surface (``weight [out, in]``, ``bias``) over slices of fused tensors."""

    def __init__(self, read_weight: Callable[[], Tensor], read_bias: Callable[[], Tensor | None]):
        self._read_weight, self._read_bias = read_weight, read_bias

    @property
    def weight(self) -> Tensor:
        return self._read_weight()

    @property
    def bias(self) -> Tensor | None:
        return self._read_bias()


def _gate_up_rows(fused: Tensor, concatenated: bool, part: int) -> Tensor:
    """Rows of the gate (part 0) or up (part 1) projection in a ``[2·d_mlp, ...]`` fused tensor."""
    if concatenated:
        half = fused.shape[0] // 2
        return fused[:half] if part == 0 else fused[half:]
    return fused[part::2]  # GPT-OSS interleaves: gate at even columns, up at odd ones


def _bias(experts: torch.nn.Module, name: str) -> Tensor | None:
    """A fused bias the experts add: none where the module says ``has_bias=False``."""
    if getattr(experts, "has_bias", True) is False:
        return None
    bias = getattr(experts, name, None)
    return bias if isinstance(bias, Tensor) else None


class FusedExpert:
    """Expert ``e`` of a ``transformers`` MoE whose experts are fused 3-D tensors (Mixtral's
    ``gate_up_proj [expert, 2·d_mlp, d_model]``, GPT-OSS's transposed and interleaved
    ``[expert, d_model, 2·d_mlp]`` with biases), seen as a HookedTransformer expert. The slices are taken
    on every read, so in-place edits are seen."""

    def __init__(self, experts: torch.nn.Module, index: int):
        owner = weakref.ref(experts)  # a strong reference would keep the module alive as a cache key
        transposed = bool(getattr(experts, "is_transposed", False))
        concatenated = bool(getattr(experts, "is_concatenated", True))

        def linear_layout(t: Tensor) -> Tensor:  # one expert's slice as [out, in]
            return t.transpose(-1, -2) if transposed and t.ndim == 2 else t

        def gate_up(part: int) -> _Linear:
            def bias():
                b = _bias(owner(), "gate_up_proj_bias")
                return None if b is None else _gate_up_rows(b[index], concatenated, part)

            def weight():
                return _gate_up_rows(linear_layout(owner().gate_up_proj[index]), concatenated, part)

            return _Linear(weight, bias)

        def down_bias():
            b = _bias(owner(), "down_proj_bias")
            return None if b is None else b[index]

        self.W_gate, self.W_in = gate_up(0), gate_up(1)
        self.W_out = _Linear(lambda: linear_layout(owner().down_proj[index]), down_bias)
        self.glu = fused_glu(experts)


def fused_glu(experts: torch.nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
    """The fused experts' map: GPT-OSS's clamped GLU where the module holds a numeric ``alpha`` and
    ``limit``, else ``act_fn(gate) · up``. transformers routes every experts implementation through the
    module's ``_apply_gate``; the probe checks it against this map (past the clamps) before any use."""
    if getattr(experts, "has_gate", True) is False:
        raise UnsupportedModelError(f"{type(experts).__name__}'s experts are not gated (no gate projection); {INSTEAD}")
    alpha, limit = getattr(experts, "alpha", None), getattr(experts, "limit", None)
    if isinstance(alpha, (int, float)) and isinstance(limit, (int, float)):
        return functools.partial(clamped_glu, alpha=float(alpha), limit=float(limit))
    act_fn = getattr(experts, "act_fn", None)
    if not callable(act_fn):
        raise UnsupportedModelError(
            f"{type(experts).__name__} has neither an act_fn nor GPT-OSS's alpha and limit, so its experts' "
            f"activation is unknown; {INSTEAD}"
        )
    return functools.partial(_act_times_up, act_fn)


_FUSED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def moe_experts(block) -> list:
    """The experts of ``block``'s MoE: a HookedTransformer's modules, or views of fused ``transformers``
    tensors (kept per module, so the Gram cache keyed on each expert is reused)."""
    experts = block.mlp.experts
    if isinstance(experts, torch.nn.ModuleList):
        return list(experts)
    fused = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not all(isinstance(t, Tensor) and t.ndim == 3 for t in fused):
        raise UnsupportedModelError(
            f"cannot read the experts of {type(experts).__name__} (neither a list of expert modules nor fused "
            f"gate_up_proj / down_proj tensors); {INSTEAD}"
        )
    if experts not in _FUSED:
        _FUSED[experts] = [FusedExpert(experts, e) for e in range(fused[0].shape[0])]
    return _FUSED[experts]
