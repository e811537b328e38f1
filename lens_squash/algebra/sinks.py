"""Attention sinks, massive activations and compression valleys, per layer.

The over-squashing bound of Barbero et al. (2024, Thm. 5.1 / B.5) and its deep limit (Prop. 5.2 /
B.8) say the last token ends up reading almost only the first token. Real models reach that regime
through *attention sinks*: heads that park most of their attention on position 0. Queipo-de-Llano,
Arroyo, Barbero et al. ("Attention Sinks and Compression Valleys in LLMs are Two Sides of the Same
Coin") trace sinks and *compression valleys* (layers where token representations collapse onto
few directions) to one cause, a *massive activation* of the first token in the middle layers, and
propose a Mix–Compress–Refine picture of depth. This module measures all three from tensors:

* **Sinks** (from patterns ``A[layer, head, query_pos, key_pos]``, causal and row-stochastic).
  ``first_token_mass = mean_{q ≥ 1} A[q, 0]``. Query 0 is excluded by default: under a causal mask
  it can only attend to itself, so ``A[0, 0] = 1`` for every head and would add ``(1 - mass)/n`` of
  pure artefact (``Trace.first_token_mass`` uses the same convention). ``key_importance`` is the
  importance score of Gu et al. (2024), ``mean_{i ≥ k} A[i, k]``, which does include the diagonal;
  ``sink_rate(ε)`` is the fraction of heads whose first-token mass exceeds ε (pass
  ``include_first_query=True`` to use Gu et al.'s ``key_importance[..., 0]`` exactly). ε = 0.3 and
  0.8 are offered as :data:`SINK_EPS` and :data:`SINK_EPS_STRICT`.
* **Massive activations** (from residual norms ``[layer, pos]``): the first token's norm, its ratio
  to the median norm of the *other* tokens, and the top-k dimensions of its residual vector.
* **Compression** (from representations ``X[pos, d_model]`` or ``[layer, pos, d_model]``, not
  centred): with singular values ``σ_j`` of ``X``, ``p_j = σ_j² / ‖X‖_F²``, matrix entropy
  ``H = -Σ p_j log p_j / log min(n, d)`` (1 for isotropic data, 0 for rank one) and anisotropy
  ``σ_1² / ‖X‖_F²``. The spectrum comes from the SVD of the ``n × d`` matrix, or from the
  eigenvalues of the ``d × d`` Gram matrix ``XᵀX`` when ``n > d`` (cheaper; float64; tiny negative
  eigenvalues from rounding are clamped to 0).
* **Mixing** (from patterns): mean row entropy of the attention rows, queries 1 … n-1 (row 0 is
  always a point mass), averaged over heads. Row ``q`` has ``q + 1`` causal keys, so by default each
  row's entropy is divided by ``log(q + 1)``: 1 means uniform causal attention (broad mixing), 0 a
  point mass (a perfect sink or self-attention).
* **Phases**: :func:`detect_phases` finds the compression valley in the entropy curve with a simple
  threshold rule; :func:`massive_layers` the range of layers with a massive first-token norm.
* **Correlations** across layers (:func:`layer_correlations`): Pearson, or Spearman with average
  ranks for ties (same convention as ``scipy.stats.spearmanr``).

Everything is a pure function on tensors and accumulates in float64. :func:`sink_report` bundles the
per-layer curves into a :class:`SinkReport`. The model-facing helpers live at the bottom.

**Links to over-squashing.** The ``rollout`` variant of the path bound composes ``Λ̃^(l) = ½(A^(l) + I)``
(Prop. B.8). :func:`rollout_first_token_mass` follows the last token's mass on token 0 through the
product layer by layer and :func:`rollout_dobrushin` gives each layer's ergodicity coefficient ``τ``;
:func:`sink_layer_links` compares both in and out of the sink layers, and the report correlates them
with the sink and compression curves. :mod:`lens_squash.experiments.ablation` clamps the massive activation.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..core.display import compact_repr
from .paths import rollout_matrices
from .ranks import pearson, spearman
from ..core.records import to_jsonable
from .spectral import dobrushin
from ..edge.trace import Trace, as_tokens, trace

__all__ = [
    "SINK_EPS",
    "SINK_EPS_STRICT",
    "MassiveActivations",
    "SinkRate",
    "SinkReport",
    "anisotropy",
    "detect_phases",
    "first_token_mass",
    "key_importance",
    "layer_correlations",
    "massive_activations",
    "massive_layers",
    "matrix_entropy",
    "mixing_score",
    "rollout_dobrushin",
    "rollout_first_token_mass",
    "sink_analysis",
    "sink_layer_links",
    "sink_rate",
    "sink_report",
    "sink_report_from_trace",
    "squared_singular_values",
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


def _check_matrix_stack(x: Tensor, name: str) -> Tensor:
    if x.ndim not in (2, 3):
        raise ValueError(f"{name} must be [pos, d_model] or [layer, pos, d_model], got {tuple(x.shape)}")
    return x.to(_F64)


def _check_curve(curve, name: str) -> Tensor:
    curve = torch.as_tensor(curve).to(_F64)
    if curve.ndim != 1 or curve.numel() == 0:
        raise ValueError(f"{name} must be a non-empty per-layer curve of shape [layer], got {tuple(curve.shape)}")
    return curve


# ---------------------------------------------------------------------------------------------------
# attention sinks
# ---------------------------------------------------------------------------------------------------


def first_token_mass(
    patterns: Float[Tensor, "layer head query_pos key_pos"],
    *,
    include_first_query: bool = False,
) -> Float[Tensor, "layer head"]:
    """Mean attention on position 0 over queries 1 … n-1 (or 0 … n-1 with ``include_first_query``)."""
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
class SinkRate:
    """Which heads are sinks at threshold ``eps``, and their fraction overall and per layer."""

    eps: float
    is_sink: Bool[Tensor, "layer head"]
    per_layer: Float[Tensor, "layer"]
    overall: float

    __repr__ = compact_repr

    def _repr_html_(self) -> str:
        layers = ", ".join(f"{v:.2f}" for v in self.per_layer.tolist())
        return (f"<b>sink rate (ε = {self.eps})</b>: {self.overall:.1%} of heads"
                f"<br>per layer: {html.escape(layers)}")


def sink_rate(
    patterns: Float[Tensor, "layer head query_pos key_pos"],
    eps: float = SINK_EPS,
    *,
    include_first_query: bool = False,
) -> SinkRate:
    """Fraction of heads whose :func:`first_token_mass` exceeds ``eps`` (strictly)."""
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"eps is an attention fraction in [0, 1), got {eps}; try SINK_EPS = 0.3")
    is_sink = first_token_mass(patterns, include_first_query=include_first_query) > eps
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
    return torch.stack([_layer_mixing(layer, normalize) for layer in _layers_f64(patterns)])


def _layer_mixing(layer_patterns: Tensor, normalize: bool) -> Tensor:
    rows = layer_patterns[:, 1:, :]
    # 0 · log 0 = 0; clamp keeps log finite where A = 0
    entropy = -(rows * rows.clamp_min(1e-300).log()).sum(-1)
    if normalize:
        entropy = entropy / torch.arange(2, rows.shape[-1] + 1, dtype=_F64).log()
    return entropy.mean()


# ---------------------------------------------------------------------------------------------------
# massive activations
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class MassiveActivations:
    """First-token residual norm per layer, its ratio to the other tokens' median, top dimensions."""

    first_norm: Float[Tensor, "layer"]
    median_other_norm: Float[Tensor, "layer"]
    ratio: Float[Tensor, "layer"]
    top_dims: Int[Tensor, "layer k"] | None = None
    top_values: Float[Tensor, "layer k"] | None = None

    __repr__ = compact_repr

    def _repr_html_(self) -> str:
        peak = int(self.ratio.argmax())
        dims = "" if self.top_dims is None else f"; top dims there: {self.top_dims[peak].tolist()}"
        return (f"<b>massive activations</b>: first-token norm ÷ median peaks at "
                f"{self.ratio[peak]:.1f}× in layer {peak}{html.escape(dims)}")


def massive_activations(
    resid_norms: Float[Tensor, "layer pos"],
    first_resid: Float[Tensor, "layer d_model"] | None = None,
    *,
    k: int = 5,
) -> MassiveActivations:
    """First-token norm, ratio to the median norm of tokens 1 … n-1, and top-``k`` dimensions.

    ``top_dims`` are ranked by ``|value|``; ``top_values`` keep the sign.
    """
    resid_norms = torch.as_tensor(resid_norms).to(_F64)
    if resid_norms.ndim != 2 or resid_norms.shape[-1] < 2:
        raise ValueError(f"resid_norms must be [layer, pos] with pos ≥ 2, got {tuple(resid_norms.shape)}")
    first = resid_norms[:, 0]
    # quantile, not Tensor.median: for an even count the latter returns the lower middle value
    median = torch.quantile(resid_norms[:, 1:], 0.5, dim=-1)
    top_dims = top_values = None
    if first_resid is not None:
        first_resid = torch.as_tensor(first_resid).to(_F64)
        if first_resid.ndim != 2 or first_resid.shape[0] != resid_norms.shape[0]:
            raise ValueError(
                f"first_resid must be [layer, d_model] with the same layers as resid_norms "
                f"({resid_norms.shape[0]}), got {tuple(first_resid.shape)}"
            )
        top_dims = first_resid.abs().topk(min(k, first_resid.shape[-1]), dim=-1).indices
        top_values = first_resid.gather(-1, top_dims)
    return MassiveActivations(first, median, first / median, top_dims, top_values)


# ---------------------------------------------------------------------------------------------------
# compression
# ---------------------------------------------------------------------------------------------------


def squared_singular_values(
    x: Float[Tensor, "*layer pos d_model"],
    *,
    method: Literal["auto", "svd", "gram"] = "auto",
) -> Float[Tensor, "*layer rank"]:
    """``σ_j²`` of each ``[pos, d_model]`` matrix, descending, in float64.

    ``"gram"`` uses the eigenvalues of the smaller Gram matrix (``XᵀX``, ``d × d``, when ``n ≥ d``;
    ``XXᵀ``, ``n × n``, otherwise: same non-zero spectrum); ``"svd"`` uses ``svdvals(X)``; ``"auto"``
    picks Gram when ``n > d`` (there it is several times cheaper than the SVD of the tall matrix).
    """
    x = _check_matrix_stack(x, "x")
    n, d = x.shape[-2:]
    if method == "auto":
        method = "gram" if n > d else "svd"
    if method == "svd":
        return torch.linalg.svdvals(x) ** 2
    if method == "gram":
        gram = x.transpose(-1, -2) @ x if n >= d else x @ x.transpose(-1, -2)
        eig = torch.linalg.eigvalsh(gram).clamp_min(0.0)  # rounding gives tiny negatives
        return eig.flip(-1)[..., : min(n, d)]
    raise ValueError(f"method must be 'auto', 'svd' or 'gram', got {method!r}")


def _spectrum_distribution(x: Tensor, method: str) -> Tensor:
    s2 = squared_singular_values(x, method=method)
    total = s2.sum(-1, keepdim=True)
    if (total == 0).any():
        raise ValueError("a representation matrix is all zeros: its spectrum (and entropy) is undefined")
    return s2 / total


def matrix_entropy(
    x: Float[Tensor, "*layer pos d_model"],
    *,
    normalize: bool = True,
    method: Literal["auto", "svd", "gram"] = "auto",
) -> Float[Tensor, "*layer"]:
    """``-Σ p_j log p_j`` with ``p_j = σ_j²/‖X‖_F²``, divided by ``log min(n, d)`` when normalising.

    A single row or column (``min(n, d) = 1``) is rank one: its normalised entropy is defined as 0.
    """
    return _entropy(_spectrum_distribution(x, method), min(x.shape[-2:]), normalize)


def _entropy(p: Tensor, rank_bound: int, normalize: bool) -> Tensor:
    h = -(p * p.clamp_min(1e-300).log()).sum(-1)
    if not normalize:
        return h
    return h / math.log(rank_bound) if rank_bound > 1 else torch.zeros_like(h)


def anisotropy(
    x: Float[Tensor, "*layer pos d_model"],
    *,
    method: Literal["auto", "svd", "gram"] = "auto",
) -> Float[Tensor, "*layer"]:
    """``σ_1² / ‖X‖_F²``: the share of energy in the top direction (1 for rank one)."""
    return _spectrum_distribution(x, method)[..., 0]


# ---------------------------------------------------------------------------------------------------
# phases
# ---------------------------------------------------------------------------------------------------


def _run_around(mask: Tensor, centre: int) -> tuple[int, int]:
    """The maximal run of True in ``mask`` containing ``centre``, as a half-open ``[start, end)``."""
    start = centre
    while start > 0 and mask[start - 1]:
        start -= 1
    end = centre + 1
    while end < mask.numel() and mask[end]:
        end += 1
    return start, end


def detect_phases(
    entropy: Float[Tensor, "layer"],
    *,
    early_layers: int = 1,
    fraction: float = 0.5,
    min_depth: float = 0.1,
) -> tuple[int, int] | None:
    """Mix–Compress–Refine boundaries ``(mix_end, compress_end)`` from a normalised-entropy curve.

    Rule: the early level is the mean entropy of the first ``early_layers`` layers; the valley floor
    is the minimum; the threshold lies ``fraction`` of the way from the floor up to the early level.
    The compression phase is the maximal contiguous range of layers around the minimum whose entropy
    is strictly below the threshold. Layers ``[0, mix_end)`` mix, ``[mix_end, compress_end)``
    compress, ``[compress_end, L)`` refine (empty when the valley reaches the last layer). Returns
    ``None`` when the early level is less than ``min_depth`` above the floor (no valley).
    """
    entropy = _check_curve(entropy, "entropy")
    if not 1 <= early_layers <= entropy.numel():
        raise ValueError(f"early_layers must be in [1, {entropy.numel()}], got {early_layers}")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    early = float(entropy[:early_layers].mean())
    floor_layer = int(entropy.argmin())
    floor = float(entropy[floor_layer])
    if early - floor < min_depth:
        return None
    threshold = floor + fraction * (early - floor)
    return _run_around(entropy < threshold, floor_layer)


def massive_layers(
    norm_ratio: Float[Tensor, "layer"],
    *,
    factor: float = 10.0,
) -> tuple[int, int] | None:
    """Maximal contiguous ``[start, end)`` around the peak where the first-token ratio exceeds ``factor``."""
    norm_ratio = _check_curve(norm_ratio, "norm_ratio")
    peak = int(norm_ratio.argmax())
    if norm_ratio[peak] <= factor:
        return None
    return _run_around(norm_ratio > factor, peak)


# ---------------------------------------------------------------------------------------------------
# correlations
# ---------------------------------------------------------------------------------------------------


def layer_correlations(
    curves: Mapping[str, Tensor],
    *,
    method: Literal["spearman", "pearson"] = "spearman",
) -> dict[str, float]:
    """Correlation across layers of every pair of named per-layer curves, keyed ``"a vs b"``.

    Typical curves: ``first_token_norm`` (or its ratio), ``entropy`` and ``sink_rate``. Curves of
    different lengths (residual streams have ``L + 1`` entries, attention ``L``) are compared on
    their common first layers.
    """
    corr = {"spearman": spearman, "pearson": pearson}.get(method)
    if corr is None:
        raise ValueError(f"method must be 'spearman' or 'pearson', got {method!r}")
    out = {}
    for (name_a, a), (name_b, b) in combinations(curves.items(), 2):
        n = min(len(a), len(b))
        out[f"{name_a} vs {name_b}"] = corr(torch.as_tensor(a)[:n], torch.as_tensor(b)[:n])
    return out


# ---------------------------------------------------------------------------------------------------
# links to over-squashing: the rollout product and Dobrushin coefficients
# ---------------------------------------------------------------------------------------------------


def rollout_first_token_mass(
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


def _attention_curves(patterns: Tensor, over_squashing: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Mixing, rollout mass and Dobrushin curves in ONE float64 conversion per layer (what
    :func:`sink_report` uses; calling the three public functions converts every layer three times)."""
    column = _first_column(patterns.shape[-1])
    mixing, mass, taus = [], [], []
    for layer_patterns in _layers_f64(patterns):
        mixing.append(_layer_mixing(layer_patterns, normalize=True))
        if over_squashing:
            layer_mean = layer_patterns.mean(0)
            column = _rollout_step(layer_mean, column)
            mass.append(column[-1])
            taus.append(_layer_tau(layer_mean))
    if not over_squashing:
        return torch.stack(mixing), None, None
    return torch.stack(mixing), torch.stack(mass), torch.stack(taus)


def _group_mean(values: Tensor, mask: Tensor) -> float:
    return float(values[mask].mean()) if mask.any() else math.nan


def sink_layer_links(
    sink_rate_per_layer: Float[Tensor, "layer"],
    tau: Float[Tensor, "layer"],
    rollout_mass: Float[Tensor, "layer"],
    *,
    majority: float = 0.5,
) -> dict[str, float]:
    """How the over-squashing measures behave in *sink layers* (≥ ``majority`` of heads are sinks).

    Mean Dobrushin ``τ`` and mean rollout-mass gain ``m_l − m_{l-1}`` (``m_{-1} = 0``) inside the
    sink layers and elsewhere; NaN for an empty group.
    """
    sink_layers = torch.as_tensor(sink_rate_per_layer).to(_F64) >= majority
    mass = torch.as_tensor(rollout_mass).to(_F64)
    gain = torch.diff(mass, prepend=mass.new_zeros(1))
    return {
        "n sink layers": float(sink_layers.sum()),
        "dobrushin | sink layers": _group_mean(tau, sink_layers),
        "dobrushin | other layers": _group_mean(tau, ~sink_layers),
        "rollout mass gain | sink layers": _group_mean(gain, sink_layers),
        "rollout mass gain | other layers": _group_mean(gain, ~sink_layers),
    }


# ---------------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SinkReport:
    """Per-layer sink, massive-activation, compression and mixing curves of one forward pass.

    Attention curves have one entry per layer ``L``; residual curves one per residual stream that
    was passed (``L`` or ``L + 1`` when the final ``resid_post`` is included). ``rollout_mass[l]`` is
    the last token's mass on token 0 after layers ``0 … l`` of the rollout product, ``dobrushin[l]``
    the coefficient of layer ``l``'s ``½(A^(l) + I)``; ``links`` compares them in and out of sink layers.
    """

    eps: float
    first_token_mass: Float[Tensor, "layer"]
    sink_rate: Float[Tensor, "layer"]
    sink_rate_overall: float
    mixing: Float[Tensor, "layer"]
    first_token_norm: Float[Tensor, "resid"]
    norm_ratio: Float[Tensor, "resid"]
    entropy: Float[Tensor, "resid"] | None
    anisotropy: Float[Tensor, "resid"] | None
    phases: tuple[int, int] | None
    massive_range: tuple[int, int] | None
    correlations: dict[str, float]
    metadata: dict[str, Any] = field(default_factory=dict)
    top_dims: Int[Tensor, "resid k"] | None = None
    top_values: Float[Tensor, "resid k"] | None = None
    rollout_mass: Float[Tensor, "layer"] | None = None
    dobrushin: Float[Tensor, "layer"] | None = None
    links: dict[str, float] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return self.first_token_mass.numel()

    def curves(self) -> dict[str, Tensor]:
        """The per-layer curves that are present, by name (what :meth:`plot` draws)."""
        names = ("first_token_mass", "sink_rate", "mixing", "norm_ratio", "entropy", "anisotropy",
                 "rollout_mass", "dobrushin")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def to_dict(self) -> dict[str, Any]:
        # to_jsonable turns NaN correlations (constant curves) into null, so the JSON stays valid
        return to_jsonable(dict(self.__dict__))

    def plot(self, **kwargs):
        """Every per-layer curve on a shared layer axis, Mix–Compress–Refine shaded (plotly Figure)."""
        from ..views.sink_figures import sink_figure

        kwargs.setdefault("log", ("norm_ratio",))
        return sink_figure(self.curves(), self.phases, **kwargs)

    def phase_text(self) -> str:
        """The Mix–Compress–Refine boundaries in words (``phases`` indexes the residual streams)."""
        if self.phases is None:
            return "no compression valley (the matrix entropy never dips clearly below its early level)"
        if self.entropy is None:
            return "phases unknown (no residual streams were kept)"
        mix_end, compress_end = self.phases
        n = self.entropy.numel()
        refine = f"refine {compress_end}–{n - 1}" if compress_end < n else "no refine phase (the valley reaches the output)"
        mix = f"mix 0–{mix_end - 1}" if mix_end > 0 else "no mix phase"
        return f"residual streams: {mix}, compress {mix_end}–{compress_end - 1}, {refine}"

    def massive_text(self) -> str:
        """Where the first token's norm is massive, in words."""
        peak = int(self.norm_ratio.argmax())
        if self.massive_range is None:
            return (f"no massive activation (the first token's norm peaks at {float(self.norm_ratio[peak]):.1f}× "
                    f"the median, at residual stream {peak})")
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
            ("model", str(self.metadata.get("model", {}).get("name", "—"))),
            ("layers", str(self.n_layers)),
            (f"sink rate (ε = {self.eps})", f"{self.sink_rate_overall:.1%} of heads"),
            ("first-token norm ÷ median (peak)", f"{self.norm_ratio[peak]:.1f}× at layer {peak}"),
            ("min normalised entropy",
             "—" if self.entropy is None else f"{self.entropy.min():.3f} at layer {int(self.entropy.argmin())}"),
            ("phases", self.phase_text()),
            ("massive activation", self.massive_text()),
        ]
        if self.rollout_mass is not None:
            rows.append(("rollout mass on token 0 (all layers)", f"{self.rollout_mass[-1]:.4f}"))
        rows += [(name, f"{value:.3g}" if math.isfinite(value) else "— (no layers in this group)")
                 for name, value in self.links.items()]
        rows += [(f"ρ({name})", f"{value:.2f}" if math.isfinite(value) else "undefined (constant curve)")
                 for name, value in self.correlations.items()]
        body = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in rows)
        return f"<b>lens_squash SinkReport</b><table>{body}</table>"


def sink_report(
    patterns: Float[Tensor, "layer head query_pos key_pos"],
    resid_norms: Float[Tensor, "resid pos"],
    *,
    representations: Float[Tensor, "resid pos d_model"] | None = None,
    first_resid: Float[Tensor, "resid d_model"] | None = None,
    eps: float = SINK_EPS,
    factor: float = 10.0,
    method: Literal["spearman", "pearson"] = "spearman",
    over_squashing: bool = True,
    metadata: dict[str, Any] | None = None,
) -> SinkReport:
    """All per-layer curves, phase boundaries and their cross-layer correlations in one report.

    ``resid_norms[l]`` must be the stream *entering* layer ``l`` (``Trace.resid_norms``), so that
    correlations pair it with layer ``l``'s attention. Phases come from the entropy curve when
    ``representations`` are given; correlations are over the first ``L`` residual entries.
    ``first_resid`` (the first token's residual vectors) adds the top massive dimensions.
    ``over_squashing`` adds the rollout mass and Dobrushin curves (``O(L n²)``).
    """
    patterns = _check_patterns(patterns)
    resid_norms = torch.as_tensor(resid_norms).to(_F64)
    n_layers = patterns.shape[0]
    if resid_norms.ndim != 2 or resid_norms.shape[0] not in (n_layers, n_layers + 1):
        raise ValueError(
            f"resid_norms must be [layer, pos] with {n_layers} or {n_layers + 1} rows (one per residual "
            f"stream entering each layer, optionally plus the final one), got {tuple(resid_norms.shape)}"
        )
    mass = first_token_mass(patterns).mean(-1)
    rate = sink_rate(patterns, eps)
    massive = massive_activations(resid_norms, first_resid)
    entropy = aniso = phases = None
    links: dict[str, float] = {}
    curves = {"first_token_norm": massive.first_norm, "sink_rate": rate.per_layer}
    if representations is not None:
        representations = _check_matrix_stack(representations, "representations")
        if representations.shape[:2] != resid_norms.shape:
            raise ValueError(
                f"representations {tuple(representations.shape)} must match resid_norms "
                f"{tuple(resid_norms.shape)} in their [layer, pos] axes"
            )
        p = _spectrum_distribution(representations, "auto")  # one spectrum for both curves
        entropy, aniso = _entropy(p, min(representations.shape[-2:]), True), p[..., 0]
        phases = detect_phases(entropy)
        curves["entropy"] = entropy
    mixing, rollout, tau = _attention_curves(patterns, over_squashing)
    if over_squashing:
        links = sink_layer_links(rate.per_layer, tau, rollout)
        curves["dobrushin"] = tau
        curves["rollout_mass_gain"] = torch.diff(rollout, prepend=rollout.new_zeros(1))
    return SinkReport(
        eps=rate.eps, first_token_mass=mass, sink_rate=rate.per_layer, sink_rate_overall=rate.overall,
        mixing=mixing, first_token_norm=massive.first_norm, norm_ratio=massive.ratio,
        entropy=entropy, anisotropy=aniso, phases=phases,
        massive_range=massive_layers(massive.ratio, factor=factor),
        correlations=layer_correlations(curves, method=method), metadata=dict(metadata or {}),
        top_dims=massive.top_dims, top_values=massive.top_values, rollout_mass=rollout, dobrushin=tau,
        links=links,
    )


# ---------------------------------------------------------------------------------------------------
# model-facing: one traced forward pass
# ---------------------------------------------------------------------------------------------------


def sink_report_from_trace(tr: Trace, **kwargs) -> SinkReport:
    """:func:`sink_report` from a :class:`~lens_squash.edge.trace.Trace` taken with ``keep_resid=True``.

    All ``L + 1`` residual streams are used (the ones entering each layer plus the final output).
    """
    if tr.resid is None:
        raise ValueError("this trace has no residual streams; trace the model with keep_resid=True")
    metadata = {**tr.metadata, "str_tokens": list(tr.str_tokens), **kwargs.pop("metadata", {})}
    return sink_report(tr.patterns, tr.resid_norms, representations=tr.resid, first_resid=tr.first_token_resid,
                       metadata=metadata, **kwargs)


def sink_analysis(
    model,
    prompt: str | Tensor,
    *,
    chat: bool | None = None,
    eps: float = SINK_EPS,
    factor: float = 10.0,
    method: Literal["spearman", "pearson"] = "spearman",
    over_squashing: bool = True,
) -> SinkReport:
    """Every sink, massive-activation, compression and over-squashing curve from ONE forward pass.

    ``prompt`` is text (chat template unless ``chat=False``) or token ids, as for
    :func:`~lens_squash.edge.trace.trace`. Hooks the caller has installed (e.g.
    :func:`lens_squash.experiments.ablation.clamp_massive_activation`) stay active during the pass.
    """
    if len(as_tokens(model, prompt, chat=chat)) < 2:  # before the pass: query 0 alone says nothing
        raise ValueError("the prompt is a single token; sinks compare the first token with later ones, so pass "
                         "a prompt of at least 2 tokens")
    tr = trace(model, prompt, chat=chat, keep_resid=True)
    return sink_report_from_trace(tr, eps=eps, factor=factor, method=method, over_squashing=over_squashing,
                                  metadata={"analysis": "sinks", "prompt": prompt if isinstance(prompt, str) else None})
