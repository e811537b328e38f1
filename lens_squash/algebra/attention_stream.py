"""What the analyses read from a prompt's attention, gathered one layer at a time (long prompts).

At n = 8192 one layer's ``[head, query_pos, key_pos]`` patterns of SmolLM2 are 2.4 GB in float32 and
the whole stack 72 GB, so a long prompt's trace keeps none of them. Everything but the bound rows
needs only O(n) numbers per layer, taken while each layer's patterns exist during the forward pass:

* the patterns' defects (row sums, mass above the diagonal, smallest entry), merged over layers as
  :func:`lens_squash.algebra.attention.attention_defects` reports them for the whole stack;
* the Perron–Frobenius / Dobrushin summary of the head-mean rollout matrices ``Λ̃^(l) = ½(A^(l) + I)``
  (:class:`lens_squash.algebra.spectral.SpectralStream`);
* the sink curves (:mod:`lens_squash.algebra.sinks`): each layer's normalised mixing entropy, the
  rollout mass of the last token on token 0 and ``τ(Λ̃^(l))``, in float64 as ``sink_report`` takes them.

The bound rows run top-down and recompute each layer's patterns instead
(:mod:`lens_squash.edge.stream`). Every quantity here is computed by the same formula as the
whole-stack functions, in float64, in chunks that bound the temporary memory; the tests check the
two paths agree on every architecture family.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from ..core.display import compact_repr
from ..core.results import Record
from . import sinks
from .attention import attention_defects
from .spectral import SpectralLayers, SpectralStream, dobrushin

__all__ = ["AttentionStream", "AttentionSummary", "sink_report_from_summary"]

_F64 = torch.float64
#: float64 elements one chunk of the mixing entropy may hold (``head × rows × keys``, 256 MB)
ENTROPY_CHUNK: int = 2**25


@dataclass(frozen=True, eq=False)
class AttentionSummary(Record):
    """Per-layer attention statistics of one prompt (see the module docstring).

    ``spectral`` is ``None`` when it was not asked for (learned sinks make rows sub-stochastic) or
    when a layer failed its check; ``spectral_error`` then holds that check's message.
    """

    defects: dict[str, float]
    mixing: Float[Tensor, "layer"]
    rollout_mass: Float[Tensor, "layer"]
    sink_dobrushin: Float[Tensor, "layer"]
    spectral: SpectralLayers | None = None
    spectral_error: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    __repr__ = compact_repr


def _merge_defects(total: dict[str, float] | None, layer: dict[str, float]) -> dict[str, float]:
    """The whole stack's defects from each layer's: maxima, the minimum entry, NaN once any layer has it."""
    if total is None or math.isnan(layer["row_deviation"]):
        return dict(layer)
    if math.isnan(total["row_deviation"]):
        return total
    return {k: (min if k == "min_entry" else max)(total[k], layer[k]) for k in total}


def _rollout_inplace(mean: Tensor) -> Tensor:
    """``½(A + I)`` without the identity matrix: the same numbers as ``paths.rollout_matrices``
    (``a + 0`` is ``a``), one ``n × n`` buffer instead of three."""
    lam = mean.clone()
    lam.diagonal().add_(1.0)
    return lam.mul_(0.5)


def causal_mixing(layer: Float[Tensor, "head query_pos key_pos"]) -> Tensor:
    """:func:`lens_squash.algebra.sinks.mixing_score` of one layer (normalised, queries 1 … n-1), in
    float64 row chunks that read only the causal keys: entries after the query are exactly 0 and add
    nothing to a row's entropy (equal to the whole-stack score to ~1e-16)."""
    n_heads, n = layer.shape[0], layer.shape[-1]
    if n < 2:
        raise ValueError("mixing needs at least 2 positions (query 0 always has entropy 0)")
    rows_per_chunk = max(1, ENTROPY_CHUNK // (n_heads * n))
    parts = []
    for start in range(1, n, rows_per_chunk):
        stop = min(n, start + rows_per_chunk)
        # entr(p) = −p log p with entr(0) = 0: sinks' clamped formula in one pass, half its time
        parts.append(torch.special.entr(layer[:, start:stop, :stop].to(_F64)).sum(-1))
    entropy = torch.cat(parts, dim=-1) / torch.arange(2, n + 1, dtype=_F64).log()
    return entropy.mean()


class AttentionStream:
    """Folds in each layer's ``[head, query_pos, key_pos]`` patterns in layer order; ``finish`` gives
    the :class:`AttentionSummary`. ``spectral_atol=None`` skips the spectral summary."""

    def __init__(self, n: int, *, spectral_atol: float | None):
        self._defects: dict[str, float] | None = None
        self._spectral = None if spectral_atol is None else SpectralStream(n, atol=spectral_atol)
        self._spectral_error: str | None = None
        self._column = torch.zeros(n, dtype=_F64)
        self._column[0] = 1.0
        self._mixing: list[Tensor] = []
        self._mass: list[Tensor] = []
        self._tau: list[Tensor] = []

    def add(self, layer: Float[Tensor, "head query_pos key_pos"]) -> None:
        defects = attention_defects(layer)
        self._defects = _merge_defects(self._defects, defects)
        if math.isnan(defects["row_deviation"]):
            return  # NaN patterns: the trace refuses them once the pass is over
        if self._spectral is not None and self._spectral_error is None:
            try:  # the head mean as the trace keeps it (float32 for float32 models), then float64
                self._spectral.add(_rollout_inplace(layer.mean(0).double()))
            except ValueError as error:  # raised again only if the spectral analysis is asked for
                self._spectral_error = str(error)
        mean = layer.mean(0, dtype=_F64)  # sink curves average the heads in float64
        self._column = 0.5 * (mean @ self._column + self._column)
        self._mass.append(self._column[-1])
        self._tau.append(dobrushin(_rollout_inplace(mean), atol=1e-4))
        if layer.shape[-1] >= 2:
            self._mixing.append(causal_mixing(layer))

    def finish(self) -> AttentionSummary:
        spectral = None
        if self._spectral is not None and self._spectral_error is None and self._mass:
            spectral = self._spectral.finish()
        return AttentionSummary(
            defects=self._defects or {},
            mixing=_stacked(self._mixing),
            rollout_mass=_stacked(self._mass),
            sink_dobrushin=_stacked(self._tau),
            spectral=spectral,
            spectral_error=self._spectral_error,
        )


def _stacked(values: list[Tensor]) -> Tensor:
    return torch.stack(values) if values else torch.zeros(0, dtype=_F64)


def sink_report_from_summary(
    summary: AttentionSummary,
    attention_to_first: Float[Tensor, "layer head query_pos"],
    resid_norms: Float[Tensor, "layers_covered pos"],
    *,
    representations: Float[Tensor, "layers_covered pos d_model"] | None = None,
    first_resid: Float[Tensor, "layers_covered d_model"] | None = None,
    eps: float = sinks.SINK_EPS,
    factor: float = 10.0,
    method: Literal["spearman", "pearson"] = "spearman",
    metadata: dict[str, Any] | None = None,
) -> sinks.SinkReport:
    """:func:`lens_squash.algebra.sinks.sink_report` (``over_squashing=True``) from a streamed summary
    and the attention every query pays to position 0: the same curves, correlations and phases."""
    n_layers = attention_to_first.shape[0]
    if attention_to_first.shape[-1] < 2:
        raise ValueError("excluding query 0 needs at least 2 positions; pass a prompt of at least 2 tokens")
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"eps is an attention fraction in [0, 1), got {eps}; try SINK_EPS = 0.3")
    resid_norms = torch.as_tensor(resid_norms).to(_F64)
    if resid_norms.ndim != 2 or resid_norms.shape[0] not in (n_layers, n_layers + 1):
        raise ValueError(
            f"resid_norms must be [layer, pos] with {n_layers} or {n_layers + 1} rows, got {tuple(resid_norms.shape)}"
        )
    head_mass = attention_to_first[..., 1:].to(_F64).mean(-1)  # [layer, head], as sinks.first_token_attention
    is_sink = head_mass > eps
    per_layer = is_sink.to(_F64).mean(-1)
    return sinks.report_from_curves(
        eps=eps,
        mean_first_token_attention=head_mass.mean(-1),
        sink_rate=per_layer,
        sink_rate_overall=float(is_sink.to(_F64).mean()),
        mixing=summary.mixing,
        resid_norms=resid_norms,
        first_resid=first_resid,
        representations=representations,
        rollout_mass=summary.rollout_mass,
        dobrushin=summary.sink_dobrushin,
        factor=factor,
        method=method,
        metadata=metadata,
    )
