"""What the analyses read from a prompt's attention, gathered one layer at a time: the one per-layer pipeline.

At n = 8192 one layer's ``[head, query_pos, key_pos]`` patterns of SmolLM2 are 2.4 GB in float32 and
the whole stack 72 GB, so a long prompt's trace keeps none of them. Everything but the bound rows
needs only O(n) numbers per layer, folded into one :class:`AttentionStream` layer by layer: during
the forward pass when the patterns stream, or from the stored stack afterwards
(:func:`summarize_attention`: the whole stack is just stored layers streamed), so both give the same
:class:`AttentionSummary` by the same code:

* the patterns' defects (row sums, mass above the diagonal, smallest entry), merged over layers as
  :func:`lens_squash.algebra.attention.attention_defects` reports them for the whole stack;
* the Perron–Frobenius / Dobrushin summary of the head-mean rollout matrices ``Λ̃^(l) = ½(A^(l) + I)``
  (:class:`lens_squash.algebra.spectral.SpectralStream`);
* the sink curves (:mod:`lens_squash.algebra.sinks`): each head's mean attention on token 0 (queries
  1 … n-1), each layer's normalised mixing entropy, the rollout mass of the last token on token 0 and
  ``τ(Λ̃^(l))``, in float64; :func:`lens_squash.algebra.sinks.sink_report` builds the report from them.
* every per-layer metric registered with :func:`~lens_squash.algebra.attention_stream_metrics.layer_metric`
  (``AttentionSummary.metrics``; none by default): the place to add one.

The bound rows run top-down instead (:func:`lens_squash.edge.stream.stream_bounds`: stored layers, or
each layer recomputed). Every quantity here is computed by the same formula as the pure functions of
:mod:`lens_squash.algebra.sinks` and :mod:`lens_squash.algebra.spectral`, in float64, in chunks that
bound the temporary memory; the tests check streamed and stored traces agree on every architecture family. A causal layer (every entry above the diagonal exactly
0, none negative: what softmax gives) is read in one pass of row chunks over its causal keys only,
each chunk hot in cache for all the statistics (about 5× cheaper than one whole-layer pass per statistic);
any other layer goes through the whole-stack functions themselves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..core.display import compact_repr
from ..core.results import Record
from .attention import attention_defects
from .attention_stream_metrics import WritesMetricsIfAny, active_metrics, metrics_field
from .spectral import SpectralLayers, SpectralStream, dobrushin

__all__ = ["AttentionStream", "AttentionSummary", "summarize_attention"]

_F64 = torch.float64
#: float64 elements one chunk of the mixing entropy may hold (``head × rows × keys``, 256 MB)
ENTROPY_CHUNK: int = 2**25
#: float64 elements of one row chunk of a causal layer (``head × rows × keys``, 2 MB): small enough
#: to stay in cache while the head mean, the rollout rows and the entropy all read it (1–4 MB
#: measured alike at n = 2048; smaller chunks pay Python's overhead per chunk)
ROW_CHUNK: int = 2**18


@dataclass(frozen=True, eq=False)
class AttentionSummary(WritesMetricsIfAny, Record):
    """Per-layer attention statistics of one prompt (see the module docstring).

    ``spectral`` is ``None`` when it was not asked for (learned sinks make rows sub-stochastic) or
    when a layer failed its check; ``spectral_error`` then holds that check's message. ``metrics``:
    each registered per-layer metric's curve (:mod:`~lens_squash.algebra.attention_stream_metrics`).
    """

    n_tokens: int
    defects: dict[str, float]
    #: each head's mean attention on position 0 over queries 1 … n-1 (float64; NaN for a 1-token prompt)
    first_token_attention: Float[Tensor, "layer head"]
    mixing: Float[Tensor, "layer"]
    rollout_mass: Float[Tensor, "layer"]
    sink_dobrushin: Float[Tensor, "layer"]
    spectral: SpectralLayers | None = None
    spectral_error: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    #: name -> one float64 value per layer, for each metric registered when the stream started
    metrics: dict[str, Float[Tensor, "layer"]] = metrics_field()

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
        parts.append(_row_entropy(layer[:, start:stop, :stop].to(_F64)))
    return _normalised_mixing(torch.cat(parts, dim=-1))


def _row_entropy(rows: Float[Tensor, "head row key"]) -> Float[Tensor, "head row"]:
    # sinks' formula −Σ p·log max(p, 1e-300) element for element (0 · log 1e-300 = 0), with one
    # temporary: twice as fast as torch.special.entr here, which is not vectorised on CPU
    return -rows.clamp_min(1e-300).log_().mul_(rows).sum(-1)


def _normalised_mixing(entropy: Float[Tensor, "head query"]) -> Tensor:
    """Mean over heads and queries 1 … n-1 of each row's entropy over its maximum ``log(q + 1)``."""
    return (entropy / torch.arange(2, entropy.shape[-1] + 2, dtype=_F64).log()).mean()


def _chunk_rows(start: int, n: int, n_heads: int) -> int:
    """Rows from ``start`` whose causal block ``head × rows × (start + rows)`` fits ROW_CHUNK."""
    budget = max(1, ROW_CHUNK // n_heads)
    rows = (math.isqrt(start * start + 4 * budget) - start) // 2  # rows · (start + rows) ≤ budget
    return min(n - start, max(1, rows))


class _CausalRows:
    """What a causal Λ̃ gives the spectral summary and the sink curves, gathered row chunk by row
    chunk: diagonal, row sums, column 0, nonzeros per row and (with a state) ``Λ̃ · state``."""

    def __init__(self, state: Tensor | None):
        self.state = state
        self.parts: dict[str, list[Tensor]] = {k: [] for k in ("diagonal", "sums", "first", "nonzero", "product")}

    def add(self, start: int, lam: Float[Tensor, "row key"]) -> None:
        """Rows ``start …`` of Λ̃ over their causal keys (the rest of each row is exactly 0)."""
        self.parts["sums"].append(lam.sum(-1))
        self.parts["first"].append(lam[:, 0])
        if self.state is not None:
            self.parts["diagonal"].append(lam.diagonal(start))
            self.parts["nonzero"].append((lam != 0).sum(-1))
            self.parts["product"].append(lam @ self.state[: lam.shape[-1]])

    def __getitem__(self, key: str) -> Tensor:
        return torch.cat(self.parts[key])

    def deviation(self) -> float:
        return float((self["sums"] - 1).abs().max())

    def closed_form_tau(self) -> Tensor:
        """:func:`lens_squash.algebra.spectral.dobrushin`'s causal closed form, as it computes it."""
        return 1.0 - (self["first"] / self["sums"]).min()


def _rollout_rows(mean: Float[Tensor, "row key"], start: int) -> Tensor:
    """Rows ``start …`` of ``½(A + I)`` from the same rows of ``A``, in place (as :func:`_rollout_inplace`)."""
    mean.diagonal(start).add_(1.0)
    return mean.mul_(0.5)


class AttentionStream:
    """Folds in each layer's ``[head, query_pos, key_pos]`` patterns in layer order; ``finish`` gives
    the :class:`AttentionSummary`. ``spectral_atol=None`` skips the spectral summary. ``defects``: the
    whole stack's :func:`~lens_squash.algebra.attention.attention_defects` when already known (a trace
    scanned its stored stack once), so the layers are not scanned again."""

    def __init__(self, n: int, *, spectral_atol: float | None, defects: dict[str, float] | None = None):
        self._known = None if defects is None or math.isnan(defects["row_deviation"]) else dict(defects)
        self._defects: dict[str, float] | None = self._known
        self._n = n
        self._first: list[Tensor] = []
        self._spectral = None if spectral_atol is None else SpectralStream(n, atol=spectral_atol)
        self._spectral_error: str | None = None
        self._column = torch.zeros(n, dtype=_F64)
        self._column[0] = 1.0
        self._mixing: list[Tensor] = []
        self._mass: list[Tensor] = []
        self._tau: list[Tensor] = []
        # the registry as it stands now: one metric registered mid-pass would miss earlier layers
        self._metrics = active_metrics()
        self._metric_values: dict[str, list[Tensor]] = {m.name: [] for m in self._metrics}

    @property
    def _spectral_on(self) -> bool:
        return self._spectral is not None and self._spectral_error is None

    def add(self, layer: Float[Tensor, "head query_pos key_pos"]) -> None:
        """Fold in the next layer's patterns."""
        defects = self._known or attention_defects(layer)  # the whole stack's bound every layer's
        if self._known is None:
            self._defects = _merge_defects(self._defects, defects)
        if math.isnan(defects["row_deviation"]):
            return  # NaN patterns: the trace refuses them once the pass is over
        # as sinks.first_token_attention: queries 1 … n-1, in float64 (NaN with one query)
        self._first.append(layer[:, 1:, 0].to(_F64).mean(-1))
        # no mass above the diagonal and no negative entry: every entry there is exactly 0
        causal = defects["above_diagonal"] == 0 and defects["min_entry"] >= 0
        if causal and layer.ndim == 3 and layer.shape[-1] == self._column.shape[0]:
            self._add_causal(layer)
        else:
            self._add_any(layer)
        for metric in self._metrics:  # none registered: an empty loop
            self._metric_values[metric.name].append(metric.value(layer))

    def _add_spectral(self, lam: Tensor) -> None:
        try:
            self._spectral.add(lam)
        except ValueError as error:  # raised again only if the spectral analysis is asked for
            self._spectral_error = str(error)

    def _add_any(self, layer: Float[Tensor, "head query_pos key_pos"]) -> None:
        """Any finite layer, through the whole-stack functions themselves."""
        if self._spectral_on:  # the head mean as the trace keeps it (float32 for float32 models), then float64
            self._add_spectral(_rollout_inplace(layer.mean(0).double()))
        mean = layer.mean(0, dtype=_F64)  # sink curves average the heads in float64
        self._column = 0.5 * (mean @ self._column + self._column)
        self._mass.append(self._column[-1])
        self._tau.append(dobrushin(_rollout_inplace(mean), atol=1e-4))
        if layer.shape[-1] >= 2:
            self._mixing.append(causal_mixing(layer))

    def _add_causal(self, layer: Float[Tensor, "head query_pos key_pos"]) -> None:
        """A causal non-negative layer in one pass of row chunks that stay in cache: the same numbers
        as :meth:`_add_any` up to summation order. Each Λ̃ is then causal and non-negative, so its
        only check left is the row sums, and τ takes the closed form unless they fail it."""
        n_heads, n = layer.shape[0], layer.shape[-1]
        spectral = _CausalRows(self._spectral._state) if self._spectral_on else None
        mean32 = layer.mean(0) if spectral is not None else None  # whole: as the trace keeps it
        sinks, entropy, column = _CausalRows(None), [], []
        start = 0
        while start < n:
            stop = start + _chunk_rows(start, n, n_heads)
            block = layer[:, start:stop, :stop].to(_F64)
            mean = block.mean(0)  # as layer.mean(0, dtype=float64), row by row
            column.append(0.5 * (mean @ self._column[:stop] + self._column[start:stop]))
            sinks.add(start, _rollout_rows(mean, start))
            if spectral is not None:
                spectral.add(start, _rollout_rows(mean32[start:stop, :stop].double(), start))
            entropy.append(_row_entropy(block))
            start = stop
        self._finish_causal(layer, spectral, sinks)
        self._column = torch.cat(column)
        self._mass.append(self._column[-1])
        if n >= 2:
            self._mixing.append(_normalised_mixing(torch.cat(entropy, dim=-1)[:, 1:]))

    def _finish_causal(self, layer: Tensor, spectral: _CausalRows | None, sinks: _CausalRows) -> None:
        if spectral is not None:
            if spectral.deviation() > self._spectral.atol:  # the whole check raises its message
                self._add_spectral(_rollout_inplace(layer.mean(0).double()))
            else:
                two = (spectral["nonzero"][1:] >= 2).all()
                self._spectral._append(spectral["diagonal"], spectral.closed_form_tau(), two, spectral["product"])
        if sinks.deviation() <= 1e-4:
            self._tau.append(sinks.closed_form_tau())
        else:  # rows too far from 1 for the closed form: dobrushin's exact route
            self._tau.append(dobrushin(_rollout_inplace(layer.mean(0, dtype=_F64)), atol=1e-4))

    def finish(self) -> AttentionSummary:
        spectral = None
        if self._spectral is not None and self._spectral_error is None and self._mass:
            spectral = self._spectral.finish()
        return AttentionSummary(
            n_tokens=self._n,
            defects=self._defects or {},
            first_token_attention=_stacked(self._first),
            mixing=_stacked(self._mixing),
            rollout_mass=_stacked(self._mass),
            sink_dobrushin=_stacked(self._tau),
            spectral=spectral,
            spectral_error=self._spectral_error,
            metrics={name: _stacked(values) for name, values in self._metric_values.items()},
        )


def _stacked(values: list[Tensor]) -> Tensor:
    return torch.stack(values) if values else torch.zeros(0, dtype=_F64)


def summarize_attention(
    patterns: Float[Tensor, "layer head query_pos key_pos"],
    *,
    spectral_atol: float | None,
    defects: dict[str, float] | None = None,
) -> AttentionSummary:
    """The :class:`AttentionSummary` of a stored stack: its layers fed one at a time into the same
    :class:`AttentionStream` a streamed trace feeds during its pass (``defects``: the stack's, if known)."""
    if patterns is None:  # e.g. a trace loaded from a file saved without its heavy fields
        raise ValueError(
            "there are no attention patterns to summarise (not kept, or not saved); trace the prompt again"
        )
    if patterns.ndim != 4 or patterns.shape[-1] != patterns.shape[-2]:
        raise ValueError(f"patterns must be [layer, head, query_pos, key_pos], got {tuple(patterns.shape)}")
    stream = AttentionStream(patterns.shape[-1], spectral_atol=spectral_atol, defects=defects)
    for layer in patterns:
        stream.add(layer)
    return stream.finish()
