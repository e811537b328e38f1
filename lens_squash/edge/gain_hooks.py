"""Hooks that compute the certified bound's MLP gains ``‖J_MLP‖_F`` per position during the traced pass.

Each keeps only ``[pos]`` per layer (the Gram identity of :mod:`lens_squash.edge.lipschitz`), never the
MLP's activations; :func:`mlp_gains` divides out the frozen norms' scales once the pass is over.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from .adapter import norm_facts
from .lipschitz import (
    cached_gram_blocks,
    mlp_jacobian_frobenius,
    moe_jacobian_frobenius,
    solu_jacobian_frobenius,
)

__all__ = ["mlp_gain_hooks", "mlp_gains", "stack_layers"]


def mlp_gain_hooks(model, shape, store: dict[str, Tensor]) -> list:
    """Hooks that compute ‖J_MLP‖_F per position as the pass goes, keeping only [pos]. The frozen
    norms' scales are divided out in :func:`_assemble`: post norms fire after the MLP."""
    hooks = []
    if shape.attn_only:
        return hooks
    if shape.moe:
        return _moe_gain_hooks(model, shape, store)
    if shape.solu:
        return _solu_gain_hooks(model, shape, store)
    for layer, block in enumerate(model.blocks):

        def save(name):
            def hook(value, hook):
                store[name] = value[0].detach()

            return hook

        def gain(value, hook, layer=layer, block=block):
            pre = store.pop(f"mlp_pre.{layer}")
            pre_linear = store.pop(f"mlp_pre_linear.{layer}", None)
            norms = mlp_jacobian_frobenius(block, cached_gram_blocks(block, shape), pre, pre_linear)
            store[f"mlp_gain_unscaled.{layer}"] = norms.cpu()

        hooks.append((f"blocks.{layer}.mlp.hook_pre", save(f"mlp_pre.{layer}")))
        if f"blocks.{layer}.mlp.hook_pre_linear" in model.hook_dict:
            hooks.append((f"blocks.{layer}.mlp.hook_pre_linear", save(f"mlp_pre_linear.{layer}")))
        hooks.append((f"blocks.{layer}.mlp.hook_post", gain))
    return hooks


def _solu_gain_hooks(model, shape, store: dict[str, Tensor]) -> list:
    """‖J_MLP‖_F per position for SoLU MLPs, with the neuron LayerNorm's scale frozen (see lipschitz)."""
    hooks = []
    for layer, block in enumerate(model.blocks):
        name = f"blocks.{layer}.mlp"

        def save(key, value, hook):
            store[key] = value[0].detach()

        def gain(value, hook, layer=layer, block=block):
            ln_scale = store.pop(f"solu_ln.{layer}", None)
            pre = store.pop(f"mlp_pre.{layer}")
            norms = solu_jacobian_frobenius(block, shape, pre, None if ln_scale is None else ln_scale[..., 0])
            store[f"mlp_gain_unscaled.{layer}"] = norms.cpu()

        hooks.append((f"{name}.hook_pre", functools.partial(save, f"mlp_pre.{layer}")))
        if f"{name}.ln.hook_scale" in model.hook_dict:
            hooks.append((f"{name}.ln.hook_scale", functools.partial(save, f"solu_ln.{layer}")))
        hooks.append((f"{name}.hook_post", gain))
    return hooks


def _routing(mlp, weights: Tensor, indices: Tensor, cfg) -> Tensor:
    """The weight each expert's output gets, ``[pos, expert]``, as TransformerLens's MoE forward uses it.
    GPT-OSS's hook holds them already; Mixtral's holds the softmax over all experts, which the
    forward then cuts to the top k (and renormalises with ``norm_topk_prob``), in the same float32. A
    bridge's hook holds the final weights, top k and renormalised (the adapter's probe recomputes the
    MoE's output from them, :func:`lens_squash.edge.adapter_mlp.check_moe`)."""
    if type(mlp).__name__ == "GptOssMoE" or hasattr(mlp, "original_component"):
        return weights.reshape(-1, weights.shape[-1]).double()
    top = torch.gather(weights, -1, indices)
    if getattr(cfg, "norm_topk_prob", False):
        top = top / top.sum(dim=-1, keepdim=True)
    return torch.zeros_like(weights, dtype=torch.float64).scatter(-1, indices, top.to(cfg.dtype).double())


def _moe_gain_hooks(model, shape, store: dict[str, Tensor]) -> list:
    """Σ_e g_e ‖J_e‖_F per position for mixture-of-experts MLPs (router weights frozen, see lipschitz)."""
    hooks = []
    for layer, block in enumerate(model.blocks):

        def save(name, value, hook):
            store[name] = value.detach()

        input_hook, affine = _mlp_input_hook(model, layer, shape)

        def moe_input(value, hook, layer=layer, affine=affine):
            value = value[0].detach()
            store[f"moe_in.{layer}"] = value if affine is None else affine(value).detach()

        def gain(value, hook, layer=layer, block=block):
            routing = _routing(
                block.mlp, store.pop(f"expert_weights.{layer}"), store.pop(f"expert_indices.{layer}"), model.cfg
            )
            norms = moe_jacobian_frobenius(block, shape, store.pop(f"moe_in.{layer}"), routing)
            store[f"mlp_gain_unscaled.{layer}"] = norms.cpu()

        name = f"blocks.{layer}"
        hooks.append((f"{name}.mlp.hook_expert_weights", functools.partial(save, f"expert_weights.{layer}")))
        hooks.append((f"{name}.mlp.hook_expert_indices", functools.partial(save, f"expert_indices.{layer}")))
        hooks.append((input_hook, moe_input))
        hooks.append((f"{name}.hook_mlp_out", gain))
    return hooks


def _mlp_input_hook(model, layer: int, shape) -> tuple[str, Any]:
    """A hook whose value gives the MLP's input, and how: the MLP norm's ``hook_normalized`` with its
    gain and bias re-applied, or the residual the MLP reads when no norm precedes it."""
    if shape.mlp_in is None:
        return (f"blocks.{layer}.hook_resid_pre" if shape.parallel else f"blocks.{layer}.hook_resid_mid"), None
    norm = norm_facts(getattr(model.blocks[layer], shape.mlp_in))  # the effective gain (w or 1 + w) and bias

    def affine(normalized: Tensor) -> Tensor:
        out = normalized.double() if norm.gain is None else normalized.double() * norm.gain.to(normalized.device)
        return out if norm.bias is None else out + norm.bias.to(normalized.device)

    return f"blocks.{layer}.{shape.mlp_in}.hook_normalized", affine


def mlp_gains(store: dict[str, Tensor], n_layers: int, shape) -> Tensor | None:
    """``‖J_MLP‖_F / Π s`` per layer and position: the Gram norms over every frozen scale around the MLP."""
    gains = stack_layers(store, "mlp_gain_unscaled", n_layers)
    if gains is None:
        return None
    for site in (s for s in (shape.mlp_in, *shape.mlp_out) if s is not None):
        scale = stack_layers(store, site, n_layers)
        if scale is None:
            raise ValueError(
                f"blocks.{{l}}.{site}.hook_scale did not fire, so the MLP gains cannot include that norm; "
                "use a HookedTransformer or a TransformerBridge in compatibility mode"
            )
        gains = gains / scale.double()
    return gains


def stack_layers(store: dict[str, Tensor], prefix: str, n: int) -> Tensor | None:
    keys = [f"{prefix}.{i}" for i in range(n)]
    return torch.stack([store[k] for k in keys]) if all(k in store for k in keys) else None
