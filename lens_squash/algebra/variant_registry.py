"""The registry of path-sum variants: each name with its builder, its guarantee and what it needs.

Behaviour keys on a variant's *capabilities*, never on its name: ``analyze`` traces MLP gains when a
variant ``needs`` them, passes the model's weights when it needs those, asks ``supports`` before a
default variant runs, and every view prints ``guarantee`` beside a variant's numbers, so a proxy is
never read as a bound. In the manner of inseq's attribution registry::

    register_variant(VariantSpec("mine", build, guarantee="proxy", needs=frozenset({"value_norms"})))

A builder is ``build(trace, model=None, **params) -> PathGraph`` (:mod:`lens_squash.algebra.variants`).
Builders registered by this package's own modules are imported on the first lookup
(:data:`_BUILTIN_MODULES`), so the registry is complete whichever module a caller imports first.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ..core.support import UnsupportedModelError

__all__ = [
    "DEFAULT_VARIANTS",
    "VARIANTS",
    "GUARANTEES",
    "NEEDS",
    "UnknownVariantError",
    "VariantSpec",
    "check_variant_names",
    "get_variant",
    "guarantee_of",
    "register_variant",
    "unsupported_reason",
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

#: the variants ``analyze``, ``flow`` and the CLI run when none are named, in display order
DEFAULT_VARIANTS: tuple[str, ...] = ("paper", "rollout", "certified", "value_rownorm")

#: this package's modules that register variants when imported
_BUILTIN_MODULES: tuple[str, ...] = ("lens_squash.algebra.variants", "lens_squash.algebra.contributions")


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

    @property
    def is_bound(self) -> bool:
        return self.guarantee == "bound"


_REGISTRY: dict[str, VariantSpec] = {}
_loaded = False


class UnknownVariantError(KeyError, ValueError):
    """A name nobody registered: a ValueError to callers, and a KeyError so that ``name in VARIANTS``
    and ``VARIANTS.get(name)`` answer as a mapping's do instead of raising."""

    def __str__(self) -> str:
        return str(self.args[0])  # KeyError would quote the message


class _RegistryView(Mapping):
    """A read-only, live view of the registry: name → :class:`VariantSpec`, in registration order."""

    def __getitem__(self, name: str) -> VariantSpec:
        return get_variant(name)

    def __iter__(self):
        return iter(_registry())

    def __len__(self) -> int:
        return len(_registry())

    def __repr__(self) -> str:
        return f"VARIANTS({', '.join(self)})"


#: every registered variant, name → spec (read-only; add one with :func:`register_variant`)
VARIANTS: Mapping[str, VariantSpec] = _RegistryView()


def register_variant(spec: VariantSpec, *, replace: bool = False) -> VariantSpec:
    """Add ``spec`` to the registry (``replace=True`` to redefine a name); returns it."""
    if spec.name in _REGISTRY and not replace and _REGISTRY[spec.name] is not spec:
        raise ValueError(f"variant {spec.name!r} is already registered; pass replace=True to redefine it")
    _REGISTRY[spec.name] = spec
    return spec


def _registry() -> dict[str, VariantSpec]:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)
    return _REGISTRY


def variant_names() -> tuple[str, ...]:
    """Every registered name, in registration order."""
    return tuple(_registry())


def get_variant(name: str) -> VariantSpec:
    registry = _registry()
    if name not in registry:
        raise UnknownVariantError(f"unknown variant {name!r}; choose one of {', '.join(registry)}")
    return registry[name]


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
    unknown = [name for name in names if name not in _registry()]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(map(repr, unknown))}; choose from {known}")
    if len(set(names)) != len(names):
        raise ValueError(f"variants lists a name twice: {list(names)}")
    return names
