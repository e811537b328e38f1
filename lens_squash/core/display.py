"""How results print outside Jupyter's HTML view: one line of shapes and scalars, never whole tensors.

Every result dataclass renders as HTML in Jupyter (``_repr_html_``), but a console, a log line or
``print(result)`` uses ``__repr__``, and the dataclass default prints every tensor (a ``Trace`` of 89
tokens on SmolLM2 runs to tens of kilobytes). Result classes set ``__repr__ = compact_repr``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

__all__ = ["compact_repr", "missing_as_nan", "summarize_value"]

_MAX_TEXT = 40
_MAX_ITEMS = 4


def _short(text: str) -> str:
    return text if len(text) <= _MAX_TEXT else text[: _MAX_TEXT - 1] + "…"


def summarize_value(value: Any) -> str:
    """A few characters that say what ``value`` is: dtype and shape for arrays, counts for containers."""
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).removeprefix("torch.")
        return f"{dtype}{list(value.shape)}" if value.ndim else f"{value.item():.4g}"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return f"{type(value).__name__}(…)"
    if hasattr(value, "shape") and hasattr(value, "columns"):  # a pandas DataFrame
        return f"DataFrame[{value.shape[0]}×{value.shape[1]}]"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return f"{{{len(value)} keys}}"
    if isinstance(value, (list, tuple)):
        simple = all(isinstance(item, (int, float, str, bool)) or item is None for item in value)
        if simple and len(value) <= _MAX_ITEMS:
            return _short(repr(value))
        return f"({len(value)} items)"
    if isinstance(value, str):
        return repr(_short(value))
    return _short(repr(value))


def compact_repr(self) -> str:
    """``ClassName(field=summary, …)`` over the dataclass's repr fields (see :func:`summarize_value`)."""
    parts = (f"{f.name}={summarize_value(getattr(self, f.name))}" for f in dataclasses.fields(self) if f.repr)
    return f"{type(self).__name__}({', '.join(parts)})"


def missing_as_nan(frame: Any) -> Any:
    """``frame`` with its nullable-dtype columns (``Int64``, ``boolean``, ``Float64``) as objects that
    hold NaN where a value is missing: ``to_html(na_rep="-")`` writes ``<NA>`` for those dtypes
    whatever ``na_rep`` says (and, since pandas 3, ``None`` for a ``None``), and ``-`` for NaN."""
    nullable = [column for column, dtype in frame.dtypes.items() if not isinstance(dtype, np.dtype)]
    shown = frame.astype({column: object for column in nullable})
    for column in nullable:
        shown[column] = shown[column].where(frame[column].notna(), np.nan)
    return shown
