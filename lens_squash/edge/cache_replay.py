"""A trace from an existing TransformerLens ``ActivationCache``, without running the model again.

A user who already ran ``model.run_with_cache(tokens)`` holds every activation the trace's hooks
read. Replaying the hooks on the cached values, in the order the forward pass produced them (the
cache's insertion order), gives the same :class:`~lens_squash.edge.trace.Trace` as a fresh pass. The
cache holds no logits, so the last position's are recomputed from its final representation with the
model's own unembedding (and output soft cap, as TransformerLens's forward applies it).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

__all__ = ["replay_cache"]


def _cache_names(cache) -> list[str]:
    names = list(cache.keys()) if hasattr(cache, "keys") else None
    if names is None:
        raise TypeError(
            f"cache must be a TransformerLens ActivationCache (from model.run_with_cache), got {type(cache).__name__}"
        )
    return names


def replay_cache(model, cache, hooks: list, n_tokens: int) -> Tensor:
    """Call each ``(hook_name, fn)`` on the cached value of its hook, in forward order; return the
    last position's logits. Refuses, naming them, a cache without every hook the trace needs."""
    names = _cache_names(cache)
    needed = dict.fromkeys(name for name, _ in hooks)
    present = set(names)
    missing = [name for name in needed if name not in present]
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise ValueError(
            f"the ActivationCache lacks {len(missing)} hook(s) this trace reads: {shown}; run "
            "model.run_with_cache(tokens) without a names_filter (or one that keeps these names), or trace "
            "without cache= to run the model"
        )
    batched = bool(getattr(cache, "has_batch_dim", True))
    first = cache[names[0]]
    length = first.shape[1] if batched else first.shape[0]
    if batched and first.shape[0] != 1:
        raise ValueError(f"the cache holds a batch of {first.shape[0]} prompts; trace one prompt at a time")
    if length != n_tokens:
        raise ValueError(
            f"the cache holds {length} positions but the prompt has {n_tokens} tokens; pass the tokens it was run on"
        )
    by_name: dict[str, list] = defaultdict(list)
    for name, fn in hooks:
        by_name[name].append(fn)
    with torch.no_grad():
        for name in names:  # insertion order: the order the forward pass produced them
            for fn in by_name.get(name, ()):
                value = cache[name]
                fn(value if batched else value[None], None)
        return _logits_from_cache(model, cache, batched=batched)


def _logits_from_cache(model, cache, *, batched: bool) -> Tensor:
    """``unembed(ln_final(x))`` at the last position, from the cached final residual stream."""
    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    resid = cache[last] if batched else cache[last][None]
    final = model.ln_final(resid[:, -1:]) if hasattr(model, "ln_final") else resid[:, -1:]
    logits = model.unembed(final)
    cap = float(getattr(model.cfg, "output_logits_soft_cap", 0.0) or 0.0)
    if cap > 0.0:
        logits = cap * torch.tanh(logits / cap)
    return logits[0, -1].detach()
