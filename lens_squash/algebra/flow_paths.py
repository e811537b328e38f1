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
from dataclasses import dataclass, field, replace

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
    target_pos: int
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
        return f"<b>FlowPaths</b> ({html.escape(self.kind)}) → position {self.target_pos}<ol>{items}</ol>"


# --------------------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------------------


def flow_edge_shares(
    residual: Float[Tensor, "layer pos"],
    mlp: Float[Tensor, "layer pos"] | None,
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
    residual: Float[Tensor, "layer pos"],
    edges: Float[Tensor, "layer edge query_pos key_pos"],
    target_pos: int,
    *,
    k: int = 5,
    left_scale: Float[Tensor, "layer pos"] | None = None,
) -> dict[int, list[tuple[float, tuple[int, ...], tuple[int | None, ...]]]]:
    """For every source ``i``, its ``k`` heaviest paths into ``target_pos``: ``(weight, positions, edges)``
    with ``edges[l]`` the index into ``edges``' second axis, ``None`` for the residual edge.

    The programme of :func:`paths.top_paths`: ``best[p, r]`` is the ``r``-th heaviest partial path from
    ``p`` at the current level to the target; a layer step keeps the ``k`` best over (edge, successor,
    rank). Run from the target down, its level-0 table holds every source's ``k`` best at once.
    Weights must be nonnegative. Equal weights are ordered by the first hop's (edge, successor,
    rank), lowest first (the residual edge after every other), so ties do not depend on how
    ``topk`` happens to order them.
    """
    found = _top_paths(residual, edges.shape, edges.__getitem__, target_pos, k, left_scale)
    return {source: [record[:3] for record in records] for source, records in found.items()}


def _top_paths(residual, shape, layer_edges, target_pos: int, k: int, left_scale):
    """:func:`top_paths_by_source` with each path's hop weights: ``(weight, positions, edges,
    shares)``, the edges of layer ``l`` from ``layer_edges(l)`` (so a graph need not hold them all)."""
    n_layers, n_edges, n, _ = shape
    if not -n <= target_pos < n:
        raise ValueError(f"target position {target_pos} is out of range for {n} tokens; use 0..{n - 1} or -1")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    _check_nonnegative("residual", residual)
    _check_nonnegative("left-scale", left_scale)
    block = min(_BLOCK, n)
    # [edge, query (padded to whole blocks), key]; the padding's -1 loses to every real product
    first = torch.full((n_edges, -(-n // block) * block, n), -1.0, dtype=torch.float64)
    best = torch.zeros(n, k, dtype=torch.float64)
    best[target_pos % n, 0] = 1.0
    steps = []
    for layer in range(n_layers - 1, -1, -1):
        heads, res = _layer_weights(residual, layer_edges(layer), left_scale, layer)
        best, pointers, hops = _layer_step(heads, res, best, first, block)
        steps.append((pointers, hops))
    return _records(best, *_follow(steps[::-1], n, k), n_edges)


#: queries per block of a layer's first pass: a key's ``k`` best columns lie in its ``k`` best blocks
_BLOCK = 32


def _check_nonnegative(name: str, weights: Tensor | None) -> None:
    # the pruning of _layer_step needs w · best to fall with the rank; amin is NaN on a NaN
    if weights is not None and weights.numel() and not bool(weights.amin() >= 0):
        raise ValueError(f"path weights must be nonnegative and finite; a {name} weight is {float(weights.amin())}")


def _layer_weights(residual, edges, left_scale, layer: int) -> tuple[Tensor, Tensor]:
    """One layer's head weights ``[(edge, query j), key p]`` (a view of ``edges`` when unscaled) and
    residual weights ``[p]``, each times the left scale of its query (``(w · s) · best`` as the old
    dense programme multiplied, so the products are the same floats)."""
    n_edges, n, _ = edges.shape
    _check_nonnegative("edge", edges)
    heads, res = edges.double().cpu().reshape(n_edges * n, n), residual[layer].double().cpu()
    if left_scale is not None:
        scale = left_scale[layer].double().cpu()
        heads, res = heads * scale.repeat(n_edges)[:, None], res * scale
    return heads, res


def _layer_step(
    heads: Float[Tensor, "edge_query key_pos"],
    res: Float[Tensor, "pos"],
    best: Float[Tensor, "query_pos rank"],
    first: Tensor,
    block: int,
) -> tuple[Float[Tensor, "key_pos rank"], Tensor, Float[Tensor, "key_pos rank"]]:
    """The ``k`` best of ``w[(e, j), p] · best[j, r]`` per key ``p``: values, pointers ``(e·n + j)·k + r``
    (the residual edge is ``e = E`` at ``j = p``; ties to the lowest pointer) and the first hop's ``w``.

    Only the ``k`` best head columns ``(e, j)`` by their rank-0 product can hold a winner (each beats
    ``(e', j', 0)``, which beats every ``(e', j', r)`` of a column left out), so those and the residual
    edge give ``(k+1)·k`` candidates per ``p`` instead of the ``(E+1)·n·k`` of a flat ``topk``."""
    n, k = best.shape
    pairs = (
        torch.cat(
            [_head_columns(heads, best[:, 0], k, first, block), (heads.shape[0] + torch.arange(n))[:, None]], dim=1
        )
        .sort(dim=1)
        .values
    )
    weights = torch.cat([heads.gather(0, pairs[:, :-1].T).T, res[:, None]], dim=1)
    values = (weights[:, :, None] * best[pairs % n]).reshape(n, -1)  # [p, (pair, rank)]
    pointers = (pairs[:, :, None] * k + torch.arange(k)).reshape(n, -1)  # ascending along each row
    order = values.sort(dim=1, descending=True, stable=True).indices[:, :k]
    return values.gather(1, order), pointers.gather(1, order), weights.gather(1, order // k)


def _head_columns(heads: Tensor, lead: Float[Tensor, "query_pos"], k: int, first: Tensor, block: int) -> Tensor:
    """``[p, k']`` (``k' = min(k, E·n)``): the head columns ``e·n + j`` of the ``k'`` largest
    ``heads[(e, j), p] · lead[j]``, a tie at the ``k'``-th value going to the lowest columns (``topk``
    alone picks among ties in no documented order).

    Maxima of blocks of ``block`` queries come first: the ``k'`` best blocks hold ``k'`` values as
    large as any outside them, so the ``k'``-th value is theirs. A key whose ``k'``-th value is
    positive and reached by more than ``k'`` values is resolved over all its columns; ties of zeros
    need not be, as no path keeps a zero."""
    n_edges, padded, n = first.shape
    k = min(k, n_edges * n)
    if k == 0:
        return torch.zeros(n, 0, dtype=torch.long)
    torch.mul(heads.view(n_edges, n, n), lead[None, :, None], out=first[:, :n])
    flat = first.view(-1, n)
    maxima = flat.view(-1, block, n).amax(1)
    chosen = maxima.topk(min(k, maxima.shape[0]), dim=0, sorted=False)
    rows = (chosen.indices[:, None] * block + torch.arange(block)[None, :, None]).reshape(-1, n)
    values = flat.gather(0, rows)
    top = values.topk(k, dim=0, sorted=False)
    kth = top.values.amin(0)
    columns = rows.gather(0, top.indices)
    reached = (values >= kth).sum(0) + (maxima >= kth).sum(0) - (chosen.values >= kth).sum(0)
    for p in ((reached > k) & (kth > 0)).nonzero()[:, 0].tolist():
        column = flat[:, p]
        above, tied = column > kth[p], column == kth[p]
        columns[:, p] = (above | (tied & (tied.cumsum(0) <= k - above.sum()))).nonzero()[:, 0]
    return (columns // padded * n + columns % padded).T


def _follow(steps: list[tuple[Tensor, Tensor]], n: int, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Every ``(source, rank)`` traced up through the layers' pointers at once: ``[level, p, rank]``
    positions, ``[layer, p, rank]`` edges and hop weights."""
    position = torch.arange(n)[:, None].expand(n, k)
    rank = torch.arange(k)[None].expand(n, k)
    positions, taken, shares = [position], [], []
    for pointers, hops in steps:
        index = pointers[position, rank]
        shares.append(hops[position, rank])
        edge, rest = index // (n * k), index % (n * k)
        position, rank = rest // k, rest % k
        taken.append(edge)
        positions.append(position)
    return torch.stack(positions), torch.stack(taken), torch.stack(shares)


def _records(best, positions, taken, shares, n_edges: int) -> dict[int, list[tuple]]:
    """The table as ``{source: [(weight, positions, edges, shares), ...]}``, paths of weight 0 left out."""
    weights = best.tolist()
    steps, hops, parts = (t.permute(1, 2, 0).tolist() for t in (positions, taken, shares))
    out = {}
    for source, row in enumerate(weights):
        found = []
        for rank, value in enumerate(row):
            if not value > 0:
                break
            edges = tuple(None if e == n_edges else e for e in hops[source][rank])
            found.append((value, tuple(steps[source][rank]), edges, tuple(parts[source][rank])))
        out[source] = found
    return out


# --------------------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------------------


def flow_top_paths(flow, k: int = 5, *, source: int | None = None) -> FlowPaths:
    """The ``k`` heaviest connected paths of a :class:`flow.SensitivityFlow` from every input position
    (or only ``source``) to its target, hops weighted by their share of the flow (module docstring)."""
    if source is not None:
        source = flow.check_position(source)
    res_w, edge_w = flow_edge_shares(flow.residual, flow.mlp, flow.edges)
    found = _top_paths(res_w, edge_w.shape, edge_w.__getitem__, flow.target_pos, k, None)
    n_heads = flow.n_heads
    paths = {}
    for s, records in found.items():
        if source is not None and s != source:
            continue
        paths[s] = [
            FlowPath(weight, weight, positions, tuple(_label(e, n_heads) for e in taken), shares)
            for weight, positions, taken, shares in records
        ]
    mlp = torch.zeros_like(flow.value) if flow.mlp is None else flow.mlp
    parts = flow.residual.double() + mlp.double() + flow.value.double() + flow.pattern.double()
    pattern_share = flow.pattern.double().sum(-1) / parts.sum(-1).clamp_min(torch.finfo(torch.float64).tiny)
    return FlowPaths("gradient flow", flow.target_pos, paths, flow.str_tokens, flow.n_layers, n_heads, pattern_share)


def _label(edge: int | None, n_heads: int) -> int | str:
    return RESIDUAL if edge is None else MLP if edge == n_heads else edge


def _graph_layer_edges(graph, layer: int) -> Float[Tensor, "head query_pos key_pos"]:
    """``graph.edges[layer]`` without the whole ``[layer, head, pos, pos]`` float64 tensor (2 GiB at
    n = 1000 on SmolLM2): the property's own formula on a one-layer slice, so the same floats."""
    query = None if graph.query_scale is None else graph.query_scale[layer : layer + 1]
    patterns = None if graph.patterns is None else graph.patterns[layer : layer + 1]  # None: .edges says why
    one = replace(graph, patterns=patterns, key_scale=graph.key_scale[layer : layer + 1], query_scale=query)
    return one.edges[0]


def graph_paths(graph, target_pos: int = -1, k: int = 5, *, str_tokens=(), source: int | None = None) -> FlowPaths:
    """The ``k`` heaviest paths of a bound's :class:`variants.PathGraph` from each source: weights are
    the graph's edges times its output factor, so a path's ``weight`` is its term of the path sum and
    its ``share`` that term over the bound at its source."""
    n = graph.residual.shape[-1]
    if not -n <= target_pos < n:
        raise ValueError(f"target position {target_pos} is out of range for {n} tokens; use 0..{n - 1} or -1")
    target_pos %= n
    if source is not None and not -n <= source < n:
        raise ValueError(f"source position {source} is out of range for {n} tokens; use 0..{n - 1} or -1")
    n_layers, n_heads = graph.residual.shape[0], graph.key_scale.shape[1]
    found = _top_paths(
        graph.residual,
        (n_layers, n_heads, n, n),
        lambda layer: _graph_layer_edges(graph, layer),
        target_pos,
        k,
        graph.left_scale,
    )
    scale = float(graph.output_scale[target_pos])
    bound = scale * graph.row(target_pos, n_layers=n_layers)
    paths = {}
    for s, records in found.items():
        if source is not None and s != source % n:
            continue
        total = float(bound[s]) or 1.0
        paths[s] = [
            FlowPath(
                scale * w, scale * w / total, positions, tuple(RESIDUAL if e is None else e for e in taken), shares
            )
            for w, positions, taken, shares in records
        ]
    return FlowPaths(graph.variant, target_pos, paths, tuple(str_tokens), n_layers, n_heads)


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
