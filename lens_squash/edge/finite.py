"""Finite numbers or a precise refusal: NaN/inf in the weights named before the work, in results after it.

A NaN weight does not stop a forward pass: it flows on into patterns, norms and logits, and an
argmax over NaN logits still names a token. So :func:`check_finite_weights` scans every parameter
before a trace and names the first tensor that holds NaN or inf (``blocks.3.attn.W_Q``), and
:func:`check_finite_values` scans every reported quantity after the pass. Only a low-precision model
(float16, bfloat16) is told that its precision overflowed; on float32 or float64 with finite weights
the cause is elsewhere (weights large enough to overflow, a hook that edits activations), and the
message says that instead.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["LOW_PRECISION", "check_finite_values", "check_finite_weights"]

#: dtypes whose range a forward pass can overflow on ordinary weights and prompts
LOW_PRECISION = (torch.float16, torch.bfloat16)


def _non_finite(value: Tensor) -> tuple[int, int]:
    """(NaN count, ±inf count) of ``value``; (0, 0) fast when its sum is finite (then every entry is)."""
    value = value.detach()
    if not (value.is_floating_point() or value.is_complex()):
        return 0, 0
    if value.numel() and bool(torch.isfinite(value.sum())):  # NaN and inf propagate; overflow re-checks
        return 0, 0
    nan = int(torch.isnan(value).sum())
    return nan, int((~torch.isfinite(value)).sum()) - nan


def check_finite_weights(model) -> None:
    """Refuse a model whose parameters hold NaN or inf, naming the first such tensor.

    Every parameter feeds the forward pass every analysis starts from, so all are checked (buffers
    are not: TransformerLens keeps ``-inf`` as its causal-mask constant). Costs one sum per tensor.
    """
    for name, param in model.named_parameters():
        nan, inf = _non_finite(param)
        if nan or inf:
            name = name.replace("._original_component", "").replace("_original_component.", "")  # a bridge's wrapper
            raise ValueError(
                f"the model's weight {name} holds {_count(nan, inf)} of {param.numel()} values; with NaN or inf "
                "in the weights every number computed from them is meaningless: reload the model or repair that tensor"
            )


def check_finite_values(values: Mapping[str, Tensor | float | None], dtype: torch.dtype, *, what: str) -> None:
    """Refuse when any of ``values`` (name → tensor or number; None skipped) is not finite.

    ``what`` says where they came from ("the forward pass"); ``dtype`` is the model's: the advice to
    load the model in float32 is given for float16 and bfloat16 only.
    """
    for name, value in values.items():
        if value is None:
            continue
        nan, inf = _non_finite(torch.as_tensor(value))
        if nan or inf:
            shown = str(dtype).removeprefix("torch.")
            advice = (
                "low precision overflowed: load the model in float32 (load_model(dtype='float32')) or use a "
                "shorter prompt"
                if dtype in LOW_PRECISION
                else "the weights are finite, so values grew past the dtype's range or a hook on the model "
                "edited them: check the weights' scale and remove added hooks (model.reset_hooks())"
            )
            raise ValueError(f"{what} produced NaN or inf ({_count(nan, inf)}) in {name} on a {shown} model; {advice}")


def _count(nan: int, inf: int) -> str:
    return " and ".join(part for part in (f"{nan} NaN" if nan else "", f"{inf} inf" if inf else "") if part)
