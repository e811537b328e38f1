"""Conformance: every architecture family TransformerLens 3.9 runs, and the bridge-only ones (StableLM,
Falcon, StarCoder2, Phi-3, Qwen3), against independent references.

On one random-weight float64 model per family (``tests/families.py``): exact and frozen Jacobians
equal ``jacrev`` of the whole model with constant replayed patterns and scales; the certified bound
dominates the frozen Jacobian at every position, also under adversarial weights; traced patterns
equal ``run_with_cache``; value norms and bounds do not depend on GQA grouping; every result moves
after an in-place weight edit; refused families raise the typed refusal that names what to use.
"""

from __future__ import annotations

import pytest
import torch

from lens_squash.algebra.variants import VARIANTS, path_bound
from lens_squash.core.support import UnsupportedModelError
from lens_squash.edge.backends import is_bridge
from lens_squash.edge.jacobian import jacobian
from lens_squash.edge.trace import trace

from .families import ALL, BRIDGE_ONLY, FAMILIES, HF_FLOAT32_INSIDE, HF_TWINS, REFUSED, TOKENS, build, params
from .reference import ADVERSARIAL, adversarial, edit_in_place, reference_jacobian

#: the per-family suite (minutes on two cores; `make test-fast` skips it): on TransformerLens 4 each family
#: with a transformers twin runs as a bridge over it (``families.params`` marks the others hooked)
pytestmark = pytest.mark.conformance

CERTIFIABLE = sorted(set(ALL) - set(REFUSED))


@pytest.fixture(scope="module", params=params(ALL))
def family(request):
    name = request.param
    model = build(name)
    return name, model, trace(model, TOKENS, lipschitz=True, keep_resid=True)


def _spectral(full: torch.Tensor) -> torch.Tensor:
    """Per-position spectral norms of a ``[d_out, pos, d_in]`` Jacobian."""
    return torch.linalg.matrix_norm(full.permute(1, 0, 2), ord=2)


def _assert_dominates(bound: torch.Tensor, truth: torch.Tensor, label) -> None:
    truth = torch.cat([truth, truth.new_zeros(len(bound) - len(truth))])  # causal: later positions are 0
    # float64 rounding: relative 1e-9, plus 1e-12 of the largest norm for entries that are 0 up to
    # rounding (the cancelling-values attack makes W_V W_O vanish to ~1e-16)
    slack = 1e-12 * float(truth.max())
    assert (bound >= truth * (1 - 1e-9) - slack).all(), (label, float((bound / truth.clamp_min(1e-300)).min()))


@pytest.mark.parametrize("mode", ["exact", "frozen"])
def test_jacobians_equal_jacrev_of_the_whole_model(family, mode):
    name, model, _ = family
    got = jacobian(model, TOKENS, mode=mode, keep_full=True)
    expected = reference_jacobian(model, TOKENS, frozen=mode == "frozen")[:, : got.n_tokens]
    atol, rtol = 1e-10, 1e-10
    if is_bridge(model) and name in HF_FLOAT32_INSIDE:  # the HF reference has float32 steps inside
        atol, rtol = 1e-5 * float(expected.abs().max()), 0.0
    torch.testing.assert_close(got.full, expected, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(got.spectral, _spectral(expected), atol=atol, rtol=rtol)


def test_traced_patterns_equal_run_with_cache(family):
    name, model, t = family
    _, cache = model.run_with_cache(TOKENS[None])
    expected = torch.stack([cache[f"blocks.{l}.attn.hook_pattern"][0] for l in range(model.cfg.n_layers)])
    torch.testing.assert_close(t.patterns, expected, atol=0, rtol=0)
    for site, field in (("ln1", "ln1_scale"), ("ln2", "ln2_scale"), ("ln1_post", "ln1_post_scale")):
        hook = f"blocks.0.{site}.hook_scale"
        if hook in cache:  # the last call's scale, one per position (split inputs repeat it per head)
            scale = cache[hook][0].reshape(len(TOKENS), -1)[:, 0]
            torch.testing.assert_close(getattr(t, field)[0], scale, atol=0, rtol=0)


def test_certified_dominates_the_frozen_jacobian(family):
    name, model, t = family
    if name in REFUSED:
        with pytest.raises(UnsupportedModelError, match=REFUSED[name]) as caught:
            path_bound(t, "certified", model=model)
        assert "use " in str(caught.value).lower()  # says what to use instead
        return
    truth = _spectral(reference_jacobian(model, TOKENS, frozen=True))
    for target in (-1, 6):
        bound = path_bound(t, "certified", model=model, target_pos=target).bound
        expected = truth if target == -1 else _spectral(reference_jacobian(model, TOKENS[: target + 1], frozen=True))
        _assert_dominates(bound, expected, (name, target))


#: attacks with nothing to edit on a family's transformers twin (TransformerLens 3 only there): (OLMo) a
#: LayerNorm without a gain
_NO_TARGET_ON_TWIN = {
    "amplifying_gains": {"olmo_clip_qkv"},
    "large_random_gains": {"olmo_clip_qkv"},
}


def _attack(name: str, attack: str):
    if name in BRIDGE_ONLY or (name in HF_TWINS and name not in _NO_TARGET_ON_TWIN.get(attack, ())):
        return name, attack
    return pytest.param(name, attack, marks=pytest.mark.hooked)


_ATTACKS = [
    _attack(name, attack)
    for name in CERTIFIABLE
    for attack in sorted(ADVERSARIAL)
    if name not in BRIDGE_ONLY or name not in _NO_TARGET_ON_TWIN.get(attack, ())  # a bridge-only family: no model
]  # the truth is a frozen Jacobian


@pytest.mark.parametrize(("name", "attack"), _ATTACKS)
def test_certified_dominates_under_adversarial_weights(name, attack):
    model = adversarial(build(name, seed=3), attack)
    t = trace(model, TOKENS, lipschitz=True)
    bound = path_bound(t, "certified", model=model).bound
    # jacobian(mode="frozen") equals the independent jacrev reference on every family (test above)
    _assert_dominates(bound, jacobian(model, TOKENS, mode="frozen").spectral, (name, attack))


def test_every_variant_runs_or_refuses_with_the_typed_error(family):
    name, model, t = family
    for variant in sorted(VARIANTS):
        if name == "bidirectional" or (variant.startswith("certified") and name in REFUSED):
            with pytest.raises(UnsupportedModelError):
                path_bound(t, variant, model=model)
            continue
        bound = path_bound(t, variant, model=model).bound
        assert torch.isfinite(bound).all() and (bound >= 0).all() and bound.sum() > 0, (name, variant)


GQA = sorted(n for n, kw in FAMILIES.items() if kw.get("n_key_value_heads") and n not in REFUSED)


@pytest.mark.hooked  # the ungroup_grouped_query_attention twin is a HookedTransformerConfig knob
@pytest.mark.parametrize("name", GQA)
def test_results_are_invariant_to_gqa_grouping(name):
    grouped = build(name)
    flipped = not FAMILIES[name].get("ungroup_grouped_query_attention", False)
    twin = build(name, ungroup_grouped_query_attention=flipped)
    twin.load_state_dict(grouped.state_dict())
    a, b = (trace(m, TOKENS, lipschitz=True, keep_resid=True) for m in (grouped, twin))
    torch.testing.assert_close(a.patterns, b.patterns, atol=1e-13, rtol=0)
    torch.testing.assert_close(a.value_norms, b.value_norms, atol=1e-13, rtol=1e-12)
    for variant in ("value", "value_rownorm", "certified", "alti", "globenc", "alti_linear", "alti_resid"):
        torch.testing.assert_close(
            path_bound(a, variant, model=grouped).bound, path_bound(b, variant, model=twin).bound, atol=0, rtol=1e-10
        )


def _results(model, name):
    t = trace(model, TOKENS, lipschitz=True)
    out = {
        "y_last": t.y_last,
        "value_norms": t.value_norms,
        "exact": jacobian(model, TOKENS).spectral,
        "frozen": jacobian(model, TOKENS, mode="frozen").spectral,
    }
    if t.mlp_gain is not None:
        out["mlp_gain"] = t.mlp_gain
    if "lipschitz_unsupported" not in t.provenance and model.cfg.attention_dir == "causal":
        out["certified"] = path_bound(t, "certified", model=model).bound
    return out


@pytest.mark.parametrize("name", params(ALL))
def test_every_result_changes_after_an_in_place_weight_edit(name):
    model = build(name, seed=5)
    before = _results(model, name)
    edit_in_place(model)
    after = _results(model, name)
    for key, value in before.items():
        assert not torch.equal(value, after[key]), (name, key)
