"""The package layout as a test: role folders, imports that only run downward, short modules, a light import.

The order is ``core < algebra < edge < experiments < lab < views < cli`` (docs/ARCHITECTURE.md): a module may
import its own layer and the layers below, never one above, not even inside a function. The
top-level ``lens_squash/__init__.py`` (the lazy public API) sits above everything. Each test lists every offender in its failure message.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lens_squash"
ROLES = ("core", "algebra", "edge", "experiments", "lab", "views")  # lowest first
TOP_LEVEL = ("__init__",)  # the package's own API module: above every role
RANK = {role: i for i, role in enumerate(ROLES)} | {"cli": len(ROLES), "top": len(ROLES) + 1}
MAX_LINES = 500


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def dotted(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(name: str) -> str | None:
    """The layer of module ``lens_squash.…`` (``None`` for names outside the package)."""
    parts = name.split(".")
    if parts[0] != "lens_squash":
        return None
    if len(parts) == 1 or parts[1] in TOP_LEVEL:
        return "top"
    if parts[1] in ROLES:
        return parts[1]
    if parts[1].startswith("cli"):
        return "cli"
    return f"<no role: {parts[1]}>"


@dataclass(frozen=True)
class Import:
    module: str  # importing module, dotted
    line: int
    target: str  # imported module, dotted and resolved
    in_function: bool


def _resolve(node: ast.ImportFrom, importer: str, is_package: bool) -> list[str]:
    if node.level == 0:
        base = node.module or ""
    else:
        package = importer.split(".") if is_package else importer.split(".")[:-1]
        up = package[: len(package) - (node.level - 1)]
        base = ".".join(up + ([node.module] if node.module else []))
    # `from . import x` may name a submodule: count it as that module
    return [f"{base}.{alias.name}" if node.module is None else base for alias in node.names]


def _literal_import_module(node: ast.Call, importer: str, is_package: bool) -> str | None:
    """``importlib.import_module("…")`` / ``import_module(".x", __package__)`` with a literal name."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if name != "import_module" or not node.args or not isinstance(node.args[0], ast.Constant):
        return None
    target = node.args[0].value
    if not isinstance(target, str):
        return None
    if not target.startswith("."):
        return target
    level = len(target) - len(target.lstrip("."))
    package = importer.split(".") if is_package else importer.split(".")[:-1]
    rest = target.lstrip(".")
    return ".".join(package[: len(package) - (level - 1)] + ([rest] if rest else []))


def imports_of(path: Path) -> list[Import]:
    importer, is_package = dotted(path), path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend(Import(importer, child.lineno, alias.name, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                found.extend(
                    Import(importer, child.lineno, t, in_function) for t in _resolve(child, importer, is_package)
                )
            elif isinstance(child, ast.Call):
                target = _literal_import_module(child, importer, is_package)
                if target is not None:
                    found.append(Import(importer, child.lineno, target, in_function))
            visit(child, inner)

    visit(tree, False)
    return found


def _report(title: str, offenders: list[str]) -> str:
    return f"{title} ({len(offenders)}):\n  " + "\n  ".join(offenders)


# --- the resolver itself, on a hand-made module ---------------------------------------------------------


def test_the_import_scanner_resolves_relative_imports_and_sees_inside_functions(tmp_path, monkeypatch):
    fake = tmp_path / "lens_squash" / "algebra"
    fake.mkdir(parents=True)
    (fake / "demo.py").write_text(
        "from . import paths\nfrom ..core.records import to_jsonable\nimport lens_squash.edge.trace\n"
        "def plot():\n    from ..views.style import x\n    import importlib\n"
        "    importlib.import_module('..experiments.tasks', __package__)\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "lens_squash")
    got = [(i.line, i.target, i.in_function) for i in imports_of(fake / "demo.py")]
    assert got == [
        (1, "lens_squash.algebra.paths", False),
        (2, "lens_squash.core.records", False),
        (3, "lens_squash.edge.trace", False),
        (5, "lens_squash.views.style", True),
        (6, "importlib", True),
        (7, "lens_squash.experiments.tasks", True),
    ]
    assert [layer(t) for _, t, _ in got] == ["algebra", "core", "edge", "views", None, "experiments"]


# --- the layout goals ------------------------------------------------------------------------------------


def test_every_module_sits_in_a_role_folder():
    loose = []
    for path in modules():
        parts = path.relative_to(PACKAGE).parts
        top = parts[0].removesuffix(".py")
        if len(parts) == 1 and (top in TOP_LEVEL or top.startswith("cli")):
            continue
        if len(parts) > 1 and parts[0] in ROLES:
            continue
        loose.append(str(path.relative_to(PACKAGE.parent)))
    assert not loose, _report(f"modules outside the role folders {ROLES} (or top-level cli*, __init__)", loose)


def test_no_import_runs_upward():
    upward = []
    for path in modules():
        for imp in imports_of(path):
            own, theirs = layer(imp.module), layer(imp.target)
            if theirs is None:
                continue
            if theirs not in RANK or own not in RANK:
                upward.append(f"{imp.module}:{imp.line} imports {imp.target} (a module with no role)")
            elif RANK[theirs] > RANK[own]:
                where = " inside a function" if imp.in_function else ""
                upward.append(f"{imp.module}:{imp.line} ({own}) imports {imp.target} ({theirs}){where}")
    assert not upward, _report(
        "imports that run upward in core < algebra < edge < experiments < lab < views < cli", upward
    )


def test_no_module_is_over_500_lines():
    long = []
    for path in modules():
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > MAX_LINES:
            long.append(f"{path.relative_to(PACKAGE.parent)}: {n} lines")
    assert not long, _report(f"modules over {MAX_LINES} lines", sorted(long, key=lambda s: -int(s.split()[-2])))


def _fresh(code: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, check=True, cwd=PACKAGE.parent
    )
    return json.loads(done.stdout.splitlines()[-1])


def test_import_lens_squash_does_not_import_torch():
    heavy = ("torch", "transformer_lens", "plotly", "pandas", "numpy", "scipy")
    got = _fresh(f"import json, sys, lens_squash\nprint(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))")
    assert got == [], f"`import lens_squash` imported {got}: keep them behind the lazy names"


@pytest.mark.slow  # a fresh interpreter imports torch and TransformerLens
def test_the_torch_check_would_see_torch():
    # the check above reads sys.modules of a fresh interpreter: importing a name that needs torch shows it
    assert _fresh("import json, sys, lens_squash\nlens_squash.Trace\nprint(json.dumps('torch' in sys.modules))")


def test_every_public_name_resolves():
    import lens_squash

    missing = []
    for name in lens_squash.__all__:
        try:
            value = getattr(lens_squash, name)
        except Exception as err:  # noqa: BLE001 - list every broken name, whatever it raises
            missing.append(f"{name}: {type(err).__name__}: {err}")
            continue
        if value is None:
            missing.append(f"{name}: resolves to None")
    assert lens_squash.__all__, "lens_squash.__all__ is empty"
    assert not missing, _report("names in lens_squash.__all__ that do not resolve", missing)


@pytest.mark.parametrize("role", ROLES)
def test_each_role_folder_is_a_package(role):
    assert (PACKAGE / role / "__init__.py").is_file()


def _warn_as(module: str) -> None:
    code = compile("import warnings\nwarnings.warn('an old name', DeprecationWarning)", f"{module}.py", "exec")
    exec(code, {"__name__": module})  # the warning is attributed to ``module``, as from its own code


def test_a_deprecation_warning_from_our_code_fails_the_tests():
    """pyproject's filterwarnings: no compatibility shims hide behind a warning nobody sees; a
    third-party library's deprecation stays quiet."""
    for module in ("lens_squash.core.fake", "tests.fake"):
        with pytest.raises(DeprecationWarning, match="an old name"):
            _warn_as(module)
    _warn_as("somelib.fake")
