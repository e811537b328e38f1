"""One contract for every result: a one-line repr, HTML, ``plot(kind=)``, exact JSON, tables, provenance.

Two bases, both mixins for frozen dataclasses:

- :class:`Record` — a value that is stored and shown: ``_repr_html_``, ``to_dict`` / ``from_dict``
  (JSON-ready, round-trips exactly), ``save`` / ``load`` (atomic, through :mod:`.records`). Small
  parts of results (a path, a U-shape, a sink rate) are records.
- :class:`Result` — what an analysis returns: a record that also plots (``plot(kind=None)``), may be
  a table (``to_frame``) and says how it was made (``provenance``).

The encoding itself (tensors bit-exact, shared tensors once, dropped and heavy fields) lives in
:mod:`.codec`; its names are re-exported here.

**Figures.** ``Result.plot`` dispatches through a registry keyed by (result class, kind). Core code
must not import the views, so the registry is filled by a plugin module, :data:`FIGURE_PLUGIN`,
imported on the first ``plot()`` (as pandas loads its plotting backend); it imports every views
module, and each builder registers itself where it is defined with the decorator
:func:`register_figure` (``@register_figure(Trace, "attention", default=True)``), which refuses
duplicates. A class's default kind is the one marked ``default=True``, else its first registered.
"""

from __future__ import annotations

import dataclasses
import html
import importlib
import json
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .codec import (
    DERIVED_KEY,
    DROPPED_KEY,
    RECORD_KEY,
    Decoder,
    Encoder,
    StoredDataError,
    decode,
    encode,
    heavy,
    record_type,
    record_types,
    register_type,
    top_k,
    unserialised,
)
from .display import summarize_value
from .records import write_text_atomic
from .stored import check_fields, read_json

__all__ = [
    "FIGURE_PLUGIN",
    "Record",
    "Result",
    "UnknownFigureKindError",
    "decode",
    "encode",
    "figure_kinds",
    "heavy",
    "html_figure_kinds",
    "top_k",
    "record_types",
    "register_figure",
    "unserialised",
]

#: the module whose import registers every figure builder (views, above core in the layering)
FIGURE_PLUGIN = "lens_squash.views.registry"

# --------------------------------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------------------------------


class Record:
    """A stored, displayable value: mix into a frozen dataclass (``class X(Record)`` under ``@dataclass``).

    The dataclass decorator writes its own ``__repr__``; set ``__repr__ = compact_repr`` in the
    class body to keep it on one line (the contract test checks every class does).
    """

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        register_type(cls)

    # ------------------------------------------------------------------ display

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td>{html.escape(f.name)}</td><td>{html.escape(summarize_value(getattr(self, f.name)))}</td></tr>"
            for f in dataclasses.fields(self)
            if f.repr
        )
        return f"<b>lens_squash {type(self).__name__}</b><table>{rows}</table>"

    # ------------------------------------------------------------------ JSON

    def to_dict(self, *, heavy: bool = True) -> dict[str, Any]:
        """JSON-ready fields (see the module docstring); ``heavy=False`` leaves large tensors out."""
        return self._encode_fields(Encoder(heavy=heavy))

    def _encode_fields(self, enc: Encoder) -> dict[str, Any]:
        out: dict[str, Any] = {RECORD_KEY: type(self).__name__}
        dropped: dict[str, str] = {}
        for f in dataclasses.fields(self):
            if not f.init:
                continue
            if not f.metadata.get("serialise", True):
                dropped[f.name] = f.metadata.get("why", "not serialisable")
            elif f.metadata.get("heavy") and not enc.heavy:
                dropped[f.name] = "heavy (to_dict(heavy=False))"
            elif f.metadata.get("top_k") and not enc.heavy and getattr(getattr(self, f.name), "ndim", 0) == 1:
                from .topk import TopK  # a record itself, so defined after this class

                out[f.name] = enc(
                    TopK.of(getattr(self, f.name), f.metadata["top_k"]), f"{type(self).__name__}.{f.name}"
                )
            else:
                out[f.name] = enc(getattr(self, f.name), f"{type(self).__name__}.{f.name}")
        if dropped:
            out[DROPPED_KEY] = dropped
        derived = self._derived()
        if derived:  # read-only conveniences for a reader of the file; from_dict recomputes them
            out.update({name: enc(value, f"{type(self).__name__}.{name}") for name, value in derived.items()})
            out[DERIVED_KEY] = list(derived)
        return out

    def _derived(self) -> dict[str, Any]:
        """Values computed from the fields that a stored file should show too (thresholds, shares)."""
        return {}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str | os.PathLike | None = None):
        """The record ``to_dict`` wrote (heavy fields that were left out come back as ``None``).

        Every tensor is checked against the class's annotations (dtype family, axes, and each
        dimension's size across fields: :mod:`.stored`); anything malformed is refused in one line
        naming the field (and ``source``, the file, when given)."""
        where = f"{source}: " if source is not None else ""
        if not isinstance(data, Mapping) or RECORD_KEY not in data:
            raise ValueError(
                f"{where}{cls.__name__}.from_dict needs what to_dict wrote (a mapping with {RECORD_KEY!r})"
            )
        try:
            stored = record_type(data[RECORD_KEY])
            if not issubclass(stored, cls):
                raise ValueError(f"the data holds a {stored.__name__}, not a {cls.__name__}")
            return stored._decode_fields(data, Decoder())
        except ValueError as err:  # StoredDataError included: it names the field
            raise StoredDataError(f"{where}{err}") from None
        except (TypeError, KeyError, AttributeError, IndexError, RuntimeError) as err:  # hostile data: one line
            raise StoredDataError(f"{where}{cls.__name__} cannot be rebuilt ({type(err).__name__}: {err})") from None

    @classmethod
    def _decode_fields(cls, data: Mapping[str, Any], dec: Decoder):
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        extra = set(data) - set(fields) - {RECORD_KEY, DROPPED_KEY, DERIVED_KEY} - set(data.get(DERIVED_KEY, ()))
        if extra:
            raise ValueError(f"{cls.__name__} has no fields {sorted(extra)}; was this written by another version?")
        dropped = dict(data.get(DROPPED_KEY, {}))
        kwargs: dict[str, Any] = {}
        for name, f in fields.items():
            if name in data:
                kwargs[name] = _decoded_field(cls, name, data[name], dec)
            elif name in dropped and f.metadata.get("heavy"):
                kwargs[name] = None
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"{cls.__name__}.{name} is missing from the data and has no default")
        heavy_dropped = sorted(n for n in dropped if fields.get(n) is not None and fields[n].metadata.get("heavy"))
        if heavy_dropped and "provenance" in fields and isinstance(kwargs.get("provenance", {}), dict):
            # what a reader of this result cannot use, written before the frozen record exists
            kwargs["provenance"] = {**kwargs.get("provenance", {}), "dropped": heavy_dropped}
        check_fields(cls, kwargs)
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as err:  # a class's own checks of its fields (__post_init__)
            raise StoredDataError(f"{cls.__name__} refuses the stored fields: {err}", named=True) from None

    # ------------------------------------------------------------------ files

    def save(self, path: str | os.PathLike, *, heavy: bool = True) -> Path:
        """Write :meth:`to_dict` to ``path`` as JSON, atomically (a reader never sees half a file)."""
        text = json.dumps(self.to_dict(heavy=heavy), allow_nan=False, ensure_ascii=False)
        return write_text_atomic(path, text)

    @classmethod
    def load(cls, path: str | os.PathLike):
        """The record :meth:`save` wrote to ``path``, checked as :meth:`from_dict` checks (errors name the file)."""
        return cls.from_dict(read_json(path), source=path)


def _decoded_field(cls: type, name: str, value: Any, dec: Decoder) -> Any:
    try:
        return dec(value)
    except StoredDataError as err:
        if err.named:  # a nested record named its own field
            raise
        raise StoredDataError(f"{cls.__name__}.{name}: {err}", named=True) from None


# --------------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------------


class UnknownFigureKindError(ValueError):
    """``plot(kind=...)`` named a figure the result does not draw; ``kinds`` lists the ones it does."""

    def __init__(self, cls: type, kind: Any, kinds: tuple[str, ...]):
        self.kinds = kinds
        shown = ", ".join(repr(k) for k in kinds) or "none"
        super().__init__(f"{cls.__name__} has no figure kind {kind!r}; use one of {shown}")


# (result class, kind) -> builder(result, **kwargs) -> go.Figure; the first kind of a class is its default
# unless one is registered with default=True
_FIGURES: dict[type, dict[str, Callable[..., Any]]] = {}
_DEFAULT_KIND: dict[type, str] = {}
_MARKED_DEFAULT: set[type] = set()
#: the kinds that draw an HTML page or an HTML/JS view, not a plotly figure
_HTML_KINDS: set[str] = set()
_PLUGIN_LOCK = threading.Lock()
_plugin_loaded = False


def register_figure(
    cls: type, kind: str, *, default: bool = False, html: bool = False
) -> Callable[[Callable], Callable]:
    """Decorate ``builder(result, **kwargs)`` as ``cls``'s figure ``kind``; a duplicate is an error.

    ``default``: the kind ``plot()`` draws when none is named (one per class; without it, the first
    registered). ``html``: the builder returns an HTML page or view (``_repr_html_``, ``.write(path)``),
    not a plotly figure. Returns the builder unchanged, so decorators stack."""
    if not (isinstance(cls, type) and issubclass(cls, Result)):
        raise TypeError(f"figures are registered for Result classes, not {cls!r}")

    def decorate(builder: Callable) -> Callable:
        kinds = _FIGURES.setdefault(cls, {})
        if kind in kinds:
            raise ValueError(f"{cls.__name__} already has a figure kind {kind!r} ({kinds[kind].__qualname__})")
        if default and cls in _MARKED_DEFAULT:
            raise ValueError(f"{cls.__name__} already has a default figure kind {_DEFAULT_KIND[cls]!r}; mark one")
        kinds[kind] = builder
        if default or cls not in _DEFAULT_KIND:
            _DEFAULT_KIND[cls] = kind
        if default:
            _MARKED_DEFAULT.add(cls)
        if html:
            _HTML_KINDS.add(kind)
        return builder

    return decorate


def html_figure_kinds() -> frozenset[str]:
    """The kinds registered so far with ``html=True`` (a page or an HTML/JS view, not a plotly figure);
    :data:`lens_squash.views.registry.HTML_KINDS` holds them all, once the views are loaded."""
    return frozenset(_HTML_KINDS)


def _load_plugin() -> None:
    global _plugin_loaded
    with _PLUGIN_LOCK:
        if not _plugin_loaded:
            importlib.import_module(FIGURE_PLUGIN)
            _plugin_loaded = True


def _builders(cls: type) -> tuple[dict[str, Callable[..., Any]], str | None]:
    """The figure kinds of ``cls`` (its own, then its bases'), and its default kind."""
    _load_plugin()
    kinds: dict[str, Callable[..., Any]] = {}
    default = None
    for base in cls.__mro__:
        for kind, builder in _FIGURES.get(base, {}).items():
            kinds.setdefault(kind, builder)
        if default is None:
            default = _DEFAULT_KIND.get(base)
    return kinds, default


def figure_kinds(cls: type) -> tuple[str, ...]:
    """The figure kinds ``cls.plot(kind=...)`` accepts, the default first."""
    kinds, default = _builders(cls)
    return tuple(sorted(kinds, key=lambda k: (k != default, k)))


class Result(Record):
    """What an analysis returns: a :class:`Record` that plots, may be a table and carries provenance.

    ``provenance`` (a dict: model, dtype, versions, the call's arguments) is a dataclass field of
    most results; composite results (an :class:`~lens_squash.experiments.analysis.Analysis`) read
    it from their parts with a property.
    """

    def plot(self, kind: str | None = None, *args: Any, **kwargs: Any):
        """The figure ``kind`` (a plotly Figure); ``None`` draws the default kind
        (:func:`figure_kinds` lists them). Further arguments go to that kind's builder."""
        if kind is not None and not isinstance(kind, str):
            raise TypeError(
                f"{type(self).__name__}.plot takes the figure kind first (one of {figure_kinds(type(self))}), "
                f"got a {type(kind).__name__}; pass the builder's arguments by name"
            )
        builders, default = _builders(type(self))
        kind = default if kind is None else kind
        if kind not in builders:
            raise UnknownFigureKindError(type(self), kind, figure_kinds(type(self)))
        return builders[kind](self, *args, **kwargs)

    def to_frame(self):
        """The result as a pandas DataFrame, where it is a table; ``TypeError`` otherwise."""
        raise TypeError(f"{type(self).__name__} is not a table; read its fields, or to_dict() for everything it holds")
