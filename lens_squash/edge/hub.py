"""Models from the Hugging Face Hub: a name TransformerLens knows, then the local cache or a quick
network probe, so that an unreachable Hub is one clear line at once, not minutes of retries.
"""

from __future__ import annotations

import contextlib
import difflib
import socket
from collections.abc import Iterator
from urllib.parse import urlparse

import torch

from .backends import ModelLoadError, boot_bridge, hooked_api
from .model_names import OFFLINE_MODEL_NAMES, TINY_MODEL

__all__ = ["load_from_hub", "offline_names"]


def offline_names() -> str:
    """The models that load with no network, for messages."""
    return ", ".join([*sorted(OFFLINE_MODEL_NAMES), TINY_MODEL])


def _hub_name(name: str, backend: str) -> str:
    """The Hub repository TransformerLens would load for ``name``; unknown names are refused here."""
    if backend == "hooked":
        from transformer_lens.loading_from_pretrained import make_model_alias_map

        aliases = make_model_alias_map()  # lower-cased alias or official name -> official name
        official = aliases.get(name.lower())
        known = sorted(aliases)
    else:
        official, known = _bridge_hub_name(name)
    if official is None:
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ModelLoadError(
            f"unknown model {name!r}.{hint} Models that load with no network: {offline_names()}. "
            "Other names must be ones TransformerLens knows (see transformer_lens.supported_models)."
        )
    return official


def _bridge_hub_name(name: str) -> tuple[str | None, list[str]]:
    """The official name for ``name`` (itself, or the model an alias stands for) and every known name.

    The bridge also loads any Hub repository whose architecture it supports, so an ``owner/name``
    id TransformerLens does not list is passed through (a missing one fails at the cache check).
    """
    from transformer_lens.supported_models import MODEL_ALIASES, OFFICIAL_MODEL_NAMES

    by_alias = {alias: official for official, aliases in MODEL_ALIASES.items() for alias in aliases}
    known = sorted({*OFFICIAL_MODEL_NAMES, *by_alias})
    if name in OFFICIAL_MODEL_NAMES:
        return name, known
    return by_alias.get(name, name if "/" in name else None), known


def _hub_reachable(timeout: float = 1.0) -> bool:
    """A TCP connection to the Hub within ``timeout`` seconds (no request is sent)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _in_hf_cache(repo: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo, "config.json"), str)


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    # huggingface_hub and transformers read this flag on every call (is_offline_mode); setting it
    # for the duration of one load makes a cached model load without minutes of retries.
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def load_from_hub(name: str, *, dtype: torch.dtype, device: str, n_ctx: int, backend: str):
    repo = _hub_name(name, backend)
    cached = _in_hf_cache(repo)
    online = _hub_reachable()
    if not cached and not online:
        raise ModelLoadError(
            f"cannot load {name!r}: the Hugging Face Hub is unreachable (no network, or HF_HUB_OFFLINE "
            f"is set) and {repo} is not in the local Hugging Face cache. Models that load with no "
            f"network: {offline_names()}."
        )
    offline = contextlib.nullcontext() if online else _hub_offline()
    try:
        with offline:
            if backend == "bridge":
                return boot_bridge(repo, hf_model=None, tokenizer=None, dtype=dtype, device=device, n_ctx=n_ctx)
            HookedTransformer, _ = hooked_api()
            return HookedTransformer.from_pretrained(name, dtype=dtype, device=device, n_ctx=n_ctx)
    except Exception as err:  # noqa: BLE001 - re-raised with the fix, the cause attached
        first = str(err).splitlines()[0][:200] if str(err) else ""
        raise ModelLoadError(
            f"could not load model {name!r} through TransformerLens ({type(err).__name__}: {first}). "
            f"Models that load with no network: {offline_names()}."
        ) from err
