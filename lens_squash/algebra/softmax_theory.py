"""Softmax facts behind representational collapse (Barbero et al. 2024, Appendix B.1 and C.3).

Theorem B.3 (representational collapse) rests on three statements about a softmax over a growing
sequence of bounded logits. This module makes each one computable, vectorised over sequence lengths
(one cumulative sum of ``exp`` instead of one softmax per length), in float64 by default.

**Lemma B.1** (the last token's weight falls). Let ``a ∈ R^{n-1}``, ``b, c ∈ R``, ``x = [a, c]`` and
``x* = [a, b, c]`` with all entries bounded. Then ``softmax(x)_n > softmax(x*)_{n+1}``, and for any
``p > 0`` a long enough sequence has ``softmax(x*)_{n+1} < p``. Here the last logit ``c`` stays fixed
while entries are inserted before it: :func:`last_token_weight` gives ``softmax([a_1..a_{m-1}, c])_m``
for each length ``m``. Writing the weight as ``1 / (1 + Σ_{k<m} e^{a_k - c})`` and ``Δ ≥ c - a_k``
(``Δ = 2M`` when ``|x_k| ≤ M``) gives the explicit bound of :func:`last_weight_bound`,
``softmax ≤ 1 / (1 + (m-1) e^{-Δ})``, and :func:`length_for_last_weight` the ``m`` that the lemma's
second part promises.

**Lemma B.2** (total variation decays). Let ``x, x*`` be bounded sequences with
``x_i - x*_i → 0`` (in Appendix C.3 they differ only in the first 200 entries). Then
``‖softmax(x_{:m}) - softmax(x*_{:m})‖₁ → 0`` as ``m → ∞``. The paper calls this ℓ1 distance the
total variation and drops the factor ½ (so it lies in ``[0, 2]``); we follow it (``halve=True`` gives
the probabilists' convention). The proof's two steps give a constructive bound: with
``Z = Σ e^{x_i}``, ``Z* = Σ e^{x*_i}`` and ``D = Σ |e^{x_i} - e^{x*_i}|``,
``Σ_i |e^{x_i}/Z - e^{x*_i}/Z*| ≤ D/Z + |Z - Z*|/Z ≤ 2D/Z``, and symmetrically ``≤ 2D/Z*``, so
``TV ≤ 2D / max(Z, Z*)`` (:func:`prefix_tv_bound`). When ``x`` and ``x*`` differ on a fixed finite
set, ``D`` stops growing while ``Z`` grows linearly: the bound, and the distance, decay as ``O(1/m)``.
:func:`tv_decay_experiment` reproduces Figure 9.

**Proposition B.4** (why the decay assumption matters). For ``x = [1, 0, 1, 0, …]`` and
``x* = [0, 1, 0, 1, …]`` (``x_i - x*_i = ±1`` never decays) and even ``n``, both partition functions
equal ``(n/2)(e + 1)`` and every entry differs by ``(e - 1)/Z``, so the distance is exactly
``2(e - 1)/(e + 1) = 2 tanh(½) ≈ 0.924`` at every even length. For odd ``n = 2k + 1`` it is
``c · (e+1)² k(k+1) / ((e+1)² k(k+1) + e)`` with ``c = 2(e-1)/(e+1)``, i.e. within
``4ce / ((e+1)² (n² - 1))`` below the limit (:func:`alternating_distance_exact`).

Numerics: every prefix softmax is computed from ``exp(x - max(x, x*))`` with one global shift, so
logits whose range exceeds ~700 (float64) would underflow in a prefix; such inputs are refused.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..core.display import compact_repr
from ..core.results import Result

__all__ = [
    "ALTERNATING_LIMIT",
    "TVDecayResult",
    "alternating_counterexample",
    "alternating_distance_exact",
    "last_token_weight",
    "last_weight_bound",
    "length_for_last_weight",
    "prefix_total_variation",
    "prefix_tv_bound",
    "softmax_total_variation",
    "tv_decay_experiment",
]

#: Prop. B.4's limit ``2(e - 1)/(e + 1)`` (= ``2 tanh(1/2)``), in the paper's un-halved convention.
ALTERNATING_LIMIT: float = 2.0 * (math.e - 1.0) / (math.e + 1.0)

# Number of [differing position × length] cells materialised at once by prefix_total_variation.
_CHUNK_CELLS = 1 << 20


# ---------------------------------------------------------------------------------------------------
# input checks
# ---------------------------------------------------------------------------------------------------


def _as_vector(x, name: str, dtype: torch.dtype) -> Tensor:
    x = torch.as_tensor(x).to(dtype)
    if x.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of logits, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty; pass at least one logit")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf; the lemmas assume bounded (finite) logits")
    return x


def _as_lengths(lengths, n_max: int, minimum: int = 1) -> Int[Tensor, "length"]:
    if lengths is None:
        return torch.arange(minimum, n_max + 1)
    lengths = torch.as_tensor(lengths)
    if lengths.ndim == 0:
        lengths = lengths.reshape(1)
    if lengths.numel() == 0:
        raise ValueError("lengths is empty; pass at least one sequence length")
    if lengths.is_floating_point() or lengths.ndim != 1:
        raise ValueError(f"lengths must be a 1-D list of integers, got {lengths.dtype} {tuple(lengths.shape)}")
    if lengths.numel() and (lengths.min() < minimum or lengths.max() > n_max):
        raise ValueError(
            f"lengths must lie in [{minimum}, {n_max}] (the sequence has {n_max} usable entries), "
            f"got [{int(lengths.min())}, {int(lengths.max())}]"
        )
    return lengths.long()


def _check_range(*xs: Tensor) -> float:
    """Global shift for ``exp``; refuses logit ranges that would underflow a prefix partition."""
    top = max(float(x.max()) for x in xs)
    bottom = min(float(x.min()) for x in xs)
    limit = 0.9 * math.log(torch.finfo(xs[0].dtype).max)
    if top - bottom > limit:
        raise ValueError(
            f"logits span {top - bottom:.1f}, more than {limit:.0f}: exp would underflow in "
            f"{xs[0].dtype}; rescale the logits or use float64"
        )
    return top


# ---------------------------------------------------------------------------------------------------
# Lemma B.1
# ---------------------------------------------------------------------------------------------------


def last_token_weight(
    context: Float[Tensor, "pos"],
    last: float | Tensor,
    lengths: Sequence[int] | Tensor | None = None,
    *,
    dtype: torch.dtype = torch.float64,
) -> Float[Tensor, "length"]:
    """``softmax([context[:m-1], last])[-1]`` for every total length ``m`` in ``lengths``.

    Lemma B.1's setting: the last logit ``last`` (``c``) is fixed and ``context`` entries are
    inserted before it. ``m`` runs over ``1 … len(context) + 1`` (``m = 1`` is ``[last]`` alone,
    weight 1); default all of them. The result is strictly decreasing in ``m`` (first part of the
    lemma) and below :func:`last_weight_bound` (second part).
    """
    context = _as_vector(context, "context", dtype)
    c = torch.as_tensor(last, dtype=dtype).reshape(())
    lengths = _as_lengths(lengths, context.numel() + 1)
    shift = _check_range(context, c.reshape(1))
    # Z_m = e^{c} + Σ_{k < m-1} e^{a_k}; a leading 0 makes cumsum[m-1] that prefix sum.
    prefix = torch.cat([torch.zeros(1, dtype=dtype), torch.cumsum(torch.exp(context - shift), 0)])
    e_last = torch.exp(c - shift)
    return e_last / (e_last + prefix[lengths - 1])


def last_weight_bound(
    lengths: Sequence[int] | Tensor,
    spread: float,
    *,
    dtype: torch.dtype = torch.float64,
) -> Float[Tensor, "length"]:
    """Lemma B.1's bound ``1 / (1 + (m - 1) e^{-Δ})`` on the last softmax weight at length ``m``.

    ``spread`` is ``Δ``, any upper bound on ``last - context_k`` (``2M`` when all ``|logits| ≤ M``,
    or ``max - min`` of the logits). Decays like ``e^Δ / m``.
    """
    if not math.isfinite(spread) or spread < 0:
        raise ValueError(f"spread (Δ ≥ last − context_k) must be a finite number ≥ 0, got {spread}")
    m = torch.as_tensor(lengths).to(dtype)
    if (m < 1).any():
        raise ValueError("lengths must be ≥ 1 (a softmax needs at least one logit)")
    return 1.0 / (1.0 + (m - 1.0) * math.exp(-spread))


def length_for_last_weight(p: float, spread: float) -> int:
    """The smallest length ``m`` at which :func:`last_weight_bound` is ``< p``.

    The constructive form of Lemma B.1's "for any p we can find n large enough": solving
    ``1 / (1 + (m-1) e^{-Δ}) < p`` gives ``m - 1 > e^{Δ} (1/p - 1)``.
    """
    if not 0.0 < p <= 1.0:
        raise ValueError(f"p must be a probability in (0, 1], got {p}")
    return math.floor(math.exp(spread) * (1.0 / p - 1.0)) + 2


# ---------------------------------------------------------------------------------------------------
# Lemma B.2
# ---------------------------------------------------------------------------------------------------


def softmax_total_variation(
    x: Float[Tensor, "... pos"],
    x_star: Float[Tensor, "... pos"],
    *,
    halve: bool = False,
    dtype: torch.dtype = torch.float64,
) -> Float[Tensor, "..."]:
    """``Σ_i |softmax(x)_i - softmax(x*)_i|`` over the last dimension (paper's eq. 2, no ½).

    ``halve=True`` returns the probabilists' total variation ``½ ‖·‖₁`` instead.
    """
    x, x_star = torch.as_tensor(x).to(dtype), torch.as_tensor(x_star).to(dtype)
    if x.shape != x_star.shape:
        raise ValueError(f"x and x_star must have the same shape, got {tuple(x.shape)} and {tuple(x_star.shape)}")
    tv = (torch.softmax(x, -1) - torch.softmax(x_star, -1)).abs().sum(-1)
    return tv / 2 if halve else tv


def _prefix_sums(x: Tensor, x_star: Tensor):
    shift = _check_range(x, x_star)
    e, e_star = torch.exp(x - shift), torch.exp(x_star - shift)
    return e, e_star, torch.cumsum(e, 0), torch.cumsum(e_star, 0)


def prefix_total_variation(
    x: Float[Tensor, "pos"],
    x_star: Float[Tensor, "pos"],
    lengths: Sequence[int] | Tensor | None = None,
    *,
    halve: bool = False,
    dtype: torch.dtype = torch.float64,
) -> Float[Tensor, "length"]:
    """:func:`softmax_total_variation` of the length-``m`` prefixes, for every ``m`` in ``lengths``.

    Positions where ``x == x*`` contribute ``e^{x_i} |1/Z_m - 1/Z*_m|`` each, so their total is one
    cumulative sum; only the ``P`` differing positions need a ``[P, length]`` table (built in chunks).
    Cost ``O(n + P·len(lengths))`` instead of ``O(n·len(lengths))``.
    """
    x, x_star = _as_vector(x, "x", dtype), _as_vector(x_star, "x_star", dtype)
    if x.shape != x_star.shape:
        raise ValueError(f"x and x_star must have the same length, got {x.numel()} and {x_star.numel()}")
    lengths = _as_lengths(lengths, x.numel())
    e, e_star, z, z_star = _prefix_sums(x, x_star)
    same = x == x_star
    # |Z* - Z| from the cumulative sum of differences: no cancellation between two large sums.
    gap = torch.cumsum(e_star - e, 0).abs()
    equal_mass = torch.cumsum(torch.where(same, e, torch.zeros_like(e)), 0)
    zm, zm_star = z[lengths - 1], z_star[lengths - 1]
    tv = equal_mass[lengths - 1] * gap[lengths - 1] / (zm * zm_star)

    idx = torch.nonzero(~same).flatten()
    if idx.numel():
        step = max(1, _CHUNK_CELLS // idx.numel())
        parts = []
        for start in range(0, lengths.numel(), step):
            sl = slice(start, start + step)
            cells = (e[idx, None] / zm[None, sl] - e_star[idx, None] / zm_star[None, sl]).abs()
            inside = idx[:, None] < lengths[None, sl]  # position i belongs to the length-m prefix
            parts.append(torch.where(inside, cells, torch.zeros_like(cells)).sum(0))
        tv = tv + torch.cat(parts)
    return tv / 2 if halve else tv


def prefix_tv_bound(
    x: Float[Tensor, "pos"],
    x_star: Float[Tensor, "pos"],
    lengths: Sequence[int] | Tensor | None = None,
    *,
    dtype: torch.dtype = torch.float64,
) -> Float[Tensor, "length"]:
    """Lemma B.2's constructive bound ``2 Σ_{i<m} |e^{x_i} - e^{x*_i}| / max(Z_m, Z*_m)`` (un-halved)."""
    x, x_star = _as_vector(x, "x", dtype), _as_vector(x_star, "x_star", dtype)
    if x.shape != x_star.shape:
        raise ValueError(f"x and x_star must have the same length, got {x.numel()} and {x_star.numel()}")
    lengths = _as_lengths(lengths, x.numel())
    e, e_star, z, z_star = _prefix_sums(x, x_star)
    d = torch.cumsum((e - e_star).abs(), 0)
    return 2.0 * d[lengths - 1] / torch.maximum(z, z_star)[lengths - 1]


@dataclass(frozen=True, eq=False)
class TVDecayResult(Result):
    """Figure 9: TV between the softmax of ``x[:m]`` and ``x*[:m]`` for each seed and length ``m``."""

    lengths: Int[Tensor, "length"]
    tv: Float[Tensor, "seed length"]
    bound: Float[Tensor, "seed length"]
    seeds: tuple[int, ...]
    n_max: int
    perturbed: int
    noise: float
    provenance: dict[str, Any] = field(default_factory=dict)

    __repr__ = compact_repr

    def _repr_html_(self) -> str:
        first, last = self.tv[:, 0], self.tv[:, -1]
        rows = [
            ("setting", f"x ~ U[0,1]^{self.n_max}; x* = x + U[0,{self.noise}] on the first {self.perturbed}"),
            ("seeds", ", ".join(map(str, self.seeds))),
            (f"TV at m = {int(self.lengths[0])} (mean over seeds)", f"{first.mean():.3e}"),
            (f"TV at m = {int(self.lengths[-1])} (mean over seeds)", f"{last.mean():.3e}"),
            ("max TV / bound", f"{(self.tv / self.bound).max():.3f}"),
        ]
        body = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in rows)
        return f"<b>Lemma B.2: softmax total-variation decay (Fig. 9)</b><table>{body}</table>"


def tv_decay_experiment(
    n_max: int = 10_000,
    perturbed: int = 200,
    noise: float = 0.1,
    seeds: int | Sequence[int] = 5,
    lengths: Sequence[int] | Tensor | None = None,
    *,
    dtype: torch.dtype = torch.float64,
) -> TVDecayResult:
    """Reproduce Figure 9 (Appendix C.3) for each seed.

    ``x ~ U[0, 1]^{n_max}``; ``x*`` equals ``x`` plus ``U[0, noise]`` noise on its first
    ``perturbed`` entries; for each ``m`` in ``lengths`` (default ``1 … n_max``) the TV between the
    softmax of the length-``m`` prefixes, with :func:`prefix_tv_bound` alongside. ``seeds=5`` means
    seeds ``0 … 4``; each seed has its own :class:`torch.Generator`, so global RNG state is untouched.
    (The extracted paper text lost Fig. 9's sequence length; ``n_max`` defaults to 10 000.)
    """
    if not 1 <= perturbed <= n_max:
        raise ValueError(f"need 1 ≤ perturbed ≤ n_max, got perturbed={perturbed}, n_max={n_max}")
    if not math.isfinite(noise) or noise < 0:
        raise ValueError(f"noise is the width of U[0, noise] and must be finite and ≥ 0, got {noise}")
    seed_list = tuple(range(seeds)) if isinstance(seeds, int) else tuple(int(s) for s in seeds)
    if not seed_list:
        raise ValueError("pass at least one seed (seeds=5 runs seeds 0..4)")
    lengths = _as_lengths(lengths, n_max)
    tvs, bounds = [], []
    for seed in seed_list:
        gen = torch.Generator().manual_seed(seed)
        x = torch.rand(n_max, generator=gen, dtype=dtype)
        x_star = x.clone()
        x_star[:perturbed] += noise * torch.rand(perturbed, generator=gen, dtype=dtype)
        tvs.append(prefix_total_variation(x, x_star, lengths, dtype=dtype))
        bounds.append(prefix_tv_bound(x, x_star, lengths, dtype=dtype))
    return TVDecayResult(
        lengths=lengths,
        tv=torch.stack(tvs),
        bound=torch.stack(bounds),
        seeds=seed_list,
        n_max=n_max,
        perturbed=perturbed,
        noise=float(noise),
        provenance={"dtype": str(dtype).removeprefix("torch."), "tv_convention": "l1 (no 1/2)"},
    )


# ---------------------------------------------------------------------------------------------------
# Proposition B.4
# ---------------------------------------------------------------------------------------------------


def alternating_counterexample(
    lengths: Sequence[int] | Tensor,
    *,
    dtype: torch.dtype = torch.float64,
) -> Float[Tensor, "length"]:
    """Prop. B.4: TV between the softmax of ``[1,0,1,0,…]`` and ``[0,1,0,1,…]`` at each length.

    Computed numerically from the sequences (not from the closed form), so it can be checked
    against :func:`alternating_distance_exact` and the limit :data:`ALTERNATING_LIMIT`.
    """
    lengths = torch.as_tensor(lengths).long().reshape(-1)
    if lengths.numel() == 0 or lengths.min() < 1:
        raise ValueError("lengths must be a non-empty list of integers ≥ 1")
    n = int(lengths.max())
    x = (torch.arange(n) % 2 == 0).to(dtype)  # 1-based odd positions carry 1
    return prefix_total_variation(x, 1.0 - x, lengths, dtype=dtype)


def alternating_distance_exact(
    lengths: Sequence[int] | Tensor,
    *,
    dtype: torch.dtype = torch.float64,
) -> Float[Tensor, "length"]:
    """Closed form of :func:`alternating_counterexample` (derivation in the module docstring).

    Even ``n``: exactly ``2(e-1)/(e+1)``. Odd ``n = 2k+1``: ``c (e+1)² k(k+1) / ((e+1)² k(k+1) + e)``.
    """
    n = torch.as_tensor(lengths).to(dtype).reshape(-1)
    if (n < 1).any():
        raise ValueError("lengths must be ≥ 1")
    k = torch.floor((n - 1) / 2)
    pairs = (math.e + 1) ** 2 * k * (k + 1)
    odd = ALTERNATING_LIMIT * pairs / (pairs + math.e)
    return torch.where(n % 2 == 0, torch.full_like(n, ALTERNATING_LIMIT), odd)
