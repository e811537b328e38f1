"""A bridge cast to another dtype is the bridge booted over the cast ``transformers`` model, bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch

from lens_squash.edge.bridge_dtype import bridge_in_dtype

from ..hf_families import TOKENS, boot, build_hf

pytestmark = pytest.mark.bridge


def _run(bridge):
    with torch.no_grad():
        return bridge.run_with_cache(TOKENS[None])


@pytest.mark.parametrize("compatibility", [True, False])
@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "gemma2"])
def test_a_cast_bridge_equals_one_booted_over_the_cast_model(family, compatibility):
    hf = build_hf(family, dtype=torch.float64)
    reference_hf = copy.deepcopy(hf).to(torch.bfloat16)  # what boot_bridge does before booting in a dtype
    source = boot(hf, compatibility=compatibility)
    logits_before, _ = _run(source)
    twin = bridge_in_dtype(source, torch.bfloat16)
    reference = boot(reference_hf, compatibility=compatibility)
    assert twin.cfg.dtype == torch.bfloat16 == reference.cfg.dtype
    for (name, a), (_, b) in zip(twin.state_dict().items(), reference.state_dict().items(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    logits, cache = _run(twin)
    expected_logits, expected = _run(reference)
    assert logits.dtype == torch.bfloat16 and torch.equal(logits, expected_logits)
    assert set(cache.keys()) == set(expected.keys())
    for name in expected.keys():
        assert torch.equal(cache[name], expected[name]), name
    # the source is untouched: still float64, same numbers
    assert source.cfg.dtype == torch.float64 and {p.dtype for p in source.parameters()} == {torch.float64}
    assert torch.equal(_run(source)[0], logits_before)


def test_only_bridges_are_cast():
    with pytest.raises(ValueError, match="casts a TransformerBridge"):
        bridge_in_dtype(torch.nn.Linear(2, 2), torch.float64)
