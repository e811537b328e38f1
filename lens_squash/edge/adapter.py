"""The one place that reads a model: a ``HookedTransformer`` or a ``TransformerBridge`` of any family,
into :class:`~lens_squash.algebra.model_facts.ModelFacts`.

A HookedTransformer builds its modules from its config, so its facts are read from the config (the
block shapes of :mod:`lens_squash.algebra.blocks`). A bridge wraps ``transformers`` modules whose
config flags do not say what they compute (Gemma-2's says ``use_normalization_before_and_after=False``
beside its post-norms), so its facts are *established* by running it, never guessed:

* **Norms**: each norm module is run on ``±x``; the odd part gives its effective gain, matched to the
  module's ``w`` or ``1 + w`` (Gemma stores ``w`` and scales by ``1 + w``), the even part its bias,
  and a shift of ``x`` whether it centres (LayerNorm) or not (RMSNorm).
* **Block shape**: one short forward pass with module hooks says what each norm reads (the residual,
  the attention output, the MLP output), what attention and the MLP read, and so whether the block is
  sequential or parallel; the block's output is checked against ``x + attn + mlp``.
* **MLP**: ``act(u W_gate) ⊙ (u W_in) W_out`` (plain: ``act(u W_in) W_out``) is recomputed from the
  read weights and the activation found on the module, and compared with what the MLP returned.
* **Frozen hooks**: replacing ``hook_pattern`` and each ``hook_scale`` must change the output, or a
  "frozen" Jacobian would silently keep that quantity live (OPT's bridge ignores its ``hook_pattern``).

What cannot be established is recorded per method in :attr:`ModelFacts.unsupported`, and that method
refuses with the reason. Structural findings are cached per model; weights are read afresh on every
call, so in-place edits (ablations, steering) are always seen.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..algebra.attention import expanded_values
from ..algebra.blocks import INSTEAD, BlockShape
from ..algebra.model_facts import LayerFacts, ModelFacts, NormFacts, register_reader
from ..core.support import UnsupportedModelError
from .adapter_probe import PATTERN_FREEZE, BridgeProbe, probe_bridge, probe_norm
from .backends import is_bridge
from .experts import moe_experts  # the one expert reader (hooked modules or fused views)
from .hook_flags import hook_flags

__all__ = [
    "activation",
    "check_frozen",
    "check_structure",
    "moe_experts",
    "pattern_freeze",
    "functorch_ready",
    "learned_sinks",
    "mlp_biases",
    "mlp_matrices",
    "norm_facts",
    "norm_weight",
    "read_model",
    "value_clip",
]

try:  # TransformerLens ≥ 3.8 names the architectures whose ln1/ln2 normalise sublayer outputs
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES
except ImportError:  # older releases have no such blocks; TL 4 has no HookedTransformer
    POST_NORM_ARCHITECTURES: set[str] = set()

_NORMS = (None, "LN", "LNPre", "RMS", "RMSPre")


@dataclass
class _Structure:
    shape: BlockShape | None
    mlp_kind: str
    unsupported: dict[str, str] = field(default_factory=dict)
    probe: BridgeProbe | None = None


_STRUCTURES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def read_model(model) -> ModelFacts:
    """``model``'s :class:`ModelFacts`; structure cached per model, weights read now."""
    structure = _structure(model)
    cfg = model.cfg
    sites = () if structure.shape is None else structure.shape.norm_sites
    layers = tuple(_layer(block, sites, cfg.n_heads, structure.mlp_kind) for block in model.blocks)
    n_kv = int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads)
    return ModelFacts(
        backend="bridge" if is_bridge(model) else "hooked",
        family=_family(model),
        shape=structure.shape,
        layers=layers,
        final=_final(model),
        n_heads=cfg.n_heads,
        n_kv_heads=n_kv,
        mlp_kind=structure.mlp_kind,
        positional=str(getattr(cfg, "positional_embedding_type", "standard")),
        softcap=getattr(cfg, "attn_scores_soft_cap", None) if getattr(cfg, "attn_scores_soft_cap", -1) > 0 else None,
        window=getattr(cfg, "window_size", None),
        sinks=learned_sinks(model),
        value_clip=value_clip(model),
        scale_hooks=tuple(f"blocks.{{l}}.{site}.hook_scale" for site in sites),
        unsupported=dict(structure.unsupported),
    )


register_reader(read_model)


def learned_sinks(model) -> bool:
    """Whether attention has learned sink logits in its softmax (rows then sum to less than 1 by design):
    a HookedTransformer's ``use_attention_sinks``, or on a bridge a ``sinks`` tensor on a wrapped
    attention module (TransformerLens 4.3 leaves the flag unset on GPT-OSS bridges)."""
    if getattr(model.cfg, "use_attention_sinks", False):
        return True
    if not is_bridge(model):
        return False
    return any(
        isinstance(getattr(getattr(b.attn, "original_component", None), "sinks", None), Tensor) for b in model.blocks
    )


def value_clip(model) -> float | None:
    """The clamp ``clip_qkv`` on queries, keys and values, or None: a HookedTransformer's config field, or
    the one the wrapped ``transformers`` attention reads (TransformerLens's bridge config drops it: OLMo)."""
    clip = getattr(model.cfg, "clip_qkv", None)
    if clip is None and is_bridge(model):
        clip = getattr(getattr(model.original_model, "config", None), "clip_qkv", None)
    return None if clip is None else float(clip)


def _structure(model) -> _Structure:
    flags, structure = _STRUCTURES.get(model, (None, None))
    if structure is None or flags != hook_flags(model):  # a hook flag switched since: probed afresh
        structure = _bridge_structure(model) if is_bridge(model) else _hooked_structure(model)
        _STRUCTURES[model] = (hook_flags(model), structure)
    return structure


def _family(model) -> str:
    original = getattr(model, "original_model", None)
    if original is not None:
        return type(original).__name__
    return str(getattr(model.cfg, "original_architecture", None) or type(model).__name__)


def _final(model) -> NormFacts | None:
    ln = getattr(model, "ln_final", None)
    if ln is None or isinstance(ln, torch.nn.Identity):
        return None
    return norm_facts(ln)


def _layer(block, sites: tuple[str, ...], n_heads: int, mlp_kind: str) -> LayerFacts:
    mats, w_out = (None, None) if mlp_kind in ("moe", "none", "solu") else mlp_matrices(block)
    return LayerFacts(
        norms={site: norm_facts(getattr(block, site)) for site in sites},
        w_v=expanded_values(block.attn, n_heads),
        w_o=block.attn.W_O.detach(),
        mlp_in=None if mats is None else tuple(m.detach() for m in mats),
        mlp_out=None if w_out is None else w_out.detach(),
    )


# ------------------------------------------------------------------------------------------------
# Per-module readers (the Gram builders of lens_squash.edge.lipschitz call these per block)

_NORM_KINDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def norm_facts(module) -> NormFacts:
    """A norm module's :class:`NormFacts`: effective gain (``w`` or ``1 + w``), bias, centring."""
    kind = _NORM_KINDS.get(module)
    if kind is None:
        kind = probe_norm(module) if _is_bridge_module(module) else (_hooked_centred(module), "w")
        _NORM_KINDS[module] = kind
    centred, convention = kind
    raw = norm_weight(module)
    gain = None
    if convention == "w" and raw is not None:
        gain = raw.detach().double()
    elif convention == "1+w":
        gain = 1.0 + raw.detach().double()
    bias = _norm_bias(module)
    return NormFacts(
        gain=gain, bias=None if bias is None else bias.detach().double(), centred=centred, convention=convention
    )


def _is_bridge_module(module) -> bool:
    return hasattr(module, "original_component")


def norm_weight(module) -> Tensor | None:
    """The norm's stored weight (Gemma's raw ``w``, not its gain ``1 + w``), or None."""
    weight = getattr(module, "w", None)
    if weight is None and _is_bridge_module(module):
        weight = getattr(module.original_component, "weight", None)
    return weight


def _norm_bias(module) -> Tensor | None:
    bias = getattr(module, "b", None)
    if bias is None and _is_bridge_module(module):
        bias = getattr(module.original_component, "bias", None)
    return bias if isinstance(bias, Tensor) else None


def _hooked_centred(module) -> bool:
    """LayerNorm centres (``P = I − 11ᵀ/d``); RMSNorm does not. Read from the module's class."""
    name = type(module).__name__
    if "LayerNorm" in name:
        return True
    if "RMS" in name:
        return False
    raise UnsupportedModelError(
        f"the certified bound does not know the norm module {name!r} (expected LayerNorm or RMSNorm); {INSTEAD}"
    )


def mlp_matrices(block) -> tuple[list[Tensor], Tensor]:
    """The MLP's input matrices ``[d_model, d_mlp]`` (gate first when gated) and ``W_out``.

    A bridge's plain MLP has ``W_gate = None``; a HookedTransformer's plain MLP has no ``W_gate``."""
    mlp = block.mlp
    gate = getattr(mlp, "W_gate", None)
    mats = [mlp.W_in] if gate is None else [gate, mlp.W_in]
    return mats, mlp.W_out


def mlp_biases(block) -> tuple[list[Tensor | None], Tensor | None]:
    """The biases matching :func:`mlp_matrices` (``None`` where there is none)."""
    mlp = block.mlp
    gate = getattr(mlp, "W_gate", None)
    b_in = _optional(mlp, "b_in", "in")
    names = [b_in] if gate is None else [_optional(mlp, "b_gate", "gate"), b_in]
    return names, _optional(mlp, "b_out", "out")


def _optional(mlp, attr: str, submodule: str) -> Tensor | None:
    value = getattr(mlp, attr, None)
    if value is None:
        value = getattr(getattr(mlp, submodule, None), "bias", None)
    return value if isinstance(value, Tensor) else None


def activation(block):
    """The MLP's elementwise activation: a HookedTransformer's ``act_fn``, or the one the wrapped
    ``transformers`` module applies (``act_fn``, ``act``, ``activation_fn``; BLOOM's ``gelu_impl``)."""
    mlp = block.mlp
    act = getattr(mlp, "act_fn", None)
    if callable(act):
        return act
    original = getattr(mlp, "original_component", None)
    for name in ("act_fn", "act", "activation_fn", "activation", "gelu_impl"):
        act = getattr(original, name, None)
        if callable(act):
            return act
    raise UnsupportedModelError(
        f"cannot find the activation of {type(mlp).__name__} (no act_fn on it or its wrapped module), so the "
        f"certified bound's MLP gains cannot be computed; {INSTEAD}"
    )


# ------------------------------------------------------------------------------------------------
# Structure: HookedTransformer from its config


def _hooked_structure(model) -> _Structure:
    cfg = model.cfg
    kind = _hooked_mlp_kind(cfg)
    try:
        _check_hooked(model)
        shape = _hooked_shape(model)
    except UnsupportedModelError as error:
        return _Structure(None, kind, {"certified": str(error)})
    return _Structure(shape, kind)


def _hooked_mlp_kind(cfg) -> str:
    if cfg.attn_only:
        return "none"
    if getattr(cfg, "num_experts", None):
        return "moe"
    if str(getattr(cfg, "act_fn", "")).startswith("solu"):
        return "solu"
    return "gated" if cfg.gated_mlp else "plain"


def _refuse(what: str) -> None:
    raise UnsupportedModelError(f"the certified bound does not support {what}; {INSTEAD}")


def _check_hooked(model) -> None:
    cfg = model.cfg
    if getattr(cfg, "attention_dir", "causal") != "causal":
        _refuse("bidirectional attention (Theorem B.5 sums over causal paths only; use a decoder-only model)")
    act = getattr(cfg, "act_fn", None)
    if act == "solu" and (cfg.gated_mlp or getattr(cfg, "num_experts", None)):
        _refuse("gated or mixture-of-experts SoLU MLPs (act_fn='solu' times a linear branch is not modelled)")
    if act is not None and act.startswith("solu") and getattr(cfg, "num_experts", None):
        _refuse(f"mixture-of-experts MLPs with act_fn={act!r} (their experts assume an elementwise activation)")
    if getattr(cfg, "load_in_4bit", False):
        _refuse("4-bit quantised weights (the OV and MLP matrices are not readable); load the model in float32")
    if cfg.normalization_type not in _NORMS:
        _refuse(f"normalization_type={cfg.normalization_type!r}")
    if getattr(cfg, "positional_embedding_type", None) == "relative_positional_bias":
        _refuse("encoder-decoder blocks with relative position bias (T5)")
    block = model.blocks[0]
    if not (hasattr(block, "attn") and hasattr(block.attn, "W_O") and hasattr(block.attn, "W_V")):
        _refuse(f"blocks of type {type(block).__name__} without attn.W_V / attn.W_O")
    experts = getattr(getattr(block, "mlp", None), "experts", None)
    if getattr(cfg, "num_experts", None) and not all(
        isinstance(getattr(e, name, None), torch.nn.Linear)
        for e in experts or [None]
        for name in ("W_gate", "W_in", "W_out")
    ):
        _refuse("mixture-of-experts MLPs whose experts are not gated nn.Linear triples (W_gate, W_in, W_out)")
    for site in ("ln1", "ln2", "ln1_post", "ln2_post"):
        module = getattr(block, site, None)
        if module is not None and not isinstance(module, torch.nn.Identity):
            _hooked_centred(module)


def _present(block, name: str) -> bool:
    module = getattr(block, name, None)
    return module is not None and not isinstance(module, torch.nn.Identity)


def _hooked_shape(model) -> BlockShape:
    cfg = model.cfg
    block = model.blocks[0]
    normed = cfg.normalization_type is not None
    output_normed = getattr(cfg, "original_architecture", None) in POST_NORM_ARCHITECTURES and normed
    both = bool(getattr(cfg, "use_normalization_before_and_after", False))
    parallel = bool(getattr(cfg, "parallel_attn_mlp", False))
    if output_normed and parallel:
        _refuse("parallel blocks whose norms sit on the sublayer outputs")
    attn_out = (("ln1_post",) if both and _present(block, "ln1_post") else ()) + (("ln1",) if output_normed else ())
    mlp_out = (("ln2_post",) if both and _present(block, "ln2_post") else ()) + (("ln2",) if output_normed else ())
    pre = normed and not output_normed
    return BlockShape(
        attn_in="ln1" if pre else None,
        attn_out=attn_out,
        mlp_in="ln2" if pre and not cfg.attn_only else None,
        mlp_out=() if cfg.attn_only else mlp_out,
        parallel=parallel and not cfg.attn_only,
        attn_only=bool(cfg.attn_only),
        value_clip=getattr(cfg, "clip_qkv", None) is not None,
        moe=bool(getattr(cfg, "num_experts", None)) and not cfg.attn_only,
        solu=not cfg.attn_only and str(getattr(cfg, "act_fn", "")).startswith("solu"),
    )


# ------------------------------------------------------------------------------------------------
# Structure: TransformerBridge, established by running it (lens_squash.edge.adapter_probe)


def _bridge_structure(model) -> _Structure:
    probe = probe_bridge(
        model,
        activation=activation,
        mlp_matrices=mlp_matrices,
        mlp_biases=mlp_biases,
        runnable=functorch_ready,
        experts=moe_experts,
        clip=value_clip(model),
    )
    shape = probe.shape
    if shape is not None and value_clip(model) is not None:  # a 0/1 clamp between W_V and W_O
        shape = dataclasses.replace(shape, value_clip=True)
    return _Structure(shape, probe.mlp_kind, dict(probe.unsupported), probe)


def check_structure(model) -> None:
    """Read (once) what a bridge is; refuses a model that is not a causal attention decoder."""
    _structure(model)


def check_frozen(model) -> None:
    """Refuse the frozen mode where freezing the hooks was not shown to freeze the quantity."""
    if is_bridge(model) and "frozen" in _structure(model).unsupported:
        raise UnsupportedModelError(_structure(model).unsupported["frozen"])


def pattern_freeze(model) -> tuple[str, ...]:
    """Hook suffixes whose detach freezes each attention pattern: ``attn.hook_pattern``, or on a bridge
    whose pattern hook fires after transformers' attention has run, its queries and keys
    (:data:`lens_squash.edge.adapter_probe.QK_FREEZE`)."""
    if not is_bridge(model):
        return PATTERN_FREEZE
    probe = _structure(model).probe
    return PATTERN_FREEZE if probe is None else probe.pattern_freeze


# ------------------------------------------------------------------------------------------------
# functorch: old-style autograd.Functions (no setup_context) cannot run under torch.func transforms


def _bloom_gelu(module, x: Tensor) -> Tensor:
    # the same tanh-GeLU that transformers' GeLUFunction computes; its custom backward is this
    # function's exact derivative, so autograd through the plain expression gives the same gradient
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


#: module class -> a forward with the same values made of plain torch operations
_FUNCTORCH_FORWARDS = {"BloomGelu": _bloom_gelu}


def _weightless_norms(model) -> list:
    """Bridge norms over a weightless ``transformers`` LayerNorm (OLMo): TransformerLens 4.3's hooked
    norm path multiplies by ``self.weight``, which they lack, so any hook on them crashes."""
    found = []
    for module in model.modules():
        original = getattr(module, "original_component", None)
        if hasattr(module, "uses_rms_norm") and original is not None and getattr(original, "weight", None) is None:
            if "weight" not in vars(module):
                found.append(module)
    return found


@contextlib.contextmanager
def functorch_ready(model) -> Iterator[None]:
    """Inside the block, ``model`` runs under hooks and ``torch.func``: modules known to call an old-style
    ``autograd.Function`` run an equivalent plain forward (BLOOM's ``BloomGelu``), and weightless bridge
    norms (OLMo) get a gain of exactly 1, which is what they apply."""
    patched = []
    for module in model.modules():
        forward = _FUNCTORCH_FORWARDS.get(type(module).__name__)
        if forward is not None:
            module.forward = forward.__get__(module)
            patched.append((module, "forward"))
    for module in _weightless_norms(model):
        object.__setattr__(module, "weight", 1.0)
        patched.append((module, "weight"))
    try:
        yield
    finally:
        for module, name in patched:
            object.__delattr__(module, name)
