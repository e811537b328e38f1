"""Perron–Frobenius and Dobrushin analysis of causal attention (Barbero et al. 2024, App. B.2).

A causal attention matrix ``Λ`` is lower-triangular and row-stochastic; its spectrum is its diagonal
and eigenvalue 1 is simple under Lemma B.6's condition (:mod:`lens_squash.algebra.causal`). Here:

* **Prop. B.8.** With ``Λ̃ = ½(Λ + I)`` (β_1 = β_2 = σ_ψ = 1), ``Λ̃^L → 1·e_1ᵀ`` (0-based here:
  ``1·e_0ᵀ``, every token sees only the first one) when eigenvalue 1 is simple, at the rate of the
  second eigenvalue ``λ_2 = max_{i≥1} Λ̃_ii``; one matrix repeated is :mod:`lens_squash.algebra.homogeneous`.

Distances to the limit are *max-row total variation*, ``‖X − 1e_0ᵀ‖ = max_j ½‖X_j − e_0‖₁``, which for
a row-stochastic ``X`` is ``max_j (1 − X_{j0})``: the largest share of any row that is *not* on the
first token. ``1·e_0ᵀ`` is the only rank-one causal row-stochastic matrix (row 0 of a causal matrix is
``e_0``), so this is also the product's distance to rank one.

Real models have a different matrix at every layer, so the homogeneous Prop. B.8 is extended to the
inhomogeneous product ``P^(d) = Λ̃^(d) … Λ̃^(0)`` with Dobrushin's ergodicity coefficient
``τ(P) = ½ max_{j,k} ‖P_j − P_k‖₁ ∈ [0, 1]`` (:func:`dobrushin`). It is sub-multiplicative,
``τ(PQ) ≤ τ(P) τ(Q)``, and sandwiches the distance to rank one: ``τ(P)/2 ≤ ‖P − 1e_0ᵀ‖ ≤ τ(P)``, so
``‖P^(d) − 1e_0ᵀ‖ ≤ Π_{l≤d} τ(Λ̃^(l))``. Column 0 of ``P^(d)`` obeys ``c^(d) = Λ̃^(d) c^(d−1)``, so the
first-token mass of *every* position at *every* depth costs one matrix–vector product per layer,
O(L·n²) (:func:`first_token_column`); the full product is only built on request
(:func:`lens_squash.algebra.paths.stack_product`).

:func:`analyze_stack` bundles all of it for a stack of rollout matrices into a :class:`SpectralReport`.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..core.display import compact_repr
from ..core.results import Record, Result
from ..core.shapes import LayerMatrices, SquareMatrix
from . import paths
from .causal import (
    _above_diagonal,
    _check_square,
    _two_nonzeros,
    check_causal_stochastic,
)

__all__ = [
    "SpectralReport",
    "SpectralLayers",
    "SpectralStream",
    "analyze_stack",
    "rollout_tolerance",
    "dobrushin",
    "first_token_column",
    "first_token_gap",
    "spectral_report",
]

#: rows per Dobrushin chunk: the ``cdist`` output stays ``chunk × n`` (2 MB at n = 2048, float64)
DOBRUSHIN_CHUNK: int = 128


# --------------------------------------------------------------------------------------------------
# shared with Prop. B.8's homogeneous analysis (lens_squash.algebra.homogeneous)
# --------------------------------------------------------------------------------------------------


def _second_diagonal(diagonal: Float[Tensor, "... pos"]) -> Float[Tensor, "..."]:
    # One position has no second eigenvalue; 0 makes every rate-based formula give "already converged".
    if diagonal.shape[-1] < 2:
        return diagonal.new_zeros(diagonal.shape[:-1])
    return diagonal[..., 1:].max(-1).values


def _rate_depth(lam: float, eps: float) -> float:
    """``⌈log ε / log λ⌉``: layers for ``λ^L ≤ ε`` (``inf`` for λ ≥ 1, 0 for λ ≤ 0)."""
    if lam >= 1:
        return math.inf
    if lam <= 0:
        return 0
    return math.ceil(math.log(eps) / math.log(lam))


def _check_eps(eps: float) -> None:
    if not 0 < eps < 1:
        raise ValueError(f"eps must lie in (0, 1), got {eps}")


# --------------------------------------------------------------------------------------------------
# the inhomogeneous stack: Dobrushin coefficients and the first-token column
# --------------------------------------------------------------------------------------------------


def _dobrushin_one(m: SquareMatrix, chunk: int, *, causal: bool) -> Tensor:
    n = m.shape[-1]
    cumulative = m.cumsum(-1)
    best = m.new_zeros(())
    for j0 in range(0, n, chunk):
        j1 = min(n, j0 + chunk)
        # Causal rows j < j1 are zero beyond column j1, so only those columns need comparing; the
        # other row's remaining mass (its tail) is added as is. Pairs with k < j0 were seen when
        # k's chunk ran (τ is symmetric in j, k).
        width = j1 if causal else n
        l1 = torch.cdist(m[None, j0:j1, :width], m[None, j0:, :width], p=1)[0]
        if causal and width < n:
            l1 = l1 + (cumulative[j0:, -1] - cumulative[j0:, width - 1])[None, :]
        best = torch.maximum(best, l1.max())
    return 0.5 * best


def _is_causal_stochastic(m: SquareMatrix, atol: float | None) -> bool:
    # by default the tolerance follows the dtype (1e-9 in float64), so only rows stochastic to working
    # precision take the closed form; float32 softmax rows cast to float64 need an explicit atol
    atol = max(1e-9, 100 * torch.finfo(m.dtype).eps) if atol is None else atol
    return bool(_above_diagonal(m) == 0 and (m >= 0).all() and (m.sum(-1) - 1).abs().max() <= atol)


def dobrushin(
    p: Float[Tensor, "... query_pos key_pos"],
    *,
    chunk: int = DOBRUSHIN_CHUNK,
    method: str = "auto",
    atol: float | None = None,
) -> Float[Tensor, "..."]:
    """Dobrushin's coefficient ``τ(P) = ½ max_{j,k} ‖P_j − P_k‖₁`` of each matrix.

    ``method="pairwise"`` is exact for any matrix, O(n³) (about n³/6 for causal ones, which compare
    only the columns a row can reach), in row chunks of ``chunk`` so memory stays O(chunk·n).
    ``"auto"`` uses the O(n) closed form ``τ = 1 − min_j P_{j0}`` for causal row-stochastic matrices:
    ``τ = 1 − min_{j,k} Σ_i min(P_ji, P_ki)``; row 0 is ``e_0``, so the pair ``(0, k)`` overlaps by
    ``P_k0``, and any pair overlaps by at least ``min(P_j0, P_k0)`` on column 0. A causal matrix whose
    rows sum to 1 within ``atol`` (default: 100 machine epsilons of its dtype) takes the closed form
    on its rows divided by their sums (what float32 softmax rows approximate).
    For row-stochastic ``P``: ``τ ∈ [0, 1]``, 0 iff ``P`` has rank one, and ``τ(PQ) ≤ τ(P)τ(Q)``.
    """
    p = _check_square(p)
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of rows, got {chunk}")
    if method not in ("auto", "pairwise"):
        raise ValueError(f"method must be 'auto' or 'pairwise', got {method!r}")
    flat = p.reshape(-1, *p.shape[-2:])
    values = [
        1.0 - (m[:, 0] / m.sum(-1)).min()
        if method == "auto" and _is_causal_stochastic(m, atol)
        else _dobrushin_one(m, chunk, causal=_above_diagonal(m) == 0)
        for m in flat
    ]
    return torch.stack(values).reshape(p.shape[:-2]) if values else p.new_zeros(p.shape[:-2])


def _first_token_recursion(stack: LayerMatrices) -> tuple[Tensor, Tensor]:
    stack = _check_square(stack)
    if stack.ndim != 3:
        raise ValueError(f"stack must be [layer, query_pos, key_pos], got shape {tuple(stack.shape)}")
    return _propagate(stack, stack.shape[-1], stack.dtype)


def _propagate(layers: Iterable[Tensor], n: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    # Column 0 of P^(d) and its complement 1 − column, carried together: Λ̃1 = 1 gives the
    # complement the same recursion, and carrying it avoids the cancellation of 1 − (mass ≈ 1)
    # that would floor distances at ~1e-16.
    state = torch.zeros(n, 2, dtype=dtype)
    state[0, 0], state[1:, 1] = 1.0, 1.0
    states = []
    for layer in layers:
        state = layer @ state
        states.append(state)
    states = torch.stack(states) if states else state.new_zeros(0, n, 2)
    return states[..., 0], states[..., 1]


def first_token_column(stack: LayerMatrices) -> Float[Tensor, "depth pos"]:
    """Column 0 of ``P^(d) = Λ̃^(d) … Λ̃^(0)`` for every depth: row ``d`` holds every position's mass
    on the first token after ``d + 1`` layers. ``c^(d) = Λ̃^(d) c^(d−1)``, ``c^(−1) = e_0``: O(L·n²)."""
    return _first_token_recursion(stack)[0]


def first_token_gap(stack: LayerMatrices) -> Float[Tensor, "depth pos"]:
    """``1 −`` :func:`first_token_column`, computed without cancellation (``g^(d) = Λ̃^(d) g^(d−1)``,
    ``g^(−1) = 1 − e_0``): each position's mass *not* on the first token, accurate to tiny values.
    Its maximum over positions is ``‖P^(d) − 1e_0ᵀ‖``, the product's distance to rank one."""
    return _first_token_recursion(stack)[1]


# --------------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SpectralReport(Result):
    """Perron–Frobenius and Dobrushin analysis of a stack of rollout matrices ``Λ̃^(l)``.

    Per layer: ``spectrum`` (the diagonal of ``Λ̃^(l)``), ``second_eigenvalue``, ``multiplicity`` of
    eigenvalue 1, whether ``two_nonzeros`` (Lemma B.6) holds, ``repeated_layer_depth`` (Prop. B.8's
    rate-only depth if that layer were repeated, ``inf`` when eigenvalue 1 is not simple) and
    ``dobrushin`` ``τ(Λ̃^(l))``. Per depth ``d = 1 … L`` (index ``d − 1``): ``cumulative_dobrushin``
    ``Π_{l<d} τ``, the ``target_pos``'s ``rollout_mass`` ``[P^(d)]_{target,0}`` and
    ``rank_one_distance`` ``‖P^(d) − 1e_0ᵀ‖ ≤ cumulative_dobrushin``.

    ``depth_to_first_token`` is the number of layers after which the target puts at least ``1 − eps``
    on the first token. When the stack is too shallow it is ``extrapolated``: assuming further layers
    contract at the stack's geometric-mean Dobrushin rate ``ρ = (Π τ)^{1/L}``, the gap after ``m``
    more layers is at most ``ρ^m · min(2‖P^(L) − 1e_0ᵀ‖, Π τ)`` (from ``τ(QP) ≤ τ(Q)τ(P)`` and
    ``τ ≤ 2·distance``), and the smallest ``L + m`` bringing that below ``eps`` is reported. It is
    ``inf`` when ``ρ = 1`` (no contraction, e.g. a layer whose eigenvalue 1 is not simple).
    """

    spectrum: Float[Tensor, "layer pos"]
    second_eigenvalue: Float[Tensor, "layer"]
    multiplicity: Int[Tensor, "layer"]
    two_nonzeros: Bool[Tensor, "layer"]
    repeated_layer_depth: Float[Tensor, "layer"]
    dobrushin: Float[Tensor, "layer"]
    cumulative_dobrushin: Float[Tensor, "depth"]
    rollout_mass: Float[Tensor, "depth"]
    rank_one_distance: Float[Tensor, "depth"]
    depth_to_first_token: float
    extrapolated: bool
    target_pos: int
    eps: float
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return self.spectrum.shape[0]

    @property
    def n_tokens(self) -> int:
        return self.spectrum.shape[1]

    __repr__ = compact_repr

    def _repr_html_(self) -> str:
        depth = self.depth_to_first_token
        shown = (
            "never (no contraction)"
            if math.isinf(depth)
            else f"{depth}" + (" (extrapolated)" if self.extrapolated else "")
        )
        rows = [
            ("layers × positions", f"{self.n_layers} × {self.n_tokens}"),
            ("layers with simple eigenvalue 1", f"{int((self.multiplicity == 1).sum())} of {self.n_layers}"),
            (
                "second eigenvalue (min … max)",
                f"{float(self.second_eigenvalue.min()):.4f} … {float(self.second_eigenvalue.max()):.4f}",
            ),
            (
                "Dobrushin τ per layer (min … max)",
                f"{float(self.dobrushin.min()):.4f} … {float(self.dobrushin.max()):.4f}",
            ),
            ("Π τ over the stack", f"{float(self.cumulative_dobrushin[-1]):.3e}"),
            (f"position {self.target_pos}'s mass on the first token", f"{float(self.rollout_mass[-1]):.6f}"),
            ("distance of the product to rank one", f"{float(self.rank_one_distance[-1]):.3e}"),
            (f"depth until position {self.target_pos} sees only the first token (ε = {self.eps:g})", shown),
        ]
        body = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in rows)
        return f"<b>lens_squash SpectralReport</b><table>{body}</table>"


def _depth_to_first_token(
    gaps: Float[Tensor, "depth"], distance: Float[Tensor, "depth"], cumulative: Float[Tensor, "depth"], eps: float
) -> tuple[float, bool]:
    reached = torch.nonzero(gaps <= eps)
    if len(reached):
        return int(reached[0, 0]) + 1, False
    n_layers = len(gaps)
    total = float(cumulative[-1])
    if total >= 1:
        return math.inf, True
    rate = total ** (1 / n_layers)
    start = min(2 * float(distance[-1]), total)
    more = max(1, math.ceil(math.log(eps / start) / math.log(rate)))
    while start * rate**more > eps:  # guard the ceil against rounding
        more += 1
    return n_layers + more, True


@dataclass(frozen=True, eq=False)
class SpectralLayers(Record):
    """What :class:`SpectralReport` needs from each layer's ``Λ̃^(l)``, O(n) numbers per layer: its
    diagonal, ``τ``, Lemma B.6's condition, and column 0 of the product ``P^(l)`` with its complement
    (``states[l, :, 0]`` and ``[l, :, 1]``). :func:`spectral_report` finishes the analysis for any target."""

    spectrum: Float[Tensor, "layer pos"]
    dobrushin: Float[Tensor, "layer"]
    two_nonzeros: Bool[Tensor, "layer"]
    states: Float[Tensor, "layer pos 2"]
    atol: float

    __repr__ = compact_repr


class SpectralStream:
    """:func:`analyze_stack` one layer at a time, for stacks too large to hold (long prompts).

    ``add`` takes each rollout matrix ``Λ̃^(l)`` in layer order, checks it and keeps only what is
    O(n) per layer; ``finish`` gives the :class:`SpectralLayers`. :func:`analyze_stack` runs through
    this same code, so a streamed report equals the whole-stack one.
    """

    def __init__(self, n: int, *, atol: float = 1e-4):
        self.atol = atol
        self._state = torch.zeros(n, 2, dtype=torch.float64)  # column 0 of P^(d) and its complement
        self._state[0, 0], self._state[1:, 1] = 1.0, 1.0
        self._spectra: list[Tensor] = []
        self._taus: list[Tensor] = []
        self._two: list[Tensor] = []
        self._states: list[Tensor] = []

    def add(self, layer: Float[Tensor, "query_pos key_pos"]) -> None:
        """Fold in the next layer's ``Λ̃`` (any float dtype; checked in it, analysed in float64)."""
        layer = check_causal_stochastic(layer, self.atol).to(torch.float64)
        if layer.ndim != 2 or layer.shape[-1] != self._state.shape[0]:
            raise ValueError(
                f"each layer must be [query_pos, key_pos] = {(self._state.shape[0],) * 2}, got {tuple(layer.shape)}"
            )
        # entries above the diagonal within atol are treated as zero (the check above allowed them)
        tau = dobrushin(layer.tril(), atol=self.atol)
        # the diagonal is cloned: not a view that keeps the layer alive
        self._append(layer.diagonal().clone(), tau, _two_nonzeros(layer, 0.0), layer @ self._state)

    def _append(self, diagonal: Tensor, tau: Tensor, two_nonzeros: Tensor, state: Tensor) -> None:
        """Keep one checked layer's numbers; ``state`` is ``Λ̃`` times the previous state (the
        streamed attention path computes them row chunk by row chunk, already checked)."""
        self._spectra.append(diagonal)
        self._taus.append(tau)
        self._two.append(two_nonzeros)
        self._state = state
        self._states.append(state)

    def finish(self) -> SpectralLayers:
        if not self._spectra:
            raise ValueError("stack has no layers; pass one rollout matrix per layer")
        return SpectralLayers(
            torch.stack(self._spectra),
            torch.stack(self._taus),
            torch.stack(self._two),
            torch.stack(self._states),
            self.atol,
        )


def spectral_report(
    layers: SpectralLayers,
    *,
    target_pos: int = -1,
    eps: float = 1e-6,
    unit_atol: float = 1e-6,
    provenance: dict[str, Any] | None = None,
) -> SpectralReport:
    """The :class:`SpectralReport` of a stack from its per-layer summary (see :func:`analyze_stack`)."""
    _check_eps(eps)
    target_pos = paths._check_target(target_pos, layers.spectrum.shape[-1])
    spectrum, tau = layers.spectrum, layers.dobrushin
    second = _second_diagonal(spectrum)
    cumulative = torch.cumprod(tau, 0)
    column, gap = layers.states[..., 0], layers.states[..., 1]
    distance = gap.max(-1).values
    depth, extrapolated = _depth_to_first_token(gap[:, target_pos], distance, cumulative, eps)
    repeated = torch.tensor([float(_rate_depth(lam, eps)) for lam in second.tolist()], dtype=torch.float64)
    return SpectralReport(
        spectrum=spectrum,
        second_eigenvalue=second,
        multiplicity=((spectrum - 1).abs() <= unit_atol).sum(-1),
        two_nonzeros=layers.two_nonzeros,
        repeated_layer_depth=repeated,
        dobrushin=tau,
        cumulative_dobrushin=cumulative,
        rollout_mass=column[:, target_pos],
        rank_one_distance=distance,
        depth_to_first_token=depth,
        extrapolated=extrapolated,
        target_pos=target_pos,
        eps=eps,
        provenance=dict(provenance or {}),
    )


def rollout_tolerance(pattern_tolerance: float) -> float:
    """The causal / row-stochastic tolerance for a prompt's rollout stack: its patterns' own
    tolerance (:func:`lens_squash.algebra.attention.pattern_tolerance`), at least 1e-4."""
    return max(1e-4, float(pattern_tolerance))


def analyze_stack(
    stack: Float[Tensor, "layer query_pos key_pos"],
    *,
    target_pos: int = -1,
    eps: float = 1e-6,
    atol: float = 1e-4,
    unit_atol: float = 1e-6,
    provenance: dict[str, Any] | None = None,
) -> SpectralReport:
    """Spectral and Dobrushin analysis of the rollout matrices ``Λ̃^(l) = ½(A^(l) + I)`` of one prompt.

    ``atol`` is the tolerance of the causal / row-stochastic check (float32 softmax rows are off by
    ~1e-7·√n); ``unit_atol`` decides which diagonal entries count as eigenvalue 1. Computed in float64,
    O(L·n²): the Dobrushin coefficients take :func:`dobrushin`'s closed form on the row-normalised layers.
    Layer by layer through :class:`SpectralStream`.
    """
    _check_eps(eps)
    stack = _check_square(torch.as_tensor(stack))
    if stack.ndim != 3:
        raise ValueError(f"stack must be [layer, query_pos, key_pos], got shape {tuple(stack.shape)}")
    stream = SpectralStream(stack.shape[-1], atol=atol)
    for layer in stack:
        stream.add(layer)
    return spectral_report(stream.finish(), target_pos=target_pos, eps=eps, unit_atol=unit_atol, provenance=provenance)
