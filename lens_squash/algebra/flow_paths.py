"""Connected paths of the true gradient flow (and of any bound's graph), by a max-product programme.

The true flow has no exact path sum (the backward step is linear per probe, but norms do not
multiply), so each layer's hops are weighted by their **share** of what leaves the query position:
at layer ``l`` the gradient at ``j`` (level ``l+1``) goes back through the residual edge ``j→j``, the
MLP at ``j`` and the value edges ``(h, j→k)``, with ::

    share = ‖part‖ / (‖residual_j‖ + ‖MLP_j‖ + Σ_{h,k} ‖edge_{h,j,k}‖)

(sums of Frobenius norms over the probes; the pattern part has no per-edge attribution here and is
left out, so :attr:`FlowPaths.pattern_share` says how much of each layer's part norms it holds). A
path's weight is the product of its hops' shares: the fraction of the target's flow that follows it
when every position splits its flow by these shares. For a bound's graph (:func:`graph_paths`) the
weights are the graph's own edges, so a path's weight is its exact term of the path sum, and its
share is that term over the bound at its source.

:func:`top_paths_by_source` is paths.top_paths's k-best dynamic programme, kept per source so one run
gives the ``k`` heaviest paths from **every** input position (level 0) to the target.
:func:`select_paths` keeps paths by share of flow, not by a fixed edge count, and every hop of a kept
path is drawn, so no hop of a drawn path is ever dropped (the old top-40-edges figure left paths
disconnected).
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

from ..core.display import compact_repr
from ..core.results import Record, Result

__all__ = [
    "MLP",
    "RESIDUAL",
    "FlowPath",
    "FlowPaths",
    "flow_edge_shares",
    "flow_top_paths",
    "graph_paths",
    "select_paths",
    "top_paths_by_source",
]

#: hop labels besides head indices
RESIDUAL = "residual"
MLP = "mlp"


@dataclass(frozen=True)
class FlowPath(Record):
    """One connected path ``positions[0] → … → positions[L]`` (input to target) through the layers.

    ``hops[l]`` is the head index taken at layer ``l``, or ``"residual"`` / ``"mlp"``; ``shares[l]``
    the hop's weight; ``weight`` their product; ``share`` the weight over its source's total (the
    bound at the source for a graph; the weight itself for the true flow, whose shares are fractions).
    """

    weight: float
    share: float
    positions: tuple[int, ...]
    hops: tuple[int | str, ...]
    shares: tuple[float, ...]

    @property
    def source(self) -> int:
        return self.positions[0]

    def cross_hops(self) -> list[int]:
        """Layers at which the path changes position (a head edge ``j ← k``, ``k < j``)."""
        return [l for l in range(len(self.hops)) if self.positions[l] != self.positions[l + 1]]

    def describe(self, str_tokens=None) -> str:
        def name(i):
            return f"{i}" if str_tokens is None else f"{i}:{str_tokens[i]!r}"

        def hop(label):
            return {RESIDUAL: "R", MLP: "MLP"}.get(label, f"H{label}")

        steps = [name(self.positions[0])]
        for layer, label in enumerate(self.hops):
            if self.positions[layer + 1] != self.positions[layer] or label not in (RESIDUAL,):
                steps.append(f"-[L{layer}{hop(label)}]→ {name(self.positions[layer + 1])}")
        return f"{self.share:.3g} of flow: " + " ".join(steps)

    __repr__ = compact_repr

    def _repr_html_(self) -> str:
        return f"<code>{html.escape(self.describe())}</code>"


@dataclass(frozen=True, eq=False)
class FlowPaths(Result):
    """The ``k`` heaviest connected paths from each source, for the true flow or one bound."""

    kind: str
    target: int
    paths: dict[int, list[FlowPath]]
    str_tokens: tuple[str, ...]
    n_layers: int
    n_heads: int
    pattern_share: Float[Tensor, "layer"] | None = None
    provenance: dict = field(default_factory=dict)

    def selected(self, min_share: float = 0.05, max_paths: int = 60) -> list[FlowPath]:
        """:func:`select_paths` over every source."""
        return select_paths([p for ps in self.paths.values() for p in ps], min_share=min_share, max_paths=max_paths)

    __repr__ = compact_repr

    def _repr_html_(self) -> str:
        best = self.selected(max_paths=5)
        items = "".join(f"<li><code>{html.escape(p.describe(self.str_tokens))}</code></li>" for p in best)
        return f"<b>FlowPaths</b> ({html.escape(self.kind)}) → position {self.target}<ol>{items}</ol>"


# --------------------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------------------


def flow_edge_shares(
    residual: Float[Tensor, "layer pos"], mlp: Float[Tensor, "layer pos"] | None,
    edges: Float[Tensor, "layer head query_pos key_pos"],
) -> tuple[Float[Tensor, "layer pos"], Float[Tensor, "layer head_plus_1 query_pos key_pos"]]:
    """Each hop's share of what leaves its query position (module docstring): ``(residual shares,
    edge shares)`` with the MLP as an extra last "head" on the diagonal."""
    n_layers, n_heads, n, _ = edges.shape
    mlp = torch.zeros_like(residual) if mlp is None else mlp
    res, mlp, edges = residual.double(), mlp.double(), edges.double()
    out = res + mlp + edges.sum((1, 3))
    inv = torch.where(out > 0, 1.0 / out.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(out))
    mlp_edges = torch.diag_embed(mlp * inv)[:, None]
    shares = torch.cat([edges * inv[:, None, :, None], mlp_edges], dim=1)
    return res * inv, shares


# --------------------------------------------------------------------------------------------------
# the k-best dynamic programme, per source
# --------------------------------------------------------------------------------------------------


def top_paths_by_source(
    residual: Float[Tensor, "layer pos"], edges: Float[Tensor, "layer edge query_pos key_pos"], target: int, *,
    k: int = 5, left_scale: Float[Tensor, "layer pos"] | None = None,
) -> dict[int, list[tuple[float, tuple[int, ...], tuple[int | None, ...]]]]:
    """For every source ``i``, its ``k`` heaviest paths into ``target``: ``(weight, positions, edges)``
    with ``edges[l]`` the index into ``edges``' second axis, ``None`` for the residual edge.

    The programme of :func:`paths.top_paths`: ``best[p, r]`` is the ``r``-th heaviest partial path from
    ``p`` at the current level to the target; a layer step keeps the ``k`` best over (edge, successor,
    rank). Run from the target down, its level-0 table holds every source's ``k`` best at once.
    """
    n_layers, n_edges, n, _ = edges.shape
    if not -n <= target < n:
        raise ValueError(f"target position {target} is out of range for {n} tokens; use 0..{n - 1} or -1")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    target %= n
    best = torch.zeros(n, k, dtype=torch.float64)
    best[target, 0] = 1.0
    pointers = []
    for layer in range(n_layers - 1, -1, -1):
        weights = torch.cat([edges[layer].double().cpu(), torch.diag(residual[layer].double().cpu())[None]])
        if left_scale is not None:
            weights = weights * left_scale[layer].double().cpu()[None, :, None]
        candidates = weights.permute(2, 0, 1)[..., None] * best[None, None]  # [p, edge, j, rank]
        best, index = candidates.reshape(n, -1).topk(k, dim=1)
        pointers.append(index)
    pointers = pointers[::-1]
    out = {}
    for source in range(n):
        found = []
        for rank in range(k):
            value = float(best[source, rank])
            if not value > 0:
                break
            found.append((value, *_follow(pointers, source, rank, n, k, n_edges)))
        out[source] = found
    return out


def _follow(pointers, position: int, rank: int, n: int, k: int, n_edges: int):
    positions, taken = [position], []
    for layer_pointers in pointers:
        edge, rest = divmod(int(layer_pointers[position, rank]), n * k)
        position, rank = divmod(rest, k)
        taken.append(None if edge == n_edges else edge)
        positions.append(position)
    return tuple(positions), tuple(taken)


def _hop_shares(residual, edges, left_scale, positions, taken) -> tuple[float, ...]:
    shares = []
    for layer, edge in enumerate(taken):
        k, j = positions[layer], positions[layer + 1]  # the hop runs from key k up to query j
        w = float(residual[layer, j]) if edge is None else float(edges[layer, edge, j, k])
        if left_scale is not None:
            w *= float(left_scale[layer, j])
        shares.append(w)
    return tuple(shares)


# --------------------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------------------


def flow_top_paths(flow, k: int = 5, *, source: int | None = None) -> FlowPaths:
    """The ``k`` heaviest connected paths of a :class:`flow.SensitivityFlow` from every input position
    (or only ``source``) to its target, hops weighted by their share of the flow (module docstring)."""
    if source is not None:
        source = flow.check_position(source)
    res_w, edge_w = flow_edge_shares(flow.residual, flow.mlp, flow.edges)
    found = top_paths_by_source(res_w, edge_w, flow.target_pos, k=k)
    n_heads = flow.n_heads
    paths = {}
    for s, records in found.items():
        if source is not None and s != source:
            continue
        paths[s] = [
            FlowPath(weight, weight, positions, tuple(_label(e, n_heads) for e in taken),
                     _hop_shares(res_w, edge_w, None, positions, taken))
            for weight, positions, taken in records
        ]
    mlp = torch.zeros_like(flow.value) if flow.mlp is None else flow.mlp
    parts = flow.residual.double() + mlp.double() + flow.value.double() + flow.pattern.double()
    pattern_share = flow.pattern.double().sum(-1) / parts.sum(-1).clamp_min(torch.finfo(torch.float64).tiny)
    return FlowPaths("gradient flow", flow.target_pos, paths, flow.str_tokens, flow.n_layers, n_heads, pattern_share)


def _label(edge: int | None, n_heads: int) -> int | str:
    return RESIDUAL if edge is None else MLP if edge == n_heads else edge


def graph_paths(graph, target: int = -1, k: int = 5, *, str_tokens=(), source: int | None = None) -> FlowPaths:
    """The ``k`` heaviest paths of a bound's :class:`variants.PathGraph` from each source: weights are
    the graph's edges times its output factor, so a path's ``weight`` is its term of the path sum and
    its ``share`` that term over the bound at its source."""
    n = graph.residual.shape[-1]
    if not -n <= target < n:
        raise ValueError(f"target position {target} is out of range for {n} tokens; use 0..{n - 1} or -1")
    target %= n
    if source is not None and not -n <= source < n:
        raise ValueError(f"source position {source} is out of range for {n} tokens; use 0..{n - 1} or -1")
    edges = graph.edges
    found = top_paths_by_source(graph.residual, edges, target, k=k, left_scale=graph.left_scale)
    scale = float(graph.output_scale[target])
    bound = scale * graph.row(target, n_layers=graph.residual.shape[0])
    paths = {}
    for s, records in found.items():
        if source is not None and s != source % n:
            continue
        total = float(bound[s]) or 1.0
        paths[s] = [
            FlowPath(scale * w, scale * w / total, positions, tuple(RESIDUAL if e is None else e for e in taken),
                     _hop_shares(graph.residual, edges, graph.left_scale, positions, taken))
            for w, positions, taken in records
        ]
    return FlowPaths(graph.variant, target, paths, tuple(str_tokens), graph.residual.shape[0], edges.shape[1])


def select_paths(paths: list[FlowPath], *, min_share: float = 0.05, max_paths: int = 60) -> list[FlowPath]:
    """Paths by share of flow, heaviest first: those with ``share ≥ min_share ×`` the heaviest share
    (at most ``max_paths``). A figure draws every hop of every selected path."""
    if not 0 <= min_share <= 1:
        raise ValueError(f"min_share must be in [0, 1], got {min_share!r}")
    if isinstance(max_paths, bool) or not isinstance(max_paths, int) or max_paths < 1:
        raise ValueError(f"max_paths must be a positive integer, got {max_paths!r}")
    ordered = sorted(paths, key=lambda p: p.share, reverse=True)
    if not ordered:
        return []
    floor = min_share * ordered[0].share
    return [p for p in ordered if p.share >= floor][:max_paths]
