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
``certified`` are bounds; the rest are estimates of where sensitivity lives.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from . import paths
from .attention import check_attention, head_weights, ov_norms
from .blocks import block_shape, norm_gain
from ..core.display import compact_repr

__all__ = ["VARIANTS", "PathBound", "PathGraph", "build_graph", "final_norm_gain", "path_bound"]


@dataclass(frozen=True, eq=False)
class PathGraph:
    """One variant's layered graph (see the module docstring for the meaning of each field).

    Head edges are stored factored, ``E^(l,h)_{jk} = q^(l)_j · A^(l,h)_{jk} · c^(l,h)_k``, with the
    traced patterns ``A`` shared, not copied: the row of an n = 2048 prompt needs no extra
    ``[layer, head, pos, pos]`` tensor. :attr:`edges` materialises ``E`` for flows and top paths.
    """

    variant: str
    residual: Float[Tensor, "layer pos"]
    patterns: Float[Tensor, "layer head query_pos key_pos"]
    key_scale: Float[Tensor, "layer head key_pos"]
    left_scale: Float[Tensor, "layer pos"] | None
    output_scale: Float[Tensor, "pos"]
    guarantee: str | None
    query_scale: Float[Tensor, "layer pos"] | None = None
    #: ``(Σ_h w_h A^(l,h), c^(l))`` when every head's key scale is the same constant times ``w_h``:
    #: the row then reads the head-aggregated stack (L·n² numbers instead of L·H·n²)
    aggregated: tuple[Tensor, Tensor] | None = None

    @property
    def edges(self) -> Float[Tensor, "layer head query_pos key_pos"]:
        edges = self.patterns.double() * self.key_scale.double()[:, :, None, :]
        return edges if self.query_scale is None else edges * self.query_scale.double()[:, None, :, None]

    def matrices(self) -> Float[Tensor, "layer query_pos key_pos"]:
        return paths.layer_matrices(self.residual, self.edges, left_scale=self.left_scale)

    def row(self, target: int, *, n_layers: int | None = None) -> Float[Tensor, "pos"]:
        """The target's row; ``n_layers`` truncates the graph to its first layers (no output factor)."""
        depth = slice(None) if n_layers is None else slice(0, n_layers)
        patterns, key_scale = self.patterns[depth], self.key_scale[depth]
        if self.aggregated is not None and self.query_scale is None:
            mean, scale = self.aggregated
            patterns = mean[depth, None]
            key_scale = scale[depth, None, None].expand(patterns.shape[0], 1, patterns.shape[-1])
        row = paths.factored_row(
            self.residual[depth], patterns, key_scale, target,
            query_scale=None if self.query_scale is None else self.query_scale[depth],
            left_scale=None if self.left_scale is None else self.left_scale[depth],
        )
        return row if n_layers is not None else self.output_scale[target].double() * row

    def row_sums(self) -> Float[Tensor, "layer pos"]:
        """``r_j + Σ_h Σ_k E^(l,h)_{jk}`` per layer (without the left scale)."""
        heads = torch.einsum("lhjk,lhk->lj", self.patterns, self.key_scale.to(self.patterns.dtype)).double()
        heads = heads if self.query_scale is None else heads * self.query_scale.double()
        return self.residual.double() + heads

    def row_normalised(self) -> PathGraph:
        """Each layer's rows scaled to sum to 1: ``D^{-1}(diag(r) + ΣE)`` (left scale dropped)."""
        totals = self.row_sums().clamp_min(torch.finfo(torch.float64).tiny)
        query = 1.0 / totals if self.query_scale is None else self.query_scale.double() / totals
        return replace(
            self,
            aggregated=None,  # the head-mean shortcut describes the unnormalised graph only
            variant=f"{self.variant}_rownorm",
            residual=self.residual.double() / totals,
            query_scale=query,
            left_scale=None,
            output_scale=torch.ones_like(self.output_scale),
            guarantee=None,
        )


def final_norm_gain(model) -> float:
    """``‖P diag(γ_f)‖₂``: the final norm's gain once its scale is frozen (1 without a final norm).

    Whether it centres is read from the module, not the config: ``final_rms`` gives LayerNorm blocks
    an RMSNorm at the end, and centring there would understate the gain (``‖P D‖₂ ≤ ‖D‖₂``).
    """
    ln = getattr(model, "ln_final", None)
    if ln is None or isinstance(ln, torch.nn.Identity):
        return 1.0
    gain, centred = norm_gain(ln)
    if gain is None:
        return 1.0
    if centred:
        d = gain.shape[0]
        centring = torch.eye(d, dtype=torch.float64) - 1.0 / d
        return float(torch.linalg.matrix_norm(centring * gain[None, :], ord=2))
    return float(gain.abs().max())


def _head_mean(trace, head_scores, per_layer: Tensor) -> tuple[Tensor, Tensor] | None:
    """The trace's head-mean patterns with their per-layer factor, when the heads are weighted uniformly."""
    if head_scores is not None or trace.mean_patterns is None:
        return None
    return trace.mean_patterns, per_layer.to(torch.float64)


def _paper(trace, model=None, *, beta1=1.0, beta2=1.0, beta3=1.0, sigma_psi=1.0, head_scores=None) -> PathGraph:
    n_layers, n_heads, n = trace.patterns.shape[:3]
    beta1 = torch.as_tensor(beta1, dtype=torch.float64).expand(n_layers)
    w = head_weights(n_layers, n_heads, head_scores)
    key_scale = (w / beta1[:, None])[:, :, None].expand(n_layers, n_heads, n)
    constant = paths.paper_constant(n_layers, beta2=beta2, beta3=beta3, sigma_psi=sigma_psi)
    return PathGraph(
        "paper", torch.ones(n_layers, n, dtype=torch.float64), trace.patterns, key_scale, None,
        torch.full((n,), float(constant), dtype=torch.float64),
        "Theorem B.5's bound, under its Lipschitz and normalisation assumptions (β's, σ_ψ)",
        aggregated=_head_mean(trace, head_scores, 1.0 / beta1),
    )


def _rollout(trace, model=None, *, head_scores=None) -> PathGraph:
    n_layers, n_heads, n = trace.patterns.shape[:3]
    w = head_weights(n_layers, n_heads, head_scores)
    key_scale = (0.5 * w)[:, :, None].expand(n_layers, n_heads, n)
    return PathGraph(
        "rollout", torch.full((n_layers, n), 0.5, dtype=torch.float64), trace.patterns, key_scale, None,
        torch.ones(n, dtype=torch.float64), None,
        aggregated=_head_mean(trace, head_scores, torch.full((n_layers,), 0.5, dtype=torch.float64)),
    )


def _scale(trace, site: str) -> Tensor:
    """The traced ``blocks.{l}.{site}.hook_scale`` per layer and position (float64)."""
    field = {"ln1": "ln1_scale", "ln2": "ln2_scale", "ln1_post": "ln1_post_scale", "ln2_post": "ln2_post_scale"}[site]
    value = getattr(trace, field)
    if value is None:
        raise ValueError(
            f"the certified variant needs blocks.{{l}}.{site}.hook_scale, which this trace lacks; trace a "
            "HookedTransformer, or a TransformerBridge in compatibility mode"
        )
    return value.double()


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
    shape = block_shape(model)  # refuses (UnsupportedModelError) what the bound does not model
    if trace.mlp_gain is None and not shape.attn_only:
        raise ValueError("the certified variant needs MLP gains: trace(model, prompt, lipschitz=True)")
    n_layers, _, n = trace.patterns.shape[:3]
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
        "certified", ones if residual is None else residual, trace.patterns, key_scale, left,
        final_norm_gain(model) / final,
        "an upper bound on ‖∂y_n/∂v_i‖₂ of the model with attention patterns and norm scales frozen",
        query_scale=query,
    )


def _value(trace, model=None) -> PathGraph:
    if trace.value_norms is None:
        raise ValueError("the value variant needs ‖v W_O‖ per head; trace a model that exposes attn.hook_v and W_O")
    n_layers, _, n = trace.patterns.shape[:3]
    residual = trace.resid_norms[:n_layers].double()
    return PathGraph("value", residual, trace.patterns, trace.value_norms.double(), None,
                     torch.ones(n, dtype=torch.float64), None)


#: variant name -> builder(trace, model, **params) -> PathGraph
VARIANTS: dict[str, Callable[..., PathGraph]] = {
    "paper": _paper,
    "rollout": _rollout,
    "certified": _certified,
    "value": _value,
    "value_rownorm": lambda trace, model=None: _value(trace, model).row_normalised(),
    "certified_rownorm": lambda trace, model=None: _certified(trace, model).row_normalised(),
}


def build_graph(trace, variant: str = "paper", *, model=None, **params) -> PathGraph:
    """The layered graph of ``variant`` for a traced prompt (see :data:`VARIANTS`)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {sorted(VARIANTS)}")
    # a trace records its patterns' defects and the tolerance of its dtype once (see trace.py)
    check = trace.metadata.get("attention_check", {})
    check_attention(
        trace.patterns, defects=trace.metadata.get("attention_defects"), atol=check.get("tolerance"),
        dtype=getattr(torch, check["dtype"]) if "dtype" in check else None,
        substochastic=check.get("substochastic", False),
    )
    return VARIANTS[variant](trace, model, **params)


@dataclass(frozen=True, eq=False)
class PathBound:
    """Per input position, a variant's path-sum sensitivity of the target position."""

    variant: str
    target: int
    bound: Float[Tensor, "pos"]
    str_tokens: tuple[str, ...]
    graph: PathGraph
    guarantee: str | None
    matrix: Float[Tensor, "query_pos key_pos"] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def constant(self) -> float:
        """The output factor of the target's row: Theorem B.5's ``C`` for ``paper``, the final
        norm's frozen gain for ``certified``, 1 for the estimates."""
        return float(self.graph.output_scale[self.target])

    @property
    def first_token_share(self) -> float:
        """Fraction of the bound's mass on position 0 (Prop. B.8's limit puts all of it there)."""
        return float(self.bound[0] / self.bound.sum())

    def flows(self, source: int | None = None):
        return paths.flow_decomposition(
            self.graph.residual, self.graph.edges, self.target, source=source, left_scale=self.graph.left_scale,
            output_scale=self.constant,
        )

    def top_paths(self, k: int = 10, source: int | None = None):
        return paths.top_paths(
            self.graph.residual, self.graph.edges, self.target, k=k, source=source,
            left_scale=self.graph.left_scale, output_scale=self.constant,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "variant": self.variant, "target": self.target, "guarantee": self.guarantee,
            "constant": self.constant, "bound": self.bound, "first_token_share": self.first_token_share, "metadata": self.metadata,
        }

    __repr__ = compact_repr

    def _repr_html_(self) -> str:
        top = torch.topk(self.bound, k=min(5, self.bound.numel()))
        cells = ", ".join(
            f"{html.escape(repr(self.str_tokens[i]))}@{i}: {v:.3g}" for v, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
        )
        return (
            f"<b>PathBound</b> <code>{html.escape(self.variant)}</code> → position {self.target}<br>"
            f"guarantee: {html.escape(self.guarantee or 'none (an estimate)')}<br>"
            f"first-token share: {self.first_token_share:.4f}<br>top positions: {cells}"
        )


def path_bound(
    trace, variant: str = "paper", *, model=None, target: int = -1, full_matrix: bool = False, **params
) -> PathBound:
    """The path-sum bound of ``variant`` for ``target`` (default: the last token), per input position.

    The row costs ``L`` vector–matrix products (O(L·n²)); ``full_matrix=True`` also returns the whole
    ``n×n`` product (O(L·n³)).
    """
    graph = build_graph(trace, variant, model=model, **params)
    n = graph.residual.shape[-1]
    if not -n <= target < n:
        raise ValueError(f"target position {target} is out of range for {n} tokens; use 0..{n - 1} or -1")
    target = target % n
    matrix = None
    if full_matrix:
        matrix = graph.output_scale[:, None] * paths.stack_product(graph.matrices())
    return PathBound(
        variant=graph.variant, target=target, bound=graph.row(target), str_tokens=trace.str_tokens,
        graph=graph, guarantee=graph.guarantee, matrix=matrix,
        metadata={**trace.metadata, "variant": graph.variant, "params": {k: str(v) for k, v in params.items()}},
    )
