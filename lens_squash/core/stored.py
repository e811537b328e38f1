"""Loads that check what they read: a stored result's tensors against its own declared dimensions.

Every tensor field of a record is annotated with jaxtyping in TransformerLens's dimension names
(``ln1_scale: Float[Tensor, "layer pos"]``). :func:`check_fields` reads those annotations and
refuses a decoded record whose tensors disagree with them: a dtype outside the annotation's family
(``Float`` takes float16, bfloat16, float32, float64), a number of axes, a fixed size, or one
dimension name bound to different sizes by different fields. Which size is right is decided by the
fields themselves: the size most fields agree on (the first field's on a tie), so that the message
names the tampered field, e.g. ``Trace.ln1_scale has shape (46, 2), expected (layer=2, pos=46)``.

:func:`read_json` reads a result file and names the file in every failure (missing, not UTF-8,
truncated JSON). Pure: tensors are only read, never computed with.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import typing
from collections import Counter
from pathlib import Path
from typing import Any

from .codec import STORED_DTYPES, StoredDataError
from .jsonl import read_utf8_text

__all__ = ["StoredDataError", "check_fields", "read_json", "tensor_annotations"]


def read_json(path: str | os.PathLike) -> Any:
    """The JSON in ``path``; a ``ValueError`` naming the file when it is missing, unreadable or not JSON."""
    path = Path(path)
    text = read_utf8_text(
        path, expected="pass the path of a saved result", folder="pass the path of a saved result (a .json file)"
    )
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        cut = " (the file ends early: truncated?)" if err.pos >= len(text.rstrip()) else ""
        raise ValueError(
            f"{path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}{cut}; save the result again"
        ) from None


def _jaxtyping_arg(annotation: Any) -> Any:
    """The jaxtyping array type in ``annotation`` (itself, or one member of a union), or None."""
    from jaxtyping import AbstractArray

    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, AbstractArray):
            return candidate
    return None


@functools.cache
def tensor_annotations(cls: type) -> dict[str, Any]:
    """``{field: jaxtyping type}`` for every init field of dataclass ``cls`` annotated with one."""
    found = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        annotation = f.type
        if isinstance(annotation, str):  # `from __future__ import annotations`: evaluate in its module
            owner = next((k for k in cls.__mro__ if f.name in vars(k).get("__annotations__", {})), cls)
            try:
                annotation = eval(annotation, vars(sys.modules[owner.__module__]))  # noqa: S307 - our own source
            except Exception:  # noqa: BLE001 - a name imported only for type checkers: not checkable
                continue
        arg = _jaxtyping_arg(annotation)
        if arg is not None:
            found[f.name] = arg
    return found


def _dims(arg) -> tuple[list, list] | None:
    """The annotation's dims before and after a variadic one (``*batch``, ``...``), or None if unusable."""
    names = [type(d).__name__ for d in arg.dims]
    variadic = [i for i, n in enumerate(names) if "Variadic" in n or "Ellipsis" in n or "Star" in n]
    if len(variadic) > 1:
        return None
    if not variadic:
        return list(arg.dims), []
    return list(arg.dims[: variadic[0]]), list(arg.dims[variadic[0] + 1 :])


def _aligned(arg, shape: tuple[int, ...]) -> list[tuple[Any, int]] | None:
    """``(dim, size)`` pairs of ``shape`` against ``arg``'s dims; None when the number of axes is wrong."""
    split = _dims(arg)
    if split is None:
        return []
    head, tail = split
    variadic = len(head) + len(tail) != len(arg.dims)
    if (len(shape) < len(head) + len(tail)) if variadic else (len(shape) != len(head)):
        return None
    pairs = list(zip(head, shape[: len(head)], strict=True))
    if tail:
        pairs += list(zip(tail, shape[len(shape) - len(tail) :], strict=True))
    return pairs


def _dtype_name(value: Any) -> str:
    return str(value.dtype).removeprefix("torch.")


def check_fields(cls: type, values: dict[str, Any]) -> None:
    """Refuse ``values`` (decoded fields of ``cls``) whose tensors disagree with ``cls``'s annotations."""
    annotated = {
        name: (arg, values[name])
        for name, arg in tensor_annotations(cls).items()
        if hasattr(values.get(name), "shape") and hasattr(values.get(name), "dtype")
    }
    sizes: dict[str, list[int]] = {}
    for name, (arg, value) in annotated.items():
        shape = tuple(value.shape)
        dtypes = getattr(arg, "dtypes", None)
        if isinstance(dtypes, (tuple, list)) and _dtype_name(value) not in dtypes:
            raise StoredDataError(
                f"{cls.__name__}.{name} is stored as {_dtype_name(value)}, but the field holds "
                f"{', '.join(d for d in dtypes if d in STORED_DTYPES)} values",
                named=True,
            )
        pairs = _aligned(arg, shape)
        if pairs is None:
            raise StoredDataError(
                f"{cls.__name__}.{name} has shape {shape}, but the field is [{arg.dim_str}] ({len(arg.dims)} axes)",
                named=True,
            )
        for dim, size in pairs:
            fixed = getattr(dim, "size", None)
            if isinstance(fixed, int) and size != fixed:
                raise StoredDataError(
                    f"{cls.__name__}.{name} has shape {shape}, but the field is [{arg.dim_str}]", named=True
                )
            if getattr(dim, "name", None) and not getattr(dim, "broadcastable", False):
                sizes.setdefault(dim.name, []).append(size)
    expected = {dim: _consensus(found) for dim, found in sizes.items()}
    for name, (arg, value) in annotated.items():
        pairs = _aligned(arg, tuple(value.shape)) or []
        if any(expected.get(getattr(dim, "name", None), size) != size for dim, size in pairs):
            want = ", ".join(
                f"{dim.name}={expected[dim.name]}" if getattr(dim, "name", None) in expected else "?"
                for dim, _ in pairs
            )
            raise StoredDataError(
                f"{cls.__name__}.{name} has shape {tuple(value.shape)}, expected ({want}) from the result's other "
                f"fields ([{arg.dim_str}])",
                named=True,
            )


def _consensus(found: list[int]) -> int:
    """The size most fields give a dimension; the first field's on a tie."""
    counts = Counter(found)
    best = max(counts.values())
    return next(size for size in found if counts[size] == best)
