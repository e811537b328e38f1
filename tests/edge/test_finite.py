"""Finite numbers or a precise refusal: the counts agree with a brute-force scan (also where a sum of
finite values overflows), a NaN weight is named before any pass, and only low precision is told to
load the model in float32."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lens_squash.edge.backends import is_bridge
from lens_squash.edge.finite import _non_finite, check_finite_values, check_finite_weights
from lens_squash.edge.models import tiny_model

SPECIAL = st.sampled_from([math.nan, math.inf, -math.inf, 3.0e38, -3.0e38, 0.0, 1.5, 65504.0])


@settings(max_examples=80, deadline=None)
@given(values=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32) | SPECIAL, max_size=40),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.float16]))  # fmt: skip
def test_counts_agree_with_a_brute_force_scan(values, dtype):
    tensor = torch.tensor(values, dtype=torch.float64).to(dtype)  # float16 turns 3e38 into inf, as a model would
    brute = [float(v) for v in tensor.tolist()]
    nan = sum(math.isnan(v) for v in brute)
    inf = sum(math.isinf(v) for v in brute)
    assert _non_finite(tensor) == (nan, inf)


def test_finite_values_whose_sum_overflows_are_finite():
    assert _non_finite(torch.full((8,), 3.0e38)) == (0, 0)
    assert _non_finite(torch.tensor([3.0e38, 3.0e38, math.inf])) == (0, 1)


@pytest.fixture(scope="module")
def model():
    return tiny_model(n_layers=3, n_heads=2, d_model=16, d_vocab=32, seed=3)


#: (HookedTransformer name, the same tensor's transformers name on a bridge, wrappers left out)
_TARGETS = [
    ("blocks.1.attn.W_Q", "transformer.h.1.attn.q.weight"),
    ("unembed.W_U", "lm_head.weight"),
    ("embed.W_E", "transformer.wte.weight"),
    ("blocks.2.mlp.b_in", "transformer.h.2.mlp.c_fc.bias"),
]


def _parameter(model, name):
    """The parameter ``name`` (a bridge's named with its ``_original_component`` wrappers left out)."""
    return {
        n.replace("._original_component", "").replace("_original_component.", ""): p
        for n, p in model.named_parameters()
    }[name]


@pytest.mark.parametrize(("hooked", "bridge"), _TARGETS, ids=[t for t, _ in _TARGETS])
def test_the_first_non_finite_weight_is_named(model, hooked, bridge):
    target = bridge if is_bridge(model) else hooked
    broken = copy.deepcopy(model)
    with torch.no_grad():
        param = _parameter(broken, target)  # a bridge's q weight is a strided view: index, not .view(-1)
        param[torch.unravel_index(torch.tensor(3), param.shape)] = math.nan
        param[torch.unravel_index(torch.tensor(5), param.shape)] = math.inf
    with pytest.raises(ValueError, match=re.escape(f"weight {target} holds 1 NaN and 1 inf of")):
        check_finite_weights(broken)
    check_finite_weights(model)  # the original is untouched and passes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_only_low_precision_is_told_to_load_in_float32(dtype):
    with pytest.raises(ValueError) as refused:
        check_finite_values({"ok": torch.ones(3), "last_logits": torch.tensor([1.0, math.nan])}, dtype, what="it")
    message = str(refused.value)
    assert "NaN or inf (1 NaN) in last_logits" in message and "\n" not in message
    low = dtype in (torch.float16, torch.bfloat16)
    assert ("load the model in float32" in message) == low
    assert ("the weights are finite" in message) == (not low)
    check_finite_values({"a": torch.ones(2), "b": None, "c": 2.0}, dtype, what="it")  # finite: nothing raised


def test_a_trace_refuses_a_nan_unembedding_column_instead_of_predicting_it(model):
    from lens_squash.edge.trace import trace

    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.unembed.W_U[:, 7] = math.nan  # an argmax of these logits would name token 7 (a bridge: a view)
    name = "lm_head.weight" if is_bridge(model) else "unembed.W_U"
    with pytest.raises(ValueError, match=re.escape(name) + " holds 16 NaN of 512 values"):
        trace(broken, torch.tensor([1, 2, 3, 4]))


def test_a_float16_overflow_is_refused_as_low_precision():
    from lens_squash.edge.trace import trace

    model = tiny_model(n_layers=2, n_heads=2, d_model=16, d_vocab=32, seed=3, dtype=torch.float16)
    with torch.no_grad():
        model.blocks[0].mlp.W_out.fill_(60000.0)  # finite weights (float16 ends at 65504), sums past it
    with pytest.raises(ValueError, match="low precision overflowed: load the model in float32"):
        trace(model, torch.tensor([1, 2, 3, 4]))
