"""A ``TransformerBridge`` in another dtype: what :func:`~lens_squash.edge.backends.boot_bridge` gives.

``boot_bridge`` casts the ``transformers`` model with ``.to(dtype)`` before booting, so a bridge
loaded in a dtype holds its parameters *and buffers* (rotary ``inv_freq`` included) cast from the
model's own; a deep copy cast the same way is that bridge, with the source's mode (compatibility,
weight processing, hooks) kept. tests/edge/test_bridge_dtype.py checks it bit for bit against a
fresh boot over a cast copy of the ``transformers`` model.
"""

from __future__ import annotations

import copy

import torch

from .backends import is_bridge

__all__ = ["bridge_in_dtype"]


def bridge_in_dtype(bridge, dtype: torch.dtype):
    """A copy of ``bridge`` with every parameter and buffer cast to ``dtype`` (``bridge`` untouched)."""
    if not is_bridge(bridge):
        raise ValueError(f"bridge_in_dtype casts a TransformerBridge, got {type(bridge).__name__}")
    twin = copy.deepcopy(bridge)
    twin.to(dtype, print_details=False)  # also sets cfg.dtype, which the bridge's own buffers follow
    if twin.cfg.dtype != dtype:
        raise ValueError(f"the bridge did not move to {dtype} (its config says {twin.cfg.dtype})")
    return twin.eval()
