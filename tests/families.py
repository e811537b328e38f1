"""One small random-weight HookedTransformerConfig per architecture family TransformerLens 3.9 runs.

``FAMILIES`` maps a family name to the config keywords that make a block of that shape; ``build``
turns one into a seeded float64 model (d_model 32, 3 layers, 4 heads of 8) whose norm gains, biases
and sink logits are random too, so every weight the analyses read is exercised. ``REFUSED`` names
the families the certified bound refuses (with a word of the reason each refusal must contain).
Shared by the conformance suite, ``scripts/architectures.py`` and anyone who wants to try a family.

Without ``HookedTransformer`` (TransformerLens 4), ``build`` boots a ``TransformerBridge`` over the
family's random-weight ``transformers`` twin (``HF_TWINS``; same sizes, norms and biases drawn away
from their defaults) and keeps a plain copy of the twin, untouched by the bridge, for
``tests/reference.py``. Families with no twin are TransformerLens 3 only: :func:`params` marks them
``hooked``, so ``-m "not hooked"`` deselects them instead of skipping them. ``BRIDGE_ONLY`` families
(StableLM, Falcon, StarCoder2, Phi-3, Qwen3: no HookedTransformer config) are bridges on both lines.
A family whose HookedTransformer config only switches hook flags on (split Q/K/V inputs) has as twin
another family's twin booted and then switched the same way (``BRIDGE_FLAGS``: ``bridge.set_<flag>(value)``
after the boot, as a user does), so it runs on TransformerLens 4 too.
"""

from __future__ import annotations

import weakref

import pytest
import torch

__all__ = ["ALL", "BASE", "BRIDGE_ONLY", "FAMILIES", "HF_FLOAT32_INSIDE", "HF_TWINS", "REFUSED", "TOKENS"]
__all__ += ["BRIDGE_FLAGS", "build", "config", "hf_reference", "params"]

BASE = dict(
    n_layers=3,
    d_model=32,
    n_heads=4,
    d_head=8,
    d_mlp=64,
    d_vocab=50,
    n_ctx=64,
    act_fn="gelu_new",
    normalization_type="LN",
    positional_embedding_type="standard",
    default_prepend_bos=False,
)
_ROTARY = dict(positional_embedding_type="rotary", rotary_dim=8, normalization_type="RMS")
_LLAMA = dict(_ROTARY, gated_mlp=True, act_fn="silu")

FAMILIES: dict[str, dict] = {
    "gpt2": {},
    "llama_gqa": dict(_LLAMA, n_key_value_heads=2),
    "gemma": dict(_LLAMA, act_fn="gelu_pytorch_tanh"),
    "gemma2_post_norm": dict(
        _LLAMA,
        act_fn="gelu_pytorch_tanh",
        n_key_value_heads=2,
        use_normalization_before_and_after=True,
        attn_scores_soft_cap=50.0,
        output_logits_soft_cap=30.0,
        use_local_attn=True,
        window_size=4,
        attn_types=["local", "global", "local"],
    ),
    "gemma3_post_norm_qk_norm": dict(
        _LLAMA,
        act_fn="gelu_pytorch_tanh",
        n_key_value_heads=2,
        use_normalization_before_and_after=True,
        use_qk_norm=True,
    ),
    "mistral_windows": dict(
        _LLAMA,
        n_key_value_heads=2,
        use_local_attn=True,
        window_size=3,
        attn_types=["local"] * 3,
    ),
    "bloom_alibi": dict(positional_embedding_type="alibi", act_fn="gelu"),
    "qwen2_biases": dict(_LLAMA, n_key_value_heads=2),  # build() makes every bias random
    "pythia_parallel": dict(positional_embedding_type="rotary", rotary_dim=4, parallel_attn_mlp=True, act_fn="gelu"),
    "gptj_parallel": dict(positional_embedding_type="rotary", rotary_dim=4, parallel_attn_mlp=True),
    "phi_parallel": dict(positional_embedding_type="rotary", rotary_dim=2, parallel_attn_mlp=True),
    "olmo2_output_norms": dict(_LLAMA, original_architecture="Olmo2ForCausalLM"),
    "olmo_clip_qkv": dict(_LLAMA, clip_qkv=0.3),
    "gpt_oss_sinks": dict(_LLAMA, n_key_value_heads=2, use_attention_sinks=True),
    "moe_mixtral": dict(_LLAMA, num_experts=4, experts_per_token=2),
    "moe_topk_renormalised": dict(_LLAMA, num_experts=4, experts_per_token=2, norm_topk_prob=True),
    "gpt_oss_moe_sinks": dict(
        _LLAMA,
        n_key_value_heads=2,
        num_experts=4,
        experts_per_token=2,
        use_attention_sinks=True,
        original_architecture="GptOssForCausalLM",
    ),
    "solu": dict(act_fn="solu_ln"),
    "solu_gated_rms": dict(act_fn="solu_ln", gated_mlp=True, normalization_type="RMS"),
    "split_qkv": dict(use_split_qkv_input=True),
    "split_qkv_gqa": dict(_LLAMA, n_key_value_heads=2, use_split_qkv_input=True),
    "ungrouped_gqa": dict(_LLAMA, n_key_value_heads=2, ungroup_grouped_query_attention=True),
    "attn_only": dict(attn_only=True, d_mlp=None, act_fn=None),
    "no_norm": dict(normalization_type=None),
    "ln_pre": dict(normalization_type="LNPre"),
    "rms_pre": dict(_ROTARY, normalization_type="RMSPre"),
    "final_rms": dict(final_rms=True),
    "shortformer": dict(positional_embedding_type="shortformer"),
    "bidirectional": dict(attention_dir="bidirectional"),
}

#: families the certified bound refuses, with a word its message must contain
REFUSED = {"bidirectional": "bidirectional"}

TOKENS = torch.tensor([3, 17, 5, 5, 9, 30, 2, 11, 4, 41, 8, 1])

_HF_LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, head_dim=8)
_HF_LLAMA = dict(_HF_LLAMA, max_position_embeddings=64, num_key_value_heads=4)
_HF_GEMMA = dict(_HF_LLAMA, hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=8)

_HF_MOE = dict(_HF_LLAMA, num_experts_per_tok=2)

#: family -> (transformers config class, kwargs) of the same block, for the bridge on TransformerLens 4.
#: Left out (no twin): dense learned sinks (transformers' GPT-OSS is always a mixture of experts), SoLU,
#: ungrouped GQA inputs, attn-only, no/pre norms, final RMS, shortformer, bidirectional. Split-QKV
#: families are another family's twin with a bridge hook flag on (``BRIDGE_FLAGS``).
HF_TWINS: dict[str, tuple[str, dict]] = {
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=3, n_head=4, n_positions=64, n_inner=64)),
    "llama_gqa": ("LlamaConfig", dict(_HF_LLAMA, num_key_value_heads=2)),
    "gemma": ("GemmaConfig", _HF_GEMMA),
    "gemma2_post_norm": ("Gemma2Config", dict(
        _HF_GEMMA, num_key_value_heads=2, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
        sliding_window=4, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    )),
    "gemma3_post_norm_qk_norm": ("Gemma3TextConfig", dict(
        _HF_GEMMA, num_key_value_heads=2, layer_types=["full_attention"] * 3,
    )),
    "mistral_windows": ("MistralConfig", dict(_HF_LLAMA, num_key_value_heads=2, sliding_window=3)),
    "bloom_alibi": ("BloomConfig", dict(hidden_size=32, n_layer=3, n_head=4)),
    "qwen2_biases": ("Qwen2Config", dict(_HF_LLAMA, num_key_value_heads=2)),
    "pythia_parallel": ("GPTNeoXConfig", dict(
        _HF_LLAMA, num_key_value_heads=None, rotary_pct=0.5, use_parallel_residual=True, hidden_act="gelu",
    )),
    "gptj_parallel": ("GPTJConfig", dict(n_embd=32, n_layer=3, n_head=4, n_positions=64, rotary_dim=4, n_inner=64)),
    "phi_parallel": ("PhiConfig", dict(_HF_LLAMA, partial_rotary_factor=0.25)),
    "olmo2_output_norms": ("Olmo2Config", _HF_LLAMA),
    "olmo_clip_qkv": ("OlmoConfig", dict(_HF_LLAMA, clip_qkv=0.3)),
    # the same routing: TransformerLens's moe_mixtral keeps the softmax's top-k weights as they are (so does
    # Qwen3-MoE without norm_topk_prob); transformers' Mixtral renormalises them to sum to 1
    "moe_mixtral": ("Qwen3MoeConfig", dict(
        _HF_MOE, num_experts=4, moe_intermediate_size=64, norm_topk_prob=False, attention_bias=True,
    )),
    "moe_topk_renormalised": ("MixtralConfig", dict(_HF_MOE, num_local_experts=4)),
    # GPT-OSS: learned sinks, a biased router (softmax over the top k), biased experts with the clamped SwiGLU
    # on interleaved gate_up_proj columns; every layer full attention and plain rotary, as the hooked family
    # (transformers' defaults alternate sliding windows and use YaRN)
    "gpt_oss_moe_sinks": ("GptOssConfig", dict(
        _HF_MOE, num_key_value_heads=2, num_local_experts=4, layer_types=["full_attention"] * 3,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )),
}  # fmt: skip

#: family -> the bridge hook flags ``build`` switches on after booting its twin, by the bridge's own setters
#: (``bridge.set_use_split_qkv_input(True)``): the TransformerLens 3 config sets the same field. Its twin is
#: the twin of the family it adds the flag to, so the HF reference (plain autograd, no hooks) is the same.
BRIDGE_FLAGS: dict[str, dict[str, bool]] = {
    "split_qkv": {"use_split_qkv_input": True},
    "split_qkv_gqa": {"use_split_qkv_input": True},
}
HF_TWINS |= {"split_qkv": HF_TWINS["gpt2"], "split_qkv_gqa": HF_TWINS["llama_gqa"]}
assert all(FAMILIES[name].get(flag) == value for name, flags in BRIDGE_FLAGS.items() for flag, value in flags.items())

#: families with no HookedTransformer config: ``build`` boots a bridge over the twin on either line
#: (attention biases switched on where the family has them, so the value-bias attack has a target)
BRIDGE_ONLY: dict[str, tuple[str, dict]] = {
    "stablelm_partial_rotary": ("StableLmConfig", dict(
        _HF_LLAMA, num_key_value_heads=2, partial_rotary_factor=0.5, use_qkv_bias=True,
    )),
    "falcon_parallel_mqa": ("FalconConfig", dict(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=4, new_decoder_architecture=False,
        parallel_attn=True, alibi=False, multi_query=True, max_position_embeddings=64, bias=True,
    )),
    "starcoder2_windows": ("Starcoder2Config", dict(_HF_LLAMA, num_key_value_heads=2, sliding_window=4)),
    "phi3_fused": ("Phi3Config", dict(_HF_LLAMA, num_key_value_heads=2, pad_token_id=0)),
    "qwen3_qk_norm": ("Qwen3Config", dict(_HF_LLAMA, num_key_value_heads=2, attention_bias=True)),
}  # fmt: skip

#: every family: TransformerLens 3's configs, then the bridge-only ones
ALL = [*FAMILIES, *BRIDGE_ONLY]

#: twins where transformers computes a step in float32 even in a float64 model (RMSNorm's upcast, OLMo's
#: LayerNorm, NeoX's softmax): their references agree with a bridge to float32 resolution only (1e-5 of the
#: largest entry, as in tests/test_bridge_conformance.py), the others to 1e-10
HF_FLOAT32_INSIDE = frozenset(
    {"llama_gqa", "gemma", "gemma2_post_norm", "gemma3_post_norm_qk_norm", "mistral_windows", "qwen2_biases"}
    | {"olmo2_output_norms", "olmo_clip_qkv", "pythia_parallel", "moe_mixtral", "moe_topk_renormalised"}
    | {"falcon_parallel_mqa", "phi3_fused", "qwen3_qk_norm", "split_qkv_gqa"}
    | {"gpt_oss_moe_sinks"}  # RMSNorm's float32 upcast, rotary cos/sin computed in float32
)


def params(names) -> list:
    """``names`` as pytest params, marked ``hooked`` (TransformerLens 3 only) where there is no bridge twin."""
    return [
        name if name in HF_TWINS or name in BRIDGE_ONLY else pytest.param(name, marks=pytest.mark.hooked)
        for name in names
    ]


def sweep(names, *, fast) -> list:
    """:func:`params` of a per-family sweep: every family but those in ``fast`` is also a ``conformance``
    case, so ``make test-fast`` runs the few in ``fast`` and ``make test`` every one."""
    unknown = set(fast) - set(names)
    if unknown:
        raise ValueError(f"fast names families outside the sweep: {sorted(unknown)}")
    swept = []
    for param in params(names):
        name, marks = (param, []) if isinstance(param, str) else (param.values[0], list(param.marks))
        swept.append(param if name in fast else pytest.param(name, marks=[*marks, pytest.mark.conformance]))
    return swept


def config(name: str, **overrides):
    from transformer_lens import HookedTransformerConfig  # TransformerLens 3 only: imported when a family is built

    kwargs = {**BASE, **FAMILIES[name], **overrides}
    return HookedTransformerConfig(model_name=f"family-{name}", dtype=torch.float64, device="cpu", seed=0, **kwargs)


def build(name: str, *, seed: int = 0, **overrides):
    """A seeded float64 model of family ``name`` with random norm gains, biases and sink logits."""
    from lens_squash.edge.backends import has_hooked_transformer

    if not has_hooked_transformer() or name in BRIDGE_ONLY:
        return _build_bridge(name, seed=seed, **overrides)
    from transformer_lens import HookedTransformer  # TransformerLens 3 only

    torch.manual_seed(seed)
    model = HookedTransformer(config(name, **overrides))
    with torch.no_grad():  # TL 3.9's MoE experts are nn.Linear layers created in float32 whatever cfg.dtype
        for param in model.parameters():
            if param.dtype != torch.float64:
                param.data = param.data.double()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            leaf = pname.rsplit(".", 1)[-1]
            if leaf == "w" and param.ndim == 1:  # norm gains: away from 1, so their placement matters
                param.copy_(torch.rand(param.shape, generator=generator, dtype=param.dtype) * 1.5 + 0.5)
            elif leaf.startswith("b") or leaf.startswith("_b") or leaf == "sinks" or leaf == "bias":
                param.copy_(0.3 * torch.randn(param.shape, generator=generator, dtype=param.dtype))
    return model.eval()


#: bridge -> (plain transformers copy of its weights, the bridge's parameters when built)
_REFERENCES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _twin(name: str, seed: int):
    from .hf_families import build_hf

    hf = build_hf(name, dtype=torch.float64, seed=seed, table={**HF_TWINS, **BRIDGE_ONLY})
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # every bias and sink logit random, as on the hooked family (norm biases: build_hf's)
        for pname, param in hf.named_parameters():
            sinks = pname.endswith(".sinks")  # GPT-OSS's learned sink logits (HF draws them at std 0.02)
            if sinks or pname.endswith("bias") and "norm" not in pname and "ln" not in pname.rsplit(".", 2)[-2]:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator, dtype=param.dtype))
    return hf


def _build_bridge(name: str, *, seed: int, **overrides):
    from .hf_families import boot

    if (name not in HF_TWINS and name not in BRIDGE_ONLY) or overrides:
        raise LookupError(f"family {name!r} (overrides {sorted(overrides)}) has no transformers twin: TL 3 only")
    bridge = boot(_twin(name, seed))
    for flag, value in BRIDGE_FLAGS.get(name, {}).items():
        getattr(bridge, f"set_{flag}")(value)
    snapshot = [p.detach().clone() for p in bridge.original_model.parameters()]
    _REFERENCES[bridge] = (_twin(name, seed), snapshot)  # booting wraps the twin: the reference is a copy
    return bridge


def hf_reference(bridge):
    """The plain ``transformers`` copy of a bridge ``build`` made; refused once the bridge's weights moved
    (an edit after the build would make the copy a reference for another model)."""
    reference, snapshot = _REFERENCES[bridge]
    now = list(bridge.original_model.parameters())
    if len(now) != len(snapshot) or not all(torch.equal(a, b) for a, b in zip(now, snapshot, strict=True)):
        raise AssertionError("the bridge was edited after build(): its transformers copy is no reference")
    return reference
