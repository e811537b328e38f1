"""Path-sum variants: which layered graph a sensitivity bound sums over, and what it guarantees.

Every variant is a layered graph over positions (DESIGN §3). Layer ``l`` has one residual edge per
position and one edge per head and causal pair ``k → j``::

    M^(l) = diag(s^(l)) · (diag(r^(l)) + Σ_h E^(l,h)),     bound_n = o_n · [M^(L-1) ⋯ M^(0)]_{n,·}

with residual weights ``r``, head edges ``E``, an optional per-position left scale ``s`` and an
output factor ``o``. :mod:`lens_squash.algebra.paths` does the algebra: products, rows, flows, top paths.

| variant | edges ``E^(l,h)_{jk}`` | residual ``r_j`` | left ``s_j`` | what it is |
|---|---|---|---|---|
| ``paper`` | ``w_h A^(l,h)_{jk} / β1`` | 1 | — | Theorem B.5 with the user's β's and σ_ψ (``o = C``) |
| ``rollout`` | ``½ w_h A^(l,h)_{jk}`` | ½ | — | Prop. B.8's setting; attention rollout (Abnar & Zuidema) |
| ``certified`` | ``q_j A^(l,h)_{jk} ‖M_in W_OV^h M_out‖₂ / s_in,k`` | 1 (parallel: ``1 + g_j``) | ``1 + g_j`` (parallel: —) | a guaranteed upper bound on ``‖∂y_n/∂v_i‖₂`` of the frozen model |
| ``value`` | ``A^(l,h)_{jk} ‖v_k W_O^h‖`` | ``‖x_j^(l)‖`` | — | estimate: the norm of what each edge carries (Kobayashi et al. 2020) |
| ``value_rownorm`` | ``value``, each row scaled to sum 1 | | — | estimate: each edge's share of what reaches ``j`` |
| ``certified_rownorm`` | ``certified``'s ``r + ΣE``, rows scaled to sum 1 | | — | estimate: the certified graph's shares, comparable across layers |

``w_h`` are convex head weights (the mean by default). "Frozen" means patterns, norm scales and MoE
router weights held at their traced values, the paper's simplifying assumptions made exact; ``o_n``
for ``certified`` is ``‖P diag(γ_f)‖₂ / s_f,n`` from the final norm. In ``certified``, ``M_in`` and
``s_in`` are the pre-attention norm's frozen map and scale (absent for OLMo-2's output norms), ``M_out``
and ``q_j = 1/s_out,j`` those of the norms on attention's output (Gemma-2's ``ln1_post``, OLMo-2's
``ln1``), and ``g_j = ‖J_MLP‖_F`` with every frozen norm around the MLP (:mod:`lens_squash.algebra.blocks`
lists the block shapes; :func:`_certified` has the proof sketch). Only ``paper`` (under the theorem's assumptions) and
``certified`` are bounds; the rest are estimates of where sensitivity lives. Each builder is declared
where it is defined, ``@variant(name, guarantee=..., needs=..., default=...)``
(:func:`lens_squash.algebra.variant_registry.variant`): a new variant is one decorated builder.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..core.display import compact_repr
from ..core.results import Record, Result, heavy
from . import paths
from .attention import check_attention, head_weights, ov_norms
from .blocks import block_shape
from .model_facts import facts_of
from .variant_registry import VARIANTS, get_variant, variant

__all__ = ["VARIANTS", "PathBound", "PathGraph", "bound_from_row", "build_graph", "final_norm_gain", "path_bound"]


@dataclass(frozen=True, eq=False)
class PathGraph(Record):
    """One variant's layered graph (see the module docstring for the meaning of each field).

    Head edges are stored factored, ``E^(l,h)_{jk} = q^(l)_j · A^(l,h)_{jk} · c^(l,h)_k``, with the
    traced patterns ``A`` shared, not copied: the row of an n = 2048 prompt needs no extra
    ``[layer, head, pos, pos]`` tensor. :attr:`edges` materialises ``E`` for flows and top paths.
    """

    variant: str
    residual: Float[Tensor, "layer pos"]
    #: the traced patterns, shared; ``None`` when the trace streamed them (long prompts): then only the
    #: rows :func:`lens_squash.edge.stream.stream_bounds` swept are known, not flows or top paths
    patterns: Float[Tensor, "layer head query_pos key_pos"] | None = heavy()
    key_scale: Float[Tensor, "layer head key_pos"]
    left_scale: Float[Tensor, "layer pos"] | None
    output_scale: Float[Tensor, "pos"]
    guarantee: str | None
    query_scale: Float[Tensor, "layer pos"] | None = None
    #: ``c^(l)`` when every head's key scale is the same constant times the uniform ``w_h``: the row then
    #: reads the head-mean pattern ``Σ_h w_h A^(l,h)`` (L·n² numbers instead of L·H·n²)
    head_factor: Float[Tensor, "layer"] | None = None
    #: the trace's head-mean patterns, shared (``None`` when streamed or when heads are weighted)
    mean_patterns: Float[Tensor, "layer query_pos key_pos"] | None = heavy(default=None)
    #: rows still to be scaled to sum 1, layer by layer as a sweep meets each layer's patterns
    normalise_rows: bool = False

    __repr__ = compact_repr

    @property
    def n_layers(self) -> int:
        return self.residual.shape[0]

    def _patterns(self) -> Tensor:
        if self.patterns is None:
            raise ValueError(
                f"the {self.variant} graph was swept from a trace that streamed its patterns (a long prompt), so "
                "its edges, flows and paths are not kept; trace with keep_patterns=True (memory grows as "
                "layer × head × pos²) for those, or use the bound row"
            )
        if self.normalise_rows:
            raise ValueError(f"the {self.variant} graph's rows are not normalised yet; call row_normalised() on it")
        return self.patterns

    @property
    def edges(self) -> Float[Tensor, "layer head query_pos key_pos"]:
        edges = self._patterns().double() * self.key_scale.double()[:, :, None, :]
        return edges if self.query_scale is None else edges * self.query_scale.double()[:, None, :, None]

    def matrices(self) -> Float[Tensor, "layer query_pos key_pos"]:
        return paths.layer_matrices(self.residual, self.edges, left_scale=self.left_scale)

    def _uses_mean(self) -> bool:
        return self.head_factor is not None and self.query_scale is None

    def row(self, target_pos: int, *, n_layers: int | None = None) -> Float[Tensor, "pos"]:
        """The target's row; ``n_layers`` truncates the graph to its first layers (no output factor)."""
        depth = slice(None) if n_layers is None else slice(0, n_layers)
        if self._uses_mean() and self.mean_patterns is not None:
            patterns = self.mean_patterns[depth, None]
            key_scale = self.head_factor.double()[depth, None, None].expand(patterns.shape[0], 1, patterns.shape[-1])
        else:
            patterns, key_scale = self._patterns()[depth], self.key_scale[depth]
        row = paths.factored_row(
            self.residual[depth],
            patterns,
            key_scale,
            target_pos,
            query_scale=None if self.query_scale is None else self.query_scale[depth],
            left_scale=None if self.left_scale is None else self.left_scale[depth],
        )
        return row if n_layers is not None else self.output_scale[target_pos].double() * row

    def step(
        self,
        row: Float[Tensor, "query_pos"],
        layer: int,
        patterns: Float[Tensor, "head query_pos key_pos"],
        mean: Float[Tensor, "query_pos key_pos"] | None = None,
        *,
        totals: Float[Tensor, "query_pos"] | None = None,
    ) -> Float[Tensor, "key_pos"]:
        """One layer of :meth:`row` from that layer's patterns (and head mean), as a sweep meets them:
        the same arithmetic as the whole stack, so the same row. ``totals`` (:meth:`layer_totals`)
        normalises this layer's rows on the way, as :meth:`row_normalised` does for the whole graph."""
        residual = self.residual[layer]
        query = None if self.query_scale is None else self.query_scale[layer]
        left = None if self.left_scale is None else self.left_scale[layer]
        if totals is not None:
            totals = totals.clamp_min(torch.finfo(torch.float64).tiny)
            query = 1.0 / totals if query is None else query.double() / totals
            residual, left = residual.double() / totals, None
        if self._uses_mean() and mean is not None and totals is None:
            patterns, key_scale = mean[None], self.head_factor.double()[layer].expand(1, mean.shape[-1])
        else:
            key_scale = self.key_scale[layer]
        return paths.factored_step(row, patterns, key_scale, residual, query_scale=query, left_scale=left)

    def layer_totals(self, layer: int, patterns: Float[Tensor, "head query_pos key_pos"]) -> Float[Tensor, "pos"]:
        """``r_j + Σ_h Σ_k E^(l,h)_{jk}`` of one layer (without the left scale). Accumulated in float64,
        one head at a time: a float32 sum over ``H·n`` terms is off by ~4e-6 at n = 700, and the
        rows of ``*_rownorm`` divide by these totals at every layer."""
        key_scale = self.key_scale[layer].double()[:, :, None]
        n_heads, n_query, n_key = patterns.shape
        heads = torch.zeros(n_query, dtype=torch.float64, device=patterns.device)
        # float64 a few rows of every head at a time (a cache-sized copy, not 8·n² bytes per head); a
        # block whose keys past its last row are all exactly 0 (a causal layer) reads only the others:
        # the same products, the zeros' left out (equal to a whole float64 copy to ~1e-15)
        rows = max(1, 2**21 // (8 * n_heads * max(n_key, 1)))
        for start in range(0, n_query, rows):
            stop = min(n_query, start + rows)
            keys = stop if stop < n_key and not patterns[:, start:stop, stop:].any() else n_key
            heads[start:stop] += (patterns[:, start:stop, :keys].double() @ key_scale[:, :keys]).sum(0)[:, 0]
        heads = heads if self.query_scale is None else heads * self.query_scale[layer].double()
        return self.residual[layer].double() + heads

    def row_sums(self) -> Float[Tensor, "layer pos"]:
        """``r_j + Σ_h Σ_k E^(l,h)_{jk}`` per layer (without the left scale)."""
        patterns = self._patterns()
        return torch.stack([self.layer_totals(layer, patterns[layer]) for layer in range(self.n_layers)])

    def row_normalised(self, totals: Float[Tensor, "layer pos"] | None = None) -> PathGraph:
        """Each layer's rows scaled to sum to 1: ``D^{-1}(diag(r) + ΣE)`` (left scale dropped).

        ``totals`` are the row sums when a sweep has computed them (:meth:`layer_totals`); without
        them and without patterns the graph is marked to be normalised layer by layer in the sweep.
        """
        name = self.variant if self.normalise_rows else f"{self.variant}_rownorm"
        if totals is None and self.patterns is None:
            return replace(self, variant=name, normalise_rows=True, head_factor=None, mean_patterns=None)
        totals = (self.row_sums() if totals is None else totals).clamp_min(torch.finfo(torch.float64).tiny)
        query = 1.0 / totals if self.query_scale is None else self.query_scale.double() / totals
        return replace(
            self,
            head_factor=None,  # the head-mean shortcut describes the unnormalised graph only
            mean_patterns=None,
            normalise_rows=False,
            variant=name,
            residual=self.residual.double() / totals,
            query_scale=query,
            left_scale=None,
            output_scale=torch.ones_like(self.output_scale),
            guarantee=None,
        )


def final_norm_gain(model) -> float:
    """``‖P diag(γ_f)‖₂``: the final norm's gain once its scale is frozen (1 without a final norm), for a
    model or its :class:`~lens_squash.algebra.model_facts.ModelFacts`.

    Whether it centres is read from the module, not the config: ``final_rms`` gives LayerNorm blocks
    an RMSNorm at the end, and centring there would understate the gain (``‖P D‖₂ ≤ ‖D‖₂``).
    """
    final = facts_of(model).final  # the effective gain: Gemma's 1 + w, read by lens_squash.edge.adapter
    if final is None or final.gain is None:
        return 1.0
    gain = final.gain.double()
    if final.centred:
        d = gain.shape[0]
        centring = torch.eye(d, dtype=torch.float64) - 1.0 / d
        return float(torch.linalg.matrix_norm(centring * gain[None, :], ord=2))
    return float(gain.abs().max())


def _head_mean(trace, head_scores, per_layer: Tensor) -> dict[str, Tensor | None]:
    """The head-mean shortcut's fields when the heads are weighted uniformly: the per-layer factor and
    the trace's head-mean patterns (``None`` when the trace streamed them)."""
    if head_scores is not None:
        return {}
    return {"head_factor": per_layer.to(torch.float64), "mean_patterns": trace.mean_patterns}


#: what a proxy's numbers estimate (its ``statement``)
_SHARES = "shares of where sensitivity lives, with no inequality to the Jacobian"
_CERTIFIED_NEEDS = frozenset({"weights", "mlp_gains", "norm_scales"})


@variant("paper", guarantee="proxy", default=True, summary="Theorem B.5's path sum with the user's β's and σ_ψ",
         statement="a bound only where Theorem B.5's Lipschitz and normalisation assumptions hold, which "
         "lens_squash does not check; on real models read it as a path-sum proxy")  # fmt: skip
def _paper(trace, model=None, *, beta1=1.0, beta2=1.0, beta3=1.0, sigma_psi=1.0, head_scores=None) -> PathGraph:
    n_layers, n_heads, n = trace.n_layers, trace.n_heads, trace.n_tokens
    beta1 = torch.as_tensor(beta1, dtype=torch.float64).expand(n_layers)
    w = head_weights(n_layers, n_heads, head_scores)
    key_scale = (w / beta1[:, None])[:, :, None].expand(n_layers, n_heads, n)
    constant = paths.paper_constant(n_layers, beta2=beta2, beta3=beta3, sigma_psi=sigma_psi)
    return PathGraph(
        "paper",
        torch.ones(n_layers, n, dtype=torch.float64),
        trace.patterns,
        key_scale,
        None,
        torch.full((n,), float(constant), dtype=torch.float64),
        "Theorem B.5's bound, under its Lipschitz and normalisation assumptions (β's, σ_ψ)",
        **_head_mean(trace, head_scores, 1.0 / beta1),
    )


@variant("rollout", guarantee="proxy", default=True, statement=_SHARES,
         summary="attention rollout (Abnar & Zuidema), Prop. B.8's setting")  # fmt: skip
def _rollout(trace, model=None, *, head_scores=None) -> PathGraph:
    n_layers, n_heads, n = trace.n_layers, trace.n_heads, trace.n_tokens
    w = head_weights(n_layers, n_heads, head_scores)
    key_scale = (0.5 * w)[:, :, None].expand(n_layers, n_heads, n)
    return PathGraph(
        "rollout",
        torch.full((n_layers, n), 0.5, dtype=torch.float64),
        trace.patterns,
        key_scale,
        None,
        torch.ones(n, dtype=torch.float64),
        None,
        **_head_mean(trace, head_scores, torch.full((n_layers,), 0.5, dtype=torch.float64)),
    )


def _scale(trace, site: str) -> Tensor:
    """The traced ``blocks.{l}.{site}.hook_scale`` per layer and position (float64)."""
    value = {
        "ln1": trace.ln1_scale,
        "ln2": trace.ln2_scale,
        "ln1_post": trace.ln1_post_scale,
        "ln2_post": trace.ln2_post_scale,
    }[site]
    if value is None:
        raise ValueError(
            f"the certified variant needs blocks.{{l}}.{site}.hook_scale, which this trace lacks; trace a "
            "HookedTransformer, or a TransformerBridge in compatibility mode"
        )
    return value.double()


@variant("certified", guarantee="bound", default=True, needs=_CERTIFIED_NEEDS, supports=block_shape,
         summary="frozen-model path sum with every norm and MLP gain",
         statement="an upper bound on ‖∂y_n/∂v_i‖₂ of the model with attention patterns and norm scales frozen")  # fmt: skip
def _certified(trace, model=None) -> PathGraph:
    """The certified graph for the model's block shape (:mod:`lens_squash.algebra.blocks`).

    Proof sketch (the inequalities are in :mod:`lens_squash.edge.lipschitz`): with patterns and norm scales
    frozen, layer ``l`` maps ``x`` to ``x'`` with ``‖∂x'_j/∂x_k‖₂ ≤ left_j (r_j δ_jk + q_j Σ_h A^h_jk c_hk)``:

    * ``c_hk = ‖M_in W_OV^h M_out‖₂ / s_in,k`` — the pre-attention norm's scale at the key (absent when
      attention reads the raw stream, OLMo-2);
    * ``q_j = Π 1 / s_out,j`` — the norms on what attention writes (Gemma-2's ``ln1_post``, OLMo-2's
      ``ln1``) scale at the query;
    * sequential blocks: ``r = 1``, ``left = 1 + g`` with ``g_j = ‖J_MLP‖_F`` (all its frozen norms
      included) — the MLP acts on ``x'_j`` alone and ``‖I + J‖₂ ≤ 1 + ‖J‖_F``;
    * parallel blocks (GPT-J, NeoX, Pythia, Phi): ``r = 1 + g``, no left scale — the MLP reads
      ``x_j`` beside attention, so its Jacobian adds to the diagonal term only.

    The chain rule makes ``∂y_n/∂v_i`` a sum over causal paths of products of these blocks; the
    triangle inequality and sub-multiplicativity bound it by the path sum of the products of the
    bounds, i.e. the row of ``M^(L-1) ⋯ M^(0)``, times the final norm's ``‖P diag(γ_f)‖₂ / s_f,n``.
    The patterns are used as they are, so sub-stochastic rows (learned sinks) need nothing more.
    """
    if model is None:
        raise ValueError("the certified variant needs the model's weights: path_bound(trace, 'certified', model=model)")
    model = facts_of(model)  # read once (lens_squash.edge.adapter); the algebra never reads the model itself
    shape = block_shape(model)  # refuses (UnsupportedModelError) what the bound does not model
    if trace.mlp_gain is None and not shape.attn_only:
        raise ValueError("the certified variant needs MLP gains: trace(model, prompt, lipschitz=True)")
    n_layers, n = trace.n_layers, trace.n_tokens
    ones = torch.ones(n_layers, n, dtype=torch.float64)
    key_scale = ov_norms(model)[:, :, None].expand(n_layers, -1, n)
    if shape.attn_in is not None:
        key_scale = key_scale / _scale(trace, shape.attn_in)[:, None, :]
    query = None
    for site in shape.attn_out:
        query = (ones if query is None else query) / _scale(trace, site)
    gain = None if shape.attn_only else 1.0 + trace.mlp_gain.double()
    residual, left = (gain, None) if shape.parallel else (ones, gain)
    final = trace.final_scale.double() if trace.final_scale is not None else torch.ones(n, dtype=torch.float64)
    return PathGraph(
        "certified",
        ones if residual is None else residual,
        trace.patterns,
        key_scale,
        left,
        final_norm_gain(model) / final,
        "an upper bound on ‖∂y_n/∂v_i‖₂ of the model with attention patterns and norm scales frozen",
        query_scale=query,
    )


@variant("value", guarantee="proxy", needs={"value_norms", "residual"}, statement=_SHARES,
         summary="‖v W_O‖-weighted attention (Kobayashi et al. 2020)")  # fmt: skip
def _value(trace, model=None) -> PathGraph:
    if trace.value_norms is None:
        raise ValueError("the value variant needs ‖v W_O‖ per head; trace a model that exposes attn.hook_v and W_O")
    n_layers, n = trace.n_layers, trace.n_tokens
    residual = trace.resid_norms[:n_layers].double()
    return PathGraph(
        "value", residual, trace.patterns, trace.value_norms.double(), None, torch.ones(n, dtype=torch.float64), None
    )


@variant("value_rownorm", guarantee="proxy", default=True, needs={"value_norms", "residual"},
         summary="value, each row scaled to sum 1", statement=_SHARES)  # fmt: skip
def _value_rownorm(trace, model=None) -> PathGraph:
    return _value(trace, model).row_normalised()


@variant("certified_rownorm", guarantee="proxy", needs=_CERTIFIED_NEEDS, supports=block_shape,
         summary="certified's graph, each row scaled to sum 1", statement=_SHARES)  # fmt: skip
def _certified_rownorm(trace, model=None) -> PathGraph:
    return _certified(trace, model).row_normalised()


def build_graph(trace, variant: str = "paper", *, model=None, **params) -> PathGraph:
    """The layered graph of ``variant`` for a traced prompt (see :data:`VARIANTS`).

    A trace that streamed its patterns gives a graph without them (``patterns=None``): its row
    comes from :func:`lens_squash.edge.stream.stream_bounds`, which recomputes each layer's patterns.
    """
    spec = get_variant(variant)  # refuses an unknown name, listing the registered ones
    # a trace records its patterns' defects and the tolerance of its dtype once (its AttentionCheck)
    if trace.attention_check is None:  # a hand-built trace: scan its patterns
        check_attention(trace.patterns, n_keys=trace.n_tokens)
    else:
        trace.attention_check.verify(trace.patterns)
    return spec.build(trace, model, **params)


@dataclass(frozen=True, eq=False)
class PathBound(Result):
    """Per input position, a variant's path-sum sensitivity of the target position."""

    variant: str
    target_pos: int
    bound: Float[Tensor, "pos"]
    str_tokens: tuple[str, ...]
    graph: PathGraph
    guarantee: str | None
    matrix: Float[Tensor, "query_pos key_pos"] | None = heavy(default=None)
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def constant(self) -> float:
        """The output factor of the target's row: Theorem B.5's ``C`` for ``paper``, the final
        norm's frozen gain for ``certified``, 1 for the estimates."""
        return float(self.graph.output_scale[self.target_pos])

    @property
    def guarantee_kind(self) -> str:
        """``"bound"`` or ``"proxy"``: what the registry says this variant's numbers promise."""
        return get_variant(self.variant).guarantee

    @property
    def first_token_share(self) -> float:
        """Fraction of the bound's mass on position 0 (Prop. B.8's limit puts all of it there)."""
        return float(self.bound[0] / self.bound.sum())

    def flows(self, source: int | None = None):
        flows = paths.flow_decomposition(
            self.graph.residual,
            self.graph.edges,
            self.target_pos,
            source=source,
            left_scale=self.graph.left_scale,
            output_scale=self.constant,
        )
        return replace(flows, provenance={**self.provenance, "source": source})  # the bound's own provenance

    def top_paths(self, k: int = 10, source: int | None = None):
        return paths.top_paths(
            self.graph.residual,
            self.graph.edges,
            self.target_pos,
            k=k,
            source=source,
            left_scale=self.graph.left_scale,
            output_scale=self.constant,
        )

    __repr__ = compact_repr

    def _repr_html_(self) -> str:
        top = torch.topk(self.bound, k=min(5, self.bound.numel()))
        cells = ", ".join(
            f"{html.escape(repr(self.str_tokens[i]))}@{i}: {v:.3g}"
            for v, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
        )
        return (
            f"<b>PathBound</b> <code>{html.escape(self.variant)}</code> → position {self.target_pos}<br>"
            f"guarantee: {html.escape(self.guarantee or 'none (an estimate)')}<br>"
            f"first-token share: {self.first_token_share:.4f}<br>top positions: {cells}"
        )


def path_bound(
    trace, variant: str = "paper", *, model=None, target_pos: int = -1, full_matrix: bool = False, **params
) -> PathBound:
    """The path-sum bound of ``variant`` for ``target_pos`` (default: the last token), per input position.

    The row costs ``L`` vector–matrix products (O(L·n²)); ``full_matrix=True`` also returns the whole
    ``n×n`` product (O(L·n³)). A trace that streamed its patterns (a long prompt) has no stack to
    read: :func:`lens_squash.edge.stream.stream_bounds` sweeps its rows with the model.
    """
    if trace.patterns is None:
        raise ValueError(
            f"this trace of {trace.n_tokens} tokens streamed its attention patterns instead of keeping "
            "them; compute its bounds with lens_squash.edge.stream.stream_bounds(model, trace, variants), "
            "or trace with keep_patterns=True (memory grows as layer × head × pos²)"
        )
    graph = build_graph(trace, variant, model=model, **params)
    n = graph.residual.shape[-1]
    if not -n <= target_pos < n:
        raise ValueError(f"target position {target_pos} is out of range for {n} tokens; use 0..{n - 1} or -1")
    target_pos = target_pos % n
    matrix = None
    if full_matrix:
        matrix = graph.output_scale[:, None] * paths.stack_product(graph.matrices())
    return bound_from_row(trace, graph, target_pos, graph.row(target_pos), matrix=matrix, params=params)


def bound_from_row(trace, graph: PathGraph, target_pos: int, row: Tensor, *, matrix=None, params=None) -> PathBound:
    """The :class:`PathBound` of a graph whose row for ``target_pos`` is known (output factor included)."""
    params = params or {}
    return PathBound(
        variant=graph.variant,
        target_pos=target_pos,
        bound=row,
        str_tokens=trace.str_tokens,
        graph=graph,
        guarantee=graph.guarantee,
        matrix=matrix,
        provenance={**trace.provenance, "variant": graph.variant, "params": {k: str(v) for k, v in params.items()}},
    )
