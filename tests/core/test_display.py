"""Results print as one short line of shapes and scalars; the HTML view stays the rich one."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil

import pandas as pd
import torch

import lens_squash
from lens_squash.core.display import compact_repr, summarize_value
from lens_squash.core.results import Record
from lens_squash.edge.jacobian import jacobian
from lens_squash.edge.models import tiny_model
from lens_squash.edge.trace import trace


def _result_classes():
    for info in pkgutil.walk_packages(lens_squash.__path__, "lens_squash."):
        if info.ispkg or info.name.rsplit(".", 1)[1].startswith("_"):
            continue
        module = importlib.import_module(info.name)
        for name, cls in vars(module).items():
            if (
                inspect.isclass(cls)
                and cls.__module__ == module.__name__
                and "_repr_html_" in vars(cls)
                and cls is not Record
            ):
                yield name, cls


def test_summaries_say_what_a_value_is_without_its_contents():
    assert summarize_value(torch.zeros(30, 9, 89, 89)) == "float32[30, 9, 89, 89]"
    assert summarize_value(torch.tensor(0.123456, dtype=torch.float64)) == "0.1235"
    assert summarize_value(pd.DataFrame({"a": [1, 2, 3], "b": [4, 5, 6]})) == "DataFrame[3×2]"
    assert summarize_value({"model": "x", "dtype": "float32"}) == "{2 keys}"
    assert summarize_value((1, 2)) == "(1, 2)" and summarize_value(tuple(range(89))) == "(89 items)"
    assert summarize_value("x" * 100).endswith("…'") and len(summarize_value("x" * 100)) <= 42
    assert summarize_value(2.0 / 3.0) == "0.6667" and summarize_value(None) == "None"


def test_every_result_class_prints_compactly():
    classes = dict(_result_classes())
    assert len(classes) >= 20
    for name, cls in classes.items():
        if not issubclass(cls, Record):  # an HTML view (AttentionView, ReportPage): its own one-line repr
            assert "__repr__" in vars(cls), f"{name} renders HTML but prints as an object address"
            continue
        assert dataclasses.is_dataclass(cls), name
        assert vars(cls)["__repr__"] is compact_repr, f"{name} prints every tensor"


def test_a_trace_and_a_jacobian_print_in_a_line_not_kilobytes():
    model = tiny_model(n_layers=2, n_heads=2, d_model=16, d_vocab=40, dtype=torch.float64, seed=0)
    tokens = torch.arange(1, 30)
    traced, jac = trace(model, tokens), jacobian(model, tokens)
    for result in (traced, jac):
        text = repr(result)
        default = dataclasses.fields(result)  # what the dataclass repr would have walked through
        assert text.startswith(type(result).__name__ + "(") and len(text) < 1000, text
        assert "tensor(" not in text and all(f"{f.name}=" in text for f in default if f.repr)
    assert "patterns=float64[2, 2, 29, 29]" in repr(traced)
