"""Loads that check what they read: files generated from a real analysis, tampered field by field
(property-based over the tensors and the corruptions), are refused in one line that names the file
and the field; untampered files load; truncated files name the file."""

from __future__ import annotations

import copy
import functools
import json
import random
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lens_squash.core.codec import record_type
from lens_squash.core.stored import tensor_annotations

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@functools.cache
def _stored() -> dict:
    """A real analysis (tiny model, exact Jacobian) as the light dict the CLI writes."""
    from lens_squash.edge.models import tiny_model
    from lens_squash.experiments.analysis import analyze

    model = tiny_model(n_layers=2, n_heads=2, d_model=16, d_vocab=32, dtype=torch.float64, seed=1)
    analysis = analyze(model, torch.tensor([1, 5, 9, 3, 7, 2, 8]), variants=["paper", "rollout", "certified"])
    return json.loads(json.dumps(analysis.to_dict(heavy=False), allow_nan=False))


def _tensors(value, record=None, field=None, path=()):
    """``(path, record class name, field name)`` of every stored tensor (not references) in ``value``."""
    if isinstance(value, dict):
        if value.get("__type__") == "tensor":
            yield path, record, field
            return
        inner = value.get("__record__", record)
        for key, item in value.items():
            yield from _tensors(item, inner, key if "__record__" in value else field, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _tensors(item, record, field, (*path, i))


@functools.cache
def _all_tensors() -> list:
    return sorted(_tensors(_stored()), key=str)  # built on first use: collection needs no model (TL4)


def _at(data, path):
    for key in path:
        data = data[key]
    return data


def _load(data, tmp_path) -> str:
    from lens_squash.experiments.analysis import Analysis

    path = tmp_path / "results.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError) as refused:
        Analysis.load(path)
    message = str(refused.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    return message


def test_the_untampered_file_loads(tmp_path):
    from lens_squash.experiments.analysis import Analysis

    (tmp_path / "results.json").write_text(json.dumps(_stored()))
    loaded = Analysis.load(tmp_path / "results.json")
    assert loaded.trace.n_tokens == 7 and len(_all_tensors()) >= 20 and len(_bound()) >= 3


CORRUPTIONS = ["grow", "shrink", "drop_bytes", "unknown_dtype", "other_width", "int_for_float"]


@FAST
@given(pick=st.data(), corruption=st.sampled_from(CORRUPTIONS))
def test_a_tampered_tensor_is_refused_naming_the_file_and_the_field(tmp_path, pick, corruption):
    path, record, field = pick.draw(st.sampled_from(_all_tensors()), label="tensor")
    data = copy.deepcopy(_stored())
    stored = _at(data, path)
    shape = stored["shape"]
    if corruption in ("grow", "shrink"):
        axis = len(shape) - 1
        if not shape or (corruption == "shrink" and shape[axis] == 0):
            return
        stored["shape"] = [*shape[:axis], shape[axis] + (1 if corruption == "grow" else -1)]
    elif corruption == "drop_bytes":
        stored["data"] = stored["data"][:-4]
    elif corruption == "unknown_dtype":
        stored["dtype"] = "float128"
    elif corruption == "other_width":  # same numbers of entries, the wrong number of bytes
        stored["dtype"] = {"float64": "float32", "float32": "float64"}.get(stored["dtype"], "int16")
    else:  # the same bytes, read as another kind of number
        stored["dtype"] = {"float64": "int64", "float32": "int32", "int64": "float64"}.get(stored["dtype"], "float64")
    message = _load(data, tmp_path)
    assert f"{record}." in message, message


def _shared_dims(record: str, field: str, data_record: dict) -> bool:
    """Whether every named dim of ``field`` is also bound by two other stored fields of its record."""
    annotations = tensor_annotations(record_type(record))
    if field not in annotations:
        return False
    present = [f for f in annotations if f != field and isinstance(data_record.get(f), dict)]
    names = [getattr(d, "name", None) for d in annotations[field].dims]
    counts = {n: sum(n in [getattr(d, "name", None) for d in annotations[f].dims] for f in present) for n in names}
    return bool(names) and all(n is not None and counts[n] >= 2 for n in names)


@functools.cache
def _bound() -> list:
    """Tensors of two or more distinct sizes whose every dimension two other fields of the record bind."""
    return [
        (path, record, field)
        for path, record, field in _all_tensors()
        if path[-1] == field
        and _shared_dims(record, field, _at(_stored(), path[:-1]))
        and len(set(_at(_stored(), path)["shape"])) > 1
    ]


@FAST
@given(pick=st.data(), seed=st.integers(0, 2**16))
def test_a_shape_permuted_with_its_bytes_intact_is_refused_where_other_fields_bind_its_dims(tmp_path, pick, seed):
    """The issue's case: ``ln1_scale`` written (46, 2) instead of (2, 46) has the right number of bytes."""
    path, record, field = pick.draw(st.sampled_from(_bound()), label="tensor")
    data = copy.deepcopy(_stored())
    stored = _at(data, path)
    permuted = list(stored["shape"])
    while permuted == stored["shape"]:
        random.Random(seed).shuffle(permuted)
        seed += 1
    stored["shape"] = permuted
    message = _load(data, tmp_path)
    assert f"{record}." in message and "expected (" in message, message


def test_the_issue_s_swapped_ln1_scale_names_field_and_both_shapes(tmp_path):
    data = copy.deepcopy(_stored())
    data["trace"]["ln1_scale"]["shape"] = data["trace"]["ln1_scale"]["shape"][::-1]
    message = _load(data, tmp_path)
    assert "Trace.ln1_scale has shape (7, 2), expected (layer=2, pos=7)" in message, message


@FAST
@given(fraction=st.floats(0.0, 0.999))
def test_a_truncated_file_is_refused_naming_the_file(tmp_path, fraction):
    text = json.dumps(_stored())
    cut = text[: int(len(text) * fraction)]
    path = Path(tmp_path) / "cut.json"
    path.write_text(cut)
    from lens_squash.experiments.analysis import Analysis

    with pytest.raises(ValueError) as refused:
        Analysis.load(path)
    assert str(refused.value).startswith(f"{path} is not valid JSON") and "\n" not in str(refused.value)


@FAST
@given(seed=st.integers(0, 2**32))
def test_random_structural_damage_is_refused_in_one_line_or_loads(tmp_path, seed):
    """Delete or retype one random value anywhere in the file: a one-line ValueError naming the file,
    never another exception (a traceback at the command line)."""
    from lens_squash.experiments.analysis import Analysis

    data = copy.deepcopy(_stored())
    rng = random.Random(seed)
    spots = []

    def walk(value, parent, key):
        spots.append((parent, key))
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for k, v in items:
            walk(v, value, k)

    walk(data, None, None)
    parent, key = rng.choice(spots[1:])
    if isinstance(parent, dict) and rng.random() < 0.5:
        del parent[key]
    else:
        parent[key] = rng.choice([None, 3, "x", [], {}, {"__type__": "ref", "id": 999}, {"__record__": "Nope"}])
    path = tmp_path / "damaged.json"
    path.write_text(json.dumps(data))
    try:
        Analysis.load(path)
    except ValueError as err:
        assert str(err).startswith(f"{path}") and "\n" not in str(err), err
