"""The per-source k-best path programme against every path enumerated by brute force (weights, paths
and the order of ties) and against the dense programme it replaced; graph paths' hops against the
graph's own edges."""

from __future__ import annotations

import pytest
import torch

from lens_squash.algebra import flow_paths
from lens_squash.algebra.flow_paths import graph_paths, top_paths_by_source
from lens_squash.algebra.variants import PathGraph

F64 = torch.float64


def _brute_force(residual, edges, target, k, left_scale=None):
    """Every path into ``target`` by recursion, sorted by the documented order: weight descending,
    then the first hop's (edge, successor), then the rest of the path by the same rule; the weight
    multiplied from the target down as ``(w · s) · rest`` (the residual edge is index ``E``)."""
    L, E, n, _ = edges.shape

    memo = {}

    def suffixes(layer, query):
        """[(key, weight, hops)] of every path from ``query`` at level ``layer`` up to the target."""
        if layer == L:
            return [((), 1.0, ())] if query == target else []
        if (layer, query) not in memo:
            out = []
            for j in range(n):
                for rest_key, rest_weight, rest_hops in suffixes(layer + 1, j):
                    for e in range(E + 1):
                        w = float(edges[layer, e, j, query]) if e < E else float(residual[layer, j]) * (j == query)
                        if left_scale is not None:
                            w = w * float(left_scale[layer, j])
                        if w * rest_weight > 0:
                            out.append(((-(w * rest_weight), e, j, rest_key), w * rest_weight, ((e, j),) + rest_hops))
            memo[layer, query] = out
        return memo[layer, query]

    found = {}
    for source in range(n):
        ranked = sorted(suffixes(0, source), key=lambda item: item[0])[:k]
        found[source] = [
            (weight, (source, *(j for _, j in hops)), tuple(None if e == E else e for e, _ in hops))
            for _, weight, hops in ranked
        ]
    return found


def _dense(residual, edges, target, k, left_scale=None):
    """The programme this module had before (a flat ``topk`` over every (edge, successor, rank))."""
    L, E, n, _ = edges.shape
    best = torch.zeros(n, k, dtype=F64)
    best[target, 0] = 1.0
    pointers = []
    for layer in range(L - 1, -1, -1):
        weights = torch.cat([edges[layer].double(), torch.diag(residual[layer].double())[None]])
        if left_scale is not None:
            weights = weights * left_scale[layer].double()[None, :, None]
        candidates = weights.permute(2, 0, 1)[..., None] * best[None, None]
        best, index = candidates.reshape(n, -1).topk(k, dim=1)
        pointers.append(index)
    out = {}
    for source in range(n):
        found = []
        for rank in range(k):
            if not float(best[source, rank]) > 0:
                break
            position, r, positions, taken = source, rank, [source], []
            for layer_pointers in pointers[::-1]:
                edge, rest = divmod(int(layer_pointers[position, r]), n * k)
                position, r = divmod(rest, k)
                taken.append(None if edge == E else edge)
                positions.append(position)
            found.append((float(best[source, rank]), tuple(positions), tuple(taken)))
        out[source] = found
    return out


def _graph(L, E, n, *, seed, tied, left=True):
    """Causal weights; ``tied`` draws them from {0, ¼, ½, 1} (and the left scale from {1, 2}), so
    products are exact and many paths weigh the same."""
    gen = torch.Generator().manual_seed(seed)
    if tied:
        levels = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=F64)
        edges = levels[torch.randint(0, 4, (L, E, n, n), generator=gen)].tril()
        residual = levels[torch.randint(0, 4, (L, n), generator=gen)]
        scale = torch.randint(1, 3, (L, n), generator=gen).double()
    else:
        edges = torch.rand(L, E, n, n, generator=gen, dtype=F64).tril()
        edges[edges < 0.3] = 0.0
        residual = torch.rand(L, n, generator=gen, dtype=F64)
        scale = torch.rand(L, n, generator=gen, dtype=F64) + 0.5
    return residual, edges, scale if left else None


CASES = [
    (L, E, n, k, seed)
    for seed, (L, E, n, k) in enumerate(
        [(1, 1, 1, 1), (1, 2, 3, 5), (2, 1, 4, 3), (2, 2, 5, 4), (3, 2, 4, 6), (2, 3, 6, 2), (3, 1, 5, 5), (2, 0, 4, 3)]
    )
]


@pytest.mark.parametrize("block", [1, 2, 32])
@pytest.mark.parametrize(("L", "E", "n", "k", "seed"), CASES)
def test_top_paths_equal_brute_force_with_ties(monkeypatch, block, L, E, n, k, seed):
    # a small block puts several blocks (and padding) into the first pass even at n = 4
    monkeypatch.setattr(flow_paths, "_BLOCK", block)
    for tied, left in ((True, True), (True, False), (False, True)):
        residual, edges, scale = _graph(L, E, n, seed=seed, tied=tied, left=left)
        for target in {n - 1, n // 2}:
            assert top_paths_by_source(residual, edges, target, k=k, left_scale=scale) == _brute_force(
                residual, edges, target, k, scale
            )


def test_top_paths_with_ties_to_every_key_equal_brute_force(monkeypatch):
    # identical heads and uniform causal rows: every key sees the same value from every head
    monkeypatch.setattr(flow_paths, "_BLOCK", 2)
    n, L = 5, 2
    rows = torch.tril(torch.ones(n, n, dtype=F64))
    edges = (rows / 4)[None, None].expand(L, 3, n, n).contiguous()
    residual = torch.full((L, n), 0.5, dtype=F64)
    for k in (1, 2, 4, 7):
        assert top_paths_by_source(residual, edges, n - 1, k=k) == _brute_force(residual, edges, n - 1, k)


@pytest.mark.parametrize("seed", range(4))
def test_top_paths_equal_the_dense_programme(seed):
    # continuous weights have no ties, so the old flat topk's choice is the only one; n > the block
    residual, edges, scale = _graph(4, 3, 70, seed=seed, tied=False)
    for k in (1, 5):
        assert top_paths_by_source(residual, edges, 69, k=k, left_scale=scale) == _dense(residual, edges, 69, k, scale)
    # with ties the old programme's order among them was topk's, so only its weights are comparable
    residual, edges, scale = _graph(3, 2, 40, seed=seed, tied=True)
    new, old = top_paths_by_source(residual, edges, 39, k=4, left_scale=scale), _dense(residual, edges, 39, 4, scale)
    assert {s: [w for w, *_ in ps] for s, ps in new.items()} == {s: [w for w, *_ in ps] for s, ps in old.items()}


def test_top_paths_reject_negative_or_nan_weights():
    residual, edges, _ = _graph(2, 2, 4, seed=0, tied=False)
    bad = edges.clone()
    bad[1, 0, 3, 1] = -0.1
    with pytest.raises(ValueError, match="nonnegative"):
        top_paths_by_source(residual, bad, 3)
    bad[1, 0, 3, 1] = float("nan")
    with pytest.raises(ValueError, match="nonnegative"):
        top_paths_by_source(residual, bad, 3)


def test_graph_paths_hops_are_the_graphs_edges():
    gen = torch.Generator().manual_seed(5)
    L, H, n = 3, 2, 6
    patterns = torch.rand(L, H, n, n, generator=gen).tril()
    patterns = patterns / patterns.sum(-1, keepdim=True)
    graph = PathGraph(
        "value",
        torch.rand(L, n, generator=gen, dtype=F64),
        patterns,
        torch.rand(L, H, n, generator=gen, dtype=F64),
        torch.rand(L, n, generator=gen, dtype=F64) + 0.5,
        torch.rand(n, generator=gen, dtype=F64) + 1,
        None,
        query_scale=torch.rand(L, n, generator=gen, dtype=F64),
    )
    edges = graph.edges
    for layer in range(L):  # the one-layer slice computes the same floats as the whole property
        assert torch.equal(flow_paths._graph_layer_edges(graph, layer), edges[layer])
    result = graph_paths(graph, -1, k=4)
    brute = _brute_force(graph.residual, edges, n - 1, 4, graph.left_scale)
    scale = float(graph.output_scale[-1])
    for source, found in result.paths.items():
        assert [(p.weight, p.positions) for p in found] == [(scale * w, ps) for w, ps, _ in brute[source]]
        for p in found:
            for layer, (hop, share) in enumerate(zip(p.hops, p.shares, strict=True)):
                key, query = p.positions[layer], p.positions[layer + 1]
                w = graph.residual[layer, query] if hop == "residual" else edges[layer, hop, query, key]
                assert share == float(w) * float(graph.left_scale[layer, query])
