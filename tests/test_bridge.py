"""TransformerBridge as a backend: loading, the model gate, and Jacobians against independent references.

Tests marked ``bridge`` need no ``HookedTransformer``; ``make test-tl4`` runs them on TransformerLens 4.
Their references are TransformerLens-free or share no code with :mod:`lens_squash.edge.jacobian`:
``torch.func.jacrev`` through the ``transformers`` model the bridge wraps (``inputs_embeds`` in,
hidden states out), and ``jacrev`` through the bridge's own full forward pass with constant patterns and
norm scales. The twin tests (unmarked) compare the bridge with the HookedTransformer built from the same
weights, which only TransformerLens 3 has.

Tolerances: a ``transformers`` Llama computes its RMSNorm and rotary tables in float32 even in a
float64 model, so the bridge and the hooked twin agree to float32 resolution (measured 3e-7 of the
largest entry on tiny-random), while the bridge and the ``transformers`` model it runs agree to float64.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from lens_squash.edge import backends, gguf, hub, models, tiny
from lens_squash.edge.jacobian import jacobian
from lens_squash.edge.models import ModelLoadError, check_model, load_model

from .reference import input_grad_only

TOL64 = {"atol": 1e-10, "rtol": 1e-9}


def _tokens(n: int, seed: int = 0):
    return torch.randint(100, 5000, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def bridge64():
    return load_model(models.TINY_MODEL, backend="bridge", dtype=torch.float64, n_ctx=64)


def _hf_reference(bridge, tokens, *, target="final", target_pos=-1):
    """``[d_out, pos, d_in]`` by jacrev through the wrapped ``transformers`` model alone (no TL code).

    The input is ``inputs_embeds`` (= ``blocks.0.hook_resid_pre`` for a rotary model); ``y`` is the
    normed last hidden state (``target="final"``) or layer ``target``'s output, ``hidden_states[l+1]``.
    """
    hf = bridge.original_model
    embeds = hf.get_input_embeddings()(tokens[None]).detach()

    def f(v):
        out = hf(inputs_embeds=v, output_hidden_states=True, use_cache=False)
        y = out.hidden_states[-1] if target == "final" else out.hidden_states[target + 1]
        return y[0, target_pos]

    with input_grad_only(hf):
        return torch.func.jacrev(f)(embeds)[:, 0]


def _constant(value):
    return lambda activation, hook: value


def _bridge_reference(bridge, tokens, *, constant_names=()):
    """jacrev through the bridge's full forward (no early stop), ``y`` read at ``ln_final.hook_out``.

    Activations named in ``constant_names`` are replaced by their values from a no-grad run: the
    frozen model built the plain way, with constants instead of ``detach`` hooks. That run passes
    every scale through an identity edit, which puts the bridge's norms on the path an edited scale
    takes (``x / scale`` in the model's dtype, not HF's float32 kernel), so the constants are taken at
    the very point the frozen forward pass runs through.
    """
    edit = [(n, lambda value, hook: value.clone()) for n in constant_names if n.endswith(".hook_scale")]
    with bridge.hooks(fwd_hooks=edit):
        _, cache = bridge.run_with_cache(tokens[None], names_filter=lambda n: n in constant_names)
    constants = [(n, _constant(cache[n].clone())) for n in constant_names]
    embeds = bridge.original_model.get_input_embeddings()(tokens[None]).detach()

    def f(v):
        seen = {}

        def keep(value, hook):
            seen["y"] = value

        hooks = [("blocks.0.hook_resid_pre", lambda value, hook: v), *constants, ("ln_final.hook_out", keep)]
        with bridge.hooks(fwd_hooks=hooks):
            bridge(tokens[None])
        return seen["y"][0, -1]

    with input_grad_only(bridge):
        return torch.func.jacrev(f)(embeds)[:, 0]


# ------------------------------------------------------------------------------------------------
# Jacobians on the bridge, TransformerLens-free references


@pytest.mark.bridge
def test_bridge_exact_jacobian_matches_jacrev_through_transformers(bridge64):
    tokens = _tokens(7)
    result = jacobian(bridge64, tokens, keep_full=True, chunk_size=5)  # ragged last chunk
    ref = _hf_reference(bridge64, tokens)
    torch.testing.assert_close(result.full, ref, **TOL64)
    blocks = ref.permute(1, 0, 2)
    torch.testing.assert_close(result.spectral, torch.linalg.matrix_norm(blocks, ord=2), **TOL64)
    # y is the final norm's output, not logits: d_out is d_model, and the norm matters
    assert result.full.shape == (64, 7, 64)


@pytest.mark.bridge
@pytest.mark.parametrize(("target", "target_pos"), [(0, -1), (0, 3)])  # HF's last hidden state is normed
def test_bridge_layer_targets_match_transformers_hidden_states(bridge64, target, target_pos):
    tokens = _tokens(6, seed=1)
    result = jacobian(bridge64, tokens, layer=target, target_pos=target_pos, keep_full=True)
    ref = _hf_reference(bridge64, tokens, target=target, target_pos=target_pos)
    n = result.n_tokens  # causal: only positions up to target_pos are kept
    torch.testing.assert_close(result.full, ref[:, :n], **TOL64)
    assert (ref[:, n:] == 0).all()  # later positions cannot reach y


@contextlib.contextmanager
def _forbidden(module):
    """Fail if ``module`` runs: the forward pass must stop before it."""

    def refuse(mod, args):
        raise AssertionError(f"{type(mod).__name__} ran although y lies before it")

    handle = module.register_forward_pre_hook(refuse)
    try:
        yield
    finally:
        handle.remove()


@pytest.mark.bridge
def test_bridge_forward_stops_at_the_target_layer(bridge64):
    tokens = _tokens(5, seed=8)
    with _forbidden(bridge64.unembed):
        final = jacobian(bridge64, tokens, mode="sketch", n_probes=4)
        exact_final = jacobian(bridge64, tokens, keep_full=True)
    with _forbidden(bridge64.blocks[1]), _forbidden(bridge64.ln_final):
        first = jacobian(bridge64, tokens, layer=0, mode="sketch", n_probes=4)
        exact_first = jacobian(bridge64, tokens, layer=0, keep_full=True)
    # stopping early changes no value: transformers' own full forward gives the same Jacobians
    for exact, ref in (
        (exact_final, _hf_reference(bridge64, tokens)),
        (exact_first, _hf_reference(bridge64, tokens, target=0)),
    ):
        torch.testing.assert_close(exact.full, ref, **TOL64)
        torch.testing.assert_close(exact.frobenius, torch.linalg.matrix_norm(ref.permute(1, 0, 2)), **TOL64)
    # 4 orthonormal probes of d_out = 64 rows: (k/d_out)·estimate² = ‖Uᵀ J_i‖_F² ≤ ‖J_i‖_F², and > 0
    for sketch, exact in ((final, exact_final), (first, exact_first)):
        projected = sketch.frobenius.double() * (4 / 64) ** 0.5
        assert (projected <= exact.frobenius * (1 + 1e-9)).all() and (projected > 0).all(), (projected, exact.frobenius)


@pytest.mark.bridge
def test_unknown_hook_name_is_an_error_not_a_silent_skip(bridge64):
    from lens_squash.edge.backward import run_until as _run_until

    with pytest.raises(ValueError, match="no hook 'blocks.7.hook_resid_post'"):
        _run_until(bridge64, _tokens(3)[None], "blocks.7.hook_resid_post")


@pytest.mark.bridge
def test_bridge_frozen_jacobian_matches_constant_patterns_and_scales(bridge64):
    tokens = _tokens(6, seed=2)
    names = [n for n in bridge64.hook_dict if n.endswith(".hook_scale") or n.endswith("attn.hook_pattern")]
    assert len(names) == 2 * 2 + 1 + 2  # ln1, ln2 per layer, ln_final, one pattern per layer
    frozen = jacobian(bridge64, tokens, mode="frozen", keep_full=True)
    torch.testing.assert_close(frozen.full, _bridge_reference(bridge64, tokens, constant_names=names), **TOL64)
    exact = jacobian(bridge64, tokens, keep_full=True)
    torch.testing.assert_close(exact.full, _bridge_reference(bridge64, tokens), **TOL64)
    # freezing is not a no-op on the bridge: its patterns and scales feed the computation
    assert (exact.full - frozen.full).abs().max() > 1e-3 * exact.full.abs().max()


@pytest.mark.bridge
def test_bridge_sketch_with_a_full_basis_is_exact(bridge64):
    tokens = _tokens(5, seed=3)
    exact = jacobian(bridge64, tokens)
    sketch = jacobian(bridge64, tokens, mode="sketch", n_probes=64, seed=4, chunk_size=24)
    # not 1e-10: the backward through HF's float32 RMSNorm rounds each VJP at float32 resolution,
    # and the two bases round differently (measured 4.5e-9 relative)
    torch.testing.assert_close(sketch.frobenius, exact.frobenius, rtol=1e-7, atol=0)
    partial = jacobian(bridge64, tokens, mode="sketch", n_probes=8, seed=4)
    assert not torch.allclose(partial.frobenius, exact.frobenius)  # 8 of 64 probes: an estimate


@pytest.mark.bridge
@pytest.mark.parametrize("mode", ["exact", "frozen", "sketch"])
def test_bridge_checkpointed_jacobian_equals_plain_and_the_references(bridge64, mode):
    """Blocks recomputed one at a time through the wrapped transformers layers (their rotary tables,
    mask and a dropped key–value cache): the same numbers as the plain backward and the references."""
    tokens = _tokens(9, seed=7)
    kwargs = {"mode": mode, "n_probes": 8, "keep_full": True}
    saved = jacobian(bridge64, tokens, checkpoint=True, chunk_size=3, **kwargs)
    plain = jacobian(bridge64, tokens, checkpoint=False, **kwargs)
    assert saved.provenance["checkpoint"] is True
    torch.testing.assert_close(saved.full, plain.full, **TOL64)
    if mode == "exact":
        torch.testing.assert_close(saved.full, _hf_reference(bridge64, tokens), **TOL64)
    elif mode == "frozen":
        names = [n for n in bridge64.hook_dict if n.endswith(".hook_scale") or n.endswith("attn.hook_pattern")]
        torch.testing.assert_close(saved.full, _bridge_reference(bridge64, tokens, constant_names=names), **TOL64)


@pytest.mark.bridge
def test_certified_bound_covers_the_frozen_jacobian_on_the_bridge(bridge64):
    """The theorem of DESIGN §3 on the bridge: certified ≥ ‖frozen J_i‖₂ at every position (GQA model)."""
    from lens_squash.experiments.analysis import analyze

    tokens = _tokens(8, seed=6)
    bound = analyze(bridge64, tokens, variants=["certified"], jacobian_mode=None).bounds["certified"].bound
    frozen = jacobian(bridge64, tokens, mode="frozen").spectral
    assert bound.shape == frozen.shape and (frozen > 0).all()
    assert (bound.double() >= frozen * (1 - 1e-9)).all(), (bound / frozen).min()


# ------------------------------------------------------------------------------------------------
# The sensitivity flow and streamed long prompts on the bridge (either TransformerLens)

_FLOW_FIELDS = ("sensitivity", "mlp", "value", "pattern", "value_heads", "edges")


def _relative_gap(ours, reference, names=_FLOW_FIELDS) -> float:
    gaps = [(getattr(ours, k) - getattr(reference, k)).abs().max() / getattr(reference, k).abs().max() for k in names]
    return float(max(gaps))


@pytest.mark.bridge
@pytest.mark.parametrize("mode", ["exact", "frozen"])
def test_bridge_flow_sensitivity_equals_independent_jacobians(bridge64, mode):
    """‖∂y/∂x^(l)_k‖_F from the flow's offsets equals layer-wise Jacobians (another code path), and at
    layer 0 in exact mode jacrev through the wrapped transformers model alone."""
    from lens_squash.edge.flow import flow

    tokens = _tokens(9, seed=11)
    result = flow(bridge64, tokens, mode=mode, variants=())
    # float32 resolution, not 1e-10: the flow runs ln1 once per projection, the Jacobian once, and each
    # backward through a float32 norm kernel rounds there (measured 5e-9 exact, 1.7e-7 frozen)
    for layer in range(bridge64.cfg.n_layers):
        truth = jacobian(bridge64, tokens, mode=mode, wrt=layer).frobenius
        torch.testing.assert_close(result.sensitivity[layer], truth, rtol=1e-6, atol=0)
    if mode == "exact":
        hf = torch.linalg.matrix_norm(_hf_reference(bridge64, tokens).permute(1, 0, 2))
        torch.testing.assert_close(result.sensitivity[0], hf, rtol=1e-6, atol=0)
    # the parts are gradients at separate points of the graph: their sum is g^(l) only if every path is covered
    assert result.decomposition_error.max() <= 1e-9


@pytest.mark.bridge
def test_bridge_flow_parts_sum_to_each_layer_gradient(bridge64):
    from lens_squash.edge.flow_pass import flow_gradients

    rows = torch.eye(bridge64.cfg.d_model, dtype=torch.float64)[:5]
    grads = flow_gradients(bridge64, _tokens(7, seed=12), rows)
    total = grads.total[:-1]
    torch.testing.assert_close(grads.parts_sum(), total, atol=1e-12 * float(total.abs().max()), rtol=0)
    for part in (grads.value, grads.pattern, grads.mlp):  # each part carries gradient: none is a silent zero
        assert part.abs().max() > 1e-6 * total.abs().max()


@pytest.mark.bridge
@pytest.mark.parametrize("mode", ["exact", "frozen", "sketch"])
def test_bridge_checkpointed_flow_equals_the_plain_flow(bridge64, mode):
    from lens_squash.edge.flow import flow

    tokens = _tokens(10, seed=13)
    kwargs = {"mode": mode, "n_probes": 16, "variants": (), "chunk_size": 7}
    plain, saved = flow(bridge64, tokens, checkpoint=False, **kwargs), flow(bridge64, tokens, checkpoint=True, **kwargs)
    assert _relative_gap(saved, plain) <= 1e-12


def _streamed_and_whole(model, tokens):
    from lens_squash.experiments.analysis import analyze

    streamed = analyze(model, tokens, keep_patterns=False, jacobian_mode=None)
    whole = analyze(model, tokens, keep_patterns=True, jacobian_mode=None)
    assert streamed.trace.patterns is None and whole.trace.patterns is not None  # the sweep really ran
    assert streamed.skipped == whole.skipped and set(streamed.bounds) == set(whole.bounds)
    assert {"certified", "paper", "rollout"} <= set(whole.bounds)
    return streamed, whole


def _assert_bounds_close(ours, reference, rtol):
    for name, bound in reference.bounds.items():
        torch.testing.assert_close(ours.bounds[name].bound, bound.bound, rtol=rtol, atol=0, msg=name)


@pytest.mark.bridge
def test_bridge_streamed_bounds_equal_the_whole_stack(bridge64):
    """The top-down sweep reruns each bridge block with the rotary tables and mask the model passed."""
    streamed, whole = _streamed_and_whole(bridge64, _tokens(40, seed=14))
    _assert_bounds_close(streamed, whole, rtol=1e-12)


@pytest.mark.bridge
def test_bridge_stream_refuses_patterns_a_hook_changes_on_the_rerun(bridge64):
    from lens_squash.edge.stream import stream_bounds
    from lens_squash.edge.trace import trace

    traced = trace(bridge64, _tokens(12, seed=15), keep_patterns=False)
    with bridge64.hooks(fwd_hooks=[("blocks.1.attn.hook_pattern", lambda value, hook: value.flip(-1))]):
        with pytest.raises(RuntimeError, match="different patterns"):
            stream_bounds(bridge64, traced, ["paper"])


@pytest.mark.slow
@pytest.mark.bridge
def test_bridge_streamed_2048_token_analysis_equals_the_whole_stack():
    bridge = load_model(models.TINY_MODEL, backend="bridge", n_ctx=2048)
    streamed, whole = _streamed_and_whole(bridge, _tokens(2048, seed=16))
    _assert_bounds_close(streamed, whole, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# The model gate and load_model's checks


@pytest.mark.bridge
def test_non_transformer_lens_objects_are_refused_with_a_type_error():
    for thing in (torch.nn.Linear(2, 2), "gpt2", None):
        with pytest.raises(TypeError, match="TransformerLens model"):
            check_model(thing)
    with pytest.raises(TypeError, match="Linear"):
        jacobian(torch.nn.Linear(2, 2), torch.arange(3))


@pytest.mark.bridge
def test_bridge_before_compatibility_mode_is_refused():
    tokenizer = gguf.offline_tokenizer()
    hf_model = tiny._tiny_random_llama(dtype=torch.float32, n_ctx=32, tokenizer=tokenizer)
    bridge = backends.bridge_class().boot_transformers(
        models.TINY_MODEL, hf_model=hf_model, tokenizer=tokenizer, device="cpu"
    )
    with pytest.raises(ValueError, match=r"enable_compatibility_mode\(no_processing=True\)"):
        check_model(bridge)
    with pytest.raises(ValueError, match="compatibility mode"):
        jacobian(bridge, torch.arange(4))
    bridge.enable_compatibility_mode(no_processing=True, disable_warnings=True)
    check_model(bridge)  # accepted once in compatibility mode


@pytest.mark.bridge
@pytest.mark.parametrize("n_ctx", [-5, 0, 2.5, True, "64", None])
def test_bad_n_ctx_is_refused_first(n_ctx):
    with pytest.raises(ValueError, match=r"n_ctx must be a positive integer.*got"):
        load_model(models.TINY_MODEL, backend="bridge", n_ctx=n_ctx)


@pytest.mark.bridge
@pytest.mark.parametrize("name", [models.TINY_MODEL, models.DEFAULT_MODEL])
def test_n_ctx_beyond_the_trained_positions_is_refused_before_loading(name, monkeypatch):
    for loader in ("tiny_random_bridge", "load_offline_bridge"):
        monkeypatch.setattr(models, loader, lambda *a, **k: pytest.fail("loaded despite a bad n_ctx"))
    with pytest.raises(ValueError, match=r"n_ctx=10000000000 is outside 1\.\.8192"):
        load_model(name, backend="bridge", n_ctx=10**10)


@pytest.mark.bridge
@pytest.mark.parametrize("device", ["tpu", "cpu:x", 3.5])
def test_bad_device_is_refused_first(device):
    with pytest.raises(ValueError, match="device"):
        load_model(models.TINY_MODEL, backend="bridge", device=device)


@pytest.mark.bridge
@pytest.mark.parametrize("backend", ["jax", "Bridge", "", 1])
def test_unknown_backend_names_the_two(backend):
    with pytest.raises(ValueError, match="'hooked', 'bridge'"):
        load_model(models.TINY_MODEL, backend=backend)


@pytest.mark.bridge
def test_bridge_raw_prompts_get_no_bos_as_the_tokenizer_gives_none(bridge64):
    tokenizer = bridge64.tokenizer
    plain = gguf.offline_tokenizer()  # TransformerLens wraps the bridge's to add BOS; this one adds none
    for text in ["hello", "1 1 1 0"]:
        assert models.format_prompt(bridge64, text, chat=False).tolist() == plain(text)["input_ids"]
    chat = models.format_prompt(bridge64, "hello")
    assert chat[0] == tokenizer.bos_token_id and (chat == tokenizer.bos_token_id).sum() == 3


@pytest.mark.bridge
def test_bridge_load_respects_n_ctx_and_returns_compatibility_mode():
    bridge = load_model(models.TINY_MODEL, backend="bridge", n_ctx=16)
    assert models.is_bridge(bridge) and bridge.compatibility_mode and bridge.cfg.n_ctx == 16
    with pytest.raises(ValueError, match="n_ctx=16"):
        jacobian(bridge, "one two three four five six seven eight nine ten " * 3, chat=False)


@pytest.mark.bridge
def test_without_hooked_transformer_the_bridge_is_the_default(monkeypatch):
    monkeypatch.setattr(models, "has_hooked_transformer", lambda: False)
    assert models.default_backend() == "bridge"
    assert models.is_bridge(load_model(models.TINY_MODEL, n_ctx=16))
    with pytest.raises(ModelLoadError, match="backend='bridge'") as refused:
        load_model(models.TINY_MODEL, backend="hooked")
    assert "removed it" in str(refused.value)


@pytest.mark.bridge
def test_offline_hub_model_is_refused_at_once_without_trying_to_load(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty Hugging Face cache
    bridge_cls = backends.bridge_class()

    def no_download(*args, **kwargs):
        raise AssertionError("load_model tried to load although the Hub is unreachable")

    monkeypatch.setattr(bridge_cls, "boot_transformers", no_download)
    with pytest.raises(ModelLoadError) as refused:
        load_model("HuggingFaceTB/SmolLM2-360M", backend="bridge")
    message = str(refused.value)
    assert "\n" not in message and "unreachable" in message
    assert "smollm2-135m-instruct" in message and "tiny-random" in message


@pytest.mark.bridge
def test_bridge_hub_names_resolve_aliases_and_refuse_unknown_names_briefly():
    from transformer_lens.supported_models import MODEL_ALIASES

    official, aliases = next((o, a) for o, a in MODEL_ALIASES.items() if a)
    assert hub._hub_name(aliases[0], "bridge") == official
    assert hub._hub_name(official, "bridge") == official
    assert hub._hub_name("some-owner/some-model", "bridge") == "some-owner/some-model"  # any repo id
    with pytest.raises(ModelLoadError, match="unknown model 'gpt2-smal'. Did you mean 'gpt2-small'") as refused:
        load_model("gpt2-smal", backend="bridge")
    assert "\n" not in str(refused.value) and len(str(refused.value)) < 400


@pytest.mark.bridge
def test_hub_probe_gives_up_on_an_unreachable_endpoint(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://127.0.0.1:9")  # discard port: nothing listens
    assert hub._hub_reachable(timeout=1.0) is False


# ------------------------------------------------------------------------------------------------
# The HookedTransformer twin (TransformerLens 3 only)


@pytest.fixture(scope="module")
def hooked64():
    return load_model(models.TINY_MODEL, backend="hooked", dtype=torch.float64, n_ctx=64)


@pytest.mark.hooked
def test_tiny_random_bridge_carries_the_hooked_weights(hooked64, bridge64):
    state = hooked64.state_dict()
    for name, value in tiny.tiny_random_state(hooked64.cfg.d_vocab, torch.float64).items():
        assert torch.equal(state[name], value), name
    for name, value in state.items():  # every other parameter: zero biases and unit gains
        if name.endswith((".b_Q", ".b_O", "._b_K", "._b_V", ".b_in", ".b_out", "b_U")):
            assert value.abs().max() == 0, name
        elif name.endswith(".w"):
            assert torch.equal(value, torch.ones_like(value)), name
    tokens = _tokens(9)[None]
    with torch.no_grad():
        torch.testing.assert_close(bridge64(tokens), hooked64(tokens), atol=1e-5, rtol=0)


@pytest.mark.hooked
@pytest.mark.parametrize("mode", ["exact", "frozen", "sketch"])
@pytest.mark.parametrize(("layer", "wrt"), [("final", 0), (1, 1)])
def test_bridge_jacobians_equal_the_hooked_twin(hooked64, bridge64, mode, layer, wrt):
    tokens = _tokens(8, seed=5)
    kwargs = {"mode": mode, "layer": layer, "wrt": wrt, "keep_full": True, "n_probes": 8, "seed": 1}
    ours, twin = jacobian(bridge64, tokens, **kwargs), jacobian(hooked64, tokens, **kwargs)
    scale = twin.full.abs().max()
    # float32 resolution: transformers' RMSNorm and rotary tables are float32 (module docstring)
    torch.testing.assert_close(ours.full / scale, twin.full / scale, atol=2e-6, rtol=0)
    torch.testing.assert_close(ours.frobenius, twin.frobenius, rtol=2e-6, atol=0)
    assert ours.tokens.tolist() == twin.tokens.tolist()


@pytest.mark.hooked
def test_analyze_on_the_bridge_equals_the_hooked_twin(hooked64, bridge64):
    from lens_squash.experiments.analysis import analyze

    tokens = _tokens(8, seed=7)
    ours, twin = analyze(bridge64, tokens, jacobian_mode="exact"), analyze(hooked64, tokens, jacobian_mode="exact")
    assert ours.skipped == twin.skipped and set(ours.bounds) == set(twin.bounds) and ours.bounds
    for name, bound in twin.bounds.items():
        torch.testing.assert_close(ours.bounds[name].bound, bound.bound, rtol=2e-6, atol=0, msg=name)
    torch.testing.assert_close(ours.jacobian.spectral, twin.jacobian.spectral, rtol=2e-6, atol=0)


@pytest.mark.hooked
def test_hooked_is_the_default_with_transformer_lens_3():
    assert models.has_hooked_transformer() and models.default_backend() == "hooked"
    assert not models.is_bridge(load_model(models.TINY_MODEL, n_ctx=16))


@pytest.mark.hooked
@pytest.mark.parametrize("chat", [True, False])
def test_bridge_tokenizes_prompts_as_the_hooked_twin(hooked64, bridge64, chat):
    for text in ["hello", "1 1 1 0", "The cat sat on the mat."]:
        ours = models.format_prompt(bridge64, text, chat=chat)
        assert ours.tolist() == models.format_prompt(hooked64, text, chat=chat).tolist()


@pytest.mark.hooked  # smollm2 is the hooked twin on TL 3
@pytest.mark.slow
def test_smollm2_bridge_jacobian_norms_equal_the_hooked_twin(smollm2):
    bridge = load_model(backend="bridge", n_ctx=512)
    tokens = models.format_prompt(smollm2, "The cat sat on the mat because it was", chat=False)
    ours = jacobian(bridge, tokens, mode="sketch", n_probes=8, seed=2)
    twin = jacobian(smollm2, tokens, mode="sketch", n_probes=8, seed=2)
    relative = (ours.frobenius - twin.frobenius).abs() / twin.frobenius
    assert relative.max() <= 1e-5, relative.max()
    assert twin.frobenius.min() > 0


@pytest.mark.slow
@pytest.mark.bridge
def test_smollm2_bridge_sketch_matches_vjps_through_transformers():
    """On either TransformerLens: the bridge's probe rows ``u_rᵀ J`` against autograd through HF alone."""
    from lens_squash.edge.backward import probes as _probes

    bridge = load_model(backend="bridge", n_ctx=512)
    tokens = models.format_prompt(bridge, "Count the ones: 1 1 1 1 0", chat=False)
    ours = jacobian(bridge, tokens, mode="sketch", n_probes=4, seed=3, keep_full=True)
    hf = bridge.original_model
    embeds = hf.get_input_embeddings()(tokens[None]).detach().requires_grad_(True)
    with input_grad_only(hf):
        y = hf(inputs_embeds=embeds, output_hidden_states=True, use_cache=False).hidden_states[-1][0, -1]
        probes = _probes("sketch", y.shape[0], 4, 3, y.dtype, y.device)
        rows = torch.stack([torch.autograd.grad(y @ u, embeds, retain_graph=True)[0][0] for u in probes])
    scale = rows.abs().amax(dim=(0, 2), keepdim=True)  # per input position
    torch.testing.assert_close(ours.full / scale, rows / scale, atol=1e-5, rtol=0)
    assert ours.full.shape == (4, len(tokens), 576)


@pytest.fixture(scope="module")
def smollm2_bridge():
    return load_model(backend="bridge", n_ctx=512)


@pytest.mark.slow
def test_smollm2_bridge_logits_equal_the_gguf_transformers_model(smollm2_bridge, smollm2_hf):
    hf_model, _ = smollm2_hf  # read from the GGUF directly, not from the bridge's cache entry
    tokens = models.format_prompt(smollm2_bridge, "The capital of France is")
    with torch.no_grad():
        ours, reference = smollm2_bridge(tokens[None])[0], hf_model(tokens[None]).logits[0]
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)  # the same weights through the same code
    assert torch.equal(ours.argmax(-1), reference.argmax(-1))


@pytest.mark.slow
def test_damaged_bridge_cache_is_rebuilt_with_identical_logits(smollm2_bridge, tmp_path, monkeypatch):
    import shutil

    key, _ = gguf.cache_key(gguf.gguf_path(models.OFFLINE_MODELS[models.DEFAULT_MODEL]))
    entry = models.cache_dir() / models.DEFAULT_MODEL / f"bridge-{key}"
    copy = tmp_path / models.DEFAULT_MODEL / entry.name
    shutil.copytree(entry, copy)
    weights = copy / "hf_model" / "model.safetensors"
    with open(weights, "r+b") as handle:  # a crash mid-write, or a full disk
        handle.truncate(weights.stat().st_size // 2)
    monkeypatch.setenv("LENS_SQUASH_CACHE", str(tmp_path))
    reloaded = load_model(backend="bridge", n_ctx=512)
    assert weights.stat().st_size == (entry / "hf_model" / "model.safetensors").stat().st_size
    tokens = models.format_prompt(smollm2_bridge, "The capital of France is")
    with torch.no_grad():
        assert torch.equal(reloaded(tokens[None]), smollm2_bridge(tokens[None]))


@pytest.mark.hooked
def test_bridge_flow_equals_the_hooked_twin(hooked64, bridge64):
    from lens_squash.edge.flow import flow
    from lens_squash.edge.flow_pass import flow_gradients

    tokens = _tokens(9, seed=17)
    for mode in ("exact", "frozen"):
        ours, twin = flow(bridge64, tokens, mode=mode, variants=()), flow(hooked64, tokens, mode=mode, variants=())
        assert _relative_gap(ours, twin) <= 1e-6, mode  # float32 resolution (module docstring); measured 1e-7
    rows = torch.eye(64, dtype=torch.float64)[:4]
    ours, twin = flow_gradients(bridge64, tokens, rows), flow_gradients(hooked64, tokens, rows)
    names = ("total", "mid", "mlp", "value", "pattern_query", "pattern_key", "dz", "patterns", "scale")
    assert _relative_gap(ours, twin, names) <= 1e-6  # mid: a hooked offset there, g^(l+1) + mlp on the bridge


@pytest.mark.hooked
@pytest.mark.parametrize("n", [40, pytest.param(2048, marks=pytest.mark.slow)])
def test_bridge_streamed_analysis_equals_the_hooked_twin(n):
    """Relative to each bound's largest entry: the two backends' float32 attention kernels round
    differently, and over 2048 keys an entry 1e4 times below the largest keeps only ~1e-5 of it
    (measured, float32: 9e-7 of the largest, 1.8e-5 elementwise; the bridge streamed equals the bridge
    whole exactly, so none of it is the sweep's)."""
    tokens = _tokens(n, seed=18)
    bridge = load_model(models.TINY_MODEL, backend="bridge", n_ctx=max(n, 64))
    hooked = load_model(models.TINY_MODEL, backend="hooked", n_ctx=max(n, 64))
    streamed, _ = _streamed_and_whole(bridge, tokens)
    twin, _ = _streamed_and_whole(hooked, tokens)
    for name, bound in twin.bounds.items():
        gap = (streamed.bounds[name].bound.double() - bound.bound.double()).abs().max()
        assert gap <= 1e-6 * bound.bound.double().abs().max(), name
