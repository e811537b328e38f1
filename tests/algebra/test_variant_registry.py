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
    """A copy of the registry (and of its declarations) for the test to change; the real one is restored
    afterwards."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._registry()))
    for name in ("_DECLARED", "_PACKAGES", "_DECLARED_BY"):
        monkeypatch.setattr(registry, name, dict(getattr(registry, name)))
    monkeypatch.setattr(registry, "_LOADED", set(registry._LOADED))
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


#: the registry before the declarations moved onto the builders (issue 23): names in order, the defaults,
#: each variant's guarantee and needs, and the module of its builder
_TODAY = {
    "paper": ("proxy", set(), "variants"),
    "rollout": ("proxy", set(), "variants"),
    "certified": ("bound", {"weights", "mlp_gains", "norm_scales"}, "variants"),
    "value": ("proxy", {"value_norms", "residual"}, "variants"),
    "value_rownorm": ("proxy", {"value_norms", "residual"}, "variants"),
    "certified_rownorm": ("proxy", {"weights", "mlp_gains", "norm_scales"}, "variants"),
    **{
        name: ("proxy", {"weights", "residual", "norm_scales"}, "contributions")
        for name in ("alti", "globenc", "alti_linear", "alti_resid", "alti_skip")
    },
}


def test_the_declared_builtins_are_todays_lists_and_specs():
    from lens_squash.algebra.blocks import block_shape

    assert registry.variant_names() == tuple(_TODAY) and tuple(VARIANTS) == tuple(_TODAY)
    assert DEFAULT_VARIANTS == ("paper", "rollout", "certified", "value_rownorm")
    for name, (guarantee, needs, module) in _TODAY.items():
        spec = get_variant(name)
        assert (spec.guarantee, set(spec.needs)) == (guarantee, needs), name
        assert spec.build.__module__ == f"lens_squash.algebra.{module}" and spec.summary and spec.statement, name
        # the variants that read the block's weights refuse what the block shapes do not model
        assert spec.supports is (block_shape if "weights" in needs else None), name


def _package(root, name: str, modules: dict[str, str]) -> str:
    """A temporary package ``name`` under ``root`` holding ``modules`` (module name → source)."""
    folder = root / name
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    for module, source in modules.items():
        (folder / f"{module}.py").write_text(source)
    return name


_PLUGIN = """
import dataclasses
from lens_squash.algebra.variant_registry import get_variant, variant
{imports}

@variant("{name}", guarantee="proxy", needs={{"residual"}}, summary="rollout, renamed")
def build(trace, model=None, **params):
    return dataclasses.replace(get_variant("rollout").build(trace, model, **params), variant="{name}")
"""


def test_a_variant_declared_in_a_new_module_is_listed_without_torch_and_runs(tmp_path, monkeypatch, scratch):
    import json
    import subprocess
    import sys

    package = _package(tmp_path, "lsq_plugin_a", {"mine": _PLUGIN.format(name="plugin_rollout", imports="")})
    code = (
        f"import json, sys\nsys.path.insert(0, {str(tmp_path)!r})\n"
        "from lens_squash.algebra import variant_registry as r\n"
        f"found = r.discover_variants({package!r})\n"
        "print(json.dumps([list(found), list(r.variant_names()), 'torch' in sys.modules, 'lsq_plugin_a.mine' in sys.modules]))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    found, names, torch_loaded, imported = json.loads(done.stdout)
    assert found == ["plugin_rollout"] and names == [*_TODAY, "plugin_rollout"] and not (torch_loaded or imported)

    monkeypatch.syspath_prepend(str(tmp_path))
    assert registry.discover_variants(package) == ("plugin_rollout",) and "plugin_rollout" in VARIANTS
    assert "lsq_plugin_a.mine" not in sys.modules  # declared from its source, imported on first use
    spec = get_variant("plugin_rollout")
    assert spec.guarantee == "proxy" and spec.needs == {"residual"} and spec.build.__module__ == "lsq_plugin_a.mine"
    from lens_squash.algebra.variants import path_bound
    from lens_squash.edge.trace import trace

    model = tiny_model(n_layers=2, n_heads=2, d_model=16, d_vocab=32, dtype=torch.float64, seed=1)
    traced = trace(model, torch.arange(3, 9))
    mine, rollout = path_bound(traced, "plugin_rollout", target_pos=5), path_bound(traced, "rollout", target_pos=5)
    assert mine.variant == "plugin_rollout"
    torch.testing.assert_close(mine.bound, rollout.bound, atol=0, rtol=0)


def test_declarations_follow_module_imports_then_source_order(tmp_path):
    # "a_late" imports "z_base", so its variants come after z_base's although "a" sorts first
    late = _PLUGIN.format(name="late", imports="from . import z_base") + _PLUGIN.format(name="later", imports="")
    package = _package(tmp_path, "lsq_plugin_b", {"a_late": late, "z_base": _PLUGIN.format(name="base", imports="")})
    found = registry.declared_in(tmp_path / package, package)
    assert [(d.name, d.module) for d in found] == [
        ("base", "lsq_plugin_b.z_base"),
        ("late", "lsq_plugin_b.a_late"),
        ("later", "lsq_plugin_b.a_late"),
    ]


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("NAME = 'x'\n@variant(NAME, guarantee='proxy')\ndef b(trace): pass\n", "with a literal name"),
        ("@variant('x', guarantee='proxy', default=FLAG)\ndef b(trace): pass\n", "literal default=True or False"),
    ],
)
def test_a_declaration_the_scan_cannot_read_is_refused(tmp_path, source, message):
    package = _package(tmp_path, "lsq_plugin_c", {"bad": source})
    with pytest.raises(ValueError, match=message):
        registry.declared_in(tmp_path / package, package)


def test_a_plugin_may_not_add_defaults_or_take_a_builtin_name(tmp_path, monkeypatch, scratch):
    monkeypatch.syspath_prepend(str(tmp_path))
    default = "from lens_squash.algebra.variant_registry import variant\n"
    default += "@variant('mine', guarantee='proxy', default=True)\ndef b(trace): pass\n"
    _package(tmp_path, "lsq_plugin_d", {"mine": default})
    with pytest.raises(ValueError, match="default=True is for lens_squash's built-ins"):
        registry.discover_variants("lsq_plugin_d")
    _package(tmp_path, "lsq_plugin_e", {"mine": _PLUGIN.format(name="rollout", imports="")})
    with pytest.raises(ValueError, match="'rollout' of lsq_plugin_e.mine is already declared in lens_squash"):
        registry.discover_variants("lsq_plugin_e")


def test_a_declaration_that_does_not_register_on_import_is_refused(tmp_path, monkeypatch, scratch):
    # a variant(...) call inside a function is found by the scan but registers nothing when imported
    source = "from lens_squash.algebra.variant_registry import variant\n"
    source += "def later():\n    return variant('hidden', guarantee='proxy')(lambda trace: None)\n"
    monkeypatch.syspath_prepend(str(tmp_path))
    _package(tmp_path, "lsq_plugin_f", {"mine": source})
    assert registry.discover_variants("lsq_plugin_f") == ("hidden",)
    with pytest.raises(ValueError, match=r"declares variants \['hidden'\] in its source but registered \[\]"):
        get_variant("hidden")


def test_a_replacement_registered_before_its_module_is_imported_wins(tmp_path, monkeypatch, scratch):
    import sys

    monkeypatch.syspath_prepend(str(tmp_path))
    _package(tmp_path, "lsq_plugin_g", {"mine": _PLUGIN.format(name="swapped", imports="")})
    registry.discover_variants("lsq_plugin_g")
    with pytest.raises(ValueError, match="'swapped' is already registered"):  # declared: taken before import
        register_variant(VariantSpec("swapped", _rollout_as("swapped"), "bound"))
    replacement = VariantSpec("swapped", _rollout_as("swapped"), "bound")
    monkeypatch.delitem(sys.modules, "lsq_plugin_g.mine")
    monkeypatch.setattr(registry, "_LOADED", registry._LOADED - {"lsq_plugin_g.mine"})
    monkeypatch.setattr(registry, "_DECLARED_BY", {})
    register_variant(replacement, replace=True)
    assert get_variant("swapped") is replacement  # the module's import (now) kept the replacement


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
