"""The result contract's pieces on hand-made values: exact JSON, figure registry, provenance names."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pytest
import torch

from lens_squash.core import results
from lens_squash.core.display import compact_repr
from lens_squash.core.results import (
    Record,
    Result,
    UnknownFigureKindError,
    decode,
    encode,
    heavy,
    unserialised,
)


def _through_json(value, **kwargs):
    return decode(json.loads(json.dumps(encode(value, **kwargs), allow_nan=False)))


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern: equal bits, equal tensor (signed zeros and NaNs included)."""
    view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(view)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_float_tensors_come_back_bit_for_bit_with_their_dtype(dtype):
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(3, 4, 5, generator=generator, dtype=torch.float64).to(dtype) * 1e3
    values[0, 0, :4] = torch.tensor([float("inf"), -float("inf"), -0.0, torch.finfo(dtype).tiny])
    values[1, 1, 1] = float("nan")
    back = _through_json(values)
    assert back.dtype == dtype and back.shape == values.shape
    same = _bits(back) == _bits(values)
    nan = torch.isnan(values)
    assert bool(same[~nan].all()) and bool(torch.isnan(back)[nan].all()) and not bool(torch.isnan(back)[~nan].any())


def test_integer_bool_and_complex_tensors_and_arrays_keep_type_and_values():
    ints = torch.tensor([[-(2**62), 3], [0, 2**40]], dtype=torch.int64)
    flags = torch.tensor([True, False, True])
    cplx = torch.complex(torch.tensor([1.5, -2.0]), torch.tensor([0.25, 3.0]))
    array = np.linspace(0, 1, 7, dtype=np.float32).reshape(7, 1)
    back = _through_json({"ints": ints, "flags": flags, "cplx": cplx, "array": array, "scalar": np.int16(-3)})
    assert torch.equal(back["ints"], ints) and back["ints"].dtype == torch.int64
    assert torch.equal(back["flags"], flags) and torch.equal(back["cplx"], cplx) and back["cplx"].dtype == cplx.dtype
    assert back["array"].dtype == np.float32 and np.array_equal(back["array"], array)
    assert type(back["scalar"]) is np.int16 and back["scalar"] == -3


def test_containers_non_finite_floats_and_shared_tensors():
    shared = torch.arange(4.0)
    value = {
        "a": (1, (2.5, None)),
        3: "int key",
        (1, 2): {"x"},
        "nan": float("nan"),
        "inf": -float("inf"),
        "one": shared,
        "two": shared,
        "dtype": torch.bfloat16,
    }
    back = _through_json(value)
    assert back["a"] == (1, (2.5, None)) and back[3] == "int key" and back[(1, 2)] == {"x"}
    assert np.isnan(back["nan"]) and back["inf"] == -float("inf") and back["dtype"] is torch.bfloat16
    assert back["one"] is back["two"] and torch.equal(back["one"], shared)  # written once, shared again


def test_a_frame_comes_back_equal_with_its_dtypes_and_index():
    frame = pd.DataFrame(
        {
            "n": [1, 2, 3],
            "x": [0.5, float("nan"), 1e-300],
            "name": ["a", None, "c"],
            "count": pd.array([1, None, 3], dtype="Int64"),
            "ok": [True, False, True],
        }
    ).set_index(pd.Index([10, 20, 30], name="row"))
    back = _through_json(frame)
    pd.testing.assert_frame_equal(back, frame, check_exact=True)
    plain = frame.reset_index(drop=True)
    assert isinstance(_through_json(plain).index, pd.RangeIndex)


def test_values_json_cannot_hold_are_refused_by_name():
    with pytest.raises(TypeError, match="value.*object"):
        encode({"model": object()})


@dataclass(frozen=True, eq=False)
class _Toy(Result):
    values: torch.Tensor
    label: str
    big: torch.Tensor | None = heavy(default=None)
    hook: object = unserialised("a callable", default=None)
    provenance: dict = field(default_factory=dict)

    __repr__ = compact_repr


@dataclass(frozen=True)
class _Part(Record):
    weight: float
    positions: tuple[int, ...]

    __repr__ = compact_repr


@dataclass(frozen=True, eq=False)
class _Holder(Result):
    parts: tuple[_Part, ...]
    provenance: dict = field(default_factory=dict)

    __repr__ = compact_repr


def test_a_record_round_trips_through_a_file_and_drops_what_it_must(tmp_path):
    toy = _Toy(torch.tensor([1.0, 2.0]), "x", big=torch.ones(3), hook=print, provenance={"model": "m"})
    data = toy.to_dict()
    assert data["__dropped__"] == {"hook": "a callable"} and "hook" not in data
    back = _Toy.load(toy.save(tmp_path / "toy.json"))
    assert torch.equal(back.values, toy.values) and torch.equal(back.big, toy.big) and back.hook is None
    assert back.label == "x" and back.provenance == {"model": "m"}
    light = _Toy.from_dict(toy.to_dict(heavy=False))
    assert light.big is None and light.provenance["dropped"] == ["big"]
    nested = _Holder((_Part(0.5, (0, 1)), _Part(0.25, (1, 1))))
    again = Result.from_dict(json.loads(json.dumps(nested.to_dict(), allow_nan=False)))
    assert type(again) is _Holder and again.parts == nested.parts and type(again.parts) is tuple


def test_from_dict_refuses_another_class_and_unknown_fields():
    toy = _Toy(torch.zeros(1), "x").to_dict()
    with pytest.raises(ValueError, match="not a _Holder"):
        _Holder.from_dict(toy)
    with pytest.raises(ValueError, match="no fields"):
        _Toy.from_dict({**toy, "extra": 1})


def test_figures_dispatch_by_kind_with_a_typed_error(monkeypatch):
    monkeypatch.setattr(results, "_plugin_loaded", True)  # no views needed for a toy class
    monkeypatch.setattr(results, "_FIGURES", {})
    monkeypatch.setattr(results, "_DEFAULT_KIND", {})
    results.register_figure(_Toy, "first")(lambda r, **kw: ("first", r.label, kw))
    results.register_figure(_Toy, "second")(lambda r, **kw: ("second", r.label, kw))
    toy = _Toy(torch.zeros(1), "x")
    assert toy.plot() == ("first", "x", {}) and toy.plot("second", a=1) == ("second", "x", {"a": 1})
    with pytest.raises(UnknownFigureKindError, match="'first', 'second'") as info:
        toy.plot("third")
    assert info.value.kinds == ("first", "second")
    with pytest.raises(ValueError, match="already has"):
        results.register_figure(_Toy, "first")(lambda r: None)


def test_a_marked_default_wins_over_registration_order_once_per_class(monkeypatch):
    monkeypatch.setattr(results, "_plugin_loaded", True)
    for name, empty in (("_FIGURES", {}), ("_DEFAULT_KIND", {}), ("_MARKED_DEFAULT", set()), ("_HTML_KINDS", set())):
        monkeypatch.setattr(results, name, empty)
    results.register_figure(_Toy, "early")(lambda r: "early")
    results.register_figure(_Toy, "marked", default=True)(lambda r: "marked")
    results.register_figure(_Toy, "late")(lambda r: "late")  # registered after: not the default
    toy = _Toy(torch.zeros(1), "x")
    assert toy.plot() == "marked" and results.figure_kinds(_Toy) == ("marked", "early", "late")
    with pytest.raises(ValueError, match="_Toy already has a default figure kind 'marked'"):
        results.register_figure(_Toy, "other", default=True)(lambda r: None)
    assert "other" not in results.figure_kinds(_Toy)  # the refused one registered nothing
    results.register_figure(_Toy, "view", html=True)(lambda r: "<div/>")
    assert results.html_figure_kinds() == {"view"}


def test_tables_refuse_clearly():
    toy = _Toy(torch.zeros(1), "x", provenance={"model": "m"})
    with pytest.raises(TypeError, match="_Toy is not a table"):
        toy.to_frame()
