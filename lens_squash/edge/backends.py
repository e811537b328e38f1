"""The two TransformerLens model classes: ``HookedTransformer`` (TransformerLens 3 only) and
``TransformerBridge`` (3 and 4), imported only when asked for.

TransformerLens 4 removed ``HookedTransformer``; :func:`hooked_api` says so in one clear line instead
of an ``ImportError``, and :func:`boot_bridge` returns a bridge in compatibility mode with
``no_processing=True`` (the original weights and the legacy hook names), so its numbers are the hooked
twin's.
"""

from __future__ import annotations

import functools
import importlib.metadata
from typing import Any

import torch

__all__ = [
    "ModelLoadError",
    "boot_bridge",
    "bridge_class",
    "has_hooked_transformer",
    "hooked_api",
    "is_bridge",
    "missing_hooked_error",
    "tl_version",
]


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and what to do."""


@functools.lru_cache(maxsize=1)
def has_hooked_transformer() -> bool:
    """Whether the installed TransformerLens still has ``HookedTransformer`` (it was removed in 4.0)."""
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:  # TL 4 raises ImportError with a migration pointer, on purpose
        return False
    return True


def hooked_api():
    """``(HookedTransformer, HookedTransformerConfig)``, or a clear error on TransformerLens 4."""
    if not has_hooked_transformer():
        raise missing_hooked_error()
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    return HookedTransformer, HookedTransformerConfig


def missing_hooked_error() -> ModelLoadError:
    """The one-line refusal of a HookedTransformer where TransformerLens no longer has it."""
    return ModelLoadError(
        f"HookedTransformer is not available: TransformerLens {tl_version()} removed it (4.0). "
        "Use the bridge backend, load_model(..., backend='bridge'), or install "
        "'transformer-lens>=3.9,<4' for HookedTransformer models"
    )


def tl_version() -> str:
    return importlib.metadata.version("transformer-lens")


def bridge_class():
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge


def is_bridge(model: Any) -> bool:
    """Whether ``model`` is a ``TransformerBridge`` (in any mode)."""
    return isinstance(model, bridge_class())


def boot_bridge(
    repo: str, *, hf_model, tokenizer, dtype: torch.dtype, device: str, n_ctx: int, prepend_bos: bool | None = None
):
    """A bridge in compatibility mode with ``no_processing``: the original weights, legacy hooks.

    ``prepend_bos`` overrides the bridge's default BOS handling for raw text, so that the offline
    models tokenize as their hooked twins do (their tokenizer adds no BOS; chat prompts open with it).
    """
    bridge_cls = bridge_class()
    if hf_model is not None:
        hf_model = hf_model.to(device=device, dtype=dtype).eval()
    bridge = bridge_cls.boot_transformers(repo, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype)
    bridge.enable_compatibility_mode(no_processing=True, disable_warnings=True)
    max_ctx = bridge.cfg.n_ctx
    if n_ctx > max_ctx:
        raise ValueError(f"n_ctx={n_ctx} is outside 1..{max_ctx}, the positions this model was trained on")
    # check_length reads cfg.n_ctx: prompts beyond the requested context are refused, as on the hooked twin
    bridge.cfg.n_ctx = n_ctx
    if prepend_bos is not None:
        bridge.cfg.default_prepend_bos = prepend_bos
    return bridge.eval()
