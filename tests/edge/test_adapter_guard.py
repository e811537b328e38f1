"""The generic guard: every block's attention, MLP and residual update are recomputed from what the
adapter read and compared with what the bridge computed, so an architecture with an unlisted factor is
refused rather than wrong.

Independent references: transformers' own attention module (its eager output and ``output_attentions``)
for :func:`attention_write`; hooks that put a factor the adapter does not know into a later block.
"""

from __future__ import annotations

import pytest
import torch

from lens_squash.algebra.variants import path_bound
from lens_squash.core.support import UnsupportedModelError
from lens_squash.edge.adapter import read_model
from lens_squash.edge.adapter_guard import attention_write, positionwise_spread
from lens_squash.edge.trace import trace

from ..hf_families import TOKENS, boot, build_hf

pytestmark = pytest.mark.bridge


def _hf_attention_call(hf, layer: int) -> dict:
    """Layer ``layer``'s attention in transformers: its input, pattern and output (before the residual)."""
    seen = {}

    def keep(module, args, kwargs, output) -> None:
        seen["u"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        seen["out"], seen["pattern"] = output[0], output[1]

    attn = hf.model.layers[layer].self_attn
    handle = attn.register_forward_hook(keep, with_kwargs=True)
    try:
        with torch.no_grad():
            hf(input_ids=TOKENS[None], output_attentions=True)
    finally:
        handle.remove()
    return seen


def test_attention_write_equals_transformers_attention_with_gqa_and_value_bias():
    hf = build_hf("qwen2")  # 4 query heads over 2 key/value heads, biased q/k/v, no output bias
    attn, cfg = hf.model.layers[1].self_attn, hf.config
    n_kv, d_head, d = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads, cfg.hidden_size
    w_v = attn.v_proj.weight.detach().reshape(n_kv, d_head, d).transpose(1, 2)  # [kv, d_model, d_head]
    b_v = attn.v_proj.bias.detach().reshape(n_kv, d_head)
    w_o = attn.o_proj.weight.detach().T.reshape(cfg.num_attention_heads, d_head, d)  # [head, d_head, d_model]
    seen = _hf_attention_call(hf, 1)
    got = attention_write(seen["u"], seen["pattern"], w_v, b_v, w_o, None)
    torch.testing.assert_close(got, seen["out"].double(), rtol=1e-10, atol=1e-10 * float(seen["out"].abs().max()))


def test_positionwise_spread_is_zero_for_one_vector_at_every_position_only():
    row = torch.randn(1, 1, 8, dtype=torch.float64)
    assert positionwise_spread(row.expand(1, 5, 8)) == pytest.approx(0.0, abs=1e-14)
    varied = row.expand(1, 5, 8).clone()
    varied[0, 3] += 1.0
    assert positionwise_spread(varied) > 0.5


def _scale_attention(module, args, output, factor=3.0):
    return (output[0] * factor, *output[1:]) if isinstance(output, tuple) else output * factor


def _halve_residual_update(module, args, kwargs, output):
    x = args[0] if args else kwargs["hidden_states"]
    out = output[0] if isinstance(output, tuple) else output
    halved = x + 0.5 * (out - x)  # Granite's residual_multiplier, on this block only
    return (halved, *output[1:]) if isinstance(output, tuple) else halved


def test_an_unedited_bridge_passes_every_blocks_check():
    assert "certified" not in read_model(boot(build_hf("llama"))).unsupported


@pytest.mark.parametrize(
    ("edit", "reason"),
    [("attention", "does not write Σ_h A_h x W_V W_O"), ("residual", "is not x \\+ attention \\+ MLP")],
)
def test_a_factor_on_a_later_block_only_refuses_the_certified_bound(edit, reason):
    """Block 0 is untouched: a probe of block 0 alone would read the model as plain Llama and bound it."""
    bridge = boot(build_hf("llama"))
    block = bridge.blocks[1]
    if edit == "attention":
        block.attn.register_forward_hook(_scale_attention)
    else:
        block.register_forward_hook(_halve_residual_update, with_kwargs=True)
    traced = trace(bridge, TOKENS, lipschitz=True)
    with pytest.raises(UnsupportedModelError, match=reason) as caught:
        path_bound(traced, "certified", model=bridge)
    assert "\n" not in str(caught.value)
