"""The connected-path figure of a bound's graph, as the report's paths section draws it."""

from __future__ import annotations

import pytest
import torch

from lens_squash.algebra.flow_paths import graph_paths
from lens_squash.core.tokens import token_label
from lens_squash.views.flow_views import path_figure
from lens_squash.views.style import caption_of


@pytest.fixture(scope="module")
def rollout_paths(tiny):
    from lens_squash.algebra.variants import path_bound
    from lens_squash.edge.trace import trace

    traced = trace(tiny, torch.tensor([5, 9, 2, 7, 7, 3, 1, 8]))
    bound = path_bound(traced, "rollout")
    return graph_paths(bound.graph, bound.target_pos, k=4, str_tokens=traced.str_tokens)


def test_every_hop_of_every_drawn_path_is_drawn_and_cross_position_hops_stand_out(rollout_paths):
    fig = path_figure(rollout_paths, min_share=0.05)
    selected = rollout_paths.selected(min_share=0.05)
    assert selected
    edges = {(t.meta["layer"], t.meta["hop"], t.meta["key"], t.meta["query"]): t for t in fig.data if t.meta}
    labels = [token_label(t, max_len=20) for t in rollout_paths.str_tokens]
    for path in selected:
        for layer, hop in enumerate(path.hops):
            key, query = path.positions[layer], path.positions[layer + 1]
            trace = edges[(layer, hop, key, query)]  # no hop of a drawn path is missing
            assert abs(trace.meta["share"] - path.shares[layer]) <= 1e-12 * max(1.0, path.shares[layer])
            # the hover names the layer, the head (or residual / MLP), both tokens and the share
            assert f"layer {layer}" in trace.hovertemplate and f"query {query} {labels[query]}" in trace.hovertemplate
            assert f"key {key} {labels[key]}" in trace.hovertemplate and "share" in trace.hovertemplate
            if hop not in ("residual", "mlp"):
                assert f"head {hop}" in trace.hovertemplate
            if key != query:
                assert trace.line.width >= 2.0  # cross-position hops are never hairlines
                assert trace.x[0] != trace.x[-1]  # and they visibly move between positions
    assert any(k != q for (_, _, k, q) in edges)  # the graph's paths do cross positions


def test_legend_has_one_entry_per_layer_and_head_in_layer_order(rollout_paths):
    fig = path_figure(rollout_paths, min_share=0.0)
    entries = [t for t in fig.data if t.showlegend]
    heads = [t for t in entries if t.name.startswith("layer ")]
    keys = [tuple(int(part) for part in t.name.removeprefix("layer ").split(" head ")) for t in heads]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert [t.legendrank for t in heads] == sorted(t.legendrank for t in heads)
    for t in fig.data:  # a head's hops toggle together, and their legend entry says which layer
        if t.meta and t.meta["hop"] not in ("residual", "mlp"):
            assert t.legendgroup == f"layer {t.meta['layer']} head {t.meta['hop']}"


def test_the_figure_explains_itself(rollout_paths):
    fig = path_figure(rollout_paths)
    caption = caption_of(fig)
    assert "connected paths" in caption and "hover" in caption
    assert fig.layout.xaxis.title.text and fig.layout.yaxis.title.text
    assert str(rollout_paths.target_pos) in fig.layout.title.text
