"""Contribution terms on both backends: ``tiny-random`` is a HookedTransformer under TransformerLens 3 and a
TransformerBridge under 4 (kept apart from test_contributions.py, whose families need HookedTransformer)."""

from __future__ import annotations

import torch

from lens_squash.algebra import contributions as C
from lens_squash.algebra.contributions import layer_terms
from lens_squash.algebra.variants import path_bound
from lens_squash.edge.trace import trace


def test_terms_match_the_backends_attention_output():
    """tiny-random is a HookedTransformer under TransformerLens 3 and a TransformerBridge under 4 (whose
    GQA W_V is per key-value head and whose absent biases are None): both give the model's own output."""
    from lens_squash.edge.models import load_model

    model = load_model("tiny-random")
    traced = trace(model, "The cat sat on the mat.", keep_resid=True)
    _, cache = model.run_with_cache(traced.tokens[None])
    for layer in range(model.cfg.n_layers):
        part = C._attention_part(layer_terms(model, traced, layer, norm=False), traced.patterns[layer])
        expected = cache[f"blocks.{layer}.hook_attn_out"][0].to(part.dtype)
        b_o = model.blocks[layer].attn.b_O
        expected = expected if b_o is None else expected - b_o.to(part.dtype)
        torch.testing.assert_close(part, expected, rtol=1e-4, atol=1e-5)
    for name in C.PROXIES:  # every registered proxy runs on both backends; its row is a distribution
        assert abs(float(path_bound(traced, name, model=model).bound.sum()) - 1.0) < 1e-9
