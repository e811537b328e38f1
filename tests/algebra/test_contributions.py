"""Contribution rollouts (ALTI, GlobEnc, first-order ALTI) against brute force and against the model itself."""

from __future__ import annotations

import functools

import pytest
import torch

from lens_squash.algebra import contributions as C
from lens_squash.algebra.blocks import apply_output_norms, block_shape
from lens_squash.algebra.contributions import LayerTerms, contribution_matrix, layer_terms, normalise_rows
from lens_squash.algebra.paths import stack_product
from lens_squash.algebra.variant_registry import get_variant
from lens_squash.algebra.variants import path_bound
from lens_squash.core.support import UnsupportedModelError
from lens_squash.edge.adapter import norm_facts, value_clip
from lens_squash.edge.backends import is_bridge
from lens_squash.edge.flow_edges import bound_layer_rows
from lens_squash.edge.stream import stream_bounds
from lens_squash.edge.trace import trace

from .. import families

KINDS = C.KINDS


def _random_terms(n=7, heads=3, d_head=4, d=10, *, query=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(heads, n, n, generator=g, dtype=torch.float64)
    scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    patterns = scores.softmax(-1)
    terms = LayerTerms(
        resid=torch.randn(n, d, generator=g, dtype=torch.float64),
        values=torch.randn(heads, n, d_head, generator=g, dtype=torch.float64),
        w_out=torch.randn(heads, d_head, d, generator=g, dtype=torch.float64),
        query_scale=(torch.rand(n, generator=g, dtype=torch.float64) + 0.5) if query else None,
    )
    return patterns, terms


def _brute_force(kind, patterns, terms):
    """Every ``T_jk`` formed as a vector, one (j, k) at a time."""
    heads, n, _ = patterns.shape
    q = terms.query_scale if terms.query_scale is not None else torch.ones(n, dtype=torch.float64)
    t = torch.zeros(n, n, terms.resid.shape[1], dtype=torch.float64)
    for j in range(n):
        for k in range(n):
            for h in range(heads):
                t[j, k] += q[j] * patterns[h, j, k] * (terms.values[h, k] @ terms.w_out[h])
            if j == k:
                t[j, k] += terms.resid[j]
    y = t.sum(1)
    out = torch.zeros(n, n, dtype=torch.float64)
    for j in range(n):
        for k in range(n):
            if kind == "alti":
                out[j, k] = max(0.0, float(y[j].abs().sum() - (y[j] - t[j, k]).abs().sum()))
            elif kind == "alti_linear":
                out[j, k] = max(0.0, float(torch.sign(y[j]) @ t[j, k]))
            elif kind == "alti_skip":  # the attention part clamped, the skip weighing all of y_j
                attention = t[j, k] - (terms.resid[j] if j == k else 0.0)
                out[j, k] = max(0.0, float(torch.sign(y[j]) @ attention)) + (float(y[j].abs().sum()) if j == k else 0.0)
            else:
                out[j, k] = float(t[j, k].norm())
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("query", [True, False])
@pytest.mark.parametrize("chunk", [None, 2])
def test_contributions_match_a_brute_force_loop(kind, query, chunk):
    patterns, terms = _random_terms(query=query)
    got = contribution_matrix(kind, patterns, terms, chunk=chunk)
    torch.testing.assert_close(got, _brute_force(kind, patterns, terms), rtol=1e-10, atol=1e-10)


def _causal_and_full(seed):
    patterns, terms = _random_terms(n=9, seed=seed)
    full = torch.rand(patterns.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return [(patterns, terms), (full / full.sum(-1, keepdim=True), terms)]  # a bidirectional pattern too


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk", [None, 2, 4])
def test_the_blockwise_row_is_the_row_through_the_scaled_matrix(kind, chunk):
    # what a streamed row computes, block by block, against the whole matrix scaled then multiplied
    for seed in range(3):
        for patterns, terms in _causal_and_full(seed):
            row = torch.rand(9, generator=torch.Generator().manual_seed(10 + seed), dtype=torch.float64)
            expected = row @ normalise_rows(_brute_force(kind, patterns, terms))
            got = C.contribution_row(kind, patterns, terms, row, chunk=chunk)
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def _pattern_and_writes(model, cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer ``layer``'s ``[head, query, key]`` pattern and ``[head, key, d_model]`` value writes ``v^h_k W_O^h``
    (GQA values repeated per query head), in float64, from the model's own cache."""
    a = cache[f"blocks.{layer}.attn.hook_pattern"][0].double()
    v = cache[f"blocks.{layer}.attn.hook_v"][0].double()
    v = v.repeat_interleave(model.cfg.n_heads // v.shape[1], dim=1)  # [pos, head, d_head]
    return a, torch.einsum("khd,hdm->hkm", v, model.blocks[layer].attn.W_O.double())


def _rolled_out(model, cache, contributions):
    """The last token's row of the rollout of ``contributions(layer, pattern, per_head_writes)``, each layer's
    ``c_jk`` scaled to rows of 1, composed from the last layer down."""
    row = torch.zeros(families.TOKENS.shape[0], dtype=torch.float64)
    row[-1] = 1.0
    for layer in reversed(range(model.cfg.n_layers)):
        c = contributions(layer, *_pattern_and_writes(model, cache, layer))
        row = row @ (c / c.sum(-1, keepdim=True))
    return row


def test_alti_resid_against_the_models_own_hooks():
    """An independent build of ``alti_resid``: every ``T_jk`` from the cache's patterns, GQA values and
    ``W_O`` (raw residual coordinates), ``c_jk = max(0, sign(y_j)·T_jk)``, rows scaled and multiplied."""
    model = _model("llama_gqa")
    traced, cache = _cached("llama_gqa")
    n = families.TOKENS.shape[0]

    def contributions(layer, a, per_head):
        t = torch.einsum("hjk,hkm->jkm", a, per_head)
        t[range(n), range(n)] += cache[f"blocks.{layer}.hook_resid_pre"][0].double()
        return torch.einsum("jm,jkm->jk", torch.sign(t.sum(1)), t).clamp_min(0)

    row = _rolled_out(model, cache, contributions)
    got = path_bound(traced, "alti_resid", model=model).bound
    torch.testing.assert_close(got, row, rtol=1e-5, atol=1e-8)
    assert not torch.allclose(got, path_bound(traced, "alti_linear", model=model).bound, rtol=1e-3)


def test_alti_skip_against_the_models_own_hooks():
    """An independent build of ``alti_skip``: ``y_j`` is the model's own ``hook_resid_mid`` less ``b_O`` (what
    the skip carries on, whole), each key's attention write ``T_jk`` is formed from the cache's patterns, GQA values
    and ``W_O``; ``c_jk = max(0, sign(y_j)·T_jk) + δ_jk ‖y_j‖₁``, rows scaled to 1 and multiplied."""
    model = _model("llama_gqa")
    traced, cache = _cached("llama_gqa")

    def contributions(layer, a, per_head):
        y = cache[f"blocks.{layer}.hook_resid_mid"][0].double()
        b_o = model.blocks[layer].attn.b_O  # a bridge has None for a bias-free W_O
        y = y if b_o is None else y - b_o.double()  # b_O is attributed to no token
        return torch.einsum("jm,hjk,hkm->jk", torch.sign(y), a, per_head).clamp_min(0) + torch.diag(y.abs().sum(-1))

    row = _rolled_out(model, cache, contributions)
    got = path_bound(traced, "alti_skip", model=model).bound
    torch.testing.assert_close(got, row, rtol=1e-5, atol=1e-8)


def test_the_skip_keeps_at_least_half_where_alti_loses_the_own_stream():
    """The derivation's point: when every write agrees in sign with the stream (no cancellation), the
    skip's self-weight is ``1/(1 + f_j)`` with ``f_j = Σ_k a_jk/‖y_j‖₁ < 1``, so above 1/2 per layer
    however much attention writes, while ALTI's residual share ``sign(y_j)·x_j/‖y_j‖₁`` goes to 0."""
    patterns, terms = _random_terms(n=8, query=False, seed=3)
    positive = LayerTerms(terms.resid.abs() * 1e-3, terms.values.abs(), terms.w_out.abs(), None)
    skip = normalise_rows(contribution_matrix("alti_skip", patterns, positive))
    alti = normalise_rows(contribution_matrix("alti_linear", patterns, positive))
    assert (skip.diagonal() > 0.5).all()
    assert (skip.diagonal() >= alti.diagonal()).all() and (alti.diagonal()[1:] < 0.5).all()
    # no attention write at all: both are the identity, the Jacobian of a block that only carries x_j
    silent = LayerTerms(terms.resid, terms.values * 0, terms.w_out, None)
    for kind in ("alti_skip", "alti_linear"):
        eye = torch.eye(8, dtype=torch.float64)
        torch.testing.assert_close(normalise_rows(contribution_matrix(kind, patterns, silent)), eye)


def test_alti_linear_is_never_below_alti():
    # coordinatewise |y| − |y − t| ≤ sign(y)·t: the first-order distance bounds the exact one from above
    for seed in range(5):
        patterns, terms = _random_terms(n=9, seed=seed)
        exact = contribution_matrix("alti", patterns, terms)
        linear = contribution_matrix("alti_linear", patterns, terms)
        assert (linear >= exact - 1e-12).all()


def test_without_the_residual_term_alti_misses_the_diagonal():
    # the residual δ_jk x_j is what makes a token's own contribution: drop x and the diagonal shrinks
    patterns, terms = _random_terms(n=6, query=False)
    big = LayerTerms(terms.resid * 50, terms.values, terms.w_out, None)
    share = normalise_rows(contribution_matrix("alti", patterns, big)).diagonal()
    small = normalise_rows(
        contribution_matrix("alti", patterns, LayerTerms(terms.resid * 0, *list(vars(terms).values())[1:]))
    )
    assert share.min() > 0.9 and (small.diagonal()[1:] < share[1:]).all()


def test_unknown_kind_and_bad_shapes_are_refused():
    patterns, terms = _random_terms()
    with pytest.raises(ValueError, match="unknown contribution kind"):
        contribution_matrix("alti2", patterns, terms)
    with pytest.raises(ValueError, match="patterns must be"):
        contribution_matrix("alti", patterns[:, :3, :3], terms)


# --------------------------------------------------------------------------------------------------
# the terms against the model
# --------------------------------------------------------------------------------------------------

SUPPORTED = [name for name in families.ALL if name not in families.REFUSED]


@functools.cache
def _model(name):
    return families.build(name)


@functools.cache
def _cached(name):
    model = _model(name)
    _, cache = model.run_with_cache(families.TOKENS[None])
    return trace(model, families.TOKENS, keep_resid=True), cache


@pytest.mark.parametrize("name", families.params(SUPPORTED))
def test_terms_sum_to_what_attention_writes(name):
    """``Σ_k T_jk − x_j`` is hook_attn_out less its biases: the input norm, output norms, GQA and clipping
    are exactly the model's."""
    model = _model(name)
    traced, cache = _cached(name)
    shape = block_shape(model)
    for layer in range(model.cfg.n_layers):
        terms = layer_terms(model, traced, layer, norm=False)
        part = C._attention_part(terms, traced.patterns[layer])
        block = model.blocks[layer]
        b_o = block.attn.b_O if block.attn.b_O is not None else torch.zeros_like(traced.y_last)  # a bridge without one
        bias = apply_output_norms(b_o[None], [norm_facts(getattr(block, s)) for s in shape.attn_out])[0]
        q = terms.query_scale[:, None] if terms.query_scale is not None else 1.0
        expected = cache[f"blocks.{layer}.hook_attn_out"][0] - q * bias
        for site in shape.attn_out:
            if getattr(getattr(block, site), "b", None) is not None:
                expected = expected - getattr(block, site).b
        atol = 1e-9
        if is_bridge(model) and name in families.HF_FLOAT32_INSIDE:  # transformers' float32 steps inside
            atol = 1e-5 * float(expected.abs().max())
        torch.testing.assert_close(part, expected, rtol=1e-9, atol=atol)


@pytest.mark.parametrize("name", families.params(["llama_gqa", "olmo_clip_qkv", "gpt2", "olmo2_output_norms"]))
def test_values_are_the_models_per_query_head(name):
    """GQA: query head h reads its group's hook_v; the input norm and the clip are the model's."""
    model = _model(name)
    traced, cache = _cached(name)
    clip = value_clip(model)  # a bridge's cfg has no clip_qkv: the transformers config's
    assert (clip is not None) == (name == "olmo_clip_qkv")
    for layer in range(model.cfg.n_layers):
        v = cache[f"blocks.{layer}.attn.hook_v"][0]  # [pos, kv_head, d_head]
        group = model.cfg.n_heads // v.shape[1]
        expected = v.repeat_interleave(group, dim=1).transpose(0, 1)
        if clip is not None:  # hook_v fires before TransformerLens clamps the values
            expected = expected.clamp(-clip, clip)
        atol = 1e-9
        if is_bridge(model) and name in families.HF_FLOAT32_INSIDE:  # transformers' float32 steps inside
            atol = 1e-5 * float(expected.abs().max())
        torch.testing.assert_close(layer_terms(model, traced, layer).values, expected, rtol=1e-9, atol=atol)


@pytest.mark.hooked  # tells LayerNorm from RMSNorm by HookedTransformer class names
@pytest.mark.parametrize("name", ["gpt2", "gemma"])
def test_the_measuring_norm_is_the_next_norms_frozen_map(name):
    """norm=True measures T_jk after ln2's (P, γ): the same T as norm=False, mapped by P diag(γ)."""
    model = _model(name)
    traced, _ = _cached(name)
    ln2 = model.blocks[1].ln2
    raw, measured = layer_terms(model, traced, 1, norm=False), layer_terms(model, traced, 1, norm=True)

    def mapped(v):
        v = v - v.mean(-1, keepdim=True) if type(ln2).__name__.startswith("LayerNorm") else v
        return v * ln2.w

    torch.testing.assert_close(measured.resid, mapped(raw.resid))
    torch.testing.assert_close(measured.w_out, mapped(raw.w_out))
    assert not torch.allclose(measured.resid, raw.resid)  # random γ: the choice matters


def test_parallel_blocks_measure_raw_coordinates():
    model = _model("pythia_parallel")
    traced, _ = _cached("pythia_parallel")
    torch.testing.assert_close(layer_terms(model, traced, 0, norm=True).resid, traced.resid[0])


# --------------------------------------------------------------------------------------------------
# the path graph: rows, flows, paths, layer rows, streaming, registry
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", C.PROXIES)
def test_row_is_the_product_of_the_layer_matrices(name):
    model = _model("llama_gqa")
    traced, _ = _cached("llama_gqa")
    kind, norm = C.FORMS[name]
    mats = torch.stack(
        [
            normalise_rows(
                contribution_matrix(kind, traced.patterns[layer], layer_terms(model, traced, layer, norm=norm))
            )
            for layer in range(model.cfg.n_layers)
        ]
    )
    bound = path_bound(traced, name, model=model, full_matrix=True)
    torch.testing.assert_close(bound.bound, stack_product(mats)[-1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(bound.matrix, stack_product(mats), rtol=1e-10, atol=1e-12)
    # rows of stochastic matrices: the rollout row is a distribution over input positions
    assert abs(float(bound.bound.sum()) - 1.0) < 1e-9 and (bound.bound >= 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_flows_paths_and_layer_rows(kind):
    model = _model("gemma2_post_norm")
    traced, _ = _cached("gemma2_post_norm")
    bound = path_bound(traced, kind, model=model)
    flows = bound.flows()
    torch.testing.assert_close(flows.layer_totals, torch.full_like(flows.layer_totals, float(bound.bound.sum())))
    paths = bound.top_paths(k=3)
    assert paths and paths[0].weight <= float(bound.bound[paths[0].positions[0]]) + 1e-12
    rows = bound_layer_rows(bound.graph, -1)
    torch.testing.assert_close(rows[0], bound.bound)


@pytest.mark.parametrize("name", families.params(["llama_gqa", "gemma2_post_norm", "gpt_oss_sinks", "pythia_parallel"]))
def test_streamed_row_equals_the_whole_stack_row(name):
    model = _model(name)
    kept = trace(model, families.TOKENS, keep_resid=True, keep_patterns=True)
    streamed = trace(model, families.TOKENS, keep_patterns=False)
    rows = stream_bounds(model, streamed, list(C.PROXIES), target_pos=-2)
    for kind in C.PROXIES:
        whole = path_bound(kept, kind, model=model, target_pos=-2).bound
        torch.testing.assert_close(rows[kind].bound, whole, rtol=1e-9, atol=1e-12)
        assert rows[kind].graph.patterns is None


# a per-family sweep (conformance); test-fast keeps a LayerNorm, an RMSNorm/GQA and a refused family
@pytest.mark.parametrize("name", families.sweep(families.ALL, fast=("gpt2", "llama_gqa", "bidirectional")))
def test_every_family_runs_or_refuses_in_one_line(name):
    model = _model(name)
    for kind in C.PROXIES:
        spec = get_variant(kind)
        if name in families.REFUSED:
            with pytest.raises(UnsupportedModelError, match=families.REFUSED[name]) as err:
                spec.supports(model)
            assert "\n" not in str(err.value)
            continue
        spec.supports(model)
        bound = path_bound(trace(model, families.TOKENS, keep_resid=True), kind, model=model)
        assert torch.isfinite(bound.bound).all() and abs(float(bound.bound.sum()) - 1.0) < 1e-9


def test_registered_as_proxies_never_bounds():
    model = _model("gpt2")
    traced, _ = _cached("gpt2")
    for kind in C.PROXIES:
        spec = get_variant(kind)
        assert spec.guarantee == "proxy" and not spec.is_bound and "residual" in spec.needs
        bound = path_bound(traced, kind, model=model)
        assert bound.guarantee is None and bound.guarantee_kind == "proxy"


def test_a_trace_without_residual_streams_or_model_is_refused():
    model = _model("gpt2")
    with pytest.raises(ValueError, match="keep_resid=True"):
        path_bound(trace(model, families.TOKENS), "alti", model=model)
    with pytest.raises(ValueError, match="model's weights"):
        path_bound(_cached("gpt2")[0], "alti")


def test_per_unit_divides_the_row_by_the_input_norms():
    # only the first layer's columns are scaled, so the row is the plain row over ‖x^(0)_k‖
    model = _model("gemma")
    traced, _ = _cached("gemma")
    plain = C.contribution_graph(traced, model, "alti_linear").row(-1)
    per_unit = C.contribution_graph(traced, model, "alti_linear", per_unit=True).row(-1)
    torch.testing.assert_close(per_unit, plain / traced.resid[0].double().norm(dim=-1))


def test_the_skip_weight_scales_the_diagonal_only_and_is_refused_elsewhere():
    patterns, terms = _random_terms(n=6, query=False)
    one = contribution_matrix("alti_skip", patterns, terms)
    half = contribution_matrix("alti_skip", patterns, terms, skip=0.5)
    y = terms.resid + C._attention_part(terms, patterns)
    torch.testing.assert_close(one - half, torch.diag(0.5 * y.abs().sum(-1)))  # ½‖y_j‖₁ off the diagonal
    torch.testing.assert_close(contribution_matrix("alti_skip", patterns, terms, skip=1.0), one)
    with pytest.raises(ValueError, match="alti_skip only"):
        contribution_matrix("alti_linear", patterns, terms, skip=0.5)
    with pytest.raises(ValueError, match="> 0"):
        contribution_matrix("alti_skip", patterns, terms, skip=0.0)
