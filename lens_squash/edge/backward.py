"""The hooked forward pass every input-gradient method shares (jacobian, flow, their checkpointed forms).

TransformerLens's activation cache is detached, so gradients are taken through a *hooked* forward
pass: a hook replaces an activation with a tracked tensor, hooks detach what the frozen mode holds
fixed, and a hook that raises ends the pass as soon as the wanted activation exists. The pieces here
work on a ``HookedTransformer`` and on a ``TransformerBridge`` in compatibility mode alike.

* :func:`without_parameter_grads`: parameters out of autograd for the call, so the graph holds only
  what the input gradient needs.
* :func:`freeze_hooks`: the ``frozen`` mode's detach hooks (attention patterns, norm scales,
  mixture-of-experts router weights: the three things the certified bound holds fixed, DESIGN §3).
* :func:`run_until`: the value of one hook from a forward pass that stops there.
* :func:`probes`: the cotangent rows (identity rows, or ``k`` Haar-random orthonormal probes).
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from .adapter import check_frozen, functorch_ready, pattern_freeze
from .backends import is_bridge
from .hook_flags import check_per_head_norms_hooked, per_head_norms_hooked

__all__ = [
    "FROZEN_SUFFIXES",
    "ReachedHook",
    "check_chunk_size",
    "check_hooks",
    "check_position",
    "freeze_hooks",
    "input_value",
    "probes",
    "run_until",
    "stop_at",
    "without_parameter_grads",
]

#: hooks the frozen mode detaches: attention patterns, norm scales, and mixture-of-experts router
#: weights (frozen like the patterns; the certified bound assumes all three). On a bridge whose
#: ``hook_pattern`` fires after transformers' attention ran (OPT, GPT-J) the pattern is frozen by
#: detaching its queries and keys instead (:func:`lens_squash.edge.adapter.pattern_freeze`).
FROZEN_SUFFIXES = (".hook_scale", "attn.hook_pattern", "mlp.hook_expert_weights")

#: TransformerLens 4's bridge norms on the native-autograd path (OPT, NeoX, Phi, StableLM, OLMo) warn
#: when a hook edits ``hook_scale``, and then compute ``(x − mean) / scale · w + b`` from the edited
#: scale. That reconstruction is the norm with its scale frozen, exactly what the frozen mode means
#: (tests/test_bridge_conformance.py matches it to HF autograd with replayed scales, 1e-10 in
#: float64), so the warning is only ignored for this message from that module.
_NATIVE_NORM_FALLBACK = "A forward hook edited hook_scale/hook_normalized on the native-autograd path"
_NATIVE_NORM_MODULE = r"transformer_lens\.model_bridge\.generalized_components\.normalization"


@contextlib.contextmanager
def without_parameter_grads(model) -> Iterator[None]:
    """Parameters out of autograd inside the block, restored exactly as found.

    Only the input needs gradients: parameters that require grad would make autograd record (and
    keep alive) the whole graph, embeddings included.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(requires_grad=False)
    try:
        # BLOOM's GeLU is an autograd.Function torch.func cannot transform; a bridge's per-head ln1 (split
        # Q/K/V inputs) runs through its hooks, so the frozen mode's detach reaches the scale it uses
        with functorch_ready(model), per_head_norms_hooked(model):
            yield
    finally:
        for p in params:
            p.requires_grad_(requires_grad=True)


def _detach(value: Tensor, hook) -> Tensor:
    return value.detach()


def _detach_routed(model):
    """``_detach`` for a bridge's ``ln1.hook_scale`` where split Q/K/V inputs fork the residual: it checks,
    as it runs, that the per-head norms fire it (else it would freeze an unused scale)."""

    def detach(value: Tensor, hook) -> Tensor:
        check_per_head_norms_hooked(model)
        return value.detach()

    return detach


def freeze_hooks(model, wrt: int = 0, layers: Iterable[int] | None = None) -> list[tuple[str, Any]]:
    """Detach hooks for every attention pattern, norm scale and MoE router weight the input can reach.

    ``wrt``: blocks before it are not frozen (the input enters at ``blocks.{wrt}``); non-block hooks
    (``ln_final.hook_scale``) always are. ``layers``: only those blocks' hooks (a checkpointed sweep
    reruns one block at a time), non-block hooks still included.
    """
    check_frozen(model)  # a bridge whose hooks were not shown to act is refused
    suffixes = (".hook_scale", *pattern_freeze(model), "mlp.hook_expert_weights")
    if is_bridge(model):
        warnings.filterwarnings("ignore", message=re.escape(_NATIVE_NORM_FALLBACK), module=_NATIVE_NORM_MODULE)
    wanted = None if layers is None else set(layers)
    names = []
    for name in model.hook_dict:
        if not name.endswith(suffixes):
            continue
        match = re.match(r"blocks\.(\d+)\.", name)
        if match is None:
            names.append(name)
            continue
        layer = int(match.group(1))
        if layer >= wrt and (wanted is None or layer in wanted):
            names.append(name)
    routed = _detach_routed(model)
    return [(name, routed if name.endswith("ln1.hook_scale") else _detach) for name in names]


class ReachedHook(Exception):
    """Raised by a hook to end a forward pass once the activation it carries has been computed."""

    def __init__(self, value: Tensor):
        super().__init__("forward pass stopped by lens_squash.edge.backward")
        self.value = value


def stop_at(value: Tensor, hook) -> None:
    """A hook that ends the forward pass, carrying the activation out (:class:`ReachedHook`)."""
    raise ReachedHook(value)


def check_hooks(model, names: Iterable[str]) -> None:
    """ValueError for a hook name the model lacks (TransformerLens 3's bridge skips one without a word)."""
    missing = [name for name in names if name not in model.hook_dict]
    if missing:
        raise ValueError(
            f"this model has no hook {missing[0]!r}; lens_squash needs a HookedTransformer or a "
            "TransformerBridge after enable_compatibility_mode(no_processing=True)"
        )


def run_until(model, tokens: Tensor, hook_name: str, fwd_hooks: list | tuple = ()) -> Tensor:
    """The value of ``hook_name`` in a forward pass that stops there: no later layer runs.

    A hook that raises, not ``stop_at_layer``: a TransformerBridge ignores ``stop_at_layer=n_layers``
    (no block has that index) and returns the logits, ``ln_final`` and the unembedding applied. The
    hook works the same on both backends; an unknown name (which a bridge skips without a word) is
    an error.
    """
    check_hooks(model, (hook_name, *(n for n, _ in fwd_hooks)))
    try:
        with model.hooks(fwd_hooks=[*fwd_hooks, (hook_name, stop_at)]):
            model(tokens)
    except ReachedHook as reached:
        return reached.value
    raise ValueError(
        f"{hook_name} never fired in the forward pass; lens_squash needs a HookedTransformer or a "
        "TransformerBridge after enable_compatibility_mode(no_processing=True)"
    )


def input_value(model, tokens: Tensor, wrt: int) -> Float[Tensor, "1 pos d_in"]:
    """``blocks.{wrt}.hook_resid_pre`` from a no-grad pass that stops right there."""
    with torch.no_grad():
        return run_until(model, tokens[None].to(model.cfg.device), f"blocks.{wrt}.hook_resid_pre").clone()


def probes(mode: str, d_out: int, n_probes: int, seed: int, dtype, device) -> Float[Tensor, "row d_out"]:
    """The cotangent rows: the identity (exact rows of J) or k orthonormal Gaussian-QR probes."""
    if mode != "sketch":
        return torch.eye(d_out, dtype=dtype, device=device)
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(d_out, n_probes, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    # sign fix makes Q Haar-distributed (QR alone is biased by its sign convention)
    q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))
    return q.T.to(device, dtype).contiguous()


def check_position(target_pos: int, n_tokens: int) -> int:
    """``target_pos`` as an index in ``0..n-1``; ValueError otherwise."""
    if isinstance(target_pos, bool) or not isinstance(target_pos, int) or not -n_tokens <= target_pos < n_tokens:
        raise ValueError(
            f"target_pos={target_pos!r} is outside the prompt's {n_tokens} tokens; use an index in "
            f"[-{n_tokens}, {n_tokens - 1}] (-1 is the last token)"
        )
    return target_pos % n_tokens


def check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
