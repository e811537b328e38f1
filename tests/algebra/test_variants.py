"""Path-sum variants on traced models: algebraic identities, and the certified bound as a theorem."""

from __future__ import annotations

import pytest
import torch

from lens_squash import tiny_model, trace
from lens_squash.algebra import paths
from lens_squash.algebra.attention import aggregate_heads
from lens_squash.algebra.variants import VARIANTS, path_bound

TOKENS = torch.tensor([3, 17, 5, 5, 9, 30, 2, 11, 4])


@pytest.fixture(scope="module")
def traced():
    model = tiny_model(n_layers=3, n_heads=2, d_model=16, d_vocab=32, dtype=torch.float64, seed=4)
    return model, trace(model, TOKENS, lipschitz=True, keep_resid=True)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_flows_sum_to_the_row_of_every_variant(traced, variant):
    model, t = traced
    bound = path_bound(t, variant, model=model)
    flows = bound.flows()
    torch.testing.assert_close(
        flows.layer_totals, torch.full_like(flows.layer_totals, float(bound.bound.sum())), rtol=1e-10, atol=0
    )
    one = bound.flows(source=2)
    torch.testing.assert_close(
        one.layer_totals, torch.full_like(one.layer_totals, float(bound.bound[2])), rtol=1e-10, atol=0
    )
    top = bound.top_paths(k=3)
    assert top[0].weight <= float(bound.bound.max()) * (1 + 1e-12)  # one path never outweighs all paths
    assert top[0].positions[-1] == bound.target_pos


def test_paper_variant_is_theorem_b5_product(traced):
    model, t = traced
    bound = path_bound(t, "paper", model=model, beta1=2.0, beta2=3.0, beta3=1.5, sigma_psi=0.5, full_matrix=True)
    a_bar = paths.residual_augmented(aggregate_heads(t.patterns.double()), beta1=2.0)
    product = a_bar[2] @ a_bar[1] @ a_bar[0]
    constant = (1 / 1.5) * (0.5 / 3.0 + 1) ** 3
    torch.testing.assert_close(bound.bound, constant * product[-1], rtol=1e-12, atol=0)
    assert bound.constant == pytest.approx(constant)
    torch.testing.assert_close(bound.matrix, constant * product, rtol=1e-12, atol=0)


@pytest.mark.parametrize("variant", ["rollout", "value_rownorm", "certified_rownorm"])
def test_row_normalised_variants_are_distributions(traced, variant):
    model, t = traced
    for target in (0, 4, -1):
        bound = path_bound(t, variant, model=model, target_pos=target)
        assert float(bound.bound.sum()) == pytest.approx(1.0, abs=1e-10)
        assert (bound.bound >= 0).all()
        assert (bound.bound[bound.target_pos + 1 :] == 0).all()  # causality: no later position contributes


@pytest.mark.hooked  # tiny_model(causal=False) has no transformers twin
def test_bad_requests_are_refused(traced):
    model, t = traced
    with pytest.raises(ValueError, match="unknown variant"):
        path_bound(t, "nope")
    with pytest.raises(ValueError, match="needs the model"):
        path_bound(t, "certified")
    with pytest.raises(ValueError, match="out of range"):
        path_bound(t, "paper", target_pos=len(TOKENS))
    bidirectional = tiny_model(n_layers=1, n_heads=2, d_model=16, d_vocab=32, causal=False, dtype=torch.float64)
    with pytest.raises(ValueError, match="not causal"):
        path_bound(trace(bidirectional, TOKENS), "rollout")


CERTIFIED_MODELS = {
    "LN+learned": dict(norm="LN", positional="standard"),
    "RMS+rotary": dict(norm="RMS", positional="rotary"),
    "RMS+rotary+GQA+gated": dict(
        norm="RMS", positional="rotary", n_heads=4, n_key_value_heads=2, gated_mlp=True, act_fn="silu"
    ),
    "LN+alibi": dict(norm="LN", positional="alibi"),
    "no norm": dict(norm=None, positional="standard"),
}


#: tiny_model has no transformers twin for norm-free models: TransformerLens 3 only (ALiBi boots MPT)
_NO_TWIN = {"no norm"}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.hooked) if n in _NO_TWIN else n for n in sorted(CERTIFIED_MODELS)]
)
def test_certified_bound_dominates_the_frozen_jacobian(name):
    from lens_squash.edge.jacobian import jacobian

    kwargs = {"n_layers": 3, "n_heads": 2, "d_model": 16, "d_vocab": 32, **CERTIFIED_MODELS[name]}
    model = tiny_model(**kwargs, dtype=torch.float64, seed=5)
    t = trace(model, TOKENS, lipschitz=True)
    for target in (-1, 4):
        bound = path_bound(t, "certified", model=model, target_pos=target).bound
        truth = jacobian(model, TOKENS, mode="frozen", target_pos=target).spectral
        truth = torch.cat([truth, truth.new_zeros(len(TOKENS) - len(truth))])  # causal: later positions are 0
        assert (bound >= truth * (1 - 1e-9)).all(), (name, target, (bound / truth).min())
        assert (truth[bound == 0] == 0).all()


def _hand_built_certified(model, tokens: torch.Tensor, target: int) -> torch.Tensor:
    """The certified row of a sequential LayerNorm model from its factors, each found another way than
    the package does: ‖P diag(γ1) W_V^h W_O^h‖₂ by a full SVD, the norm scales from run_with_cache, the
    MLP gain ‖J‖_F from autograd's Jacobian of the MLP behind its frozen ln2, and the final norm's
    ‖P diag(γ_f)‖₂ / s_f; then ``o_n · [M^(1) M^(0)]_n`` with ``M = diag(1 + g)(I + Σ_h A^h ∘ c^h)``."""
    _, cache = model.run_with_cache(tokens[None])
    d, n = model.cfg.d_model, tokens.numel()
    centre = torch.eye(d, dtype=torch.float64) - 1.0 / d

    def frozen_mlp(block, scale):  # the MLP behind ln2 with its scale held: x ↦ mlp(γ ⊙ P x / s + β)
        return lambda x: block.mlp((x - x.mean()) / scale * block.ln2.w + block.ln2.b)

    product = torch.eye(n, dtype=torch.float64)
    for layer, block in enumerate(model.blocks):
        s1 = cache[f"blocks.{layer}.ln1.hook_scale"][0, :, 0]
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0]  # [head, query, key]
        edges = torch.zeros(n, n, dtype=torch.float64)
        for h in range(model.cfg.n_heads):
            ov = centre @ torch.diag(block.ln1.w) @ block.attn.W_V[h] @ block.attn.W_O[h]
            c = torch.linalg.svdvals(ov)[0] / s1  # per key k
            edges += pattern[h] * c[None, :]
        s2 = cache[f"blocks.{layer}.ln2.hook_scale"][0, :, 0]
        mid = cache[f"blocks.{layer}.hook_resid_mid"][0]
        jacobians = [torch.autograd.functional.jacobian(frozen_mlp(block, s2[j]), mid[j]) for j in range(n)]
        gain = torch.stack([torch.linalg.matrix_norm(j) for j in jacobians])  # Frobenius
        product = torch.diag(1 + gain) @ (torch.eye(n, dtype=torch.float64) + edges) @ product
    s_f = cache["ln_final.hook_scale"][0, :, 0]
    output = torch.linalg.svdvals(centre @ torch.diag(model.ln_final.w))[0] / s_f
    return output[target] * product[target]


def test_certified_bound_equals_the_product_of_its_factors_built_by_hand():
    """Tightness of the construction, not just domination: a bound ×10, a transposed W_OV, a missing
    norm scale, an MLP gain off by a layer or γ left out all change this row."""
    model = tiny_model(n_layers=2, n_heads=2, d_model=12, d_vocab=32, dtype=torch.float64, seed=6)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-trivial γ and β, so that leaving one out shows
        for ln in [model.ln_final] + [getattr(b, name) for b in model.blocks for name in ("ln1", "ln2")]:
            ln.w.copy_(0.5 + torch.rand(ln.w.shape, generator=gen, dtype=torch.float64))
            ln.b.copy_(0.1 * torch.randn(ln.b.shape, generator=gen, dtype=torch.float64))
    tokens = TOKENS[:7]
    t = trace(model, tokens, lipschitz=True)
    for target in (6, 3):
        bound = path_bound(t, "certified", model=model, target_pos=target).bound
        expected = _hand_built_certified(model, tokens, target)
        torch.testing.assert_close(bound, expected, atol=0, rtol=1e-10)
        assert (bound[target + 1 :] == 0).all() and (bound[: target + 1] > 0).all()


@pytest.mark.slow
def test_certified_bound_dominates_on_smollm2(smollm2):
    from lens_squash.edge.jacobian import jacobian
    from lens_squash.edge.models import format_prompt

    text = "Consider the following sequence: 1 1 1 1 1 1 0. What is the last digit in this sequence?"
    tokens = format_prompt(smollm2, text, chat=False)[:24]
    assert len(tokens) == 24
    t = trace(smollm2, tokens, lipschitz=True)
    bound = path_bound(t, "certified", model=smollm2).bound
    truth = jacobian(smollm2, tokens, mode="frozen").spectral.double()
    # float32 model: the Jacobian is accurate to ~1e-5 relative; the bound must still dominate
    assert (bound >= truth * (1 - 1e-4)).all(), (bound / truth).min()


@pytest.mark.parametrize("variant", ["paper", "rollout"])
def test_head_mean_shortcut_equals_the_per_head_row(traced, variant):
    from dataclasses import replace

    _, t = traced
    torch.testing.assert_close(t.mean_patterns, t.patterns.mean(1))
    graph = path_bound(t, variant).graph
    assert graph.head_factor is not None and graph.mean_patterns is t.mean_patterns
    for target in (-1, 3):
        torch.testing.assert_close(graph.row(target), replace(graph, head_factor=None).row(target), rtol=1e-12, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16_bit_smollm2_runs_every_variant(dtype):
    """16-bit pattern rows miss 1 by more than float32's tolerance; the dtype's own tolerance accepts them."""
    from lens_squash.edge.models import format_prompt, load_model

    from ..conftest import COPY_PROMPT_12

    model = load_model(n_ctx=512, dtype=dtype)
    # the MLP Grams cost minutes on 2 cores (30 layers of 3072² · 576): certified is checked in bfloat16 only
    t = trace(model, format_prompt(model, COPY_PROMPT_12), lipschitz=dtype == "bfloat16", keep_resid=True)
    deviation = t.provenance["attention_defects"]["row_deviation"]
    check = t.provenance["attention_check"]
    assert deviation > 1e-4  # what the float32 tolerance refused as "pass softmax patterns, not scores"
    assert check["dtype"] == dtype and check["tolerated_row_deviation"] == deviation
    for variant in sorted(VARIANTS):
        if "mlp_gains" in VARIANTS[variant].needs and t.mlp_gain is None:
            continue
        bound = path_bound(t, variant, model=model).bound
        assert torch.isfinite(bound).all() and (bound >= 0).all() and bound.sum() > 0, variant


@pytest.mark.parametrize("query_scaled", [False, True])
def test_layer_totals_equal_the_float64_reference_at_n_700(query_scaled):
    """The row-chunked float64 sums (no whole-pattern float64 copy) against an independent float64 sum
    of the float32 patterns: same products, another summation order, so equal to float64 rounding."""
    from lens_squash.algebra.variants import PathGraph

    gen = torch.Generator().manual_seed(0)
    n, heads = 700, 3  # 700 rows: the cache-sized row chunks do not divide it
    patterns = torch.rand(1, heads, n, n, generator=gen).tril()
    patterns = patterns / patterns.sum(-1, keepdim=True)  # float32, as traced
    key_scale = torch.rand(1, heads, n, generator=gen, dtype=torch.float64) + 0.5
    query = torch.rand(1, n, generator=gen, dtype=torch.float64) + 0.5 if query_scaled else None
    residual = torch.rand(1, n, generator=gen, dtype=torch.float64)
    graph = PathGraph("test", residual, patterns, key_scale, None, torch.ones(n), None, query_scale=query)
    heads_sum = (patterns[0].double() * key_scale[0][:, None, :]).sum(dim=(0, 2))
    expected = residual[0] + (heads_sum if query is None else heads_sum * query[0])
    torch.testing.assert_close(graph.layer_totals(0, patterns[0]), expected, rtol=1e-13, atol=0)
    torch.testing.assert_close(graph.row_sums()[0], expected, rtol=1e-13, atol=0)
