"""What a bridge's attention writes, recomputed from the facts the certified bound reads (see
:func:`lens_squash.edge.adapter_probe.probe_bridge`, which compares it with what the module returned).

The certified bound models attention as ``Σ_h A_h (u W_V^h + b_V^h) W_O^h`` plus a constant: the
pattern ``A`` from ``hook_pattern``, ``W_V``/``W_O`` as the bridge exposes them. An architecture whose
attention writes something else (a latent or low-rank value path, an output multiplier, a gate on the
heads) fails the comparison and the bound is refused, even for families nobody listed.

It also refuses, whole and in one line, what is not a causal attention decoder the probe can read: a
block with a sublayer beside attention and the MLP (an SSM hybrid), or a bridge whose own forward fails.
"""

from __future__ import annotations

import warnings

import torch
from jaxtyping import Float
from torch import Tensor

from ..algebra.blocks import INSTEAD
from ..core.support import UnsupportedModelError
from .adapter_mlp import tolerance

__all__ = [
    "attention_write",
    "check_against_wrapped",
    "check_attention",
    "check_known_sublayers",
    "forward_failure",
    "hooked_output",
    "positionwise_spread",
    "readable",
]


def readable(module, name: str) -> bool:
    """Whether ``module.name`` reads as a tensor: TransformerLens raises ``NotImplementedError`` for ``W_V``
    on multi-head latent attention (DeepSeek-V2/V3), which ``hasattr`` does not catch."""
    try:
        return isinstance(getattr(module, name), Tensor)
    except (AttributeError, NotImplementedError, RuntimeError):
        return False


def _per_head(weight: Tensor, n_heads: int) -> Tensor:
    # GQA: one matrix per key/value head, read by n_heads / n_kv consecutive query heads
    return weight if weight.shape[0] == n_heads else weight.repeat_interleave(n_heads // weight.shape[0], dim=0)


def attention_write(
    u: Float[Tensor, "batch pos d_model"],
    pattern: Float[Tensor, "batch head query key"],
    w_v: Float[Tensor, "head_or_kv d_model d_head"],
    b_v: Float[Tensor, "head_or_kv d_head"] | None,
    w_o: Float[Tensor, "head d_head d_model"],
    clip: float | None,
) -> Float[Tensor, "batch pos d_model"]:
    """``Σ_h A_h (u W_V^h + b_V^h) W_O^h`` in float64, values clamped to ``±clip`` where the model clamps them."""
    n_heads = pattern.shape[1]
    u = u.double()
    v = torch.einsum("bpd,hde->bhpe", u, _per_head(w_v.detach().double(), n_heads))
    if b_v is not None:
        v = v + _per_head(b_v.detach().double(), n_heads)[None, :, None, :]
    if clip is not None:
        v = v.clamp(-clip, clip)
    z = pattern.double() @ v
    return torch.einsum("bhqe,hed->bqd", z, w_o.detach().double())


def positionwise_spread(residual: Float[Tensor, "batch pos d_model"]) -> float:
    """How far ``residual`` is from one vector repeated at every position (an output bias ``b_O``, or
    ``b_V W_O`` under rows that sum to 1): the part no constant explains."""
    residual = residual.double()
    return float((residual - residual.mean(-2, keepdim=True)).norm())


def check_attention(block, u: Tensor, written: Tensor, pattern: Tensor, clip: float | None) -> None:
    """Refuse unless what ``block``'s attention wrote is :func:`attention_write` plus one constant vector."""
    attn = block.attn
    b_v = attn.b_V if readable(attn, "b_V") else None
    try:
        predicted = attention_write(u, pattern, attn.W_V, b_v, attn.W_O, clip)
        spread = positionwise_spread(written.double().reshape(predicted.shape) - predicted)
    except RuntimeError:  # shapes that do not line up (a sink column in the pattern, a fused layout)
        spread = float("inf")
    rtol = tolerance(written.dtype)
    if not spread <= rtol * max(float(written.double().norm()), 1e-30):
        raise UnsupportedModelError(
            f"the attention of {type(block).__name__} does not write Σ_h A_h x W_V W_O from its pattern and the "
            f"W_V / W_O it exposes (an output multiplier, a gate or a latent value path); {INSTEAD}"
        )


#: what a block of a causal attention decoder holds besides hooks and the wrapped module
_KNOWN_SUBLAYERS = frozenset(
    {"ln1", "ln2", "ln1_post", "ln2_post", "attn", "mlp", "_original_component", "original_component"}
)


def check_known_sublayers(block) -> None:
    """A sublayer beside attention and the MLP (Falcon-H1's ``mamba`` mixer) is a hybrid layer."""
    for name, module in block.named_children():
        if name not in _KNOWN_SUBLAYERS and not name.startswith("hook_"):
            raise UnsupportedModelError(
                f"{type(block).__name__} has a sublayer {name!r} ({type(module).__name__}) beside attention and the "
                "MLP: lens_squash analyses causal attention transformers; SSM and other hybrids are not supported"
            )


def forward_failure(model, error: Exception) -> UnsupportedModelError:
    """The forward pass failed: in float64 (OLMo's bridge in bfloat16, XGLM's in float64) say which dtype
    works; otherwise TransformerLens cannot run this model (CodeGen's bridge on transformers 5)."""
    first = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    dtype = next(model.parameters()).dtype
    name = type(getattr(model, "original_model", model)).__name__
    if isinstance(error, RuntimeError) and dtype != torch.float32:
        other = "float32" if dtype == torch.float64 else "float32 or float64"
        return UnsupportedModelError(
            f"this bridge's forward pass fails in {str(dtype).removeprefix('torch.')} ({first}); load the model in {other}"
        )
    return UnsupportedModelError(
        f"TransformerLens's bridge over {name} fails its own forward pass ({first}), so lens_squash cannot read it; "
        "try another transformers/TransformerLens version or a HookedTransformer"
    )


def check_against_wrapped(layer: int, block, call: tuple | None, written: Tensor | None) -> None:
    """The bridge's attention must return what the ``transformers`` attention it wraps returns on the same
    inputs: where TransformerLens reimplements attention (to fire ``hook_pattern``), a reimplementation
    that differs (TransformerLens 3.9's Cohere and HunYuan bridges) makes every pattern and Jacobian wrong,
    so the model is refused whole. Skipped where the wrapped module cannot be rerun on the recorded call."""
    original = getattr(block.attn, "original_component", None)
    if original is None or call is None or written is None or not _wrapped_is_evidence(block.attn, original):
        return
    # the recorded key/value cache already holds this layer's keys: rerun without one
    kwargs = {k: None if type(v).__name__.endswith("Cache") else v for k, v in call[1].items()}
    kwargs.update({"use_cache": False} if "use_cache" in kwargs else {})
    try:
        with torch.no_grad():
            out = original(*call[0], **kwargs)
    except Exception:  # noqa: BLE001 - a module that cannot be rerun out of its model is not evidence either way
        return
    expected = out[0] if isinstance(out, tuple) else out
    if not isinstance(expected, Tensor) or expected.shape != written.shape:
        return
    rtol = tolerance(written.dtype)
    err = float((written.double() - expected.double()).norm())
    if err > rtol * max(float(expected.double().norm()), 1e-30):
        raise UnsupportedModelError(
            f"the attention of block {layer} ({type(block.attn).__name__}) differs from the transformers "
            f"{type(original).__name__} it wraps (relative {err / float(expected.double().norm()):.1e}): this "
            "TransformerLens bridge does not compute the model; use another TransformerLens version"
        )


def _wrapped_is_evidence(attn, original) -> bool:
    """Rerunning the wrapped module tests the bridge's attention only where both compute from the same weights
    and no hook edits the bridge's side: a bridge that splits q/k/v copies off a fused weight (GPT-NeoX, Falcon,
    BLOOM) computes from the copies, which training, ablations and edits change while the wrapped module keeps
    the old fused weight; a user's hook on the attention (a window, a mask, a clamp) changes the bridge's output
    and not the module's. Neither difference is a misread model, so neither is compared."""
    own = {p.data_ptr() for p in original.parameters()}
    if any(p.data_ptr() not in own for p in attn.parameters()):
        return False
    from transformer_lens.hook_points import HookPoint  # TransformerLens 3.9 and 4.3 keep it here

    # the probe's recorders are removed before this check runs: a hook left on a hook point is a user's
    return not any(
        module._forward_hooks or module._forward_pre_hooks for module in attn.modules() if isinstance(module, HookPoint)
    )


def hooked_output(model, tokens: Tensor, names: list[str]) -> Tensor:
    """The output with a hook on each of ``names`` that returns its value as it is. A bridge that switches
    to another computation once a hook is attached (TransformerLens 3.9's Nemotron norms, whose hooked
    path scales by ``w`` where the model scales by ``1 + w``) gives another output than without hooks."""

    def same(value: Tensor, hook) -> Tensor:
        return value.detach()

    with warnings.catch_warnings():  # TransformerLens warns that a hooked norm takes its native path: we test that
        warnings.simplefilter("ignore", UserWarning)
        with torch.no_grad(), model.hooks(fwd_hooks=[(name, same) for name in names]):
            return model(tokens)
