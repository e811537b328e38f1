"""One small random-weight HookedTransformerConfig per architecture family TransformerLens 3.9 runs.

``FAMILIES`` maps a family name to the config keywords that make a block of that shape; ``build``
turns one into a seeded float64 model (d_model 32, 3 layers, 4 heads of 8) whose norm gains, biases
and sink logits are random too, so every weight the analyses read is exercised. ``REFUSED`` names
the families the certified bound refuses (with a word of the reason each refusal must contain).
Shared by the conformance suite, ``scripts/architectures.py`` and anyone who wants to try a family.
"""

from __future__ import annotations

import torch

__all__ = ["BASE", "FAMILIES", "REFUSED", "TOKENS", "build", "config"]

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


def config(name: str, **overrides):
    from transformer_lens import HookedTransformerConfig  # TransformerLens 3 only: imported when a family is built

    kwargs = {**BASE, **FAMILIES[name], **overrides}
    return HookedTransformerConfig(model_name=f"family-{name}", dtype=torch.float64, device="cpu", seed=0, **kwargs)


def build(name: str, *, seed: int = 0, **overrides):
    """A seeded float64 model of family ``name`` with random norm gains, biases and sink logits."""
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
