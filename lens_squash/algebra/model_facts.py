"""What the algebra knows about a model: a typed, frozen description read once at the edge.

:mod:`lens_squash.edge.adapter` reads a ``HookedTransformer`` or a ``TransformerBridge`` into a
:class:`ModelFacts`; the algebra computes from its tensors and never touches the model. Algebra
functions that are handed a model (the variant builders get ``model=``) call :func:`facts_of`, which
asks the reader the edge registered (:func:`register_reader`): the algebra may not import the edge.

A fact the reader could not establish is ``None`` with its reason in :attr:`ModelFacts.unsupported`,
and the method that needs it refuses (:class:`~lens_squash.core.support.UnsupportedModelError`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from jaxtyping import Float
from torch import Tensor

from ..core.support import UnsupportedModelError

__all__ = ["LayerFacts", "ModelFacts", "NormFacts", "facts_of", "register_reader"]


@dataclass(frozen=True, eq=False)
class NormFacts:
    """A norm once its scale is frozen: ``x ↦ (x P) diag(γ) / s + b``.

    ``gain`` is the *effective* γ (Gemma stores ``w`` and multiplies by ``1 + w``; ``convention``
    says which was read), ``None`` for a norm without one; ``centred``: ``P`` centres (LayerNorm).
    """

    gain: Float[Tensor, "d_model"] | None
    bias: Float[Tensor, "d_model"] | None
    centred: bool
    convention: str = "w"


@dataclass(frozen=True, eq=False)
class LayerFacts:
    """One block's weights (float64 copies or views) with its norms by site name."""

    norms: dict[str, NormFacts]
    #: ``W_V`` with one matrix per *query* head (GQA expanded) and ``W_O``
    w_v: Float[Tensor, "head d_model d_head"]
    w_o: Float[Tensor, "head d_head d_model"]
    #: the MLP's input matrices in row-vector form (gate first for gated MLPs), ``None`` for MoE or none
    mlp_in: tuple[Float[Tensor, "d_model d_mlp"], ...] | None
    mlp_out: Float[Tensor, "d_mlp d_model"] | None


@dataclass(frozen=True, eq=False)
class ModelFacts:
    """A model as the algebra sees it (see the module docstring)."""

    backend: str  # "hooked" or "bridge"
    family: str
    #: :class:`lens_squash.algebra.blocks.BlockShape`, or None when the block shape is not established
    shape: Any
    layers: tuple[LayerFacts, ...]
    final: NormFacts | None
    n_heads: int
    n_kv_heads: int
    mlp_kind: str  # "plain", "gated", "moe", "solu" or "none"
    positional: str
    softcap: float | None = None
    window: int | None = None
    sinks: bool = False
    #: ``clip_qkv``: the clamp on queries, keys and values (None: none)
    value_clip: float | None = None
    #: hook names: the attention pattern and the norm scales of block 0 (``{l}`` stands for the layer)
    pattern_hook: str = "blocks.{l}.attn.hook_pattern"
    scale_hooks: tuple[str, ...] = ()
    #: method -> why it cannot apply ("certified", "frozen")
    unsupported: dict[str, str] = field(default_factory=dict)

    def require(self, method: str) -> None:
        """Refuse ``method`` when a fact it needs was not established."""
        if method in self.unsupported:
            raise UnsupportedModelError(self.unsupported[method])


_READER: list[Callable[[Any], ModelFacts]] = []


def register_reader(reader: Callable[[Any], ModelFacts]) -> None:
    """The edge's model reader (:func:`lens_squash.edge.adapter.read_model`), registered on import."""
    _READER[:] = [reader]


def facts_of(model) -> ModelFacts:
    """``model`` if it is already :class:`ModelFacts`, else what the registered reader makes of it."""
    if isinstance(model, ModelFacts):
        return model
    if not _READER:
        raise ValueError("no model reader is registered: import lens_squash.edge.adapter, or pass ModelFacts")
    return _READER[0](model)
