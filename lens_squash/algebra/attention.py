"""Attention-graph algebra: head aggregation, the residual-augmented ``Ā``, windows, OV norms.

The paper's bound (Theorem 5.1 / B.5) composes one matrix per layer. A layer has ``H`` heads, each
a causal row-stochastic ``A^(l,h)``; the layer's attention ``A^(l)`` is a convex combination of them
(the mean by default, DESIGN §2), so it stays causal and row-stochastic. ``Ā^(l) = A^(l)/β_1 + I`` adds
the residual connection. The certified variant needs what a head can carry from a key: the spectral
norm of its OV circuit after the frozen pre-attention norm, ``‖P diag(γ1) W_V^h W_O^h‖₂`` (``P``
centres for LayerNorm), computed here from the weights.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor

from ..core.shapes import HeadStack, LayerMatrices
from ..core.support import UnsupportedModelError
from .blocks import apply_input_norm, apply_output_norms, block_shape
from .model_facts import facts_of

__all__ = [
    "aggregate_heads",
    "attention_defects",
    "check_attention",
    "head_weights",
    "local_window_mask",
    "expanded_values",
    "ov_norms",
]


def attention_defects(patterns: Tensor, *, group: int = 16) -> dict[str, float]:
    """How far ``patterns`` are from causal attention: the largest row-sum deviation from 1 (and, apart,
    by how much rows exceed 1 and fall short of it), the largest mass above the diagonal in one matrix,
    and the smallest entry (NaN when any entry is not finite). A few matrices at a time, with no masked
    copies: an n = 2048 stack stays in place.
    """
    if patterns.ndim < 2 or patterns.shape[-1] != patterns.shape[-2]:
        raise ValueError(f"attention matrices must be square [.., query_pos, key_pos], got {tuple(patterns.shape)}")
    flat = patterns.reshape(-1, *patterns.shape[-2:])
    positions = torch.arange(flat.shape[-1], device=flat.device)
    above = (positions[:, None] < positions[None, :]).to(flat.dtype)  # keys after the query
    excess, deficit, upper, smallest = 0.0, 0.0, 0.0, float("inf")
    for start in range(0, flat.shape[0], group):
        block = flat[start : start + group]
        sums = block.sum(-1)  # NaN or ±inf entries make their row sum non-finite
        if not torch.isfinite(sums).all():
            nan = float("nan")
            return {
                "row_deviation": nan,
                "row_excess": nan,
                "row_deficit": nan,
                "above_diagonal": nan,
                "min_entry": nan,
            }
        excess = max(excess, float((sums - 1).max()))
        deficit = max(deficit, float((1 - sums).max()))
        upper = max(upper, float(torch.tensordot(block, above, dims=([1, 2], [0, 1])).max()))
        smallest = min(smallest, float(block.amin()))
    return {
        "row_deviation": max(excess, deficit),
        "row_excess": max(excess, 0.0),
        "row_deficit": max(deficit, 0.0),
        "above_diagonal": upper,
        "min_entry": smallest,
    }


#: the float32-era tolerance, kept as a floor: ~840 float32 eps, far above float32/float64 softmax rounding
_TOLERANCE_FLOOR = 1e-4


def pattern_tolerance(dtype: torch.dtype, n_keys: int) -> float:
    """How far a softmax row computed in ``dtype`` may miss 1: ``max(1e-4, eps · (2 + √n / 4))``.

    Why: rounding each output entry to ``dtype`` moves the row sum by at most ``u Σ p = eps/2``
    (measured on SmolLM2 at 71 and 276 tokens: 0.37 eps in bfloat16 and float16, independent of the
    length, as the softmax accumulates in float32); a kernel that also accumulates the normaliser in
    ``dtype`` adds rounding that grows like a random walk, ``√n · u``. ``2 eps + √n eps / 4`` covers
    both with a margin of 4× or more, and stays far below what scores instead of patterns, or a
    second softmax, would show.
    """
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    return max(_TOLERANCE_FLOOR, eps * (2.0 + math.sqrt(max(n_keys, 1)) / 4.0))


def check_attention(
    patterns: Tensor | None,
    *,
    causal: bool = True,
    atol: float | None = None,
    defects: dict | None = None,
    dtype: torch.dtype | None = None,
    substochastic: bool = False,
    n_keys: int | None = None,
) -> None:
    """Refuse tensors that are not attention patterns of a causal model, saying what is wrong.

    ``dtype`` is the precision the patterns were computed in (default: theirs); ``atol`` defaults to
    :func:`pattern_tolerance` of it. ``substochastic=True`` accepts rows that sum to less than 1 (learned
    attention sinks take a share of every row). ``defects`` (from :func:`attention_defects`, e.g.
    recorded by ``trace``) skips the scan; with ``defects`` and ``dtype`` given, ``patterns`` may be
    ``None`` (a trace that streamed them), and ``n_keys`` sets the default tolerance.
    """
    if patterns is None and (defects is None or dtype is None):
        raise ValueError("check_attention without patterns needs their recorded defects and dtype")
    defects = attention_defects(patterns) if defects is None else defects
    dtype = patterns.dtype if dtype is None else dtype
    name = str(dtype).removeprefix("torch.")
    n_keys = patterns.shape[-1] if n_keys is None else n_keys
    atol = pattern_tolerance(dtype, n_keys) if atol is None else atol
    if math.isnan(defects["row_deviation"]):
        raise ValueError(
            f"attention patterns contain NaN or inf (computed in {name}); the model overflowed: rerun it in float32 or float64"
        )
    if defects["min_entry"] < -atol:
        raise ValueError(
            f"attention patterns have negative entries (smallest {defects['min_entry']:.2e}, computed in {name}); "
            "softmax patterns are non-negative: pass blocks.{l}.attn.hook_pattern, not scores"
        )
    excess = defects.get("row_excess", defects["row_deviation"])
    deficit = defects.get("row_deficit", defects["row_deviation"])
    if excess > atol or (deficit > atol and not substochastic):
        raise ValueError(
            f"attention rows must sum to 1 (largest excess {excess:.2e}, largest shortfall {deficit:.2e}; "
            f"tolerance {atol:.1e} for {name}); pass softmax patterns (blocks.{{l}}.attn.hook_pattern), not "
            "scores. Rows that sum to less than 1 by design (learned attention sinks) need substochastic=True, "
            "which trace() sets for models with use_attention_sinks"
        )
    if causal and defects["above_diagonal"] > atol:
        raise UnsupportedModelError(
            f"attention is not causal (keys after the query get weight up to {defects['above_diagonal']:.3g} "
            "in one matrix): this analysis assumes a decoder-only model; bidirectional models are not "
            "covered by Theorem B.5's causal paths. Use a causal (decoder-only) model"
        )


def head_weights(n_layers: int, n_heads: int, scores: Tensor | None = None) -> Float[Tensor, "layer head"]:
    """Convex weights over heads per layer: uniform, or proportional to non-negative ``scores``."""
    if scores is None:
        return torch.full((n_layers, n_heads), 1.0 / n_heads, dtype=torch.float64)
    if scores.shape != (n_layers, n_heads) or (scores < 0).any():
        raise ValueError(f"head scores must be non-negative with shape ({n_layers}, {n_heads})")
    totals = scores.sum(-1, keepdim=True)
    return torch.where(totals > 0, scores / totals.clamp_min(1e-300), 1.0 / n_heads)


def aggregate_heads(patterns: HeadStack, weights: Tensor | None = None) -> LayerMatrices:
    """``A^(l) = Σ_h w_{l,h} A^(l,h)`` with convex weights (default: the mean over heads)."""
    n_layers, n_heads = patterns.shape[:2]
    w = head_weights(n_layers, n_heads, weights).to(patterns)
    return torch.einsum("lh,lhqk->lqk", w, patterns)


def local_window_mask(n_tokens: int, window: int) -> Float[Tensor, "query_pos key_pos"]:
    """Boolean mask of the keys a query may see under causal local attention of ``window`` keys
    (itself and the ``window − 1`` before it), as in Gemma 2 and TransformerLens's local attention."""
    if window < 1:
        raise ValueError(f"window must be at least 1 (the query itself), got {window}")
    query = torch.arange(n_tokens)[:, None]
    key = torch.arange(n_tokens)[None, :]
    return (key <= query) & (key > query - window)


def expanded_values(attn, n_heads: int) -> Float[Tensor, "head d_model d_head"]:
    """``W_V`` with one matrix per query head. A HookedTransformer's GQA property is already expanded;
    a TransformerBridge gives one per key/value head, each read by ``n_heads / n_kv`` consecutive
    query heads (``repeat_interleave``, as TransformerLens's own expansion)."""
    w_v = attn.W_V.detach()
    if w_v.shape[0] == n_heads:
        return w_v
    if w_v.ndim == 3 and n_heads % w_v.shape[0] == 0:
        return w_v.repeat_interleave(n_heads // w_v.shape[0], dim=0)
    raise ValueError(
        f"attn.W_V has {w_v.shape[0]} heads, which does not divide the {n_heads} query heads; "
        "expected [head or kv_head, d_model, d_head]"
    )


def ov_norms(model) -> Float[Tensor, "layer head"]:
    """For a model or its :class:`~lens_squash.algebra.model_facts.ModelFacts`: per layer and query head, the Lipschitz constant of what the head writes per unit of attention
    from a key once every norm around it is frozen (float64):

        ‖P diag(γ1) W_V^h W_O^h · Π_{post norms} P diag(γ_post)‖₂

    The input factor ``P diag(γ1)`` is there when a norm reads the residual stream before attention
    (pre-norm; the certified bound divides by that norm's scale at the key); the output factors
    when norms act on what attention writes (Gemma-2's ``ln1_post``, OLMo-2's ``ln1``; the bound
    divides by their scales at the query). ``P = I − 11ᵀ/d`` is LayerNorm's centring; RMSNorm and
    norm-free models have ``P = I``. With ``clip_qkv`` the clamp between ``W_V`` and ``W_O`` has a 0/1
    Jacobian, so the product ``‖P diag(γ1) W_V‖₂ ‖W_O ⋯‖₂`` is used instead (it bounds every clamp).
    """
    facts = facts_of(model)  # a model, or its ModelFacts (lens_squash.edge.adapter)
    shape = block_shape(facts)
    norms = torch.zeros(len(facts.layers), facts.n_heads, dtype=torch.float64)
    for layer, weights in enumerate(facts.layers):
        w_v = weights.w_v.double()  # [head, d_model, d_head], one per query head
        if shape.attn_in is not None:
            w_v = apply_input_norm(w_v, weights.norms[shape.attn_in], dim=1)
        w_o = apply_output_norms(weights.w_o, [weights.norms[s] for s in shape.attn_out])  # [head, d_head, d_model]
        if shape.value_clip:
            norms[layer] = torch.linalg.matrix_norm(w_v, ord=2) * torch.linalg.matrix_norm(w_o, ord=2)
            continue
        # ‖W_V W_O‖₂ through the thin QR of W_V: the d_model×d_model product has rank ≤ d_head; and
        # ‖X‖₂² = λ_max(X Xᵀ) on the d_head×d_head Gram (an SVD of X costs ~8× more: 5 s on SmolLM2)
        _, r = torch.linalg.qr(w_v)
        x = r @ w_o
        norms[layer] = torch.linalg.eigvalsh(x @ x.transpose(-1, -2))[..., -1].clamp_min(0.0).sqrt()
    return norms
