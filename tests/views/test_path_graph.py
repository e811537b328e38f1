"""Connected paths, sink route beside content route: each panel holds exactly its paths' positions, every hop of
every drawn path is an edge, and each path's weight is written under its source."""

from __future__ import annotations

import pytest

from lens_squash.algebra.flow_paths import FlowPath, FlowPaths
from lens_squash.views.path_graph import connected_paths, route_paths


def _paths() -> FlowPaths:
    found = {
        0: [FlowPath(0.5, 0.9, (0, 0, 3), ("residual", 1), (1.0, 0.5))],
        1: [FlowPath(0.2, 0.6, (1, 3, 3), (0, "mlp"), (0.4, 0.5)), FlowPath(0.05, 0.1, (1, 1, 3), (2, 0), (0.5, 0.1))],
        2: [FlowPath(0.1, 1.0, (2, 2, 3), (1, "residual"), (0.1, 1.0))],
    }
    return FlowPaths("rollout", 3, found, ("a", "b", "c", "d"), n_layers=2, n_heads=3)


def test_routes_split_by_source_and_keep_the_heaviest():
    sink, content = route_paths(_paths(), per_route=2)
    assert [p.source for p in sink] == [0]
    assert [p.weight for p in content] == [0.2, 0.1]  # the 0.05 path is the third content path: left out


def test_each_panel_crops_to_its_positions_and_draws_every_hop():
    fig = connected_paths(_paths(), per_route=3)
    sink, content = fig.layout.meta["panels"]
    assert sink["columns"] == [0, 3] and content["columns"] == [1, 2, 3]
    drawn = [t for t in fig.data if t.meta]
    for panel, paths in ((1, route_paths(_paths(), per_route=3)[0]), (2, route_paths(_paths(), per_route=3)[1])):
        hops = {
            (t.meta["layer"], t.meta["hop"], t.meta["key"], t.meta["query"]) for t in drawn if t.meta["panel"] == panel
        }
        wanted = {(l, str(h), p.positions[l], p.positions[l + 1]) for p in paths for l, h in enumerate(p.hops)}
        assert hops == wanted
    labels = [a.text for a in fig.layout.annotations]
    for weight in (0.5, 0.2, 0.1, 0.05):
        assert any(f" {weight:.3g} (" in text for text in labels), (weight, labels)
    assert any(text.startswith("L0·H0") for text in labels)  # the head hop that moves 1 → 3 is named


def test_nothing_to_draw_is_an_error():
    empty = FlowPaths("rollout", 3, {}, ("a", "b", "c", "d"), n_layers=2, n_heads=3)
    with pytest.raises(ValueError, match="no path to draw"):
        connected_paths(empty)
    with pytest.raises(ValueError, match="per_route"):
        connected_paths(_paths(), per_route=0)
