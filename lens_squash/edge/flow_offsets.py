"""Where the sensitivity flow's query, key, value and MLP offsets enter a block, on either backend.

The flow splits the gradient at ``ln1``'s input into a query, a key and a value part, so each of the
three must read ``ln1`` of its own copy of the residual: ``ln1(x + δ_q)``, ``ln1(x + δ_k)``,
``ln1(x + δ_v)`` with every ``δ`` zero. The MLP part is the gradient at ``ln2``'s input.

* A ``HookedTransformer`` block calls ``ln1`` three times, on the query, key and value inputs in that
  order: a forward pre-hook adds the matching offset to each call (:func:`hooked_offsets`).
* A ``TransformerBridge`` block runs the ``transformers`` layer, which calls ``ln1`` once and hands
  its output to the query, key and value projections. A pre-hook on each projection replaces that
  output by ``ln1(x + δ)``, ``ln1`` run again (its hooks included, so the frozen mode's detached scale
  applies) on the stored input ``x`` (:func:`bridge_offsets`). The value is the same (``δ = 0``); the
  graph now has one ``ln1`` per projection, as on the hooked block. The hooks check the block has the
  shape this assumes: ``ln1`` reads the block's input, each projection runs once on ``ln1``'s output.
  A parallel block with one norm for both sublayers (GPT-J, Phi) has no ``ln2``: its MLP reads
  ``ln1``'s output, and gets its own ``ln1(x + δ_mlp)`` the same way. Post-sublayer norms (Gemma-2)
  act on what the sublayers write, after the points offset here, so they need nothing.

On a bridge ``hook_resid_mid`` is ``ln2``'s input hook, which the skip connection does not pass, so
the flow reads the middle gradient as ``g^(l+1) + mlp`` there (:func:`adds_mid_offset`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

from ..core.support import UnsupportedModelError
from .backends import is_bridge

__all__ = ["adds_mid_offset", "bridge_offsets", "check_bridge_blocks", "hooked_offsets", "norm_input_offsets"]

_USE_JACOBIAN = "use jacobian(model, prompt, wrt=l) for layer-wise sensitivity without the decomposition"


def adds_mid_offset(model) -> bool:
    """Whether ``hook_resid_mid`` is the residual between the sublayers (a HookedTransformer block):
    then an offset there gives ``g^(l+½)``. A bridge's is ``ln2``'s input only (module docstring)."""
    return not model.cfg.attn_only and not model.cfg.parallel_attn_mlp and not is_bridge(model)


def check_bridge_blocks(model) -> None:
    """Refuse, in one line, a bridge whose blocks are not sequential pre-norm blocks (post-sublayer norms
    allowed) with separate query, key and value projections (the bridge shapes :func:`bridge_offsets` knows)."""
    cfg = model.cfg
    for layer, block in enumerate(model.blocks):
        names = set(getattr(block, "submodules", {}) or {}) | {name for name, _ in block.named_children()}
        missing = [name for name in ("ln1", "attn") if name not in names]
        # a parallel block may share ln1 between attention and MLP (GPT-J, Phi): then the MLP reads ln1's output
        missing += [] if cfg.attn_only or _shares_ln1(model, block) else [n for n in ("ln2",) if n not in names]
        missing += [
            name for name in ("q", "k", "v") if not isinstance(getattr(block.attn, name, None), torch.nn.Module)
        ]
        # post-sublayer norms (Gemma-2's ln1_post, ln2_post) act after hook_z and on the MLP's output:
        # the captured ∂z and the MLP part at ln2's input already carry them, as on a HookedTransformer
        if missing:
            raise UnsupportedModelError(
                f"the sensitivity flow on a TransformerBridge needs pre-norm blocks with ln1, ln2 and separate "
                f"q/k/v projections; block {layer} lacks {missing}; {_USE_JACOBIAN}"
            )


def _shares_ln1(model, block) -> bool:
    """A parallel bridge block without ``ln2``: its MLP reads ``ln1``'s output, as its attention does."""
    return bool(getattr(model.cfg, "parallel_attn_mlp", False)) and not hasattr(block, "ln2") and hasattr(block, "mlp")


def norm_input_offsets(model, offsets: dict, layers: Iterable[int] | None = None):
    """The backend's offsets context (:func:`hooked_offsets` or :func:`bridge_offsets`)."""
    return (bridge_offsets if is_bridge(model) else hooked_offsets)(model, offsets, layers)


@contextlib.contextmanager
def _removing(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _check_counts(calls: dict, expected: int, what: str) -> None:
    if any(count != expected for count in calls.values()):
        raise UnsupportedModelError(
            f"{what} ran {list(calls.values())} times per block instead of {expected}: this block shape is not the one "
            f"the flow decomposes; {_USE_JACOBIAN}"
        )


def _add_to_ln2(model, offsets: dict, layer: int):
    def hook(module, args):
        return (args[0] + offsets["mlp"][layer],) + tuple(args[1:])

    return model.blocks[layer].ln2.register_forward_pre_hook(hook)


@contextlib.contextmanager
def hooked_offsets(model, offsets: dict, layers: Iterable[int] | None = None) -> Iterator[None]:
    """Add the q/k/v offsets to ``ln1``'s three inputs and the MLP offset to ``ln2``'s input.

    TransformerBlock calls ``ln1`` on the query, key and value inputs in that order (keyword arguments
    evaluate left to right); the count is checked afterwards so a different block shape cannot be
    silently mislabelled. ``offsets[name][layer]`` (a list over layers, or one layer's dict);
    ``layers``: the blocks hooked (all by default).
    """
    layers = range(model.cfg.n_layers) if layers is None else tuple(layers)
    calls = {layer: 0 for layer in layers}
    handles = []

    def ln1_hook(layer):
        def hook(module, args):
            index = calls[layer]
            calls[layer] += 1
            if index > 2:
                return None
            return (args[0] + offsets["qkv"[index]][layer],) + tuple(args[1:])

        return hook

    for layer in layers:
        handles.append(model.blocks[layer].ln1.register_forward_pre_hook(ln1_hook(layer)))
        if offsets["mlp"]:
            handles.append(_add_to_ln2(model, offsets, layer))
    with _removing(handles):
        yield
    _check_counts(calls, 3, "ln1")


@contextlib.contextmanager
def bridge_offsets(model, offsets: dict, layers: Iterable[int] | None = None) -> Iterator[None]:
    """The bridge form: ``ln1`` recomputed on ``x + δ`` for each of the q, k, v projections (module docstring).

    ``x`` is the block's input (``blocks.{l}.hook_resid_pre``, offset included): ``ln1`` must read it,
    else the block is not pre-norm and the parts would be mislabelled.
    """
    layers = range(model.cfg.n_layers) if layers is None else tuple(layers)
    state = {layer: {"x": None, "h": None, "block_in": None, "recomputing": False} for layer in layers}
    calls = {(layer, name): 0 for layer in layers for name in ("ln1", "q", "k", "v")}
    handles = []

    def block_input(layer):
        def hook(module, args, output):
            state[layer]["block_in"] = output

        return hook

    def same(a: Tensor, b: Tensor | None) -> bool:  # the very tensor, or (after a no-op copy) its value
        return a is b or (b is not None and a.shape == b.shape and torch.equal(a, b))

    def ln1_pre(layer):
        def hook(module, args):
            if not state[layer]["recomputing"]:
                calls[layer, "ln1"] += 1
                if not same(args[0], state[layer]["block_in"]):
                    raise UnsupportedModelError(
                        f"block {layer}'s ln1 does not read the block's input (a post-norm block?); {_USE_JACOBIAN}"
                    )
                state[layer]["x"] = args[0]

        return hook

    def ln1_post(layer):
        def hook(module, args, output):
            if not state[layer]["recomputing"]:
                state[layer]["h"] = output

        return hook

    def projection(layer, name):
        def hook(module, args):
            calls[layer, name] += 1
            if not same(args[0], state[layer]["h"]):
                where = "mlp" if name == "mlp" else f"attention.{name}"
                raise UnsupportedModelError(
                    f"block {layer}'s {where} does not read ln1's output directly; {_USE_JACOBIAN}"
                )
            state[layer]["recomputing"] = True
            try:
                normed = model.blocks[layer].ln1(state[layer]["x"] + offsets[name][layer])
            finally:
                state[layer]["recomputing"] = False
            return (normed,) + tuple(args[1:])

        return hook

    for layer in layers:
        block = model.blocks[layer]
        handles.append(model.hook_dict[f"blocks.{layer}.hook_resid_pre"].register_forward_hook(block_input(layer)))
        handles.append(block.ln1.register_forward_pre_hook(ln1_pre(layer)))
        handles.append(block.ln1.register_forward_hook(ln1_post(layer)))
        for name in ("q", "k", "v"):
            handles.append(getattr(block.attn, name).register_forward_pre_hook(projection(layer, name)))
        if offsets["mlp"] and _shares_ln1(model, block):  # the MLP's own ln1(x + δ_mlp), as each projection's
            calls[layer, "mlp"] = 0
            handles.append(block.mlp.register_forward_pre_hook(projection(layer, "mlp")))
        elif offsets["mlp"]:
            handles.append(_add_to_ln2(model, offsets, layer))
    with _removing(handles):
        yield
    _check_counts(calls, 1, "ln1, q, k, v or a shared-norm MLP")
