"""Tiny random-weight ``transformers`` models, one per causal decoder family a TransformerBridge boots.

Built from configs (no network): 2 layers, d_model 32, 4 heads, eager attention (so HF's
``output_attentions`` are the patterns the model uses). Every norm gain and bias is drawn away from
its default (:func:`perturb_norms`): a reader that takes Gemma's raw ``w`` for the gain, or drops a
bias, is then wrong by O(1), not by nothing. :func:`boot` wraps a model in a bridge the way a user
does (``boot_transformers(..., hf_model=...)``, then compatibility mode without processing).
"""

from __future__ import annotations

import contextlib
import functools

import torch

__all__ = [
    "ADVERSARIAL_GAINS",
    "ARCHITECTURE_NAMES",
    "CAUSAL",
    "FLOAT32_BUILT",
    "NON_CAUSAL",
    "OFFSET_GAINS",
    "TOKENS",
    "VOCAB",
    "boot",
    "build_hf",
    "hf_block_input",
    "hf_final",
    "hf_jacobian",
    "perturb_norms",
    "set_gains",
]

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
    "qwen3_moe": (  # top-k router weights not renormalised (Mixtral's are)
        "Qwen3MoeConfig",
        {**_LLAMA_LIKE, "head_dim": 8, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24,
         "norm_topk_prob": False},
    ),
    "olmoe": ("OlmoeConfig", {**_LLAMA_LIKE, "num_experts": 4, "num_experts_per_tok": 2}),
    "gpt_oss": (  # learned sinks, biased experts with a clamped SwiGLU, alternating sliding windows
        "GptOssConfig",
        {**_LLAMA_LIKE, "head_dim": 8, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 4,
         "layer_types": ["sliding_attention", "full_attention"]},
    ),
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
    # further families TransformerLens 4.3's bridge boots (issue 22): local layers, ALiBi, multipliers, ...
    "gpt_neo": (  # a global then a local (windowed) attention layer
        "GPTNeoConfig",
        {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "attention_types": [[["global", "local"], 1]],
         "window_size": 4, "max_position_embeddings": 64, "intermediate_size": 48},
    ),
    "codegen": (
        "CodeGenConfig",
        {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64, "rotary_dim": 4, "n_inner": 48, "n_ctx": 64},
    ),
    "gpt_bigcode": (
        "GPTBigCodeConfig", {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64, "n_inner": 48,
                             "multi_query": True},
    ),
    "mpt": ("MptConfig", {"d_model": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 64, "expansion_ratio": 2}),
    "cohere": ("CohereConfig", {**_LLAMA_LIKE, "logit_scale": 0.5}),  # parallel block, one LayerNorm, no bias
    "granite": (  # embedding, residual and attention multipliers
        "GraniteConfig",
        {**_LLAMA_LIKE, "embedding_multiplier": 2.0, "residual_multiplier": 0.5, "attention_multiplier": 0.3,
         "logits_scaling": 2.0},
    ),
    "granitemoe": (
        "GraniteMoeConfig",
        {**_LLAMA_LIKE, "num_local_experts": 4, "num_experts_per_tok": 2, "embedding_multiplier": 2.0,
         "residual_multiplier": 0.5, "attention_multiplier": 0.3, "logits_scaling": 2.0},
    ),
    "nemotron": ("NemotronConfig", {**_LLAMA_LIKE, "head_dim": 8, "partial_rotary_factor": 0.5}),  # LayerNorm1p
    "qwen2_moe": (  # a gated shared expert beside the routed ones
        "Qwen2MoeConfig",
        {**_LLAMA_LIKE, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24,
         "shared_expert_intermediate_size": 24},
    ),
    "smollm3": ("SmolLM3Config", {**_LLAMA_LIKE, "no_rope_layers": [1, 0], "pad_token_id": 0}),  # a NoPE layer
    "olmo3": (
        "Olmo3Config", {**_LLAMA_LIKE, "sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"]},
    ),
    "xglm": (  # sinusoidal positions; TransformerLens's bridge overflows in float64, so built in float32
        "XGLMConfig", {"d_model": 32, "num_layers": 2, "attention_heads": 4, "ffn_dim": 48,
                       "max_position_embeddings": 64},
    ),
    "phimoe": ("PhimoeConfig", {**_LLAMA_LIKE, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "exaone4": ("Exaone4Config", {**_LLAMA_LIKE, "head_dim": 8}),
    "hunyuan_v1_dense": ("HunYuanDenseV1Config", {**_LLAMA_LIKE, "head_dim": 8}),
    "seed_oss": ("SeedOssConfig", {**_LLAMA_LIKE, "head_dim": 8}),
    "apertus": ("ApertusConfig", {**_LLAMA_LIKE, "head_dim": 8}),  # xIELU activation
    "arcee": ("ArceeConfig", {**_LLAMA_LIKE, "head_dim": 8}),  # ReLU² plain MLP
    "glm": ("GlmConfig", {**_LLAMA_LIKE, "head_dim": 8, "pad_token_id": 0}),
    "glm4": ("Glm4Config", {**_LLAMA_LIKE, "head_dim": 8, "pad_token_id": 0}),  # post norms on both sublayers
    "ernie4_5": ("Ernie4_5Config", {**_LLAMA_LIKE, "head_dim": 8}),
    "llama4_text": (  # NoPE and rope layers, a dense then a MoE layer with a shared expert
        "Llama4TextConfig",
        {**_LLAMA_LIKE, "head_dim": 8, "num_local_experts": 4, "num_experts_per_tok": 1, "intermediate_size_mlp": 48,
         "no_rope_layers": [1, 0], "interleave_moe_layer_step": 2},
    ),
    "deepseek_v3": (  # multi-head latent attention (no W_V), a dense then a MoE layer
        "DeepseekV3Config",
        {**_LLAMA_LIKE, "num_key_value_heads": 4, "q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 4, "qk_nope_head_dim": 4,
         "v_head_dim": 8, "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24,
         "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1},
    ),
    "cohere2": (
        "Cohere2Config", {**_LLAMA_LIKE, "sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"]},
    ),
    "ministral3": ("Ministral3Config", {**_LLAMA_LIKE, "head_dim": 8}),
    "exaone": (
        "ExaoneConfig", {"hidden_size": 32, "num_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                         "intermediate_size": 48, "max_position_embeddings": 64},
    ),
    "glm4_moe": (  # a dense first layer, then routed experts with a shared one
        "Glm4MoeConfig",
        {**_LLAMA_LIKE, "head_dim": 8, "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24,
         "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1, "pad_token_id": 0},
    ),
    "ernie4_5_moe": (
        "Ernie4_5_MoeConfig",
        {**_LLAMA_LIKE, "head_dim": 8, "moe_num_experts": 4, "moe_k": 2, "moe_intermediate_size": 24,
         "moe_layer_start_index": 1},
    ),
    "jetmoe": (  # mixture of attention heads: no per-head W_V
        "JetMoeConfig",
        {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "kv_channels": 8, "intermediate_size": 48, "num_local_experts": 4, "num_experts_per_tok": 2,
         "max_position_embeddings": 64},
    ),
    "falcon_h1": (  # a Mamba-2 mixer beside attention in every block: a hybrid
        "FalconH1Config",
        {**_LLAMA_LIKE, "head_dim": 8, "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_d_ssm": 64, "mamba_d_state": 8,
         "mamba_n_groups": 1},
    ),
}  # fmt: skip

#: families whose ``transformers`` class name is not the one TransformerLens's bridge registers
ARCHITECTURE_NAMES = {"phimoe": "PhiMoEForCausalLM"}
#: families built in float32 (TransformerLens's bridge fails on them in float64)
FLOAT32_BUILT = frozenset({"xglm"})

#: families that are not causal attention decoders: lens_squash refuses them
NON_CAUSAL: dict[str, tuple[str, dict]] = {
    "bert": ("BertConfig", {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                            "intermediate_size": 48}),
    "mamba": ("MambaConfig", {"hidden_size": 32, "num_hidden_layers": 2, "state_size": 4}),
    # hybrids: some layers are not attention (Mamba-2, short convolutions, linear attention)
    "bamba": ("BambaConfig", {**_LLAMA_LIKE, "attn_layer_indices": [1], "mamba_n_heads": 4, "mamba_d_head": 16,
                              "mamba_d_state": 8, "mamba_n_groups": 1}),
    "lfm2": ("Lfm2Config", {**_LLAMA_LIKE, "layer_types": ["conv", "full_attention"]}),
    "qwen3_next": ("Qwen3NextConfig", {**_LLAMA_LIKE, "head_dim": 8, "layer_types": ["linear_attention", "full_attention"],
                                       "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24,
                                       "shared_expert_intermediate_size": 24, "linear_num_value_heads": 4,
                                       "linear_num_key_heads": 2, "linear_key_head_dim": 8,
                                       "linear_value_head_dim": 8}),
    "granitemoehybrid": ("GraniteMoeHybridConfig", {**_LLAMA_LIKE, "layer_types": ["mamba", "attention"],
                                                    "num_local_experts": 4, "num_experts_per_tok": 2,
                                                    "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_d_state": 8}),
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
    """A random-weight ``*ForCausalLM`` of ``family`` in eval mode, eager attention and MoE experts (the
    per-expert loop: transformers' default grouped matmul has no float64 kernel), norms perturbed."""
    import transformers

    cls_name, kwargs = (table or {**CAUSAL, **NON_CAUSAL})[family]
    config = getattr(transformers, cls_name)(vocab_size=VOCAB, **kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", experts_implementation="eager"
    )
    model = model.to(torch.float32 if family in FLOAT32_BUILT else dtype).eval()
    # how the bridge picks its adapter
    model.config.architectures = [ARCHITECTURE_NAMES.get(family, type(model).__name__)]
    with torch.no_grad():  # HF inits with std 0.02: too small to exercise anything at d_model 32
        for param in model.parameters():
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


#: families whose norms store ``w`` and scale by ``1 + w`` (Nemotron's LayerNorm1p)
OFFSET_GAINS = frozenset({"gemma", "gemma2", "gemma3_text", "nemotron"})


def _norm_weights(model) -> list[torch.Tensor]:
    return [
        p
        for name, module in model.named_modules()
        if "norm" in type(module).__name__.lower() or "ln" in name.split(".")[-1]
        for pname, p in module.named_parameters(recurse=False)
        if pname == "weight"
    ]


def set_gains(model, family: str, gains) -> None:
    """Every norm's *effective* gain set to ``gains(d)`` (a ``[d]`` tensor), whatever its convention."""
    with torch.no_grad():
        for weight in _norm_weights(model):
            target = gains(weight.shape[-1]).to(weight.dtype)
            weight.copy_(target - 1.0 if family in OFFSET_GAINS else target)


#: adversarial norm gains on the transformers model: the small-gain and split-gain constructions of
#: ``tests/reference.py`` (a gain counted on the wrong side of a sublayer, or 1 + w read as w, is off by 64×)
ADVERSARIAL_GAINS = {
    "small_gains": lambda d: torch.full((d,), 0.05),
    "split_gains": lambda d: torch.where(torch.arange(d) >= d // 2, 8.0, 0.125),
}


# ------------------------------------------------------------------------------------------------
# References by plain autograd on the transformers model (no TransformerLens, no lens_squash code)


def _body(hf) -> torch.nn.Module:
    """The decoder without its head (Llama-4's text model names no ``base_model_prefix`` module)."""
    body = hf.base_model
    return hf.model if body is hf else body


def _decoder_layers(hf) -> torch.nn.ModuleList:
    n_layers = hf.config.num_hidden_layers
    for module in _body(hf).modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers:
            return module
    raise AssertionError(f"no ModuleList of {n_layers} layers in {type(hf).__name__}")


class _Frozen:
    """Records every softmax (attention patterns, MoE routers; ``F.softmax`` and ``torch.softmax``), ``rsqrt`` (RMSNorm scales) and
    LayerNorm scale of one forward pass, then replays them as constants: the frozen model."""

    def __init__(self):
        self.values: list[torch.Tensor] = []
        self.replay = False
        self.calls = 0

    def _constant(self, value: torch.Tensor) -> torch.Tensor:
        if not self.replay:
            self.values.append(value.detach())
            return value
        self.calls += 1
        return self.values[self.calls - 1]

    @contextlib.contextmanager
    def patched(self):
        F = torch.nn.functional
        softmax, rsqrt, layer_norm, torch_softmax = F.softmax, torch.rsqrt, F.layer_norm, torch.softmax

        def frozen_layer_norm(x, shape, weight=None, bias=None, eps=1e-5):
            centred = x - x.mean(-1, keepdim=True)
            scale = self._constant((centred.pow(2).mean(-1, keepdim=True) + eps).sqrt())
            y = centred / scale
            y = y if weight is None else y * weight
            return y if bias is None else y + bias

        F.softmax = lambda *a, **k: self._constant(softmax(*a, **k))
        torch.softmax = lambda *a, **k: self._constant(torch_softmax(*a, **k))  # GraniteMoE's router
        torch.rsqrt = lambda *a, **k: self._constant(rsqrt(*a, **k))
        F.layer_norm = frozen_layer_norm
        self.calls = 0
        try:
            yield
        finally:
            F.softmax, torch.rsqrt, F.layer_norm, torch.softmax = softmax, rsqrt, layer_norm, torch_softmax


def hf_block_input(hf, tokens: torch.Tensor) -> torch.Tensor:
    """The first decoder layer's input ``[pos, d_model]`` (embeddings, scaled or positioned as the model does)."""
    seen = {}
    layer = _decoder_layers(hf)[0]

    def keep(module, args, kwargs) -> None:
        seen.setdefault("x", (args[0] if args else kwargs["hidden_states"]).detach())

    handle = layer.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with torch.no_grad():
            hf(input_ids=tokens[None])
    finally:
        handle.remove()
    return seen["x"][0]


def hf_final(hf, tokens: torch.Tensor, **kwargs):
    """The base model's output on ``tokens``: ``last_hidden_state`` is the final norm's output."""
    with torch.no_grad():
        return _body(hf)(input_ids=tokens[None], **kwargs)


def hf_jacobian(hf, tokens: torch.Tensor, *, frozen: bool) -> torch.Tensor:
    """``∂y_n/∂x_i`` ``[d_out, pos, d_in]``: y the final norm's output at the last position, x the first
    layer's input, by ``torch.autograd.functional.jacobian`` (plain autograd: old-style autograd
    Functions such as BLOOM's GeLU work). ``frozen``: patterns, router weights and norm scales replayed."""
    x0 = hf_block_input(hf, tokens)
    layer = _decoder_layers(hf)[0]
    freezer = _Frozen()
    if frozen:
        with freezer.patched(), torch.no_grad():
            _body(hf)(input_ids=tokens[None])
        freezer.replay = True

    def f(x):
        def swap(module, args, kwargs):
            if args:
                return (x[None], *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": x[None]}

        handle = layer.register_forward_pre_hook(swap, with_kwargs=True)
        try:
            with freezer.patched() if frozen else contextlib.nullcontext():
                out = _body(hf)(input_ids=tokens[None]).last_hidden_state[0, -1]
            if frozen:
                assert freezer.calls == len(freezer.values), "the frozen replay saw a different forward pass"
            return out
        finally:
            handle.remove()

    params = [(p, p.requires_grad) for p in hf.parameters()]
    for p, _ in params:
        p.requires_grad_(False)
    try:
        return torch.autograd.functional.jacobian(f, x0)
    finally:
        for p, flag in params:
            p.requires_grad_(flag)
