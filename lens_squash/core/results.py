"""One contract for every result: a one-line repr, HTML, ``plot(kind=)``, exact JSON, tables, provenance.

Two bases, both mixins for frozen dataclasses:

- :class:`Record` — a value that is stored and shown: ``_repr_html_``, ``to_dict`` / ``from_dict``
  (JSON-ready, round-trips exactly), ``save`` / ``load`` (atomic, through :mod:`.records`). Small
  parts of results (a path, a U-shape, a sink rate) are records.
- :class:`Result` — what an analysis returns: a record that also plots (``plot(kind=None)``), may be
  a table (``to_frame``) and says how it was made (``provenance``).

**Exact JSON.** ``to_dict`` tags what JSON has no type for: a tensor or array is
``{"__type__": "tensor", "dtype", "shape", "data"}`` (``data`` flat, row-major; NaN/±inf written as
``"nan"``/``"inf"``/``"-inf"``), tuples, non-string dict keys, non-finite floats, dtypes, DataFrames
(records plus dtypes and index) and nested records (``{"__record__": ClassName, ...fields}``) are
tagged too, so ``json.dumps(d, allow_nan=False)`` succeeds and ``from_dict`` rebuilds every field
with its type (tensors bit-equal, dtypes kept). A tensor met twice (a bound's graph shares the
trace's patterns) is written once and referenced after (``{"__type__": "ref"}``), and comes back
shared. A field that cannot be stored (a model, a callable) is declared with :func:`unserialised`
and dropped with a note under ``"__dropped__"``. Values a class computes from its fields and wants a
reader of the file to see (collapse thresholds) are written beside them, named under
``"__derived__"``, and recomputed rather than read back. Anything else that JSON cannot hold raises
``TypeError`` naming the field, never a silent ``str()``.

**Heavy fields.** Fields of ``layer × head × n²`` or ``layer × n × d_model`` numbers are declared
with :func:`heavy`. ``to_dict(heavy=False)`` leaves them out (listed in ``"__dropped__"``) so that a
report of a 1000-token prompt stays megabytes, not gigabytes; :meth:`Record.from_dict` fills them
with ``None`` and the loaded result says so in ``provenance["dropped"]``. ``heavy=True`` (the
default) keeps everything and round-trips exactly.

**Figures.** ``Result.plot`` dispatches through a registry keyed by (result class, kind). Core code
must not import the views, so the registry is filled by a plugin module,
:data:`FIGURE_PLUGIN`, imported on the first ``plot()`` (as pandas loads its plotting backend); its
builders are registered with :func:`register_figure`, which refuses duplicates.
"""

from __future__ import annotations

import dataclasses
import html
import importlib
import json
import math
import os
import threading
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch

from .display import summarize_value
from .records import write_text_atomic
from .renames import renamed

__all__ = [
    "FIGURE_PLUGIN",
    "Record",
    "Result",
    "UnknownFigureKindError",
    "decode",
    "encode",
    "figure_kinds",
    "heavy",
    "record_types",
    "register_figure",
    "unserialised",
]

#: the module whose import registers every figure builder (views, above core in the layering)
FIGURE_PLUGIN = "lens_squash.views.registry"

_TAG = "__type__"
_RECORD = "__record__"
_DROPPED = "__dropped__"
_DERIVED = "__derived__"
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}

# a fixed table, not getattr(torch, name): a stored file names one of these or is refused
_TORCH_DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128,
              torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool)
}


# --------------------------------------------------------------------------------------------------
# field declarations
# --------------------------------------------------------------------------------------------------


def unserialised(why: str, **kwargs: Any) -> Any:
    """A dataclass field that ``to_dict`` drops with the note ``why`` (it needs a default)."""
    if "default" not in kwargs and "default_factory" not in kwargs:
        raise TypeError("an unserialised field needs a default: from_dict has nothing else to put there")
    return dataclasses.field(metadata={"serialise": False, "why": why}, **kwargs)


def heavy(**kwargs: Any) -> Any:
    """A dataclass field that ``to_dict(heavy=False)`` leaves out (large tensors)."""
    return dataclasses.field(metadata={"heavy": True}, **kwargs)


# --------------------------------------------------------------------------------------------------
# encoding
# --------------------------------------------------------------------------------------------------


def _flat_numbers(values: list) -> list:
    return [v if math.isfinite(v) else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")) for v in values]


def _encode_tensor(t: torch.Tensor) -> dict[str, Any]:
    t = t.detach().cpu()
    dtype = str(t.dtype).removeprefix("torch.")
    if dtype not in _TORCH_DTYPES:
        raise TypeError(f"tensors of dtype {dtype} are not stored; use one of {sorted(_TORCH_DTYPES)}")
    flat = torch.view_as_real(t).flatten() if t.is_complex() else t.flatten()
    data = flat.tolist()
    if flat.is_floating_point() and not bool(torch.isfinite(flat).all()):
        data = _flat_numbers(data)
    return {_TAG: "tensor", "dtype": dtype, "shape": list(t.shape), "data": data}


def _decode_tensor(d: Mapping[str, Any]) -> torch.Tensor:
    dtype = _TORCH_DTYPES[d["dtype"]]
    data = [_NON_FINITE[v] if isinstance(v, str) else v for v in d["data"]]
    if dtype.is_complex:
        real = torch.tensor(data, dtype=torch.float32 if dtype == torch.complex64 else torch.float64)
        return torch.view_as_complex(real.reshape(*d["shape"], 2).contiguous())
    return torch.tensor(data, dtype=dtype).reshape(d["shape"])


def _encode_array(a) -> dict[str, Any]:
    import numpy as np

    if a.dtype == object or a.dtype.kind not in "biufc":
        raise TypeError(f"numpy arrays of dtype {a.dtype} are not stored (numbers and booleans only)")
    flat = a.reshape(-1)
    if a.dtype.kind == "c":
        flat = np.stack([flat.real, flat.imag], axis=-1).reshape(-1)
    data = flat.tolist()
    if a.dtype.kind in "fc" and not np.isfinite(flat).all():
        data = _flat_numbers(data)
    return {_TAG: "ndarray", "dtype": str(a.dtype), "shape": list(a.shape), "data": data}


def _decode_array(d: Mapping[str, Any]):
    import numpy as np

    dtype = np.dtype(d["dtype"])
    if dtype.kind not in "biufc":
        raise ValueError(f"stored array dtype {dtype} is not a number type")
    data = [_NON_FINITE[v] if isinstance(v, str) else v for v in d["data"]]
    if dtype.kind == "c":
        pairs = np.asarray(data, dtype=np.float64).reshape(-1, 2)
        return (pairs[:, 0] + 1j * pairs[:, 1]).astype(dtype).reshape(d["shape"])
    return np.asarray(data, dtype=dtype).reshape(d["shape"])


def _encode_frame(frame, enc) -> dict[str, Any]:
    columns = list(frame.columns)
    return {
        _TAG: "DataFrame",
        "columns": [enc(c) for c in columns],
        "dtypes": [str(t) for t in frame.dtypes],
        "index": _encode_index(frame.index, enc),
        "index_name": enc(frame.index.name),
        "records": [[enc(v) for v in row] for row in frame.itertuples(index=False, name=None)],
    }


def _decode_frame(d: Mapping[str, Any], dec):
    import pandas as pd

    columns = [dec(c) for c in d["columns"]]
    rows = [[dec(v) for v in row] for row in d["records"]]
    frame = pd.DataFrame(rows, columns=columns)
    for column, dtype in zip(columns, d["dtypes"], strict=True):
        if str(frame[column].dtype) != dtype:
            frame[column] = frame[column].astype(dtype)
    index = d["index"]
    if isinstance(index, dict) and "range" in index:
        frame.index = pd.RangeIndex(*index["range"], name=dec(d["index_name"]))
    else:
        frame.index = pd.Index(dec(index), name=dec(d["index_name"]))
    return frame


def _encode_index(index, enc) -> Any:
    import pandas as pd

    if isinstance(index, pd.RangeIndex):  # the usual index: three numbers, and it comes back a RangeIndex
        return {"range": [index.start, index.stop, index.step]}
    return enc(list(index))


class _Encoder:
    """One ``to_dict`` call: a memo of the tensors already written, and the heavy-field switch."""

    def __init__(self, heavy: bool):
        self.heavy = heavy
        self.seen: dict[int, int] = {}
        self.keep: list[Any] = []  # ids stay unique while the objects they name are alive

    def __call__(self, value: Any, where: str = "value") -> Any:
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else {_TAG: "float", "value": _flat_numbers([value])[0]}
        if isinstance(value, torch.Tensor):
            return self._shared(value, _encode_tensor)
        if isinstance(value, Record):
            return value._encode_fields(self)
        if isinstance(value, tuple):
            return {_TAG: "tuple", "items": [self(v, f"{where}[{i}]") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [self(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, dict):
            if all(isinstance(k, str) for k in value) and _TAG not in value and _RECORD not in value:
                return {k: self(v, f"{where}[{k!r}]") for k, v in value.items()}
            return {_TAG: "dict", "items": [[self(k, where), self(v, f"{where}[{k!r}]")] for k, v in value.items()]}
        if isinstance(value, (set, frozenset)):
            return {_TAG: type(value).__name__, "items": [self(v, where) for v in sorted(value, key=repr)]}
        if isinstance(value, torch.dtype):
            return {_TAG: "torch.dtype", "name": str(value).removeprefix("torch.")}
        if isinstance(value, Path):
            return {_TAG: "path", "value": str(value)}
        return self._foreign(value, where)

    def _shared(self, value: Any, encode_one: Callable[[Any], dict]) -> dict[str, Any]:
        key = id(value)
        if key in self.seen:
            return {_TAG: "ref", "id": self.seen[key]}
        self.seen[key] = len(self.seen)
        self.keep.append(value)
        return {**encode_one(value), "id": self.seen[key]}

    def _foreign(self, value: Any, where: str) -> Any:
        """numpy and pandas values, imported only when a result holds one."""
        module = type(value).__module__.split(".")[0]
        if module == "numpy":
            import numpy as np

            if isinstance(value, np.ndarray):
                return self._shared(value, _encode_array)
            if isinstance(value, np.generic) and value.dtype.kind in "biufc":
                return {_TAG: "numpy", "dtype": str(value.dtype), "value": self(value.item(), where)}
        if module == "pandas":
            import pandas as pd

            if isinstance(value, pd.DataFrame):
                return _encode_frame(value, lambda v: self(v, where))
            if value is pd.NA:
                return {_TAG: "NA"}
            if value is pd.NaT:
                return {_TAG: "NaT"}
        raise TypeError(
            f"{where} is a {type(value).__module__}.{type(value).__qualname__}, which JSON cannot hold; "
            "declare its field with lens_squash.core.results.unserialised(...) or store a plain value"
        )


def encode(value: Any, *, heavy: bool = True) -> Any:
    """``value`` as JSON-ready data that :func:`decode` turns back into an equal value."""
    return _Encoder(heavy)(value)


class _Decoder:
    def __init__(self):
        self.shared: dict[int, Any] = {}

    def __call__(self, value: Any) -> Any:
        if isinstance(value, list):
            return [self(v) for v in value]
        if not isinstance(value, dict):
            return value
        if _RECORD in value:
            return _record_type(value[_RECORD])._decode_fields(value, self)
        tag = value.get(_TAG)
        if tag is None:
            return {k: self(v) for k, v in value.items()}
        if tag in ("tensor", "ndarray"):
            decoded = _decode_tensor(value) if tag == "tensor" else _decode_array(value)
            self.shared[value["id"]] = decoded
            return decoded
        if tag == "ref":
            return self.shared[value["id"]]
        if tag not in _DECODERS:
            raise ValueError(f"unknown stored type {tag!r}; this file was written by a newer lens_squash?")
        return _DECODERS[tag](value, self)


def _numpy_scalar(d, dec):
    import numpy as np

    return np.dtype(d["dtype"]).type(dec(d["value"]))


def _pandas_missing(name: str):
    def decode_missing(d, dec):
        import pandas as pd

        return {"NA": pd.NA, "NaT": pd.NaT}[name]

    return decode_missing


_DECODERS: dict[str, Callable[[Mapping[str, Any], _Decoder], Any]] = {
    "float": lambda d, dec: _NON_FINITE[d["value"]],
    "tuple": lambda d, dec: tuple(dec(v) for v in d["items"]),
    "dict": lambda d, dec: {_hashable(dec(k)): dec(v) for k, v in d["items"]},
    "set": lambda d, dec: {dec(v) for v in d["items"]},
    "frozenset": lambda d, dec: frozenset(dec(v) for v in d["items"]),
    "torch.dtype": lambda d, dec: _TORCH_DTYPES[d["name"]],
    "path": lambda d, dec: Path(d["value"]),
    "numpy": _numpy_scalar,
    "NA": _pandas_missing("NA"),
    "NaT": _pandas_missing("NaT"),
    "DataFrame": lambda d, dec: _decode_frame(d, dec),
}


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


def decode(data: Any) -> Any:
    """The value :func:`encode` wrote (records come back as their classes)."""
    return _Decoder()(data)


# --------------------------------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------------------------------

_TYPES: dict[str, type] = {}


def record_types() -> dict[str, type]:
    """Every record class defined so far, by name (what a stored ``"__record__"`` names)."""
    return dict(_TYPES)


def _record_type(name: str) -> type:
    if name not in _TYPES:
        raise ValueError(
            f"a stored {name!r} cannot be rebuilt: no record class of that name is loaded "
            f"(known: {', '.join(sorted(_TYPES))}); import the module that defines it first"
        )
    return _TYPES[name]


class Record:
    """A stored, displayable value: mix into a frozen dataclass (``class X(Record)`` under ``@dataclass``).

    The dataclass decorator writes its own ``__repr__``; set ``__repr__ = compact_repr`` in the
    class body to keep it on one line (the contract test checks every class does).
    """

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        earlier = _TYPES.get(cls.__name__)
        if earlier is not None and (earlier.__module__, earlier.__qualname__) != (cls.__module__, cls.__qualname__):
            raise TypeError(f"two record classes named {cls.__name__}: {earlier.__module__} and {cls.__module__}")
        _TYPES[cls.__name__] = cls

    # ------------------------------------------------------------------ display

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td>{html.escape(f.name)}</td><td>{html.escape(summarize_value(getattr(self, f.name)))}</td></tr>"
            for f in dataclasses.fields(self) if f.repr
        )
        return f"<b>lens_squash {type(self).__name__}</b><table>{rows}</table>"

    # ------------------------------------------------------------------ JSON

    def to_dict(self, *, heavy: bool = True) -> dict[str, Any]:
        """JSON-ready fields (see the module docstring); ``heavy=False`` leaves large tensors out."""
        return self._encode_fields(_Encoder(heavy))

    def _encode_fields(self, enc: _Encoder) -> dict[str, Any]:
        out: dict[str, Any] = {_RECORD: type(self).__name__}
        dropped: dict[str, str] = {}
        for f in dataclasses.fields(self):
            if not f.init:
                continue
            if not f.metadata.get("serialise", True):
                dropped[f.name] = f.metadata.get("why", "not serialisable")
            elif f.metadata.get("heavy") and not enc.heavy:
                dropped[f.name] = "heavy (to_dict(heavy=False))"
            else:
                out[f.name] = enc(getattr(self, f.name), f"{type(self).__name__}.{f.name}")
        if dropped:
            out[_DROPPED] = dropped
        derived = self._derived()
        if derived:  # read-only conveniences for a reader of the file; from_dict recomputes them
            out.update({name: enc(value, f"{type(self).__name__}.{name}") for name, value in derived.items()})
            out[_DERIVED] = list(derived)
        return out

    def _derived(self) -> dict[str, Any]:
        """Values computed from the fields that a stored file should show too (thresholds, shares)."""
        return {}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        """The record ``to_dict`` wrote (heavy fields that were left out come back as ``None``)."""
        if not isinstance(data, Mapping) or _RECORD not in data:
            raise ValueError(f"{cls.__name__}.from_dict needs what to_dict wrote (a mapping with {_RECORD!r})")
        stored = _record_type(data[_RECORD])
        if not issubclass(stored, cls):
            raise ValueError(f"the data holds a {stored.__name__}, not a {cls.__name__}")
        return stored._decode_fields(data, _Decoder())

    @classmethod
    def _decode_fields(cls, data: Mapping[str, Any], dec: _Decoder):
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        extra = set(data) - set(fields) - {_RECORD, _DROPPED, _DERIVED} - set(data.get(_DERIVED, ()))
        if extra:
            raise ValueError(f"{cls.__name__} has no fields {sorted(extra)}; was this written by another version?")
        dropped = dict(data.get(_DROPPED, {}))
        kwargs: dict[str, Any] = {}
        for name, f in fields.items():
            if name in data:
                kwargs[name] = dec(data[name])
            elif name in dropped and f.metadata.get("heavy"):
                kwargs[name] = None
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"{cls.__name__}.{name} is missing from the data and has no default")
        record = cls(**kwargs)
        heavy_dropped = sorted(n for n in dropped if fields.get(n) is not None and fields[n].metadata.get("heavy"))
        if heavy_dropped and isinstance(getattr(record, "provenance", None), dict):
            record.provenance["dropped"] = heavy_dropped  # what a reader of this result cannot use
        return record

    # ------------------------------------------------------------------ files

    def save(self, path: str | os.PathLike, *, heavy: bool = True) -> Path:
        """Write :meth:`to_dict` to ``path`` as JSON, atomically (a reader never sees half a file)."""
        text = json.dumps(self.to_dict(heavy=heavy), allow_nan=False, ensure_ascii=False)
        return write_text_atomic(path, text)

    @classmethod
    def load(cls, path: str | os.PathLike):
        """The record :meth:`save` wrote to ``path``."""
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


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
_FIGURES: dict[type, dict[str, Callable[..., Any]]] = {}
_DEFAULT_KIND: dict[type, str] = {}
_PLUGIN_LOCK = threading.Lock()
_plugin_loaded = False


def register_figure(cls: type, kind: str, *, default: bool = False) -> Callable[[Callable], Callable]:
    """Register ``builder(result, **kwargs)`` as ``cls``'s figure ``kind``; a duplicate is an error."""
    if not (isinstance(cls, type) and issubclass(cls, Result)):
        raise TypeError(f"figures are registered for Result classes, not {cls!r}")

    def decorate(builder: Callable) -> Callable:
        kinds = _FIGURES.setdefault(cls, {})
        if kind in kinds:
            raise ValueError(f"{cls.__name__} already has a figure kind {kind!r} ({kinds[kind].__qualname__})")
        kinds[kind] = builder
        if default or cls not in _DEFAULT_KIND:
            _DEFAULT_KIND[cls] = kind
        return builder

    return decorate


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

    #: old names of ``provenance`` that still read, with a DeprecationWarning
    _OLD_PROVENANCE_NAMES: ClassVar[tuple[str, ...]] = ("metadata", "meta")

    @renamed(what="kind")
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
        raise TypeError(
            f"{type(self).__name__} is not a table; read its fields, or to_dict() for everything it holds"
        )

    @property
    def metadata(self) -> dict[str, Any]:
        """Deprecated: the old name of :attr:`provenance`."""
        return self._old_provenance("metadata")

    @property
    def meta(self) -> dict[str, Any]:
        """Deprecated: the old name of :attr:`provenance`."""
        return self._old_provenance("meta")

    def _old_provenance(self, name: str) -> dict[str, Any]:
        warnings.warn(f"{type(self).__name__}.{name} is now {type(self).__name__}.provenance", DeprecationWarning,
                      stacklevel=3)
        return self.provenance
