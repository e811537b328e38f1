"""The model side of over-mixing (Barbero et al. 2025, "Why do LLMs attend to the first token?").

Both backends: a ``HookedTransformer``, or a ``TransformerBridge`` in compatibility mode (masking the
sink needs a pattern hook that feeds the bridge's forward pass; :func:`mask_unsupported` says why not).

* :func:`mask_sink_hooks` removes the attention sink: every query after the first pays nothing to
  key 0, and its row is renormalised to the mass it had (1 for a plain softmax). Query 0 can only
  see key 0, so its row is left alone.
* :func:`residual_streams` runs a batch of token rows and returns every residual stream (the ones
  entering each block and the final one) and, on request, each head's output and pattern.
* :func:`input_jacobian_norms` is ``‖∂h_l,i / ∂x_k‖_F`` for one input position ``k`` (the embedding
  entering block 0), every layer ``l`` and position ``i``, by forward-mode autodiff: one tangent per
  coordinate of ``x_k``, so ``d_model`` tangents give every output at once (reverse mode would need
  one backward pass per output row). Hooks passed in stay active, so the masked or clamped model's
  Jacobian is taken the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.autograd.forward_ad as fwAD
from jaxtyping import Float, Int
from torch import Tensor

from ..core.support import UnsupportedModelError
from .adapter import check_structure, functorch_ready, learned_sinks, pattern_freeze
from .adapter_probe import PATTERN_FREEZE
from .backends import is_bridge
from .backward import check_hooks

__all__ = [
    "Hook",
    "bos_token_id",
    "input_jacobian_norms",
    "mask_sink_hooks",
    "mask_unsupported",
    "residual_hook_names",
    "residual_streams",
]

Hook = tuple[str, Callable]


def _check_hooked(model) -> None:
    """A HookedTransformer, or a TransformerBridge in compatibility mode (the legacy hook names), with
    plain softmax attention."""
    if not hasattr(model, "run_with_hooks") or not hasattr(model, "blocks"):
        raise UnsupportedModelError(
            f"over-mixing hooks each block of a HookedTransformer or TransformerBridge; got a {type(model).__name__}"
        )
    if is_bridge(model):
        check_structure(model)  # a model that is not a causal attention decoder is refused here
        check_hooks(model, residual_hook_names(model))
    if learned_sinks(model):
        raise UnsupportedModelError(
            "this model has learned sink logits in its softmax (use_attention_sinks), so masking key 0 "
            "does not remove its sink; over-mixing without the sink is defined for plain softmax attention"
        )


def mask_unsupported(model) -> str | None:
    """Why :func:`mask_sink_hooks` cannot remove the sink of ``model``, or None."""
    _check_hooked(model)
    if is_bridge(model) and pattern_freeze(model) != PATTERN_FREEZE:
        return (
            "this TransformerBridge runs transformers' own attention and fires hook_pattern after it (replacing it "
            "changes nothing), so key 0 cannot be masked through it; use backend='hooked' (TransformerLens 3.9) "
            "or a family whose bridge computes attention in TransformerLens"
        )
    return None


def bos_token_id(model) -> int | None:
    """The tokenizer's ``<bos>`` id, or ``None`` when the model has no tokenizer or no such token."""
    tokenizer = getattr(model, "tokenizer", None)
    return None if tokenizer is None else getattr(tokenizer, "bos_token_id", None)


def residual_hook_names(model) -> list[str]:
    """``L + 1`` hook names: the residual stream entering each block, then the last block's output."""
    n_layers = model.cfg.n_layers
    return [f"blocks.{layer}.hook_resid_pre" for layer in range(n_layers)] + [f"blocks.{n_layers - 1}.hook_resid_post"]


def mask_sink_hooks(model) -> list[Hook]:
    """Pattern hooks on every layer that zero key 0 for queries ``1…n−1`` and renormalise each row
    to its former mass (a row that put all its mass on key 0 becomes uniform over its other keys).

    On a TransformerBridge the pattern hook must feed the forward pass (the adapter proves it by
    replacing it); where it does not (OPT, GPT-J), this raises with the reason."""
    reason = mask_unsupported(model)
    if reason is not None:
        raise UnsupportedModelError(reason)

    def hook(pattern: Float[Tensor, "batch head_index query_pos key_pos"], hook) -> Tensor:
        n = pattern.shape[-1]
        if n < 2:
            return pattern
        sink = torch.zeros(pattern.shape[-2:], dtype=torch.bool, device=pattern.device)
        sink[1:, 0] = True
        kept = pattern.masked_fill(sink, 0.0)
        rest = kept.sum(-1, keepdim=True)
        causal = torch.ones(n, n, dtype=torch.bool, device=pattern.device).tril() & ~sink
        uniform = causal / causal.sum(-1, keepdim=True)
        # a row whose whole mass sat on key 0 has no other weights to rescale: spread it evenly
        renormalised = torch.where(rest > 0, kept / rest.clamp_min(torch.finfo(pattern.dtype).tiny), uniform.to(kept))
        return renormalised * pattern.sum(-1, keepdim=True)

    return [(f"blocks.{layer}.attn.hook_pattern", hook) for layer in range(model.cfg.n_layers)]


def residual_streams(
    model,
    tokens: Int[Tensor, "batch pos"],
    *,
    fwd_hooks: Sequence[Hook] = (),
    heads: bool = False,
) -> dict[str, Tensor]:
    """One forward pass: ``resid`` ``[batch, layer+1, pos, d_model]``; with ``heads``, also ``z``
    ``[batch, layer, pos, head_index, d_head]`` and ``pattern`` ``[batch, layer, head_index, query_pos, key_pos]``."""
    _check_hooked(model)
    names = residual_hook_names(model)
    store: dict[str, Tensor] = {}

    def keep(name: str):  # by the requested name: a bridge's hook.name is the aliased point's own
        def hook(tensor: Tensor, hook) -> None:
            store[name] = tensor.detach()

        return hook

    wanted = list(names)
    if heads:
        for layer in range(model.cfg.n_layers):
            wanted += [f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.attn.hook_pattern"]
    with torch.no_grad():  # the caller's hooks first: what is stored is what the next layer reads
        model.run_with_hooks(tokens, fwd_hooks=list(fwd_hooks) + [(name, keep(name)) for name in wanted])
    out = {"resid": torch.stack([store[name] for name in names], dim=1)}
    if heads:
        layers = range(model.cfg.n_layers)
        out["z"] = torch.stack([store[f"blocks.{layer}.attn.hook_z"] for layer in layers], dim=1)
        out["pattern"] = torch.stack([store[f"blocks.{layer}.attn.hook_pattern"] for layer in layers], dim=1)
    return out


def input_jacobian_norms(
    model,
    tokens: Int[Tensor, "pos"],
    position: int,
    *,
    fwd_hooks: Sequence[Hook] = (),
    probes: int | None = None,
    seed: int = 0,
    chunk: int = 64,
) -> Float[Tensor, "layer_plus_one pos"]:
    """``‖∂h_l,i / ∂x_k‖_F`` for ``k = position``: ``x_k`` is the residual entering block 0 at ``k``
    and ``h_l`` the residual entering block ``l`` (the last row: the final block's output).

    Forward mode, ``chunk`` tangents per pass. ``probes=None`` is exact (one tangent per coordinate
    of ``x_k``); ``probes=p`` estimates ``‖J‖_F²`` as ``(1/p) Σ ‖J v‖²`` over ``p`` seeded Gaussian
    tangents (unbiased; Hutchinson), ``d_model / p`` times cheaper. Positions before ``k`` get 0
    unless a hook mixes positions (the massive-activation clamp's median norm does).
    """
    _check_hooked(model)
    n, d_model = int(tokens.shape[-1]), model.cfg.d_model
    if not 0 <= position < n:
        raise ValueError(f"position must index one of the {n} tokens, got {position}")
    if probes is not None and (not isinstance(probes, int) or probes < 1):
        raise ValueError(f"probes must be a positive int (or None for the exact norm), got {probes!r}")
    if probes is None:
        directions = torch.eye(d_model, dtype=torch.float64)
    else:
        generator = torch.Generator().manual_seed(seed)
        directions = torch.randn(probes, d_model, generator=generator, dtype=torch.float64) / probes**0.5
    names = residual_hook_names(model)
    squared = torch.zeros(len(names), n, dtype=torch.float64)
    for start in range(0, len(directions), chunk):
        squared += _tangent_squares(model, tokens, position, directions[start : start + chunk], fwd_hooks, names)
    return squared.sqrt()


def _tangent_squares(model, tokens, position, directions, fwd_hooks, names) -> Tensor:
    """``Σ_v ‖∂h_l,i/∂x_k · v‖²`` over the rows ``v`` of ``directions``, every layer and position."""
    batch = len(directions)
    tangents: dict[str, Tensor] = {}

    def seed(resid: Tensor, hook) -> Tensor:
        tangent = torch.zeros(batch, *resid.shape[1:], dtype=resid.dtype, device=resid.device)
        tangent[:, position] = directions.to(tangent)
        return fwAD.make_dual(resid.expand(batch, -1, -1).clone(), tangent)

    def read(name: str):  # by the requested name, as residual_streams
        def hook(resid: Tensor, hook) -> None:
            tangent = fwAD.unpack_dual(resid).tangent
            tangents[name] = torch.zeros_like(resid) if tangent is None else tangent.detach()

        return hook

    hooks = [("blocks.0.hook_resid_pre", seed), *fwd_hooks, *[(name, read(name)) for name in names]]
    # functorch_ready: BLOOM's GeLU is an autograd.Function without a forward-mode rule
    with torch.no_grad(), fwAD.dual_level(), functorch_ready(model):
        # every row carries the prompt: batch-shaped side inputs (BLOOM's ALiBi on a bridge) match the tangents
        model.run_with_hooks(tokens.reshape(1, -1).expand(batch, -1), fwd_hooks=hooks)
    return torch.stack([tangents[name].double().pow(2).sum(dim=(0, -1)).cpu() for name in names])
