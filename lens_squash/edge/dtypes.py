"""Dtypes by name: :data:`DTYPES` maps every name of :data:`.model_names.DTYPE_NAMES` onto its torch dtype."""

from __future__ import annotations

import torch

from .model_names import DTYPE_NAMES, canonical_dtype

__all__ = ["DTYPES", "resolve_dtype"]

# a fixed table, not getattr(torch, name)
_TORCH = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: dtype names accepted wherever a dtype is asked for (CLI flags, JSON metadata)
DTYPES: dict[str, torch.dtype] = {name: _TORCH[canonical] for name, canonical in DTYPE_NAMES.items()}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """Accept a torch dtype or one of :data:`DTYPES`' names."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}; use one of {sorted(set(DTYPES))}")
        return dtype
    return _TORCH[canonical_dtype(dtype)]
