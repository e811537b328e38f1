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

from .shapes import HeadStack, LayerMatrices

__all__ = [
    "AGGREGATIONS",
    "aggregate_heads",
    "attention_defects",
    "check_attention",
    "head_weights",
    "local_window_mask",
    "ov_norms",
]


def attention_defects(patterns: Tensor, *, group: int = 16) -> dict[str, float]:
    """How far ``patterns`` are from causal attention: the largest row-sum deviation from 1, the
    largest mass above the diagonal in one matrix, and the smallest entry (NaN when any entry is
    not finite). A few matrices at a time, with no masked copies: an n = 2048 stack stays in place.
    """
    if patterns.ndim < 2 or patterns.shape[-1] != patterns.shape[-2]:
        raise ValueError(f"attention matrices must be square [.., query_pos, key_pos], got {tuple(patterns.shape)}")
    flat = patterns.reshape(-1, *patterns.shape[-2:])
    positions = torch.arange(flat.shape[-1], device=flat.device)
    above = (positions[:, None] < positions[None, :]).to(flat.dtype)  # keys after the query
    row, upper, smallest = 0.0, 0.0, float("inf")
    for start in range(0, flat.shape[0], group):
        block = flat[start : start + group]
        sums = block.sum(-1)  # NaN or ±inf entries make their row sum non-finite
        if not torch.isfinite(sums).all():
            return {"row_deviation": float("nan"), "above_diagonal": float("nan"), "min_entry": float("nan")}
        row = max(row, float((sums - 1).abs().max()))
        upper = max(upper, float(torch.tensordot(block, above, dims=([1, 2], [0, 1])).max()))
        smallest = min(smallest, float(block.amin()))
    return {"row_deviation": row, "above_diagonal": upper, "min_entry": smallest}


def check_attention(
    patterns: Tensor, *, causal: bool = True, atol: float = 1e-4, defects: dict | None = None
) -> None:
    """Refuse tensors that are not attention patterns of a causal model, saying what is wrong.

    ``defects`` (from :func:`attention_defects`, e.g. recorded by ``trace``) skips the scan.
    """
    defects = attention_defects(patterns) if defects is None else defects
    if math.isnan(defects["row_deviation"]):
        raise ValueError("attention patterns contain NaN or inf; rerun the model in float32 or float64")
    if defects["row_deviation"] > atol or defects["min_entry"] < -atol:
        raise ValueError(
            f"attention rows must be non-negative and sum to 1 (max deviation {defects['row_deviation']:.2e}, "
            f"smallest entry {defects['min_entry']:.2e}); pass softmax patterns (blocks.{{l}}.attn.hook_pattern), "
            "not scores"
        )
    if causal and defects["above_diagonal"] > atol:
        raise ValueError(
            f"attention is not causal (keys after the query get weight up to {defects['above_diagonal']:.3g} "
            "in one matrix): this analysis assumes a decoder-only model; bidirectional models are not "
            "covered by Theorem B.5's causal paths"
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


#: named head aggregations for the CLI and reports; each maps (patterns, ov_norms) -> weights
AGGREGATIONS = {
    "mean": lambda patterns, ov: None,
    "ov": lambda patterns, ov: ov,
}


def local_window_mask(n_tokens: int, window: int) -> Float[Tensor, "query_pos key_pos"]:
    """Boolean mask of the keys a query may see under causal local attention of ``window`` keys
    (itself and the ``window − 1`` before it), as in Gemma 2 and TransformerLens's local attention."""
    if window < 1:
        raise ValueError(f"window must be at least 1 (the query itself), got {window}")
    query = torch.arange(n_tokens)[:, None]
    key = torch.arange(n_tokens)[None, :]
    return (key <= query) & (key > query - window)


def ov_norms(model, *, centred: bool | None = None) -> Float[Tensor, "layer head"]:
    """``‖P diag(γ1^(l)) W_V^(l,h) W_O^(l,h)‖₂`` for every layer and (query) head, in float64.

    This is the Lipschitz constant of what head ``h`` writes per unit of attention from a key, once
    the key's pre-attention norm scale is frozen (the certified bound divides by that scale).
    ``P = I − 11ᵀ/d`` is LayerNorm's centring; RMSNorm and norm-free models have ``P = I``.
    """
    cfg = model.cfg
    if getattr(cfg, "parallel_attn_mlp", False):
        raise ValueError("parallel attention+MLP blocks are not supported by the certified bound")
    centred = cfg.normalization_type in ("LN", "LNPre") if centred is None else centred
    norms = torch.zeros(cfg.n_layers, cfg.n_heads, dtype=torch.float64)
    for layer, block in enumerate(model.blocks):
        w_v = block.attn.W_V.detach().double()  # [head, d_model, d_head], GQA already expanded
        w_o = block.attn.W_O.detach().double()  # [head, d_head, d_model]
        gain = getattr(block.ln1, "w", None)
        if gain is not None:
            w_v = w_v * gain.detach().double()[None, :, None]
        if centred:
            w_v = w_v - w_v.mean(dim=1, keepdim=True)  # P W: centring acts on the input side
        # ‖W_V W_O‖₂ through the thin QR of W_V: the d_model×d_model product has rank ≤ d_head.
        _, r = torch.linalg.qr(w_v)
        norms[layer] = torch.linalg.matrix_norm(r @ w_o, ord=2)
    return norms
