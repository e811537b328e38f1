"""MoE experts as the certified bound reads them, against the modules' own forward passes.

Reference: each ``transformers`` experts module (and TransformerLens 3's GPT-OSS expert) run on its own
with every token routed to one expert at weight 1, so its output is that expert's map alone. The views
(weights, biases, layout, elementwise map) must reproduce it; no lens_squash code is in the reference.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lens_squash.core.support import UnsupportedModelError
from lens_squash.edge.experts import clamped_glu, expert_glu, moe_experts

N_EXPERTS, D_MODEL, D_MLP = 3, 8, 6


def _fused(config_name: str, **kwargs) -> torch.nn.Module:
    """A random float64 experts module of a ``transformers`` MoE (its eager per-expert loop)."""
    import transformers

    config = getattr(transformers, config_name)(
        hidden_size=D_MODEL, intermediate_size=D_MLP, num_local_experts=N_EXPERTS, **kwargs
    )
    config._experts_implementation = "eager"
    module = _experts_class(config_name)(config).double()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in module.parameters():  # O(1) weights and biases: projections reach past a clamp at 0.6
            param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float64))
    return module


def _experts_class(config_name: str):
    if config_name == "GptOssConfig":
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

        return GptOssExperts
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    return MixtralExperts


def _through_views(expert, x: torch.Tensor) -> torch.Tensor:
    def affine(v, linear):
        return v @ linear.weight.T + (0 if linear.bias is None else linear.bias)

    return affine(expert_glu(expert)(affine(x, expert.W_gate), affine(x, expert.W_in)), expert.W_out)


@pytest.mark.parametrize(
    ("config_name", "kwargs"),
    [
        ("GptOssConfig", dict(swiglu_limit=0.6, swiglu_alpha=1.3)),  # transposed, interleaved, biased, clamped
        ("MixtralConfig", dict(hidden_act="silu")),  # [expert, out, in], gate and up halves, no biases
    ],
)
def test_fused_views_compute_each_expert_as_the_module_does(config_name, kwargs):
    module = _fused(config_name, **kwargs)
    x = 2.0 * torch.randn(7, D_MODEL, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    views = moe_experts(SimpleNamespace(mlp=SimpleNamespace(experts=module)))
    assert len(views) == N_EXPERTS
    clamped = 0.0
    for index, expert in enumerate(views):
        routed = torch.full((x.shape[0], 1), index, dtype=torch.long)
        with torch.no_grad():
            expected = module(x, routed, torch.ones(x.shape[0], 1, dtype=x.dtype))
            got = _through_views(expert, x)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        if config_name == "GptOssConfig":
            gate = x @ expert.W_gate.weight.T + expert.W_gate.bias
            clamped = max(clamped, float((gate > kwargs["swiglu_limit"]).double().mean()))
    assert config_name != "GptOssConfig" or clamped > 0.1  # the clamp is exercised, not only the smooth part


def test_biases_are_none_where_the_module_says_it_has_none():
    module = _fused("GptOssConfig")
    module.has_bias = False
    expert = moe_experts(SimpleNamespace(mlp=SimpleNamespace(experts=module)))[0]
    assert expert.W_gate.bias is None and expert.W_in.bias is None and expert.W_out.bias is None


def test_views_see_in_place_edits():
    module = _fused("GptOssConfig")
    expert = moe_experts(SimpleNamespace(mlp=SimpleNamespace(experts=module)))[1]
    before = expert.W_in.weight.clone()
    with torch.no_grad():
        module.gate_up_proj[1].mul_(2.0)
    torch.testing.assert_close(expert.W_in.weight, 2.0 * before, rtol=0, atol=0)


def test_ungated_or_unknown_experts_are_refused_in_one_line():
    ungated = _fused("MixtralConfig")
    ungated.has_gate = False
    unknown = _fused("MixtralConfig")
    del unknown.act_fn
    for module, word in ((ungated, "not gated"), (unknown, "activation is unknown")):
        with pytest.raises(UnsupportedModelError, match=word) as caught:
            moe_experts(SimpleNamespace(mlp=SimpleNamespace(experts=module)))
        assert "\n" not in str(caught.value)


@pytest.mark.hooked  # TransformerLens 3's GPT-OSS expert (TL 4.3 has no HookedTransformer components)
def test_hooked_gpt_oss_expert_map_is_its_forward():
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.components.mlps.gpt_oss_moe import GptOssExpert

    cfg = HookedTransformerConfig(n_layers=1, d_model=D_MODEL, n_ctx=8, d_head=4, d_mlp=D_MLP, act_fn="silu")
    expert = GptOssExpert(cfg).double()
    with torch.no_grad():
        for param in expert.parameters():  # past the clamps at ±7
            param.mul_(30.0)
    x = torch.randn(5, D_MODEL, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(_through_views(expert, x), expert(x), rtol=1e-12, atol=1e-12)
        assert float((x @ expert.W_gate.weight.T + expert.W_gate.bias).max()) > 7.0


def test_clamped_glu_cuts_the_gate_above_and_the_up_branch_both_ways():
    gate = torch.tensor([-2.0, 0.5, 3.0])
    up = torch.tensor([-3.0, 0.5, 3.0])
    got = clamped_glu(gate, up, alpha=1.0, limit=1.0)
    g = torch.tensor([-2.0, 0.5, 1.0])
    torch.testing.assert_close(got, (torch.tensor([-1.0, 0.5, 1.0]) + 1) * g * torch.sigmoid(g))
