"""lens_squash.edge.lipschitz: the Gram-identity MLP gains and OV norms against explicit Jacobians."""

from __future__ import annotations

import pytest
import torch

from lens_squash.algebra.attention import ov_norms
from lens_squash.algebra.variants import path_bound
from lens_squash.core.support import UnsupportedModelError
from lens_squash.edge.backends import is_bridge
from lens_squash.edge.lipschitz import supports_certified
from lens_squash.edge.models import tiny_model
from lens_squash.edge.trace import trace

from ..families import params

TOKENS = torch.tensor([5, 3, 9, 1, 7, 2])
CASES = [
    dict(norm="LN", act_fn="gelu"),
    dict(norm="RMS", gated_mlp=True, act_fn="silu", positional="rotary"),
    dict(norm=None, act_fn="relu"),
]


def _with_random_gains(model):
    with torch.no_grad():  # non-trivial norm gains, so γ placement is tested
        for block in model.blocks:
            for ln in (block.ln1, block.ln2):
                if hasattr(ln, "w"):
                    ln.w.uniform_(0.5, 2.0)
    return model


# no transformers twin without norms
@pytest.mark.parametrize("knobs", [*CASES[:2], pytest.param(CASES[2], marks=pytest.mark.hooked)])
def test_mlp_gain_equals_explicit_frozen_jacobian(knobs):
    model = _with_random_gains(tiny_model(dtype=torch.float64, seed=2, **knobs))
    result = trace(model, TOKENS, lipschitz=True)
    _, cache = model.run_with_cache(TOKENS[None])
    for layer, block in enumerate(model.blocks):
        mid = cache[f"blocks.{layer}.hook_resid_mid"][0]
        for pos in range(len(TOKENS)):
            scale = cache[f"blocks.{layer}.ln2.hook_scale"][0, pos] if knobs["norm"] else None

            def mlp_of_frozen_norm(x, block=block, scale=scale):
                if knobs["norm"] == "LN":
                    x = (x - x.mean()) / scale * block.ln2.w + block.ln2.b
                elif knobs["norm"] == "RMS":
                    x = x / scale * block.ln2.w
                return block.mlp(x[None, None])[0, 0]

            jac = torch.func.jacrev(mlp_of_frozen_norm)(mid[pos])
            expected = torch.linalg.matrix_norm(jac)
            # a bridge's RMS twin (transformers' Llama) rounds its norm to float32 inside: that resolution
            tol = 1e-5 * float(expected.detach()) if is_bridge(model) and knobs["norm"] == "RMS" else 1e-10
            torch.testing.assert_close(result.mlp_gain[layer, pos], expected, atol=tol, rtol=1e-10)


@pytest.mark.parametrize(
    "knobs",
    [
        *CASES[:2],
        pytest.param(CASES[2], marks=pytest.mark.hooked),  # no transformers twin without norms
        dict(norm="RMS", n_heads=4, n_key_value_heads=2, positional="rotary"),  # on TL 4.3: an Arcee twin
    ],
)
def test_ov_norms_equal_full_svd(knobs):
    model = _with_random_gains(tiny_model(dtype=torch.float64, seed=4, **knobs))
    got = ov_norms(model)
    d = model.cfg.d_model
    centring = torch.eye(d, dtype=torch.float64) - (1.0 / d if knobs["norm"] == "LN" else 0.0)
    for layer, block in enumerate(model.blocks):
        gain = torch.diag(block.ln1.w.double()) if hasattr(block.ln1, "w") else torch.eye(d, dtype=torch.float64)
        w_v = block.attn.W_V.double()  # a bridge gives it per key/value head: head h reads h // group
        w_v = w_v.repeat_interleave(model.cfg.n_heads // w_v.shape[0], dim=0)
        for head in range(model.cfg.n_heads):
            full = centring @ gain @ w_v[head] @ block.attn.W_O[head].double()
            torch.testing.assert_close(got[layer, head], torch.linalg.matrix_norm(full, ord=2), atol=1e-10, rtol=1e-10)


@pytest.mark.hooked  # tiny_model(act_fn='solu') has no transformers twin
@pytest.mark.parametrize(
    ("knobs", "reason"),
    [(dict(act_fn="solu", gated_mlp=True), "SoLU"), (dict(causal=False), "bidirectional")],
)
def test_unsupported_architectures_are_refused_with_the_reason(knobs, reason):
    model = tiny_model(dtype=torch.float64, **knobs)
    with pytest.raises(UnsupportedModelError, match=reason) as caught:
        supports_certified(model)
    assert "jacobian(model, prompt, mode='frozen')" in str(caught.value)  # says what to use instead
    t = trace(model, TOKENS, lipschitz=True)  # the trace itself still runs, and records why
    assert t.mlp_gain is None and reason in t.provenance["lipschitz_unsupported"]
    with pytest.raises(UnsupportedModelError, match=reason):
        path_bound(t, "certified", model=model)


def _gains_and_bound(model):
    t = trace(model, TOKENS, lipschitz=True)
    return t.mlp_gain, path_bound(t, "certified", model=model).bound


@pytest.mark.hooked  # tiny_model(norm='RMS', positional='standard', gated_mlp=True) has no transformers twin
@pytest.mark.parametrize("edit", ["in_place", "through_data"])
def test_an_in_place_weight_edit_invalidates_the_gains(edit):
    model = _with_random_gains(tiny_model(dtype=torch.float64, seed=6, norm="RMS", gated_mlp=True, act_fn="silu"))
    gain, bound = _gains_and_bound(model)
    w_out = model.blocks[1].mlp.W_out
    with torch.no_grad():
        if edit == "in_place":
            w_out *= 2  # bumps the parameter's version counter
        else:
            w_out.data.mul_(2)  # does not: only the content checksum sees it
    new_gain, new_bound = _gains_and_bound(model)
    # ‖J_MLP‖_F is linear in W_out: layer 1's gains double exactly, layer 0's do not move
    torch.testing.assert_close(new_gain[1], 2 * gain[1], rtol=1e-12, atol=0)
    torch.testing.assert_close(new_gain[0], gain[0], rtol=0, atol=0)
    assert (new_bound > bound).all()


@pytest.mark.hooked  # on a TL 4.3 bridge: ModuleNotFoundError: No module named 'transformer_lens.components'
def test_ov_norms_expand_values_given_per_key_value_head(monkeypatch):
    """A TransformerBridge gives W_V per key/value head; the norms must equal the expanded model's."""
    from transformer_lens.components import GroupedQueryAttention

    model = _with_random_gains(
        tiny_model(dtype=torch.float64, seed=7, norm="RMS", positional="rotary", n_heads=4, n_key_value_heads=2)
    )
    expected = ov_norms(model)
    monkeypatch.setattr(GroupedQueryAttention, "W_V", property(lambda self: self._W_V))
    assert model.blocks[0].attn.W_V.shape[0] == 2
    torch.testing.assert_close(ov_norms(model), expected, rtol=1e-12, atol=0)
    # head h reads key/value head h // 2 (repeat_interleave), not h % 2
    w_v = model.blocks[0].attn._W_V.double() * model.blocks[0].ln1.w.double()[None, :, None]
    for head in range(4):
        full = w_v[head // 2] @ model.blocks[0].attn.W_O[head].double()
        torch.testing.assert_close(expected[0, head], torch.linalg.matrix_norm(full, ord=2), rtol=1e-10, atol=0)


@pytest.mark.hooked
@pytest.mark.parametrize(
    ("family", "experts_per_token"),
    [("moe_mixtral", 1), ("moe_mixtral", 2), ("moe_topk_renormalised", 2), ("gpt_oss_moe_sinks", 1)],
)
def test_moe_gain_against_the_jacobian_of_the_frozen_router_moe(family, experts_per_token):
    """With one expert per token the gain is exactly ‖g J_e‖_F; with more, Σ g_e ‖J_e‖_F bounds ‖Σ g_e J_e‖_F."""
    from ..families import TOKENS as tokens
    from ..families import build

    model = build(family, experts_per_token=experts_per_token)
    if family.startswith("gpt_oss"):  # push projections past GPT-OSS's clamps at ±7, so they matter
        with torch.no_grad():
            for block in model.blocks:
                for expert in block.mlp.experts:
                    expert.W_gate.weight.mul_(40)
                    expert.W_in.weight.mul_(40)
    result = trace(model, tokens, lipschitz=True)
    names = [
        f"blocks.{l}.{n}" for l in range(3) for n in ("hook_resid_mid", "ln2.hook_scale", "mlp.hook_expert_weights")
    ]
    _, cache = model.run_with_cache(tokens[None], names_filter=names)
    for layer, block in enumerate(model.blocks):
        mid, scale = cache[f"blocks.{layer}.hook_resid_mid"][0], cache[f"blocks.{layer}.ln2.hook_scale"][0]
        routing = cache[f"blocks.{layer}.mlp.hook_expert_weights"]  # [pos, expert]
        for pos in range(0, len(tokens), 3):
            hook = (f"blocks.{layer}.mlp.hook_expert_weights", lambda v, hook, r=routing[pos : pos + 1]: r)

            def moe_of_frozen_norm(x, block=block, s=scale[pos], hook=hook):
                with model.hooks(fwd_hooks=[hook]):  # the router's weights held at their traced values
                    return block.mlp((x / s * block.ln2.w)[None, None])[0, 0]

            explicit = torch.linalg.matrix_norm(torch.func.jacrev(moe_of_frozen_norm)(mid[pos]))
            if experts_per_token == 1:
                torch.testing.assert_close(result.mlp_gain[layer, pos], explicit, atol=1e-10, rtol=1e-10)
            else:
                assert result.mlp_gain[layer, pos] >= explicit * (1 - 1e-10)


@pytest.mark.hooked  # families without a transformers twin
@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(act_fn="solu"),
        dict(normalization_type="LNPre"),
        dict(normalization_type="RMS", gated_mlp=True),
        dict(use_normalization_before_and_after=True, normalization_type="RMS"),
    ],
)
def test_solu_gain_equals_the_jacobian_with_frozen_neuron_norm(overrides):
    """SoLU's gain (diagonal-plus-rank-one Gram route) against jacrev of MLP∘N2 with both scales frozen."""
    from ..families import TOKENS as tokens
    from ..families import build

    model = build("solu", **overrides)
    result = trace(model, tokens, lipschitz=True)
    _, cache = model.run_with_cache(tokens[None])
    for layer, block in enumerate(model.blocks):
        mid = cache[f"blocks.{layer}.hook_resid_mid"][0]
        for pos in range(0, len(tokens), 3):
            freeze = [
                (name, lambda v, hook, c=cache[name][:, pos : pos + 1]: c)
                for name in (
                    f"blocks.{layer}.ln2.hook_scale",
                    f"blocks.{layer}.mlp.ln.hook_scale",
                    f"blocks.{layer}.ln2_post.hook_scale",
                )
                if name in cache
            ]

            def mlp_of_frozen_norm(x, block=block, freeze=freeze):
                with model.hooks(fwd_hooks=freeze):
                    out = block.mlp(block.ln2(x[None, None]) if hasattr(block, "ln2") else x[None, None])
                    return (block.ln2_post(out) if hasattr(block, "ln2_post") else out)[0, 0]

            explicit = torch.linalg.matrix_norm(torch.func.jacrev(mlp_of_frozen_norm)(mid[pos]))
            torch.testing.assert_close(result.mlp_gain[layer, pos], explicit, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize(
    "family", params(["llama_gqa", "gpt2", "gemma2_post_norm", "moe_mixtral", "olmo2_output_norms"])
)
def test_the_cached_lower_blocks_are_the_dense_grams(family):
    """The traced pass's Gram blocks (built block by block, W'_out W'_outᵀ once) are the blocks of
    the dense ``mlp_gain_gram``, and give the same gains."""
    from lens_squash.algebra.symmetric_forms import lower_blocks_from_dense, quadratic_form
    from lens_squash.edge.adapter import moe_experts
    from lens_squash.edge.lipschitz import _expert_matrices, _gram_from, cached_gram_blocks, mlp_gain_gram

    from ..families import build

    model = build(family)
    shape = supports_certified(model)
    for block in model.blocks:
        experts = moe_experts(block) if shape.moe else [None]
        for expert in experts:
            if expert is None:
                dense = mlp_gain_gram(block, shape)
            else:
                dense = _gram_from(block, shape, *_expert_matrices(expert))
            blocks, reference = cached_gram_blocks(block, shape, expert), lower_blocks_from_dense(dense)
            assert blocks.starts == reference.starts
            for got, want in zip(blocks.columns, reference.columns, strict=True):
                torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
            coeff = torch.randn(7, dense.shape[0], dtype=torch.float64)
            torch.testing.assert_close(
                quadratic_form(coeff, blocks), torch.einsum("pa,ab,pb->p", coeff, dense, coeff), rtol=1e-12, atol=1e-12
            )


@pytest.mark.hooked  # families without a transformers twin
@pytest.mark.parametrize("family", ["solu", "solu_gated_rms"])
def test_the_solu_hadamard_blocks_give_the_dense_form(family):
    """SoLU's ``aᵀ(G_in ∘ G_M)a`` from per-call lower blocks equals the dense einsum it replaced."""
    from lens_squash.algebra.symmetric_forms import quadratic_form
    from lens_squash.edge.lipschitz import _hadamard_blocks, _solu_grams

    from ..families import build

    model = build(family)
    shape = supports_certified(model)
    for block in model.blocks:
        g_in, g_m = _solu_grams(block, shape)
        a = torch.randn(9, g_in.shape[0], dtype=torch.float64)
        torch.testing.assert_close(
            quadratic_form(a, _hadamard_blocks(g_in, g_m)),
            torch.einsum("pa,ab,pb->p", a, g_in * g_m, a),
            rtol=1e-12,
            atol=1e-12,
        )
