"""Compact figure data: numeric trace data as typed arrays, rounded to the digits a figure shows.

Numeric data goes in as numpy arrays, which plotly serialises as base64 typed arrays instead of
decimal lists (float32 data, such as attention, in four bytes a value). :func:`compact_figure`
turns any figure's lists into typed arrays, float64 into float32 where every value fits its range
(a bound of ``1e-60`` stays float64 rather than flushing to zero), rounded to the digits the hover
shows (:func:`rounded`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import plotly.graph_objects as go

from .style import (
    HOVER_DIGITS,
    as_array,
)

__all__ = [
    "SMALL_ARRAY",
    "compact_figure",
    "rounded",
]

_F32 = np.finfo(np.float32)
#: arrays with fewer values than this stay decimal lists (rounded all the same): shorter than base64
SMALL_ARRAY = 16


def rounded(values: Any, digits: int = HOVER_DIGITS) -> np.ndarray:
    """``values`` rounded to ``digits`` significant digits, as a numpy array for plotly's typed arrays.

    The result is ``float32`` when ``digits ≤ 6`` (float32 holds about 7) and the values fit it
    (float32 input, or every finite non-zero magnitude in float32's normal range), else ``float64``:
    a bound of ``1e-60`` or ``1e60`` keeps its value instead of flushing to 0 or overflowing. NaN
    and ±inf pass through.

    What shrinks a figure is the typed array and float32, not the rounding: an 89 × 89 heatmap's data
    is 161 kB as a decimal list of float64, 85 kB as a float64 typed array, 42 kB as float32, and
    still 42 kB rounded to 3 digits (rounding only helps where the page is gzip-compressed in
    transit: 31 kB → 24 kB). The builders therefore keep the digits they are given; this helper and
    :func:`compact_figure` are for callers that want the smaller compressed size.
    """
    if isinstance(digits, bool) or not isinstance(digits, int) or digits < 1:
        raise ValueError(f"digits must be a positive int, got {digits!r}")
    source = as_array(values)
    arr = source.astype(np.float64).ravel()
    out = arr.copy()
    nonzero = np.isfinite(arr) & (arr != 0)
    if nonzero.any():
        exponent = digits - 1 - np.floor(np.log10(np.abs(arr[nonzero])))
        # scale in two factors so that 10**exponent never overflows, even for subnormal inputs
        first = np.minimum(exponent, 290.0)
        second = exponent - first
        scaled = arr[nonzero] * 10.0**first * 10.0**second
        out[nonzero] = np.round(scaled) / 10.0**second / 10.0**first
    magnitudes = np.abs(out[np.isfinite(out) & (out != 0)])
    # float32 input held no more range than float32 (its subnormals included); float64 input must
    # fit float32's normal range, where every value keeps its ~7 significant digits
    in_range = magnitudes.size == 0 or (
        magnitudes.max() <= _F32.max and (source.dtype == np.float32 or magnitudes.min() >= _F32.tiny)
    )
    fits = digits <= 6 and in_range
    out = out.reshape(source.shape)
    return out.astype(np.float32) if fits else out


_NUMERIC_FIELDS = ("x", "y", "z", "customdata")


def _numeric(value) -> np.ndarray | None:
    """``value`` as a float array when it is numeric data (not strings, not dates), else ``None``."""
    if value is None or isinstance(value, (str, bytes, dict)):
        return None
    arr = np.asarray(value)
    if arr.dtype.kind in "fiu" and arr.size:
        return arr
    if arr.dtype == object and arr.size:
        try:
            return np.asarray([np.nan if v is None else float(v) for v in arr.ravel()]).reshape(arr.shape)
        except (TypeError, ValueError):
            return None
    return None


def compact_figure(fig: go.Figure, digits: int = 6) -> go.Figure:
    """A copy of ``fig`` whose numeric trace data (``x``, ``y``, ``z``, ``customdata``) is held as
    numpy arrays, so plotly writes compact typed arrays: float32 where every value fits it, rounded
    to ``digits`` significant digits (6, the default, is float32's own precision; 4 is what the
    hovers show). Integer data stays integer; strings, dates and layout are untouched. Arrays of
    fewer than :data:`SMALL_ARRAY` values stay (rounded) lists, which are shorter than base64."""
    if not isinstance(fig, go.Figure):
        raise TypeError(f"compact_figure takes a plotly go.Figure, got {type(fig).__name__}")
    out = go.Figure(fig)
    for trace in out.data:
        for name in _NUMERIC_FIELDS:
            if name not in trace:
                continue
            arr = _numeric(trace[name])
            if arr is None:
                continue
            values = arr if arr.dtype.kind in "iu" else rounded(arr, digits)
            if values.size < SMALL_ARRAY:  # a typed array's header ({"dtype": …, "bdata": …}) outweighs a few decimals
                trace[name] = None  # else plotly would turn the list back into the array it replaces
                trace[name] = values.tolist()
            else:
                trace[name] = values
    return out
