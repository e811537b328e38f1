"""Reading per-layer curves: Mix–Compress–Refine phases, the massive range, cross-layer correlations,
and how the over-squashing measures behave in sink layers (:func:`sink_layer_links`).

Queipo-de-Llano, Arroyo, Barbero et al. ("Attention Sinks and Compression Valleys in LLMs are Two
Sides of the Same Coin") describe depth in three phases: early layers *mix* tokens, middle layers
*compress* them (a valley of the matrix entropy, :mod:`lens_squash.algebra.compression`), late
layers *refine*. :func:`detect_phases` finds the valley with a simple threshold rule,
:func:`massive_layers` the range of layers with a massive first-token norm
(:mod:`lens_squash.algebra.massive`), and :func:`layer_correlations` correlates named curves across
layers: Pearson, or Spearman with average ranks for ties (as ``scipy.stats.spearmanr``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from itertools import combinations
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from .ranks import pearson, spearman

__all__ = ["detect_phases", "layer_correlations", "massive_layers", "sink_layer_links"]


def _check_curve(curve, name: str) -> Tensor:
    curve = torch.as_tensor(curve).to(torch.float64)
    if curve.ndim != 1 or curve.numel() == 0:
        raise ValueError(f"{name} must be a non-empty per-layer curve of shape [layer], got {tuple(curve.shape)}")
    return curve


def _run_around(mask: Tensor, centre: int) -> tuple[int, int]:
    """The maximal run of True in ``mask`` containing ``centre``, as a half-open ``[start, end)``."""
    start = centre
    while start > 0 and mask[start - 1]:
        start -= 1
    end = centre + 1
    while end < mask.numel() and mask[end]:
        end += 1
    return start, end


def detect_phases(
    entropy: Float[Tensor, "layer"],
    *,
    early_layers: int = 1,
    fraction: float = 0.5,
    min_depth: float = 0.1,
) -> tuple[int, int] | None:
    """Mix–Compress–Refine boundaries ``(mix_end, compress_end)`` from a normalised-entropy curve.

    Rule: the early level is the mean entropy of the first ``early_layers`` layers; the valley floor
    is the minimum; the threshold lies ``fraction`` of the way from the floor up to the early level.
    The compression phase is the maximal contiguous range of layers around the minimum whose entropy
    is strictly below the threshold. Layers ``[0, mix_end)`` mix, ``[mix_end, compress_end)``
    compress, ``[compress_end, L)`` refine (empty when the valley reaches the last layer). Returns
    ``None`` when the early level is less than ``min_depth`` above the floor (no valley).
    """
    entropy = _check_curve(entropy, "entropy")
    if not 1 <= early_layers <= entropy.numel():
        raise ValueError(f"early_layers must be in [1, {entropy.numel()}], got {early_layers}")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    early = float(entropy[:early_layers].mean())
    floor_layer = int(entropy.argmin())
    floor = float(entropy[floor_layer])
    if early - floor < min_depth:
        return None
    threshold = floor + fraction * (early - floor)
    return _run_around(entropy < threshold, floor_layer)


def massive_layers(
    norm_ratio: Float[Tensor, "layer"],
    *,
    factor: float = 10.0,
) -> tuple[int, int] | None:
    """Maximal contiguous ``[start, end)`` around the peak where the first-token ratio exceeds ``factor``."""
    norm_ratio = _check_curve(norm_ratio, "norm_ratio")
    peak = int(norm_ratio.argmax())
    if norm_ratio[peak] <= factor:
        return None
    return _run_around(norm_ratio > factor, peak)


def layer_correlations(
    curves: Mapping[str, Tensor],
    *,
    method: Literal["spearman", "pearson"] = "spearman",
) -> dict[str, float]:
    """Correlation across layers of every pair of named per-layer curves, keyed ``"a vs b"``.

    Typical curves: ``first_token_norm`` (or its ratio), ``entropy`` and ``sink_rate``. Curves of
    different lengths (residual streams have ``L + 1`` entries, attention ``L``) are compared on
    their common first layers. Over fewer than two common layers a correlation is undefined: NaN, as
    for a constant curve (a one-layer model has no across-layer trend to correlate).
    """
    corr = {"spearman": spearman, "pearson": pearson}.get(method)
    if corr is None:
        raise ValueError(f"method must be 'spearman' or 'pearson', got {method!r}")
    out = {}
    for (name_a, a), (name_b, b) in combinations(curves.items(), 2):
        n = min(len(a), len(b))
        out[f"{name_a} vs {name_b}"] = corr(torch.as_tensor(a)[:n], torch.as_tensor(b)[:n]) if n >= 2 else math.nan
    return out


def _group_mean(values: Tensor, mask: Tensor) -> float:
    return float(values[mask].mean()) if mask.any() else math.nan


def sink_layer_links(
    sink_rate_per_layer: Float[Tensor, "layer"],
    tau: Float[Tensor, "layer"],
    rollout_mass: Float[Tensor, "layer"],
    *,
    majority: float = 0.5,
) -> dict[str, float]:
    """How the over-squashing measures behave in *sink layers* (≥ ``majority`` of heads are sinks).

    Mean Dobrushin ``τ`` and mean rollout-mass gain ``m_l − m_{l-1}`` (``m_{-1} = 0``) inside the
    sink layers and elsewhere; NaN for an empty group.
    """
    sink_layers = torch.as_tensor(sink_rate_per_layer).to(torch.float64) >= majority
    mass = torch.as_tensor(rollout_mass).to(torch.float64)
    gain = torch.diff(mass, prepend=mass.new_zeros(1))
    return {
        "n sink layers": float(sink_layers.sum()),
        "dobrushin | sink layers": _group_mean(tau, sink_layers),
        "dobrushin | other layers": _group_mean(tau, ~sink_layers),
        "rollout mass gain | sink layers": _group_mean(gain, sink_layers),
        "rollout mass gain | other layers": _group_mean(gain, ~sink_layers),
    }
