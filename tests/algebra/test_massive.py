"""Massive activations against numpy: the first token's norm ratio to the median and its top dimensions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lens_squash.algebra.massive import massive_activations
from lens_squash.algebra.phases import massive_layers

F64 = torch.float64


def test_massive_activations_ratio_and_top_dims():
    norms = torch.rand(4, 11, dtype=F64) + 1.0
    norms[:, 0] = torch.tensor([1.0, 40.0, 90.0, 2.0], dtype=F64)
    first = torch.randn(4, 32, dtype=F64)
    res = massive_activations(norms, first, k=3)
    for layer in range(4):
        med = float(np.median(norms[layer, 1:].numpy()))  # 10 others: the mean of the two middle values
        assert res.ratio[layer].item() == pytest.approx(norms[layer, 0].item() / med, rel=1e-14)
        order = np.argsort(-np.abs(first[layer].numpy()))[:3]
        assert res.top_dims[layer].tolist() == order.tolist()
        assert res.top_values[layer].tolist() == first[layer, order].tolist()
    assert massive_layers(res.ratio, factor=10.0) == (1, 3)
    assert massive_layers(res.ratio, factor=100.0) is None
    assert "massive" in res._repr_html_()


def test_the_median_of_an_even_count_is_the_mean_of_the_two_middle_norms():
    # others 1, 2, 3, 10: Tensor.median would give 2 (the lower middle), the median is 2.5
    res = massive_activations(torch.tensor([[5.0, 1.0, 10.0, 2.0, 3.0]], dtype=F64))
    assert res.median_other_norm.tolist() == [2.5] and res.ratio.tolist() == [2.0] and res.first_norm.tolist() == [5.0]
    assert res.top_dims is None and res.top_values is None


def test_massive_activation_shape_errors():
    with pytest.raises(ValueError, match="pos ≥ 2"):
        massive_activations(torch.ones(3, 1))
    with pytest.raises(ValueError, match="same layers"):
        massive_activations(torch.ones(3, 4), torch.ones(2, 8))
