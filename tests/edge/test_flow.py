"""Sensitivity flow: layer-wise truth against independent Jacobians, parts against independent
backward passes, edge norms against brute-force vectors, bound rows against dense products."""

from __future__ import annotations

import json
import weakref

import pytest
import torch

from lens_squash.algebra import paths
from lens_squash.algebra.variants import build_graph
from lens_squash.core.support import UnsupportedModelError
from lens_squash.edge.backends import has_hooked_transformer, is_bridge
from lens_squash.edge.flow import (
    SensitivityFlow,
    bound_layer_rows,
    flow,
    flow_gradients,
    flow_of,
    head_value_parts,
)
from lens_squash.edge.gradient import Exact, GradientRequest, Sketch
from lens_squash.edge.jacobian import jacobian, jacobian_of
from lens_squash.edge.models import tiny_model
from lens_squash.edge.trace import trace

from .. import families
from ..hf_families import _decoder_layers
from ..reference import input_grad_only

F64 = torch.float64


def _gpt2(**kw):
    return tiny_model(n_layers=2, n_heads=2, d_model=16, d_vocab=32, dtype=kw.pop("dtype", F64), seed=1, **kw)


def _llama(**kw):
    return tiny_model(
        n_layers=3,
        n_heads=4,
        n_key_value_heads=2,
        d_model=16,
        d_vocab=32,
        norm="RMS",
        positional="rotary",
        gated_mlp=True,
        act_fn="silu",
        dtype=kw.pop("dtype", F64),
        seed=2,
        **kw,
    )


def _config_model(**kw):
    cfg = dict(
        n_layers=2,
        n_heads=2,
        d_model=16,
        d_head=8,
        d_mlp=32,
        d_vocab=32,
        n_ctx=32,
        act_fn="gelu",
        normalization_type="LN",
        attention_dir="causal",
        dtype=F64,
        device="cpu",
        seed=3,
    )
    cfg.update(kw)
    from transformer_lens import HookedTransformer, HookedTransformerConfig  # TransformerLens 3 only

    model = HookedTransformer(HookedTransformerConfig(**cfg))
    with torch.no_grad():  # TransformerLens initialises norms to identity; random gains test more
        for name, p in model.named_parameters():
            if name.endswith("ln1.w") or name.endswith("ln2.w"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model


MODELS = {
    "gpt2": _gpt2,
    "llama_gqa": _llama,
    "parallel": lambda: _config_model(parallel_attn_mlp=True),
    "attn_only": lambda: _config_model(attn_only=True, d_mlp=None, act_fn=None),
    "no_norm": lambda: _gpt2(norm=None),
    "ln_pre": lambda: _config_model(normalization_type="LNPre"),
    "gemma_sandwich": lambda: _config_model(normalization_type="RMS", use_normalization_before_and_after=True),
    "sinks": lambda: _sinks_model(),
}


def _sinks_model():
    """Learned attention sinks (gpt-oss): the hooked pattern is the one used, rows sum below 1."""
    model = _config_model(normalization_type="RMS", use_attention_sinks=True)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.sinks.normal_()
    return model


def _moe(dtype=torch.float32):
    """Mixture-of-experts MLPs (TransformerLens's router runs in float32 only)."""
    return _config_model(
        num_experts=4, experts_per_token=2, gated_mlp=True, act_fn="silu", normalization_type="RMS", dtype=dtype
    )


#: on TransformerLens 4 (bridges only): the families.py twin of each MODELS shape that transformers
#: can express (GPT-J's parallel block, Gemma-2's sandwich norms, soft caps and local windows); the
#: GPT-2 and Llama ones are tiny_model's own bridges. No twin: attention-only, no norm, LNPre, sinks.
BRIDGE_TWINS = {"gpt2": None, "llama_gqa": None, "parallel": "gptj_parallel", "gemma_sandwich": "gemma2_post_norm"}
#: twins where transformers computes a step in float32 inside a float64 model (RMSNorm's downcast, GPT-J's
#: attention scores): there even two derivatives through the same bridge agree to float32 resolution only
FLOAT32_INSIDE = frozenset({"llama_gqa", "gemma_sandwich", "parallel"})
_ROUNDED: weakref.WeakSet = weakref.WeakSet()


_NAMES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its MODELS name


def _bridge_or_hooked(name):
    if has_hooked_transformer() or BRIDGE_TWINS[name] is None:
        model = MODELS[name]()
    else:
        model = families.build(BRIDGE_TWINS[name])
    _NAMES[model] = name
    if is_bridge(model) and name in FLOAT32_INSIDE:
        _ROUNDED.add(model)
    return model


def _close(model, got, want, rtol=1e-10, atol=1e-12):
    """Tight float64 tolerances, or float32 resolution (1e-5 of the largest entry, as in
    tests/test_conformance.py) where the bridge rounds to float32 inside."""
    if model in _ROUNDED:
        rtol, atol = 0.0, 1e-5 * float(want.detach().abs().max())
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


@pytest.fixture(
    scope="module",
    params=[name if name in BRIDGE_TWINS else pytest.param(name, marks=pytest.mark.hooked) for name in sorted(MODELS)],
)
def model(request):
    return _bridge_or_hooked(request.param)


def _tokens(n=7, seed=0):
    return torch.randint(0, 32, (n,), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------
# layer-wise sensitivity
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["exact", "frozen", "sketch"])
def test_every_layer_equals_jacobian_wrt_that_layer(model, mode):
    tokens = _tokens()
    result = flow(model, tokens, mode=mode, n_probes=5, variants=())
    for layer in range(model.cfg.n_layers):
        truth = jacobian(model, tokens, wrt=layer, mode=mode, n_probes=5).frobenius
        _close(model, result.sensitivity[layer], truth)


@pytest.mark.parametrize("probes", [Exact(), Sketch(5, seed=2)], ids=["exact", "sketch"])
@pytest.mark.parametrize("frozen", [False, True], ids=["live", "frozen"])
def test_one_request_gives_flow_totals_equal_to_jacobian_norms(model, frozen, probes):
    # the same request through both front ends: the flow's layer-0 totals are the Jacobian's Frobenius
    # norms, and its earlier target drops the later positions exactly as the Jacobian's does
    request = GradientRequest(target_pos=-2, frozen=frozen, probes=probes, chunk_size=3)
    truth = jacobian_of(model, _tokens(), request)
    found = flow_of(model, _tokens(), request, variants=())
    _close(model, found.sensitivity[0], truth.frobenius)
    assert found.str_tokens == truth.str_tokens and found.target_pos == truth.target_pos
    assert found.mode == truth.mode == request.mode
    kept = {"mode", "n_vjps", "chunk_size", "seed", "target_pos", "n_tokens"}  # the plans may differ
    assert {k: found.provenance[k] for k in kept} == {k: truth.provenance[k] for k in kept}


def test_final_stream_is_the_final_norm_jacobian(model):
    tokens = _tokens()
    result = flow(model, tokens, mode="exact", variants=())
    _, cache = model.run_with_cache(tokens[None])
    x = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"][0, -1]
    norm = model.ln_final if model.cfg.normalization_type is not None else (lambda v: v)
    expected = torch.zeros(tokens.shape[0], dtype=F64)
    expected[-1] = torch.linalg.matrix_norm(torch.func.jacrev(norm)(x))
    _close(model, result.sensitivity[-1], expected)


@pytest.mark.hooked  # tiny_model(causal=False) has no transformers twin
def test_bidirectional_model_matches_jacobian():
    model = tiny_model(n_layers=2, n_heads=2, d_model=16, d_vocab=32, causal=False, dtype=F64, seed=4)
    tokens = _tokens(6)
    result = flow(model, tokens, target_pos=2, mode="exact", variants=())
    assert result.n_tokens == 6  # later positions reach position 2 when attention is bidirectional
    torch.testing.assert_close(
        result.sensitivity[0], jacobian(model, tokens, target_pos=2).frobenius, rtol=1e-10, atol=1e-12
    )
    assert float(result.decomposition_error.max()) < 1e-12
    assert result.edges[:, :, 0, 3:].abs().max() > 0  # edges from later keys exist


def test_target_position_and_non_last_target(model):
    tokens = _tokens(8)
    result = flow(model, tokens, target_pos=4, mode="exact", variants=())
    truth = jacobian(model, tokens, target_pos=4, mode="exact")
    assert result.n_tokens == 5 and result.target_pos == 4
    _close(model, result.sensitivity[0], truth.frobenius)


#: family twins the flow refuses on both backends, with a word of the reason
_FLOW_REFUSES = {"olmo2_output_norms": "norm", "olmo_clip_qkv": "clip_qkv"}
_FLOW_REFUSES |= {"split_qkv": "use_split_qkv_input", "split_qkv_gqa": "use_split_qkv_input"}


@pytest.mark.parametrize("name", sorted(families.HF_TWINS))
def test_flow_on_every_family_twin_equals_the_jacobian_or_is_refused(name):
    """Every family with a transformers twin (a bridge on TL 4.3): the flow's totals equal the input
    Jacobian's norms and its parts sum to autograd's, or it is refused with the reason."""
    model, tokens = families.build(name), families.TOKENS[:7]
    if name in _FLOW_REFUSES:
        with pytest.raises(UnsupportedModelError, match=_FLOW_REFUSES[name]):
            flow(model, tokens, variants=())
        return
    result = flow(model, tokens, mode="exact", variants=())
    truth = jacobian(model, tokens).frobenius
    rounded = is_bridge(model) and name in families.HF_FLOAT32_INSIDE | {"gptj_parallel"}  # GPT-J: float32 scores
    atol = 1e-5 * float(truth.max()) if rounded else 1e-12
    torch.testing.assert_close(result.sensitivity[0], truth, rtol=0 if rounded else 1e-10, atol=atol)
    assert float(result.decomposition_error.max()) < (1e-6 if rounded else 1e-10)
    assert result.edges.max() > 0


# --------------------------------------------------------------------------------------------------
# the decomposition: parts sum to an independent autograd gradient; each part is what it claims
# --------------------------------------------------------------------------------------------------


def _independent_rows(model, tokens, layer, rows):
    """``uᵀ ∂y/∂x^(l)`` from jacobian's own forward/backward (keep_full), not from the flow's hooks."""
    full = jacobian(model, tokens, wrt=layer, mode="exact", keep_full=True).full  # [d_out, pos, d_in]
    return torch.einsum("rd,dpe->rpe", rows, full)


def test_parts_sum_to_autograd_float64(model):
    tokens = _tokens()
    rows = torch.randn(3, model.cfg.d_model, dtype=F64)
    grads = flow_gradients(model, tokens, rows)
    for layer in range(model.cfg.n_layers):
        truth = _independent_rows(model, tokens, layer, rows)
        err = (grads.parts_sum()[layer] - truth).norm() / truth.norm()
        assert err < (1e-6 if model in _ROUNDED else 1e-10), (layer, float(err))
    # the parts are not trivially zero: each carries gradient somewhere
    assert grads.value.abs().max() > 0 and grads.pattern.abs().max() > 0
    if grads.mlp is not None:
        assert grads.mlp.abs().max() > 0


@pytest.mark.parametrize(
    "make",  # the MoE model is a HookedTransformerConfig (TransformerLens 3 only)
    [_gpt2, _llama, pytest.param(_moe, marks=pytest.mark.hooked)],
    ids=["gpt2", "llama_gqa", "moe"],
)
def test_parts_sum_to_autograd_float32(make):
    model = make(dtype=torch.float32)
    tokens = _tokens(9)
    rows = torch.randn(4, model.cfg.d_model)
    grads = flow_gradients(model, tokens, rows)
    for layer in range(model.cfg.n_layers):
        truth = _independent_rows(model, tokens, layer, rows)
        err = (grads.parts_sum()[layer].double() - truth.double()).norm() / truth.double().norm()
        assert err < 1e-5, (layer, float(err))
    result = flow(model, tokens, mode="exact", variants=())
    assert float(result.decomposition_error.max()) < 1e-5


def _mlp_branch(model, block, v):
    """What the MLP adds to the residual, from its input residual ``v`` ``[pos, d_model]``."""
    if not is_bridge(model):
        return block.apply_mlp(block.ln2(v[None]))[0]
    norm = block.ln2 if hasattr(block, "ln2") else block.ln1  # GPT-J, Phi: one norm for both sublayers
    out = block.mlp(norm(v[None]))
    return (block.ln2_post(out) if hasattr(block, "ln2_post") else out)[0]  # Gemma-2's sandwich norm


def test_mlp_part_is_the_mlp_vjp(model):
    tokens = _tokens()
    rows = torch.randn(2, model.cfg.d_model, dtype=F64)
    grads = flow_gradients(model, tokens, rows)
    if model.cfg.attn_only:  # no MLP, so no MLP part (and the parts still sum: test above)
        assert grads.mlp is None
        return
    _, cache = model.run_with_cache(tokens[None])
    for layer, block in enumerate(model.blocks):
        name = "hook_resid_pre" if model.cfg.parallel_attn_mlp else "hook_resid_mid"
        x = cache[f"blocks.{layer}.{name}"][0]
        _, vjp = torch.func.vjp(lambda v, block=block: _mlp_branch(model, block, v), x)
        expected = torch.stack([vjp(g)[0] for g in grads.total[layer + 1]])
        _close(model, grads.mlp[layer], expected)


def _attention(block, query, value):
    out = block.attn(query_input=block.ln1(query), key_input=block.ln1(query), value_input=block.ln1(value))
    return block.ln1_post(out) if hasattr(block, "ln1_post") else out  # Gemma-2's sandwich norm


#: transformers twin -> (its attention module, the norm that attention reads, the module whose output is
#: what attention writes: Gemma-2's post-norm, or the attention itself)
_HF_ATTENTION = {
    "gptj_parallel": ("attn", "ln_1", "attn"),
    "gemma2_post_norm": ("self_attn", "input_layernorm", "post_attention_layernorm"),
}


def _hf_attention_vjps(model, layer, tokens, cotangents):
    """(pattern, value) VJPs of what ``layer``'s attention writes, by autograd on the bridge's untouched
    transformers copy: the layer's input replaced by ``v``, with the value projection (pattern part) or
    the query and key projections (value part) fed the norm of the clean input ``x`` instead."""
    hf = families.hf_reference(model)
    block = _decoder_layers(hf)[layer]
    attn_name, norm_name, out_name = _HF_ATTENTION[BRIDGE_TWINS[_NAMES[model]]]
    attn, norm, written = getattr(block, attn_name), getattr(block, norm_name), getattr(block, out_name)
    seen = {}

    def keep_input(module, args, kwargs):
        seen.setdefault("x", (args[0] if args else kwargs["hidden_states"]).detach())

    handle = block.register_forward_pre_hook(keep_input, with_kwargs=True)
    with torch.no_grad():
        hf(input_ids=tokens[None])
    handle.remove()
    x = seen["x"]

    def run(v, held: str):
        def swap(module, args, kwargs):
            return ((v, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": v})

        def grab(module, args, output):
            seen["out"] = output[0] if isinstance(output, tuple) else output

        handles = [block.register_forward_pre_hook(swap, with_kwargs=True), written.register_forward_hook(grab)]
        handles += [getattr(attn, f"{p}_proj").register_forward_pre_hook(lambda m, a: (norm(x),)) for p in held]
        try:
            hf(input_ids=tokens[None])
        finally:
            for h in handles:
                h.remove()
        return seen["out"][0]

    with input_grad_only(hf):
        _, vjp_qk = torch.func.vjp(lambda v: run(v, "v"), x)
        _, vjp_v = torch.func.vjp(lambda v: run(v, "qk"), x)
        return torch.stack([vjp_qk(g)[0][0] for g in cotangents]), torch.stack([vjp_v(g)[0][0] for g in cotangents])


@pytest.mark.parametrize(
    "name",  # the tiny GPT-2 and Llama bridges have no untouched transformers copy to differentiate
    [
        pytest.param(n, marks=pytest.mark.hooked) if n not in ("parallel", "gemma_sandwich") else n
        for n in sorted(MODELS)
    ],
)
def test_pattern_and_value_parts_are_the_attention_vjps(name):
    """Pattern part: backward through queries and keys with the values held; value part: through the
    values with queries and keys held; both from a recomputed attention (HookedTransformer's, or on a
    bridge transformers' own on its untouched copy), no lens_squash hooks."""
    model = _bridge_or_hooked(name)
    tokens = _tokens()
    rows = torch.randn(2, model.cfg.d_model, dtype=F64)
    grads = flow_gradients(model, tokens, rows)
    if is_bridge(model):
        for layer in range(model.cfg.n_layers):
            pattern, value = _hf_attention_vjps(model, layer, tokens, grads.mid[layer])
            _close(model, grads.pattern[layer], pattern)
            _close(model, grads.value[layer], value)
        return
    _, cache = model.run_with_cache(tokens[None])
    for layer, block in enumerate(model.blocks):
        x = cache[f"blocks.{layer}.hook_resid_pre"]
        _, vjp_qk = torch.func.vjp(lambda v, block=block, x=x: _attention(block, v, x)[0], x)
        _, vjp_v = torch.func.vjp(lambda v, block=block, x=x: _attention(block, x, v)[0], x)
        pattern = torch.stack([vjp_qk(g)[0][0] for g in grads.mid[layer]])
        value = torch.stack([vjp_v(g)[0][0] for g in grads.mid[layer]])
        torch.testing.assert_close(grads.pattern[layer], pattern, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grads.value[layer], value, rtol=1e-10, atol=1e-12)


def test_frozen_mode_has_no_pattern_part():
    model = _gpt2()
    grads = flow_gradients(model, _tokens(), torch.randn(2, 16, dtype=F64), mode="frozen")
    assert grads.pattern.abs().max() == 0
    assert grads.value.abs().max() > 0


# --------------------------------------------------------------------------------------------------
# per-head and per-edge value norms, by brute force
# --------------------------------------------------------------------------------------------------


def _norm_affine(norm, d):
    """A norm's effective gain and bias, whatever it stores (Gemma: ``w``, scaled by ``1 + w``): its odd
    and even parts on ``±v``, ``v`` a mean-zero ±10⁴ vector (scale 10⁴, so the ε inside is negligible)."""
    v = 1e4 * (-1.0) ** torch.arange(d, dtype=F64)
    plus, minus = norm(v[None, None])[0, 0], norm(-v[None, None])[0, 0]
    return (plus - minus) / 2 * v.sign(), (plus + minus) / 2


def _ln1(model, block, x, scale=None):
    """ln1 at one position; ``scale`` frozen when given (the frozen mode's linear map)."""
    if scale is None:
        return block.ln1(x[None, None])[0, 0]
    if model.cfg.normalization_type in ("LN", "LNPre"):
        x = x - x.mean()
    gain, bias = _norm_affine(block.ln1, x.shape[-1])
    return x / scale * gain + bias


def _values_per_head(model, block):
    """``W_V`` ``[head, d_model, d_head]``; a bridge gives it per key/value head: head h reads group
    ``h // (n_heads / n_kv_heads)``, as transformers' ``repeat_kv``."""
    w_v = block.attn.W_V.detach()
    return w_v.repeat_interleave(model.cfg.n_heads // w_v.shape[0], dim=0)


def _brute_edges(model, tokens, mode):
    """``‖A_jk (∂N1_k)ᵀ W_V^h ∂z^h_j‖`` over the identity probes, one VJP per (head, j, k)."""
    d = model.cfg.d_model
    grads = flow_gradients(model, tokens, torch.eye(d, dtype=F64), mode=mode)
    L, H, n = grads.patterns.shape[:3]
    edges = torch.zeros(L, H, n, n, dtype=F64)
    heads = torch.zeros(L, H, n, dtype=F64)
    for layer, block in enumerate(model.blocks):
        w_v = _values_per_head(model, block)
        for k in range(n):
            x = grads.resid[layer, k]
            frozen = None if mode != "frozen" or grads.scale is None else grads.scale[layer, k]
            _, vjp = torch.func.vjp(lambda v, b=block, s=frozen: _ln1(model, b, v, s), x)
            for h in range(H):
                per_j = torch.einsum("rje,de->rjd", grads.dz[layer, :, :, h], w_v[h])  # W_V^h ∂z_j
                vec = torch.stack([torch.stack([vjp(u)[0] for u in per_j[:, j]]) for j in range(n)])
                vec = grads.patterns[layer, h, :, k][:, None, None] * vec  # [j, r, d]
                edges[layer, h, :, k] = vec.pow(2).sum((1, 2)).sqrt()
                heads[layer, h, k] = vec.sum(0).pow(2).sum().sqrt()
    return edges, heads


@pytest.mark.parametrize("mode", ["exact", "frozen"])
@pytest.mark.parametrize(
    "name",  # no transformers twin: LNPre, no norm, learned sinks
    [
        "gpt2",
        "llama_gqa",
        "gemma_sandwich",
        "parallel",
        *(pytest.param(n, marks=pytest.mark.hooked) for n in ("ln_pre", "no_norm", "sinks")),
    ],
)
def test_edge_and_head_norms_match_brute_force(name, mode):
    model = _bridge_or_hooked(name)
    tokens = _tokens(5)
    result = flow(model, tokens, mode=mode, variants=())
    edges, heads = _brute_edges(model, tokens, mode)
    _close(model, result.edges, edges, rtol=1e-9)
    _close(model, result.value_heads, heads, rtol=1e-9)
    assert edges.max() > 0


def test_head_value_parts_sum_to_the_autograd_value_part(model):
    tokens = _tokens()
    grads = flow_gradients(model, tokens, torch.randn(3, model.cfg.d_model, dtype=F64))
    centred = model.cfg.normalization_type in ("LN", "LNPre")
    for layer, block in enumerate(model.blocks):
        gain = None if model.cfg.normalization_type is None else _norm_affine(block.ln1, model.cfg.d_model)[0]
        parts = head_value_parts(
            grads.dz[layer],
            grads.patterns[layer],
            grads.resid[layer],
            _values_per_head(model, block),
            gain,
            None if grads.scale is None else grads.scale[layer],
            centred=centred,
            frozen=False,
        )
        _close(model, parts.sum(1), grads.value[layer])


def test_sketch_norms_estimate_exact_ones():
    """Full-rank sketch (k = d_model orthonormal probes) reproduces every exact norm."""
    model = _bridge_or_hooked("llama_gqa")
    tokens = _tokens()
    exact = flow(model, tokens, mode="exact", variants=())
    sketch = flow(model, tokens, mode="sketch", n_probes=16, variants=())
    for name in ("sensitivity", "mlp", "value", "pattern", "value_heads", "edges"):
        _close(model, getattr(sketch, name), getattr(exact, name), rtol=1e-9)


def test_chunking_does_not_change_the_result():
    model = _gpt2()
    tokens = _tokens()
    one = flow(model, tokens, mode="exact", chunk_size=16, variants=())
    many = flow(model, tokens, mode="exact", chunk_size=3, variants=())
    torch.testing.assert_close(one.edges, many.edges, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(one.sensitivity, many.sensitivity, rtol=1e-12, atol=1e-14)


FLOW_FIELDS = ("sensitivity", "mlp", "value", "pattern", "value_heads", "edges")


@pytest.mark.parametrize("mode", ["exact", "frozen", "sketch"])
def test_checkpointed_flow_equals_the_plain_flow(model, mode):
    # every block recomputed from its stored input; chunk 5: ragged, several chunks per block
    tokens = _tokens()
    plain = flow(model, tokens, mode=mode, n_probes=6, chunk_size=5, variants=(), checkpoint=False)
    saved = flow(model, tokens, mode=mode, n_probes=6, chunk_size=5, variants=(), checkpoint=True)
    assert plain.provenance["checkpoint"] is False and saved.provenance["checkpoint"] is True
    for name in FLOW_FIELDS:
        if getattr(plain, name) is not None:
            torch.testing.assert_close(getattr(saved, name), getattr(plain, name), rtol=1e-10, atol=1e-13)
    assert float(saved.decomposition_error.max()) < 1e-10  # the parts still sum to autograd's g^(l)


@pytest.mark.parametrize(
    "make",  # the MoE model is a HookedTransformerConfig (TransformerLens 3 only)
    [_gpt2, _llama, pytest.param(_moe, marks=pytest.mark.hooked)],
    ids=["gpt2", "llama_gqa", "moe"],
)
def test_checkpointed_flow_equals_the_plain_flow_in_float32(make):
    model = make(dtype=torch.float32)
    tokens = _tokens(9, seed=4)
    plain = flow(model, tokens, mode="exact", variants=(), checkpoint=False)
    saved = flow(model, tokens, mode="exact", variants=(), checkpoint=True)
    for name in ("sensitivity", "value", "pattern", "value_heads"):
        torch.testing.assert_close(getattr(saved, name), getattr(plain, name), rtol=1e-5, atol=1e-6)
    assert float(saved.decomposition_error.max()) < 1e-5


def test_flow_checkpoints_by_itself_when_the_plain_backward_does_not_fit():
    from lens_squash.edge.flow import estimate_flow_memory

    model, tokens = _llama(), _tokens(12, seed=5)
    plain_bytes = estimate_flow_memory(model, 12, 16)
    saved_bytes = estimate_flow_memory(model, 12, 16, checkpoint=True)
    assert saved_bytes < plain_bytes
    tight = flow(model, tokens, mode="exact", variants=(), max_memory_bytes=(plain_bytes + saved_bytes) // 2)
    roomy = flow(model, tokens, mode="exact", variants=(), max_memory_bytes=plain_bytes)
    assert tight.provenance["checkpoint"] is True and roomy.provenance["checkpoint"] is False
    torch.testing.assert_close(tight.edges, roomy.edges, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("checkpoint", [False, True])
def test_backward_chunks_show_a_progress_bar_unless_silenced(monkeypatch, capsys, checkpoint):
    from lens_squash.core.progress import silenced
    from lens_squash.edge import gradient as gradient_module

    monkeypatch.setenv("LENS_SQUASH_PROGRESS", "1")
    monkeypatch.setattr(gradient_module, "PROGRESS_DELAY_S", 0.0)
    flow(_gpt2(), _tokens(), mode="exact", chunk_size=8, variants=(), checkpoint=checkpoint)
    assert "flow backward chunks" in capsys.readouterr().err
    with silenced():
        flow(_gpt2(), _tokens(), mode="exact", chunk_size=8, variants=(), checkpoint=checkpoint)
    assert "flow backward chunks" not in capsys.readouterr().err


def test_sink_split_partitions_the_edge_norms():
    result = flow(_gpt2(), _tokens(), mode="exact", variants=())
    split = result.sink_split()
    torch.testing.assert_close(split["sink"] + split["content"], result.edges.sum((1, 3)))
    torch.testing.assert_close(split["sink"], result.edges[:, :, :, 0].sum(1))
    assert ((split["sink_share"] >= 0) & (split["sink_share"] <= 1)).all()


# --------------------------------------------------------------------------------------------------
# bounds layer by layer
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["paper", "rollout", "certified", "value_rownorm"])
def test_bound_rows_match_dense_products(variant):
    model = _gpt2()
    tokens = _tokens()
    graph = build_graph(trace(model, tokens, lipschitz=True), variant, model=model)
    rows = bound_layer_rows(graph, -1)
    mats = graph.matrices()
    scale = float(graph.output_scale[-1])
    L = mats.shape[0]
    for layer in range(L):
        dense = scale * paths.stack_product(mats[layer:])[-1]
        torch.testing.assert_close(rows[layer], dense, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(rows[0], graph.row(6), rtol=1e-6, atol=1e-12)
    expected_top = torch.zeros(7, dtype=F64)
    expected_top[-1] = scale
    torch.testing.assert_close(rows[L], expected_top)


def test_flow_carries_bounds_and_serialises():
    model = _gpt2()
    result = flow(model, _tokens(), mode="exact", variants=("paper", "rollout", "certified"))
    assert set(result.bounds) == {"paper", "rollout", "certified"}
    assert result.bounds["rollout"].shape == result.sensitivity.shape
    back = SensitivityFlow.from_dict(json.loads(json.dumps(result.to_dict(), allow_nan=False)))
    assert torch.equal(back.edges, result.edges) and set(back.bounds) == set(result.bounds)
    assert "edges" in result.to_dict(heavy=False)["__dropped__"]  # [layer, head, n, n]: left out of a light copy
    text = repr(result)
    assert "\n" not in text and text.startswith("SensitivityFlow(")
    assert "SensitivityFlow" in result._repr_html_()
    rho = result.layer_spearman()
    assert set(rho) == set(result.bounds) and rho["paper"].shape == (model.cfg.n_layers,)


# --------------------------------------------------------------------------------------------------
# refusals and bad input
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["use_split_qkv_input", "use_attn_in"])
def test_per_head_inputs_are_refused_naming_the_flag(flag):
    """Split Q/K/V inputs or a per-head attention input, switched on as users do (``model.set_<flag>``, on
    TL 4 on GPT-2's bridge twin): refused naming the field, and on a bridge the call that switches it off."""
    model = families.build("gpt2")
    getattr(model, f"set_{flag}")(True)
    with pytest.raises(UnsupportedModelError, match=f"cfg.{flag}") as refusal:
        flow(model, families.TOKENS[:7], variants=())
    assert "\n" not in str(refusal.value)
    assert (f"bridge.set_{flag}(False)" in str(refusal.value)) == is_bridge(model)


@pytest.mark.hooked  # builds a HookedTransformer (TransformerLens 3 only)
@pytest.mark.parametrize(
    "field_name, kw",
    [
        ("act_fn", {"act_fn": "solu_ln"}),
        ("original_architecture", {"original_architecture": "Olmo2ForCausalLM"}),
    ],
)
def test_unsupported_blocks_are_refused_naming_the_field(field_name, kw):
    model = _config_model(**kw)
    with pytest.raises(UnsupportedModelError, match=f"cfg.{field_name}"):
        flow(model, _tokens(), variants=())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target_pos": 7}, "outside the prompt"),
        ({"target_pos": -8}, "outside the prompt"),
        ({"mode": "sketch", "n_probes": 17}, "n_probes"),
        ({"mode": "sketch", "n_probes": 0}, "n_probes"),
        ({"mode": "fast"}, "unknown mode"),
        ({"chunk_size": 0}, "chunk_size"),
    ],
)
def test_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        flow(_gpt2(), _tokens(), variants=(), **{"mode": "exact", **kwargs})


def test_layer_and_position_checks():
    result = flow(_gpt2(), _tokens(), mode="exact", variants=())
    assert result.check_layer(2) == 2 and result.check_layer(-1) == 2
    with pytest.raises(ValueError, match="out of range"):
        result.check_layer(3)
    with pytest.raises(ValueError, match="out of range"):
        result.check_layer(2, with_output=False)
    with pytest.raises(ValueError, match="outside the prompt"):
        result.check_position(7)


def test_memory_refusal():
    with pytest.raises(MemoryError, match="chunk_size"):
        flow(_gpt2(), _tokens(), mode="exact", variants=(), max_memory_bytes=1000)


def test_flow_gradients_rejects_bad_rows():
    with pytest.raises(ValueError, match="rows must be"):
        flow_gradients(_gpt2(), _tokens(), torch.ones(2, 15, dtype=F64))


# --------------------------------------------------------------------------------------------------
# SmolLM2
# --------------------------------------------------------------------------------------------------


def _assert_every_hop_drawn(found, min_share=0.05):
    fig = found.plot(min_share=min_share)
    drawn = {tuple(e) for e in fig.layout.meta["edges"]}
    selected = found.selected(min_share=min_share)
    assert selected
    for p in selected:
        for layer, hop in enumerate(p.hops):
            assert (layer, hop, p.positions[layer], p.positions[layer + 1]) in drawn
    return selected


@pytest.mark.slow
def test_smollm2_decomposition_input_jacobian_and_paths(smollm2):
    from lens_squash.algebra.flow_paths import graph_paths
    from lens_squash.cli import copy_prompt

    result = flow(smollm2, copy_prompt(12), mode="sketch", n_probes=8, variants=("rollout",))
    truth = jacobian(smollm2, copy_prompt(12), mode="sketch", n_probes=8)
    assert isinstance(result, SensitivityFlow) and result.n_tokens == 89
    torch.testing.assert_close(result.sensitivity[0], truth.frobenius, rtol=1e-4, atol=0)
    assert float(result.decomposition_error.max()) < 1e-5
    # the path figures (true flow and the rollout bound) draw every hop of every path they select
    _assert_every_hop_drawn(result.top_paths(k=3))
    graph = build_graph(trace(smollm2, result.tokens), "rollout")
    selected = _assert_every_hop_drawn(graph_paths(graph, -1, k=3, str_tokens=result.str_tokens))
    assert any(p.cross_hops() for p in selected)  # paths from other positions reach the target


# --------------------------------------------------------------------------------------------------
# connected paths
# --------------------------------------------------------------------------------------------------


def _enumerate(residual, edges, target, left_scale=None):
    """Every causal path into ``target`` with its weight, by brute force: {source: [weights]}."""
    L, E, n, _ = edges.shape
    out = {i: [] for i in range(n)}

    def walk(layer, position, weight, seq):
        if layer < 0:
            out[position].append((weight, tuple(reversed(seq))))
            return
        scale = 1.0 if left_scale is None else float(left_scale[layer, position])
        walk(layer - 1, position, weight * scale * float(residual[layer, position]), seq + [position])
        for e in range(E):
            for key in range(n):
                w = float(edges[layer, e, position, key])
                if w > 0:
                    walk(layer - 1, key, weight * scale * w, seq + [key])

    walk(L - 1, target, 1.0, [target])
    return out


def test_top_paths_by_source_matches_enumeration():
    from lens_squash.algebra.flow_paths import top_paths_by_source

    gen = torch.Generator().manual_seed(0)
    L, E, n = 3, 2, 4
    edges = torch.rand(L, E, n, n, generator=gen, dtype=F64).tril()
    residual = torch.rand(L, n, generator=gen, dtype=F64)
    left = torch.rand(L, n, generator=gen, dtype=F64) + 0.5
    found = top_paths_by_source(residual, edges, 3, k=4, left_scale=left)
    brute = _enumerate(residual, edges, 3, left)
    for source in range(n):
        expected = sorted((w for w, _ in brute[source]), reverse=True)[:4]
        got = [w for w, _, _ in found[source]]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-12, atol=0)
        for w, positions, _ in found[source]:
            assert positions[0] == source and positions[-1] == 3
            assert any(abs(w - bw) < 1e-12 and bp == positions for bw, bp in brute[source])


def test_graph_paths_shares_are_terms_of_the_bound():
    from lens_squash.algebra.flow_paths import graph_paths

    model = _gpt2()
    tokens = _tokens(5)
    graph = build_graph(trace(model, tokens), "rollout")
    result = graph_paths(graph, -1, k=200)
    bound = graph.row(4)
    for source, found in result.paths.items():
        # k is large enough to list every path here, so the shares of a source sum to one
        assert abs(sum(p.share for p in found) - 1) < 1e-9
        torch.testing.assert_close(torch.tensor(sum(p.weight for p in found), dtype=F64), bound[source])
        for p in found:
            assert (
                abs(p.weight - float(graph.output_scale[4]) * torch.tensor(p.shares, dtype=F64).prod().item()) < 1e-12
            )


def test_flow_paths_are_connected_products_of_shares():
    from lens_squash.algebra.flow_paths import flow_edge_shares

    result = flow(_llama(), _tokens(6), mode="exact", variants=())
    res_w, edge_w = flow_edge_shares(result.residual, result.mlp, result.edges)
    out = res_w + edge_w.sum((1, 3))  # shares leaving each query position
    reached = (result.residual + result.mlp + result.edges.sum((1, 3))) > 0
    torch.testing.assert_close(out[reached], torch.ones_like(out[reached]))
    found = result.top_paths(k=3)
    assert set(found.paths) == set(range(result.n_tokens))
    for source, paths_ in found.paths.items():
        for p in paths_:
            assert p.positions[0] == source and p.positions[-1] == result.target_pos
            assert all(a <= b for a, b in zip(p.positions, p.positions[1:], strict=False))
            assert abs(p.weight - torch.tensor(p.shares, dtype=F64).prod().item()) < 1e-12
        assert [p.weight for p in paths_] == sorted((p.weight for p in paths_), reverse=True)
    assert found.pattern_share.shape == (3,) and (found.pattern_share > 0).all()
    json.dumps(found.to_dict())
    with pytest.raises(ValueError, match="outside the prompt"):
        result.top_paths(source=6)


def test_select_paths_keeps_every_path_above_the_share():
    from lens_squash.algebra.flow_paths import FlowPath, select_paths

    paths_ = [FlowPath(w, w, (0, 1), (0,), (w,)) for w in (0.5, 0.3, 0.04, 0.026, 0.024, 0.001)]
    kept = select_paths(paths_, min_share=0.05)
    assert [p.share for p in kept] == [0.5, 0.3, 0.04, 0.026]  # 0.05 × 0.5 = 0.025
    assert len(select_paths(paths_, min_share=0.0, max_paths=2)) == 2
    with pytest.raises(ValueError, match="min_share"):
        select_paths(paths_, min_share=1.5)


# --------------------------------------------------------------------------------------------------
# views
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_flow():
    return flow(_llama(), _tokens(6), mode="exact", variants=("paper", "rollout"))


def test_views_have_captions_and_titled_axes(tiny_flow):
    from lens_squash.views.style import caption_of

    for kind in ("layers", "heatmap", "heads", "paths"):
        fig = tiny_flow.plot(kind)
        assert caption_of(fig), kind
        # every axis a trace is drawn on and that is shown carries a title, not just one of them; an
        # axis that shares (``matches``) another is titled there, and that one must be drawn on too
        refs = {ref for t in fig.data for ref in (t.xaxis or "x", t.yaxis or "y")}
        axes = {ref: fig.layout[ref[0] + "axis" + ref[1:]] for ref in sorted(refs)}
        shown = {ref: axis for ref, axis in axes.items() if axis.visible is not False}
        assert {axis.matches for axis in shown.values() if axis.matches} <= set(axes), kind
        titled = [axis.title.text for axis in shown.values() if not axis.matches]
        assert len(titled) >= 2 and all(titled), (kind, titled)
    with pytest.raises(ValueError, match="SensitivityFlow has no figure kind 'pie'; use one of 'layers'"):
        tiny_flow.plot("pie")


def test_truth_vs_bounds_shows_the_chosen_layer(tiny_flow):
    fig = tiny_flow.plot("layers", layer=2)
    visible = [t for t in fig.data if t.visible]
    truth = next(t for t in visible if t.name == "truth")
    torch.testing.assert_close(torch.tensor(truth.y), tiny_flow.sensitivity[2].double())
    for t in visible:
        if t.name != "truth":
            assert abs(sum(t.y) - 1) < 1e-9  # shares
    with pytest.raises(ValueError, match="out of range"):
        tiny_flow.plot("layers", layer=4)


def test_path_figure_draws_every_hop_of_every_selected_path(tiny_flow):
    paths_ = tiny_flow.top_paths(k=3)
    fig = paths_.plot(min_share=0.05)
    drawn = {tuple(e) for e in fig.layout.meta["edges"]}
    selected = paths_.selected(min_share=0.05)
    assert selected
    for p in selected:
        for layer, hop in enumerate(p.hops):
            assert (layer, hop, p.positions[layer], p.positions[layer + 1]) in drawn
    edge_traces = [t for t in fig.data if t.meta]
    for t in edge_traces:
        if t.meta["key"] != t.meta["query"]:
            assert t.line.width >= 2.0
            assert "query" in t.hovertemplate and "key" in t.hovertemplate and "share" in t.hovertemplate
    heads = [t for t in edge_traces if t.showlegend and t.name.startswith("layer")]
    ranks = [t.legendrank for t in heads]
    assert ranks == sorted(ranks) and len({t.name for t in heads}) == len(heads)


def test_head_grid_rejects_bad_layers(tiny_flow):
    with pytest.raises(ValueError, match="out of range"):
        tiny_flow.plot("heads", layers=[3])
