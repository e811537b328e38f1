"""The sensitivity flow's hooked passes: zero-valued offsets at every point a block's backward step passes.

The forward pass adds a zero-valued differentiable offset at each point below, and
:func:`torch.func.vjp` then returns the gradient at all of them from one vmapped backward:

* ``blocks.{l}.hook_resid_pre`` (and the final ``hook_resid_post``): ``g^(l)``;
* ``blocks.{l}.hook_resid_mid``: ``g^(l+½)``, what the attention sends backwards (on a
  TransformerBridge that hook is ``ln2``'s input only, so ``g^(l+½) = g^(l+1) + mlp`` there);
* the three inputs of ``ln1`` (TransformerLens norms query, key and value inputs separately; a
  bridge's block norms once, so ``ln1`` is run again per projection: :mod:`.flow_offsets`): the
  value part and the pattern part;
* the input of ``ln2``: the MLP part;
* ``blocks.{l}.attn.hook_z``: ``∂z^h_j = W_O^h g^(l+½)_j`` per head.

Two forms. :class:`FlowPass` runs the whole model once under ``vjp`` and keeps every layer's
activations (the plain backward). :func:`block_flow_function` is one block with one layer's offsets,
for the checkpointed sweep (:mod:`lens_squash.edge.flow_sweep`), which recomputes one block at a time
from its stored input (:mod:`lens_squash.edge.checkpoint`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from ..core.display import compact_repr
from ..core.results import Record
from ..core.support import UnsupportedModelError
from .adapter import value_clip
from .backends import has_hooked_transformer, is_bridge
from .backward import ReachedHook, check_position, freeze_hooks, stop_at, without_parameter_grads
from .checkpoint import BlockCall, run_block
from .flow_offsets import adds_mid_offset, check_bridge_blocks, norm_input_offsets
from .hook_flags import HOOK_FLAGS, switch_off
from .jacobian_memory import MODES
from .prompts import Tokens, tokenize

__all__ = [
    "FLOW_MODES",
    "FlowGradients",
    "FlowPass",
    "block_flow_function",
    "check_flow_support",
    "flow_gradients",
    "layer_offsets",
]

FLOW_MODES = MODES  # the request names of lens_squash.edge.gradient, as jacobian takes them


# --------------------------------------------------------------------------------------------------
# which blocks the decomposition covers
# --------------------------------------------------------------------------------------------------


def check_flow_support(model) -> None:
    """Refuse, with one line naming the config field, block shapes the decomposition does not cover.

    Covered: pre-norm blocks (LayerNorm, RMSNorm, their ``Pre`` forms, or none), standard or
    grouped-query attention, causal or bidirectional, with QK norms or score soft-capping (they act on
    the pattern side only), dense, gated or mixture-of-experts MLPs, attention-only models,
    parallel attention+MLP blocks, extra norms after each sublayer (Gemma-2's
    ``use_normalization_before_and_after``: they act after ``hook_z``, so the captured ``∂z`` already
    carries them) and attention sinks (the pattern hooked is the one used).
    """
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

    cfg, clip = model.cfg, value_clip(model)  # a bridge's cfg lacks clip_qkv: the adapter reads it
    refusals = [
        (
            getattr(cfg, "original_architecture", None) in POST_NORM_ARCHITECTURES,
            "original_architecture",
            f"{getattr(cfg, 'original_architecture', None)!r} is a post-norm architecture (the norm follows the sublayer)",
        ),
        (
            getattr(cfg, "use_split_qkv_input", False),
            "use_split_qkv_input",
            "per-head query/key/value inputs are not hooked",
        ),
        (getattr(cfg, "use_attn_in", False), "use_attn_in", "per-head attention inputs are not hooked"),
        (
            clip is not None,
            "clip_qkv",
            "clamped values break the value-edge formula wherever the clamp is active",
        ),
        (
            cfg.positional_embedding_type == "shortformer",
            "positional_embedding_type",
            "shortformer embeddings are added after ln1",
        ),
        (
            cfg.normalization_type not in (None, "LN", "LNPre", "RMS", "RMSPre"),
            "normalization_type",
            f"normalization {cfg.normalization_type!r} is not one the edge formula knows",
        ),
        (cfg.act_fn is not None and str(cfg.act_fn).startswith("solu"), "act_fn", "SoLU normalises inside the MLP"),
    ]
    for refused, name, why in refusals:
        if refused:
            # a bridge's hook flag only adds hooks: switched off, the same model has the same numbers
            fix = f"call {switch_off(model, name)} first, or " if is_bridge(model) and name in HOOK_FLAGS else ""
            raise UnsupportedModelError(
                f"the sensitivity flow does not cover cfg.{name}={clip if name == 'clip_qkv' else getattr(cfg, name, None)!r}: "
                f"{why}; {fix}use "
                "jacobian(model, prompt, wrt=l) for layer-wise sensitivity without the decomposition"
            )
    if is_bridge(model):
        check_bridge_blocks(model)  # the hooks check the rest of its shape as the pass runs
        return
    if not has_hooked_transformer():
        raise UnsupportedModelError(
            "the sensitivity flow needs a HookedTransformer or a TransformerBridge; load the model with "
            "lens_squash.load_model(name)"
        )
    from transformer_lens.components import TransformerBlock

    if not all(isinstance(block, TransformerBlock) for block in model.blocks):
        raise UnsupportedModelError(
            "the sensitivity flow covers TransformerLens TransformerBlock blocks only (cfg.original_architecture="
            f"{getattr(cfg, 'original_architecture', None)!r}); use jacobian(model, prompt) instead"
        )


# --------------------------------------------------------------------------------------------------
# the hooked forward pass with zero-valued offsets
# --------------------------------------------------------------------------------------------------


def _zero_offsets(model, n: int) -> dict[str, list[Tensor]]:
    cfg = model.cfg
    dtype, device = cfg.dtype, torch.device(cfg.device)
    L, d = cfg.n_layers, cfg.d_model
    has_mlp = not cfg.attn_only
    has_mid = adds_mid_offset(model)

    def zeros(*shape):
        return [torch.zeros(1, *shape, dtype=dtype, device=device) for _ in range(L)]

    return {
        "resid": [torch.zeros(1, n, d, dtype=dtype, device=device) for _ in range(L + 1)],
        "mid": zeros(n, d) if has_mid else [],
        "q": zeros(n, d),
        "k": zeros(n, d),
        "v": zeros(n, d),
        "mlp": zeros(n, d) if has_mlp else [],
        "z": zeros(n, cfg.n_heads, cfg.d_head),
    }


def _add(offset: Tensor):
    def hook(value, hook):
        return value + offset

    return hook


def _record(store: dict[str, Tensor], name: str):
    def hook(value, hook):
        store.setdefault(name, value[0].detach().clone())

    return hook


def _flow_function(model, tokens: Tensor, target_pos: int, *, frozen: bool, store: dict[str, Tensor]):
    """``f(offsets) = y_target``: the model with every offset added at its point (all zero)."""
    cfg = model.cfg
    L = cfg.n_layers
    batch = tokens[None].to(cfg.device)

    def f(offsets: dict[str, list[Tensor]]) -> Float[Tensor, "d_out"]:
        hooks = [*(freeze_hooks(model, 0) if frozen else [])]
        for layer in range(L):
            hooks.append((f"blocks.{layer}.hook_resid_pre", _add(offsets["resid"][layer])))
            hooks.append((f"blocks.{layer}.hook_resid_pre", _record(store, f"resid.{layer}")))
            if offsets["mid"]:
                hooks.append((f"blocks.{layer}.hook_resid_mid", _add(offsets["mid"][layer])))
            hooks.append((f"blocks.{layer}.attn.hook_z", _add(offsets["z"][layer])))
            hooks.append((f"blocks.{layer}.attn.hook_pattern", _record(store, f"pattern.{layer}")))
            if f"blocks.{layer}.ln1.hook_scale" in model.hook_dict:
                hooks.append((f"blocks.{layer}.ln1.hook_scale", _record(store, f"scale.{layer}")))
        hooks.append((f"blocks.{L - 1}.hook_resid_post", _add(offsets["resid"][L])))
        # a hook that stops the pass, not stop_at_layer=L, which a TransformerBridge ignores
        hooks.append((f"blocks.{L - 1}.hook_resid_post", stop_at))
        with model.hooks(fwd_hooks=hooks), norm_input_offsets(model, offsets):
            try:
                model(batch)
            except ReachedHook as reached:
                resid = reached.value
            else:
                raise ValueError(f"blocks.{L - 1}.hook_resid_post never fired in the flow's forward pass")
            y = resid[:, target_pos : target_pos + 1]
            if cfg.normalization_type is not None:
                y = model.ln_final(y)  # per position, so norming only the target is exact
        return y[0, 0]

    return f


@dataclass(frozen=True, eq=False)
class FlowGradients(Record):
    """The gradient at every point of one batched backward, for the probe rows it was given.

    Vectors are ``[layer, row, pos, d_model]`` (``total`` has ``layer+1`` entries, the last at the
    final ``hook_resid_post``); ``mlp`` is ``None`` for attention-only models; ``dz`` is
    ``[layer, row, pos, head, d_head]``. Forward quantities are detached: ``patterns``
    ``[layer, head, query_pos, key_pos]``, ``resid`` (each layer's input) and ``scale`` (ln1's, or
    ``None`` without a norm).
    """

    total: Float[Tensor, "layers_covered row pos d_model"]
    mid: Float[Tensor, "layer row pos d_model"]
    mlp: Float[Tensor, "layer row pos d_model"] | None
    value: Float[Tensor, "layer row pos d_model"]
    pattern_query: Float[Tensor, "layer row pos d_model"]
    pattern_key: Float[Tensor, "layer row pos d_model"]
    dz: Float[Tensor, "layer row pos head d_head"]
    patterns: Float[Tensor, "layer head query_pos key_pos"]
    resid: Float[Tensor, "layer pos d_model"]
    scale: Float[Tensor, "layer pos"] | None

    @property
    def residual(self) -> Float[Tensor, "layer row pos d_model"]:
        """The residual part of ``g^(l)``: ``g^(l+1)``, straight through both skip connections."""
        return self.total[1:]

    @property
    def pattern(self) -> Float[Tensor, "layer row pos d_model"]:
        return self.pattern_query + self.pattern_key

    def parts_sum(self) -> Float[Tensor, "layer row pos d_model"]:
        """residual + MLP + value + pattern, each computed at its own node."""
        total = self.residual + self.value + self.pattern
        return total if self.mlp is None else total + self.mlp

    __repr__ = compact_repr


class FlowPass:
    """One forward pass under :func:`torch.func.vjp`; :meth:`raw` runs one batched backward."""

    def __init__(self, model, tokens: Tensor, target_pos: int, *, frozen: bool):
        self.model, self.store = model, {}
        offsets = _zero_offsets(model, tokens.shape[0])
        self.has_mid = bool(offsets["mid"])
        self.has_mlp = bool(offsets["mlp"])
        # a sequential bridge block has no mid offset (its hook_resid_mid is ln2's input): g^(l+½) = g^(l+1) + mlp
        self.mid_adds_mlp = self.has_mlp and not self.has_mid and not model.cfg.parallel_attn_mlp
        f = _flow_function(model, tokens, target_pos, frozen=frozen, store=self.store)
        _, self.vjp_fn = torch.func.vjp(f, offsets)
        self.batched = torch.func.vmap(self.vjp_fn)

    def raw(self, rows: Tensor) -> dict[str, list[Tensor]]:
        """Per point, one ``[row, pos, …]`` gradient per layer (no stacked copies)."""
        (grads,) = self.batched(rows)
        return {name: [g[:, 0] for g in values] for name, values in grads.items()}

    def forward_stack(self, name: str) -> Tensor | None:
        values = [self.store.get(f"{name}.{layer}") for layer in range(self.model.cfg.n_layers)]
        return None if values[0] is None else torch.stack(values)

    def _mid(self, raw: dict[str, list[Tensor]], total: Tensor) -> Tensor:
        if self.has_mid:
            return torch.stack(raw["mid"])
        if self.mid_adds_mlp:
            return total[1:] + torch.stack(raw["mlp"])
        return total[1:]  # parallel or attention-only: the attention reads g^(l+1)

    def gradients(self, rows: Tensor) -> FlowGradients:
        raw = self.raw(rows)
        total = torch.stack(raw["resid"])
        scale = self.forward_stack("scale")
        return FlowGradients(
            total=total,
            mid=self._mid(raw, total),
            mlp=torch.stack(raw["mlp"]) if self.has_mlp else None,
            value=torch.stack(raw["v"]),
            pattern_query=torch.stack(raw["q"]),
            pattern_key=torch.stack(raw["k"]),
            dz=torch.stack(raw["z"]),
            patterns=self.forward_stack("pattern"),
            resid=self.forward_stack("resid"),
            scale=None if scale is None else scale[..., 0],
        )


def flow_gradients(
    model,
    prompt: str | Tensor | Tokens,
    rows: Float[Tensor, "row d_out"],
    *,
    target_pos: int = -1,
    mode: str = "exact",
    chat: bool | None = None,
) -> FlowGradients:
    """Every captured gradient for the cotangent ``rows`` in one batched backward (small models, tests).

    ``mode`` matters only through whether it is frozen: the rows are given."""
    check_flow_support(model)
    if mode not in FLOW_MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {FLOW_MODES}")
    tokens = tokenize(model, prompt, chat=chat)
    target_pos = check_position(target_pos, len(tokens))
    used = tokens.upto(target_pos) if model.cfg.attention_dir == "causal" else tokens
    rows = torch.as_tensor(rows).to(model.cfg.device, model.cfg.dtype)
    if rows.ndim != 2 or rows.shape[1] != model.cfg.d_model:
        raise ValueError(f"rows must be [row, d_model={model.cfg.d_model}], got {tuple(rows.shape)}")
    with without_parameter_grads(model), torch.enable_grad():
        return FlowPass(model, used.ids, target_pos, frozen=mode.startswith("frozen")).gradients(rows)


# --------------------------------------------------------------------------------------------------
# one block at a time (the checkpointed sweep)
# --------------------------------------------------------------------------------------------------


def layer_offsets(model, layer: int, n: int) -> dict[str, dict[int, Tensor]]:
    """Zero offsets for block ``layer`` only, keyed like :func:`_zero_offsets` (``offsets[name][layer]``)."""
    cfg = model.cfg
    dtype, device = cfg.dtype, torch.device(cfg.device)
    has_mlp = not cfg.attn_only
    has_mid = adds_mid_offset(model)

    def zeros(*shape):
        return {layer: torch.zeros(1, *shape, dtype=dtype, device=device)}

    return {
        "mid": zeros(n, cfg.d_model) if has_mid else {},
        "q": zeros(n, cfg.d_model),
        "k": zeros(n, cfg.d_model),
        "v": zeros(n, cfg.d_model),
        "mlp": zeros(n, cfg.d_model) if has_mlp else {},
        "z": zeros(n, cfg.n_heads, cfg.d_head),
    }


def block_flow_function(model, layer: int, call: BlockCall, *, frozen: bool, store: dict[str, Tensor]):
    """``f(v, offsets) = x^(l+1)``: block ``layer`` run again on its input ``v`` with :func:`layer_offsets`
    added; it records the block's pattern and ln1 scale in ``store`` (as :func:`_flow_function` does)."""
    freeze = freeze_hooks(model, 0, layers=(layer,)) if frozen else []

    def f(v: Tensor, offsets: dict[str, dict[int, Tensor]]) -> Float[Tensor, "1 pos d_model"]:
        hooks = [*freeze]
        if offsets["mid"]:
            hooks.append((f"blocks.{layer}.hook_resid_mid", _add(offsets["mid"][layer])))
        hooks.append((f"blocks.{layer}.attn.hook_z", _add(offsets["z"][layer])))
        hooks.append((f"blocks.{layer}.attn.hook_pattern", _record(store, f"pattern.{layer}")))
        if f"blocks.{layer}.ln1.hook_scale" in model.hook_dict:
            hooks.append((f"blocks.{layer}.ln1.hook_scale", _record(store, f"scale.{layer}")))
        with norm_input_offsets(model, offsets, layers=(layer,)):
            return run_block(model, layer, call, v, hooks)

    return f
