"""Old names of sink metrics: ``first_token_mass`` meant three things and now has three names.

Kept for ``lens_squash.sinks`` (the 0.1 module, served by :mod:`lens_squash._legacy`); each call
warns and returns exactly what the new name returns.
"""

from __future__ import annotations

import warnings

from torch import Tensor

from .sinks import first_token_attention, rollout_mass

__all__ = ["first_token_mass", "rollout_first_token_mass"]


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"{old} is now {new}", DeprecationWarning, stacklevel=3)


def first_token_mass(patterns: Tensor, *, include_first_query: bool = False) -> Tensor:
    """Deprecated name of :func:`~lens_squash.algebra.sinks.first_token_attention`."""
    _deprecated("sinks.first_token_mass", "sinks.first_token_attention")
    return first_token_attention(patterns, include_first_query=include_first_query)


def rollout_first_token_mass(patterns: Tensor) -> Tensor:
    """Deprecated name of :func:`~lens_squash.algebra.sinks.rollout_mass`."""
    _deprecated("sinks.rollout_first_token_mass", "sinks.rollout_mass")
    return rollout_mass(patterns)
