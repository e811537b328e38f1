"""The flat module names of 0.1 (``lens_squash.variants``, ...) still import, warn, and still hold
every public name they exported then (``tests/data/flat_api_0_1.json``: the ``__all__`` of each
flat module at commit ac2a270, the last before the split into role folders)."""

from __future__ import annotations

import importlib
import json
import sys
import warnings
from pathlib import Path

import pytest

from lens_squash import _legacy

FLAT_API: dict[str, list[str]] = json.loads((Path(__file__).parent / "data" / "flat_api_0_1.json").read_text())
# removed on purpose by the redesign (issue 15), each for a reason
REMOVED = {
    ("attention", "AGGREGATIONS"): "dead: no code read it",
    ("lipschitz", "ov_norms"): "one home: lens_squash.algebra.attention.ov_norms",
    ("plotting", "SPECTRAL_FIELDS"): "string dispatch: the spectral figure reads SpectralReport's fields by name",
    ("tasks", "write_task_figures"): "experiments no longer write views: `lens-squash tasks` writes figures.html",
}
# names that are public functions now: their old modules are refused with a pointer instead
SHADOWING = set(_legacy.SHADOWING)


@pytest.mark.parametrize("old", sorted(set(FLAT_API) - SHADOWING))
def test_an_old_module_name_imports_with_a_warning_and_keeps_its_public_names(old):
    sys.modules.pop(f"lens_squash.{old}", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(f"lens_squash.{old}")
    assert any(issubclass(w.category, DeprecationWarning) and "lens_squash." in str(w.message) for w in caught)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        missing = [name for name in FLAT_API[old] if not hasattr(module, name) and (old, name) not in REMOVED]
    assert missing == [], f"lens_squash.{old} lost {missing}"
    assert all(not hasattr(module, name) for (where, name) in REMOVED if where == old)


@pytest.mark.parametrize("old", sorted(SHADOWING))
def test_a_module_name_that_is_now_a_function_is_refused_with_where_it_went(old):
    with pytest.raises(ModuleNotFoundError, match=f"lens_squash.{_legacy.SHADOWING[old]}"):
        importlib.import_module(f"lens_squash.{old}")
    import lens_squash

    assert callable(getattr(lens_squash, old))  # the refusal did not shadow the function


def test_the_old_trace_and_flow_modules_names_are_all_in_their_new_homes():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for old in SHADOWING:
            module = importlib.import_module(f"lens_squash.{_legacy.SHADOWING[old]}")
            missing = [name for name in FLAT_API[old] if not hasattr(module, name)]
            assert missing == [], f"lens_squash.{_legacy.SHADOWING[old]} lacks {missing} of old lens_squash.{old}"
