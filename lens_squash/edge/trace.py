"""One hooked forward pass that captures what every over-squashing analysis needs.

``trace(model, prompt)`` runs the model once with hooks that keep only reduced quantities (never the
full activation cache): the attention patterns ``A^(l,h)`` (paper §5), the norm scales that the
certified bound freezes (DESIGN §3), the residual-stream norms that reveal massive activations, the
norm of what each head writes per unit of attention from each key (``‖v_k W_O^h‖``, for the
value-weighted variants), the last token's final representation ``y_n`` and its next-token logits.

Hook names are written out literally (``blocks.{l}.attn.hook_pattern``) so the same code runs on a
:class:`HookedTransformer` and on a ``TransformerBridge`` in compatibility mode.
"""

from __future__ import annotations

import functools
import html
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..core import validate
from ..algebra.attention import attention_defects, pattern_tolerance
from ..core.display import compact_repr
from .lipschitz import (
    cached_gram,
    mlp_jacobian_frobenius,
    moe_jacobian_frobenius,
    solu_jacobian_frobenius,
    supports_certified,
)
from .models import check_length, check_model, format_prompt
from ..core.records import provenance
from ..core.support import UnsupportedModelError

__all__ = ["Trace", "as_tokens", "final_representation", "required_hooks", "trace"]


@dataclass(frozen=True, eq=False)
class Trace:
    """What one forward pass of ``model`` on ``tokens`` showed. Tensors are on the CPU.

    Analysis tensors are float32 (float64 when the model is float64), whatever the model's dtype.
    Norm scales are ``None`` for models without that norm; ``ln1_scale``/``ln2_scale`` are
    ``blocks.{l}.ln1/ln2.hook_scale`` wherever those norms sit (before the sublayers in pre-norm
    models, on their outputs in OLMo-2: :mod:`lens_squash.algebra.blocks` says which). ``mlp_gain`` is
    ``‖J_MLP‖_F`` with every frozen norm around the MLP included. ``metadata["attention_check"]``
    records the tolerance the patterns were checked with and whether rows may sum to less than 1.
    """

    tokens: Int[Tensor, "pos"]
    str_tokens: tuple[str, ...]
    patterns: Float[Tensor, "layer head query_pos key_pos"]
    ln1_scale: Float[Tensor, "layer pos"] | None
    ln2_scale: Float[Tensor, "layer pos"] | None
    final_scale: Float[Tensor, "pos"] | None
    resid_norms: Float[Tensor, "layer_plus_1 pos"]
    first_token_resid: Float[Tensor, "layer_plus_1 d_model"]
    value_norms: Float[Tensor, "layer head pos"] | None
    y_last: Float[Tensor, "d_model"]
    last_logits: Float[Tensor, "d_vocab"]
    predicted_token: str
    metadata: dict[str, Any] = field(default_factory=dict)
    resid: Float[Tensor, "layer_plus_1 pos d_model"] | None = None
    mlp_gain: Float[Tensor, "layer pos"] | None = None
    #: the head-mean pattern of every layer, kept so head-averaged bound rows read L·n² numbers, not L·H·n²
    mean_patterns: Float[Tensor, "layer query_pos key_pos"] | None = None
    #: scales of the norms Gemma-2/3 apply to what attention and the MLP write (``ln1_post``, ``ln2_post``)
    ln1_post_scale: Float[Tensor, "layer pos"] | None = None
    ln2_post_scale: Float[Tensor, "layer pos"] | None = None

    @property
    def n_layers(self) -> int:
        return self.patterns.shape[0]

    @property
    def n_heads(self) -> int:
        return self.patterns.shape[1]

    @property
    def n_tokens(self) -> int:
        return self.patterns.shape[-1]

    def first_token_mass(self) -> Float[Tensor, "layer"]:
        """Mean attention (over heads, queries 1..n-1) on position 0, per layer."""
        if self.n_tokens < 2:
            return self.patterns[..., 0].mean(dim=(1, 2))
        return self.patterns[:, :, 1:, 0].mean(dim=(1, 2))

    __repr__ = compact_repr

    def _repr_html_(self) -> str:
        mass = self.first_token_mass()
        rows = "".join(
            f"<tr><td>{name}</td><td>{html.escape(str(value))}</td></tr>"
            for name, value in [
                ("model", self.metadata.get("model", {}).get("name", "?")),
                ("tokens", self.n_tokens),
                ("layers × heads", f"{self.n_layers} × {self.n_heads}"),
                ("predicted next token", repr(self.predicted_token)),
                ("first-token attention mass (min / mean / max over layers)",
                 f"{mass.min():.3f} / {mass.mean():.3f} / {mass.max():.3f}"),
                ("first-token residual norm ÷ median, last layer",
                 f"{(self.resid_norms[-1, 0] / self.resid_norms[-1].median()):.1f}"),
            ]
        )
        return f"<b>lens_squash Trace</b><table>{rows}</table>"


def required_hooks(n_layers: int) -> list[str]:
    """The hooks a trace cannot do without."""
    return [f"blocks.{layer}.attn.hook_pattern" for layer in range(n_layers)] + [
        f"blocks.{layer}.hook_resid_pre" for layer in range(n_layers)
    ] + [f"blocks.{n_layers - 1}.hook_resid_post"]


def as_tokens(model, prompt: str | Tensor, *, chat: bool | None = None) -> Int[Tensor, "pos"]:
    """Token ids for a text prompt (chat template by default) or a 1-D / ``[1, pos]`` id tensor (or
    numpy array), checked before any forward pass: type, emptiness, vocabulary and context length."""
    check_model(model)
    validate.check_chat(chat)
    prompt = validate.check_prompt(prompt)
    if isinstance(prompt, str):
        return format_prompt(model, prompt, chat=chat)
    tokens = validate.check_token_ids(prompt, model.cfg.d_vocab)
    check_length(model, tokens.shape[0])
    return tokens


def final_representation(model, normalized: Tensor) -> Tensor:
    """``y = ln_final(x)``, from the ``ln_final.hook_normalized`` value (the hook stops before the
    learned gain and bias)."""
    ln_final = model.ln_final
    y = normalized * ln_final.w if hasattr(ln_final, "w") else normalized
    return y + ln_final.b if hasattr(ln_final, "b") else y


def _analysis_dtype(model) -> torch.dtype:
    return torch.float64 if model.cfg.dtype == torch.float64 else torch.float32


def _head_index(n_heads: int, value_heads: int) -> Tensor:
    """For each query head, the head of ``hook_v`` it reads. Decided from hook_v's actual head axis,
    not from the config: with ``ungroup_grouped_query_attention`` hook_v already has ``n_heads`` heads
    although ``n_key_value_heads`` is set, and regrouping them would read the wrong values."""
    if value_heads == n_heads:
        return torch.arange(n_heads)
    if value_heads < 1 or n_heads % value_heads:
        raise ValueError(f"hook_v has {value_heads} heads, which does not divide the {n_heads} query heads")
    return torch.arange(n_heads) // (n_heads // value_heads)  # repeat_interleave, as TransformerLens expands


def _per_position(scale: Tensor) -> Tensor:
    """A norm's ``hook_scale`` as ``[pos]``. With split Q/K/V inputs (or ``use_attn_in``) the norm sees a
    copy of the residual per head, so the scale has a head axis whose entries are equal."""
    scale = scale[..., 0]
    if scale.ndim == 1:
        return scale
    if scale.ndim == 2 and (scale == scale[:, :1]).all():
        return scale[:, 0]
    raise UnsupportedModelError(
        f"a norm scale of shape {tuple(scale.shape)} differs between heads: the per-head norm inputs were "
        "edited (hook_q_input / hook_k_input / hook_v_input); trace the model without those hooks"
    )


def trace(
    model,
    prompt: str | Tensor,
    *,
    chat: bool | None = None,
    keep_resid: bool = False,
    lipschitz: bool = False,
) -> Trace:
    """Run ``model`` once on ``prompt`` and keep what the analyses need (see :class:`Trace`).

    ``prompt`` is text (put through the chat template when the tokenizer has one, unless
    ``chat=False``) or token ids. ``keep_resid=True`` also keeps every layer's residual stream
    (``[layer+1, pos, d_model]``), which the compression metrics need. ``lipschitz=True`` also
    computes ``‖J_{MLP∘N2}‖_F`` per layer and position (:mod:`lens_squash.edge.lipschitz`), which the
    certified bound needs.
    """
    tokens = as_tokens(model, prompt, chat=chat)
    n_layers = model.cfg.n_layers
    missing = [name for name in required_hooks(n_layers) if name not in model.hook_dict]
    if missing:
        raise ValueError(
            f"this model lacks the hooks a trace needs ({', '.join(missing[:3])}"
            f"{' …' if len(missing) > 3 else ''}); use a HookedTransformer, or a TransformerBridge "
            "after bridge.enable_compatibility_mode(no_processing=True)"
        )
    store: dict[str, Tensor] = {}
    dtype = _analysis_dtype(model)

    def keep(name: str, fn=lambda t: t):
        def hook(value, hook):
            store[name] = fn(value[0].detach()).to("cpu", dtype)
        return hook

    def keep_pattern(layer: int):
        def hook(value, hook):
            pattern = value[0].detach()
            store[f"pattern.{layer}"] = pattern.to("cpu", dtype)
            store[f"mean_pattern.{layer}"] = pattern.to(dtype).mean(0).cpu()
        return hook

    def value_norm_hook(layer: int):
        def hook(value, hook):  # value: [batch, pos, kv_head or head, d_head]
            w_o = model.blocks[layer].attn.W_O.detach()  # [head, d_head, d_model]
            head_of = _head_index(w_o.shape[0], value.shape[2]).to(value.device)
            v = value[0].detach().to(dtype)[:, head_of]  # [pos, head, d_head]
            store[f"value_norm.{layer}"] = torch.einsum("phd,hdm->phm", v, w_o.to(v.device, dtype)).norm(dim=-1).T.cpu()
        return hook

    hooks = []
    for layer in range(n_layers):
        hooks.append((f"blocks.{layer}.attn.hook_pattern", keep_pattern(layer)))
        hooks.append((f"blocks.{layer}.hook_resid_pre", keep(f"resid.{layer}")))
        for norm in _NORM_SITES:
            if f"blocks.{layer}.{norm}.hook_scale" in model.hook_dict:
                hooks.append((f"blocks.{layer}.{norm}.hook_scale", keep(f"{norm}.{layer}", _per_position)))
        if f"blocks.{layer}.attn.hook_v" in model.hook_dict and hasattr(model.blocks[layer].attn, "W_O"):
            hooks.append((f"blocks.{layer}.attn.hook_v", value_norm_hook(layer)))
    unsupported, shape = None, None
    if lipschitz:
        try:
            shape = supports_certified(model)
        except UnsupportedModelError as error:  # the certified variant will refuse with this reason
            unsupported = str(error)
        else:
            hooks += _mlp_gain_hooks(model, shape, store)
    hooks.append((f"blocks.{n_layers - 1}.hook_resid_post", keep(f"resid.{n_layers}")))
    if "ln_final.hook_scale" in model.hook_dict:
        hooks.append(("ln_final.hook_scale", keep("final_scale", lambda t: t[..., 0])))
    if "ln_final.hook_normalized" in model.hook_dict:
        hooks.append(("ln_final.hook_normalized", keep("final_normalized")))

    with torch.no_grad():
        logits = _run(model, tokens[None].to(model.cfg.device), hooks)
    gains = None if shape is None else _mlp_gains(store, n_layers, shape)
    result = _assemble(model, tokens, store, logits[0, -1].detach().to("cpu", dtype), keep_resid, chat, gains)
    if unsupported is not None:
        result.metadata["lipschitz_unsupported"] = unsupported
    return result


#: norms whose scales a trace keeps (Gemma-2/3 add the two post norms)
_NORM_SITES = ("ln1", "ln2", "ln1_post", "ln2_post")


def _run(model, tokens: Tensor, hooks: list) -> Tensor:
    """The hooked forward pass; when it fails and the plain ``model(tokens)`` fails too, the config is
    one TransformerLens itself cannot run (e.g. ``use_attn_in`` with grouped-query attention, or
    ``parallel_attn_mlp`` with ``attn_only``): say so in one line instead of its traceback."""
    try:
        return model.run_with_hooks(tokens, fwd_hooks=hooks)
    except (UnsupportedModelError, torch.OutOfMemoryError):
        raise
    except Exception as error:  # noqa: BLE001 - re-raised below unless TransformerLens fails alone
        try:
            model(tokens)
        except Exception as plain:  # noqa: BLE001
            raise UnsupportedModelError(
                f"TransformerLens cannot run this model's forward pass ({type(plain).__name__}: {plain}); "
                "its config combines options TransformerLens does not support together: change the config "
                "until model(tokens) runs"
            ) from plain
        raise error


def _mlp_gain_hooks(model, shape, store: dict[str, Tensor]) -> list:
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
            norms = mlp_jacobian_frobenius(block, cached_gram(block, shape), pre, pre_linear)
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
    forward then cuts to the top k (and renormalises with ``norm_topk_prob``), in the same float32."""
    if type(mlp).__name__ == "GptOssMoE":
        return weights.double()
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
            routing = _routing(block.mlp, store.pop(f"expert_weights.{layer}"), store.pop(f"expert_indices.{layer}"),
                               model.cfg)
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
    norm = getattr(model.blocks[layer], shape.mlp_in)

    def affine(normalized: Tensor) -> Tensor:
        out = normalized * norm.w if hasattr(norm, "w") else normalized
        return out + norm.b if hasattr(norm, "b") else out

    return f"blocks.{layer}.{shape.mlp_in}.hook_normalized", affine


def _mlp_gains(store: dict[str, Tensor], n_layers: int, shape) -> Tensor | None:
    """``‖J_MLP‖_F / Π s`` per layer and position: the Gram norms over every frozen scale around the MLP."""
    gains = _stack(store, "mlp_gain_unscaled", n_layers)
    if gains is None:
        return None
    for site in (s for s in (shape.mlp_in, *shape.mlp_out) if s is not None):
        scale = _stack(store, site, n_layers)
        if scale is None:
            raise ValueError(
                f"blocks.{{l}}.{site}.hook_scale did not fire, so the MLP gains cannot include that norm; "
                "use a HookedTransformer or a TransformerBridge in compatibility mode"
            )
        gains = gains / scale.double()
    return gains


def _attention_check(model, n_tokens: int, defects: dict[str, float]) -> dict[str, Any]:
    """What the patterns will be checked against, recorded so a reader sees what was tolerated: the
    dtype they were computed in, its row-sum tolerance, and whether rows may fall short of 1 (learned
    sinks, ``use_attention_sinks``, take a share of every row by design)."""
    tolerance = pattern_tolerance(model.cfg.dtype, n_tokens)
    return {
        "dtype": str(model.cfg.dtype).removeprefix("torch."),
        "tolerance": tolerance,
        "substochastic": bool(getattr(model.cfg, "use_attention_sinks", False)),
        "tolerated_row_deviation": defects["row_deviation"] if defects["row_deviation"] <= tolerance else None,
    }


def _stack(store: dict[str, Tensor], prefix: str, n: int) -> Tensor | None:
    keys = [f"{prefix}.{i}" for i in range(n)]
    return torch.stack([store[k] for k in keys]) if all(k in store for k in keys) else None


def _assemble(model, tokens, store, last_logits, keep_resid: bool, chat, mlp_gain) -> Trace:
    n_layers = model.cfg.n_layers
    resid = torch.stack([store[f"resid.{i}"] for i in range(n_layers + 1)])  # [layer+1, pos, d_model]
    patterns = _stack(store, "pattern", n_layers)
    # scanned once here, so every bound built from this trace can skip the O(L·H·n²) check
    defects = attention_defects(patterns)
    if math.isnan(defects["row_deviation"]) or not torch.isfinite(resid).all():
        raise ValueError(
            f"the forward pass produced NaN or inf (model dtype {model.cfg.dtype}); low precision overflowed: "
            "load the model in float32 (load_model(dtype='float32')) or use a shorter prompt"
        )
    if "final_normalized" in store:
        y_last = final_representation(model, store["final_normalized"][-1].to(model.cfg.device)).detach()
        y_last = y_last.to("cpu", resid.dtype)
    else:  # no final norm: y_n is the last block's output
        y_last = resid[-1, -1]
    predicted = int(last_logits.argmax())
    str_tokens = tuple(model.to_str_tokens(tokens)) if model.tokenizer is not None else tuple(
        str(int(t)) for t in tokens
    )
    predicted_str = model.tokenizer.decode([predicted]) if model.tokenizer is not None else str(predicted)
    return Trace(
        tokens=tokens.cpu(),
        str_tokens=str_tokens,
        patterns=patterns,
        ln1_scale=_stack(store, "ln1", n_layers),
        ln2_scale=_stack(store, "ln2", n_layers),
        final_scale=store.get("final_scale"),
        resid_norms=resid.norm(dim=-1),
        first_token_resid=resid[:, 0].clone(),
        value_norms=_stack(store, "value_norm", n_layers),
        y_last=y_last,
        last_logits=last_logits,
        predicted_token=predicted_str,
        metadata=provenance(
            model, chat=chat, n_tokens=int(tokens.shape[0]), attention_defects=defects,
            attention_check=_attention_check(model, int(tokens.shape[0]), defects),
        ),
        resid=resid if keep_resid else None,
        mlp_gain=mlp_gain,
        mean_patterns=_stack(store, "mean_pattern", n_layers),
        ln1_post_scale=_stack(store, "ln1_post", n_layers),
        ln2_post_scale=_stack(store, "ln2_post", n_layers),
    )
