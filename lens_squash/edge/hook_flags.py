"""The hook flags a user switches on a ``TransformerBridge`` (``set_use_split_qkv_input``, ``set_use_attn_in``,
``set_use_attn_result``, ``set_use_hook_mlp_in``): what they change for lens_squash, in one place.

All four only add hook points; the numbers are the same with them on or off. Two move a norm out of the
hooks the frozen mode detaches: with split Q/K/V inputs (or ``use_attn_in``) TransformerLens 4's
attention forks the residual *before* ``ln1`` into one copy per head and normalises each copy with the
raw ``transformers`` norm (``_apply_ln1_per_head``), so ``blocks.{l}.ln1.hook_scale`` fires on the main path, whose output nobody
reads, and freezing it would leave the scale that is used live. :func:`per_head_norms_hooked` routes
those per-head copies through the block's own hooked ``ln1`` instead (its ``hook_scale`` then fires as
``[batch, pos, head, 1]``, exactly as on a ``HookedTransformer`` with the same flag), so a frozen
Jacobian freezes the scale the model uses. The adapter's structure cache is keyed on
:func:`hook_flags`, so a flag switched after a first analysis is probed afresh.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import Tensor

from ..core.support import UnsupportedModelError
from .backends import is_bridge

__all__ = ["HOOK_FLAGS", "check_fork_unhooked", "check_per_head_norms_hooked", "hook_flags", "per_head_norms_hooked"]
__all__ += ["switch_off"]

#: the bridge's user-switchable hook flags, each with the setter that switches it
HOOK_FLAGS = ("use_split_qkv_input", "use_attn_in", "use_attn_result", "use_hook_mlp_in")


def hook_flags(model) -> tuple[bool, ...]:
    """The :data:`HOOK_FLAGS` as set now (all ``False`` where the config lacks one)."""
    return tuple(bool(getattr(model.cfg, flag, False)) for flag in HOOK_FLAGS)


def switch_off(model, flag: str) -> str:
    """The call that switches ``flag`` off, as a refusal names it (``bridge.set_use_attn_in(False)`` on a
    bridge; on a HookedTransformer the config field, set when the model is built)."""
    if is_bridge(model):
        return f"bridge.set_{flag}(False)"
    return f"a HookedTransformerConfig with {flag}=False"


def _hooked_per_head_norm(attn, ln1):
    """An attention's per-head ``ln1`` (``_apply_ln1_per_head``: ``[batch, pos, head, d]`` in and out) run
    through the block's hooked ``ln1``, so its ``hook_scale`` fires (and a frozen pass detaches it). The
    ``ln1`` pre-hook that records the residual for the fork would record the per-head copy instead; the
    recorded residual is put back, so the next fork (keys, values) reads it."""

    def norm(x: Tensor) -> Tensor:
        if attn._ln1_module is None:  # ln1 not wired: the fork read ln1's output, and nothing is renormalised
            return x
        residual = attn._captured_pre_ln_residual
        try:
            return ln1(x)
        finally:
            attn._captured_pre_ln_residual = residual

    return norm


def _forks(model) -> bool:
    return is_bridge(model) and any(getattr(model.cfg, flag, False) for flag in ("use_split_qkv_input", "use_attn_in"))


def _pairs(model) -> list:
    """``(attn, ln1)`` of every block whose attention can fork the residual per head."""
    pairs = [(getattr(block, "attn", None), getattr(block, "ln1", None)) for block in model.blocks]
    return [(attn, ln1) for attn, ln1 in pairs if hasattr(attn, "_apply_ln1_per_head") and ln1 is not None]


def _routed(model) -> bool:
    return any("_apply_ln1_per_head" in vars(attn) for attn, _ in _pairs(model))


#: the hook points on a bridge attention's per-head copies of the residual (before the per-head ln1)
_FORK_HOOKS = ("hook_attn_in", "hook_q_input", "hook_k_input", "hook_v_input")


def check_fork_unhooked(model) -> None:
    """Refuse a trace of a forking bridge with a hook on its per-head residual copies: the trace reads
    ``ln1``'s main-path scale, which equals the per-head ones only while nothing edits the copies."""
    if not _forks(model):
        return
    for layer, block in enumerate(model.blocks):
        for name in _FORK_HOOKS:
            if getattr(getattr(block.attn, name, None), "_forward_hooks", None):
                raise UnsupportedModelError(
                    f"a hook on blocks.{layer}.attn.{name} edits the per-head copies of the residual, whose norm "
                    "scales this bridge computes outside ln1's hooks, so a trace would read scales the model does "
                    "not use; remove the hook (model.reset_hooks()) before tracing"
                )


def check_per_head_norms_hooked(model) -> None:
    """RuntimeError where a bridge forks the residual per head outside :func:`per_head_norms_hooked`: a
    frozen pass there would detach ``ln1``'s unused main-path scale and keep the used ones live."""
    if _forks(model) and not _routed(model):
        raise RuntimeError(
            "lens_squash ran a frozen pass on a bridge with split Q/K/V inputs outside per_head_norms_hooked; "
            "this is a bug in lens_squash"
        )


@contextlib.contextmanager
def per_head_norms_hooked(model) -> Iterator[None]:
    """Inside the block, a bridge with split Q/K/V inputs (or ``use_attn_in``) normalises each head's copy
    of the residual through the block's hooked ``ln1`` (module docstring); restored on exit. Other models
    are left as they are."""
    if not _forks(model) or _routed(model):
        yield  # nothing forks, or an enclosing block already routes the norms
        return
    # the block re-wires attn._ln1_module on every forward, so the per-head call itself is replaced
    swapped = [attn for attn, _ in _pairs(model)]
    for attn, ln1 in _pairs(model):
        object.__setattr__(attn, "_apply_ln1_per_head", _hooked_per_head_norm(attn, ln1))
    try:
        yield
    finally:
        for attn in swapped:
            object.__delattr__(attn, "_apply_ln1_per_head")
