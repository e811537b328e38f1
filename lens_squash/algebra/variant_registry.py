"""The registry of path-sum variants: each name with its builder, its guarantee and what it needs.

Behaviour keys on a variant's *capabilities*, never on its name: ``analyze`` traces MLP gains when a
variant ``needs`` them, passes the model's weights when it needs those, asks ``supports`` before a
default variant runs, and every view prints ``guarantee`` beside a variant's numbers, so a proxy is
never read as a bound. In the manner of inseq's attribution registry::

    register_variant(VariantSpec("mine", build, guarantee="proxy", needs=frozenset({"value_norms"})))

A builder is ``build(trace, model=None, **params) -> PathGraph`` (:mod:`lens_squash.algebra.variants`).

This module is the one place a built-in variant is declared (:data:`_BUILTIN` below): its name, its
default status, its guarantee, what it needs, and its builder and ``supports`` check named as
``"module:function"``, imported on first call. So the module imports no torch, and the command line
(:mod:`lens_squash.cli_names`) reads its choices from here while ``lens-squash --help`` stays light.
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
    "LazyFunction",
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


# --------------------------------------------------------------------------------------------------
# the built-in variants: adding one is a line here (its builder a function of its algebra module)
# --------------------------------------------------------------------------------------------------

_V, _C, _BLOCKS = "lens_squash.algebra.variants:", "lens_squash.algebra.contributions:", "lens_squash.algebra.blocks:"
_SHARES = "shares of where sensitivity lives, with no inequality to the Jacobian"
_CERTIFIED_NEEDS = frozenset({"weights", "mlp_gains", "norm_scales"})
_CONTRIBUTION_NEEDS = frozenset({"weights", "residual", "norm_scales"})
_CONTRIBUTION_SHARES = (
    "shares of where the target's information comes from (token-to-token contributions composed like rollout), "
    "with no inequality to the Jacobian"
)
_SKIP_STATEMENT = (
    "shares, with no inequality to the Jacobian. Derivation: the block's Jacobian is ∂y_j/∂x_k = δ_jk I + A_jk W_VO "
    "∂N1(x_k), so a unit of sensitivity at y_j passes whole (gain 1) through the skip connection, however much "
    "attention writes, while ALTI credits the residual only its share sign(y_j)·x_j / ‖y_j‖₁, which shrinks as "
    "others write (every rollout then decays from the last token's own stream). Here the skip keeps gain 1 and "
    "each attention edge k → j weighs the share of y_j it wrote, max(0, sign(y_j)·attn_jk) / ‖y_j‖₁ (first-order "
    "ALTI, residual coordinates); the row I + shares is scaled back to sum 1, as attention rollout scales I + A"
)
_BUILTIN: tuple[VariantSpec, ...] = (
    VariantSpec("paper", _V + "_paper", "proxy", summary="Theorem B.5's path sum with the user's β's and σ_ψ",
                statement="a bound only where Theorem B.5's Lipschitz and normalisation assumptions hold, which "
                "lens_squash does not check; on real models read it as a path-sum proxy"),
    VariantSpec("rollout", _V + "_rollout", "proxy", summary="attention rollout (Abnar & Zuidema), Prop. B.8's setting",
                statement=_SHARES),
    VariantSpec("certified", _V + "_certified", "bound", needs=_CERTIFIED_NEEDS, supports=_BLOCKS + "block_shape",
                summary="frozen-model path sum with every norm and MLP gain",
                statement="an upper bound on ‖∂y_n/∂v_i‖₂ of the model with attention patterns and norm scales frozen"),
    VariantSpec("value", _V + "_value", "proxy", needs=frozenset({"value_norms", "residual"}),
                summary="‖v W_O‖-weighted attention (Kobayashi et al. 2020)", statement=_SHARES),
    VariantSpec("value_rownorm", _V + "_value_rownorm", "proxy", needs=frozenset({"value_norms", "residual"}),
                summary="value, each row scaled to sum 1", statement=_SHARES),
    VariantSpec("certified_rownorm", _V + "_certified_rownorm", "proxy", needs=_CERTIFIED_NEEDS,
                supports=_BLOCKS + "block_shape", summary="certified's graph, each row scaled to sum 1",
                statement=_SHARES),
    VariantSpec("alti", _C + "build_alti", "proxy", needs=_CONTRIBUTION_NEEDS, supports=_BLOCKS + "block_shape",
                summary="ALTI: L1 contributions with the residual, in the next norm's coordinates",
                statement=_CONTRIBUTION_SHARES),
    VariantSpec("globenc", _C + "build_globenc", "proxy", needs=_CONTRIBUTION_NEEDS, supports=_BLOCKS + "block_shape",
                summary="GlobEnc: ‖N T_jk‖₂ with the residual and the next norm", statement=_CONTRIBUTION_SHARES),
    VariantSpec("alti_linear", _C + "build_alti_linear", "proxy", needs=_CONTRIBUTION_NEEDS,
                supports=_BLOCKS + "block_shape", statement=_CONTRIBUTION_SHARES,
                summary="ALTI to first order: max(0, sign(N y_j)·N T_jk), at the cost of the attention scores"),
    VariantSpec("alti_resid", _C + "build_alti_resid", "proxy", needs=_CONTRIBUTION_NEEDS,
                supports=_BLOCKS + "block_shape", statement=_CONTRIBUTION_SHARES,
                summary="first-order ALTI measured in the residual stream itself: max(0, sign(y_j)·T_jk), no next norm"),
    VariantSpec("alti_skip", _C + "build_alti_skip", "proxy", needs=_CONTRIBUTION_NEEDS,
                supports=_BLOCKS + "block_shape", statement=_SKIP_STATEMENT,
                summary="alti_resid with the skip connection kept at gain 1: rows ∝ ‖y_j‖₁ δ_jk + max(0, sign(y_j)·attn_jk)"),
)  # fmt: skip
for _spec in _BUILTIN:
    register_variant(_spec)
