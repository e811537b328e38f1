"""Tiny random models: seeded, built in milliseconds, for tests, demos and the paper's synthetic checks.

:func:`tiny_model` has every knob those need (positional encoding, norm, causal or bidirectional
attention, GQA, local windows); ``tiny-random`` is SmolLM2's architecture in miniature with its
tokenizer, the one set of weights on both backends (a ``HookedTransformer`` and a bridge over an
equivalent ``transformers`` Llama). Where ``HookedTransformer`` is missing (TransformerLens 4),
:func:`tiny_model` boots a bridge over the random-weight ``transformers`` twin of its shape (GPT-2,
GPT-NeoX, MPT for ALiBi, Llama, Mistral or Arcee; ``attn_only`` as the twin with its MLP's output
projection held at exactly zero), and refuses in one line the shapes ``transformers`` cannot express.
``weights`` (TransformerLens layout) are written into either model, the twin's in ``transformers``' layout.
MPT's ALiBi adds ``m·(j − n + 1)`` to its ``hook_attn_scores`` where TransformerLens adds ``−m·(i − j)``: a
constant per query row, so the patterns agree and the raw scores do not.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from .backends import ModelLoadError, boot_bridge, has_hooked_transformer, hooked_api
from .dtypes import resolve_dtype
from .gguf import offline_tokenizer
from .model_names import TINY_MODEL

__all__ = ["TINY_RANDOM_MAX_CTX", "tiny_model", "tiny_random", "tiny_random_bridge", "tiny_random_state"]

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
    weights: dict[str, torch.Tensor] | None = None,
):
    """A seeded, randomly initialised :class:`HookedTransformer` for tests and theory checks.

    ``positional`` is one of ``standard`` (learned absolute), ``rotary``, ``alibi`` or ``none``
    (NoPE: a standard model whose position embedding is zero). ``norm`` is ``LN``, ``RMS`` or ``None``.
    ``window`` restricts every layer to a local attention window of that many keys.
    ``tokenizer="smollm2"`` attaches the offline SmolLM2 tokenizer (with its chat template), which sets
    ``d_vocab`` to its vocabulary size. On TransformerLens 4 (no ``HookedTransformer``) it is a
    ``TransformerBridge`` over the equivalent ``transformers`` model (see :func:`_tiny_bridge`).
    ``weights`` overwrites the seeded draws: TransformerLens names and layout (``embed.W_E``,
    ``pos_embed.W_pos``, ``blocks.{l}.attn.W_Q``/``W_K``/``W_V``/``W_O``, ``unembed.W_U``), on either model.
    """
    if positional not in _POSITIONAL:
        raise ValueError(f"positional must be one of {sorted(_POSITIONAL)}, got {positional!r}")
    if norm not in _NORMS:
        raise ValueError(f"norm must be 'LN', 'RMS' or None, got {norm!r}")
    if tokenizer not in (None, "smollm2"):
        raise ValueError(f"tokenizer must be None or 'smollm2', got {tokenizer!r}")
    hf_tokenizer = offline_tokenizer() if tokenizer == "smollm2" else None
    if hf_tokenizer is not None:
        d_vocab = len(hf_tokenizer)
    d_head = d_head or d_model // n_heads
    if not has_hooked_transformer():
        shape = _TinyShape(
            positional, _NORMS[norm], causal, n_key_value_heads, window, attn_only, gated_mlp, act_fn, d_head
        )
        sizes = dict(n_layers=n_layers, n_heads=n_heads, d_model=d_model, d_mlp=d_mlp or 4 * d_model)
        twin = (d_vocab, n_ctx, init_range, hf_tokenizer, resolve_dtype(dtype), seed, weights or {})
        return _tiny_bridge(shape, sizes, *twin)
    HookedTransformer, HookedTransformerConfig = hooked_api()
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
        model.pos_embed.W_pos.requires_grad_(requires_grad=False)
    _write_hooked(model, weights or {})
    return model.eval()


def _write_hooked(model, weights: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, value in weights.items():
            try:
                param = model.get_parameter(name)
            except AttributeError as err:
                raise ValueError(f"tiny_model(weights=...): {name!r} is not a parameter of this model") from err
            if param.shape != value.shape:
                raise ValueError(f"tiny_model(weights=...): {name} is {tuple(value.shape)}, not {tuple(param.shape)}")
            param.copy_(value)


# tiny_model on TransformerLens 4: a bridge over the random-weight transformers twin


class _TinyShape(NamedTuple):
    positional: str
    norm: str | None
    causal: bool
    n_key_value_heads: int | None
    window: int | None
    attn_only: bool
    gated_mlp: bool
    act_fn: str
    d_head: int


#: activations transformers' ACT2FN computes as TransformerLens does under the same name
_HF_ACTS = frozenset({"gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "relu", "silu"})


def _refuse(knob: str) -> ModelLoadError:
    return ModelLoadError(
        f"tiny_model({knob}) has no transformers twin to boot a TransformerBridge over: it needs "
        "HookedTransformer (install 'transformer-lens>=3.9,<4')"
    )


def _hf_family(shape: _TinyShape, n_heads: int, d_model: int, d_mlp: int) -> str:
    """``gpt2`` (LN, learned positions), ``gpt_neox`` (LN, rotary), ``mpt`` (LN, ALiBi, no biases, d_mlp
    = 4 d_model, exact GELU), ``llama`` or ``mistral`` (RMS, rotary, gated; GQA, windows), ``arcee`` (RMS,
    rotary, plain MLP; GQA): the ``transformers`` family with this block, or a refusal naming the knob.
    ``attn_only`` is any of them with the MLP's output zeroed (:func:`_silence_mlps`)."""
    for knob, unexpressible in (
        ("causal=False", not shape.causal),
        ("norm=None", shape.norm is None),
        ("positional='alibi', norm='RMS'", shape.positional == "alibi" and shape.norm == "RMS"),
        (f"act_fn={shape.act_fn!r}", shape.act_fn not in _HF_ACTS),
    ):
        if unexpressible:
            raise _refuse(knob)
    if shape.norm == "RMS":  # Llama's block (rotary comes with it); Arcee's has a plain MLP
        if shape.positional != "rotary" or (shape.window and not shape.gated_mlp):
            raise _refuse(f"norm='RMS', positional={shape.positional!r}, window={shape.window}, gated_mlp=False")
        return ("mistral" if shape.window else "llama") if shape.gated_mlp else "arcee"
    for knob, unexpressible in (
        ("norm='LN', gated_mlp=True", shape.gated_mlp),
        ("norm='LN', n_key_value_heads=...", shape.n_key_value_heads not in (None, n_heads)),
        ("norm='LN', window=...", shape.window is not None),
        ("norm='LN', d_head * n_heads != d_model", shape.d_head * n_heads != d_model),
    ):
        if unexpressible:
            raise _refuse(knob)
    if shape.positional == "alibi":  # MPT's MLP is GELU(exact) at 4 d_model, no biases anywhere
        if not shape.attn_only and (d_mlp != 4 * d_model or shape.act_fn != "gelu"):
            raise _refuse(f"positional='alibi', d_mlp={d_mlp}, act_fn={shape.act_fn!r}")
        return "mpt"
    return "gpt_neox" if shape.positional == "rotary" else "gpt2"


def _hf_config(family: str, shape: _TinyShape, sizes: dict, d_vocab: int, n_ctx: int):
    import transformers

    n_layers, n_heads, d_model, d_mlp = (sizes[k] for k in ("n_layers", "n_heads", "d_model", "d_mlp"))
    common = dict(vocab_size=d_vocab, tie_word_embeddings=False)
    if family == "gpt2":
        return transformers.GPT2Config(
            **common, n_embd=d_model, n_layer=n_layers, n_head=n_heads, n_positions=n_ctx, n_inner=d_mlp,
            activation_function=shape.act_fn, layer_norm_epsilon=1e-5,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )  # fmt: skip
    if family == "mpt":  # MPT's MLP is 4 d_model wide whatever expansion_ratio says
        return transformers.MptConfig(
            **common, d_model=d_model, n_heads=n_heads, n_layers=n_layers, max_seq_len=n_ctx, no_bias=True,
            layer_norm_epsilon=1e-5, resid_pdrop=0.0, emb_pdrop=0.0,
            attn_config={"alibi": True, "alibi_bias_max": 8, "attn_pdrop": 0, "clip_qkv": None, "qk_ln": False},
        )  # fmt: skip
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if family == "gpt_neox":  # TransformerLens rotates all of d_head, NeoX-style halves, as rotary_pct=1 does
        return transformers.GPTNeoXConfig(
            **common, hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=n_heads,
            intermediate_size=d_mlp, hidden_act=shape.act_fn, max_position_embeddings=n_ctx,
            rope_parameters={**rope, "partial_rotary_factor": 1.0}, use_parallel_residual=False,
            layer_norm_eps=1e-5, attention_dropout=0.0, hidden_dropout=0.0,
        )  # fmt: skip
    config_class = {"mistral": transformers.MistralConfig, "arcee": transformers.ArceeConfig}.get(
        family, transformers.LlamaConfig
    )
    window = {"sliding_window": shape.window} if family == "mistral" else {}
    return config_class(
        **common, **window, hidden_size=d_model, intermediate_size=d_mlp, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=shape.n_key_value_heads or n_heads,
        head_dim=shape.d_head, max_position_embeddings=n_ctx, rms_norm_eps=1e-5, rope_parameters=rope,
        hidden_act=shape.act_fn, attention_bias=False, mlp_bias=False,
    )  # fmt: skip


def _init_as_hooked(hf_model, std: float, seed: int) -> None:
    """HookedTransformer's GPT-2 init on the twin: every matrix ~ N(0, std), biases 0, norm gains 1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            if param.ndim >= 2:
                param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float64).to(param.dtype) * std)
            elif name.endswith("weight"):  # 1-D weights are norm gains
                param.fill_(1.0)
            else:
                param.zero_()


#: each family's MLP output projection inside block ``l`` (Llama, Mistral, Arcee: ``mlp.down_proj``)
_MLP_OUT = {"gpt2": "mlp.c_proj", "gpt_neox": "mlp.dense_4h_to_h", "mpt": "ffn.down_proj"}


def _silence_mlps(hf_model, family: str, n_layers: int) -> None:
    """attn_only on a twin: every MLP's output projection (weight and bias) held at 0.0, so the MLP adds
    exactly 0 and the residual stream is the attention's alone (no transformers decoder omits its MLP)."""
    out = _MLP_OUT.get(family, "mlp.down_proj")
    with torch.no_grad():
        for l in range(n_layers):
            params = [p for name, p in hf_model.named_parameters() if f".{l}.{out}." in name]
            if not params:  # another transformers release: fail here rather than keep a live MLP
                raise ModelLoadError(f"tiny_model(attn_only=True): no {out} in layer {l} of {type(hf_model).__name__}")
            for param in params:
                param.zero_()
                param.requires_grad_(requires_grad=False)


def _twin_view(hf_model, family: str, name: str, n_heads: int) -> torch.Tensor:
    """The twin's parameter behind TransformerLens weight ``name``, as a view in TransformerLens layout
    (writing it writes the twin): fused QKV sliced per family (GPT-2 columns, MPT row chunks, NeoX
    per-head interleaved rows), ``nn.Linear`` weights transposed."""
    get, heads = hf_model.get_parameter, (n_heads, -1)
    if name in ("embed.W_E", "unembed.W_U"):
        return hf_model.get_input_embeddings().weight if name == "embed.W_E" else hf_model.lm_head.weight.T
    if name == "pos_embed.W_pos" and family == "gpt2":
        return get("transformer.wpe.weight")
    parts = name.split(".")
    if len(parts) != 4 or parts[0] != "blocks" or parts[2] != "attn" or parts[3] not in ("W_Q", "W_K", "W_V", "W_O"):
        raise ValueError(f"tiny_model(weights=...): {name!r} has no place in the {family} twin")
    l, k = parts[1], "QKV".find(parts[3][-1])  # k = -1 for W_O
    if family == "gpt2":
        if k < 0:
            return get(f"transformer.h.{l}.attn.c_proj.weight").unflatten(0, heads)
        fused = get(f"transformer.h.{l}.attn.c_attn.weight")  # Conv1D [d_model, 3 d_model]: x @ W
        return fused.chunk(3, dim=1)[k].unflatten(1, heads).permute(1, 0, 2)
    prefix = {"gpt_neox": f"gpt_neox.layers.{l}.attention.", "mpt": f"transformer.blocks.{l}.attn."}
    prefix = prefix.get(family, f"model.layers.{l}.self_attn.")
    if k < 0:
        out = {"gpt_neox": "dense", "mpt": "out_proj"}.get(family, "o_proj")
        return get(f"{prefix}{out}.weight").T.unflatten(0, heads)
    if family == "gpt_neox":  # rows: head-major, then q | k | v
        fused = get(f"{prefix}query_key_value.weight").unflatten(0, (n_heads, 3, -1))
        return fused[:, k].transpose(1, 2)
    if family == "mpt":
        return get(f"{prefix}Wqkv.weight").chunk(3)[k].unflatten(0, heads).transpose(1, 2)
    return get(f"{prefix}{'qkv'[k]}_proj.weight").unflatten(0, heads).transpose(1, 2)


def _write_twin(hf_model, family: str, weights: dict[str, torch.Tensor], n_heads: int) -> None:
    with torch.no_grad():
        for name, value in weights.items():
            try:
                view = _twin_view(hf_model, family, name, n_heads)
            except AttributeError as err:
                raise ValueError(f"tiny_model(weights=...): {name!r} has no place in the {family} twin") from err
            if view.shape != value.shape:
                raise ValueError(f"tiny_model(weights=...): {name} is {tuple(value.shape)}, not {tuple(view.shape)}")
            view.copy_(value)


@functools.lru_cache(maxsize=1)
def _boot_tokenizer():
    """The bridge needs a tokenizer to boot offline; one shared copy (1-2 s to read), dropped after the boot."""
    return offline_tokenizer()


def _tiny_bridge(shape: _TinyShape, sizes: dict, d_vocab, n_ctx, init_range, hf_tokenizer, dtype, seed, weights):
    """tiny_model as a bridge: seeded, deterministic, the caller's RNG untouched (transformers' init,
    overwritten here, and the bridge's boot draw from the global RNG)."""
    with torch.random.fork_rng(devices=[]):
        return _boot_twin(shape, sizes, d_vocab, n_ctx, init_range, hf_tokenizer, dtype, seed, weights)


def _boot_twin(shape: _TinyShape, sizes: dict, d_vocab, n_ctx, init_range, hf_tokenizer, dtype, seed, weights):
    import transformers

    family = _hf_family(shape, sizes["n_heads"], sizes["d_model"], sizes["d_mlp"])
    config = _hf_config(family, shape, sizes, d_vocab, n_ctx)
    config._attn_implementation = "eager"  # the patterns hooks see are the ones the model uses
    hf_model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").to(dtype)
    hf_model.config.architectures = [type(hf_model).__name__]  # how the bridge picks its adapter
    _init_as_hooked(hf_model, init_range if init_range is not None else 0.8 / sizes["d_model"] ** 0.5, seed)
    if shape.positional == "none":  # NoPE: learned positions held at zero, as on the hooked model
        hf_model.transformer.wpe.weight.data.zero_()
        hf_model.transformer.wpe.weight.requires_grad_(requires_grad=False)
    if shape.attn_only:
        _silence_mlps(hf_model, family, sizes["n_layers"])
    # before the boot: a bridge may copy fused weights (MPT splits Wqkv) when it wraps the twin
    _write_twin(hf_model, family, weights, sizes["n_heads"])
    bridge = boot_bridge(
        f"lens-squash/tiny-{family}",
        hf_model=hf_model,
        tokenizer=hf_tokenizer or _boot_tokenizer(),
        dtype=dtype,
        device="cpu",
        n_ctx=n_ctx,
        prepend_bos=False,
    )
    if hf_tokenizer is None:  # as the hooked tiny model: token ids in, no text
        bridge.tokenizer = None
    return bridge


# tiny-random: one set of weights, on both backends

#: tiny-random's shape: SmolLM2's architecture (RMSNorm, rotary, GQA, gated SiLU) in miniature
_TINY_RANDOM = {"n_layers": 2, "n_heads": 4, "n_key_value_heads": 2, "d_model": 64, "d_mlp": 256}
_TINY_RANDOM_SEED = 0
#: as SmolLM2; the rotary tables are n_ctx long, so a huge n_ctx must be refused, not allocated
TINY_RANDOM_MAX_CTX = 8192


def tiny_random(*, dtype: torch.dtype, n_ctx: int):
    knobs = {k: v for k, v in _TINY_RANDOM.items() if k != "d_mlp"}  # tiny_model's d_mlp is 4 d_model
    return tiny_model(
        **knobs,
        positional="rotary",
        norm="RMS",
        gated_mlp=True,
        act_fn="silu",
        tokenizer="smollm2",
        n_ctx=n_ctx,
        dtype=dtype,
        seed=_TINY_RANDOM_SEED,
    )


def tiny_random_state(d_vocab: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
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
        vocab_size=len(tokenizer),
        hidden_size=d,
        intermediate_size=_TINY_RANDOM["d_mlp"],
        num_hidden_layers=_TINY_RANDOM["n_layers"],
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=d // heads,
        max_position_embeddings=n_ctx,
        rms_norm_eps=1e-5,  # TransformerLens's eps
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        hidden_act="silu",
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation="eager",
    )
    state = tiny_random_state(len(tokenizer), dtype)
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


def tiny_random_bridge(*, dtype: torch.dtype, device: str, n_ctx: int):
    tokenizer = offline_tokenizer()
    hf_model = _tiny_random_llama(dtype=dtype, n_ctx=n_ctx, tokenizer=tokenizer)
    return boot_bridge(
        TINY_MODEL,
        hf_model=hf_model,
        tokenizer=tokenizer,
        dtype=dtype,
        device=device,
        n_ctx=n_ctx,
        prepend_bos=False,
    )
