"""The generic guard: every block's attention, MLP and residual update are recomputed from what the
adapter read and compared with what the bridge computed, so an architecture with an unlisted factor is
refused rather than wrong.

Independent references: transformers' own attention module (its eager output and ``output_attentions``)
for :func:`attention_write`; hooks that put a factor the adapter does not know into a later block.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lens_squash.algebra.variants import path_bound
from lens_squash.core.support import UnsupportedModelError
from lens_squash.edge.adapter import read_model
from lens_squash.edge.adapter_guard import attention_write, check_against_wrapped, hooked_output, positionwise_spread
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
    [
        ("output_projection", "does not write Σ_h A_h x W_V W_O"),  # inside transformers' attention
        ("attention", "differs from the transformers LlamaAttention"),  # on the bridge's attention only
        ("residual", "is not x \\+ attention \\+ MLP"),
    ],
)
def test_a_factor_on_a_later_block_only_refuses_the_certified_bound(edit, reason):
    """Block 0 is untouched: a probe of block 0 alone would read the model as plain Llama and bound it.
    A factor on the bridge's attention module alone is not what the wrapped transformers module computes:
    refused whole (before the trace)."""
    bridge = boot(build_hf("llama"))
    block = bridge.blocks[1]
    if edit == "output_projection":  # what W_O is read from, times 3, where transformers calls it
        block.attn.o.register_forward_hook(_scale_attention)
    elif edit == "attention":
        block.attn.register_forward_hook(_scale_attention)
    else:
        block.register_forward_hook(_halve_residual_update, with_kwargs=True)
    with pytest.raises(UnsupportedModelError, match=reason) as caught:
        path_bound(trace(bridge, TOKENS, lipschitz=True), "certified", model=bridge)
    assert "\n" not in str(caught.value)


def _attention_call(bridge, layer: int) -> tuple[tuple, Tensor]:
    """The call block ``layer``'s attention received in a forward pass, and what it returned."""
    seen = {}

    def keep(module, args, kwargs, output) -> None:
        seen.setdefault("call", (args, kwargs))
        seen.setdefault("out", output[0] if isinstance(output, tuple) else output)

    handle = bridge.blocks[layer].attn.register_forward_hook(keep, with_kwargs=True)
    try:
        with torch.no_grad():
            bridge(TOKENS[None])
    finally:
        handle.remove()
    return seen["call"], seen["out"]


def test_an_attention_that_differs_from_the_transformers_module_it_wraps_is_refused():
    """Rerunning the wrapped transformers attention on the recorded call reproduces a faithful bridge's
    output; an output 1 % off (a reimplementation with another rotary layout) is refused whole."""
    bridge = boot(build_hf("qwen2"))
    call, out = _attention_call(bridge, 1)
    check_against_wrapped(1, bridge.blocks[1], call, out)
    with pytest.raises(UnsupportedModelError, match="differs from the transformers Qwen2Attention") as caught:
        check_against_wrapped(1, bridge.blocks[1], call, out * 1.01)
    assert "\n" not in str(caught.value)


def test_identity_hooks_leave_a_faithful_bridge_unchanged():
    """Independent reference: the same bridge's own unhooked output."""
    bridge = boot(build_hf("gemma2"))  # 1 + w gains: a hooked path that read w would move the output
    names = [n for n in bridge.hook_dict if n.endswith((".hook_scale", "attn.hook_pattern"))]
    with torch.no_grad():
        base = bridge(TOKENS[None])
    # hooked, the bridge computes the norms in the model's float64 where transformers upcasts to float32
    # only: the two agree to float32 resolution, far from the O(1) of a 1 + w gain read as w
    err = float((hooked_output(bridge, TOKENS[None], names) - base).norm())
    assert err <= 1e-5 * float(base.norm())
