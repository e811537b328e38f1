"""What one TransformerLens block computes once its attention patterns and norm scales are frozen.

The certified bound (DESIGN §3) needs, per block, where each norm sits relative to the attention and
the MLP, because a frozen norm ``N(x) = (x P) diag(γ) / s + b`` is a linear map whose scale ``s``
belongs to one position: the *key* when the norm reads the residual stream before attention (pre-norm),
the *query* when it normalises what a sublayer writes (post-norm). The shapes below are read by
:mod:`lens_squash.edge.adapter` (from a HookedTransformer's config, or from a TransformerBridge's
modules and where their inputs come from) into :class:`~lens_squash.algebra.model_facts.ModelFacts`;
this module only computes with them:

| shape | config | attention edge ``k → j`` | MLP at ``j`` |
|---|---|---|---|
| pre-norm (GPT-2, Llama, Gemma) | default | ``N1`` at k, then ``W_OV`` | ``MLP∘N2`` |
| pre+post (Gemma-2/3) | ``use_normalization_before_and_after`` | ``N1`` at k, ``W_OV``, ``ln1_post`` at j | ``ln2_post∘MLP∘N2`` |
| output norms (OLMo-2/3) | ``original_architecture`` in ``POST_NORM_ARCHITECTURES`` | ``W_OV``, then ``ln1`` at j | ``ln2∘MLP`` |
| parallel (GPT-J, NeoX, Pythia, Phi) | ``parallel_attn_mlp`` | as pre-norm, both read ``x^(l)`` | ``MLP∘N2`` of ``x^(l)`` (``N1`` where there is no ``N2``: Phi, GPT-J, Falcon) |

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
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .model_facts import NormFacts, facts_of

__all__ = ["INSTEAD", "BlockShape", "apply_input_norm", "apply_output_norms", "block_shape", "weight_signature"]

#: what to use when the certified bound refuses a model
INSTEAD = (
    "use the estimate variants (paper, rollout, value, value_rownorm) or compare against "
    "jacobian(model, prompt, mode='frozen') directly"
)


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


def block_shape(model) -> BlockShape:
    """The model's :class:`BlockShape` (a model or its :class:`ModelFacts`), or
    :class:`~lens_squash.core.support.UnsupportedModelError` saying what the certified bound does not model."""
    facts = facts_of(model)
    facts.require("certified")
    return facts.shape


def apply_input_norm(weight: Tensor, norm: NormFacts | None, *, dim: int) -> Tensor:
    """``P diag(γ) W``: a frozen norm read *into* ``weight`` along its d_model axis ``dim`` (float64)."""
    weight = weight.detach().double()
    if norm is None:
        return weight
    if norm.gain is not None:
        shape = [1] * weight.ndim
        shape[dim] = -1
        weight = weight * norm.gain.double().reshape(shape)
    return weight - weight.mean(dim=dim, keepdim=True) if norm.centred else weight


def apply_output_norms(weight: Tensor, norms: Sequence[NormFacts]) -> Tensor:
    """``W P diag(γ_a) P diag(γ_b) …``: frozen norms applied, in order, to what ``weight`` writes
    (its last axis is d_model). Each map is ``y ↦ (y P) diag(γ)``; its ``1/s`` is the caller's."""
    weight = weight.detach().double()
    for norm in norms:
        if norm.centred:
            weight = weight - weight.mean(dim=-1, keepdim=True)
        if norm.gain is not None:
            weight = weight * norm.gain.double()
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
