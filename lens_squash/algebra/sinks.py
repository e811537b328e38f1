"""Attention sinks, mixing, and how sinks drive over-squashing: pure functions on attention patterns.

The over-squashing bound of Barbero et al. (2024, Thm. 5.1 / B.5) and its deep limit (Prop. 5.2 /
B.8) say the last token ends up reading almost only the first token. Real models reach that regime
through *attention sinks*: heads that park most of their attention on position 0. Queipo-de-Llano,
Arroyo, Barbero et al. ("Attention Sinks and Compression Valleys in LLMs are Two Sides of the Same
Coin") trace sinks and compression valleys to one cause, a massive activation of the first token,
and propose a Mix–Compress–Refine picture of depth. This module measures the attention side from
patterns ``A[layer, head, query_pos, key_pos]`` (causal, row-stochastic) and bundles every curve into
a :class:`SinkReport`; the residual side lives in :mod:`~lens_squash.algebra.massive` and
:mod:`~lens_squash.algebra.compression`, the curve readers in :mod:`~lens_squash.algebra.phases`,
and the one traced forward pass in :mod:`lens_squash.experiments.sinks`.

Three quantities about "the first token" have three names:

* :func:`first_token_attention` ``[layer, head]``: each head's mean attention on position 0,
  ``mean_{q ≥ 1} A[q, 0]``. Query 0 is excluded by default: under a causal mask it can only attend to
  itself, so ``A[0, 0] = 1`` for every head and would add ``(1 - mass)/n`` of pure artefact.
  ``key_importance`` is the importance score of Gu et al. (2024), ``mean_{i ≥ k} A[i, k]``, which does
  include the diagonal; ``sink_rate(ε)`` is the fraction of heads whose first-token attention exceeds ε
  (pass ``include_first_query=True`` for Gu et al.'s ``key_importance[..., 0]`` exactly). ε = 0.3
  and 0.8 are offered as :data:`SINK_EPS` and :data:`SINK_EPS_STRICT`.
* ``mean_first_token_attention`` ``[layer]``: the same averaged over heads
  (:attr:`SinkReport.mean_first_token_attention`, ``Trace.mean_first_token_attention()``).
* :func:`rollout_mass` ``[layer]``: the last token's mass on token 0 in the *product* of the rollout
  matrices ``Λ̃^(l) = ½(A^(l) + I)`` (Prop. B.8) over layers ``0 … l``
  (:attr:`SinkReport.rollout_mass`, ``SpectralReport.rollout_mass``).

**Mixing**: mean row entropy of the attention rows, queries 1 … n-1 (row 0 is always a point mass),
averaged over heads. Row ``q`` has ``q + 1`` causal keys, so by default each row's entropy is
divided by ``log(q + 1)``: 1 means uniform causal attention (broad mixing), 0 a point mass.
**Contraction**: :func:`rollout_dobrushin` gives each layer's ergodicity coefficient ``τ``, and
:func:`~lens_squash.algebra.phases.sink_layer_links` compares it and the rollout mass in and out of the sink layers.

Everything accumulates in float64, one layer at a time (SmolLM2's patterns are 4.5 GB at n = 2048).
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..core.display import compact_repr
from ..core.results import Record, Result
from .attention_stream import AttentionSummary
from .attention_stream_metrics import WritesMetricsIfAny, metrics_field
from .compression import _check_matrix_stack, compression_curves
from .massive import massive_activations
from .paths import rollout_matrices
from .phases import detect_phases, layer_correlations, massive_layers, sink_layer_links
from .spectral import dobrushin

__all__ = [
    "SINK_EPS",
    "SINK_EPS_STRICT",
    "SinkRate",
    "SinkReport",
    "first_token_attention",
    "key_importance",
    "mixing_score",
    "rollout_dobrushin",
    "rollout_mass",
    "sink_rate",
    "sink_report",
]

#: Gu et al. (2024)'s sink threshold: a head is a sink when ≥ 30 % of its attention goes to token 0.
SINK_EPS: float = 0.3
#: A strict threshold: the head is almost entirely a sink.
SINK_EPS_STRICT: float = 0.8

_F64 = torch.float64


# ---------------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------------


def _check_patterns(patterns: Tensor) -> Tensor:
    if patterns.ndim != 4 or patterns.shape[-1] != patterns.shape[-2]:
        raise ValueError(
            "patterns must have shape [layer, head, query_pos, key_pos] with square attention "
            f"matrices, got {tuple(patterns.shape)}; add the missing axes with unsqueeze"
        )
    # no float64 copy of the whole stack here: at n = 2048 SmolLM2's patterns are 4.5 GB in float32,
    # so callers convert slices or one layer at a time
    return patterns


def _layers_f64(patterns: Tensor):
    """Each layer's ``[head, query_pos, key_pos]`` patterns in float64, one at a time."""
    for layer_patterns in patterns:
        yield layer_patterns.to(_F64)


# ---------------------------------------------------------------------------------------------------
# attention sinks
# ---------------------------------------------------------------------------------------------------


def first_token_attention(
    patterns: Float[Tensor, "layer head query_pos key_pos"],
    *,
    include_first_query: bool = False,
) -> Float[Tensor, "layer head"]:
    """Each head's mean attention on position 0 over queries 1 … n-1 (0 … n-1 with ``include_first_query``)."""
    patterns = _check_patterns(patterns)
    if include_first_query:
        return patterns[..., 0].to(_F64).mean(-1)
    if patterns.shape[-1] < 2:
        raise ValueError("excluding query 0 needs at least 2 positions; pass include_first_query=True")
    return patterns[..., 1:, 0].to(_F64).mean(-1)


def key_importance(
    patterns: Float[Tensor, "layer head query_pos key_pos"],
) -> Float[Tensor, "layer head key_pos"]:
    """Gu et al.'s importance score ``mean_{i ≥ k} A[i, k]`` of every key ``k``, per layer and head."""
    patterns = _check_patterns(patterns).to(_F64)
    n = patterns.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool).tril()  # query i ≥ key k
    total = torch.where(causal, patterns, torch.zeros_like(patterns)).sum(-2)
    return total / torch.arange(n, 0, -1, dtype=_F64)  # key k is seen by n - k queries


@dataclass(frozen=True, eq=False)
class SinkRate(Record):
    """Which heads are sinks at threshold ``eps``, and their fraction overall and per layer."""

    eps: float
    is_sink: Bool[Tensor, "layer head"]
    per_layer: Float[Tensor, "layer"]
    overall: float

    __repr__ = compact_repr

    def _repr_html_(self) -> str:
        layers = ", ".join(f"{v:.2f}" for v in self.per_layer.tolist())
        return f"<b>sink rate (ε = {self.eps})</b>: {self.overall:.1%} of heads<br>per layer: {html.escape(layers)}"


def sink_rate(
    patterns: Float[Tensor, "layer head query_pos key_pos"],
    eps: float = SINK_EPS,
    *,
    include_first_query: bool = False,
) -> SinkRate:
    """Fraction of heads whose :func:`first_token_attention` exceeds ``eps`` (strictly)."""
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"eps is an attention fraction in [0, 1), got {eps}; try SINK_EPS = 0.3")
    is_sink = first_token_attention(patterns, include_first_query=include_first_query) > eps
    share = is_sink.to(_F64)
    return SinkRate(eps=float(eps), is_sink=is_sink, per_layer=share.mean(-1), overall=float(share.mean()))


def mixing_score(
    patterns: Float[Tensor, "layer head query_pos key_pos"],
    *,
    normalize: bool = True,
) -> Float[Tensor, "layer"]:
    """Mean attention-row entropy over queries 1 … n-1 and heads, per layer.

    With ``normalize`` each row's entropy is divided by ``log(q + 1)``, its maximum under the causal
    mask, so the score lies in [0, 1] whatever the sequence length.
    """
    patterns = _check_patterns(patterns)
    n = patterns.shape[-1]
    if n < 2:
        raise ValueError("mixing needs at least 2 positions (query 0 always has entropy 0)")
    return torch.stack([_layer_mixing(layer, normalize=normalize) for layer in _layers_f64(patterns)])


def _layer_mixing(layer_patterns: Tensor, *, normalize: bool) -> Tensor:
    rows = layer_patterns[:, 1:, :]
    # 0 · log 0 = 0; clamp keeps log finite where A = 0
    entropy = -(rows * rows.clamp_min(1e-300).log()).sum(-1)
    if normalize:
        entropy = entropy / torch.arange(2, rows.shape[-1] + 1, dtype=_F64).log()
    return entropy.mean()


# ---------------------------------------------------------------------------------------------------
# links to over-squashing: the rollout product and Dobrushin coefficients
# ---------------------------------------------------------------------------------------------------


def rollout_mass(
    patterns: Float[Tensor, "layer head query_pos key_pos"],
) -> Float[Tensor, "layer"]:
    """``[Λ̃^(l) … Λ̃^(0)]_{n-1, 0}`` for every depth ``l``: the last token's rollout mass on token 0.

    Entry ``l`` is the product of layers ``0 … l``. Only the product's first column is needed, so it
    is carried as a vector (``L`` matrix–vector products, ``O(L n²)``) instead of multiplying matrices.
    It is the last entry of :func:`lens_squash.algebra.spectral.first_token_column` of the rollout stack,
    streamed one layer at a time so no ``[layer, n, n]`` float64 stack is built (1 GB at n = 2048).
    """
    patterns = _check_patterns(patterns)
    column = _first_column(patterns.shape[-1])
    mass = []
    for layer_patterns in _layers_f64(patterns):  # one layer at a time: no [layer, n, n] float64 stack
        column = _rollout_step(layer_patterns.mean(0), column)
        mass.append(column[-1])
    return torch.stack(mass)


def _first_column(n: int) -> Tensor:
    column = torch.zeros(n, dtype=_F64)
    column[0] = 1.0
    return column


def _rollout_step(layer_mean: Tensor, column: Tensor) -> Tensor:
    return 0.5 * (layer_mean @ column + column)  # ½(A + I) c without building the matrix


def rollout_dobrushin(
    patterns: Float[Tensor, "layer head query_pos key_pos"],
) -> Float[Tensor, "layer"]:
    """Dobrushin's coefficient ``τ(½(A^(l) + I))`` of every layer, by :func:`lens_squash.algebra.spectral.dobrushin`.

    For a causal layer ``τ = 1 − min_j P_j0 = 1 − ½ min_{q ≥ 1} A^(l)[q, 0]``: a layer contracts
    exactly as much as its *weakest* attention to the first token allows, so sinks are what make a
    layer contract. Each layer is built alone in float64 and its rows renormalised: float32 softmax
    rows sum to 1 only within ~1e-7, and the O(n) causal closed form needs stochastic rows (else
    ``spectral.dobrushin`` falls back to its exact O(n³) pairwise route).
    """
    patterns = _check_patterns(patterns)
    return torch.stack([_layer_tau(layer.mean(0)) for layer in _layers_f64(patterns)])


def _layer_tau(layer_mean: Tensor) -> Tensor:
    # float32 softmax rows sum to 1 within ~1e-7·√n: the closed form on the row-normalised Λ̃
    return dobrushin(rollout_matrices(layer_mean), atol=1e-4)


# ---------------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SinkReport(WritesMetricsIfAny, Result):
    """Per-layer sink, massive-activation, compression and mixing curves of one forward pass.

    Attention curves have one entry per layer ``L``; residual curves one per residual stream that
    was passed (``L`` or ``L + 1`` when the final ``resid_post`` is included). ``rollout_mass[l]`` is
    the last token's mass on token 0 after layers ``0 … l`` of the rollout product, ``dobrushin[l]``
    the coefficient of layer ``l``'s ``½(A^(l) + I)``; ``links`` compares them in and out of sink layers.
    ``metrics``: the registered per-layer metrics' curves (:mod:`~lens_squash.algebra.attention_stream_metrics`).
    """

    eps: float
    mean_first_token_attention: Float[Tensor, "layer"]
    sink_rate: Float[Tensor, "layer"]
    sink_rate_overall: float
    mixing: Float[Tensor, "layer"]
    first_token_norm: Float[Tensor, "layers_covered"]
    norm_ratio: Float[Tensor, "layers_covered"]
    entropy: Float[Tensor, "layers_covered"] | None
    anisotropy: Float[Tensor, "layers_covered"] | None
    phases: tuple[int, int] | None
    massive_range: tuple[int, int] | None
    correlations: dict[str, float]
    provenance: dict[str, Any] = field(default_factory=dict)
    top_dims: Int[Tensor, "layers_covered k"] | None = None
    top_values: Float[Tensor, "layers_covered k"] | None = None
    rollout_mass: Float[Tensor, "layer"] | None = None
    dobrushin: Float[Tensor, "layer"] | None = None
    links: dict[str, float] = field(default_factory=dict)
    #: name -> one value per layer, for each registered per-layer metric (written only when there is one)
    metrics: dict[str, Float[Tensor, "layer"]] = metrics_field()

    def __post_init__(self):
        _check_metrics(self.metrics, self.mean_first_token_attention.numel(), type(self))

    @property
    def n_layers(self) -> int:
        return self.mean_first_token_attention.numel()

    def curves(self) -> dict[str, Tensor]:
        """The per-layer curves that are present, by name (what :meth:`plot` draws)."""
        curves = {  # written out, not getattr by name: a renamed field is an error here, not a lost panel
            "mean_first_token_attention": self.mean_first_token_attention,
            "sink_rate": self.sink_rate,
            "mixing": self.mixing,
            "norm_ratio": self.norm_ratio,
            "entropy": self.entropy,
            "anisotropy": self.anisotropy,
            "rollout_mass": self.rollout_mass,
            "dobrushin": self.dobrushin,
        }
        return {name: values for name, values in curves.items() if values is not None} | dict(self.metrics)

    def phase_text(self) -> str:
        """The Mix–Compress–Refine boundaries in words (``phases`` indexes the residual streams)."""
        if self.phases is None:
            return "no compression valley (the matrix entropy never dips clearly below its early level)"
        if self.entropy is None:
            return "phases unknown (no residual streams were kept)"
        mix_end, compress_end = self.phases
        n = self.entropy.numel()
        refine = (
            f"refine {compress_end}–{n - 1}" if compress_end < n else "no refine phase (the valley reaches the output)"
        )
        mix = f"mix 0–{mix_end - 1}" if mix_end > 0 else "no mix phase"
        return f"residual streams: {mix}, compress {mix_end}–{compress_end - 1}, {refine}"

    def massive_text(self) -> str:
        """Where the first token's norm is massive, in words."""
        peak = int(self.norm_ratio.argmax())
        if self.massive_range is None:
            return (
                f"no massive activation (the first token's norm peaks at {float(self.norm_ratio[peak]):.1f}× "
                f"the median, at residual stream {peak})"
            )
        start, end = self.massive_range
        return f"massive first-token activation in residual streams {start}–{end - 1} (peak {float(self.norm_ratio[peak]):.1f}× at {peak})"

    def correlation_lines(self) -> list[str]:
        """One line per cross-layer correlation; an undefined one (a constant curve) says so, not ``nan``."""
        lines = []
        for name, value in self.correlations.items():
            text = f"{value:.3f}" if math.isfinite(value) else "undefined (one of the curves is constant across layers)"
            lines.append(f"corr {name}: {text}")
        return lines

    __repr__ = compact_repr

    def _repr_html_(self) -> str:
        peak = int(self.norm_ratio.argmax())
        rows = [
            ("model", str(self.provenance.get("model", {}).get("name", "—"))),
            ("layers", str(self.n_layers)),
            (f"sink rate (ε = {self.eps})", f"{self.sink_rate_overall:.1%} of heads"),
            ("first-token norm ÷ median (peak)", f"{self.norm_ratio[peak]:.1f}× at layer {peak}"),
            (
                "min normalised entropy",
                "—" if self.entropy is None else f"{self.entropy.min():.3f} at layer {int(self.entropy.argmin())}",
            ),
            ("phases", self.phase_text()),
            ("massive activation", self.massive_text()),
        ]
        if self.rollout_mass is not None:
            rows.append(("rollout mass on token 0 (all layers)", f"{self.rollout_mass[-1]:.4f}"))
        rows += [
            (name, f"{value:.3g}" if math.isfinite(value) else "— (no layers in this group)")
            for name, value in self.links.items()
        ]
        rows += [
            (f"ρ({name})", f"{value:.2f}" if math.isfinite(value) else "undefined (constant curve)")
            for name, value in self.correlations.items()
        ]
        body = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in rows)
        return f"<b>lens_squash SinkReport</b><table>{body}</table>"


def _check_metrics(metrics: Any, n_layers: int, cls: type) -> None:
    """Refuse metrics that are not one float curve per layer, or that reuse a field's name (a panel
    of the figure would then be ambiguous)."""
    if not isinstance(metrics, dict):
        raise TypeError(f"{cls.__name__}.metrics maps names to per-layer tensors, got {type(metrics).__name__}")
    names = {f.name for f in fields(cls)}
    for name, values in metrics.items():
        if not isinstance(name, str) or name in names:
            raise ValueError(f"{cls.__name__}.metrics[{name!r}]: a metric needs a name no field has; rename it")
        if not (isinstance(values, Tensor) and values.is_floating_point() and values.shape == (n_layers,)):
            shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
            raise ValueError(
                f"{cls.__name__}.metrics[{name!r}] is {shape}, expected a float tensor of {n_layers} layers"
            )


def sink_report(
    summary: AttentionSummary,
    resid_norms: Float[Tensor, "layers_covered pos"],
    *,
    representations: Float[Tensor, "layers_covered pos d_model"] | None = None,
    first_resid: Float[Tensor, "layers_covered d_model"] | None = None,
    eps: float = SINK_EPS,
    factor: float = 10.0,
    method: Literal["spearman", "pearson"] = "spearman",
    over_squashing: bool = True,
    provenance: dict[str, Any] | None = None,
) -> SinkReport:
    """All per-layer curves, phase boundaries and their cross-layer correlations in one report: the
    one builder of a :class:`SinkReport`.

    ``summary`` holds the attention curves, gathered one layer at a time
    (:class:`~lens_squash.algebra.attention_stream.AttentionStream`: during a streamed trace, or
    :func:`~lens_squash.algebra.attention_stream.summarize_attention` of a stored stack). ``resid_norms[l]``
    must be the stream *entering* layer ``l`` (``Trace.resid_norms``), so that correlations pair it with
    layer ``l``'s attention. Phases come from the entropy curve when ``representations`` are given;
    correlations are over the first ``L`` residual entries. ``first_resid`` (the first token's residual
    vectors) adds the top massive dimensions. ``over_squashing`` adds the rollout mass and Dobrushin curves.
    """
    if summary.n_tokens < 2:
        raise ValueError("excluding query 0 needs at least 2 positions; pass a prompt of at least 2 tokens")
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"eps is an attention fraction in [0, 1), got {eps}; try SINK_EPS = 0.3")
    head_mass = summary.first_token_attention  # [layer, head], as first_token_attention
    n_layers = head_mass.shape[0]
    resid_norms = torch.as_tensor(resid_norms).to(_F64)
    if resid_norms.ndim != 2 or resid_norms.shape[0] not in (n_layers, n_layers + 1):
        raise ValueError(
            f"resid_norms must be [layer, pos] with {n_layers} or {n_layers + 1} rows (one per residual "
            f"stream entering each layer, optionally plus the final one), got {tuple(resid_norms.shape)}"
        )
    is_sink = (head_mass > eps).to(_F64)
    rollout_mass = summary.rollout_mass if over_squashing else None
    dobrushin = summary.sink_dobrushin if over_squashing else None
    massive = massive_activations(resid_norms, first_resid)
    entropy = aniso = phases = None
    links: dict[str, float] = {}
    curves = {"first_token_norm": massive.first_norm, "sink_rate": is_sink.mean(-1)}
    if representations is not None:
        representations = _check_matrix_stack(representations, "representations")
        if representations.shape[:2] != resid_norms.shape:
            raise ValueError(
                f"representations {tuple(representations.shape)} must match resid_norms "
                f"{tuple(resid_norms.shape)} in their [layer, pos] axes"
            )
        entropy, aniso = compression_curves(representations)  # one spectrum for both curves
        phases = detect_phases(entropy)
        curves["entropy"] = entropy
    if rollout_mass is not None:
        links = sink_layer_links(curves["sink_rate"], dobrushin, rollout_mass)
        curves["dobrushin"] = dobrushin
        curves["rollout_mass_gain"] = torch.diff(rollout_mass, prepend=rollout_mass.new_zeros(1))
    return SinkReport(
        eps=float(eps),
        mean_first_token_attention=head_mass.mean(-1),
        sink_rate=curves["sink_rate"],
        sink_rate_overall=float(is_sink.mean()),
        mixing=summary.mixing,
        first_token_norm=massive.first_norm,
        norm_ratio=massive.ratio,
        entropy=entropy,
        anisotropy=aniso,
        phases=phases,
        massive_range=massive_layers(massive.ratio, factor=factor),
        correlations=layer_correlations(curves, method=method),
        provenance=dict(provenance or {}),
        top_dims=massive.top_dims,
        top_values=massive.top_values,
        rollout_mass=rollout_mass,
        dobrushin=dobrushin,
        links=links,
        metrics=dict(summary.metrics),
    )
