"""The registry of path-sum variants: each name with its builder, its guarantee and what it needs.

Behaviour keys on a variant's *capabilities*, never on its name: ``analyze`` traces MLP gains when a
variant ``needs`` them, passes the model's weights when it needs those, asks ``supports`` before a
default variant runs, and every view prints ``guarantee`` beside a variant's numbers, so a proxy is
never read as a bound. In the manner of inseq's attribution registry::

    register_variant(VariantSpec("mine", build, guarantee="proxy", needs=frozenset({"value_norms"})))

A builder is ``build(trace, model=None, **params) -> PathGraph`` (:mod:`lens_squash.algebra.variants`).

**A built-in variant is declared on its builder**, in the algebra module that defines it::

    @variant("rollout", guarantee="proxy", default=True, summary="...", statement="...")
    def _rollout(trace, model=None, *, head_scores=None) -> PathGraph: ...

Adding one is that decorator and its test, nothing else. The command line must list the names without
importing torch (``lens-squash --help``), so this module never imports the algebra: it reads the
algebra package's *source* with :mod:`ast` and collects each ``variant("name", default=...)`` call
(a literal name and default, or the scan refuses it). The spec itself is registered when its module is
imported, on the first :func:`get_variant` that needs it. A package outside lens_squash declares its
own the same way and calls :func:`discover_variants` with its name (or registers specs directly).
Order: modules in import order (a module's variants follow those of the sibling modules it imports),
then source order; ``DEFAULT_VARIANTS`` is the built-ins marked ``default=True``, in that order.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..core.support import UnsupportedModelError

__all__ = [
    "DEFAULT_VARIANTS",
    "VARIANTS",
    "GUARANTEES",
    "NEEDS",
    "UnknownVariantError",
    "Declared",
    "VariantSpec",
    "LazyFunction",
    "check_variant_names",
    "declared_in",
    "discover_variants",
    "get_variant",
    "guarantee_of",
    "register_variant",
    "unsupported_reason",
    "variant",
    "variant_names",
    "variants_needing",
]

#: what a variant's numbers promise. ``bound``: an upper bound on the (frozen) Jacobian norm that
#: holds for every weight and input the variant accepts (the conformance suite tests it under
#: adversarial weights). ``proxy``: a ranking or share of where sensitivity lives, with no inequality.
GUARANTEES: tuple[str, ...] = ("bound", "proxy")

#: what a builder may need beyond the trace's patterns:
#: ``weights`` (the model is passed as ``model=``), ``mlp_gains`` (``trace(..., lipschitz=True)``),
#: ``value_norms`` (‖v W_O‖ per head: ``attn.hook_v`` and ``W_O``), ``norm_scales`` (the traced
#: ``hook_scale`` of every norm), ``residual`` (the residual stream's norms or vectors)
NEEDS: frozenset[str] = frozenset({"weights", "mlp_gains", "value_norms", "norm_scales", "residual"})


@dataclass(frozen=True)
class LazyFunction:
    """A function named ``"package.module:function"``, imported on its first call (so a table of them
    imports nothing heavy)."""

    ref: str

    def __post_init__(self) -> None:
        module, sep, name = self.ref.partition(":")
        if not (module and sep and name.isidentifier()):
            raise ValueError(f"a lazy function is named 'package.module:function', got {self.ref!r}")

    def resolve(self) -> Callable[..., Any]:
        """The function itself (its module imported now)."""
        module, _, name = self.ref.partition(":")
        found = getattr(importlib.import_module(module), name, None)
        if not callable(found):
            raise ValueError(f"{self.ref!r} names no function: {module} has no callable {name!r}")
        return found

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.resolve()(*args, **kwargs)

    @property
    def __name__(self) -> str:
        return self.ref.partition(":")[2]


@dataclass(frozen=True)
class VariantSpec:
    """One registered variant.

    ``supports(model)`` raises :class:`UnsupportedModelError` saying what is missing when the variant
    cannot apply to ``model`` (``None``: it applies to every model the trace can read). ``streams``:
    its row can be swept layer by layer on a trace that streamed its patterns (long prompts).
    """

    name: str
    build: Callable[..., Any]
    guarantee: Literal["bound", "proxy"]
    needs: frozenset[str] = frozenset()
    supports: Callable[[Any], Any] | None = None
    streams: bool = True
    summary: str = ""
    #: the exact statement of the guarantee (for a bound) or of what the proxy estimates
    statement: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").isalnum():
            raise ValueError(f"a variant name is letters, digits and '_', got {self.name!r}")
        if self.guarantee not in GUARANTEES:
            raise ValueError(f"variant {self.name!r}: guarantee must be one of {GUARANTEES}, got {self.guarantee!r}")
        unknown = set(self.needs) - NEEDS
        if unknown:
            raise ValueError(
                f"variant {self.name!r} needs unknown capabilities {sorted(unknown)}; known: {sorted(NEEDS)}"
            )
        object.__setattr__(self, "needs", frozenset(self.needs))
        for name in ("build", "supports"):  # a name is imported when first called
            if isinstance(getattr(self, name), str):
                object.__setattr__(self, name, LazyFunction(getattr(self, name)))

    @property
    def is_bound(self) -> bool:
        return self.guarantee == "bound"


_REGISTRY: dict[str, VariantSpec] = {}


@dataclass(frozen=True)
class Declared:
    """A ``variant("name", ...)`` call found in a module's source: known before the module is imported."""

    name: str
    module: str
    default: bool = False


#: every declared variant, name → declaration, in discovery order (the built-ins first)
_DECLARED: dict[str, Declared] = {}
#: the packages already scanned, each with its declarations
_PACKAGES: dict[str, tuple[Declared, ...]] = {}
#: module → the names its ``variant`` decorators registered when it was imported
_DECLARED_BY: dict[str, list[str]] = {}
#: the declaring modules imported and checked against their declarations
_LOADED: set[str] = set()


class UnknownVariantError(KeyError, ValueError):
    """A name nobody registered: a ValueError to callers, and a KeyError so that ``name in VARIANTS``
    and ``VARIANTS.get(name)`` answer as a mapping's do instead of raising."""

    def __str__(self) -> str:
        return str(self.args[0])  # KeyError would quote the message


class _RegistryView(Mapping):
    """A read-only, live view of the registry: name → :class:`VariantSpec`, in :func:`variant_names` order.
    Iterating, ``len`` and ``in`` read names only (no torch); a value imports its declaring module."""

    def __getitem__(self, name: str) -> VariantSpec:
        return get_variant(name)

    def __iter__(self):
        return iter(variant_names())

    def __len__(self) -> int:
        return len(variant_names())

    def __contains__(self, name: object) -> bool:
        return name in variant_names()

    def __repr__(self) -> str:
        return f"VARIANTS({', '.join(self)})"


#: every registered variant, name → spec (read-only; add one with :func:`register_variant`)
VARIANTS: Mapping[str, VariantSpec] = _RegistryView()


# --------------------------------------------------------------------------------------------------
# declaring (the decorator) and discovering (the source scan) variants
# --------------------------------------------------------------------------------------------------


def variant(
    name: str,
    *,
    guarantee: Literal["bound", "proxy"],
    needs: Iterable[str] = (),
    supports: Callable[[Any], Any] | str | None = None,
    streams: bool = True,
    default: bool = False,
    summary: str = "",
    statement: str = "",
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare the decorated builder as variant ``name`` (the fields of :class:`VariantSpec`).

    ``name`` and ``default`` must be literals: the registry reads them from the source without importing
    the module. ``default=True`` puts a built-in in :data:`DEFAULT_VARIANTS`. Returns the builder unchanged.
    """
    module = sys._getframe(1).f_globals.get("__name__", "")  # the module the declaration is written in

    def declare(build: Callable[..., Any]) -> Callable[..., Any]:
        declared = _DECLARED.get(name)
        if default and not (declared and declared.default):
            raise ValueError(f"variant {name!r}: default=True is for lens_squash's built-ins; pass variants= to run it")
        existing = _REGISTRY.get(name)
        if existing is not None and not (declared and declared.module == module):
            raise ValueError(f"variant {name!r} is already registered; pass replace=True to register_variant")
        _DECLARED_BY.setdefault(module, []).append(name)
        if existing is None:  # a replacement registered before this module was imported wins
            _REGISTRY[name] = VariantSpec(
                name, build, guarantee, frozenset(needs), supports, streams, summary, statement
            )
        return build

    return declare


def _variant_calls(tree: ast.AST):
    """Every ``variant(...)`` / ``x.variant(...)`` call in a module's syntax tree."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if (isinstance(func, ast.Name) and func.id == "variant") or (
                isinstance(func, ast.Attribute) and func.attr == "variant"
            ):
                yield node


def _literal(call: ast.Call, where: str) -> tuple[str, bool]:
    """The call's literal name and default, or a ValueError saying how to write them."""
    name = call.args[0] if call.args else None
    default = next((k.value for k in call.keywords if k.arg == "default"), ast.Constant(False))
    if not (isinstance(name, ast.Constant) and isinstance(name.value, str)):
        raise ValueError(f"{where}:{call.lineno}: declare a variant with a literal name, variant('name', ...)")
    if not (isinstance(default, ast.Constant) and isinstance(default.value, bool)):
        raise ValueError(f"{where}:{call.lineno}: variant {name.value!r} needs a literal default=True or False")
    return name.value, default.value


def _sibling_imports(tree: ast.Module, package: str) -> set[str]:
    """The modules of ``package`` this module imports directly (``from .x import``, ``from . import x``)."""
    found = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            absolute = node.module if node.level == 0 else None
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(alias.name for alias in node.names)
            elif absolute and absolute.startswith(package + "."):
                found.add(absolute[len(package) + 1 :].split(".")[0])
    return found


def _in_import_order(imports: dict[str, set[str]]) -> list[str]:
    """Module names, each after the others it imports, ties by name (a cycle keeps name order)."""
    order: list[str] = []
    waiting = sorted(imports)
    while waiting:
        ready = [m for m in waiting if not (imports[m] & set(waiting)) - {m}] or waiting[:1]
        order.append(ready[0])
        waiting.remove(ready[0])
    return order


_HERE = Path(__file__).resolve()
_CALL = re.compile(r"(?<![\w])variant\(")  # variant(...) or x.variant(...), not get_variant(...)


def declared_in(directory: Path, package: str) -> tuple[Declared, ...]:
    """The ``variant`` declarations in the modules of ``package`` (its sources in ``directory``), read
    with :mod:`ast`, nothing imported; in module import order, then source order."""
    calls: dict[str, list[tuple[str, bool]]] = {}
    imports: dict[str, set[str]] = {}
    for path in sorted(Path(directory).glob("*.py")):
        if path.resolve() == _HERE:  # this module defines variant() and declares none
            continue
        text = path.read_text(encoding="utf-8")
        if not _CALL.search(text):  # most modules: no parse
            continue
        tree = ast.parse(text, filename=str(path))
        found = [_literal(call, str(path)) for call in _variant_calls(tree)]
        if found:
            calls[path.stem], imports[path.stem] = found, _sibling_imports(tree, package)
    return tuple(
        Declared(name, package if stem == "__init__" else f"{package}.{stem}", default)
        for stem in _in_import_order(imports)
        for name, default in calls[stem]
    )


def _add_declarations(package: str, declarations: tuple[Declared, ...]) -> tuple[str, ...]:
    for d in declarations:
        if d.name in _DECLARED or d.name in _REGISTRY:
            where = _DECLARED[d.name].module if d.name in _DECLARED else "register_variant"
            raise ValueError(f"variant {d.name!r} of {d.module} is already declared in {where}; rename one")
    _DECLARED.update((d.name, d) for d in declarations)
    _PACKAGES[package] = declarations
    return tuple(d.name for d in declarations)


def discover_variants(package: str) -> tuple[str, ...]:
    """Declare the variants that ``package``'s modules declare with :func:`variant`, without importing
    them (each is imported on first use); returns their names. Built-ins alone may be defaults."""
    if package in _PACKAGES:
        return tuple(d.name for d in _PACKAGES[package])
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"{package!r} is not an importable package; pass a package name such as 'my_plugin'")
    found = tuple(d for directory in spec.submodule_search_locations for d in declared_in(Path(directory), package))
    defaults = [d.name for d in found if d.default]
    if defaults:
        raise ValueError(f"{package}: default=True is for lens_squash's built-ins ({defaults}); drop it")
    return _add_declarations(package, found)


def _load(module: str) -> None:
    """Import a declaring module and check that it registered exactly what its source declares."""
    if module in _LOADED:
        return
    importlib.import_module(module)
    expected = sorted(d.name for d in _DECLARED.values() if d.module == module)
    registered = sorted(_DECLARED_BY.get(module, ()))
    if expected != registered:
        raise ValueError(
            f"{module} declares variants {expected} in its source but registered {registered} on import; "
            "declare each once, at module level, with variant('literal name', ...)"
        )
    _LOADED.add(module)


# --------------------------------------------------------------------------------------------------
# looking variants up
# --------------------------------------------------------------------------------------------------


def register_variant(spec: VariantSpec, *, replace: bool = False) -> VariantSpec:
    """Add ``spec`` to the registry (``replace=True`` to redefine a name); returns it."""
    if not replace and spec.name in _DECLARED:
        _load(_DECLARED[spec.name].module)  # a declared name is taken even before its module is imported
    if spec.name in _REGISTRY and not replace and _REGISTRY[spec.name] is not spec:
        raise ValueError(f"variant {spec.name!r} is already registered; pass replace=True to redefine it")
    _REGISTRY[spec.name] = spec
    return spec


def _registry() -> dict[str, VariantSpec]:
    """Every spec, name → spec in :func:`variant_names` order (every declaring module imported)."""
    for module in dict.fromkeys(d.module for d in _DECLARED.values()):
        _load(module)
    return {name: _REGISTRY[name] for name in variant_names()}


def variant_names() -> tuple[str, ...]:
    """Every name, declared or registered (no import): the declared in discovery order, then the rest
    in registration order."""
    return (*_DECLARED, *(name for name in _REGISTRY if name not in _DECLARED))


def get_variant(name: str) -> VariantSpec:
    if name in _DECLARED:
        _load(_DECLARED[name].module)
    if name not in _REGISTRY:
        raise UnknownVariantError(f"unknown variant {name!r}; choose one of {', '.join(variant_names())}")
    return _REGISTRY[name]


def guarantee_of(name: str) -> str:
    return get_variant(name).guarantee


def variants_needing(names, capability: str) -> bool:
    """Whether any of ``names`` needs ``capability`` (one of :data:`NEEDS`)."""
    if capability not in NEEDS:
        raise ValueError(f"unknown capability {capability!r}; known: {sorted(NEEDS)}")
    return any(capability in get_variant(name).needs for name in names)


def unsupported_reason(name: str, model) -> str | None:
    """Why variant ``name`` cannot apply to ``model``, or ``None`` when it can."""
    spec = get_variant(name)
    if spec.supports is None:
        return None
    try:
        spec.supports(model)
    except UnsupportedModelError as err:
        return str(err)
    return None


def check_variant_names(variants) -> tuple[str, ...]:
    """``variants`` as a tuple of registered, distinct names; a clear error otherwise."""
    names = (variants,) if isinstance(variants, str) else tuple(variants)
    known = ", ".join(variant_names())
    if not names:
        raise ValueError(f"variants is empty; pass None for the defaults or some of {known}")
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(map(repr, unknown))}; choose from {known}")
    if len(set(names)) != len(names):
        raise ValueError(f"variants lists a name twice: {list(names)}")
    return names


# the built-ins: every variant declared in this package's modules (read, not imported)
_add_declarations(__package__, declared_in(Path(__file__).parent, __package__))

#: the variants ``analyze``, ``flow`` and the CLI run when none are named (built-ins declared
#: ``default=True``), in display order
DEFAULT_VARIANTS: tuple[str, ...] = tuple(d.name for d in _DECLARED.values() if d.default)
