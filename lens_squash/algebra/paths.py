"""Path-sum algebra over layered attention graphs (paper Theorem 5.1 / B.5; DESIGN §3).

A variant (:mod:`lens_squash.algebra.variants`) describes layer ``l`` of the graph by residual weights
``r^(l)`` (one self-edge per position), head edges ``E^(l,h)_{jk}`` (key ``k`` → query ``j``) and an
optional left scale ``s^(l)``; the layer matrix is ::

    M^(l) = diag(s^(l)) · (diag(r^(l)) + Σ_h E^(l,h))

and the path sum from input ``i`` to target ``n`` is ``[M^(L-1) ⋯ M^(0)]_{n,i}``: the sum over every
causal path ``i = k_0 ≤ k_1 ≤ … ≤ k_L = n`` of the product of its edge weights. Everything here is a
pure tensor function:

* :func:`bound_row` — the target's row in ``L`` vector–matrix products, O(L·H·n²), upcasting one layer
  at a time so an ``n = 2048`` stack never needs a float64 copy of the whole ``[layer, head, n, n]``;
* :func:`stack_product` — the whole ``n×n`` product, O(L·n³), only on request;
* :func:`flow_decomposition` — the exact share of every edge: ``f_j s_j E_{jk} g_k`` with ``f`` the
  backward product from the target and ``g`` the forward product from the source(s); each layer's flows
  sum to the bound;
* :func:`top_paths` — the ``k`` heaviest single paths by a max-product dynamic programme (k-best
  per node, vectorised), never by enumeration.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..core.display import compact_repr
from ..core.results import Record, Result, heavy

__all__ = [
    "BoundFlows",
    "factored_row",
    "factored_step",
    "BoundPath",
    "bound_row",
    "graph_row",
    "layer_matrices",
    "paper_constant",
    "residual_augmented",
    "rollout_matrices",
    "stack_product",
    "top_paths",
    "flow_decomposition",
]

#: above this many float64 elements a dense [layer, head, pos, pos] flow tensor is refused
MAX_FLOW_ELEMENTS: int = 400_000_000


def _check_graph(residual: Tensor, edges: Tensor, left_scale: Tensor | None) -> tuple[int, int, int]:
    if edges.ndim != 4 or edges.shape[-1] != edges.shape[-2]:
        raise ValueError(f"edges must be [layer, head, query_pos, key_pos], got {tuple(edges.shape)}")
    n_layers, n_heads, n, _ = edges.shape
    if residual.shape != (n_layers, n):
        raise ValueError(f"residual must be [layer, pos] = {(n_layers, n)}, got {tuple(residual.shape)}")
    if left_scale is not None and left_scale.shape != (n_layers, n):
        raise ValueError(f"left_scale must be [layer, pos] = {(n_layers, n)}, got {tuple(left_scale.shape)}")
    return n_layers, n_heads, n


def _check_target(target_pos: int, n: int, what: str = "target") -> int:
    if not -n <= target_pos < n:
        raise ValueError(f"{what} position {target_pos} is out of range for {n} tokens; use 0..{n - 1} or -1")
    return target_pos % n


def layer_matrices(
    residual: Float[Tensor, "layer pos"],
    edges: Float[Tensor, "layer head query_pos key_pos"],
    *,
    left_scale: Float[Tensor, "layer pos"] | None = None,
) -> Float[Tensor, "layer query_pos key_pos"]:
    """``M^(l) = diag(s^(l)) (diag(r^(l)) + Σ_h E^(l,h))`` for every layer."""
    _check_graph(residual, edges, left_scale)
    mats = edges.sum(dim=1) + torch.diag_embed(residual.to(edges.dtype))
    return mats if left_scale is None else mats * left_scale.to(mats.dtype)[:, :, None]


def bound_row(mats: Float[Tensor, "layer query_pos key_pos"], target_pos: int = -1) -> Float[Tensor, "pos"]:
    """``e_target^T M^(L-1) ⋯ M^(0)`` in ``L`` vector–matrix products (float64)."""
    target_pos = _check_target(target_pos, mats.shape[-1])
    row = torch.zeros(mats.shape[-1], dtype=torch.float64, device=mats.device)
    row[target_pos] = 1.0
    for layer in range(mats.shape[0] - 1, -1, -1):
        row = row @ mats[layer].double()
    return row


def graph_row(
    residual: Float[Tensor, "layer pos"],
    edges: Float[Tensor, "layer head query_pos key_pos"],
    target_pos: int = -1,
    *,
    left_scale: Float[Tensor, "layer pos"] | None = None,
) -> Float[Tensor, "pos"]:
    """:func:`bound_row` straight from the graph, one layer at a time (no ``M`` stack)."""
    n_layers, n_heads, n = _check_graph(residual, edges, left_scale)
    ones = torch.ones(n_layers, n_heads, n, dtype=torch.float64, device=edges.device)
    return factored_row(residual, edges, ones, target_pos, left_scale=left_scale)


def factored_row(
    residual: Float[Tensor, "layer pos"],
    patterns: Float[Tensor, "layer head query_pos key_pos"],
    key_scale: Float[Tensor, "layer head key_pos"],
    target_pos: int = -1,
    *,
    query_scale: Float[Tensor, "layer pos"] | None = None,
    left_scale: Float[Tensor, "layer pos"] | None = None,
) -> Float[Tensor, "pos"]:
    """:func:`bound_row` for edges in factored form ``E^(l,h) = diag(q^(l)) A^(l,h) diag(c^(l,h))``.

    Every variant's edges have this form, so the row needs only the traced patterns: no scaled
    ``[layer, head, pos, pos]`` copy (4.5 GB for SmolLM2 at n = 2048). The vector–matrix products run
    in the patterns' dtype (float32 patterns are accurate to ~1e-7 anyway); the row is float64.
    """
    n_layers, n_heads, n, _ = patterns.shape
    if key_scale.shape != (n_layers, n_heads, n):
        raise ValueError(
            f"key_scale must be [layer, head, key_pos] = {(n_layers, n_heads, n)}, got {tuple(key_scale.shape)}"
        )
    for name, value in (("residual", residual), ("query_scale", query_scale), ("left_scale", left_scale)):
        if value is not None and value.shape != (n_layers, n):
            raise ValueError(f"{name} must be [layer, pos] = {(n_layers, n)}, got {tuple(value.shape)}")
    target_pos = _check_target(target_pos, n)
    row = torch.zeros(n, dtype=torch.float64, device=patterns.device)
    row[target_pos] = 1.0
    for layer in range(n_layers - 1, -1, -1):
        row = factored_step(
            row,
            patterns[layer],
            key_scale[layer],
            residual[layer],
            query_scale=None if query_scale is None else query_scale[layer],
            left_scale=None if left_scale is None else left_scale[layer],
        )
    return row


def factored_step(
    row: Float[Tensor, "query_pos"],
    patterns: Float[Tensor, "head query_pos key_pos"],
    key_scale: Float[Tensor, "head key_pos"],
    residual: Float[Tensor, "query_pos"],
    *,
    query_scale: Float[Tensor, "query_pos"] | None = None,
    left_scale: Float[Tensor, "query_pos"] | None = None,
) -> Float[Tensor, "key_pos"]:
    """One layer of :func:`factored_row`: ``row · diag(s) (diag(r) + Σ_h diag(q) A^h diag(c^h))``.

    Needs only this layer's patterns, so a sweep that recomputes them one layer at a time (long
    prompts, :mod:`lens_squash.edge.stream`) gives the same row as the whole stack.
    """
    if left_scale is not None:
        row = row * left_scale.double()
    into_heads = row if query_scale is None else row * query_scale.double()
    # rescaled to max 1 before the product in the patterns' dtype: certified rows reach 1e50+,
    # beyond float32's range, while the float64 row holds them
    peak = float(into_heads.abs().max()) or 1.0
    # a batched vector-matrix product over the heads: einsum("j,hjk->hk") copied the patterns into a
    # fresh [query, head·key] layout first (10× slower at n = 2048; bit-equal there, float32-rounding
    # apart at some short lengths where the copy's column count changes the kernel's blocking)
    heads = torch.matmul((into_heads / peak).to(patterns.dtype), patterns)  # [head, key]
    return row * residual.double() + peak * (heads.double() * key_scale.double()).sum(0)


def stack_product(mats: Float[Tensor, "layer query_pos key_pos"]) -> Float[Tensor, "query_pos key_pos"]:
    """``M^(L-1) ⋯ M^(1) M^(0)`` (float64)."""
    product = mats[0].double()
    for layer in range(1, mats.shape[0]):
        product = mats[layer].double() @ product
    return product


def paper_constant(n_layers: int, *, beta2=1.0, beta3: float = 1.0, sigma_psi: float = 1.0) -> float:
    """Theorem B.5's ``C = (1/β_3) Π_l (σ_ψ/β_2^(l) + 1)``; ``beta2`` is a scalar or one per layer."""
    beta2 = torch.as_tensor(beta2, dtype=torch.float64).expand(n_layers)
    if (beta2 <= 0).any() or beta3 <= 0:
        raise ValueError("β_2 and β_3 are normalisation constants and must be positive")
    return float(torch.prod(sigma_psi / beta2 + 1.0) / beta3)


def residual_augmented(
    attention: Float[Tensor, "layer query_pos key_pos"], beta1=1.0
) -> Float[Tensor, "layer query_pos key_pos"]:
    """``Ā^(l) = A^(l)/β_1^(l) + I`` (Theorem B.5); ``beta1`` is a scalar or one per layer."""
    beta1 = torch.as_tensor(beta1, dtype=attention.dtype).expand(attention.shape[0])
    if (beta1 <= 0).any():
        raise ValueError("β_1 is a normalisation constant and must be positive")
    eye = torch.eye(attention.shape[-1], dtype=attention.dtype, device=attention.device)
    return attention / beta1[:, None, None] + eye


def rollout_matrices(attention: Float[Tensor, "layer query_pos key_pos"]) -> Float[Tensor, "layer query_pos key_pos"]:
    """``Λ̃^(l) = ½(A^(l) + I)`` (Prop. B.8; attention rollout of Abnar & Zuidema 2020)."""
    eye = torch.eye(attention.shape[-1], dtype=attention.dtype, device=attention.device)
    return 0.5 * (attention + eye)


@dataclass(frozen=True, eq=False)
class BoundFlows(Result):
    """Every edge's exact share of a bound's path sum towards ``target_pos`` (the bound side; the paths
    picked from a flow by share are :class:`lens_squash.algebra.flow_paths.FlowPaths`).

    ``head_flows[l, h, j, k]`` is the mass of all paths that use head ``h`` of layer ``l`` from ``k`` to
    ``j``; ``residual_flows[l, j]`` the mass that stays at ``j`` through layer ``l``'s residual edge.
    Each layer's flows sum to ``total``: the bound at ``source``, or the row's sum when ``source`` is
    ``None`` (every input position at once).
    """

    head_flows: Float[Tensor, "layer head query_pos key_pos"] = heavy()
    residual_flows: Float[Tensor, "layer pos"]
    total: float
    target_pos: int
    source: int | None
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def head_totals(self) -> Float[Tensor, "layer head"]:
        """The flow through each head of each layer."""
        return self.head_flows.sum(dim=(2, 3))

    @property
    def layer_totals(self) -> Float[Tensor, "layer"]:
        """Per layer, all flows together: equals :attr:`total` at every layer (a consistency check)."""
        return self.head_flows.sum(dim=(1, 2, 3)) + self.residual_flows.sum(dim=1)

    __repr__ = compact_repr

    def _repr_html_(self) -> str:
        totals = self.head_totals
        layer, head = divmod(int(totals.argmax()), totals.shape[1])
        return (
            f"<b>BoundFlows</b> → position {self.target_pos}"
            f"{'' if self.source is None else f' from {self.source}'}: total {self.total:.4g}; "
            f"residual share {float(self.residual_flows.sum() / (self.total * totals.shape[0])):.3f}; "
            f"heaviest head L{layer}H{head} ({float(totals.max()):.4g})"
        )


def _forward_vectors(mats: Tensor, source: int | None) -> Tensor:
    """``g^(l) = M^(l-1) ⋯ M^(0) g^(0)`` for every ``l``, with ``g^(0) = e_source`` (or all ones)."""
    n_layers, n = mats.shape[0], mats.shape[-1]
    g = torch.ones(n, dtype=torch.float64, device=mats.device)
    if source is not None:
        g = torch.zeros_like(g)
        g[source] = 1.0
    out = [g]
    for layer in range(n_layers - 1):
        g = mats[layer].double() @ g
        out.append(g)
    return torch.stack(out)


def _backward_vectors(mats: Tensor, target_pos: int) -> Tensor:
    """``f^(l) = e_target^T M^(L-1) ⋯ M^(l+1)`` for every ``l`` (``f^(L-1) = e_target``)."""
    n_layers, n = mats.shape[0], mats.shape[-1]
    f = torch.zeros(n, dtype=torch.float64, device=mats.device)
    f[target_pos] = 1.0
    out = [f]
    for layer in range(n_layers - 1, 0, -1):
        f = f @ mats[layer].double()
        out.append(f)
    return torch.stack(out[::-1])


def flow_decomposition(
    residual: Float[Tensor, "layer pos"],
    edges: Float[Tensor, "layer head query_pos key_pos"],
    target_pos: int = -1,
    *,
    source: int | None = None,
    left_scale: Float[Tensor, "layer pos"] | None = None,
    output_scale: float = 1.0,
) -> BoundFlows:
    """The exact per-layer, per-head, per-edge split of the path sum (DESIGN §3): the flow through
    head ``h`` of layer ``l`` from ``k`` to ``j`` is ``f^(l)_j s^(l)_j E^(l,h)_{jk} g^(l)_k``."""
    n_layers, n_heads, n = _check_graph(residual, edges, left_scale)
    target_pos = _check_target(target_pos, n)
    if source is not None:
        source = _check_target(source, n, "source")
    if n_layers * n_heads * n * n > MAX_FLOW_ELEMENTS:
        raise ValueError(
            f"a dense flow tensor for {n_layers} layers × {n_heads} heads × {n}² positions needs "
            f"{n_layers * n_heads * n * n * 8 / 2**30:.1f} GiB; use top_paths(...) for the heaviest paths, "
            "or a shorter prompt"
        )
    mats = layer_matrices(residual, edges, left_scale=left_scale)
    f = _backward_vectors(mats, target_pos)  # [layer, pos]
    if left_scale is not None:
        f = f * left_scale.double()
    g = _forward_vectors(mats, source)  # [layer, pos]
    f = f * output_scale  # the variant's output factor (the constant C for `paper`) scales every flow
    head_flows = f[:, None, :, None] * edges.double() * g[:, None, None, :]
    residual_flows = f * residual.double() * g
    row = output_scale * bound_row(mats, target_pos)
    total = float(row.sum() if source is None else row[source])
    return BoundFlows(head_flows, residual_flows, total, target_pos, source)


@dataclass(frozen=True)
class BoundPath(Record):
    """One causal path ``positions[0] → … → positions[L]`` of a bound's graph and its weight (product
    of edge weights; a flow figure's connected path is :class:`lens_squash.algebra.flow_paths.FlowPath`).

    ``heads[l]`` is the head taken at layer ``l``, or ``None`` for the residual edge.
    """

    weight: float
    positions: tuple[int, ...]
    heads: tuple[int | None, ...]

    def describe(self, str_tokens=None) -> str:
        def name(i):
            return f"{i}" if str_tokens is None else f"{i}:{str_tokens[i]!r}"

        steps = [name(self.positions[0])]
        for layer, head in enumerate(self.heads):
            steps.append(f"-[L{layer}{'R' if head is None else f'H{head}'}]→ {name(self.positions[layer + 1])}")
        return f"{self.weight:.4g}: " + " ".join(steps)

    __repr__ = compact_repr

    def _repr_html_(self) -> str:
        return f"<code>{html.escape(self.describe())}</code>"


def _layer_edge_weights(residual: Tensor, edges: Tensor, left_scale: Tensor | None, layer: int) -> Tensor:
    """``[head+1, query_pos, key_pos]``: heads first, the residual edge (diagonal) last."""
    w = torch.cat([edges[layer].double(), torch.diag(residual[layer].double())[None]], dim=0)
    return w if left_scale is None else w * left_scale[layer].double()[None, :, None]


def top_paths(
    residual: Float[Tensor, "layer pos"],
    edges: Float[Tensor, "layer head query_pos key_pos"],
    target_pos: int = -1,
    *,
    k: int = 10,
    source: int | None = None,
    left_scale: Float[Tensor, "layer pos"] | None = None,
    output_scale: float = 1.0,
) -> list[BoundPath]:
    """The ``k`` heaviest single paths into ``target_pos`` (from ``source``, or from anywhere), heaviest
    first, by a k-best max-product dynamic programme from the target backwards.

    ``best[p, r]`` holds the ``r``-th heaviest partial path from position ``p`` at the current level to
    the target; one layer step takes the ``k`` best over (edge, successor, rank). Cost per layer is
    ``(H+1)·n²·k`` multiplications, vectorised over positions.
    """
    n_layers, n_heads, n = _check_graph(residual, edges, left_scale)
    target_pos = _check_target(target_pos, n)
    if source is not None:
        source = _check_target(source, n, "source")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    best = torch.zeros(n, k, dtype=torch.float64)
    best[target_pos, 0] = 1.0  # level L: only the target, one empty path
    pointers = []  # per layer: [pos, k] indices into the flattened (edge, successor, rank) candidates
    for layer in range(n_layers - 1, -1, -1):
        weights = _layer_edge_weights(residual, edges, left_scale, layer).cpu()  # [edge, j, p]
        # candidates[p, e, j, r] = weight of edge e from p to j × r-th best path from j onwards
        candidates = weights.permute(2, 0, 1)[..., None] * best[None, None]  # [p, edge, j, k]
        values, index = candidates.reshape(n, -1).topk(k, dim=1)
        best = values
        pointers.append(index)
    pointers = pointers[::-1]  # pointers[l] for layer l
    if source is None:
        flat_values, flat_index = best.reshape(-1).topk(min(k, best.numel()))
        starts = [(int(i) // k, int(i) % k) for i in flat_index]
    else:
        flat_values, starts = best[source], [(source, r) for r in range(k)]
    records = []
    for value, (position, rank) in zip(flat_values.tolist(), starts, strict=True):
        if not value > 0:
            break
        records.append(_follow(pointers, position, rank, n, k, n_heads, value * output_scale))
    return records


def _follow(pointers, position: int, rank: int, n: int, k: int, n_heads: int, weight: float) -> BoundPath:
    positions, heads = [position], []
    for layer_pointers in pointers:
        edge, rest = divmod(int(layer_pointers[position, rank]), n * k)
        position, rank = divmod(rest, k)
        heads.append(None if edge == n_heads else edge)
        positions.append(position)
    return BoundPath(weight, tuple(positions), tuple(heads))
