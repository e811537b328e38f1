"""Exact JSON for results: what :mod:`.results`' ``to_dict`` / ``from_dict`` write and read.

**Exact JSON.** ``to_dict`` tags what JSON has no type for: a tensor is
``{"__type__": "tensor", "dtype", "shape", "byteorder": "little", "data"}`` with ``data`` its
row-major bytes, little-endian, in base64 (a third of the size of number lists, and exact for every
dtype; files of older versions hold a list of numbers, NaN/±inf as ``"nan"``/``"inf"``/``"-inf"``, and
still load); a numpy array is ``"ndarray"`` with such a number list. Tuples, non-string dict keys, non-finite floats, dtypes, DataFrames
(records plus dtypes and index) and nested records (``{"__record__": ClassName, ...fields}``) are
tagged too, so ``json.dumps(d, allow_nan=False)`` succeeds and ``from_dict`` rebuilds every field
with its type (tensors bit-equal, dtypes kept). A tensor met twice (a bound's graph shares the
trace's patterns) is written once and referenced after (``{"__type__": "ref"}``), and comes back
shared. A field that cannot be stored (a model, a callable) is declared with :func:`unserialised`
and dropped with a note under ``"__dropped__"``. Values a class computes from its fields and wants a
reader of the file to see (collapse thresholds) are written beside them, named under
``"__derived__"``, and recomputed rather than read back. Anything else that JSON cannot hold raises
``TypeError`` naming the field, never a silent ``str()``.

**Top-k fields.** A long vector only whose largest entries are read (next-token logits) is declared
with :func:`top_k`: ``to_dict(heavy=False)`` keeps its ``k`` largest entries with their indices
(:class:`lens_squash.core.topk.TopK`, loaded back as such); ``heavy=True`` keeps it whole.

**Heavy fields.** Fields of ``layer × head × n²`` or ``layer × n × d_model`` numbers are declared
with :func:`heavy`. ``to_dict(heavy=False)`` leaves them out (listed in ``"__dropped__"``) so that a
report of a 1000-token prompt stays megabytes, not gigabytes; :meth:`Record.from_dict` fills them
with ``None`` and the loaded result says so in ``provenance["dropped"]``. ``heavy=True`` (the
default) keeps everything and round-trips exactly.
"""

from __future__ import annotations

import base64
import dataclasses
import math
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "DERIVED_KEY",
    "DROPPED_KEY",
    "RECORD_KEY",
    "STORED_DTYPES",
    "TYPE_KEY",
    "Decoder",
    "Encoder",
    "StoredDataError",
    "decode",
    "dtype_named",
    "encode",
    "heavy",
    "record_type",
    "record_types",
    "register_type",
    "top_k",
    "unserialised",
]

TYPE_KEY = "__type__"
RECORD_KEY = "__record__"
DROPPED_KEY = "__dropped__"
DERIVED_KEY = "__derived__"
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}

# a fixed table, not getattr(torch, name): a stored file names one of these or is refused
_TORCH_DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.complex64,
        torch.complex128,
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.bool,
    )
}
#: the dtype names a stored tensor may have
STORED_DTYPES: tuple[str, ...] = tuple(_TORCH_DTYPES)


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


def top_k(k: int, **kwargs: Any) -> Any:
    """A 1-D tensor field of which ``to_dict(heavy=False)`` keeps the ``k`` largest entries, exactly,
    as a :class:`lens_squash.core.topk.TopK` (which is what such a file loads back)."""
    return dataclasses.field(metadata={"top_k": k}, **kwargs)


# --------------------------------------------------------------------------------------------------
# encoding
# --------------------------------------------------------------------------------------------------


def _flat_numbers(values: list) -> list:
    return [v if math.isfinite(v) else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")) for v in values]


class StoredDataError(ValueError):
    """A stored result that cannot be rebuilt as written: the message names the field and the problem
    (``load`` adds the file). ``named``: the message already starts with ``Class.field``."""

    def __init__(self, message: str, *, named: bool = False):
        super().__init__(message)
        self.named = named


def _little_endian(raw: bytes, itemsize: int) -> bytes:
    """``raw`` (native order items of ``itemsize`` bytes) in little-endian order; a no-op on x86 and ARM."""
    if sys.byteorder == "little" or itemsize == 1:
        return raw
    import numpy as np

    return np.frombuffer(raw, np.uint8).reshape(-1, itemsize)[:, ::-1].tobytes()


def _scalar_size(dtype: torch.dtype) -> int:
    """Bytes of one stored number (a complex one is two of them, real and imaginary)."""
    real = torch.empty((), dtype=dtype)
    return (torch.view_as_real(real) if dtype.is_complex else real).element_size() // (1 + dtype.is_complex)


def _encode_tensor(t: torch.Tensor) -> dict[str, Any]:
    t = t.detach().cpu()
    dtype = str(t.dtype).removeprefix("torch.")
    if dtype not in _TORCH_DTYPES:
        raise TypeError(f"tensors of dtype {dtype} are not stored; use one of {sorted(_TORCH_DTYPES)}")
    flat = t.contiguous().reshape(-1)
    flat = torch.view_as_real(flat).reshape(-1) if t.is_complex() else flat
    if flat.numel() and flat.stride(-1) != 1:  # one element sliced from a wider tensor keeps its stride
        flat = torch.empty(flat.shape, dtype=flat.dtype).copy_(flat)
    raw = flat.view(torch.uint8).numpy().tobytes()
    data = base64.b64encode(_little_endian(raw, flat.element_size())).decode("ascii")
    return {TYPE_KEY: "tensor", "dtype": dtype, "shape": list(t.shape), "byteorder": "little", "data": data}


def dtype_named(name: str) -> torch.dtype:
    """The dtype a record names (``"float32"``…), from the fixed table: never ``getattr(torch, name)``."""
    return _stored_dtype(name)


def _stored_dtype(name: Any) -> torch.dtype:
    if not isinstance(name, str) or name not in _TORCH_DTYPES:
        raise StoredDataError(f"unknown tensor dtype {name!r}; stored tensors are one of {', '.join(_TORCH_DTYPES)}")
    return _TORCH_DTYPES[name]


def _stored_shape(shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise StoredDataError(f"tensor shape {shape!r} is not a list of sizes >= 0")
    return tuple(shape)


def _decode_tensor(d: Mapping[str, Any]) -> torch.Tensor:
    """A stored tensor: typed base64 (little-endian bytes), or the JSON number list older files hold."""
    dtype, shape = _stored_dtype(d.get("dtype")), _stored_shape(d.get("shape"))
    numel = math.prod(shape) * (2 if dtype.is_complex else 1)  # numbers stored: complex as (real, imag)
    data = d.get("data")
    real = {torch.complex64: torch.float32, torch.complex128: torch.float64}.get(dtype, dtype)
    if isinstance(data, str):
        flat = _from_base64(data, real, numel, shape)
    elif isinstance(data, list):
        flat = _from_numbers(data, real, numel, shape)
    else:
        raise StoredDataError(f"tensor data is a {type(data).__name__}, not base64 text or a list of numbers")
    if dtype.is_complex:
        return torch.view_as_complex(flat.reshape(*shape, 2).contiguous())
    return flat.reshape(shape)


def _from_base64(text: str, dtype: torch.dtype, numel: int, shape: tuple[int, ...]) -> torch.Tensor:
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError as err:
        raise StoredDataError(f"tensor data is not valid base64 ({err})") from None
    size = _scalar_size(dtype)
    if len(raw) != numel * size:
        raise StoredDataError(
            f"tensor data holds {len(raw)} bytes, but shape {list(shape)} of {str(dtype).removeprefix('torch.')} "
            f"needs {numel * size}"
        )
    if not numel:
        return torch.empty(0, dtype=dtype)
    flat = torch.frombuffer(bytearray(_little_endian(raw, size)), dtype=torch.uint8)
    if dtype == torch.bool and bool((flat > 1).any()):
        raise StoredDataError("bool tensor data holds bytes other than 0 and 1")
    return flat.view(dtype)


def _from_numbers(data: list, dtype: torch.dtype, numel: int, shape: tuple[int, ...]) -> torch.Tensor:
    if len(data) != numel:
        raise StoredDataError(f"tensor data holds {len(data)} numbers, but shape {list(shape)} needs {numel}")
    try:
        values = [_NON_FINITE[v] if isinstance(v, str) else v for v in data]
        return torch.tensor(values, dtype=dtype) if values else torch.empty(0, dtype=dtype)
    except (KeyError, TypeError, ValueError, RuntimeError, OverflowError) as err:
        raise StoredDataError(f"tensor data holds a value that is not a number ({err})") from None


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
    return {TYPE_KEY: "ndarray", "dtype": str(a.dtype), "shape": list(a.shape), "data": data}


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
        TYPE_KEY: "DataFrame",
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
    ragged = [i for i, row in enumerate(rows) if not isinstance(row, list) or len(row) != len(columns)]
    if ragged:  # pandas would pad them with NaN: a tampered table must not load as numbers
        raise StoredDataError(f"table row {ragged[0]} has not one value per column ({len(columns)} columns)")
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


class Encoder:
    """One ``to_dict`` call: a memo of the tensors already written, and the heavy-field switch."""

    def __init__(self, *, heavy: bool):
        self.heavy = heavy
        self.seen: dict[int, int] = {}
        self.keep: list[Any] = []  # ids stay unique while the objects they name are alive

    def __call__(self, value: Any, where: str = "value") -> Any:
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else {TYPE_KEY: "float", "value": _flat_numbers([value])[0]}
        if isinstance(value, torch.Tensor):
            return self._shared(value, _encode_tensor)
        if _TYPES.get(type(value).__name__) is type(value):  # a registered record (results.Record)
            return value._encode_fields(self)
        if isinstance(value, tuple):
            return {TYPE_KEY: "tuple", "items": [self(v, f"{where}[{i}]") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [self(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, dict):
            if all(isinstance(k, str) for k in value) and TYPE_KEY not in value and RECORD_KEY not in value:
                return {k: self(v, f"{where}[{k!r}]") for k, v in value.items()}
            return {TYPE_KEY: "dict", "items": [[self(k, where), self(v, f"{where}[{k!r}]")] for k, v in value.items()]}
        if isinstance(value, (set, frozenset)):
            return {TYPE_KEY: type(value).__name__, "items": [self(v, where) for v in sorted(value, key=repr)]}
        if isinstance(value, torch.dtype):
            return {TYPE_KEY: "torch.dtype", "name": str(value).removeprefix("torch.")}
        if isinstance(value, Path):
            return {TYPE_KEY: "path", "value": str(value)}
        return self._foreign(value, where)

    def _shared(self, value: Any, encode_one: Callable[[Any], dict]) -> dict[str, Any]:
        key = id(value)
        if key in self.seen:
            return {TYPE_KEY: "ref", "id": self.seen[key]}
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
                return {TYPE_KEY: "numpy", "dtype": str(value.dtype), "value": self(value.item(), where)}
        if module == "pandas":
            import pandas as pd

            if isinstance(value, pd.DataFrame):
                return _encode_frame(value, lambda v: self(v, where))
            if value is pd.NA:
                return {TYPE_KEY: "NA"}
            if value is pd.NaT:
                return {TYPE_KEY: "NaT"}
        raise TypeError(
            f"{where} is a {type(value).__module__}.{type(value).__qualname__}, which JSON cannot hold; "
            "declare its field with lens_squash.core.results.unserialised(...) or store a plain value"
        )


def encode(value: Any, *, heavy: bool = True) -> Any:
    """``value`` as JSON-ready data that :func:`decode` turns back into an equal value."""
    return Encoder(heavy=heavy)(value)


class Decoder:
    def __init__(self):
        self.shared: dict[int, Any] = {}

    def __call__(self, value: Any) -> Any:
        if isinstance(value, list):
            return [self(v) for v in value]
        if not isinstance(value, dict):
            return value
        if RECORD_KEY in value:
            return record_type(value[RECORD_KEY])._decode_fields(value, self)
        tag = value.get(TYPE_KEY)
        if tag is None:
            return {k: self(v) for k, v in value.items()}
        if tag in ("tensor", "ndarray"):
            decoded = _checked(_decode_tensor if tag == "tensor" else _decode_array, value)
            self.shared[value.get("id")] = decoded
            return decoded
        if tag == "ref":
            if value.get("id") not in self.shared:
                raise StoredDataError(
                    f"a reference to stored tensor {value.get('id')!r}, which comes nowhere before it"
                )
            return self.shared[value["id"]]
        if tag not in _DECODERS:
            raise StoredDataError(f"unknown stored type {tag!r}; this file was written by a newer lens_squash?")
        return _checked(_DECODERS[tag], value, self)


def _checked(decode: Callable[..., Any], *args: Any) -> Any:
    """``decode(*args)``, any failure on malformed data a :class:`StoredDataError` (not a bare KeyError)."""
    try:
        return decode(*args)
    except StoredDataError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, OverflowError, AttributeError) as err:
        what = f"missing key {err}" if isinstance(err, KeyError) else f"{type(err).__name__}: {err}"
        raise StoredDataError(f"a stored {args[0].get(TYPE_KEY)!r} value is malformed ({what})") from None


def _numpy_scalar(d, dec):
    import numpy as np

    return np.dtype(d["dtype"]).type(dec(d["value"]))


def _pandas_missing(name: str):
    def decode_missing(d, dec):
        import pandas as pd

        return {"NA": pd.NA, "NaT": pd.NaT}[name]

    return decode_missing


_DECODERS: dict[str, Callable[[Mapping[str, Any], Decoder], Any]] = {
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
    return Decoder()(data)


# --------------------------------------------------------------------------------------------------
# the record classes a stored file may name
# --------------------------------------------------------------------------------------------------

_TYPES: dict[str, type] = {}


def register_type(cls: type) -> None:
    """Let stored files name ``cls`` (a class name stands for one class: two of one name are refused)."""
    earlier = _TYPES.get(cls.__name__)
    if earlier is not None and (earlier.__module__, earlier.__qualname__) != (cls.__module__, cls.__qualname__):
        raise TypeError(f"two record classes named {cls.__name__}: {earlier.__module__} and {cls.__module__}")
    _TYPES[cls.__name__] = cls


def record_types() -> dict[str, type]:
    """Every record class defined so far, by name (what a stored ``"__record__"`` names)."""
    return dict(_TYPES)


def record_type(name: str) -> type:
    if name not in _TYPES:
        raise ValueError(
            f"a stored {name!r} cannot be rebuilt: no record class of that name is loaded "
            f"(known: {', '.join(sorted(_TYPES))}); import the module that defines it first"
        )
    return _TYPES[name]
