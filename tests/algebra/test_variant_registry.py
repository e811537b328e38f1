"""The variant registry: registration rules, capabilities, refusals, the live view, and a proxy added by a
test reaching ``analyze`` with its guarantee (no behaviour may key on a variant's name)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lens_squash.algebra import variant_registry as registry
from lens_squash.algebra.variant_registry import (
    DEFAULT_VARIANTS,
    NEEDS,
    VARIANTS,
    VariantSpec,
    check_variant_names,
    get_variant,
    register_variant,
    unsupported_reason,
    variants_needing,
)
from lens_squash.core.support import UnsupportedModelError
from lens_squash.edge.models import tiny_model


@pytest.fixture()
def scratch(monkeypatch):
    """A copy of the registry for the test to change; the real one is restored afterwards."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._registry()))
    return registry._REGISTRY


def _rollout_as(name: str):
    """A builder that is rollout's graph under another name (what a plugin's builder returns)."""

    def build(trace, model=None, **params):
        return dataclasses.replace(get_variant("rollout").build(trace, model, **params), variant=name)

    return build


def test_builtin_variants_are_registered_with_their_guarantees():
    assert set(DEFAULT_VARIANTS) <= set(VARIANTS)
    bounds = {name for name, spec in VARIANTS.items() if spec.guarantee == "bound"}
    assert bounds == {"certified"}  # paper's assumptions are not checked: it is a proxy
    assert get_variant("paper").guarantee == "proxy" and not get_variant("paper").is_bound
    assert all(spec.needs <= NEEDS and spec.name == name for name, spec in VARIANTS.items())


def test_register_adds_replace_redefines_and_a_duplicate_is_refused(scratch):
    first = VariantSpec("mine", _rollout_as("mine"), "proxy", summary="one")
    assert register_variant(first) is first and VARIANTS["mine"] is first
    assert register_variant(first) is first  # the same spec again is not a conflict
    second = VariantSpec("mine", _rollout_as("mine"), "bound", summary="two")
    with pytest.raises(ValueError, match="'mine' is already registered; pass replace=True"):
        register_variant(second)
    assert VARIANTS["mine"] is first  # the refused one changed nothing
    register_variant(second, replace=True)
    assert VARIANTS["mine"] is second and get_variant("mine").guarantee == "bound"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"needs": frozenset({"telepathy"})}, r"needs unknown capabilities \['telepathy'\]"),
        ({"guarantee": "certainly"}, "guarantee must be one of"),
        ({"name": "has space"}, "letters, digits and '_'"),
        ({"name": ""}, "letters, digits and '_'"),
    ],
)
def test_a_malformed_spec_is_refused_when_built(kwargs, message):
    fields = {"name": "mine", "build": _rollout_as("mine"), "guarantee": "proxy"} | kwargs
    with pytest.raises(ValueError, match=message):
        VariantSpec(**fields)


def test_variants_needing_reads_the_specs_and_refuses_an_unknown_capability(scratch):
    assert variants_needing(["certified"], "mlp_gains") and variants_needing(["rollout", "certified"], "weights")
    assert not variants_needing(["paper", "rollout"], "mlp_gains")
    assert not variants_needing([], "weights")
    register_variant(VariantSpec("needy", _rollout_as("needy"), "proxy", needs=frozenset({"mlp_gains"})))
    assert variants_needing(["rollout", "needy"], "mlp_gains")  # from the spec, not from the name
    with pytest.raises(ValueError, match="unknown capability 'gains'"):
        variants_needing(["certified"], "gains")
    with pytest.raises(ValueError, match="unknown variant 'nope'"):
        variants_needing(["nope"], "weights")


@pytest.mark.hooked  # tiny_model(act_fn='solu') has no transformers twin
def test_unsupported_reason_is_the_specs_refusal_or_none(scratch):
    plain = tiny_model(n_layers=1, d_model=8, d_vocab=16, dtype=torch.float64)
    solu = tiny_model(n_layers=1, d_model=8, d_vocab=16, dtype=torch.float64, act_fn="solu", gated_mlp=True)
    assert unsupported_reason("certified", plain) is None
    assert "SoLU" in unsupported_reason("certified", solu)
    assert unsupported_reason("rollout", solu) is None  # no supports: it applies to every model

    def refuse(model):
        raise UnsupportedModelError("never on this model; use rollout")

    register_variant(VariantSpec("picky", _rollout_as("picky"), "proxy", supports=refuse))
    assert unsupported_reason("picky", plain) == "never on this model; use rollout"

    def crash(model):
        raise RuntimeError("a bug, not a refusal")

    register_variant(VariantSpec("buggy", _rollout_as("buggy"), "proxy", supports=crash))
    with pytest.raises(RuntimeError, match="a bug"):  # only UnsupportedModelError means "cannot apply"
        unsupported_reason("buggy", plain)


def test_the_variants_view_is_live_and_read_only(scratch):
    before = tuple(VARIANTS)
    assert "late" not in VARIANTS and len(VARIANTS) == len(before)
    register_variant(VariantSpec("late", _rollout_as("late"), "proxy"))
    assert tuple(VARIANTS) == (*before, "late") and len(VARIANTS) == len(before) + 1  # registration order
    assert "late" in repr(VARIANTS) and check_variant_names(["late", "rollout"]) == ("late", "rollout")
    with pytest.raises(TypeError):
        VARIANTS["other"] = VARIANTS["late"]  # type: ignore[index]
    with pytest.raises(ValueError, match="unknown variant 'gone'; choose one of paper, "):
        VARIANTS["gone"]
    assert VARIANTS.get("gone") is None and "gone" not in VARIANTS  # a mapping's answers, not an error


def test_a_proxy_registered_here_runs_in_analyze_with_its_guarantee(scratch):
    from lens_squash.experiments.analysis import analyze

    register_variant(VariantSpec("test_proxy", _rollout_as("test_proxy"), "proxy", summary="rollout, renamed"))
    model = tiny_model(n_layers=2, n_heads=2, d_model=16, d_vocab=32, dtype=torch.float64, seed=1)
    tokens = torch.arange(3, 11)
    result = analyze(model, tokens, variants=("test_proxy", "certified"), jacobian_mode="exact")
    proxy, certified = result.bounds["test_proxy"], result.bounds["certified"]
    assert proxy.guarantee_kind == "proxy" and certified.guarantee_kind == "bound"
    # the proxy's numbers are rollout's (its builder), computed through the whole analysis
    rollout = analyze(model, tokens, variants=("rollout",), jacobian_mode=None).bounds["rollout"]
    torch.testing.assert_close(proxy.bound, rollout.bound, atol=0, rtol=0)
    table = result.summary().set_index("variant")
    assert table.loc["test_proxy", "guarantee"] == "proxy" and table.loc["certified", "guarantee"] == "bound"


def test_every_builtin_names_functions_that_exist():
    # the built-in table names its builders as text (so the registry imports no torch): a typo there would
    # only surface when the variant runs, so each name is resolved here
    for spec in VARIANTS.values():
        for lazy in (spec.build, spec.supports):
            if isinstance(lazy, registry.LazyFunction):
                assert callable(lazy.resolve()) and lazy.__name__ == lazy.ref.partition(":")[2]


def test_a_lazy_function_refuses_a_malformed_or_missing_name():
    with pytest.raises(ValueError, match="named 'package.module:function'"):
        VariantSpec("mine", "lens_squash.algebra.variants", "proxy")
    missing = VariantSpec("mine", "lens_squash.algebra.variants:no_such_builder", "proxy")
    with pytest.raises(ValueError, match="has no callable 'no_such_builder'"):
        missing.build(None)


def test_a_lazy_builder_is_called_with_its_arguments(scratch):
    # a spec naming rollout's builder as text builds exactly what the callable spec builds
    model = tiny_model(n_layers=2, n_heads=2, d_model=16, d_vocab=32, dtype=torch.float64, seed=1)
    from lens_squash.edge.trace import trace

    traced = trace(model, torch.arange(3, 9))
    lazy = VariantSpec("lazy", "lens_squash.algebra.variants:_rollout", "proxy")
    torch.testing.assert_close(lazy.build(traced).row(5), get_variant("rollout").build(traced).row(5), atol=0, rtol=0)


def test_the_registry_and_the_cli_names_import_no_torch():
    import json
    import subprocess
    import sys

    code = (
        "import json, sys\nfrom lens_squash.cli_names import VARIANT_NAMES, DEFAULT_VARIANTS\n"
        "print(json.dumps([list(VARIANT_NAMES), list(DEFAULT_VARIANTS), 'torch' in sys.modules]))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    names, defaults, torch_loaded = json.loads(done.stdout)
    assert names == list(VARIANTS) and defaults == list(DEFAULT_VARIANTS) and not torch_loaded
