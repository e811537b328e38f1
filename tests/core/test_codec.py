"""Tensors as typed base64: the bytes are the tensor's little-endian values (checked against
``struct``, an independent encoder), files of the older number-list format still load, and what does
not match its own dtype and shape is refused in one line."""

from __future__ import annotations

import base64
import json
import math
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lens_squash.core.codec import StoredDataError, decode, encode

#: struct's little-endian code of each dtype (bfloat16 has none: it is float32's upper half)
STRUCT = {torch.float16: "e", torch.float32: "f", torch.float64: "d", torch.int8: "b", torch.uint8: "B",
          torch.int16: "h", torch.int32: "i", torch.int64: "q", torch.bool: "?"}  # fmt: skip


@settings(max_examples=40, deadline=None)
@given(dtype=st.sampled_from(list(STRUCT)), values=st.lists(st.integers(-100, 100), min_size=0, max_size=12))
def test_the_data_is_the_little_endian_bytes_struct_writes(dtype, values):
    tensor = torch.tensor(values, dtype=torch.int64).to(dtype)
    stored = encode(tensor)
    assert stored["byteorder"] == "little" and stored["dtype"] == str(dtype).removeprefix("torch.")
    python = [
        bool(v) if dtype == torch.bool else (float(v) if dtype.is_floating_point else int(v)) for v in tensor.tolist()
    ]
    assert base64.b64decode(stored["data"]) == struct.pack(f"<{len(python)}{STRUCT[dtype]}", *python)
    assert torch.equal(decode(json.loads(json.dumps(stored))), tensor)


def test_bfloat16_is_stored_as_the_upper_half_of_float32():
    values = torch.tensor([1.0, -2.5, 3.0e38, math.inf], dtype=torch.bfloat16)
    raw = base64.b64decode(encode(values)["data"])
    upper = [struct.pack("<f", v)[2:] for v in values.float().tolist()]
    assert raw == b"".join(upper)


def test_old_number_list_files_still_load():
    old = {"__type__": "tensor", "dtype": "float32", "shape": [2, 2], "data": [1.5, "nan", "-inf", 2.0], "id": 0}
    back = decode(old)
    assert back.dtype == torch.float32 and back.shape == (2, 2)
    assert back[0, 0] == 1.5 and math.isnan(back[0, 1]) and back[1, 0] == -math.inf
    cplx = {"__type__": "tensor", "dtype": "complex64", "shape": [1], "data": [1.0, 2.0], "id": 1}
    assert decode(cplx) == torch.tensor([1 + 2j], dtype=torch.complex64)


def test_base64_is_smaller_than_the_number_lists_it_replaces():
    tensor = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    listed = json.dumps(tensor.flatten().tolist())
    assert len(json.dumps(encode(tensor))) < len(listed) / 2


BAD = [
    ({"dtype": "float128"}, "unknown tensor dtype 'float128'"),
    ({"dtype": 7}, "unknown tensor dtype 7"),
    ({"shape": [3]}, "holds 16 bytes, but shape [3] of float32 needs 12"),
    ({"shape": [2, -2]}, "is not a list of sizes"),
    ({"shape": "2,2"}, "is not a list of sizes"),
    ({"data": "not base64!"}, "not valid base64"),
    ({"data": 5}, "not base64 text or a list of numbers"),
    ({"data": [1.0, 2.0, 3.0]}, "holds 3 numbers, but shape [2, 2] needs 4"),
    ({"data": [1.0, 2.0, "x", 3.0]}, "not a number"),
]


@pytest.mark.parametrize(("change", "message"), BAD, ids=[m for _, m in BAD])
def test_malformed_tensors_are_refused_in_one_line(change, message):
    stored = {**encode(torch.ones(2, 2)), **change}
    with pytest.raises(StoredDataError) as refused:
        decode(stored)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_a_bool_tensor_holds_only_zero_and_one_bytes():
    stored = encode(torch.tensor([True, False]))
    stored["data"] = base64.b64encode(bytes([1, 2])).decode()
    with pytest.raises(StoredDataError, match="other than 0 and 1"):
        decode(stored)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.complex64])
def test_one_element_sliced_from_a_wider_tensor_round_trips(dtype):
    """A one-element view keeps its parent's stride (here 12), which a byte view refuses; a one-layer model's
    per-layer curves are such slices."""
    parent = (torch.arange(36, dtype=torch.float64).reshape(3, 12) + 0.5).to(dtype)
    for view in (parent[:1, 5], parent[2:, 7:8], parent[1, 3]):
        back = decode(json.loads(json.dumps(encode(view))))
        assert back.dtype == view.dtype and back.shape == view.shape and torch.equal(back, view)
