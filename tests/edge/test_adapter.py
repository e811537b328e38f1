"""The model adapter: what it establishes about a bridge, checked against the transformers modules it
wraps, and what it refuses.

Independent references: the HF config and module classes of the wrapped model (which norms exist and
where HF's forward applies them), and the norm modules' own outputs.
"""

from __future__ import annotations

import pytest
import torch

from lens_squash.algebra.blocks import block_shape
from lens_squash.core.support import UnsupportedModelError
from lens_squash.edge.adapter import norm_facts, read_model
from lens_squash.edge.adapter_probe import probe_norm
from lens_squash.edge.backends import has_hooked_transformer
from lens_squash.edge.jacobian import jacobian

from ..hf_families import TOKENS, boot, build_hf


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
def test_a_hook_that_does_not_feed_the_forward_pass_refuses_frozen_mode(bridges):
    bridge = bridges["opt"]
    with pytest.raises(UnsupportedModelError, match="hook_pattern leaves this bridge's output unchanged"):
        jacobian(bridge, TOKENS, mode="frozen")
    # the proof behind it: replacing OPT's pattern really changes nothing
    with torch.no_grad():
        base = bridge(TOKENS[None])
        flat = [("blocks.0.attn.hook_pattern", lambda v, hook: torch.ones_like(v) / v.shape[-1])]
        with bridge.hooks(fwd_hooks=flat):
            assert torch.equal(bridge(TOKENS[None]), base)
    if not has_hooked_transformer():
        assert block_shape(bridge).mlp_in == "ln2"  # the certified bound reads traced values and stays available


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
