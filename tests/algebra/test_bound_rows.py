"""BoundRows: every variant's row, one layer at a time, against the whole-stack matrix product."""

from __future__ import annotations

import pytest
import torch

from lens_squash.algebra import paths
from lens_squash.algebra.bound_rows import BoundRows
from lens_squash.algebra.variants import VARIANTS, build_graph
from lens_squash.edge.trace import trace

from ..families import TOKENS, build


@pytest.fixture(scope="module")
def traced_model():
    model = build("llama_gqa")
    return model, trace(model, TOKENS, lipschitz=True, keep_patterns=True, keep_resid=True)


def _fed(traced, graphs, target_pos):
    rows = BoundRows(traced, graphs, target_pos)
    for layer in range(traced.n_layers - 1, -1, -1):
        rows.add(layer, traced.patterns[layer], traced.mean_patterns[layer] if rows.needs_mean else None)
    return rows.finish()


@pytest.mark.parametrize("target_pos", [-1, 4])
def test_rows_equal_the_row_of_the_explicit_matrix_product(traced_model, target_pos):
    model, traced = traced_model
    graphs = {name: build_graph(traced, name, model=model) for name in VARIANTS}
    bounds = _fed(traced, graphs, target_pos)
    for name, graph in graphs.items():
        # an independent route: materialise every layer's n × n matrix and multiply them out (O(L·n³))
        product = paths.stack_product(graph.matrices())
        expected = graph.output_scale[target_pos].double() * product[target_pos]
        torch.testing.assert_close(bounds[name].bound, expected, rtol=1e-10, atol=0, msg=name)
        assert bounds[name].target_pos == target_pos % traced.n_tokens
        assert bounds[name].graph.patterns is not None  # a stored stack: flows and paths stay available


def test_rows_refuse_layers_out_of_order_or_missing(traced_model):
    model, traced = traced_model
    rows = BoundRows(traced, {"rollout": build_graph(traced, "rollout", model=model)}, -1)
    with pytest.raises(ValueError, match="last to first"):
        rows.add(0, traced.patterns[0])  # an off-by-one sweep that starts at the bottom
    rows.add(traced.n_layers - 1, traced.patterns[-1])
    with pytest.raises(ValueError, match="missing layers"):
        rows.finish()
    with pytest.raises(ValueError, match="out of range"):
        BoundRows(traced, {}, traced.n_tokens)


def _causal_patterns(n: int, heads: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    patterns = torch.rand(heads, n, n, generator=gen).tril()
    return patterns / patterns.sum(-1, keepdim=True)  # float32, as traced


@pytest.mark.parametrize("above", [False, True])
def test_layer_totals_skip_only_keys_that_are_exactly_zero(above):
    """The float64 totals read only a row block's causal keys when every later key is exactly 0, and
    every key otherwise: against an independent whole-layer float64 sum, with and without an entry
    above the diagonal (mass a causal-only read would miss)."""
    from lens_squash.algebra.variants import PathGraph

    n, heads = 300, 3
    patterns = _causal_patterns(n, heads)
    if above:
        patterns[1, 40, 250] = 0.75  # one query attends ahead: its block must read every key
    gen = torch.Generator().manual_seed(1)
    key_scale = torch.rand(1, heads, n, generator=gen, dtype=torch.float64) + 0.5
    residual = torch.rand(1, n, generator=gen, dtype=torch.float64)
    graph = PathGraph("test", residual, patterns[None], key_scale, None, torch.ones(n), None)
    expected = residual[0] + (patterns.double() * key_scale[0][:, None, :]).sum(dim=(0, 2))
    torch.testing.assert_close(graph.layer_totals(0, patterns), expected, rtol=1e-13, atol=0)


@pytest.mark.parametrize("n", [37, 99, 512])
def test_a_float32_step_equals_the_float64_product_to_float32_rounding(n):
    """One layer's step on float32 patterns (the batched matmul over heads) against the float64 row of
    the explicit matrix ``diag(r) + Σ_h diag(q) A^h diag(c^h)``: each float32 sum of ``n`` products is
    within ``n·ε₃₂`` of the exact one, relative to the sum of the absolute terms."""
    heads = 9
    patterns = _causal_patterns(n, heads, seed=n)
    gen = torch.Generator().manual_seed(2)
    row = torch.rand(n, generator=gen, dtype=torch.float64) * 1e30  # beyond float32: rescaled inside
    key_scale = torch.rand(heads, n, generator=gen, dtype=torch.float64) + 0.5
    query = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    residual = torch.rand(n, generator=gen, dtype=torch.float64)
    got = paths.factored_step(row, patterns, key_scale, residual, query_scale=query)
    edges = query[None, :, None] * patterns.double() * key_scale[:, None, :]  # [head, query, key]
    expected = row * residual + row @ edges.sum(0)
    scale = row * residual + (row * query) @ (patterns.double() * key_scale[:, None, :]).sum(0)
    assert (got - expected).abs().max() <= n * torch.finfo(torch.float32).eps * scale.abs().max()
    assert torch.isfinite(got).all()
