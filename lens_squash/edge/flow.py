"""Sensitivity flow: where the true gradient travels, layer by layer, head by head and edge by edge.

For probes ``u_r`` (the identity rows for ``exact``/``frozen``, ``k`` orthonormal Gaussian-QR rows for
``sketch``: the same probes, seed convention and estimator as :mod:`lens_squash.edge.jacobian`) the
gradient of ``u_rᵀ y_n`` with respect to the residual stream entering layer ``l`` at position ``k`` is
``g^(l)_k``. Its Frobenius norm over the probes is the layer-wise sensitivity ``‖∂y_n/∂x^(l)_k‖_F``
(``l = L``: ``blocks.{L-1}.hook_resid_post``); at ``l = 0`` it is :func:`jacobian.jacobian`'s norm.

**One batched backward per probe chunk.** The forward pass adds zero-valued differentiable offsets
at every point the backward step of a block passes through, and :func:`torch.func.vjp` then returns
the gradient at all of them from one vmapped backward:

* ``blocks.{l}.hook_resid_pre`` (and the final ``hook_resid_post``): ``g^(l)``;
* ``blocks.{l}.hook_resid_mid``: ``g^(l+½)``, what the attention sends backwards;
* the three inputs of ``ln1`` (TransformerLens norms query, key and value inputs separately): the
  value part (gradient through the values, patterns held) and the pattern part (through queries and
  keys, values held);
* the input of ``ln2``: the MLP part ``(∂(MLP∘N2)_k)ᵀ g^(l+1)_k``;
* ``blocks.{l}.attn.hook_z``: ``∂z^h_j = W_O^h g^(l+½)_j`` per head, from which every value edge's norm
  follows without materialising ``[layer, head, n, n, d]``.

A pre-norm block's backward step is then exactly ::

    g^(l)_k = g^(l+1)_k                                    residual part
            + (∂(MLP∘N2)_k)ᵀ g^(l+1)_k                     MLP part
            + Σ_h Σ_j A^(l,h)_{jk} (∂N1_k)ᵀ W_V^h W_O^h g^(l+½)_j      value part, one edge per (h, j←k)
            + pattern part (through the scores)

and each part is an autograd gradient at its own node, never a remainder: their sum is compared with
``g^(l)`` in every chunk (:attr:`SensitivityFlow.decomposition_error`).

**Edge norms.** With ``x̂_k`` the normalised input and ``s_k`` the norm's scale, the value edge
``(h, j←k)`` for probe ``r`` is ``(A_jk/s_k)(z − x̂_k (x̂_k·z)/d)`` with ``z = P(γ ⊙ W_V^h ∂z^h_{rj})``
(``P`` the centring for LayerNorm, ``I`` for RMSNorm). Its squared norm is ::

    (A_jk² / s_k²) · [ ∂zᵀ G^h ∂z − (2/d − ‖x̂_k‖²/d²) (ṽ^h_k · ∂z)² ],
    G^h = W_V^hᵀ diag(γ) P diag(γ) W_V^h,    ṽ^h_k = W_V^hᵀ (γ ⊙ x̂_k),

so the first (frozen-scale) term factorises into ``A_jk / s_k`` times a per-(head, j) norm, and the
projection term needs only ``d_head``-long dot products. ``frozen`` mode (patterns and norm scales
detached, as in :mod:`lens_squash.edge.jacobian`) drops the projection term and has no pattern part.
"""

from __future__ import annotations

import contextlib
import html
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .allocator import steady_heap
from ..core.display import compact_repr
from .jacobian import (
    MEMORY_FRACTION,
    _check_position,
    _choose_chunk,
    _freeze_hooks,
    _memory_terms,
    _probes,
    _without_parameter_grads,
    available_memory,
)
from ..core.records import provenance, to_jsonable
from ..core.support import UnsupportedModelError
from .trace import as_tokens

__all__ = [
    "DEFAULT_VARIANTS",
    "FLOW_MODES",
    "FlowGradients",
    "SensitivityFlow",
    "ValueGeometry",
    "bound_layer_rows",
    "check_flow_support",
    "edge_norms",
    "estimate_flow_memory",
    "flow",
    "flow_gradients",
    "head_value_parts",
    "value_geometry",
]

FLOW_MODES = ("exact", "frozen", "sketch")
#: the bound variants compared layer by layer when none are named (certified needs MLP gains)
DEFAULT_VARIANTS = ("paper", "rollout", "value_rownorm")


# --------------------------------------------------------------------------------------------------
# which blocks the decomposition covers
# --------------------------------------------------------------------------------------------------


def check_flow_support(model) -> None:
    """Refuse, with one line naming the config field, block shapes the decomposition does not cover.

    Covered: pre-norm blocks (LayerNorm, RMSNorm, their ``Pre`` forms, or none), standard or
    grouped-query attention, causal or bidirectional, with QK norms or score soft-capping (they act on
    the pattern side only), dense, gated or mixture-of-experts MLPs, attention-only models,
    parallel attention+MLP blocks, extra norms after each sublayer (Gemma-2's
    ``use_normalization_before_and_after``: they act after ``hook_z``, so the captured ``∂z`` already
    carries them) and attention sinks (the pattern hooked is the one used).
    """
    from transformer_lens.components import TransformerBlock
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

    cfg = model.cfg
    refusals = [
        (getattr(cfg, "original_architecture", None) in POST_NORM_ARCHITECTURES, "original_architecture",
         f"{cfg.original_architecture!r} is a post-norm architecture (the norm follows the sublayer)"),
        (getattr(cfg, "use_split_qkv_input", False), "use_split_qkv_input",
         "per-head query/key/value inputs are not hooked"),
        (getattr(cfg, "use_attn_in", False), "use_attn_in", "per-head attention inputs are not hooked"),
        (getattr(cfg, "clip_qkv", None) is not None, "clip_qkv",
         "clamped values break the value-edge formula wherever the clamp is active"),
        (cfg.positional_embedding_type == "shortformer", "positional_embedding_type",
         "shortformer embeddings are added after ln1"),
        (cfg.normalization_type not in (None, "LN", "LNPre", "RMS", "RMSPre"), "normalization_type",
         f"normalization {cfg.normalization_type!r} is not one the edge formula knows"),
        (cfg.act_fn is not None and str(cfg.act_fn).startswith("solu"), "act_fn",
         "SoLU normalises inside the MLP"),
    ]
    for refused, name, why in refusals:
        if refused:
            raise UnsupportedModelError(
                f"the sensitivity flow does not cover cfg.{name}={getattr(cfg, name, None)!r}: {why}; use "
                "jacobian(model, prompt, wrt=l) for layer-wise sensitivity without the decomposition"
            )
    if not all(isinstance(block, TransformerBlock) for block in model.blocks):
        raise UnsupportedModelError(
            "the sensitivity flow covers TransformerLens TransformerBlock blocks only (cfg.original_architecture="
            f"{getattr(cfg, 'original_architecture', None)!r}); use jacobian(model, prompt) instead"
        )


# --------------------------------------------------------------------------------------------------
# the hooked forward pass with zero-valued offsets
# --------------------------------------------------------------------------------------------------


def _zero_offsets(model, n: int) -> dict[str, list[Tensor]]:
    cfg = model.cfg
    dtype, device = cfg.dtype, torch.device(cfg.device)
    L, d = cfg.n_layers, cfg.d_model
    has_mlp = not cfg.attn_only
    has_mid = has_mlp and not cfg.parallel_attn_mlp

    def zeros(*shape):
        return [torch.zeros(1, *shape, dtype=dtype, device=device) for _ in range(L)]

    return {
        "resid": [torch.zeros(1, n, d, dtype=dtype, device=device) for _ in range(L + 1)],
        "mid": zeros(n, d) if has_mid else [],
        "q": zeros(n, d), "k": zeros(n, d), "v": zeros(n, d),
        "mlp": zeros(n, d) if has_mlp else [],
        "z": zeros(n, cfg.n_heads, cfg.d_head),
    }


def _add(offset: Tensor):
    def hook(value, hook):
        return value + offset
    return hook


@contextlib.contextmanager
def _norm_input_offsets(model, offsets: dict[str, list[Tensor]]) -> Iterator[None]:
    """Add the q/k/v offsets to ``ln1``'s three inputs and the MLP offset to ``ln2``'s input.

    TransformerBlock calls ``ln1`` on the query, key and value inputs in that order (keyword arguments
    evaluate left to right); the count is checked afterwards so a different block shape cannot be
    silently mislabelled.
    """
    calls = [0] * model.cfg.n_layers
    handles = []

    def ln1_hook(layer):
        def hook(module, args):
            index = calls[layer]
            calls[layer] += 1
            if index > 2:
                return None
            return (args[0] + offsets["qkv"[index]][layer],) + tuple(args[1:])
        return hook

    def ln2_hook(layer):
        def hook(module, args):
            return (args[0] + offsets["mlp"][layer],) + tuple(args[1:])
        return hook

    for layer, block in enumerate(model.blocks):
        handles.append(block.ln1.register_forward_pre_hook(ln1_hook(layer)))
        if offsets["mlp"]:
            handles.append(block.ln2.register_forward_pre_hook(ln2_hook(layer)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
    if any(count != 3 for count in calls):
        raise UnsupportedModelError(
            f"ln1 ran {calls} times per block instead of 3 (query, key, value inputs): this block shape "
            "is not the one the flow decomposes; use jacobian(model, prompt, wrt=l) instead"
        )


def _record(store: dict[str, Tensor], name: str):
    def hook(value, hook):
        store.setdefault(name, value[0].detach().clone())
    return hook


def _flow_function(model, tokens: Tensor, pos: int, frozen: bool, store: dict[str, Tensor]):
    """``f(offsets) = y_pos``: the model with every offset added at its point (all zero)."""
    cfg = model.cfg
    L = cfg.n_layers
    batch = tokens[None].to(cfg.device)

    def f(offsets: dict[str, list[Tensor]]) -> Float[Tensor, "d_out"]:
        hooks = [*(_freeze_hooks(model, 0) if frozen else [])]
        for layer in range(L):
            hooks.append((f"blocks.{layer}.hook_resid_pre", _add(offsets["resid"][layer])))
            hooks.append((f"blocks.{layer}.hook_resid_pre", _record(store, f"resid.{layer}")))
            if offsets["mid"]:
                hooks.append((f"blocks.{layer}.hook_resid_mid", _add(offsets["mid"][layer])))
            hooks.append((f"blocks.{layer}.attn.hook_z", _add(offsets["z"][layer])))
            hooks.append((f"blocks.{layer}.attn.hook_pattern", _record(store, f"pattern.{layer}")))
            if f"blocks.{layer}.ln1.hook_scale" in model.hook_dict:
                hooks.append((f"blocks.{layer}.ln1.hook_scale", _record(store, f"scale.{layer}")))
        hooks.append((f"blocks.{L - 1}.hook_resid_post", _add(offsets["resid"][L])))
        with model.hooks(fwd_hooks=hooks), _norm_input_offsets(model, offsets):
            resid = model(batch, stop_at_layer=L)
            y = resid[:, pos : pos + 1]
            if cfg.normalization_type is not None:
                y = model.ln_final(y)  # per position, so norming only the target is exact
        return y[0, 0]

    return f


@dataclass(frozen=True, eq=False)
class FlowGradients:
    """The gradient at every point of one batched backward, for the probe rows it was given.

    Vectors are ``[layer, row, pos, d_model]`` (``total`` has ``layer+1`` entries, the last at the
    final ``hook_resid_post``); ``mlp`` is ``None`` for attention-only models; ``dz`` is
    ``[layer, row, pos, head, d_head]``. Forward quantities are detached: ``patterns``
    ``[layer, head, query_pos, key_pos]``, ``resid`` (each layer's input) and ``scale`` (ln1's, or
    ``None`` without a norm).
    """

    total: Float[Tensor, "layer_plus_1 row pos d_model"]
    mid: Float[Tensor, "layer row pos d_model"]
    mlp: Float[Tensor, "layer row pos d_model"] | None
    value: Float[Tensor, "layer row pos d_model"]
    pattern_query: Float[Tensor, "layer row pos d_model"]
    pattern_key: Float[Tensor, "layer row pos d_model"]
    dz: Float[Tensor, "layer row pos head d_head"]
    patterns: Float[Tensor, "layer head query_pos key_pos"]
    resid: Float[Tensor, "layer pos d_model"]
    scale: Float[Tensor, "layer pos"] | None

    @property
    def residual(self) -> Float[Tensor, "layer row pos d_model"]:
        """The residual part of ``g^(l)``: ``g^(l+1)``, straight through both skip connections."""
        return self.total[1:]

    @property
    def pattern(self) -> Float[Tensor, "layer row pos d_model"]:
        return self.pattern_query + self.pattern_key

    def parts_sum(self) -> Float[Tensor, "layer row pos d_model"]:
        """residual + MLP + value + pattern, each computed at its own node."""
        total = self.residual + self.value + self.pattern
        return total if self.mlp is None else total + self.mlp

    __repr__ = compact_repr


class _FlowPass:
    """One forward pass under :func:`torch.func.vjp`; :meth:`raw` runs one batched backward."""

    def __init__(self, model, tokens: Tensor, pos: int, frozen: bool):
        self.model, self.store = model, {}
        offsets = _zero_offsets(model, tokens.shape[0])
        self.has_mid = bool(offsets["mid"])
        self.has_mlp = bool(offsets["mlp"])
        _, self.vjp_fn = torch.func.vjp(_flow_function(model, tokens, pos, frozen, self.store), offsets)
        self.batched = torch.func.vmap(self.vjp_fn)

    def raw(self, rows: Tensor) -> dict[str, list[Tensor]]:
        """Per point, one ``[row, pos, …]`` gradient per layer (no stacked copies)."""
        (grads,) = self.batched(rows)
        return {name: [g[:, 0] for g in values] for name, values in grads.items()}

    def forward_stack(self, name: str) -> Tensor | None:
        values = [self.store.get(f"{name}.{layer}") for layer in range(self.model.cfg.n_layers)]
        return None if values[0] is None else torch.stack(values)

    def gradients(self, rows: Tensor) -> FlowGradients:
        raw = self.raw(rows)
        total = torch.stack(raw["resid"])
        scale = self.forward_stack("scale")
        return FlowGradients(
            total=total,
            mid=torch.stack(raw["mid"]) if self.has_mid else total[1:],  # parallel: attention reads g^(l+1)
            mlp=torch.stack(raw["mlp"]) if self.has_mlp else None,
            value=torch.stack(raw["v"]),
            pattern_query=torch.stack(raw["q"]),
            pattern_key=torch.stack(raw["k"]),
            dz=torch.stack(raw["z"]),
            patterns=self.forward_stack("pattern"),
            resid=self.forward_stack("resid"),
            scale=None if scale is None else scale[..., 0],
        )


def flow_gradients(
    model, prompt: str | Tensor, rows: Float[Tensor, "row d_out"], *, target_pos: int = -1,
    mode: str = "exact", chat: bool | None = None,
) -> FlowGradients:
    """Every captured gradient for the cotangent ``rows`` in one batched backward (small models, tests)."""
    check_flow_support(model)
    if mode not in FLOW_MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {FLOW_MODES}")
    tokens = as_tokens(model, prompt, chat=chat)
    pos = _check_position(target_pos, tokens.shape[0])
    used = tokens[: pos + 1] if model.cfg.attention_dir == "causal" else tokens
    rows = torch.as_tensor(rows).to(model.cfg.device, model.cfg.dtype)
    if rows.ndim != 2 or rows.shape[1] != model.cfg.d_model:
        raise ValueError(f"rows must be [row, d_model={model.cfg.d_model}], got {tuple(rows.shape)}")
    with _without_parameter_grads(model), torch.enable_grad():
        return _FlowPass(model, used, pos, mode == "frozen").gradients(rows)


# --------------------------------------------------------------------------------------------------
# the value-edge geometry (pure tensor functions)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ValueGeometry:
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
    resid: Float[Tensor, "pos d_model"], w_v: Float[Tensor, "head d_model d_head"],
    gain: Float[Tensor, "d_model"] | None, scale: Float[Tensor, "pos"] | None, *,
    centred: bool, frozen: bool,
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


def _edge_terms(dz: Tensor, patterns: Tensor, geo: ValueGeometry) -> dict[str, Tensor]:
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
    patterns: Float[Tensor, "layer head query_pos key_pos"], inv_scale: Float[Tensor, "layer key_pos"],
    coef: Float[Tensor, "layer key_pos"], t1: Float[Tensor, "layer head query_pos"],
    t2: Float[Tensor, "layer head query_pos key_pos"],
) -> Float[Tensor, "layer head query_pos key_pos"]:
    """``‖edge (l, h, j←k)‖_F = (A_jk / s_k) · sqrt(t1_hj − coef_k · t2_hjk)`` (module docstring)."""
    inner = t1[..., None] - coef[:, None, None, :] * t2
    # the bracket is a squared norm: rounding can take an exactly-zero one a hair below 0
    return patterns.double() * inv_scale[:, None, None, :] * inner.clamp_min(0).sqrt()


def head_value_parts(
    dz: Float[Tensor, "row pos head d_head"], patterns: Float[Tensor, "head query_pos key_pos"],
    resid: Float[Tensor, "pos d_model"], w_v: Float[Tensor, "head d_model d_head"],
    gain: Float[Tensor, "d_model"] | None, scale: Float[Tensor, "pos"] | None, *,
    centred: bool, frozen: bool,
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


def bound_layer_rows(graph, target: int) -> Float[Tensor, "layer_plus_1 pos"]:
    """A PathGraph's backward row at every layer: ``o_n · e_nᵀ M^(L-1) ⋯ M^(l)`` for ``l = 0..L``
    (``l = L``: ``o_n e_n``), one vector–matrix product per layer from the factored edges."""
    n_layers, _, n, _ = graph.patterns.shape
    if not -n <= target < n:
        raise ValueError(f"target position {target} is out of range for {n} tokens; use 0..{n - 1} or -1")
    target %= n
    row = torch.zeros(n, dtype=torch.float64)
    row[target] = 1.0
    rows = [row]
    for layer in range(n_layers - 1, -1, -1):
        if graph.left_scale is not None:
            row = row * graph.left_scale[layer].double()
        into = row if graph.query_scale is None else row * graph.query_scale[layer].double()
        heads = torch.einsum("j,hjk->hk", into, graph.patterns[layer].double())
        row = row * graph.residual[layer].double() + (heads * graph.key_scale[layer].double()).sum(0)
        rows.append(row)
    return float(graph.output_scale[target]) * torch.stack(rows[::-1])


# --------------------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------------------


def _flow_memory_terms(model, n: int, rows: int) -> tuple[int, int]:
    """jacobian's ``(fixed, per_cotangent)`` terms (sketch form: no [pos, d, d] buffer) plus the flow's
    own: per cotangent the captured gradients (7 d_model vectors per layer and position, ∂z, three more for
    vmap's copies, and the
    float64 ``[row, head, n, n]`` edge product of one layer), fixed the float64 edge accumulators."""
    cfg = model.cfg
    fixed, per = _memory_terms(model, n, "sketch", n_rows=rows)
    size = torch.finfo(cfg.dtype).bits // 8
    L, d, heads = cfg.n_layers, cfg.d_model, cfg.n_heads
    # 11 rather than the 8 vectors captured: SmolLM2 runs (n = 89, chunk 16) peaked at 1871 and 1968 MiB in-process
    # RSS against 1755 MiB predicted with 8 and 1943 MiB with 10 (benchmarks/flow.py): the extra three cover vmap copies
    per += size * (10 * L * n * d + L * n * heads * cfg.d_head) + 8 * 2 * heads * n * n
    fixed += 8 * 3 * L * heads * n * n
    return fixed, per


def estimate_flow_memory(model, n_tokens: int, chunk_size: int | None = None, *, n_rows: int | None = None) -> int:
    """Predicted peak extra bytes of :func:`flow` (jacobian's estimate plus the captured gradients)."""
    rows = n_rows or model.cfg.d_model
    fixed, per = _flow_memory_terms(model, n_tokens, rows)
    return fixed + (chunk_size or min(16, rows)) * per


# --------------------------------------------------------------------------------------------------
# the result
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SensitivityFlow:
    """The true gradient's flow towards ``y`` at ``target_pos``, beside each bound's layer rows.

    Norms are Frobenius norms over the probes (sketch: scaled by ``sqrt(d_model / k)``, the unbiased
    estimator of :mod:`lens_squash.edge.jacobian`). ``sensitivity[l, k] = ‖∂y/∂x^(l)_k‖_F`` for
    ``l = 0..L`` (``L``: ``blocks.{L-1}.hook_resid_post``). Per layer ``l < L`` and position ``k``:
    ``mlp``, ``value`` and ``pattern`` parts (the residual part is ``sensitivity[l+1]``);
    ``value_heads[l, h, k]`` one head's value part; ``edges[l, h, j, k]`` the value edge ``j←k``.
    ``decomposition_error[l]`` is ``‖residual + mlp + value + pattern − g^(l)‖_F / ‖g^(l)‖_F`` over
    every probe and position, measured chunk by chunk. ``bounds[variant]`` is that variant's row at
    every layer (:func:`bound_layer_rows`).
    """

    tokens: Int[Tensor, "pos"]
    str_tokens: tuple[str, ...]
    target_pos: int
    mode: str
    n_probes: int
    sensitivity: Float[Tensor, "layer_plus_1 pos"]
    mlp: Float[Tensor, "layer pos"] | None
    value: Float[Tensor, "layer pos"]
    pattern: Float[Tensor, "layer pos"]
    value_heads: Float[Tensor, "layer head pos"]
    edges: Float[Tensor, "layer head query_pos key_pos"]
    decomposition_error: Float[Tensor, "layer"]
    bounds: dict[str, Tensor] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def n_layers(self) -> int:
        return self.value.shape[0]

    @property
    def n_heads(self) -> int:
        return self.edges.shape[1]

    @property
    def n_tokens(self) -> int:
        return self.sensitivity.shape[-1]

    @property
    def residual(self) -> Float[Tensor, "layer pos"]:
        """The residual part's norm at layer ``l``: ``g^(l+1)`` passes both skips unchanged."""
        return self.sensitivity[1:]

    def check_layer(self, layer: int, *, with_output: bool = True) -> int:
        """``layer`` as an index in ``0..L`` (``0..L-1`` without the output stream); ValueError otherwise."""
        top = self.n_layers if with_output else self.n_layers - 1
        if isinstance(layer, bool) or not isinstance(layer, int) or not -(top + 1) <= layer <= top:
            raise ValueError(
                f"layer={layer!r} is out of range: use 0..{top}"
                + (f" ({self.n_layers} is the final hook_resid_post)" if with_output else "")
            )
        return layer % (top + 1)

    def check_position(self, position: int) -> int:
        """``position`` as an index in ``0..n-1``; ValueError otherwise."""
        return _check_position(position, self.n_tokens)

    def sink_split(self) -> dict[str, Tensor]:
        """Per layer and query position ``j``: the summed norms of the value edges ``j←0`` (sink edges,
        into position 0) and ``j←k, k ≥ 1`` (content edges), and the sink share of their sum."""
        sink = self.edges[:, :, :, 0].sum(1)
        content = self.edges[:, :, :, 1:].sum((1, 3))
        share = sink / (sink + content).clamp_min(torch.finfo(torch.float64).tiny)
        return {"sink": sink, "content": content, "sink_share": share}

    def layer_spearman(self) -> dict[str, Tensor]:
        """Per variant, Spearman's ρ between its row and the true sensitivity at every layer ``0..L-1``
        over positions ``0..target`` (NaN where either is constant)."""
        from ..algebra.ranks import spearman

        out = {}
        upto = self.target_pos + 1
        for name, rows in self.bounds.items():
            values = []
            for layer in range(self.n_layers):
                try:
                    values.append(spearman(rows[layer, :upto], self.sensitivity[layer, :upto]))
                except ValueError:
                    values.append(float("nan"))
            out[name] = torch.tensor(values, dtype=torch.float64)
        return out

    def top_paths(self, k: int = 5, *, source: int | None = None, **kwargs):
        """The ``k`` heaviest connected paths of the true flow into the target (:mod:`flow_paths`)."""
        from ..algebra.flow_paths import flow_top_paths

        return flow_top_paths(self, k=k, source=source, **kwargs)

    def plot(self, kind: str = "layers", **kwargs):
        """``layers`` (truth beside each bound at one layer, shared position axis), ``heatmap`` (layer ×
        position, truth beside each bound), ``heads`` (where the flow enters each head) or ``paths``."""
        from ..views import flow_views

        views = {"layers": flow_views.truth_vs_bounds, "heatmap": flow_views.layer_heatmaps,
                 "heads": flow_views.head_grid, "paths": flow_views.path_figure}
        if kind not in views:
            raise ValueError(f"unknown kind {kind!r}; use one of {sorted(views)}")
        return views[kind](self, **kwargs)

    def to_dict(self, *, include_edges: bool = False) -> dict[str, Any]:
        """Plain JSON; the ``[layer, head, n, n]`` edge norms only with ``include_edges``."""
        out = {
            "tokens": to_jsonable(self.tokens), "str_tokens": list(self.str_tokens),
            "target_pos": self.target_pos, "mode": self.mode, "n_probes": self.n_probes,
            "sensitivity": to_jsonable(self.sensitivity), "residual": to_jsonable(self.residual),
            "mlp": to_jsonable(self.mlp), "value": to_jsonable(self.value), "pattern": to_jsonable(self.pattern),
            "value_heads": to_jsonable(self.value_heads),
            "decomposition_error": to_jsonable(self.decomposition_error),
            "sink_share": to_jsonable(self.sink_split()["sink_share"]),
            "bounds": {name: to_jsonable(rows) for name, rows in self.bounds.items()},
            "metadata": to_jsonable(self.metadata), "seconds": self.seconds,
        }
        if include_edges:
            out["edges"] = to_jsonable(self.edges)
        return out

    __repr__ = compact_repr

    def _repr_html_(self) -> str:
        s0 = self.sensitivity[0]
        top = torch.argsort(s0, descending=True)[:5].tolist()
        shares = self._part_shares()
        rows = [
            ("model", self.metadata.get("model", {}).get("name", "?")),
            ("mode", f"{self.mode} ({self.n_probes} probes)"),
            ("y", f"position {self.target_pos}"),
            ("layers × heads × positions", f"{self.n_layers} × {self.n_heads} × {self.n_tokens}"),
            ("largest ‖∂y/∂x⁽⁰⁾_k‖_F", ", ".join(
                f"{k}: {html.escape(repr(self.str_tokens[k]))} ({float(s0[k]):.3g})" for k in top)),
            ("share of part norms (residual / MLP / value / pattern)",
             " / ".join(f"{shares[name]:.3f}" for name in ("residual", "mlp", "value", "pattern"))),
            ("first-position sink share of value edges", f"{self._sink_total():.3f}"),
            ("max decomposition error (relative)", f"{float(self.decomposition_error.max()):.2e}"),
            ("bounds", ", ".join(self.bounds) or "none"),
            ("seconds", f"{self.seconds:.2f}"),
        ]
        body = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{v if k.startswith('largest') else html.escape(str(v))}</td></tr>"
                       for k, v in rows)
        from ..core.tokens import sensitivity_html  # the input tokens coloured by their sensitivity

        coloured = sensitivity_html(self.str_tokens, s0.tolist(), label="‖∂y/∂x⁽⁰⁾_k‖_F")
        return f"<b>lens_squash SensitivityFlow</b><table>{body}</table>{coloured}"

    def _part_shares(self) -> dict[str, float]:
        mlp = torch.zeros_like(self.value) if self.mlp is None else self.mlp
        parts = {"residual": self.residual, "mlp": mlp, "value": self.value, "pattern": self.pattern}
        total = sum(float(p.sum()) for p in parts.values()) or 1.0
        return {name: float(p.sum()) / total for name, p in parts.items()}

    def _sink_total(self) -> float:
        split = self.sink_split()
        total = float(split["sink"].sum() + split["content"].sum())
        return float(split["sink"].sum()) / total if total > 0 else float("nan")


# --------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------


def _check_probes(model, mode: str, n_probes: int) -> int:
    if mode not in FLOW_MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {FLOW_MODES}")
    d_out = model.cfg.d_model
    if mode != "sketch":
        return d_out
    if isinstance(n_probes, bool) or not isinstance(n_probes, int) or not 1 <= n_probes <= d_out:
        raise ValueError(
            f"n_probes must be an integer in [1, {d_out}] (orthonormal probes in d_model={d_out} "
            f"dimensions), got {n_probes!r}"
        )
    return n_probes


def _sq(x: Tensor) -> Tensor:
    """``Σ_r ‖x_{r,k}‖²`` per position, without a squared copy of ``x``."""
    return torch.linalg.vector_norm(x, dim=(0, 2), dtype=torch.float64).square()


class _Accumulator:
    """Probe sums of squares, chunk by chunk and layer by layer (float64)."""

    def __init__(self, n_layers: int):
        self.n_layers = n_layers
        self.sums: dict[str, Tensor] = {}

    def add(self, name: str, value: Tensor) -> None:
        self.sums[name] = value if name not in self.sums else self.sums[name] + value

    def take(self, raw: dict[str, list[Tensor]], patterns: Tensor, geometry: list[ValueGeometry]) -> None:
        total = raw["resid"]
        self.add(f"total.{self.n_layers}", _sq(total[-1]))
        for layer, geo in enumerate(geometry):
            g, value = total[layer], raw["v"][layer]
            pattern = raw["q"][layer] + raw["k"][layer]
            self.add(f"total.{layer}", _sq(g))
            self.add(f"value.{layer}", _sq(value))
            self.add(f"pattern.{layer}", _sq(pattern))
            parts = pattern.add_(value).add_(total[layer + 1])  # reuses pattern's buffer
            if raw["mlp"]:
                self.add(f"mlp.{layer}", _sq(raw["mlp"][layer]))
                parts.add_(raw["mlp"][layer])
            gap = parts.sub_(g)
            self.add(f"gap.{layer}", _sq(gap).sum())
            for name, value in _edge_terms(raw["z"][layer], patterns[layer], geo).items():
                self.add(f"{name}.{layer}", value)

    def stack(self, name: str, n_layers: int | None = None) -> Tensor | None:
        n_layers = self.n_layers if n_layers is None else n_layers
        if f"{name}.0" not in self.sums:
            return None
        return torch.stack([self.sums[f"{name}.{layer}"] for layer in range(n_layers)])


def _geometry(model, flow_pass: _FlowPass, frozen: bool) -> list[ValueGeometry]:
    centred = model.cfg.normalization_type in ("LN", "LNPre")
    resid, scale = flow_pass.forward_stack("resid"), flow_pass.forward_stack("scale")
    out = []
    for layer, block in enumerate(model.blocks):
        gain = getattr(block.ln1, "w", None)
        out.append(value_geometry(
            resid[layer], block.attn.W_V.detach(), None if gain is None else gain.detach(),
            None if scale is None else scale[layer, :, 0], centred=centred, frozen=frozen,
        ))
    return out


def _bounds(model, used: Tensor, pos: int, variants: tuple[str, ...]) -> dict[str, Tensor]:
    from .trace import trace
    from ..algebra.variants import build_graph

    if not variants:
        return {}
    lipschitz = any(v.startswith("certified") for v in variants)
    traced = trace(model, used, lipschitz=lipschitz)
    return {v: bound_layer_rows(build_graph(traced, v, model=model), pos) for v in variants}


def flow(
    model,
    prompt: str | Tensor,
    *,
    target_pos: int = -1,
    mode: str = "sketch",
    n_probes: int = 64,
    chunk_size: int | None = None,
    variants: tuple[str, ...] | list[str] = DEFAULT_VARIANTS,
    chat: bool | None = None,
    seed: int = 0,
    max_memory_bytes: int | None = None,
) -> SensitivityFlow:
    """The sensitivity flow of ``y`` (the final norm's output at ``target_pos``) through every layer,
    head and value edge, from one batched backward per probe chunk (module docstring).

    ``mode`` is ``exact`` (d_model identity probes), ``sketch`` (``n_probes`` orthonormal probes,
    seeded as in :func:`jacobian.jacobian`) or ``frozen`` (exact probes, patterns and norm scales
    detached). ``variants`` are the bound variants whose layer rows are computed beside the truth
    (``()`` for none; ``certified`` traces MLP gains too). Memory follows jacobian's
    estimate-and-refuse rule with the captured gradients added (:func:`estimate_flow_memory`).
    """
    started = time.perf_counter()
    check_flow_support(model)
    rows = _check_probes(model, mode, n_probes)
    tokens = as_tokens(model, prompt, chat=chat)
    pos = _check_position(target_pos, tokens.shape[0])
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    variants = tuple(variants)
    used = tokens[: pos + 1] if model.cfg.attention_dir == "causal" else tokens
    n, d_out, L = used.shape[0], model.cfg.d_model, model.cfg.n_layers
    fixed, per = _flow_memory_terms(model, n, rows)
    budget = max_memory_bytes if max_memory_bytes is not None else int(MEMORY_FRACTION * available_memory(model.cfg.device))
    chunk = _choose_chunk(fixed, per, rows, chunk_size, budget)
    probes = _probes(mode, d_out, n_probes, seed, model.cfg.dtype, torch.device(model.cfg.device))
    acc, frozen = _Accumulator(L), mode == "frozen"
    with steady_heap(), _without_parameter_grads(model), torch.enable_grad():
        flow_pass = _FlowPass(model, used, pos, frozen)
        geometry = _geometry(model, flow_pass, frozen)
        patterns = flow_pass.forward_stack("pattern")
        for start in range(0, rows, chunk):
            acc.take(flow_pass.raw(probes[start : start + chunk]), patterns, geometry)
        del flow_pass
    patterns = patterns.double().cpu()
    factor = d_out / rows  # the sketch's unbiased scaling (1 for exact probes)
    inv_scale = torch.stack([g.inv_scale for g in geometry]).cpu()
    coef = torch.stack([g.coef for g in geometry]).cpu()
    edges = edge_norms(patterns, inv_scale, coef, acc.stack("t1", L).cpu(), acc.stack("t2", L).cpu())
    k1, k2 = acc.stack("k1", L).cpu(), acc.stack("k2", L).cpu()
    heads = inv_scale[:, None] * (k1 - coef[:, None] * k2).clamp_min(0).sqrt()
    out_dtype = torch.float64 if model.cfg.dtype == torch.float64 else torch.float32

    def norm(name, n_layers=L):
        sums = acc.stack(name, n_layers)
        return None if sums is None else (factor * sums).sqrt().cpu().to(out_dtype)

    total_sq = acc.stack("total").sum(-1).clamp_min(torch.finfo(torch.float64).tiny)
    str_tokens = tuple(model.to_str_tokens(used)) if model.tokenizer is not None else tuple(str(int(t)) for t in used)
    return SensitivityFlow(
        tokens=used.cpu(), str_tokens=str_tokens, target_pos=pos, mode=mode, n_probes=rows,
        sensitivity=norm("total", L + 1), mlp=norm("mlp"), value=norm("value"), pattern=norm("pattern"),
        value_heads=(factor**0.5 * heads).to(out_dtype), edges=(factor**0.5 * edges).to(out_dtype),
        decomposition_error=(acc.stack("gap") / total_sq).sqrt().cpu(),
        bounds=_bounds(model, used, pos, variants),
        metadata=provenance(
            model, n_prompt_tokens=int(tokens.shape[0]), n_tokens=n, target_pos=pos, mode=mode,
            n_vjps=rows, chunk_size=chunk, seed=seed, chat=chat, variants=list(variants),
            estimated_bytes=fixed + chunk * per, max_memory_bytes=budget,
        ),
        seconds=time.perf_counter() - started,
    )
