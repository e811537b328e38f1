"""flow_gain: ln1's gain is read only when the norm's output confirms it; grouped value heads."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lens_squash.core.support import UnsupportedModelError
from lens_squash.edge.flow_gain import head_groups, ln1_gain

pytestmark = pytest.mark.bridge  # no TransformerLens model: a stand-in norm


class _RMS(torch.nn.Module):
    """An RMSNorm whose stored weight ``w`` is its gain, or (``offset``) Gemma's ``1 + w``."""

    def __init__(self, w: torch.Tensor, offset: bool):
        super().__init__()
        self.w, self.offset = w, offset

    def forward(self, x):
        gain = 1 + self.w if self.offset else self.w
        return x / x.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt() * gain


def _setup(offset: bool, stated_offset: bool):
    torch.manual_seed(0)
    norm = _RMS(torch.randn(8, dtype=torch.float64), offset)
    if stated_offset:
        norm.uses_weight_offset = True
    model = SimpleNamespace(blocks=[SimpleNamespace(ln1=norm)], cfg=SimpleNamespace(dtype=torch.float64))
    x = torch.randn(5, 8, dtype=torch.float64)
    scale = x.pow(2).mean(-1).add(1e-5).sqrt()
    return model, x, scale, norm


@pytest.mark.parametrize("offset", [False, True])
def test_the_gain_the_norm_applies_is_returned(offset):
    model, x, scale, norm = _setup(offset, stated_offset=offset)
    expected = 1 + norm.w if offset else norm.w
    torch.testing.assert_close(ln1_gain(model, 0, x, scale, centred=False), expected, rtol=0, atol=0)


def test_a_weight_stored_as_an_offset_but_not_said_so_is_refused():
    model, x, scale, _ = _setup(offset=True, stated_offset=False)  # Gemma's w read as the gain: off by x̂
    with pytest.raises(UnsupportedModelError, match="effective gain"):
        ln1_gain(model, 0, x, scale, centred=False)


def test_grouped_query_heads_read_consecutive_value_heads():
    assert head_groups(6, 2).tolist() == [0, 0, 0, 1, 1, 1]
    assert head_groups(4, 4).tolist() == [0, 1, 2, 3]
    with pytest.raises(UnsupportedModelError, match="do not divide"):
        head_groups(6, 4)
