"""tiny_model without HookedTransformer: a bridge over the transformers twin of the asked shape, or a refusal.

The bridge path is forced on either TransformerLens (``has_hooked_transformer`` patched to False), so both
CI legs check it. Its forward pass is compared with the transformers twin run on its own, rebuilt from the
same seed outside the bridge (booting wraps the twin's modules).
"""

from __future__ import annotations

import pytest
import torch

from lens_squash.edge import tiny
from lens_squash.edge.backends import ModelLoadError

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
        ({"positional": "alibi"}, "positional='alibi'"),
        ({"norm": None}, "norm=None"),
        ({"attn_only": True}, "attn_only=True"),
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
