"""The model adapter: what it establishes about a bridge, checked against the transformers modules it
wraps, and what it refuses.

Independent references: the HF config and module classes of the wrapped model (which norms exist and
where HF's forward applies them), and the norm modules' own outputs.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

from lens_squash.algebra.blocks import block_shape
from lens_squash.core.support import UnsupportedModelError
from lens_squash.edge.adapter import (
    activation,
    functorch_ready,
    mlp_biases,
    mlp_matrices,
    moe_experts,
    norm_facts,
    pattern_freeze,
    read_model,
)
from lens_squash.edge.adapter_probe import PATTERN_FREEZE, QK_FREEZE, pattern_acts, probe_bridge, probe_norm
from lens_squash.edge.backends import has_hooked_transformer
from lens_squash.edge.jacobian import jacobian
from lens_squash.edge.trace import trace

from ..hf_families import CAUSAL, TOKENS, boot, build_hf


@pytest.fixture(scope="module")
def bridges():
    return {name: boot(build_hf(name)) for name in ("gemma2", "phi", "gpt_neox", "olmo2", "opt", "gpt2")}


@pytest.mark.bridge
def test_gemma_gains_are_one_plus_w_and_its_post_norms_are_kept(bridges):
    bridge = bridges["gemma2"]
    assert not getattr(bridge.cfg, "use_normalization_before_and_after", False)  # the config says no post norms
    facts = read_model(bridge)
    assert facts.shape.attn_out == ("ln1_post",) and facts.shape.mlp_out == ("ln2_post",)
    hf_norm = bridge.original_model.model.layers[0].input_layernorm
    gain = norm_facts(bridge.blocks[0].ln1)
    assert gain.convention == "1+w"
    # the effective gain reproduces what transformers' Gemma2RMSNorm computes
    x = torch.randn(3, 32, dtype=torch.float64)
    rms = x.pow(2).mean(-1, keepdim=True).add(hf_norm.eps).sqrt()
    torch.testing.assert_close(hf_norm.original_component(x), x / rms * gain.gain, rtol=1e-6, atol=0)


@pytest.mark.bridge
@pytest.mark.parametrize(
    ("name", "attn_in", "mlp_in", "parallel", "attn_out"),
    [
        ("phi", "ln1", "ln1", True, ()),  # one norm feeds both sublayers (no ln2)
        ("gpt_neox", "ln1", "ln2", True, ()),
        ("olmo2", None, None, False, ("ln1_post",)),  # norms on the sublayer outputs only
        ("opt", "ln1", "ln2", False, ()),  # TransformerLens 3.9's OPT MLP runs without hooks: refused there
        ("gpt2", "ln1", "ln2", False, ()),
    ],
)
def test_block_shapes_are_read_from_the_modules(bridges, name, attn_in, mlp_in, parallel, attn_out):
    if name == "opt" and has_hooked_transformer():
        with pytest.raises(UnsupportedModelError, match="did not run as a module with hooks"):
            block_shape(bridges[name])
        return
    shape = block_shape(bridges[name])
    if name == "olmo2" and has_hooked_transformer():
        attn_out = ("ln1",)  # TransformerLens 3.9's bridge names OLMo-2's output norms ln1/ln2
    assert (shape.attn_in, shape.mlp_in, shape.parallel, shape.attn_out) == (attn_in, mlp_in, parallel, attn_out)


@pytest.mark.bridge
def test_plain_bridge_mlps_have_one_input_matrix(bridges):
    facts = read_model(bridges["gpt2"])
    assert facts.mlp_kind == "plain" and len(facts.layers[0].mlp_in) == 1  # W_gate is None on the bridge


@pytest.mark.bridge
def test_a_pattern_hook_fired_after_the_fact_freezes_queries_and_keys_instead(bridges):
    """OPT's bridge runs transformers' attention and fires hook_pattern afterwards: replacing it changes
    nothing, so the frozen mode detaches the queries and keys, whose replacement does change the output
    (the frozen Jacobian itself is matched to HF autograd in tests/test_bridge_conformance.py)."""
    bridge = bridges["opt"]
    assert not pattern_acts(bridge) and pattern_freeze(bridge) == QK_FREEZE
    with torch.no_grad():
        base = bridge(TOKENS[None])
        flat = [("blocks.0.attn.hook_pattern", lambda v, hook: torch.ones_like(v) / v.shape[-1])]
        with warnings.catch_warnings(), bridge.hooks(fwd_hooks=flat):
            warnings.simplefilter("ignore", UserWarning)  # TransformerLens says the edit is discarded
            assert torch.equal(bridge(TOKENS[None]), base)
        for name in ("blocks.0.attn.hook_q", "blocks.1.attn.hook_k"):
            with bridge.hooks(fwd_hooks=[(name, lambda v, hook: v * 0.5)]):
                assert not torch.equal(bridge(TOKENS[None]), base), name
    if not has_hooked_transformer():
        assert block_shape(bridge).mlp_in == "ln2"  # the certified bound reads traced values and stays available


@pytest.mark.bridge
@pytest.mark.parametrize("name", ["opt", "gpt2"])
def test_the_checkpointed_frozen_sweep_freezes_the_same_hooks(bridges, name):
    """Rerunning one block at a time (checkpoint=True) installs the same per-layer freeze hooks: equal to
    the one-pass frozen Jacobian (itself matched to HF autograd in tests/test_bridge_conformance.py)."""
    plain = jacobian(bridges[name], TOKENS, mode="frozen", keep_full=True, checkpoint=False).full
    swept = jacobian(bridges[name], TOKENS, mode="frozen", keep_full=True, checkpoint=True).full
    torch.testing.assert_close(swept, plain, rtol=1e-10, atol=1e-12)


@pytest.mark.bridge
def test_bridges_computing_attention_in_transformerlens_freeze_the_pattern_itself(bridges):
    assert pattern_acts(bridges["gpt2"]) and pattern_freeze(bridges["gpt2"]) == PATTERN_FREEZE


@pytest.mark.bridge
@pytest.mark.parametrize("name", ["opt", "gpt_neox", "phi"])
def test_frozen_mode_raises_no_warning_on_native_path_norms(bridges, name):
    """Detaching hook_scale makes TransformerLens 4 rebuild the norm from the frozen scale (the frozen
    map itself) and warn; lens_squash ignores that one message, and nothing else is raised."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jacobian(bridges[name], TOKENS, mode="frozen")


class _TwiceW(torch.nn.Module):
    """An RMSNorm that scales by 2w: neither convention the adapter knows."""

    def __init__(self):
        super().__init__()
        self.original_component = self
        self.weight = torch.nn.Parameter(torch.linspace(0.5, 1.5, 8, dtype=torch.float64))

    def forward(self, x):
        return x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * 2 * self.weight


@pytest.mark.bridge
def test_a_norm_with_an_unknown_gain_convention_is_refused():
    with pytest.raises(UnsupportedModelError, match="neither its weight w nor 1 \\+ w"):
        probe_norm(_TwiceW())


@pytest.mark.hooked
def test_hooked_models_keep_their_config_shapes():
    from ..families import FAMILIES, REFUSED, build

    for name in sorted(set(FAMILIES) - set(REFUSED)):
        model = build(name)
        facts = read_model(model)
        assert facts.backend == "hooked" and facts.shape == block_shape(model), name
        for site in facts.shape.norm_sites:  # a hooked norm's gain is its w (TL folds Gemma's 1 + w at load)
            w = getattr(getattr(model.blocks[0], site), "w", None)
            got = facts.layers[0].norms[site].gain
            assert (w is None and got is None) or torch.equal(got, w.detach().double()), (name, site)


@pytest.mark.bridge
def test_low_precision_bridges_get_the_same_facts():
    """bfloat16 rounds at ~4e-3: the probes still tell 1 + w from w, a post-norm from none, RMS from LayerNorm."""
    facts = read_model(boot(build_hf("gemma2", dtype=torch.bfloat16)))
    assert facts.shape.attn_out == ("ln1_post",) and facts.shape.mlp_out == ("ln2_post",)
    assert facts.layers[0].norms["ln1"].convention == "1+w" and not facts.layers[0].norms["ln1"].centred
    gpt2 = read_model(boot(build_hf("gpt2", dtype=torch.bfloat16)))
    assert gpt2.layers[0].norms["ln1"].centred and gpt2.layers[0].norms["ln1"].convention == "w"


@pytest.fixture(scope="module")
def mixtral():
    return build_hf("mixtral", dtype=torch.float32), boot(build_hf("mixtral", dtype=torch.float32))


def _hf_moe_gains(hf, layer: int) -> torch.Tensor:
    """``Σ_e g_e ‖∂ expert_e(γ ⊙ h / s) / ∂h‖_F`` per position, from the transformers modules alone:
    the router's top-k weights ``g`` and the frozen RMSNorm scale ``s`` held fixed."""
    block = hf.model.layers[layer]
    seen = {}

    def keep(module, args) -> None:  # None: the input is left as it is
        seen.setdefault("h", args[0][0])

    handle = block.post_attention_layernorm.register_forward_pre_hook(keep)
    with torch.no_grad():
        hf(input_ids=TOKENS[None])
    handle.remove()
    h, norm, moe = seen["h"], block.post_attention_layernorm, block.mlp
    scale = h.pow(2).mean(-1, keepdim=True).add(norm.variance_epsilon).sqrt()
    router = moe.router if hasattr(moe, "router") else moe.gate  # GPT-OSS's is "router", Mixtral's "gate"
    with torch.no_grad():
        _, weights, indices = router(h / scale * norm.weight)
    gains = torch.zeros(h.shape[0], dtype=torch.float64)
    for e in range(moe.experts.gate_up_proj.shape[0]):
        g = (weights * (indices == e)).sum(-1).double()
        for pos in torch.nonzero(g).flatten().tolist():

            def expert(x, pos=pos, e=e):
                one = torch.full((1, 1), e, dtype=torch.long)
                return moe.experts((x / scale[pos] * norm.weight)[None], one, torch.ones(1, 1))[0]

            jac = torch.autograd.functional.jacobian(expert, h[pos])
            gains[pos] += g[pos] * jac.double().norm()
    return gains


@pytest.mark.bridge
def test_fused_moe_gains_equal_the_routed_sum_of_expert_jacobians_by_hf_autograd(mixtral):
    """The certified bound's MoE gain on a bridge over transformers' fused experts: Σ_e g_e ‖J_e‖_F with the
    router's weights frozen (the frozen model's MoE is Σ_e g_e expert_e, so this bounds ‖J_MoE‖_F)."""
    hf, bridge = mixtral
    if has_hooked_transformer():  # TransformerLens 3.9's bridge has no router hook: refused in one line
        with pytest.raises(UnsupportedModelError, match="hook_expert_weights"):
            block_shape(bridge)
        return
    gains = trace(bridge, TOKENS, lipschitz=True).mlp_gain
    for layer in range(gains.shape[0]):
        torch.testing.assert_close(gains[layer].double(), _hf_moe_gains(hf, layer), rtol=1e-4, atol=0)


def _assert_refused_when_read_as(bridge, experts) -> None:
    """The probe recomputes the MoE from ``experts(block)`` and the router hook: the wrong reading is
    refused for the certified bound, the adapter's own reading passes."""
    probe = probe_bridge(
        bridge, activation=activation, mlp_matrices=mlp_matrices, mlp_biases=mlp_biases,
        runnable=functorch_ready, experts=experts,
    )  # fmt: skip
    assert "does not compute Σ_e g_e" in probe.unsupported["certified"]
    assert "certified" not in read_model(bridge).unsupported


@pytest.mark.bridge
def test_experts_read_wrong_are_caught_by_recomputing_the_moe(mixtral):
    """The probe recomputes the MoE from the read experts and the router hook: experts with gate and up
    swapped do not reproduce it, so the certified bound is refused rather than computed from them."""
    _, bridge = mixtral
    if has_hooked_transformer():  # TransformerLens 3.9's bridge fires no router hook: refused before any reading
        with pytest.raises(UnsupportedModelError, match="hook_expert_weights"):
            block_shape(bridge)
        return

    def swapped(block):
        experts = moe_experts(block)
        return [SimpleNamespace(W_gate=e.W_in, W_in=e.W_gate, W_out=e.W_out, glu=e.glu) for e in experts]

    _assert_refused_when_read_as(bridge, swapped)


#: GPT-OSS with the default layout (sliding and full layers, YaRN) but its SwiGLU limit and slope moved off
#: transformers' defaults (7, 1.702), so a reader that hard-codes them is wrong, and a limit small enough
#: that the clamps bite at these weights
_GPT_OSS = {"gpt_oss": ("GptOssConfig", {**CAUSAL["gpt_oss"][1], "swiglu_limit": 0.6, "swiglu_alpha": 1.3})}


def _gpt_oss(seed: int = 0):
    """A GPT-OSS whose fused expert weights are O(1) (build_hf scales only 2-D weights) and whose expert
    and router biases are drawn (transformers initialises them to 0)."""
    hf = build_hf("gpt_oss", table=_GPT_OSS, seed=seed)
    generator = torch.Generator().manual_seed(seed + 5)
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if param.ndim == 3:
                param.mul_(10.0)
            elif name.endswith(("proj_bias", "router.bias")):
                param.copy_(0.3 * torch.randn(param.shape, generator=generator, dtype=param.dtype))
    return hf


@pytest.fixture(scope="module")
def gpt_oss():
    return _gpt_oss(), boot(_gpt_oss())


def _clamped_share(hf, layer: int) -> float:
    """The share of layer ``layer``'s routed gate and up projections that GPT-OSS's clamps cut."""
    experts, seen = hf.model.layers[layer].mlp.experts, {}
    handle = experts.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))  # None: args kept
    with torch.no_grad():
        hf(input_ids=TOKENS[None])
    handle.remove()
    gate_up = torch.einsum("td,edf->etf", seen["x"], experts.gate_up_proj) + experts.gate_up_proj_bias[:, None]
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    return float(((gate > experts.limit).sum() + (up.abs() > experts.limit).sum()) / gate_up.numel())


@pytest.mark.bridge
def test_gpt_oss_moe_gains_equal_the_routed_sum_of_expert_jacobians_by_hf_autograd(gpt_oss):
    """GPT-OSS's biased, clamped SwiGLU experts on interleaved fused columns, with its config's limit and
    slope: the certified MoE gain equals Σ_e g_e ‖J_e‖_F by autograd through transformers' own experts."""
    hf, bridge = gpt_oss
    if has_hooked_transformer():  # TransformerLens 3.9's bridge has no router hook: refused in one line
        with pytest.raises(UnsupportedModelError, match="hook_expert_weights"):
            block_shape(bridge)
        return
    assert all(0.1 < _clamped_share(hf, layer) < 0.9 for layer in range(2))  # the clamps matter
    gains = trace(bridge, TOKENS, lipschitz=True).mlp_gain
    for layer in range(gains.shape[0]):
        torch.testing.assert_close(gains[layer].double(), _hf_moe_gains(hf, layer), rtol=1e-6, atol=0)


@pytest.mark.bridge
def test_gpt_oss_router_hook_holds_the_weights_transformers_routes_with(gpt_oss):
    """The MoE gains read ``hook_expert_weights``: it must hold transformers' own router scores (softmax
    over the top k of a biased linear map), scattered over all experts, not a recomputation."""
    hf, bridge = gpt_oss
    if has_hooked_transformer():
        assert "blocks.0.mlp.hook_expert_weights" not in bridge.hook_dict
        return
    scores = []
    handles = [
        layer.mlp.router.register_forward_hook(lambda m, a, out: scores.append(out)) for layer in hf.model.layers
    ]
    with torch.no_grad():
        hf(input_ids=TOKENS[None])
    for handle in handles:
        handle.remove()
    names = [f"blocks.{layer}.mlp.hook_expert_weights" for layer in range(len(scores))]
    _, cache = bridge.run_with_cache(TOKENS[None], names_filter=names)
    for name, (logits, weights, indices) in zip(names, scores, strict=True):
        expected = torch.zeros_like(logits).scatter(-1, indices, weights)
        torch.testing.assert_close(cache[name].reshape(expected.shape), expected, rtol=1e-6, atol=1e-12)


@pytest.mark.bridge
@pytest.mark.parametrize("misread", ["gate_and_up_swapped", "biases_dropped"])
def test_gpt_oss_experts_read_wrong_are_caught_by_recomputing_the_moe(gpt_oss, misread):
    _, bridge = gpt_oss
    if has_hooked_transformer():
        return  # no router hook: refused before any reading (test above)

    def unbiased(linear):
        return SimpleNamespace(weight=linear.weight, bias=None)

    def wrong(block):
        if misread == "gate_and_up_swapped":
            return [SimpleNamespace(W_gate=e.W_in, W_in=e.W_gate, W_out=e.W_out, glu=e.glu) for e in moe_experts(block)]
        return [
            SimpleNamespace(W_gate=unbiased(e.W_gate), W_in=unbiased(e.W_in), W_out=unbiased(e.W_out), glu=e.glu)
            for e in moe_experts(block)
        ]

    _assert_refused_when_read_as(bridge, wrong)


@pytest.mark.bridge
@pytest.mark.parametrize("layers", ["every", "last"])  # last: block 0, the one the probe runs, is GPT-OSS's
def test_an_expert_gate_map_other_than_gpt_oss_clamped_swiglu_is_refused(layers):
    """A GPT-OSS-like experts module (alpha, limit) whose own gate map differs (here: no ``+ 1`` on the up
    branch) is not differentiated as if it were GPT-OSS's: the certified bound is refused in one line."""
    from lens_squash.algebra.variants import path_bound

    bridge = boot(_gpt_oss(seed=1))
    for block in bridge.blocks if layers == "every" else bridge.blocks[-1:]:
        experts = block.mlp.experts

        def other(gate_up, experts=experts):
            gate = gate_up[..., ::2].clamp(max=experts.limit)
            return gate_up[..., 1::2].clamp(-experts.limit, experts.limit) * gate * torch.sigmoid(gate * experts.alpha)

        experts._apply_gate = other  # what the experts' forward calls, so the model computes it too
    if has_hooked_transformer():
        return  # refused for the missing router hook before the gate map is read
    assert "gate map" in read_model(bridge).unsupported["certified"]
    with pytest.raises(UnsupportedModelError, match="gate map") as caught:
        path_bound(trace(bridge, TOKENS, lipschitz=True), "certified", model=bridge)
    assert "\n" not in str(caught.value)


@pytest.mark.bridge
def test_the_gpt_oss_twin_traces_the_patterns_and_output_transformers_computes():
    """tests/families.py's GPT-OSS twin (sinks, biased router and experts, every layer full attention): the
    traced patterns are HF's ``output_attentions`` (sink column dropped) and ``y_last`` its final-norm output,
    to float32 resolution (transformers' RMSNorm and rotary tables run in float32 in a float64 model)."""
    from ..families import HF_TWINS
    from ..families import TOKENS as tokens
    from ..hf_families import hf_final

    reference = build_hf("gpt_oss_moe_sinks", table=HF_TWINS)
    traced = trace(boot(build_hf("gpt_oss_moe_sinks", table=HF_TWINS)), tokens)
    out = hf_final(reference, tokens, output_attentions=True)
    expected = torch.stack([a[0] for a in out.attentions])
    assert float(expected.sum(-1).max()) < 1 - 1e-3  # the sinks take mass: rows short of 1
    torch.testing.assert_close(traced.patterns, expected, rtol=0, atol=1e-5)
    y = out.last_hidden_state[0, -1]
    torch.testing.assert_close(traced.y_last, y, rtol=0, atol=1e-5 * float(y.abs().max()))


@pytest.mark.bridge
def test_a_shared_expert_is_refused_in_one_line_not_dropped():
    """Qwen2-MoE adds a gated shared expert to the routed ones: the experts' views alone do not reproduce
    the MoE, so the certified bound is refused (a bound from the routed experts alone would miss a term)."""
    from ..hf_families import _LLAMA_LIKE

    config = {**_LLAMA_LIKE, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24}
    table = {"qwen2_moe": ("Qwen2MoeConfig", dict(config, shared_expert_intermediate_size=24))}
    reason = read_model(boot(build_hf("qwen2_moe", table=table))).unsupported["certified"]
    assert ("a shared expert" if not has_hooked_transformer() else "hook_expert_weights") in reason
    assert "\n" not in reason


def test_clamped_experts_without_their_own_gate_map_are_refused():
    """Fused experts with a clamp limit but no ``_apply_gate`` (the map transformers runs) give nothing to
    check the clamped SwiGLU against past the clamps, which a 5-token probe may never reach: refused."""
    from lens_squash.edge.adapter_mlp import check_gate_map

    experts = SimpleNamespace(alpha=1.702, limit=7.0, gate_up_proj=torch.zeros(2, 4, 6), down_proj=torch.zeros(2, 3, 4))
    with pytest.raises(UnsupportedModelError, match="no _apply_gate"):
        check_gate_map(SimpleNamespace(mlp=SimpleNamespace(experts=experts)))


def test_clamped_values_are_read_from_the_transformers_config():
    """OLMo's ``clip_qkv`` lives in the transformers config only (the bridge's cfg drops it): the adapter
    must still see the clamp, so the certified OV norm is the clamp-proof product and the flow refuses."""
    from lens_squash.edge.flow import flow

    plain = boot(build_hf("olmo"))
    assert read_model(plain).shape.value_clip is False
    hf = build_hf("olmo")
    hf.config.clip_qkv = 0.3  # read by OlmoAttention at every forward
    clamped = boot(hf)
    assert getattr(clamped.cfg, "clip_qkv", None) is None  # what made the bridge look unclamped
    assert read_model(clamped).shape.value_clip is True
    with pytest.raises(UnsupportedModelError, match=r"cfg\.clip_qkv=0\.3"):
        flow(clamped, TOKENS, variants=())


def _cancelled_clamped_olmo():
    """OLMo whose every head has ``W_V W_O = 0`` (value dimension 1 is twice dimension 0, the output
    rows cancel them, the rest write nothing), with ``clip_qkv`` between ``|v_0|`` and ``|v_1|``: the
    clamp cuts ``v_1`` where ``v_0`` passes, so the heads write what ``‖W_V W_O‖ = 0`` says they cannot."""
    hf = build_hf("olmo")
    d_head = hf.config.hidden_size // hf.config.num_attention_heads
    with torch.no_grad():
        for layer in hf.model.layers:
            w_v, w_o = layer.self_attn.v_proj.weight, layer.self_attn.o_proj.weight  # [out, in]
            w_v[1::d_head] = 2 * w_v[0::d_head]
            w_o[:, 0::d_head] = -2 * w_o[:, 1::d_head]
            for k in range(2, d_head):
                w_o[:, k::d_head] = 0
    values = []
    handle = hf.model.layers[0].self_attn.v_proj.register_forward_hook(lambda m, a, out: values.append(out))
    with torch.no_grad():
        hf(input_ids=TOKENS[None])
    handle.remove()
    hf.config.clip_qkv = 1.5 * float(values[0][0, :, 0::d_head].abs().median())
    return boot(hf)


def test_the_certified_bound_covers_clamped_values_the_bridge_config_hides():
    from lens_squash.algebra.variants import path_bound

    model = _cancelled_clamped_olmo()
    bound = path_bound(trace(model, TOKENS, lipschitz=True), "certified", model=model).bound
    truth = jacobian(model, TOKENS, mode="frozen").spectral  # = HF autograd (tests/test_conformance.py)
    assert truth[:-1].max() > 1.0  # earlier positions reach the last only through the cancelled heads
    assert (bound >= truth * (1 - 1e-9)).all(), (bound / truth).min()
