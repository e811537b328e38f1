"""Typed refusal for analyses that cannot apply to a model: catch `UnsupportedModelError` to skip exactly those."""

from __future__ import annotations

__all__ = ["UnsupportedModelError"]


class UnsupportedModelError(ValueError):
    """A method cannot apply to this model's architecture; the message says what is unsupported and what to use instead."""
