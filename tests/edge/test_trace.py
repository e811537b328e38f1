"""lens_squash.edge.trace: one hooked pass equals run_with_cache, on HookedTransformer and the bridge."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lens_squash.edge.gguf import offline_tokenizer
from lens_squash.edge.models import from_hf_llama, tiny_model
from lens_squash.edge.trace import final_representation, trace

from .. import families

TOKENS = torch.tensor([3, 14, 15, 9, 2, 6, 5, 3])


@pytest.mark.parametrize(
    "knobs",
    [
        dict(norm="LN"),
        dict(norm="RMS", positional="rotary", n_heads=4, n_key_value_heads=2),
        pytest.param(dict(norm=None), marks=pytest.mark.hooked),  # no transformers twin without norms
    ],
)
def test_trace_equals_run_with_cache(knobs):
    model = tiny_model(dtype=torch.float64, seed=3, **knobs)
    result = trace(model, TOKENS)
    logits, cache = model.run_with_cache(TOKENS[None])
    n_layers = model.cfg.n_layers
    expected_patterns = torch.stack([cache[f"blocks.{l}.attn.hook_pattern"][0] for l in range(n_layers)])
    torch.testing.assert_close(result.patterns, expected_patterns, atol=0, rtol=0)
    resid = [cache[f"blocks.{l}.hook_resid_pre"][0] for l in range(n_layers)]
    resid.append(cache[f"blocks.{n_layers - 1}.hook_resid_post"][0])
    torch.testing.assert_close(result.resid_norms, torch.stack(resid).norm(dim=-1), atol=1e-12, rtol=0)
    torch.testing.assert_close(result.last_logits, logits[0, -1], atol=1e-12, rtol=0)
    if knobs["norm"] is not None:
        scales = torch.stack([cache[f"blocks.{l}.ln1.hook_scale"][0, :, 0] for l in range(n_layers)])
        torch.testing.assert_close(result.ln1_scale, scales, atol=0, rtol=0)
        # y_n from the trace equals the unembedding's input: logits = y W_U + b_U
        torch.testing.assert_close(result.y_last @ model.W_U + model.b_U, logits[0, -1], atol=1e-10, rtol=0)
    else:
        assert result.ln1_scale is None and result.final_scale is None
    # what head h writes from key k per unit attention: ‖v_k W_O^h‖, recomputed from the cache
    v = cache["blocks.1.attn.hook_v"][0]
    v = v.repeat_interleave(model.cfg.n_heads // v.shape[1], dim=1)
    direct = torch.einsum("phd,hdm->hpm", v, model.blocks[1].attn.W_O).norm(dim=-1)
    torch.testing.assert_close(result.value_norms[1], direct, atol=1e-12, rtol=0)
    assert result.predicted_token == str(int(logits[0, -1].argmax()))


# tiny_model(norm='RMS', positional='standard', gated_mlp=False) has no transformers twin
@pytest.mark.parametrize("norm", ["LN", pytest.param("RMS", marks=pytest.mark.hooked)])
def test_final_representation_matches_ln_final(norm):
    model = tiny_model(norm=norm, dtype=torch.float64)
    with torch.no_grad():  # give the final norm a non-trivial gain and bias
        model.ln_final.w.normal_()
        if hasattr(model.ln_final, "b"):
            model.ln_final.b.normal_()
    _, cache = model.run_with_cache(torch.arange(5)[None])
    last_block = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"][0]
    expected = model.ln_final(last_block)
    got = final_representation(model, cache["ln_final.hook_normalized"][0])
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)


def _tiny_llama_pair():
    tokenizer = offline_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,  # as SmolLM2, whose name the bridge is booted under
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        hf_model = LlamaForCausalLM(config).eval()
    return hf_model, tokenizer


@pytest.mark.hooked  # builds a HookedTransformer (TransformerLens 3 only)
def test_bridge_and_hooked_traces_agree():
    from transformer_lens.model_bridge import TransformerBridge

    hf_model, tokenizer = _tiny_llama_pair()
    hooked = from_hf_llama(hf_model, tokenizer)
    bridge = TransformerBridge.boot_transformers(
        "HuggingFaceTB/SmolLM2-135M-Instruct", hf_model=hf_model, tokenizer=tokenizer, device="cpu"
    )
    # no_processing: keep the original weights, so logits are not centred and norms not folded
    bridge.enable_compatibility_mode(no_processing=True)
    ours, theirs = trace(hooked, TOKENS), trace(bridge, TOKENS)
    for name in [
        "patterns",
        "ln1_scale",
        "ln2_scale",
        "final_scale",
        "resid_norms",
        "value_norms",
        "y_last",
        "last_logits",
    ]:
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), atol=1e-5, rtol=1e-5, msg=name)
    assert ours.str_tokens == theirs.str_tokens and ours.predicted_token == theirs.predicted_token


def test_model_without_the_needed_hooks_is_refused():
    class NoHooks(torch.nn.Module):
        cfg = tiny_model().cfg
        hook_dict: dict = {}
        tokenizer = None

    with pytest.raises(TypeError, match="enable_compatibility_mode"):  # not a TransformerLens model at all
        trace(NoHooks(), TOKENS)


def test_bad_token_input():
    model = tiny_model(n_ctx=16)
    with pytest.raises(ValueError, match="n_ctx=16"):
        trace(model, torch.arange(20))
    with pytest.raises(ValueError, match="one prompt"):
        trace(model, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="no tokens"):
        trace(model, torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="no tokenizer"):
        trace(model, "hello")


def test_keep_resid_and_first_token_residual():
    model = tiny_model(dtype=torch.float64)
    result = trace(model, TOKENS, keep_resid=True)
    assert result.resid.shape == (model.cfg.n_layers + 1, len(TOKENS), model.cfg.d_model)
    torch.testing.assert_close(result.resid.norm(dim=-1), result.resid_norms, atol=0, rtol=0)
    torch.testing.assert_close(result.first_token_resid, result.resid[:, 0], atol=0, rtol=0)
    assert "<table>" in result._repr_html_()


def _gqa_pair():
    """The same weights as a grouped and an ungrouped (``ungroup_grouped_query_attention``) model."""
    grouped = tiny_model(dtype=torch.float64, seed=8, norm="RMS", positional="rotary", n_heads=4, n_key_value_heads=2)
    cfg = grouped.cfg.to_dict()
    cfg["ungroup_grouped_query_attention"] = True
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    ungrouped = HookedTransformer(HookedTransformerConfig(**cfg))
    ungrouped.load_state_dict(grouped.state_dict())
    return grouped, ungrouped


@pytest.mark.hooked  # the ungrouped twin is a HookedTransformerConfig knob
def test_value_norms_are_invariant_to_gqa_grouping():
    from lens_squash.algebra.variants import path_bound

    grouped, ungrouped = _gqa_pair()
    a, b = trace(grouped, TOKENS, lipschitz=True), trace(ungrouped, TOKENS, lipschitz=True)
    _, cache = ungrouped.run_with_cache(TOKENS[None])
    assert cache["blocks.0.attn.hook_v"].shape[2] == 4  # ungrouped: hook_v already has a head per query head
    torch.testing.assert_close(a.patterns, b.patterns, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(a.value_norms, b.value_norms, rtol=1e-12, atol=1e-14)
    # against the definition: ‖v_k W_O^h‖ with head h reading its own ungrouped value
    direct = torch.einsum("phd,hdm->hpm", cache["blocks.1.attn.hook_v"][0], ungrouped.blocks[1].attn.W_O).norm(dim=-1)
    torch.testing.assert_close(b.value_norms[1], direct, rtol=1e-12, atol=0)
    for variant in ("value", "value_rownorm", "certified"):
        torch.testing.assert_close(
            path_bound(a, variant, model=grouped).bound,
            path_bound(b, variant, model=ungrouped).bound,
            rtol=1e-10,
            atol=0,
        )


def test_split_qkv_inputs_give_per_position_scales():
    """The split family is GPT-2's with split Q/K/V inputs, the same weights (on TL 4 its bridge twin with
    ``set_use_split_qkv_input(True)``): ln1's scale, per head on a HookedTransformer, is one per position."""
    plain, split = families.build("gpt2"), families.build("split_qkv")
    a, b = trace(plain, families.TOKENS, lipschitz=True), trace(split, families.TOKENS, lipschitz=True)
    assert split.cfg.use_split_qkv_input and not plain.cfg.use_split_qkv_input
    assert b.ln1_scale.shape == (plain.cfg.n_layers, len(families.TOKENS))
    torch.testing.assert_close(b.ln1_scale, a.ln1_scale, rtol=1e-12, atol=0)
    torch.testing.assert_close(b.mlp_gain, a.mlp_gain, rtol=1e-12, atol=0)


@pytest.mark.hooked  # builds a HookedTransformer (TransformerLens 3 only)
@pytest.mark.parametrize(
    "overrides", [dict(use_attn_in=True, n_key_value_heads=2, n_heads=4), dict(parallel_attn_mlp=True, attn_only=True)]
)
def test_a_config_transformer_lens_cannot_run_is_one_clear_error(overrides):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from lens_squash.core.support import UnsupportedModelError

    kwargs = dict(
        n_layers=1,
        d_model=16,
        n_heads=2,
        d_head=4,
        d_mlp=32,
        d_vocab=32,
        n_ctx=16,
        act_fn="gelu",
        normalization_type="LN",
        positional_embedding_type="rotary",
        rotary_dim=4,
    )
    kwargs.update(overrides)
    if kwargs.get("attn_only"):
        kwargs.update(d_mlp=None, act_fn=None)
    model = HookedTransformer(HookedTransformerConfig(**kwargs))
    with pytest.raises(Exception):  # noqa: B017 - TransformerLens's own failure, whatever its type
        model(TOKENS[None])
    with pytest.raises(UnsupportedModelError, match="TransformerLens cannot run"):
        trace(model, TOKENS)


def test_a_trace_with_its_progress_bar_on_gives_the_same_numbers(monkeypatch):
    """The bar advances from a hook on every resid_pre; a hook's return value would replace the activation."""
    import lens_squash.edge.trace as trace_module
    from lens_squash.core.progress import bars_enabled

    model = tiny_model(dtype=torch.float64, seed=3)
    quiet = trace(model, TOKENS)
    monkeypatch.setenv("LENS_SQUASH_PROGRESS", "1")
    monkeypatch.setattr(trace_module, "_slow", lambda model, n: True)
    assert bars_enabled()
    loud = trace(model, TOKENS)
    assert torch.equal(loud.patterns, quiet.patterns) and torch.equal(loud.last_logits, quiet.last_logits)
    monkeypatch.setenv("LENS_SQUASH_PROGRESS", "0")  # the switch wins over the estimate
    assert not bars_enabled()


def test_the_attention_check_is_a_typed_field_and_decides_alone():
    """The algebra reads the trace's AttentionCheck, never its provenance: with the provenance emptied
    the bounds are the same, and a check recording NaN defects refuses, although the patterns are fine."""
    import dataclasses

    from lens_squash.algebra.attention import attention_defects, pattern_tolerance
    from lens_squash.algebra.attention_check import AttentionCheck
    from lens_squash.algebra.variants import path_bound

    model = tiny_model(n_layers=2, n_heads=2, d_model=16, d_vocab=32, dtype=torch.float32, seed=2)
    traced = trace(model, torch.arange(1, 9))
    check = traced.attention_check
    assert isinstance(check, AttentionCheck) and check.torch_dtype is torch.float32 and not check.substochastic
    assert check.defects == attention_defects(traced.patterns)  # the stack's own defects, scanned independently
    assert check.tolerance == pattern_tolerance(torch.float32, 8)
    bare = dataclasses.replace(traced, provenance={})
    assert torch.equal(path_bound(bare, "rollout").bound, path_bound(traced, "rollout").bound)
    nan = dict.fromkeys(check.defects, float("nan"))
    broken = dataclasses.replace(traced, attention_check=dataclasses.replace(check, defects=nan))
    with pytest.raises(ValueError, match="NaN"):
        path_bound(broken, "rollout")


@pytest.mark.hooked  # a SoLU config: HookedTransformer only
def test_a_trace_that_cannot_compute_mlp_gains_says_why_in_a_typed_field():
    unsupported = tiny_model(dtype=torch.float64, act_fn="solu", gated_mlp=True)  # no certified MLP gain for SoLU
    traced = trace(unsupported, TOKENS, lipschitz=True)
    assert traced.mlp_gain is None and "SoLU" in traced.lipschitz_unsupported
    assert traced.provenance["lipschitz_unsupported"] == traced.lipschitz_unsupported  # shown, written once
    supported = trace(tiny_model(dtype=torch.float64), TOKENS, lipschitz=True)
    assert supported.mlp_gain is not None and supported.lipschitz_unsupported is None
    assert "lipschitz_unsupported" not in supported.provenance
