"""The figure registry: each builder declares its ``(result class, kind)`` in its own views module, and
importing :mod:`lens_squash.views.registry` discovers them all. The table is the one the single
registry module held before (issue 23): the same kinds per class and the same default kind, whatever
order the views modules are imported in."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import lens_squash.views
from lens_squash.core import results
from lens_squash.core.results import figure_kinds
from lens_squash.views import registry

#: class name → (default kind, every kind), as lens_squash/views/registry.py registered them before the move
_TODAY = {
    "Trace": ("attention", {"attention", "head_view"}),
    "JacobianResult": ("norm", {"norm", "spectral", "frobenius", "l1"}),
    "PathBound": ("profile", {"profile", "flows", "paths"}),
    "BoundFlows": ("edges", {"edges"}),
    "Comparison": ("statistics", {"statistics"}),
    "SpectralReport": ("report", {"report"}),
    "SinkReport": ("curves", {"curves"}),
    "TVDecayResult": ("tv", {"tv"}),
    "SensitivityFlow": ("layers", {"layers", "heatmap", "heads", "paths", "connected"}),
    "FlowPaths": ("paths", {"paths", "connected"}),
    "Analysis": ("bounds", {"bounds", "attention", "spectral", "sinks", "page", "head_view"}),
    "ManyAnalyses": ("spearman", {"spearman", "page"}),
    "RunComparison": ("curves", {"curves"}),
    "CollapseResult": ("dtypes", {"dtypes", "heads"}),
    "WindowSweepResult": ("distance", {"distance", "bound"}),
    "PECollapseResult": ("distance", {"distance"}),
    "RatioInvarianceResult": ("distance", {"distance"}),
    "AblationResult": ("changes", {"changes", "jacobian"}),
    "MixingResult": ("spread", {"spread", "heatmap", "heads", "jacobian"}),
    "LabRun": ("training", {"training"}),
    "LabGrid": ("sink_share", {"sink_share", "spread", "training"}),
    "TaskResults": ("accuracy", {"accuracy", "abs_error", "histogram", "prompt_types"}),
    "CopySensitivity": ("sensitivity", {"sensitivity"}),
    "CountCollapse": ("distances", {"distances"}),
}

#: the table as a subprocess prints it, after importing the views modules in the order given
_TABLE = (
    "import importlib, json, sys\n"
    "for name in sys.argv[1:]:\n"
    "    importlib.import_module(name)\n"
    "from lens_squash.core import results\n"
    "import lens_squash.views.registry\n"
    "print(json.dumps({c.__name__: [results._DEFAULT_KIND[c], sorted(k)] for c, k in results._FIGURES.items()}))"
)


def _table() -> dict[str, tuple[str, set[str]]]:
    return {cls.__name__: (results._DEFAULT_KIND[cls], set(kinds)) for cls, kinds in results._FIGURES.items()}


def test_every_views_module_is_imported():
    names = {info.name for info in pkgutil.iter_modules(lens_squash.views.__path__)} - {"registry"}
    assert set(registry.FIGURE_MODULES) == {f"lens_squash.views.{name}" for name in names}
    assert all(name in sys.modules for name in registry.FIGURE_MODULES)


def test_the_discovered_table_is_todays():
    assert _table() == _TODAY
    assert registry.HTML_KINDS == {"page", "head_view"}
    for cls in results._FIGURES:  # plot() lists the default first, then the others by name
        default, kinds = _TODAY[cls.__name__]
        assert figure_kinds(cls) == (default, *sorted(kinds - {default}))


@pytest.mark.slow  # a fresh interpreter imports torch, TransformerLens and plotly: 20 s under load
def test_the_defaults_do_not_depend_on_the_import_order():
    # a class whose kinds live in several modules marks its default; imported backwards, nothing changes
    modules = sorted(registry.FIGURE_MODULES, reverse=True)
    done = subprocess.run(
        [sys.executable, "-c", _TABLE, *modules],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        cwd=Path(lens_squash.views.__file__).parents[2],
    )
    table = {name: (default, set(kinds)) for name, (default, kinds) in json.loads(done.stdout).items()}
    assert table == _TODAY
