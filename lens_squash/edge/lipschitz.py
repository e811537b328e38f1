"""Local Lipschitz constants of a block with its attention patterns and norm scales frozen.

DESIGN §3 (certified variant). Freeze the patterns ``A`` and every norm scale at their traced values;
a frozen norm is then the linear map ``x ↦ (x P) diag(γ) / s`` (``P`` centres for LayerNorm, ``P = I``
for RMSNorm). Write ``M_in = P diag(γ_in)`` for a norm a sublayer reads through and
``M_out = Π P diag(γ_out)`` for the norms applied to what it writes (:mod:`lens_squash.algebra.blocks`).

**Attention edge.** ``a_j = Σ_h Σ_k A^h_{jk} (x_k M_in / s_in,k) W_V^h W_O^h M_out / s_out,j`` (biases drop
out of the derivative), so ``‖∂a_j/∂x_k‖₂ ≤ (1/s_out,j) Σ_h A^h_{jk} ‖M_in W_V^h W_O^h M_out‖₂ / s_in,k``:
a per-head key factor (:func:`lens_squash.algebra.attention.ov_norms` over ``s_in,k``) and a query factor.
Learned sinks only make ``A``'s rows sub-stochastic; the inequality uses ``A`` as it is.

**MLP at position j.** In row-vector form the MLP's Jacobian is ``Σ_a W'_a diag(c_a,j) W'_out`` with
``W'_a = M_in W_a`` (a = gate and in for gated MLPs) and ``W'_out = W_out M_out``, all over
``s_in,j · s_out,j``. Its Frobenius norm, which bounds the spectral norm, follows from a Gram identity
without forming any ``d_model × d_model`` matrix:

    ‖Σ_a W'_a diag(c_a) W'_out‖_F² = Σ_{a,b} c_aᵀ [(W'_aᵀ W'_b) ∘ (W'_out W'_outᵀ)] c_b,

which costs O(d_mlp²) per position once the ``d_mlp × d_mlp`` Gram matrices are built per layer.
``c_a`` are the elementwise derivatives of the activation. SoLU is not elementwise; its Jacobian is
diagonal plus rank one, which keeps the same Gram route (:func:`solu_jacobian_frobenius`).

**Block.** Sequential: ``‖∂x^(l+1)_j/∂x^(l)_k‖ ≤ (1 + g_j)(δ_jk + E_jk)``, since the MLP acts on
``x^(l+½)_j`` only and ``‖I + J‖ ≤ 1 + ‖J‖_F``. Parallel: ``x^(l+1) = x + attn(x) + mlp(x)``, so
``‖∂x^(l+1)_j/∂x^(l)_k‖ ≤ δ_jk (1 + g_j) + E_jk``: the MLP joins the residual weight.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from ..algebra.blocks import (
    BlockShape,
    apply_input_norm,
    apply_output_norms,
    block_shape,
    weight_signature,
)
from ..algebra.symmetric_forms import LowerBlocks, lower_blocks, quadratic_form
from .adapter import activation, mlp_matrices, norm_facts, norm_weight, read_model
from .experts import expert_glu, moe_experts
from .weight_cache import FactorCache

__all__ = [
    "GRAM_CACHE_BYTES",
    "cached_gram",
    "cached_gram_blocks",
    "gram_cache_budget",
    "mlp_gain_gram",
    "mlp_jacobian_frobenius",
    "moe_jacobian_frobenius",
    "solu_jacobian_frobenius",
    "supports_certified",
]


def supports_certified(model) -> BlockShape:
    """The model's block shape (:mod:`lens_squash.edge.adapter`); refuses (``UnsupportedModelError``)
    what the certified bound does not model."""
    return block_shape(read_model(model))


def _norm(block, site: str):
    """The frozen norm at ``site`` with its effective gain (Gemma's ``1 + w``), read by the adapter."""
    return norm_facts(getattr(block, site))


def _folded(block, shape: BlockShape, mats: list[Tensor], w_out: Tensor) -> tuple[Tensor, Tensor]:
    """``W'_in = [M_in W_a]_a`` ([d_model, k·d_mlp]) and ``W'_out = W_out M_out`` ([d_mlp, d_model]):
    the MLP's matrices with the block's frozen norms folded in (float64)."""
    mats = [w.detach().double() for w in mats]
    if shape.mlp_in is not None:
        mats = [apply_input_norm(w, _norm(block, shape.mlp_in), dim=0) for w in mats]
    return torch.cat(mats, dim=1), apply_output_norms(w_out, [_norm(block, s) for s in shape.mlp_out])


def _gram_from(block, shape: BlockShape, mats: list[Tensor], w_out: Tensor) -> Tensor:
    """``[(W'_aᵀ W'_b) ∘ (W'_out W'_outᵀ)]_{a,b}`` for input matrices ``mats`` ([d_model, d_mlp] each)
    and ``w_out`` ([d_mlp, d_model]), with the block's frozen MLP norms folded in (float64)."""
    w_in, w_out = _folded(block, shape, mats, w_out)
    copies = w_in.shape[1] // w_out.shape[0]
    return (w_in.T @ w_in) * (w_out @ w_out.T).repeat(copies, copies)


def _gram_blocks_from(block, shape: BlockShape, mats: list[Tensor], w_out: Tensor) -> LowerBlocks:
    """:func:`_gram_from` as its lower block columns (:mod:`lens_squash.algebra.symmetric_forms`):
    only those products are computed, and ``W'_out W'_outᵀ`` once, not per copy."""
    w_in, w_out = _folded(block, shape, mats, w_out)
    out_gram = w_out @ w_out.T
    d_mlp, size = w_out.shape[0], w_in.shape[1]
    neuron = torch.arange(size, device=w_in.device) % d_mlp  # which neuron each stacked index is
    w_in_rows = w_in.T.contiguous()  # row slices of a contiguous copy: the strided transpose was 1.4× slower

    def entries(start: int, stop: int) -> Tensor:
        out = out_gram.index_select(0, neuron[start:]).index_select(1, neuron[start:stop])
        return (w_in_rows[start:] @ w_in[:, start:stop]).mul_(out)

    return lower_blocks(size, entries)


def _mlp_matrices(block) -> tuple[list[Tensor], Tensor]:
    return mlp_matrices(block)  # gate first when gated; a bridge's plain MLP has W_gate = None


def _expert_matrices(expert) -> tuple[list[Tensor], Tensor]:
    """An expert's ``nn.Linear`` weights as row-vector matrices (``x @ W``): the transposes."""
    return [expert.W_gate.weight.T, expert.W_in.weight.T], expert.W_out.weight.T


def mlp_gain_gram(block, shape: BlockShape) -> Float[Tensor, "k_d_mlp k_d_mlp"]:
    """The block's Gram matrix ``[(W'_aᵀ W'_b) ∘ (W'_out W'_outᵀ)]_{a,b}`` stacked over a, b (float64)."""
    return _gram_from(block, shape, *_mlp_matrices(block))


#: bytes of weight-only factors (the Gram matrices) kept in memory between traces; ``None``: a share
#: of the free memory (:data:`lens_squash.edge.weight_cache.MEMORY_SHARE`), so every layer of SmolLM2
#: (1.3 GB as lower blocks) stays on a machine with room for it. They are also kept on disk
#: (:mod:`lens_squash.edge.weight_cache`), so a fresh process reads them instead of rebuilding
GRAM_CACHE_BYTES: int | None = None
_CACHE = FactorCache(budget=lambda: GRAM_CACHE_BYTES)
_GRAMS = _CACHE.entries  # owner → (key, value), weakly keyed


def _cached_bytes() -> int:
    return _CACHE.cached_bytes()


def gram_cache_budget(device: str | torch.device = "cpu") -> int:
    """Bytes the in-memory Gram cache may hold now on ``device`` (:data:`GRAM_CACHE_BYTES`, else a share
    of its free memory)."""
    return _CACHE.memory_budget(device)


def _norm_gains(block, shape: BlockShape) -> list[Tensor | None]:
    # the stored weights, not the effective gains: a cache key needs the parameter's identity and version
    return [norm_weight(getattr(block, site)) for site in (shape.mlp_in, *shape.mlp_out) if site is not None]


def cached_gram(block, shape: BlockShape, expert=None) -> Tensor:
    """:func:`mlp_gain_gram` (or an MoE expert's), reused while every weight it reads is unchanged.

    Building it costs O(d_model · d_mlp²) per layer (seconds on SmolLM2), so a second trace of the
    same model skips it, for as many layers as fit in :data:`GRAM_CACHE_BYTES`. The key is each weight's identity, version and a checksum
    (:func:`lens_squash.algebra.blocks.weight_signature`): ablations and steering edit weights in place, and a
    cache keyed on the block alone served stale gains after ``W_out *= 2``.
    """
    return _cached(block, shape, expert, _gram_from)


def cached_gram_blocks(block, shape: BlockShape, expert=None) -> LowerBlocks:
    """:func:`cached_gram` as :class:`~lens_squash.algebra.symmetric_forms.LowerBlocks`: what the traced
    pass uses (half the work and 56 % of the bytes), cached under the same rule and key."""
    return _cached(block, shape, expert, _gram_blocks_from)


def _cached(block, shape: BlockShape, expert, build):
    """``build(block, shape, mats, w_out)`` for the block's MLP (or ``expert``), from the cache while
    the key holds: which form, the shape, the norms' kinds, and every weight's signature."""
    mats, w_out = _mlp_matrices(block) if expert is None else _expert_matrices(expert)
    owner = block if expert is None else expert
    gains = _norm_gains(block, shape)
    key = (build.__name__, shape, _norm_kinds(block, shape), weight_signature(*mats, w_out, *gains))
    return _CACHE.get(
        owner,
        key,
        lambda: build(block, shape, mats, w_out),
        weights=lambda: [*mats, w_out, *gains],
        label="gram",
    )


def _norm_kinds(block, shape: BlockShape) -> tuple[tuple[str, bool, str], ...]:
    """What the norms folded into a Gram do beyond their weights: class, centring (LayerNorm or RMSNorm)
    and gain convention (``w`` or Gemma's ``1 + w``), as the adapter read them. A bridge's norms share
    one class whatever they compute, so the class alone would let two models with equal weights share
    a cached (or on-disk) Gram."""
    sites = (shape.mlp_in, *shape.mlp_out)
    kinds = []
    for site in sites:
        if site is not None:
            facts = _norm(block, site)
            kinds.append((type(getattr(block, site)).__name__, facts.centred, facts.convention))
    return tuple(kinds)


def _squared_norms(coeff: Tensor, gram: Tensor | LowerBlocks) -> Tensor:
    """``c_pᵀ G c_p`` per position, from a dense Gram or its lower blocks."""
    if isinstance(gram, LowerBlocks):
        return quadratic_form(coeff, gram)
    return torch.einsum("pa,ab,pb->p", coeff, gram, coeff)


def _activation_coefficients(block, pre: Tensor, pre_linear: Tensor | None) -> Tensor:
    """``c`` per position: the MLP's diagonal Jacobian factors, ``[pos, k·d_mlp]``."""
    act = activation(block)
    pre = pre.detach().double().requires_grad_(requires_grad=True)
    with torch.enable_grad():
        value = act(pre)
        # The activation is elementwise, so the gradient of its sum is exactly its derivative.
        (slope,) = torch.autograd.grad(value.sum(), pre)
    if pre_linear is None:
        return slope
    return torch.cat([slope * pre_linear.double(), value.detach()], dim=-1)


def _solu_grams(block, shape: BlockShape) -> tuple[Tensor, Tensor]:
    """``(G_in, G_M)`` of a SoLU MLP: ``W'_inᵀ W'_in`` and ``M Mᵀ`` with ``M = P_m diag(γ_ln) W'_out``
    (the neuron LayerNorm folded into the output side), cached like :func:`cached_gram`."""
    mlp = block.mlp
    w_in = mlp.W_gate if hasattr(mlp, "W_gate") else mlp.W_in  # TL's gated SoLU reads only W_gate
    ln = getattr(mlp, "ln", None)
    gains = (getattr(ln, "w", None), *_norm_gains(block, shape))
    norms = (*_norm_kinds(block, shape), type(ln).__name__)
    key = ("solu", shape, norms, weight_signature(w_in, mlp.W_out, *gains))
    return _CACHE.get(
        mlp, key, lambda: _solu_from(block, shape, w_in), weights=lambda: [w_in, mlp.W_out, *gains], label="solu"
    )


def _solu_from(block, shape: BlockShape, w_in: Tensor) -> tuple[Tensor, Tensor]:
    mlp = block.mlp
    ln = getattr(mlp, "ln", None)
    w_in = w_in.detach().double()
    if shape.mlp_in is not None:
        w_in = apply_input_norm(w_in, _norm(block, shape.mlp_in), dim=0)
    m = apply_output_norms(mlp.W_out, [_norm(block, s) for s in shape.mlp_out])  # [d_mlp, d_model]
    if ln is not None:
        m = apply_input_norm(m, norm_facts(ln), dim=0)
    return w_in.T @ w_in, m @ m.T


def _hadamard_blocks(g_in: Tensor, g_m: Tensor) -> LowerBlocks:
    """``G_in ∘ G_M`` as lower block columns, built per call from the cached Grams: O(d_mlp²) next to
    the form's O(pos · d_mlp²), and only (B + 1)/2B of the dense product is ever held."""
    return lower_blocks(g_in.shape[0], lambda start, stop: g_in[start:, start:stop] * g_m[start:, start:stop])


def solu_jacobian_frobenius(
    block, shape: BlockShape, pre: Float[Tensor, "pos d_mlp"], ln_scale: Float[Tensor, "pos"] | None
) -> Float[Tensor, "pos"]:
    """``‖J_MLP‖_F`` per position for a SoLU MLP, with its neuron LayerNorm's scale frozen (float64).

    ``solu(p) = p ⊙ σ(p)`` with ``σ = softmax(p)`` has the row-form Jacobian ``S = diag(a) − σ uᵀ``,
    ``u = p ⊙ σ``, ``a = σ + u``. So ``J · s_ln = W'_in diag(a) M − (W'_in σ)(uᵀ M)``, and with
    ``‖A − b cᵀ‖_F² = ‖A‖_F² − 2 bᵀ A c + ‖b‖² ‖c‖²`` every term is a quadratic form in the two
    ``d_mlp × d_mlp`` Grams: ``aᵀ(G_in ∘ G_M)a − 2 Σ_i (G_in σ)_i a_i (G_M u)_i + (σᵀ G_in σ)(uᵀ G_M u)``.
    Without the residual norms' scales (divided out by the trace like every MLP gain).
    """
    g_in, g_m = _solu_grams(block, shape)
    p = pre.detach().double()
    sigma = torch.softmax(p, dim=-1)
    u = p * sigma
    a = sigma + u
    gin_sigma, gm_u = sigma @ g_in, u @ g_m  # Grams are symmetric
    squared = (
        quadratic_form(a, _hadamard_blocks(g_in, g_m))
        - 2 * (gin_sigma * a * gm_u).sum(-1)
        + (gin_sigma * sigma).sum(-1) * (gm_u * u).sum(-1)
    )
    norms = squared.clamp_min(0.0).sqrt()
    return norms if ln_scale is None else norms / ln_scale.double()


def moe_jacobian_frobenius(
    block, shape: BlockShape, moe_in: Float[Tensor, "pos d_model"], routing: Float[Tensor, "pos expert"]
) -> Float[Tensor, "pos"]:
    """``Σ_e g_e ‖J_e‖_F`` per position: with the router's weights ``g`` frozen (as ``jacobian``'s
    frozen mode freezes ``hook_expert_weights``) the MoE is ``Σ_e g_e expert_e``, so its Jacobian is
    ``Σ_e g_e J_e`` and the triangle inequality bounds its norm. Each ``‖J_e‖_F`` comes from the
    expert's Gram like a gated MLP's; the coefficients are the exact partial derivatives of the
    expert's elementwise map (GPT-OSS's clamps included) at its biased projections. Without the
    frozen norms' scales (float64)."""
    x = moe_in.detach().double()
    total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for index, expert in enumerate(moe_experts(block)):  # modules, or views of fused tensors (bridges)
        weight = routing[:, index].double()
        if not (weight > 0).any():
            continue
        w_gate, w_in = (m.double() for m in _expert_matrices(expert)[0])
        gate = (x @ w_gate + _bias(expert.W_gate)).requires_grad_(requires_grad=True)
        up = (x @ w_in + _bias(expert.W_in)).requires_grad_(requires_grad=True)
        with torch.enable_grad():
            slope_gate, slope_up = torch.autograd.grad(expert_glu(expert)(gate, up).sum(), (gate, up))
        coeff = torch.cat([slope_gate, slope_up], dim=-1)  # elementwise map: these are its derivatives
        squared = quadratic_form(coeff, cached_gram_blocks(block, shape, expert)).clamp_min(0.0)
        total = total + weight * squared.sqrt()
    return total


def _bias(linear) -> Tensor | float:
    return 0.0 if linear.bias is None else linear.bias.detach().double()


def mlp_jacobian_frobenius(
    block,
    gram: Tensor | LowerBlocks,
    pre: Float[Tensor, "pos d_mlp"],
    pre_linear: Float[Tensor, "pos d_mlp"] | None,
    scale: Float[Tensor, "pos"] | None = None,
) -> Float[Tensor, "pos"]:
    """``‖J_MLP‖_F`` at every position from the block's Gram (dense, :func:`cached_gram`, or its lower
    blocks, :func:`cached_gram_blocks`), divided by the product of the frozen norm scales around the
    MLP at that position (``scale``; None: no norm) (float64)."""
    coeff = _activation_coefficients(block, pre, pre_linear)  # [pos, k·d_mlp]
    squared = _squared_norms(coeff, gram).clamp_min(0.0)
    norms = squared.sqrt()
    return norms if scale is None else norms / scale.double()
