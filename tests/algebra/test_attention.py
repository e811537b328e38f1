"""Attention checks: defects against a brute-force scan, clear refusals, and the trace's record."""

from __future__ import annotations

import pytest
import torch

from lens_squash import tiny_model, trace
from lens_squash.algebra.attention import attention_defects, check_attention, pattern_tolerance
from lens_squash.core.support import UnsupportedModelError


def causal_softmax(*shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = shape[-1]
    scores = torch.randn(*shape, generator=gen, dtype=torch.float64)
    return torch.softmax(scores.masked_fill(~torch.tril(torch.ones(n, n, dtype=torch.bool)), float("-inf")), -1)


def test_defects_match_a_brute_force_scan():
    patterns = causal_softmax(3, 2, 7, 7)
    patterns[1, 0] = torch.softmax(torch.randn(7, 7, dtype=torch.float64), -1)  # one bidirectional head
    defects = attention_defects(patterns, group=4)
    flat = patterns.reshape(-1, 7, 7)
    assert defects["above_diagonal"] == pytest.approx(max(float(torch.triu(m, 1).sum()) for m in flat))
    assert defects["row_deviation"] == pytest.approx(float((flat.sum(-1) - 1).abs().max()))
    assert defects["min_entry"] == float(flat.min())
    with pytest.raises(ValueError, match="not causal"):
        check_attention(patterns)
    check_attention(patterns, causal=False)


def test_bad_patterns_are_refused_with_the_reason():
    good = causal_softmax(2, 5, 5)
    check_attention(good)
    nan = good.clone()
    nan[1, 3, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        check_attention(nan)
    with pytest.raises(ValueError, match="sum to 1"):
        check_attention(good * 2)
    negative = good.clone()
    negative[0, 4, 0] -= 0.5
    negative[0, 4, 1] += 0.5
    with pytest.raises(ValueError, match="non-negative"):
        check_attention(negative)
    with pytest.raises(ValueError, match="square"):
        check_attention(good[..., :4])


def test_trace_records_defects_and_refuses_overflow():
    model = tiny_model(n_layers=2, n_heads=2, d_model=16, d_vocab=32, seed=2)
    t = trace(model, torch.arange(6))
    defects = t.provenance["attention_defects"]  # float32 softmax: causal, non-negative, rows sum to 1
    assert defects["above_diagonal"] == 0 and defects["min_entry"] >= 0 and defects["row_deviation"] < 1e-6
    assert set(defects) == {"row_deviation", "row_excess", "row_deficit", "above_diagonal", "min_entry"}
    check = t.provenance["attention_check"]
    assert check == {
        "dtype": "float32",
        "tolerance": pattern_tolerance(torch.float32, 6),
        "substochastic": False,
        "tolerated_row_deviation": defects["row_deviation"],
    }
    broken = tiny_model(n_layers=1, n_heads=2, d_model=16, d_vocab=32, dtype=torch.float16, seed=2)
    with torch.no_grad():
        broken.embed.W_E.mul_(1e6)  # beyond float16's range: the pass overflows to inf
    with pytest.raises(ValueError, match="NaN or inf"):
        trace(broken, torch.arange(6))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_patterns_pass_and_true_defects_name_the_dtype(dtype):
    exact = causal_softmax(2, 3, 40, 40)
    rounded = exact.to(dtype)  # what a 16-bit model's hook_pattern holds
    deviation = float((rounded.double().sum(-1) - 1).abs().max())
    assert deviation > 1e-4  # the float32 tolerance would refuse it
    check_attention(rounded.double(), dtype=dtype)
    # rounding each entry moves a row sum by at most eps/2: the tolerance keeps a margin above that
    assert pattern_tolerance(dtype, 40) >= 4 * torch.finfo(dtype).eps / 2
    with pytest.raises(ValueError, match=str(dtype).removeprefix("torch.")):
        check_attention(rounded.double() * float("nan"), dtype=dtype)
    negative = rounded.double().clone()
    negative[0, 0, 5, 0] -= 0.5
    negative[0, 0, 5, 1] += 0.5
    with pytest.raises(ValueError, match=f"negative.*{str(dtype).removeprefix('torch.')}"):
        check_attention(negative, dtype=dtype)
    with pytest.raises(ValueError, match="not scores"):
        check_attention(rounded.double() * 1.2, dtype=dtype)


def test_substochastic_rows_are_accepted_only_when_declared():
    rows = causal_softmax(2, 6, 6) * 0.7  # a learned sink took 30 % of every row
    with pytest.raises(ValueError, match="use_attention_sinks"):
        check_attention(rows)
    check_attention(rows, substochastic=True)
    with pytest.raises(ValueError, match="excess"):
        check_attention(rows * 2, substochastic=True)  # rows above 1 are never patterns


def test_non_causal_patterns_raise_the_typed_refusal():
    patterns = torch.softmax(torch.randn(1, 5, 5, dtype=torch.float64), -1)
    with pytest.raises(UnsupportedModelError, match="decoder-only"):
        check_attention(patterns)


@pytest.mark.hooked  # families without a transformers twin
def test_ov_norms_equal_the_spectral_norm_of_the_dense_ov_circuit():
    """ov_norms goes through the thin QR and a d_head × d_head Gram; the dense d_model × d_model
    product's largest singular value is the reference, on every architecture family."""
    from lens_squash.algebra.attention import expanded_values, ov_norms
    from lens_squash.algebra.blocks import apply_input_norm, apply_output_norms, block_shape
    from lens_squash.edge.adapter import norm_facts

    from ..families import FAMILIES, REFUSED, build

    for family in (name for name in FAMILIES if name not in REFUSED):
        model = build(family)
        shape = block_shape(model)
        for layer, block in enumerate(model.blocks):
            w_v = expanded_values(block.attn, model.cfg.n_heads).double()
            if shape.attn_in is not None:
                w_v = apply_input_norm(w_v, norm_facts(getattr(block, shape.attn_in)), dim=1)
            w_o = apply_output_norms(block.attn.W_O, [norm_facts(getattr(block, s)) for s in shape.attn_out])
            dense = (
                torch.linalg.matrix_norm(w_v, ord=2) * torch.linalg.matrix_norm(w_o, ord=2)
                if shape.value_clip
                else torch.linalg.svdvals(w_v @ w_o)[..., 0]
            )
            torch.testing.assert_close(ov_norms(model)[layer], dense, rtol=1e-12, atol=0)
