"""Tiny random-weight ``transformers`` models, one per causal decoder family a TransformerBridge boots.

Built from configs (no network): 2 layers, d_model 32, 4 heads, eager attention (so HF's
``output_attentions`` are the patterns the model uses). Every norm gain and bias is drawn away from
its default (:func:`perturb_norms`): a reader that takes Gemma's raw ``w`` for the gain, or drops a
bias, is then wrong by O(1), not by nothing. :func:`boot` wraps a model in a bridge the way a user
does (``boot_transformers(..., hf_model=...)``, then compatibility mode without processing).
"""

from __future__ import annotations

import functools

import torch

__all__ = ["CAUSAL", "NON_CAUSAL", "TOKENS", "VOCAB", "boot", "build_hf", "perturb_norms"]

VOCAB = 96
TOKENS = torch.tensor([1, 17, 42, 5, 77, 9, 31, 64, 3, 50])

_LLAMA_LIKE = {
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}

#: family -> (transformers config class name, config kwargs)
CAUSAL: dict[str, tuple[str, dict]] = {
    "gpt2": ("GPT2Config", {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64, "n_inner": 48}),
    "gpt_neox": (
        "GPTNeoXConfig",
        {**_LLAMA_LIKE, "num_key_value_heads": None, "rotary_pct": 0.5, "use_parallel_residual": True},
    ),
    "gptj": ("GPTJConfig", {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64, "rotary_dim": 4}),
    "bloom": ("BloomConfig", {"hidden_size": 32, "n_layer": 2, "n_head": 4}),
    "opt": (
        "OPTConfig",
        {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "ffn_dim": 48,
         "word_embed_proj_dim": 32, "max_position_embeddings": 64},
    ),
    "phi": ("PhiConfig", {**_LLAMA_LIKE, "num_key_value_heads": 4, "partial_rotary_factor": 0.5}),
    "phi3": ("Phi3Config", {**_LLAMA_LIKE, "pad_token_id": 0}),
    "llama": ("LlamaConfig", _LLAMA_LIKE),
    "mistral": ("MistralConfig", {**_LLAMA_LIKE, "sliding_window": 4}),
    "mixtral": ("MixtralConfig", {**_LLAMA_LIKE, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2": ("Qwen2Config", _LLAMA_LIKE),
    "qwen3": ("Qwen3Config", {**_LLAMA_LIKE, "head_dim": 8}),
    "gemma": ("GemmaConfig", {**_LLAMA_LIKE, "head_dim": 8}),
    "gemma2": (
        "Gemma2Config",
        {**_LLAMA_LIKE, "head_dim": 8, "sliding_window": 4, "attn_logit_softcapping": 20.0,
         "final_logit_softcapping": 10.0, "query_pre_attn_scalar": 8},
    ),
    "gemma3_text": (
        "Gemma3TextConfig",
        {**_LLAMA_LIKE, "head_dim": 8, "sliding_window": 4, "query_pre_attn_scalar": 8},
    ),
    "olmo": ("OlmoConfig", _LLAMA_LIKE),
    "olmo2": ("Olmo2Config", _LLAMA_LIKE),
    "stablelm": ("StableLmConfig", {**_LLAMA_LIKE, "partial_rotary_factor": 0.5}),
    "falcon": (
        "FalconConfig",
        {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "new_decoder_architecture": False,
         "parallel_attn": True, "alibi": False, "multi_query": True},
    ),
    "starcoder2": ("Starcoder2Config", {**_LLAMA_LIKE, "sliding_window": 8}),
}  # fmt: skip

#: families that are not causal attention decoders: lens_squash refuses them
NON_CAUSAL: dict[str, tuple[str, dict]] = {
    "bert": ("BertConfig", {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                            "intermediate_size": 48}),
    "mamba": ("MambaConfig", {"hidden_size": 32, "num_hidden_layers": 2, "state_size": 4}),
}  # fmt: skip


def perturb_norms(model: torch.nn.Module, seed: int = 0) -> None:
    """Every norm's weight and bias drawn away from its default: gains in ±[0.5, 1.5], biases ±0.3.

    Gemma's norms store ``w`` with effective gain ``1 + w``; a draw around 0 there still moves the
    gain, and a reader that takes ``w`` for the gain is off by about 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if "norm" not in type(module).__name__.lower() and "ln" not in name.split(".")[-1]:
                continue
            for pname, param in module.named_parameters(recurse=False):
                noise = torch.rand(param.shape, generator=gen, dtype=torch.float64).to(param.dtype)
                if pname == "bias":
                    param.copy_(0.6 * noise - 0.3)
                else:
                    sign = torch.where(torch.rand(param.shape, generator=gen) < 0.15, -1.0, 1.0).to(param.dtype)
                    param.copy_(param + sign * (0.5 + noise) - param.mean())


def build_hf(family: str, *, dtype: torch.dtype = torch.float64, seed: int = 0, table=None):
    """A random-weight ``*ForCausalLM`` of ``family`` in eval mode, eager attention, norms perturbed."""
    import transformers

    cls_name, kwargs = (table or {**CAUSAL, **NON_CAUSAL})[family]
    config = getattr(transformers, cls_name)(vocab_size=VOCAB, **kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model = model.to(dtype).eval()
    model.config.architectures = [type(model).__name__]  # how the bridge picks its adapter
    with torch.no_grad():  # HF inits with std 0.02: too small to exercise anything at d_model 32
        for name, param in model.named_parameters():
            if param.ndim == 2:
                param.mul_(10.0)
    perturb_norms(model, seed)
    return model


@functools.lru_cache(maxsize=1)
def _tokenizer():
    from lens_squash.edge.gguf import offline_tokenizer

    return offline_tokenizer()


def boot(hf_model, *, compatibility: bool = True, no_processing: bool = True):
    """A TransformerBridge over ``hf_model`` as a user boots one, optionally in compatibility mode."""
    from transformer_lens.model_bridge import TransformerBridge

    dtype = next(hf_model.parameters()).dtype
    bridge = TransformerBridge.boot_transformers(
        "lens-squash/tiny", hf_model=hf_model, tokenizer=_tokenizer(), device="cpu", dtype=dtype
    )
    if compatibility:
        bridge.enable_compatibility_mode(no_processing=no_processing, disable_warnings=True)
    return bridge.eval()
