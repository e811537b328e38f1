"""The flat module names of lens_squash 0.1 (``lens_squash.variants``, ...), kept importable.

The package is now split by role (core, algebra, edge, experiments, views; docs/ARCHITECTURE.md).
Importing an old name gives the moved module itself, with a DeprecationWarning that names the new
path; an old module that was split in two layers (``sinks``: pure metrics in algebra, the
model-running ``sink_analysis`` in experiments) gives a module that looks a name up in each part. ``lens_squash.trace`` and ``lens_squash.flow`` are not aliased: those names are the public
functions, and a module of the same name would shadow them (an import error says where they went).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

# old flat module -> its home now
MOVED: dict[str, str] = {
    **{m: f"core.{m}" for m in "shapes records display support progress validate".split()},
    **{
        m: f"algebra.{m}"
        for m in "attention blocks paths variants spectral softmax_theory compare ranks sinks flow_paths".split()
    },
    **{m: f"edge.{m}" for m in "models jacobian lipschitz allocator".split()},
    **{
        m: f"experiments.{m}"
        for m in (
            "analysis ablation collapse collapse_families collapse_passes synthetic tasks task_theory suite many"
        ).split()
    },
    **{m: f"views.{m}" for m in "plotting report export flow_views".split()},
}
# old modules whose names now live in several modules, searched in this order
SPLIT: dict[str, tuple[str, ...]] = {
    "collapse": ("experiments.collapse", "experiments.collapse_windows"),
    "sinks": (
        "algebra.sinks",
        "algebra.sinks_legacy",
        "algebra.massive",
        "algebra.compression",
        "algebra.phases",
        "experiments.sinks",
    ),
}
# names that are functions in the public API: never shadow them with a module
SHADOWING = {"trace": "edge.trace", "flow": "edge.flow"}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.partition(".")
        if package != "lens_squash" or "." in name:
            return None
        if name in SHADOWING:
            raise ModuleNotFoundError(
                f"lens_squash.{name} is a function now; its module moved to lens_squash.{SHADOWING[name]} "
                f"(use `from lens_squash.{SHADOWING[name]} import ...` or `lens_squash.{name}(...)`)",
                name=fullname,
            )
        if name not in MOVED and name not in SPLIT:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        old = spec.name.split(".", 1)[1]
        if old in SPLIT:
            return _merged(spec.name, ["lens_squash." + part for part in SPLIT[old]])
        new = "lens_squash." + MOVED[old]
        warnings.warn(f"{spec.name} moved to {new}; import it from there", DeprecationWarning, stacklevel=3)
        return importlib.import_module(new)

    def exec_module(self, module):
        pass  # the moved module is already executed


def _merged(name: str, parts: list[str]) -> types.ModuleType:
    warnings.warn(f"{name} was split into {', '.join(parts)}; import from those", DeprecationWarning, stacklevel=4)
    modules = [importlib.import_module(part) for part in parts]
    merged = types.ModuleType(name, f"Deprecated: the names of {', '.join(parts)}.")

    def lookup(attribute: str):
        for module in modules:
            if hasattr(module, attribute):
                return getattr(module, attribute)
        raise AttributeError(f"module {name!r} has no attribute {attribute!r} (searched {', '.join(parts)})")

    merged.__getattr__ = lookup  # PEP 562 on the module object
    merged.__all__ = sorted({n for module in modules for n in getattr(module, "__all__", ())})
    return merged


def install() -> None:
    if not any(isinstance(finder, _Alias) for finder in sys.meta_path):
        sys.meta_path.append(_Alias())
