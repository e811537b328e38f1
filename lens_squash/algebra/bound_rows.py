"""Every variant's bound row, as an accumulator fed one layer at a time, last layer first.

The bound row ``o_n · e_nᵀ M^(L-1) ⋯ M^(0)`` of a variant's :class:`~lens_squash.algebra.variants.PathGraph`
is a vector carried down the layers: layer ``l``'s patterns advance it by one step
(:meth:`~lens_squash.algebra.variants.PathGraph.step`, the arithmetic of the whole-stack
:meth:`~lens_squash.algebra.variants.PathGraph.row`, so the same row to the bit). :class:`BoundRows`
holds one row per variant and is fed each layer's ``[head, query_pos, key_pos]`` patterns once, for
all variants together: from a stored stack, or recomputed one layer at a time by
:func:`lens_squash.edge.stream.stream_bounds` when a long prompt's trace did not keep them. Row-normalised
graphs of a trace without patterns scale each layer's rows as they pass (:meth:`PathGraph.layer_totals`).
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from .variants import PathBound, PathGraph, bound_from_row

__all__ = ["BoundRows"]


class BoundRows:
    """The rows of ``graphs`` (name → graph of ``trace``) for ``target_pos``: :meth:`add` each layer from
    the last to the first, then :meth:`finish` gives the :class:`PathBound` of every variant."""

    def __init__(self, trace, graphs: dict[str, PathGraph], target_pos: int):
        n = trace.n_tokens
        if not -n <= target_pos < n:
            raise ValueError(f"target position {target_pos} is out of range for {n} tokens; use 0..{n - 1} or -1")
        self._trace, self._graphs, self.target_pos = trace, dict(graphs), target_pos % n
        self._rows = {name: torch.zeros(n, dtype=torch.float64) for name in self._graphs}
        for row in self._rows.values():
            row[self.target_pos] = 1.0
        self._totals: dict[str, list[Tensor]] = {name: [] for name, g in self._graphs.items() if g.normalise_rows}
        self._next = trace.n_layers - 1

    @property
    def needs_mean(self) -> bool:
        """Whether some graph reads the head-mean pattern (``add``'s ``mean``) instead of every head."""
        return any(g.head_factor is not None and g.query_scale is None for g in self._graphs.values())

    def add(
        self,
        layer: int,
        patterns: Float[Tensor, "head query_pos key_pos"],
        mean: Float[Tensor, "query_pos key_pos"] | None = None,
    ) -> None:
        """Advance every row by layer ``layer`` (the layers come last to first)."""
        if layer != self._next:
            raise ValueError(f"bound rows take the layers last to first: expected layer {self._next}, got {layer}")
        for name, graph in self._graphs.items():
            totals = None
            if graph.normalise_rows:
                totals = graph.layer_totals(layer, patterns)
                self._totals[name].append(totals)
            self._rows[name] = graph.step(self._rows[name], layer, patterns, mean, totals=totals)
        self._next -= 1

    def finish(self) -> dict[str, PathBound]:
        """Each variant's :class:`PathBound` (output factor included), once every layer was added."""
        if self._next != -1:
            raise ValueError(f"bound rows are missing layers {self._next} … 0; add every layer, last to first")
        bounds = {}
        for name, graph in self._graphs.items():
            if graph.normalise_rows:
                graph = graph.row_normalised(totals=torch.stack(self._totals[name][::-1]))
            row = graph.output_scale[self.target_pos].double() * self._rows[name]
            bounds[name] = bound_from_row(self._trace, graph, self.target_pos, row)
        return bounds
