"""Per-layer metrics declared with ``@layer_metric``: computed by the one per-layer pipeline for stored
and streamed traces alike, carried onto the analysis's SinkReport, saved, loaded and drawn; with none
registered, nothing saved or drawn changes."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import textwrap

import pytest
import torch

from lens_squash.algebra import attention_stream_metrics as registry
from lens_squash.algebra.attention_stream import summarize_attention
from lens_squash.algebra.attention_stream_metrics import (
    LayerMetric,
    discover_layer_metrics,
    layer_metric,
    register_layer_metric,
    unregister_layer_metric,
)
from lens_squash.algebra.sinks import SinkReport
from lens_squash.core.codec import StoredDataError
from lens_squash.edge.models import TINY_MODEL, load_model
from lens_squash.edge.trace import trace
from lens_squash.experiments.analysis import Analysis, analyze

from ..reference import assert_json_carries

PROMPT = "The quick brown fox jumps over the lazy dog because it can"


def _diagonal_reference(patterns: torch.Tensor) -> torch.Tensor:
    """Each layer's mean attention of a query on itself, over heads and queries, from the whole stack."""
    return patterns.diagonal(dim1=-2, dim2=-1).to(torch.float64).mean(dim=(1, 2))


@pytest.fixture()
def diagonal_mass():
    """A metric declared here, in the test, and removed afterwards."""

    @layer_metric("diagonal_mass", axis="mass on itself", summary="mean attention a query pays to itself", log=True)
    def diagonal_mass(layer):
        return layer.diagonal(dim1=-2, dim2=-1).to(torch.float64).mean()

    yield diagonal_mass
    unregister_layer_metric("diagonal_mass")


@pytest.fixture(scope="module")
def model():
    return load_model(TINY_MODEL, dtype=torch.float64, n_ctx=64)


def _patterns(n: int = 9, layers: int = 3, heads: int = 2) -> torch.Tensor:
    scores = torch.randn(layers, heads, n, n, dtype=torch.float64)
    return scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf).softmax(-1)


def test_a_registered_metric_is_computed_for_stored_and_streamed_traces_alike(model, diagonal_mass):
    stored = trace(model, PROMPT, keep_patterns=True)
    streamed = trace(model, PROMPT, keep_patterns=False)
    assert stored.patterns is not None and streamed.patterns is None
    from_stored = stored.attention_summary().metrics["diagonal_mass"]
    from_streamed = streamed.attention_summary().metrics["diagonal_mass"]
    assert from_stored.dtype == torch.float64 and from_stored.shape == (model.cfg.n_layers,)
    assert torch.equal(from_stored, from_streamed)  # the same layer tensors through the same accumulator
    torch.testing.assert_close(from_stored, _diagonal_reference(stored.patterns), rtol=1e-12, atol=0)


def test_the_analysis_saves_loads_and_draws_the_metric(model, diagonal_mass, tmp_path):
    plain_sinks = _without_metric(lambda: analyze(model, PROMPT, jacobian_mode=None, keep_patterns=True).sinks)
    analysis = analyze(model, PROMPT, jacobian_mode=None, keep_patterns=True)
    values = analysis.sinks.metrics["diagonal_mass"]
    torch.testing.assert_close(values, _diagonal_reference(analysis.trace.patterns), rtol=1e-12, atol=0)
    assert set(analysis.sinks.curves()) == set(plain_sinks.curves()) | {"diagonal_mass"}
    # every other number of the report is the one computed without the metric
    assert _fields_but(analysis.sinks, "metrics") == _fields_but(plain_sinks, "metrics")

    assert_json_carries(analysis.sinks)  # every field written, and loaded back bit for bit
    assert_json_carries(analysis.trace.attention_summary())
    loaded = Analysis.load(analysis.save(tmp_path / "analysis.json"))
    assert torch.equal(loaded.sinks.metrics["diagonal_mass"], values)
    assert torch.equal(loaded.trace.attention_summary().metrics["diagonal_mass"], values)

    figure = analysis.plot("sinks")
    panel = next(t for t in figure.data if t.name == "diagonal_mass")
    assert list(panel.y) == values.tolist()
    assert "mean attention a query pays to itself" in [a.text for a in figure.layout.annotations]
    assert figure.layout[f"yaxis{len(figure.data)}"].type == "log"  # log=True: the last panel's axis
    plain = plain_sinks.plot("curves")
    for before, after in zip(plain.data, figure.data, strict=False):  # the built-in panels first, unchanged
        assert (before.name, list(before.y)) == (after.name, list(after.y))
    assert len(figure.data) == len(plain.data) + 1


def _without_metric(build):
    spec = registry._REGISTRY.pop("diagonal_mass")
    try:
        return build()
    finally:
        register_layer_metric(spec)


def _fields_but(report: SinkReport, *skipped: str) -> str:
    data = report.to_dict()
    data.pop("provenance")  # the creation time differs
    return json.dumps({k: v for k, v in data.items() if k not in skipped})


def test_without_metrics_no_file_gains_a_key():
    summary = summarize_attention(_patterns(), spectral_atol=None)
    assert summary.metrics == {}
    assert "metrics" not in summary.to_dict()
    assert type(summary).from_dict(summary.to_dict()).metrics == {}


def test_a_metric_declared_in_a_plugin_module_is_discovered_and_computed(tmp_path, monkeypatch):
    package = tmp_path / "plugin_metrics_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "maxima.py").write_text(
        textwrap.dedent(
            """
            from lens_squash.algebra.attention_stream_metrics import layer_metric

            @layer_metric("max_entry", axis="max A", summary="largest attention entry")
            def max_entry(layer):
                return layer.max()
            """
        )
    )
    (package / "other.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert discover_layer_metrics("plugin_metrics_pkg") == ("plugin_metrics_pkg.maxima",)
        assert "plugin_metrics_pkg.other" not in sys.modules  # only declaring modules are imported
        patterns = _patterns()
        metrics = summarize_attention(patterns, spectral_atol=None).metrics
        torch.testing.assert_close(metrics["max_entry"], patterns.amax(dim=(1, 2, 3)), rtol=0, atol=0)
    finally:
        unregister_layer_metric("max_entry")
        registry._DISCOVERED.pop("plugin_metrics_pkg", None)
        for name in [m for m in sys.modules if m.startswith("plugin_metrics_pkg")]:
            del sys.modules[name]


def test_a_metric_that_is_not_one_number_per_layer_is_refused_naming_it():
    register_layer_metric(LayerMetric("per_head", lambda layer: layer[:, 0, 0], axis="a", summary="s"))
    try:
        with pytest.raises(ValueError, match="'per_head' returned shape"):
            summarize_attention(_patterns(), spectral_atol=None)
    finally:
        unregister_layer_metric("per_head")


def test_names_are_refused_when_taken_or_not_identifiers(diagonal_mass):
    with pytest.raises(ValueError, match="already registered"):
        layer_metric("diagonal_mass", axis="a", summary="s")(lambda layer: layer.sum())
    with pytest.raises(ValueError, match="identifier"):
        LayerMetric("two words", lambda layer: 0.0, axis="a", summary="s")
    with pytest.raises(KeyError, match="no layer metric"):
        unregister_layer_metric("never_registered")


def test_a_report_refuses_a_metric_named_like_a_field_or_of_the_wrong_length(model, diagonal_mass):
    sinks = analyze(model, PROMPT, jacobian_mode=None, keep_patterns=True).sinks
    data = sinks.to_dict()
    data["metrics"]["mixing"] = data["metrics"].pop("diagonal_mass")  # a built-in curve's name: two "mixing" panels
    with pytest.raises(StoredDataError, match="no field has"):
        SinkReport.from_dict(data)
    too_long = torch.zeros(sinks.n_layers + 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="expected a float tensor of"):
        dataclasses.replace(sinks, metrics={"diagonal_mass": too_long})
