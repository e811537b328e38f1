"""Exact, frozen and sketched Jacobians against independent ``torch.func.jacrev`` references.

The references run the blocks by hand (``block(x)`` in a Python loop, then ``ln_final``) from the
value of ``blocks.{wrt}.hook_resid_pre`` read off a no-grad cache, so they share no code with the
hooked forward pass, the leaf hook or the batched VJPs of :mod:`lens_squash.edge.jacobian`.
"""

from __future__ import annotations

import json
import re
import weakref

import pytest
import torch

from lens_squash.edge import jacobian as jac_module
from lens_squash.edge.adapter import read_model
from lens_squash.edge.backends import has_hooked_transformer, is_bridge
from lens_squash.edge.gradient import GradientRequest
from lens_squash.edge.jacobian import JacobianResult, estimate_memory, jacobian
from lens_squash.edge.jacobian_memory import memory_terms
from lens_squash.edge.models import tiny_model

from .. import families
from ..hf_families import hf_jacobian
from ..reference import hf_layer_jacobian, input_grad_only

TOL64 = {"atol": 1e-10, "rtol": 1e-9}


def _tiny(**knobs):
    base = {"n_layers": 2, "n_heads": 2, "d_model": 16, "d_vocab": 40, "dtype": torch.float64, "seed": 3}
    return tiny_model(**{**base, **knobs})


def _tokens(n: int, d_vocab: int = 40, seed: int = 0):
    return torch.randint(0, d_vocab, (n,), generator=torch.Generator().manual_seed(seed))


def _resid_pre(model, tokens, layer: int):
    name = f"blocks.{layer}.hook_resid_pre"
    _, cache = model.run_with_cache(tokens[None], names_filter=name)
    return cache[name].clone()


def reference_jacobian(model, tokens, *, target_pos=-1, layer="final", wrt=0, fwd_hooks=(), rows=None):
    """``[d_out, pos, d_in]`` (or only the output ``rows``) by jacrev through a hand-written loop over the blocks."""
    last = model.cfg.n_layers - 1 if layer == "final" else layer

    def f(v):
        x = v
        for block in model.blocks[wrt : last + 1]:
            x = block(x)
        if layer == "final" and model.cfg.normalization_type is not None:
            x = model.ln_final(x)
        y = x[0, target_pos]
        return y if rows is None else y[rows]

    with model.hooks(fwd_hooks=list(fwd_hooks)), input_grad_only(model):
        return torch.func.jacrev(f, chunk_size=64)(_resid_pre(model, tokens, wrt))[:, 0]


def _norms_of(full):
    blocks = full.permute(1, 0, 2)  # [pos, d_out, d_in]
    return {
        "spectral": torch.linalg.matrix_norm(blocks, ord=2),
        "frobenius": blocks.pow(2).sum(dim=(1, 2)).sqrt(),
        "l1": blocks.abs().sum(dim=(1, 2)),
    }


ARCHITECTURES = {
    "LN+standard": {"norm": "LN", "positional": "standard"},
    "RMS+rotary": {"norm": "RMS", "positional": "rotary"},
    "GQA+rotary": {"norm": "RMS", "positional": "rotary", "n_heads": 4, "n_key_value_heads": 2, "gated_mlp": True},
}


#: on TransformerLens 4 (bridges only): the families.py twin of each shape (Gemma: RMS with 1 + w gains).
#: Their reference is plain autograd on the untouched transformers copy, not a loop over bridge blocks
#: (a bridge block returns a tuple and needs the rotary tables its model hands it).
BRIDGE_TWINS = {"LN+standard": "gpt2", "RMS+rotary": "gemma", "GQA+rotary": "llama_gqa"}
_ROUNDED: weakref.WeakSet = weakref.WeakSet()  # bridges whose transformers model rounds to float32 inside


def _arch(arch: str, **knobs):
    """``_tiny`` of that shape, or on TransformerLens 4 its family twin (3 layers, d_model 32)."""
    if has_hooked_transformer():
        return _tiny(**{**ARCHITECTURES[arch], **knobs})
    model = families.build(BRIDGE_TWINS[arch])
    if BRIDGE_TWINS[arch] in families.HF_FLOAT32_INSIDE:
        _ROUNDED.add(model)
    return model


def _reference(model, tokens, **kw):
    return hf_layer_jacobian(model, tokens, **kw) if is_bridge(model) else reference_jacobian(model, tokens, **kw)


def _close(model, got, want):
    """TOL64, or float32 resolution (1e-5 of the largest entry) against a transformers model that rounds inside."""
    tol = dict(rtol=0.0, atol=1e-5 * float(want.abs().max())) if model in _ROUNDED else TOL64
    torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_exact_matches_jacrev_and_all_norms(arch):
    model = _arch(arch)
    tokens = _tokens(7)
    result = jacobian(model, tokens, keep_full=True, chunk_size=5)  # 5 ∤ d_model: a ragged last chunk
    ref = _reference(model, tokens)
    _close(model, result.full, ref)
    for kind, values in _norms_of(ref).items():
        _close(model, result.norms(kind), values)
    d = model.cfg.d_model
    assert result.full.shape == (d, 7, d) and result.tokens.tolist() == tokens.tolist()


def test_earlier_target_position_drops_later_tokens_exactly():
    model = _arch("LN+standard")
    tokens = _tokens(7)
    result = jacobian(model, tokens, target_pos=3, keep_full=True)
    ref = _reference(model, tokens, target_pos=3)  # over all 7 positions
    assert result.n_tokens == 4 and result.target_pos == 3
    _close(model, result.full, ref[:, :4])
    assert ref[:, 4:].abs().max() == 0  # causality: the dropped positions have J_i = 0


@pytest.mark.parametrize(("layer", "wrt"), [(0, 0), (1, 1), ("final", 1), (2, 1)])
def test_layer_targets_and_inputs(layer, wrt):
    model = _arch("RMS+rotary", n_layers=3)
    tokens = _tokens(6)
    result = jacobian(model, tokens, layer=layer, wrt=wrt, keep_full=True)
    ref = _reference(model, tokens, layer=layer, wrt=wrt)
    _close(model, result.full, ref)
    _close(model, result.spectral, _norms_of(ref)["spectral"])


@pytest.mark.hooked  # tiny_model(norm=None) has no transformers twin
def test_final_target_without_final_norm_is_last_resid_post():
    model = _tiny(norm=None)
    tokens = _tokens(5)
    final = jacobian(model, tokens, keep_full=True)
    last_layer = jacobian(model, tokens, layer=1, keep_full=True)
    torch.testing.assert_close(final.full, last_layer.full, atol=0, rtol=0)
    torch.testing.assert_close(final.full, reference_jacobian(model, tokens), **TOL64)


def test_forward_pass_stops_at_the_target_layer():
    model = _arch("LN+standard", n_layers=3)
    tokens = _tokens(5)
    read_model(model)  # a bridge's structure is established once, by a full pass of its own (cached)

    def refuse(module, args):
        raise AssertionError(f"{type(module).__name__} ran although y lies before it")

    handles = [model.unembed.register_forward_pre_hook(refuse)]
    try:
        final = jacobian(model, tokens, keep_full=True)
        handles.append(model.blocks[2].register_forward_pre_hook(refuse))
        handles.append(model.ln_final.register_forward_pre_hook(refuse))
        middle = jacobian(model, tokens, layer=1, keep_full=True)
    finally:
        for handle in handles:
            handle.remove()
    _close(model, final.full, _reference(model, tokens))
    _close(model, middle.full, _reference(model, tokens, layer=1))


def test_non_models_are_refused_before_any_work():
    with pytest.raises(TypeError, match="TransformerLens model"):
        jacobian(torch.nn.Linear(2, 2), torch.arange(3))


def _constant_attention_model():
    model = _tiny(norm=None)
    with torch.no_grad():
        for block in model.blocks:
            for name in ("W_Q", "W_K", "b_Q", "b_K"):
                getattr(block.attn, name).zero_()
    return model


@pytest.mark.hooked  # tiny_model(norm=None) has no transformers twin
def test_frozen_equals_exact_when_attention_cannot_depend_on_the_input():
    model = _constant_attention_model()
    tokens = _tokens(6)
    exact = jacobian(model, tokens, keep_full=True)
    frozen = jacobian(model, tokens, mode="frozen", keep_full=True)
    torch.testing.assert_close(frozen.full, exact.full, **TOL64)
    assert exact.full.abs().max() > 0.1  # not trivially zero


def _constant(value):
    return lambda activation, hook: value


def _frozen_reference(model, tokens):
    """Patterns and norm scales replaced by constants read from a no-grad run: on a HookedTransformer
    through its hooks, on a bridge in transformers itself (every softmax, rsqrt and LayerNorm scale
    of a clean pass replayed, :func:`tests.hf_families.hf_jacobian`)."""
    if is_bridge(model):
        return hf_jacobian(families.hf_reference(model), tokens, frozen=True)
    names = [n for n in model.hook_dict if n.endswith("hook_scale") or n.endswith("attn.hook_pattern")]
    _, cache = model.run_with_cache(tokens[None], names_filter=lambda n: n in names)
    constants = [(n, _constant(cache[n].clone())) for n in names]
    return reference_jacobian(model, tokens, fwd_hooks=constants)


@pytest.mark.parametrize("arch", ["LN+standard", "RMS+rotary"])
def test_frozen_matches_a_model_with_constant_patterns_and_scales(arch):
    model = _arch(arch)
    tokens = _tokens(6)
    ref = _frozen_reference(model, tokens)
    frozen = jacobian(model, tokens, mode="frozen", keep_full=True)
    _close(model, frozen.full, ref)
    exact = jacobian(model, tokens, keep_full=True)
    # in general freezing changes the Jacobian (softmax and norm derivatives are dropped)
    assert (exact.full - frozen.full).abs().max() > 1e-3 * exact.full.abs().max()


def test_sketch_with_a_full_orthonormal_basis_is_exact():
    model = _arch("RMS+rotary")  # on a bridge transformers rounds RMSNorm to float32: that resolution
    tokens = _tokens(6)
    exact = jacobian(model, tokens)
    sketch = jacobian(model, tokens, mode="sketch", n_probes=model.cfg.d_model, seed=5, chunk_size=7)
    _close(model, sketch.frobenius, exact.frobenius)
    assert sketch.spectral is None and sketch.l1 is None
    with pytest.raises(ValueError, match="frobenius"):
        sketch.norms("spectral")


@pytest.mark.hooked  # tiny_model(norm='RMS', positional='standard', window=None, gated_mlp=False) has no transformers twin
def test_sketch_probe_rows_are_orthonormal_projections_of_the_jacobian():
    model = _tiny(norm="RMS")  # LayerNorm's centring would make J rank-deficient
    tokens = _tokens(5)
    exact = jacobian(model, tokens, keep_full=True)
    sketch = jacobian(model, tokens, mode="sketch", n_probes=4, seed=1, keep_full=True)
    # each kept row is u_rᵀ J; recover U from J (invertible at the last position) and check UUᵀ = I
    j_last = exact.full[:, -1, :]  # [d_out, d_in]
    u = torch.linalg.lstsq(j_last.T, sketch.full[:, -1, :].T).solution.T  # [k, d_out]
    torch.testing.assert_close(u @ u.T, torch.eye(4, dtype=torch.float64), atol=1e-6, rtol=0)
    estimate = (16 / 4) * sketch.full.pow(2).sum(dim=(0, 2))
    torch.testing.assert_close(sketch.frobenius.pow(2), estimate, **TOL64)


def test_sketch_is_unbiased_on_average_over_seeds():
    model = _tiny()
    tokens = _tokens(4)
    exact = jacobian(model, tokens).frobenius.pow(2)
    seeds = range(30)
    mean = torch.stack(
        [jacobian(model, tokens, mode="sketch", n_probes=8, seed=s).frobenius.pow(2) for s in seeds]
    ).mean(0)
    # k = d/2 Haar probes: one estimate's relative s.d. is at most ≈ 0.33 (rank-one J), so the mean
    # of 30 has s.e. ≤ 6 %; 25 % is four of them, while a biased scale (say d/k off by 2×) fails
    torch.testing.assert_close(mean, exact, rtol=0.25, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"target_pos": 7}, "target_pos"),
        ({"target_pos": -8}, "target_pos"),
        ({"layer": 2}, "layer"),
        ({"layer": "logits"}, "layer"),
        ({"wrt": 2}, "wrt"),
        ({"wrt": -1}, "wrt"),
        ({"layer": 0, "wrt": 1}, "wrt"),
        ({"mode": "adjoint"}, "mode"),
        ({"mode": "sketch", "n_probes": 17}, "n_probes"),
        ({"chunk_size": 0}, "chunk_size"),
    ],
)
def test_bad_requests_say_what_is_wrong(tiny, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        jacobian(tiny, _tokens(7, 32), **kwargs)


def test_too_large_a_request_names_a_chunk_size_that_then_works(tiny):
    tokens = _tokens(7, 32)
    budget = estimate_memory(tiny, 7, chunk_size=3)
    with pytest.raises(MemoryError, match=r"chunk_size=\d+") as err:
        jacobian(tiny, tokens, chunk_size=16, max_memory_bytes=budget, checkpoint=False)
    suggested = int(re.search(r"use chunk_size=(\d+)", str(err.value)).group(1))
    assert 1 <= suggested < 16
    result = jacobian(tiny, tokens, chunk_size=suggested, max_memory_bytes=budget, checkpoint=False)
    torch.testing.assert_close(result.spectral, jacobian(tiny, tokens).spectral, **TOL64)
    assert result.provenance["chunk_size"] == suggested
    # the default chunk shrinks by itself to fit; a budget below even one cotangent is refused
    assert jacobian(tiny, tokens, max_memory_bytes=budget, checkpoint=False).provenance["chunk_size"] <= 3
    with pytest.raises(MemoryError, match="the largest prompt that fits is 0 tokens"):
        jacobian(tiny, tokens, max_memory_bytes=1000)


def test_estimate_grows_with_tokens_and_chunk(tiny):
    assert estimate_memory(tiny, 8, 4) < estimate_memory(tiny, 16, 4) < estimate_memory(tiny, 16, 8)
    assert estimate_memory(tiny, 16, 4, mode="sketch", n_probes=4) < estimate_memory(tiny, 16, 4)


def _graph_bytes(model, tokens) -> int:
    """Bytes of every non-parameter tensor the library's forward pass saves for its backward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with input_grad_only(model), torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        f = jac_module._target_function(model, tokens, GradientRequest(target_pos=tokens.shape[0] - 1))
        f(jac_module._input_value(model, tokens, 0).requires_grad_(True))
    return sum(saved.values())


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("n", [4, 24])
def test_memory_estimate_covers_the_saved_autograd_graph(arch, n):
    # independent count: the bytes autograd actually keeps (weight copies included), not the formula
    model = _tiny(**ARCHITECTURES[arch])
    fixed, per_cotangent = memory_terms(model, n, "sketch", n_rows=1)
    assert fixed >= _graph_bytes(model, _tokens(n)) and per_cotangent > 0


def test_result_renders_serialises_and_plots(tiny):
    tokens = _tokens(5, 32)
    result = jacobian(tiny, tokens)
    assert isinstance(result, JacobianResult)
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["mode"] == "exact" and data["spectral"]["shape"] == [5] and data["full"] is None
    assert data["provenance"]["model"]["d_model"] == 16 and data["provenance"]["chunk_size"] >= 1
    loaded = JacobianResult.from_dict(data)
    assert torch.equal(loaded.spectral, result.spectral) and loaded.spectral.dtype == result.spectral.dtype
    table = result.to_frame()
    assert table["spectral"].tolist() == result.spectral.tolist() and list(table["token"]) == list(result.str_tokens)
    hostile = JacobianResult(**{**result.__dict__, "str_tokens": ("<script>",) * 5})
    assert "<script>" not in hostile._repr_html_() and "&lt;script&gt;" in hostile._repr_html_()
    fig = result.plot()
    assert fig.layout.yaxis.type == "log"
    assert list(fig.data[0].y) == pytest.approx(result.spectral.tolist())


@pytest.mark.slow
@pytest.mark.hooked  # jacrev through a TL 4 bridge fails in its norm hooks (a tuple reaches .dtype); the
# bridge's exact Jacobian is checked against jacrev through transformers in tests/test_bridge*.py
def test_smollm2_exact_matches_jacrev_in_float32(smollm2):
    tokens = smollm2.to_tokens("The cat sat on the mat because", prepend_bos=False)[0][:8]
    result = jacobian(smollm2, tokens, keep_full=True, chat=False)
    # 12 of the 576 output rows: jacrev vmaps the backward of every block, which is slow on CPU
    rows = torch.arange(0, smollm2.cfg.d_model, 48)
    ref = reference_jacobian(smollm2, tokens, rows=rows)
    scale = ref.abs().amax(dim=(0, 2), keepdim=True)  # per input position
    torch.testing.assert_close(result.full[rows] / scale, ref / scale, atol=1e-4, rtol=0)
    # the float32 norms (accumulated per chunk, spectral by SVD) against float64 ones of the same J
    for kind, values in _norms_of(result.full.double()).items():
        torch.testing.assert_close(result.norms(kind).double(), values, rtol=1e-4, atol=0)


@pytest.mark.slow
@pytest.mark.hooked  # the ~405 MiB it checks for are HookedTransformer's einsum weight copies
def test_smollm2_memory_estimate_covers_the_saved_autograd_graph(smollm2):
    tokens = torch.randint(100, 20000, (32,), generator=torch.Generator().manual_seed(0))
    fixed, _ = memory_terms(smollm2, 32, "sketch", n_rows=1)
    saved = _graph_bytes(smollm2, tokens)
    assert saved > 400 * 2**20  # the weight copies (~405 MiB) the old formula left out
    assert fixed >= saved


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_16_bit_model_gets_its_jacobian_norms_within_its_precision_of_the_float32_twin(dtype):
    """A 16-bit model's Jacobian blocks are 16-bit; their spectral norms go through float32 (exact for those
    entries: torch has no 16-bit eigvalsh). The same weights in float32 agree to a few of the dtype's eps."""
    from lens_squash.edge.models import load_model

    tokens = torch.tensor([1, 5, 9, 2, 7, 30, 4])
    low, full = load_model("tiny-random", dtype=dtype, n_ctx=64), load_model("tiny-random", dtype="float32", n_ctx=64)
    tol = 8 * torch.finfo(getattr(torch, dtype)).eps
    for mode in ("exact", "frozen"):
        got, want = jacobian(low, tokens, mode=mode), jacobian(full, tokens, mode=mode)
        for norm in ("spectral", "frobenius"):
            a, b = getattr(got, norm).double(), getattr(want, norm).double()
            assert torch.isfinite(a).all() and float(((a - b).abs() / b).max()) <= tol, (mode, norm)
