"""Bound rows: one top-down sweep over the layers, each layer's patterns stored or recomputed.

The bound row ``e_nᵀ M^(L-1) ⋯ M^(0)`` needs the layers last to first, so :func:`stream_bounds`
walks down the layers and advances every variant's row by one layer at a time
(:meth:`lens_squash.algebra.variants.PathGraph.step`). A trace that kept its patterns hands each
stored layer in (its graphs keep the patterns, so flows and top paths stay available); a trace that
streamed them (``trace(..., keep_patterns=False)``, the default for long prompts) kept each layer's
residual stream ``x^(l)`` (``L·n·d`` numbers) but not its ``[head, query_pos, key_pos]`` patterns
(``L·H·n²``), so block ``l`` is rerun on its stored input up to ``hook_pattern`` (the rest of the
block is cut off; a TransformerBridge's block is called with the arguments the model passed it, its
rotary tables and mask). Memory: one layer's patterns at a time, ``H·n²``.

The recomputed patterns must be the traced ones: the sweep compares their first column with the
one the trace kept and refuses, saying why, when they differ (a hook that edits the model
differently the second time). :func:`analysis_memory` estimates what an analysis needs, so that
``analyze`` can refuse a length that will not fit before any work, naming the largest that does.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from ..algebra.bound_rows import BoundRows
from ..algebra.symmetric_forms import N_BLOCKS
from ..algebra.variants import PathBound, PathGraph, build_graph
from ..core.progress import progress
from ..core.support import UnsupportedModelError
from .backends import has_hooked_transformer, is_bridge
from .checkpoint import BlockCall, block_calls
from .fast_attention import fast_attention, global_module_hooks, softmax_over
from .lipschitz import gram_cache_budget
from .trace import Trace, keeps_patterns, streamable

__all__ = [
    "analysis_memory",
    "check_fits",
    "memory_model",
    "recompute_patterns",
    "softmax_after_scores",
    "stream_bounds",
]


class _StopAtPattern(Exception):
    """Raised by the recompute hook once the layer's pattern exists: the rest of the block is not needed."""


def _check_streamable(model) -> None:
    if not streamable(model):
        raise UnsupportedModelError(
            "recomputing a layer's patterns from its stored input needs HookedTransformer blocks or a "
            "TransformerBridge; this model's blocks are neither: trace it with keep_patterns=True"
        )


def _shortformer_embed(model, tokens: Tensor) -> Tensor | None:
    """The positional embedding shortformer models add to queries and keys inside every block."""
    if model.cfg.positional_embedding_type != "shortformer":
        return None
    return model.hook_pos_embed(model.pos_embed(tokens[None].to(model.cfg.device)))


def recompute_patterns(
    model, traced: Trace, layer: int, *, shortformer: Tensor | None = None, call: BlockCall | None = None
) -> Float[Tensor, "head query_pos key_pos"]:
    """Layer ``layer``'s patterns, recomputed from the trace's stored ``blocks.{layer}.hook_resid_pre``
    (analysis dtype, CPU). The input goes back in the model's dtype, which is exact: float16 and
    bfloat16 values survive the trip through float32 unchanged. ``call``: how the model called the
    block (a bridge's block needs its rotary tables and mask: :func:`block_calls`; by default they are
    gathered here, one forward pass).

    Where TransformerLens's attention ends in a plain softmax (:func:`softmax_after_scores`), the
    block stops at ``hook_attn_scores`` and the softmax is taken here, with the same kernel, written over
    the scores, so the patterns are bit-identical; what is skipped is TransformerLens's NaN clean-up, a
    ``where`` over ``H·n²`` entries that only changes NaN rows (about a third of the recompute at
    n = 2048), applied here only when the patterns hold a NaN.
    """
    if traced.resid is None:
        raise ValueError("this trace kept no residual streams, so its patterns cannot be recomputed; trace again")
    own_softmax = softmax_after_scores(model, layer)
    site = "hook_attn_scores" if own_softmax else "hook_pattern"
    if call is None and is_bridge(model):
        call = block_calls(model, traced.tokens, range(layer, layer + 1))[layer]
    value = _run_until(model, traced, layer, site, shortformer, call)
    if own_softmax:
        # the scores were fresh and the block stopped there: unless a global hook kept them, nothing holds them
        value = torch.nn.functional.softmax(value, dim=-1) if global_module_hooks() else softmax_over(value)
        if torch.isnan(value.sum()):  # entries are in [0, 1], so the sum is NaN iff one entry is
            value.masked_fill_(torch.isnan(value), 0.0)
    return value[0].to("cpu", traced.attention_to_first.dtype)


def _run_until(
    model, traced: Trace, layer: int, site: str, shortformer: Tensor | None, call: BlockCall | None = None
) -> Tensor:
    """Block ``layer`` rerun on its stored input until ``blocks.{layer}.attn.{site}`` fires: its value
    (called as ``call`` records, or as a HookedTransformer calls its blocks)."""
    block = model.blocks[layer]
    device = next(block.parameters()).device
    x = traced.resid[layer][None].to(device, model.cfg.dtype)
    if call is None:
        args, kwargs = (x,), {"shortformer_pos_embed": None if shortformer is None else shortformer.to(device)}
    else:
        args, kwargs = call.with_input(x)
    caught: list[Tensor] = []

    def stop(value, hook):
        caught.append(value.detach())
        raise _StopAtPattern

    with torch.no_grad(), model.hooks(fwd_hooks=[(f"blocks.{layer}.attn.{site}", stop)]), fast_attention(model):
        try:
            block(*args, **kwargs)
        except _StopAtPattern:
            pass
    if not caught:
        raise RuntimeError(f"blocks.{layer}.attn.{site} did not fire when block {layer} was rerun")
    return caught[0]


#: what TransformerLens 3.9's attention does between ``hook_attn_scores`` and ``hook_pattern``
#: without learned sinks; a release whose source no longer reads so keeps the whole-block path
_PLAIN_SOFTMAX = (
    "pattern = F.softmax(attn_scores, dim=-1)",
    "pattern = torch.where(torch.isnan(pattern), torch.zeros_like(pattern), pattern)",
    "pattern = self.hook_pattern(pattern)",
)


@functools.cache
def _transformer_lens_plain_softmax(forward) -> bool:
    try:
        source = inspect.getsource(forward)
    except (OSError, TypeError):
        return False
    return all(line in source for line in _PLAIN_SOFTMAX)


def softmax_after_scores(model, layer: int) -> bool:
    """Whether block ``layer``'s patterns are exactly ``softmax(hook_attn_scores)`` with NaNs set to 0:
    TransformerLens's own attention forward (not a subclass's override), no learned sinks, and no
    hook of the user's on ``hook_pattern`` or ``hook_attn_scores`` that the shortcut would skip or
    see in a different order. A bridge's attention is not TransformerLens's own: never."""
    if is_bridge(model) or not has_hooked_transformer():
        return False
    from transformer_lens.components.abstract_attention import AbstractAttention

    attn = model.blocks[layer].attn
    if getattr(model.cfg, "use_attention_sinks", False) or type(attn).forward is not AbstractAttention.forward:
        return False
    hooked = any(getattr(attn, name)._forward_hooks for name in ("hook_pattern", "hook_attn_scores"))
    return not hooked and _transformer_lens_plain_softmax(AbstractAttention.forward)


def _check_same(traced: Trace, layer: int, patterns: Tensor) -> None:
    kept = traced.attention_to_first[layer]
    if not torch.equal(patterns[:, :, 0], kept):
        gap = float((patterns[:, :, 0] - kept).abs().max())
        raise RuntimeError(
            f"recomputing layer {layer}'s attention from its stored input gave different patterns (first "
            f"column off by {gap:.3g}): a hook on the model edits it differently on a second pass; remove "
            "it, or trace with keep_patterns=True"
        )


def _layer_source(model, traced: Trace, *, needs_mean: bool):
    """``layer -> (patterns, head mean)``: the trace's stored ones, or recomputed from the stored input
    (checked against the first column the trace kept; the mean as the trace keeps it: patterns' dtype)."""
    if traced.patterns is not None:
        stored_mean = traced.mean_patterns if needs_mean else None
        return lambda layer: (traced.patterns[layer], None if stored_mean is None else stored_mean[layer])
    _check_streamable(model)
    shortformer = _shortformer_embed(model, traced.tokens)
    calls = block_calls(model, traced.tokens, range(traced.n_layers)) if is_bridge(model) else {}

    def recomputed(layer: int) -> tuple[Tensor, Tensor | None]:
        patterns = recompute_patterns(model, traced, layer, shortformer=shortformer, call=calls.pop(layer, None))
        _check_same(traced, layer, patterns)
        return patterns, patterns.mean(0) if needs_mean else None

    return recomputed


def stream_bounds(
    model,
    traced: Trace,
    variants: Sequence[str],
    *,
    target_pos: int = -1,
    skipped: dict[str, str] | None = None,
) -> dict[str, PathBound]:
    """Every variant's bound row for ``target_pos`` in one top-down sweep over the layers (stored
    patterns, or each layer recomputed when the trace streamed them).

    A variant that cannot apply to the model raises ``UnsupportedModelError``, or, when ``skipped``
    is given, is left out with its reason recorded there (what ``analyze`` does for its defaults).
    """
    graphs: dict[str, PathGraph] = {}
    for name in variants:
        try:
            graphs[name] = build_graph(traced, name, model=model)
        except UnsupportedModelError as error:
            if skipped is None:
                raise
            skipped[name] = str(error)
    rows = BoundRows(traced, graphs, target_pos)  # checks the target first
    if not graphs:
        return {}
    source = _layer_source(model, traced, needs_mean=rows.needs_mean)
    enabled = None if traced.n_tokens >= 1024 else False
    for layer in progress(
        range(traced.n_layers - 1, -1, -1), desc="bound rows", total=traced.n_layers, unit="layer", enabled=enabled
    ):
        rows.add(layer, *source(layer))  # one layer's patterns at a time, then let go
    return rows.finish()


# --------------------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------------------


def memory_model(cfg, n_tokens: int, *, kept: bool, weights: int = 0) -> dict[str, int]:
    """Bytes an ``analyze`` without Jacobian needs at ``n_tokens``, per component (peak estimate),
    from a TransformerLens config alone (so it can be evaluated for shapes one cannot load):

    * ``weights``: the model's parameters (given; already resident, not counted against free memory);
    * ``residual``: the ``L + 1`` residual streams, float32, twice while they are stacked, plus the
      float64 copy of one of them that the compression metrics take at a time (``L·n·d``);
    * ``attention``: one layer's attention in flight: scores, masked scores and patterns,
      ``3·H·n²`` in the model's dtype (at least 4 bytes: softmax runs in float32), plus the
      statistics' float64 ``n × n`` buffers (``~6·n²``) (``H·n²``);
    * ``patterns``: the whole per-head stack and its head mean when they are kept (``(H+1)·L·n²``);
    * ``gains``: the MLP-gain Gram matrices, float64 ``(k·d_mlp)²`` per layer (56 % of it: their lower
      block columns, :mod:`lens_squash.algebra.symmetric_forms`), kept across traces up to
      :func:`lens_squash.edge.lipschitz.gram_cache_budget`, plus the one in use.
    """
    item = torch.finfo(cfg.dtype).bits // 8 if cfg.dtype.is_floating_point else 4
    analysis_item = 8 if cfg.dtype == torch.float64 else 4
    gated = 2 if getattr(cfg, "gated_mlp", False) else 1
    # a Gram is kept as its lower block columns: (B + 1) / 2B of the dense float64 matrix
    gram = (gated * (cfg.d_mlp or 0)) ** 2 * 8 * (N_BLOCKS + 1) // (2 * N_BLOCKS)
    return {
        "weights": int(weights),
        "residual": (cfg.n_layers + 1) * n_tokens * cfg.d_model * 2 * analysis_item + n_tokens * cfg.d_model * 8,
        "attention": 3 * cfg.n_heads * n_tokens**2 * max(item, 4) + 6 * n_tokens**2 * 8,
        "patterns": cfg.n_layers * (cfg.n_heads + 1) * n_tokens**2 * analysis_item if kept else 0,
        # the Gram matrices kept between traces (at most gram_cache_budget()) and the one being used
        "gains": min(cfg.n_layers * gram, gram_cache_budget(getattr(cfg, "device", None) or "cpu")) + gram,
    }


def analysis_memory(model, n_tokens: int, *, keep_patterns: bool | None = None) -> dict[str, int]:
    """:func:`memory_model` for ``model`` (patterns kept as ``trace`` would decide)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return memory_model(
        model.cfg, n_tokens, kept=keeps_patterns(model, n_tokens, keep_patterns=keep_patterns), weights=weights
    )


def check_fits(model, n_tokens: int, *, keep_patterns: bool | None = None, available: int | None = None) -> None:
    """Refuse, in one line with the estimate and the longest prompt that fits, an analysis whose
    memory estimate exceeds what is free on the model's device (``available`` bytes, default: the
    free memory there)."""
    if available is None:
        from .jacobian_memory import available_memory

        available = available_memory(model.cfg.device)

    def need(n: int) -> int:
        parts = analysis_memory(model, n, keep_patterns=keep_patterns)
        return sum(v for k, v in parts.items() if k != "weights")

    needed = need(n_tokens)
    if needed <= available:
        return
    low, high = 1, n_tokens  # need() grows with n: bisect the largest n that fits
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if need(mid) <= available else (low, mid - 1)
    fits = low if need(low) <= available else 0
    patterns = "" if keep_patterns is not True else " with keep_patterns=True (drop it to stream the patterns)"
    raise MemoryError(
        f"analyzing {n_tokens} tokens{patterns} needs about {needed / 2**30:.1f} GiB but {available / 2**30:.1f} GiB "
        f"is free on {model.cfg.device}; the longest prompt that fits is about {fits} tokens"
        + ("" if fits else " (none: free some memory)")
    )
