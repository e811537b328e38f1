"""Contribution rollouts: ALTI (Ferrando et al. 2022) and GlobEnc (Modarressi et al. 2022) for pre-norm decoders.

Each layer ``l`` gets a row-stochastic ``n×n`` matrix ``C^(l)`` of token-to-token contributions; the
layers compose like attention rollout, ``row_n = e_nᵀ C^(L-1) ⋯ C^(0)``. They are **proxies** (shares of
where the output's information comes from), never bounds. With ``x_j`` the residual stream entering
the layer, the attention block writes, exactly (patterns as traced)::

    T_jk = q_j Σ_h A^h_jk · u^h_k + δ_jk · x_j,      y_j = Σ_k T_jk = x_j + attn_j − q_j b_O,
    u^h_k = (N1(x_k) W_V^h + b_V^h) W_O^h

* **The input norm** ``N1`` (pre-norm blocks: ``ln1``) is applied to each key's own residual with its
  traced scale ``s_k`` — exactly what the value reads, so ``T`` is the attention block's output split
  by key, with no linearisation. ALTI's linearised LayerNorm is only needed for norms that act on a
  *sum* of terms; here that is
* **the measuring norm** ``N``: the norm that reads ``y_j`` next (``ln2``, the MLP's input norm, in
  sequential pre-norm blocks; none for parallel, attention-only and output-norm blocks, whose next
  reader is not a norm of ``y_j``). With its scale frozen, ``N(v) = (v P) diag(γ) / s_j`` is linear, so
  ``N(y_j − T_jk) = N(y_j) − N(T_jk)`` and distances are taken in ``N``'s coordinates, as ALTI does
  after the post-LN. The ``1/s_j`` is a per-row constant that the row scaling removes, so only
  ``P diag(γ)`` enters (``norm=False`` measures raw residual coordinates instead).
* **Output norms on attention** (Gemma-2/3's ``ln1_post``, OLMo-2's ``ln1``) act on ``attn_j`` only,
  not on the residual: their ``P diag(γ)`` goes into ``W_O`` and their frozen ``1/s_j`` is ``q_j``.
* **GQA**: query head ``h`` reads its group's value ``v^{g(h)}_k`` but writes through its own ``W_O^h``,
  so ``u^h_k`` is per *query* head (``attn.W_V`` expands the groups, as TransformerLens does).
  ``clip_qkv`` clamps the values as the model does; learned sinks leave rows summing to less than 1.
* **The MLP** acts on each position alone, so it mixes no tokens: as in ALTI it leaves ``C`` unchanged
  (its effect enters the next layer through ``x_j``).

Per layer (``c`` before each row is scaled to sum 1; ``b_O`` and norm biases are attributed to no token):

| kind | ``c_jk`` | cost per layer |
|---|---|---|
| ``alti`` | ``max(0, ‖N y_j‖₁ − ‖N(y_j − T_jk)‖₁)`` | ``n²·H·d`` (chunked: ``chunk·n·d`` memory) |
| ``alti_linear`` | ``max(0, sign(N y_j)ᵀ N T_jk)`` | ``n²·d`` (a score-like product per head) |
| ``alti_skip`` | ``max(0, sign(N y_j)ᵀ N (T_jk − δ_jk x_j)) + δ_jk ‖N y_j‖₁`` | as ``alti_linear`` |
| ``globenc`` | ``‖N T_jk‖₂`` | ``n·H²·d + n²·H²`` (Gram of each key's head outputs) |

``alti_resid`` is ``alti_linear`` measured in the residual stream's own coordinates (``norm=False``):
in a pre-norm block nothing on the residual path normalises ``y_j``. ALTI measures after the post-LN
because, in a post-LN encoder, that norm's output is the only thing the next layer reads; here ``ln2``
is one reader of ``y_j`` (the MLP), while the residual carries ``y_j`` itself, unnormed, to every later
layer's ``ln1`` (each with its own ``γ``) and to the final norm that the target reads. Measuring in
``ln2``'s ``P diag(γ)`` weighs the coordinates by the MLP's gain only, which the rest of the stack
does not share.

``alti_skip`` keeps the skip connection's gain. The block's Jacobian is ``∂y_j/∂x_k = δ_jk I +
A_jk W_VO ∂N1(x_k)`` (patterns frozen): a unit of the target's sensitivity at ``y_j`` passes whole
through the identity, however much attention writes. ALTI instead credits the residual its share
``sign(y_j)·x_j / ‖y_j‖₁``, which shrinks whenever other tokens write, so every contribution rollout
decays from the last token's own stream while the Jacobian's identity path keeps gain 1 from it to the
target (lists, whose answer reads the last items, show it most). So the skip weighs ``‖y_j‖₁`` (all of
``y_j``: gain 1) and each key its first-order ALTI part of the attention write, ``max(0, a_jk)``; the row
``I + a⁺/‖y_j‖₁`` is scaled to sum 1 as attention rollout scales ``I + A``. Its self-weight
``1/(1 + Σ_k a⁺_jk/‖y_j‖₁)`` is at least ``1/2`` per layer whenever the attention parts are non-negative
(ALTI's is ``1 − Σ_k a_jk/‖y_j‖₁``, down to 0).

``alti_linear`` is ALTI's distance to first order in ``T_jk``, and never below it: coordinatewise
``|y_i| − |y_i − t_i| ≤ sign(y_i)·t_i``, with equality unless ``t_i`` flips the coordinate's sign. It reads
``N T_jk`` through ``W_O^h`` once per query (``r^h_j = W_O^h (γ P sign(N y_j))``), so its cost is that of
the attention scores, not of ``n²`` vectors.

Each registered proxy is declared at the end of this module with
:func:`lens_squash.algebra.variant_registry.variant`, next to its builder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..core.display import compact_repr
from ..core.results import unserialised
from ..core.support import UnsupportedModelError
from .blocks import apply_output_norms, block_shape
from .model_facts import NormFacts, facts_of
from .variant_registry import variant
from .variants import PathGraph

__all__ = [
    "KINDS",
    "PROXIES",
    "FORMS",
    "ContributionGraph",
    "LayerTerms",
    "contribution_graph",
    "contribution_matrix",
    "contribution_row",
    "layer_terms",
    "normalise_rows",
]

KINDS: tuple[str, ...] = ("alti", "alti_linear", "alti_skip", "globenc")
#: each registered variant's ``(kind, norm)``: ``alti_resid`` is ``alti_linear`` in residual coordinates
FORMS: dict[str, tuple[str, bool]] = {
    "alti": ("alti", True),
    "globenc": ("globenc", True),
    "alti_linear": ("alti_linear", True),
    "alti_resid": ("alti_linear", False),
    "alti_skip": ("alti_skip", False),
}
#: the registered variants
PROXIES: tuple[str, ...] = tuple(FORMS)

#: float elements of the ``[chunk, key, d_model]`` block ``alti`` forms at once
CHUNK_ELEMENTS: int = 1 << 23
#: queries per block in ``alti_linear`` and ``globenc`` (causal blocks skip the keys they cannot see)
QUERY_CHUNK: int = 256


@dataclass(frozen=True)
class LayerTerms:
    """What one layer's contributions read, all in the measuring norm's coordinates: ``T_jk =
    q_j Σ_h A^h_jk values^h_k w_out^h + δ_jk resid_j``."""

    resid: Float[Tensor, "pos d_model"]
    values: Float[Tensor, "head pos d_head"]
    w_out: Float[Tensor, "head d_head d_model"]
    query_scale: Float[Tensor, "pos"] | None


def _attention_part(terms: LayerTerms, patterns: Tensor) -> Tensor:
    """``q_j Σ_h Σ_k A^h_jk u^h_k``: what attention writes at each query (no ``b_O``)."""
    z = torch.einsum("hjk,hkd->hjd", patterns.to(terms.values.dtype), terms.values)
    out = torch.einsum("hjd,hdm->jm", z, terms.w_out)
    return out if terms.query_scale is None else out * terms.query_scale[:, None]


def _alti(terms: LayerTerms, patterns: Tensor, chunk: int):
    """Exact ALTI, ``chunk`` queries at a time over the keys they can see (``k ≤ j``, causal)."""
    u = torch.einsum("hkd,hdm->hkm", terms.values, terms.w_out)  # [head, key, d_model]
    patterns = patterns.to(u.dtype)
    y = terms.resid + _attention_part(terms, patterns)
    norms = y.abs().sum(-1)
    for start, stop, keys in _query_chunks(patterns, chunk):
        a = patterns[:, start:stop, :keys].permute(2, 1, 0)  # [key, query, head]
        rest = torch.bmm(a, u[:, :keys].transpose(0, 1))  # [key, query, d]: Σ_h A^h_jk u^h_k
        if terms.query_scale is not None:
            rest = rest * terms.query_scale[None, start:stop, None]
        rest = y[None, start:stop] - rest
        own = torch.arange(start, min(stop, keys))
        rest[own, own - start] -= terms.resid[own]
        yield start, stop, keys, (norms[start:stop, None] - rest.abs().sum(-1).T).clamp_min(0)


def _causal(patterns: Tensor, start: int, stop: int) -> bool:
    return not bool(patterns[:, start:stop, stop:].any())


def _query_chunks(patterns: Tensor, chunk: int):
    """``(start, stop, keys)`` per block of queries: a causal block reads keys ``< stop`` only."""
    n = patterns.shape[-1]
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        yield start, stop, stop if _causal(patterns, start, stop) else n


def _first_order(terms: LayerTerms, patterns: Tensor, chunk: int):
    """Per block of queries (each reading only the keys it sees): the attention part
    ``a_jk = sign(y_j)·q_j Σ_h A^h_jk u^h_k`` (unclamped), the residual part ``sign(y_j)·x_j`` and
    ``‖y_j‖₁``; per head, ``r^h_j = W_O^h sign(y_j)`` is read against the values, and ``y_j`` is formed
    on the way."""
    values, w_out = terms.values, terms.w_out
    patterns = patterns.to(values.dtype)
    for start, stop, keys in _query_chunks(patterns, chunk):
        a = patterns[:, start:stop, :keys]
        attn = torch.einsum("hjd,hdm->jm", torch.bmm(a, values[:, :keys]), w_out)
        q = None if terms.query_scale is None else terms.query_scale[start:stop]
        y = terms.resid[start:stop] + (attn if q is None else attn * q[:, None])
        sign = torch.sign(y)
        reads = torch.einsum("hdm,jm->hjd", w_out, sign if q is None else sign * q[:, None])  # [head, query, d_head]
        block = (
            torch.bmm(reads, values[:, :keys].transpose(1, 2)).mul_(a).sum(0)
        )  # Σ_h A^h_jk (r^h_j · v^h_k), in place: one [head, chunk, key] buffer
        yield start, stop, keys, block, (sign * terms.resid[start:stop]).sum(-1), y.abs().sum(-1)


def _alti_linear(terms: LayerTerms, patterns: Tensor, chunk: int):
    """``max(0, sign(y_j)·T_jk)``: the attention part plus, on the diagonal, the residual part."""
    for start, stop, keys, block, resid, _ in _first_order(terms, patterns, chunk):
        own = torch.arange(start, stop)
        block[own - start, own] += resid
        yield start, stop, keys, block.clamp_min_(0)


def _alti_skip(terms: LayerTerms, patterns: Tensor, chunk: int, skip: float = 1.0):
    """``max(0, a_jk) + δ_jk skip·‖y_j‖₁``: the skip connection passes ``y_j`` whole (gain ``skip = 1``, the
    Jacobian's), so it weighs ``‖y_j‖₁`` where first-order ALTI credits only ``sign(y_j)·x_j``."""
    for start, stop, keys, block, _, size in _first_order(terms, patterns, chunk):
        block.clamp_min_(0)
        own = torch.arange(start, stop)
        block[own - start, own] += skip * size
        yield start, stop, keys, block


def _globenc(terms: LayerTerms, patterns: Tensor, chunk: int):
    """``‖T_jk‖₂`` from each key's head Gram ``G_k^{hg} = u^h_k · u^g_k`` (no ``n²·d`` tensor)."""
    u = torch.einsum("hkd,hdm->hkm", terms.values, terms.w_out)
    gram = torch.einsum("hkm,gkm->hgk", u, u)  # [head, head, key]
    patterns = patterns.to(u.dtype)
    own = torch.einsum("hj,hjm->jm", patterns.diagonal(dim1=1, dim2=2), u)
    q = terms.query_scale
    own = (own if q is None else own * q[:, None]) + terms.resid
    for start, stop, keys in _query_chunks(patterns, chunk):
        a = patterns[:, start:stop, :keys]  # kept in its [head, query, key] layout: no strided copy
        squares = torch.zeros(stop - start, keys, dtype=u.dtype)
        for h in range(a.shape[0]):
            squares += a[h] * (a * gram[h, :, None, :keys]).sum(0)
        if q is not None:
            squares = squares * q[start:stop, None] ** 2
        diag = torch.arange(start, min(stop, keys))
        squares[diag - start, diag] = own[diag].pow(2).sum(-1)
        yield start, stop, keys, squares.clamp_min(0).sqrt()


_BLOCKS = {"alti": _alti, "alti_linear": _alti_linear, "alti_skip": _alti_skip, "globenc": _globenc}


def _blocks(kind: str, patterns: Tensor, terms: LayerTerms, chunk: int | None, skip: float | None = None):
    if kind not in KINDS:
        raise ValueError(f"unknown contribution kind {kind!r}; choose one of {', '.join(KINDS)}")
    n, d = terms.resid.shape
    if patterns.shape != (terms.values.shape[0], n, n):
        raise ValueError(
            f"patterns must be [head, pos, pos] = {(terms.values.shape[0], n, n)}, got {tuple(patterns.shape)}"
        )
    default = max(1, CHUNK_ELEMENTS // max(1, n * d)) if kind == "alti" else QUERY_CHUNK
    if skip is None:
        return _BLOCKS[kind](terms, patterns, chunk or default)
    if kind != "alti_skip" or not skip > 0:
        raise ValueError(f"skip (the skip connection's weight, > 0) applies to alti_skip only, got {kind} and {skip}")
    return _alti_skip(terms, patterns, chunk or default, skip)


def contribution_matrix(
    kind: str,
    patterns: Float[Tensor, "head query_pos key_pos"],
    terms: LayerTerms,
    *,
    chunk: int | None = None,
    skip: float | None = None,
) -> Float[Tensor, "query_pos key_pos"]:
    """One layer's contributions ``c_jk`` (rows not yet scaled; see the module docstring). ``skip``
    (``alti_skip`` only) weighs the skip connection: 1, the Jacobian's gain, unless a held-out check says
    otherwise (``benchmarks/bound_quality.py --knob``)."""
    n = terms.resid.shape[0]
    out = torch.zeros(n, n, dtype=terms.resid.dtype)
    for start, stop, keys, block in _blocks(kind, patterns, terms, chunk, skip):
        out[start:stop, :keys] = block
    return out


def contribution_row(
    kind: str,
    patterns: Float[Tensor, "head query_pos key_pos"],
    terms: LayerTerms,
    row: Float[Tensor, "query_pos"],
    *,
    chunk: int | None = None,
    skip: float | None = None,
) -> Float[Tensor, "key_pos"]:
    """``row @ normalise_rows(C)``, one block of queries at a time: the ``n×n`` matrix is never formed,
    so a streamed row costs one block's memory, and each row is scaled through its weight (a vector)
    instead of its ``n`` entries."""
    row = row.double()
    out = torch.zeros(row.shape[0], dtype=torch.float64)
    for start, stop, keys, block in _blocks(kind, patterns, terms, chunk, skip):
        weights = row[start:stop] / block.sum(-1).double().clamp_min(torch.finfo(torch.float64).tiny)
        out[:keys] += weights @ block.double()
    return out


def normalise_rows(c: Float[Tensor, "query_pos key_pos"]) -> Float[Tensor, "query_pos key_pos"]:
    """Each row scaled to sum 1 (an all-zero row stays zero)."""
    c = c.double()
    return c / c.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)


# --------------------------------------------------------------------------------------------------
# the terms of a traced layer, from the trace's residual streams and the model's weights
# --------------------------------------------------------------------------------------------------

_SCALES = {"ln1": "ln1_scale", "ln2": "ln2_scale", "ln1_post": "ln1_post_scale"}


def _trace_scale(trace, site: str) -> Tensor:
    value = getattr(trace, _SCALES[site], None)
    if value is None:
        raise ValueError(f"contribution rollouts need blocks.{{l}}.{site}.hook_scale, which this trace lacks")
    return value


def _input_norm(x: Tensor, norm: NormFacts, scale: Tensor) -> Tensor:
    """``N1(x_k)`` with its traced scale: ``(x P) diag(γ) / s_k + β`` (γ the adapter's effective gain:
    Gemma's ``1 + w``)."""
    out = (x - x.mean(-1, keepdim=True) if norm.centred else x) / scale[:, None].to(x.dtype)
    out = out if norm.gain is None else out * norm.gain.to(x.dtype)
    return out if norm.bias is None else out + norm.bias.detach().to(x.dtype)


def _measure(x: Tensor, norms: dict[str, NormFacts], sites: tuple[str, ...]) -> Tensor:
    for site in sites:
        norm = norms[site]
        x = x - x.mean(-1, keepdim=True) if norm.centred else x
        x = x if norm.gain is None else x * norm.gain.to(x.dtype)
    return x


def _values(attn, w_v: Tensor, read: Tensor, n_heads: int) -> Tensor:
    """``N1(x_k) W_V^h + b_V^h`` per *query* head. ``w_v`` is the adapter's ``W_V``, one matrix per query
    head; a TransformerBridge keeps ``b_V`` per key-value head, so it is expanded here as TransformerLens
    expands groups (``repeat_interleave``)."""
    values = torch.einsum("kd,hde->hke", read, w_v.to(read.dtype))
    bias = getattr(attn, "b_V", None)
    if bias is not None:  # a bridge has None for bias-free projections
        bias = bias.detach().to(read.dtype)
        if bias.shape[0] != n_heads:
            if n_heads % bias.shape[0]:
                raise UnsupportedModelError(
                    f"b_V has {bias.shape[0]} heads, which does not divide {n_heads} query heads"
                )
            bias = bias.repeat_interleave(n_heads // bias.shape[0], dim=0)
        values = values + bias[:, None]
    return values


def layer_terms(model, trace, layer: int, *, norm: bool = True) -> LayerTerms:
    """The :class:`LayerTerms` of block ``layer`` from the trace's residual stream and the weights."""
    shape = block_shape(model)  # refuses (UnsupportedModelError) what the block algebra does not model
    if trace.resid is None:
        raise ValueError(
            "contribution rollouts need the residual stream entering every layer: trace(model, prompt, keep_resid=True)"
        )
    facts = facts_of(model).layers[layer]  # effective norm gains, W_V and W_O per query head
    block, dtype = model.blocks[layer], trace.resid.dtype
    x = trace.resid[layer]
    read = (
        x
        if shape.attn_in is None
        else _input_norm(x, facts.norms[shape.attn_in], _trace_scale(trace, shape.attn_in)[layer])
    )
    values = _values(block.attn, facts.w_v, read, model.cfg.n_heads)
    clip = facts_of(model).value_clip
    values = values if clip is None else values.clamp(-clip, clip)
    measure = shape.mlp_in if (norm and shape.mlp_in is not None and not shape.parallel) else None
    sites = () if measure is None else (measure,)
    w_out = apply_output_norms(facts.w_o, [facts.norms[site] for site in shape.attn_out + sites]).to(dtype)
    query = None
    for site in shape.attn_out:
        scale = 1.0 / _trace_scale(trace, site)[layer].to(dtype)
        query = scale if query is None else query * scale
    return LayerTerms(_measure(x, facts.norms, sites), values, w_out, query)


# --------------------------------------------------------------------------------------------------
# the path graph
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ContributionGraph(PathGraph):
    """A contribution rollout as a :class:`PathGraph`: one pseudo-head whose "pattern" is ``C^(l)``,
    residual 0 (the residual is ``C``'s diagonal), key scale 1. Rows, flows, top paths and layer rows
    then work as for every variant. From a streamed trace ``patterns`` is ``None`` and :meth:`step`
    moves the row through the recomputed patterns a block of queries at a time (memory ``H·n²`` plus
    one block: ``C^(l)`` itself is never formed)."""

    layer_row: Callable[[int, Tensor, Tensor], Tensor] | None = unserialised(
        "a function of the model's weights and the trace", default=None, repr=False
    )

    __repr__ = compact_repr

    def step(self, row, layer, patterns, mean=None, *, totals=None):
        if totals is not None or self.layer_row is None:
            raise ValueError(f"the {self.variant} graph's layers are row-stochastic already and need the model")
        return self.layer_row(layer, patterns, row)


def contribution_graph(
    trace,
    model,
    kind: str,
    *,
    norm: bool = True,
    per_unit: bool = False,
    name: str | None = None,
    **kwargs: Any,
) -> ContributionGraph:
    """The ``kind`` rollout of a traced prompt (``norm``: measure in the next norm's coordinates).

    ``per_unit``: divide the first layer's column ``k`` by ``‖x^(0)_k‖``, turning a share of what
    token ``k`` contributes into a contribution per unit of its input (for a linear map the
    contribution ``‖J_k v_k‖`` over ``‖v_k‖`` is at most the sensitivity ``‖J_k‖`` that the
    Jacobian measures); the rows then no longer sum to 1."""
    if model is None:
        raise ValueError(
            f"the {name or kind} variant needs the model's weights: path_bound(trace, {name or kind!r}, model=model)"
        )

    def input_sizes(layer: int) -> Tensor | float:
        if not (per_unit and layer == 0):
            return 1.0
        return trace.resid[0].double().norm(dim=-1).clamp_min(torch.finfo(torch.float64).tiny)

    def layer_matrix(layer: int, patterns: Tensor) -> Tensor:
        terms = layer_terms(model, trace, layer, norm=norm)
        return normalise_rows(contribution_matrix(kind, patterns, terms, **kwargs)) / input_sizes(layer)

    def layer_row(layer: int, patterns: Tensor, row: Tensor) -> Tensor:
        terms = layer_terms(model, trace, layer, norm=norm)
        return contribution_row(kind, patterns, terms, row, **kwargs) / input_sizes(layer)

    n_layers, n = trace.n_layers, trace.n_tokens
    layer_terms(model, trace, 0, norm=norm)  # refuses a trace without residual streams before any work
    stack = None
    if trace.patterns is not None:
        stack = torch.stack([layer_matrix(layer, trace.patterns[layer]) for layer in range(n_layers)])[:, None]
    return ContributionGraph(
        name or kind,
        torch.zeros(n_layers, n, dtype=torch.float64),
        stack,
        torch.ones(n_layers, 1, n, dtype=torch.float64),
        None,
        torch.ones(n, dtype=torch.float64),
        None,
        layer_row=layer_row,
    )


# --------------------------------------------------------------------------------------------------
# builders
# --------------------------------------------------------------------------------------------------


def _builder(name: str) -> Callable[..., ContributionGraph]:
    kind, norm = FORMS[name]

    def build(trace, model=None, **params: Any) -> ContributionGraph:
        return contribution_graph(trace, model, kind, name=name, **{"norm": norm, **params})

    build.__name__ = f"_{name}"
    return build


# the variants (their declarations: lens_squash.algebra.variant_registry reads them from this source)
_NEEDS = frozenset({"weights", "residual", "norm_scales"})
_SHARES = (
    "shares of where the target's information comes from (token-to-token contributions composed like rollout), "
    "with no inequality to the Jacobian"
)
_SKIP_STATEMENT = (
    "shares, with no inequality to the Jacobian. Derivation: the block's Jacobian is ∂y_j/∂x_k = δ_jk I + A_jk W_VO "
    "∂N1(x_k), so a unit of sensitivity at y_j passes whole (gain 1) through the skip connection, however much "
    "attention writes, while ALTI credits the residual only its share sign(y_j)·x_j / ‖y_j‖₁, which shrinks as "
    "others write (every rollout then decays from the last token's own stream). Here the skip keeps gain 1 and "
    "each attention edge k → j weighs the share of y_j it wrote, max(0, sign(y_j)·attn_jk) / ‖y_j‖₁ (first-order "
    "ALTI, residual coordinates); the row I + shares is scaled back to sum 1, as attention rollout scales I + A"
)
build_alti = variant("alti", guarantee="proxy", needs=_NEEDS, supports=block_shape, statement=_SHARES,
                     summary="ALTI: L1 contributions with the residual, in the next norm's coordinates")(_builder("alti"))  # fmt: skip
build_globenc = variant("globenc", guarantee="proxy", needs=_NEEDS, supports=block_shape, statement=_SHARES,
                        summary="GlobEnc: ‖N T_jk‖₂ with the residual and the next norm")(_builder("globenc"))  # fmt: skip
build_alti_linear = variant(
    "alti_linear", guarantee="proxy", needs=_NEEDS, supports=block_shape, statement=_SHARES,
    summary="ALTI to first order: max(0, sign(N y_j)·N T_jk), at the cost of the attention scores",
)(_builder("alti_linear"))  # fmt: skip
build_alti_resid = variant(
    "alti_resid", guarantee="proxy", needs=_NEEDS, supports=block_shape, statement=_SHARES,
    summary="first-order ALTI measured in the residual stream itself: max(0, sign(y_j)·T_jk), no next norm",
)(_builder("alti_resid"))  # fmt: skip
build_alti_skip = variant(
    "alti_skip", guarantee="proxy", needs=_NEEDS, supports=block_shape, statement=_SKIP_STATEMENT,
    summary="alti_resid with the skip connection kept at gain 1: rows ∝ ‖y_j‖₁ δ_jk + max(0, sign(y_j)·attn_jk)",
)(_builder("alti_skip"))  # fmt: skip
