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
