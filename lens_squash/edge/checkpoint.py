"""Per-block activation checkpointing for input gradients: one block's activations alive at a time.

The plain backward keeps every layer's activations from one forward pass, ``L · H · n²`` numbers for
the attention alone (54 GB for SmolLM2 at n = 4096). Checkpointed, a no-grad forward pass keeps only
what each block was called with: its input residual ``x^(l)`` (``L · n · d``) and the small
arguments the backend passes beside it (rotary tables, the attention mask). The backward then sweeps
the blocks top-down. At block ``l`` the block is run again from ``x^(l)`` under
:func:`torch.func.vjp`, and the cotangents of every probe row, ``G^(l+1)`` ``[row, 1, pos, d_model]``,
pass through its VJP chunk by chunk, in place, giving ``G^(l)``. Each block is recomputed once
whatever the number of chunks, so the extra cost is about one forward pass.

**Exactness.** The recomputed block runs the same operations on the same input as the first pass,
so its activations, and the gradients, are the plain path's. ``frozen`` mode's detach hooks act
inside the recomputed block as they do in the plain pass: the constant patterns and norm scales are
recomputed bit for bit from the same input and then held fixed, so the frozen Jacobian stays exact.

**Backends.** A block is called the way the model called it: a forward pre-hook (``with_kwargs``)
records the arguments of each block call, a hook on ``blocks.{l}.hook_resid_pre`` puts the tracked
input in, and one on ``blocks.{l}.hook_resid_post`` carries the output out. This works on a
``HookedTransformer`` (``TransformerBlock(resid, shortformer_pos_embed=…, attention_mask=…)``) and on
a ``TransformerBridge`` (the wrapped ``transformers`` layer with its ``position_embeddings`` and
mask). A key–value cache among the arguments is dropped: a recomputed block must not append to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from .backward import ReachedHook, check_hooks, freeze_hooks, stop_at

__all__ = [
    "BlockCall",
    "StoredPass",
    "block_calls",
    "head_cotangents",
    "input_gradient_sweep",
    "run_block",
    "store_block_inputs",
]

#: keyword arguments that carry a key–value cache (TransformerLens and transformers names)
_CACHE_KEYWORDS = frozenset({"past_kv_cache_entry", "past_key_value", "past_key_values", "layer_past", "cache"})


@dataclass(frozen=True, eq=False)
class BlockCall:
    """How the model called one block: its arguments with the hidden state taken out, and that
    hidden state's place (``index`` in ``args``, or ``None``: the ``hidden_states`` keyword)."""

    args: tuple
    kwargs: dict[str, Any]
    index: int | None

    def with_input(self, v: Tensor) -> tuple[tuple, dict[str, Any]]:
        if self.index is None:
            return self.args, {**self.kwargs, "hidden_states": v}
        args = list(self.args)
        args[self.index] = v
        return tuple(args), self.kwargs


@dataclass(eq=False)
class StoredPass:
    """What the no-grad forward pass keeps for the sweep: per block ``first..last`` its call and its
    input ``x^(l)`` (``blocks.{l}.hook_resid_pre``), and the last block's output ``top``."""

    first: int
    last: int
    calls: dict[int, BlockCall] = field(default_factory=dict)
    resid: dict[int, Float[Tensor, "1 pos d_model"]] = field(default_factory=dict)
    top: Float[Tensor, "1 pos d_model"] | None = None

    def release(self, layer: int) -> None:
        """Drop block ``layer``'s stored input once the sweep has passed it."""
        self.calls.pop(layer, None)
        self.resid.pop(layer, None)


def _without_cache(kwargs: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in kwargs.items():
        if key in _CACHE_KEYWORDS or type(value).__name__.endswith("Cache"):
            value = None
        elif key == "use_cache":
            value = False
        out[key] = value
    return out


def _block_call(args: tuple, kwargs: dict[str, Any]) -> BlockCall:
    kwargs = _without_cache(kwargs)
    if args and isinstance(args[0], Tensor):
        return BlockCall((None, *args[1:]), kwargs, 0)
    if isinstance(kwargs.get("hidden_states"), Tensor):
        return BlockCall(args, {k: v for k, v in kwargs.items() if k != "hidden_states"}, None)
    raise ValueError(
        "a block was called without its hidden state as the first argument or hidden_states=; "
        "checkpoint=False runs this model without recomputing blocks"
    )


def _keep_call(calls: dict[int, BlockCall], layer: int):
    """A forward pre-hook (``with_kwargs``) that records how block ``layer`` was first called."""

    def hook(module, args, kwargs):
        calls.setdefault(layer, _block_call(args, kwargs))

    return hook


def store_block_inputs(model, tokens: Tensor, first: int, last: int, fwd_hooks: list | tuple = ()) -> StoredPass:
    """One no-grad forward pass, stopped after block ``last``, keeping what :func:`run_block` needs.

    ``fwd_hooks`` run in it too: the frozen mode passes its detach hooks, because on a bridge a hooked
    norm scale takes another code path (the model's dtype, not the float32 kernel), and the stored
    inputs must be the very values the plain frozen pass computes.
    """
    stored = StoredPass(first, last)
    handles = []

    def keep_input(layer):
        def hook(value, hook):
            stored.resid.setdefault(layer, value.detach().clone())

        return hook

    hooks = [*fwd_hooks, *((f"blocks.{layer}.hook_resid_pre", keep_input(layer)) for layer in range(first, last + 1))]
    stop = f"blocks.{last}.hook_resid_post"
    check_hooks(model, (stop, *(name for name, _ in hooks)))
    for layer in range(first, last + 1):
        handles.append(model.blocks[layer].register_forward_pre_hook(_keep_call(stored.calls, layer), with_kwargs=True))
    try:
        with torch.no_grad(), model.hooks(fwd_hooks=[*hooks, (stop, stop_at)]):
            model(tokens[None].to(model.cfg.device))
    except ReachedHook as reached:
        stored.top = reached.value.detach().clone()
    finally:
        for handle in handles:
            handle.remove()
    if stored.top is None or len(stored.calls) != last - first + 1 or len(stored.resid) != last - first + 1:
        raise ValueError(
            f"blocks {first}..{last} did not all run with their hooks in one forward pass; "
            "checkpoint=False runs this model without recomputing blocks"
        )
    return stored


def block_calls(model, tokens: Tensor, layers: range) -> dict[int, BlockCall]:
    """How the model calls each block in ``layers`` (its arguments beside the hidden state), from a
    no-grad forward pass that stops as the last of them begins: only those arguments are kept (on a
    bridge the rotary tables and the attention mask, shared by the blocks), not the hidden states."""
    calls: dict[int, BlockCall] = {}
    handles = []
    stop = f"blocks.{layers[-1]}.hook_resid_pre"
    check_hooks(model, (stop,))
    for layer in layers:
        handles.append(model.blocks[layer].register_forward_pre_hook(_keep_call(calls, layer), with_kwargs=True))
    try:
        with torch.no_grad(), model.hooks(fwd_hooks=[(stop, stop_at)]):
            model(tokens[None].to(model.cfg.device))
    except ReachedHook:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if len(calls) != len(layers):
        raise ValueError(f"blocks {layers[0]}..{layers[-1]} were not all called in one forward pass")
    return calls


def run_block(
    model, layer: int, call: BlockCall, v: Tensor, fwd_hooks: list | tuple = ()
) -> Float[Tensor, "1 pos d_model"]:
    """Block ``layer`` run again on input ``v`` (``blocks.{layer}.hook_resid_pre`` replaced by ``v``)."""
    replaced = []

    def replace(value: Tensor, hook) -> Tensor:
        replaced.append(True)
        return v

    hooks = [(f"blocks.{layer}.hook_resid_pre", replace), *fwd_hooks, (f"blocks.{layer}.hook_resid_post", stop_at)]
    args, kwargs = call.with_input(v)
    try:
        with model.hooks(fwd_hooks=hooks):
            model.blocks[layer](*args, **kwargs)
    except ReachedHook as reached:
        if not replaced:  # the output would not depend on v: a silent zero gradient
            raise ValueError(f"blocks.{layer}.hook_resid_pre never fired, so the input could not be replaced") from None
        return reached.value
    raise ValueError(f"blocks.{layer}.hook_resid_post never fired when block {layer} ran again")


def head_cotangents(
    model,
    top: Float[Tensor, "1 pos d_model"],
    target_pos: int,
    rows: Float[Tensor, "row d_out"],
    *,
    final: bool,
    frozen: bool,
) -> Float[Tensor, "row 1 pos d_model"]:
    """``G^(top)``: each row's gradient at the last block's output, through ``ln_final`` at ``target_pos``
    when ``final`` (its scale detached when ``frozen``); zero at every other position."""
    out = torch.zeros(rows.shape[0], *top.shape, dtype=top.dtype, device=top.device)
    if final and model.cfg.normalization_type is not None:
        hooks = freeze_hooks(model, layers=()) if frozen else []  # ln_final.hook_scale only

        def norm(y: Tensor) -> Tensor:
            with model.hooks(fwd_hooks=hooks):
                return model.ln_final(y)[0, 0]  # per position, so norming only the target is exact

        _, vjp_fn = torch.func.vjp(norm, top[:, target_pos : target_pos + 1])
        (grad,) = torch.func.vmap(vjp_fn)(rows)
        out[:, :, target_pos] = grad[:, :, 0]
    else:
        out[:, 0, target_pos] = rows
    return out


def input_gradient_sweep(
    model,
    stored: StoredPass,
    grads: Float[Tensor, "row 1 pos d_model"],
    chunk: int,
    *,
    frozen: bool,
    wrt: int,
    bar=None,
) -> Float[Tensor, "row 1 pos d_model"]:
    """``G^(wrt)`` from ``G^(last+1)``, block by block top-down, ``chunk`` rows per batched VJP, in place.

    Each block's stored input is released once the sweep has passed it. ``bar`` (a progress counter)
    advances once per chunk.
    """
    for layer in range(stored.last, stored.first - 1, -1):
        hooks = freeze_hooks(model, wrt, layers=(layer,)) if frozen else []
        call = stored.calls[layer]

        def block(v: Tensor, layer=layer, call=call, hooks=hooks) -> Tensor:
            return run_block(model, layer, call, v, hooks)

        _, vjp_fn = torch.func.vjp(block, stored.resid[layer])
        batched = torch.func.vmap(vjp_fn)
        for start in range(0, grads.shape[0], chunk):
            (grads[start : start + chunk],) = batched(grads[start : start + chunk])
            if bar is not None:
                bar.update(1)
        del vjp_fn, batched  # frees this block's graph before the next block is recomputed
        stored.release(layer)
    return grads
