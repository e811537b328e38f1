"""What one TransformerLens block computes once its attention patterns and norm scales are frozen.

The certified bound (DESIGN §3) needs, per block, where each norm sits relative to the attention and
the MLP, because a frozen norm ``N(x) = (x P) diag(γ) / s + b`` is a linear map whose scale ``s``
belongs to one position: the *key* when the norm reads the residual stream before attention (pre-norm),
the *query* when it normalises what a sublayer writes (post-norm). TransformerLens 3.9 has these
block shapes, all read from the config here:

| shape | config | attention edge ``k → j`` | MLP at ``j`` |
|---|---|---|---|
| pre-norm (GPT-2, Llama, Gemma) | default | ``N1`` at k, then ``W_OV`` | ``MLP∘N2`` |
| pre+post (Gemma-2/3) | ``use_normalization_before_and_after`` | ``N1`` at k, ``W_OV``, ``ln1_post`` at j | ``ln2_post∘MLP∘N2`` |
| output norms (OLMo-2/3) | ``original_architecture`` in ``POST_NORM_ARCHITECTURES`` | ``W_OV``, then ``ln1`` at j | ``ln2∘MLP`` |
| parallel (GPT-J, NeoX, Pythia, Phi) | ``parallel_attn_mlp`` | as pre-norm, both read ``x^(l)`` | ``MLP∘N2`` of ``x^(l)`` |

QK-norm, soft-capping, ALiBi, rotary, local windows, logn scaling and learned sinks change only the
patterns, which are frozen. Split Q/K/V inputs (``use_split_qkv_input``, ``use_attn_in``) feed every
head the same normalised residual, so they are the plain shape with a head axis on the norm's scale.
Mixture-of-experts MLPs (Mixtral, OLMoE, GPT-OSS) are a router-weighted sum of gated experts; with the
router's weights frozen (like the patterns) that sum is linear in the experts. SoLU MLPs
(``x·softmax(x)``, then a LayerNorm over the neurons whose scale is frozen too) have a
diagonal-plus-rank-one activation Jacobian. Refused, each with the reason and what to use instead
(:class:`~lens_squash.core.support.UnsupportedModelError`): bidirectional attention, gated or MoE SoLU,
4-bit weights and non-decoder blocks.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.support import UnsupportedModelError

__all__ = ["BlockShape", "apply_input_norm", "apply_output_norms", "block_shape", "norm_gain", "weight_signature"]

try:  # TransformerLens ≥ 3.8 names the architectures whose ln1/ln2 normalise sublayer outputs
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES
except ImportError:  # older releases have no such blocks
    POST_NORM_ARCHITECTURES: set[str] = set()

#: what to use when the certified bound refuses a model
_INSTEAD = (
    "use the estimate variants (paper, rollout, value, value_rownorm) or compare against "
    "jacobian(model, prompt, mode='frozen') directly"
)
_NORMS = (None, "LN", "LNPre", "RMS", "RMSPre")


@dataclass(frozen=True)
class BlockShape:
    """Where the norms of every block sit (module names inside ``model.blocks[l]``).

    ``attn_in``/``mlp_in`` name the norm a sublayer reads through (its scale belongs to the key for
    attention, to the position itself for the MLP); ``attn_out``/``mlp_out`` name the norms applied
    to what the sublayer writes, in order (their scales belong to the query / the position).
    """

    attn_in: str | None
    attn_out: tuple[str, ...]
    mlp_in: str | None
    mlp_out: tuple[str, ...]
    parallel: bool
    attn_only: bool
    #: ``clip_qkv`` clamps values: the value path is then ``W_V diag(m) W_O`` with m ∈ {0, 1}
    value_clip: bool
    #: mixture-of-experts MLP (``num_experts``): the router's weights are frozen like the patterns
    moe: bool = False
    #: SoLU activation (``solu``, ``solu_ln``): x·softmax(x) mixes a position's neurons
    solu: bool = False

    @property
    def norm_sites(self) -> tuple[str, ...]:
        sites = [self.attn_in, *self.attn_out, self.mlp_in, *self.mlp_out]
        return tuple(dict.fromkeys(s for s in sites if s is not None))


def _refuse(what: str) -> None:
    raise UnsupportedModelError(f"the certified bound does not support {what}; {_INSTEAD}")


def _check_supported(model) -> None:
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


def _present(block, name: str) -> bool:
    module = getattr(block, name, None)
    return module is not None and not isinstance(module, torch.nn.Identity)


def block_shape(model) -> BlockShape:
    """The model's :class:`BlockShape`, or :class:`UnsupportedModelError` saying what is not modelled."""
    _check_supported(model)
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


def _is_centred(module) -> bool:
    """LayerNorm centres (``P = I − 11ᵀ/d``); RMSNorm does not. Read from the module's class, or from a
    TransformerBridge ``NormalizationBridge``'s own ``uses_rms_norm``."""
    name = type(module).__name__
    if "LayerNorm" in name:
        return True
    if "RMS" in name:
        return False
    if isinstance(getattr(module, "uses_rms_norm", None), bool):
        return not module.uses_rms_norm
    raise UnsupportedModelError(
        f"the certified bound does not know the norm module {name!r} (expected LayerNorm or RMSNorm); {_INSTEAD}"
    )


def norm_gain(module) -> tuple[Tensor | None, bool]:
    """``(γ, centred)`` of a norm module: its gain (None without one) and whether it centres."""
    gain = getattr(module, "w", None)
    return (None if gain is None else gain.detach().double()), _is_centred(module)


def apply_input_norm(weight: Tensor, module, *, dim: int) -> Tensor:
    """``P diag(γ) W``: a frozen norm read *into* ``weight`` along its d_model axis ``dim`` (float64)."""
    gain, centred = norm_gain(module)
    weight = weight.detach().double()
    if gain is not None:
        shape = [1] * weight.ndim
        shape[dim] = -1
        weight = weight * gain.reshape(shape)
    return weight - weight.mean(dim=dim, keepdim=True) if centred else weight


def apply_output_norms(weight: Tensor, block, names: tuple[str, ...]) -> Tensor:
    """``W P diag(γ_a) P diag(γ_b) …``: frozen norms applied, in order, to what ``weight`` writes
    (its last axis is d_model). Each map is ``y ↦ (y P) diag(γ)``; its ``1/s`` is the caller's."""
    weight = weight.detach().double()
    for name in names:
        gain, centred = norm_gain(getattr(block, name))
        if centred:
            weight = weight - weight.mean(dim=-1, keepdim=True)
        if gain is not None:
            weight = weight * gain
    return weight


def weight_signature(*tensors: Tensor | None) -> tuple:
    """Storage, version and a content checksum of each tensor, so a cache keyed on it goes stale
    after any edit: in place under ``no_grad`` (bumps ``_version``) or through ``.data`` (does not,
    but changes the checksum)."""
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        flat = t.detach().reshape(-1).double()
        ramp = _ramp(flat.numel(), flat.device)
        out.append((t.data_ptr(), tuple(t.shape), t._version, float(flat.sum()), float((flat * ramp).sum())))
    return tuple(out)


@functools.lru_cache(maxsize=16)
def _ramp(size: int, device: torch.device) -> Tensor:
    """Fixed checksum weights: a weighted sum with them changes when entries are permuted or rescaled."""
    return torch.cos(torch.arange(size, dtype=torch.float64, device=device))
