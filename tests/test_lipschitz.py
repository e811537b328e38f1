"""lens_squash.lipschitz: the Gram-identity MLP gains and OV norms against explicit Jacobians."""

from __future__ import annotations

import pytest
import torch

from lens_squash.lipschitz import ov_norms
from lens_squash.models import tiny_model
from lens_squash.trace import trace

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


@pytest.mark.parametrize("knobs", CASES)
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
            torch.testing.assert_close(
                result.mlp_gain[layer, pos], torch.linalg.matrix_norm(jac), atol=1e-10, rtol=1e-10
            )


@pytest.mark.parametrize("knobs", CASES + [dict(norm="RMS", n_heads=4, n_key_value_heads=2, positional="rotary")])
def test_ov_norms_equal_full_svd(knobs):
    model = _with_random_gains(tiny_model(dtype=torch.float64, seed=4, **knobs))
    got = ov_norms(model)
    d = model.cfg.d_model
    centring = torch.eye(d, dtype=torch.float64) - (1.0 / d if knobs["norm"] == "LN" else 0.0)
    for layer, block in enumerate(model.blocks):
        gain = torch.diag(block.ln1.w.double()) if hasattr(block.ln1, "w") else torch.eye(d, dtype=torch.float64)
        for head in range(model.cfg.n_heads):
            full = centring @ gain @ block.attn.W_V[head].double() @ block.attn.W_O[head].double()
            torch.testing.assert_close(got[layer, head], torch.linalg.matrix_norm(full, ord=2), atol=1e-10, rtol=1e-10)


def test_unsupported_architectures_are_refused():
    model = tiny_model()
    model.cfg.parallel_attn_mlp = True
    with pytest.raises(ValueError, match="parallel"):
        trace(model, TOKENS, lipschitz=True)
