"""tiny_model without HookedTransformer: a bridge over the transformers twin of the asked shape, or a refusal.

The bridge path is forced on either TransformerLens (``has_hooked_transformer`` patched to False), so both
CI legs check it. Its forward pass is compared with the transformers twin run on its own, rebuilt from the
same seed outside the bridge (booting wraps the twin's modules).
"""

from __future__ import annotations

import copy

import pytest
import torch

from lens_squash.algebra.variants import path_bound
from lens_squash.core.support import UnsupportedModelError
from lens_squash.edge import tiny
from lens_squash.edge.backends import ModelLoadError
from lens_squash.edge.jacobian import jacobian
from lens_squash.edge.trace import trace

from ..hf_families import hf_jacobian

pytestmark = pytest.mark.bridge

TOKENS = torch.tensor([[3, 17, 5, 5, 9, 30, 2, 11]])


@pytest.fixture()
def bridge_only(monkeypatch):
    monkeypatch.setattr(tiny, "has_hooked_transformer", lambda: False)


@pytest.mark.parametrize(
    ("knobs", "family", "norm", "positional"),
    [
        ({}, "GPT2LMHeadModel", "LN", "standard"),
        ({"positional": "rotary"}, "GPTNeoXForCausalLM", "LN", "rotary"),
        ({"norm": "RMS", "positional": "rotary", "gated_mlp": True, "act_fn": "silu"}, "LlamaForCausalLM", "RMS", None),
        ({"norm": "RMS", "positional": "rotary", "gated_mlp": True, "window": 3}, "MistralForCausalLM", "RMS", None),
        ({"norm": "RMS", "positional": "rotary", "n_key_value_heads": 1}, "ArceeForCausalLM", "RMS", None),
        ({"positional": "alibi"}, "MptForCausalLM", "LN", "alibi"),
        ({"attn_only": True}, "GPT2LMHeadModel", "LN", "standard"),
    ],
)
def test_each_shape_boots_its_twin_seeded(bridge_only, knobs, family, norm, positional):
    model = tiny.tiny_model(n_layers=2, n_heads=2, d_model=16, d_vocab=40, dtype=torch.float64, seed=4, **knobs)
    assert type(model.original_model).__name__ == family
    cfg = model.cfg
    assert (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_vocab) == (2, 2, 16, 40)
    assert cfg.normalization_type == norm and (positional is None or cfg.positional_embedding_type == positional)
    assert model.tokenizer is None  # as the hooked tiny model without tokenizer="smollm2"
    twin = tiny.tiny_model(n_layers=2, n_heads=2, d_model=16, d_vocab=40, dtype=torch.float64, seed=4, **knobs)
    other = tiny.tiny_model(n_layers=2, n_heads=2, d_model=16, d_vocab=40, dtype=torch.float64, seed=5, **knobs)
    with torch.no_grad():
        logits = model(TOKENS)
        assert torch.equal(logits, twin(TOKENS))  # seeded
        assert not torch.allclose(logits, other(TOKENS))  # and the seed matters
        assert logits.dtype == torch.float64 and logits.shape == (1, TOKENS.shape[1], 40)


def test_the_bridge_computes_what_its_twin_computes(bridge_only):
    """The bridge's logits equal those of the twin rebuilt by hand from the same seed, run as plain transformers."""
    import transformers

    model = tiny.tiny_model(n_layers=2, n_heads=2, d_model=16, d_vocab=40, dtype=torch.float64, seed=4)
    config = transformers.GPT2Config(
        vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=64, n_inner=64, activation_function="gelu",
        tie_word_embeddings=False, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    hf = transformers.GPT2LMHeadModel(config).double().eval()
    tiny._init_as_hooked(hf, 0.8 / 16**0.5, 4)
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), hf(TOKENS).logits, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("knobs", "named"),
    [
        ({"causal": False}, "causal=False"),
        ({"positional": "alibi", "norm": "RMS"}, "positional='alibi', norm='RMS'"),
        ({"positional": "alibi", "d_mlp": 48}, "positional='alibi', d_mlp=48"),
        ({"norm": None}, "norm=None"),
        ({"act_fn": "solu_ln"}, "act_fn='solu_ln'"),
        ({"norm": "RMS"}, "norm='RMS', positional='standard'"),
        ({"n_key_value_heads": 1}, "n_key_value_heads"),
        ({"window": 3}, "window"),
    ],
)
def test_shapes_transformers_cannot_express_are_refused_in_one_line(bridge_only, knobs, named):
    with pytest.raises(ModelLoadError, match="transformer-lens>=3.9,<4") as caught:
        tiny.tiny_model(**knobs)
    assert named in str(caught.value) and "\n" not in str(caught.value)


@pytest.fixture()
def plain_twin(bridge_only, monkeypatch):
    """The twin as booted, copied before the bridge wraps it: a plain transformers reference."""
    copies = []
    real = tiny.boot_bridge

    def boot(*args, hf_model, **kwargs):
        copies.append(copy.deepcopy(hf_model).eval())
        return real(*args, hf_model=hf_model, **kwargs)

    monkeypatch.setattr(tiny, "boot_bridge", boot)
    return copies


@pytest.mark.parametrize("positional", ["standard", "rotary", "alibi"])
def test_attn_only_twins_add_no_mlp_and_keep_the_bound(plain_twin, positional):
    """attn_only on a twin (GPT-2, GPT-NeoX, MPT): the MLP adds exactly 0 (its gain in the trace is 0), the
    exact Jacobian equals plain autograd on the transformers twin, and the certified bound dominates the frozen
    one. The frozen mode itself is refused: replacing ``ln2``'s scale cannot be shown to act on an MLP that
    adds nothing, and the adapter never guesses."""
    model = tiny.tiny_model(
        n_layers=2, n_heads=2, d_model=16, d_vocab=40, positional=positional, attn_only=True, dtype=torch.float64
    )
    with torch.no_grad():
        _, cache = model.run_with_cache(TOKENS)
    for l in range(2):
        assert torch.equal(cache[f"blocks.{l}.hook_mlp_out"], torch.zeros_like(cache[f"blocks.{l}.hook_mlp_out"]))
        resid_mid = cache[f"blocks.{l}.hook_resid_pre"] + cache[f"blocks.{l}.hook_attn_out"]
        assert torch.equal(cache[f"blocks.{l}.hook_resid_post"], resid_mid)
    t = trace(model, TOKENS[0], lipschitz=True)
    assert t.mlp_gain is not None and torch.equal(t.mlp_gain, torch.zeros_like(t.mlp_gain))
    exact = jacobian(model, TOKENS[0], mode="exact", keep_full=True).full
    expected = hf_jacobian(plain_twin[0], TOKENS[0], frozen=False)
    # GPT-NeoX's transformers rotary computes cos/sin in float32 (as in tests/families.HF_FLOAT32_INSIDE)
    atol = 1e-5 * float(expected.abs().max()) if positional == "rotary" else 1e-10
    torch.testing.assert_close(exact, expected, atol=atol, rtol=0 if positional == "rotary" else 1e-10)
    with pytest.raises(UnsupportedModelError, match="mode='exact'") as refused:
        jacobian(model, TOKENS[0], mode="frozen")
    assert "\n" not in str(refused.value)
    truth = torch.linalg.matrix_norm(hf_jacobian(plain_twin[0], TOKENS[0], frozen=True).permute(1, 0, 2), ord=2)
    bound = path_bound(t, "certified", model=model).bound
    assert (bound >= truth * (1 - 1e-9)).all(), (bound / truth).min()


@pytest.mark.parametrize("mode", ["exact", "frozen"])
def test_the_alibi_twin_jacobians_equal_plain_autograd(plain_twin, mode):
    """MPT (ALiBi, with its MLP): the toolkit's exact and frozen Jacobians on the bridge equal plain autograd on
    the transformers twin (frozen: HF's own softmaxes and norm scales replayed)."""
    model = tiny.tiny_model(n_layers=2, n_heads=2, d_model=16, d_vocab=40, positional="alibi", dtype=torch.float64)
    got = jacobian(model, TOKENS[0], mode=mode, keep_full=True).full
    expected = hf_jacobian(plain_twin[0], TOKENS[0], frozen=mode == "frozen")
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    assert float(expected.abs().max()) > 1e-3  # not a vanishing Jacobian


@pytest.mark.parametrize("bridge", [pytest.param(False, marks=pytest.mark.hooked), True])
def test_weights_are_written_or_refused(monkeypatch, bridge):
    """``weights=`` lands in the model (read back through TransformerLens names) or is refused, never dropped."""
    if bridge:
        monkeypatch.setattr(tiny, "has_hooked_transformer", lambda: False)
    w_q = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model = tiny.tiny_model(d_model=16, d_vocab=40, dtype=torch.float64, weights={"blocks.1.attn.W_Q": w_q})
    assert torch.equal(model.blocks[1].attn.W_Q, w_q) and not torch.equal(model.blocks[0].attn.W_Q, w_q)
    with pytest.raises(ValueError, match="is \\(2, 16\\), not"):
        tiny.tiny_model(d_model=16, d_vocab=40, weights={"blocks.0.attn.W_O": torch.zeros(2, 16)})
    with pytest.raises(ValueError, match="'blocks.0.attn.W_X'"):
        tiny.tiny_model(d_model=16, d_vocab=40, weights={"blocks.0.attn.W_X": torch.zeros(2, 16, 8)})
