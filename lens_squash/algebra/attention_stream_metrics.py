"""Per-layer metrics declared where they are computed, folded in by the one per-layer pipeline.

A per-layer metric is a pure function of one layer's attention patterns ``[head, query_pos, key_pos]``
returning one number. Declared with :func:`layer_metric` beside its arithmetic::

    @layer_metric("diagonal_mass", axis="mass on itself", summary="mean attention a query pays to itself")
    def diagonal_mass(layer):
        return layer.diagonal(dim1=-2, dim2=-1).to(torch.float64).mean()

it is computed by :class:`~lens_squash.algebra.attention_stream.AttentionStream` for every layer (the
stored layers of a whole-stack trace replayed, or each layer during a streamed pass: the same tensor,
so the same number), kept in ``AttentionSummary.metrics``, copied by
:func:`~lens_squash.algebra.sinks.sink_report` onto ``SinkReport.metrics`` (saved and loaded with the
analysis) and drawn as a panel of the sinks figure, titled by ``axis`` and ``summary``.

A metric declared in a module of :mod:`lens_squash.algebra` is found by reading the sources (a line
starting ``@layer_metric(``) and imported when the first stream starts, whatever was imported before;
a plugin's module registers its metrics when imported, so a plugin imports it (or calls
:func:`discover_layer_metrics` on its package) before tracing.

The built-in curves (first-token attention, mixing, rollout mass, τ) stay named fields of the summary
and the report; the registry is for additions. With none registered the pipeline loops over an empty
tuple and a saved result has no ``metrics`` key: files are byte-identical to those written without
the registry (:class:`WritesMetricsIfAny`).
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = [
    "WRITTEN_IF_ANY",
    "LayerMetric",
    "WritesMetricsIfAny",
    "active_metrics",
    "discover_layer_metrics",
    "layer_metric",
    "metric_labels",
    "metrics_field",
    "register_layer_metric",
    "unregister_layer_metric",
]

#: field metadata: the field is left out of ``to_dict`` while it is empty (see :class:`WritesMetricsIfAny`)
WRITTEN_IF_ANY = "written_if_any"
_REGISTRY: dict[str, LayerMetric] = {}
_LOCK = threading.Lock()
#: package -> the modules of it imported because they declare metrics
_DISCOVERED: dict[str, tuple[str, ...]] = {}
#: a declaration in an algebra source: ``@layer_metric(`` or ``@module.layer_metric(`` at a line's start
_DECLARATION = re.compile(r"^@(?:\w+\.)*layer_metric\(", re.MULTILINE)


@dataclass(frozen=True)
class LayerMetric:
    """One per-layer metric: ``compute(layer) -> one number``, and how a figure labels it."""

    name: str
    compute: Callable[[Float[Tensor, "head query_pos key_pos"]], Any]
    #: the y-axis title of its panel
    axis: str
    #: what it measures, in a few words (its panel's title and the figure caption)
    summary: str
    #: a log y axis (a metric spanning orders of magnitude)
    log: bool = False

    def __post_init__(self):
        if not (isinstance(self.name, str) and self.name.isidentifier()):
            raise ValueError(f"a layer metric's name is a Python identifier, got {self.name!r}")
        if not callable(self.compute):
            raise TypeError(f"layer metric {self.name!r}: compute must be callable, got {type(self.compute).__name__}")

    def value(self, layer: Float[Tensor, "head query_pos key_pos"]) -> Float[Tensor, ""]:
        """This layer's number as a 0-d float64 tensor; a ValueError unless ``compute`` gave one number."""
        out = torch.as_tensor(self.compute(layer)).detach()
        if out.numel() != 1 or out.ndim > 1:
            raise ValueError(
                f"layer metric {self.name!r} returned shape {tuple(out.shape)}; return one number per layer "
                "(reduce over heads and positions inside the metric)"
            )
        if out.is_complex() or out.dtype == torch.bool:
            raise ValueError(f"layer metric {self.name!r} returned a {out.dtype} value; return a real number")
        return out.reshape(()).to("cpu", torch.float64)


def register_layer_metric(spec: LayerMetric, *, replace: bool = False) -> LayerMetric:
    """Add ``spec`` to the registry (a second metric of the same name is an error unless ``replace``)."""
    if not isinstance(spec, LayerMetric):
        raise TypeError(f"register a LayerMetric, got {type(spec).__name__}")
    with _LOCK:
        if spec.name in _REGISTRY and not replace and _REGISTRY[spec.name].compute is not spec.compute:
            raise ValueError(f"a layer metric {spec.name!r} is already registered; rename one or pass replace=True")
        _REGISTRY[spec.name] = spec
    return spec


def unregister_layer_metric(name: str) -> None:
    """Remove metric ``name`` (a plugin switching it off, a test cleaning up); unknown names are an error."""
    with _LOCK:
        if name not in _REGISTRY:
            raise KeyError(f"no layer metric {name!r}; registered: {sorted(_REGISTRY) or 'none'}")
        del _REGISTRY[name]


def layer_metric(name: str, *, axis: str, summary: str, log: bool = False) -> Callable[[Callable], Callable]:
    """Declare the decorated ``fn(layer) -> number`` as per-layer metric ``name`` (see the module
    docstring). ``fn`` gets the layer as traced (model dtype, on the CPU) and must not modify it: in a
    whole-stack trace it is the stored tensor. Returns ``fn`` unchanged."""

    def declare(fn: Callable) -> Callable:
        register_layer_metric(LayerMetric(name, fn, axis=axis, summary=summary, log=log))
        return fn

    return declare


def discover_layer_metrics(package: str) -> tuple[str, ...]:
    """Import every module of ``package`` whose source declares a layer metric (a line starting
    ``@layer_metric(``), once; returns the modules imported. :func:`active_metrics` does this for
    :mod:`lens_squash.algebra`; a plugin package may call it for its own."""
    if package in _DISCOVERED:
        return _DISCOVERED[package]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"{package!r} is not an importable package; pass a package name such as 'my_plugin'")
    here = Path(__file__).resolve()
    modules = []
    for directory in spec.submodule_search_locations:
        for path in sorted(Path(directory).glob("*.py")):
            if path.resolve() != here and _DECLARATION.search(path.read_text(encoding="utf-8")):
                modules.append(package if path.stem == "__init__" else f"{package}.{path.stem}")
    for module in modules:
        importlib.import_module(module)
    _DISCOVERED[package] = tuple(modules)
    return _DISCOVERED[package]


def active_metrics() -> tuple[LayerMetric, ...]:
    """The registered metrics, in registration order, once the algebra modules declaring one are imported."""
    discover_layer_metrics(__package__)
    with _LOCK:
        return tuple(_REGISTRY.values())


def metric_labels() -> dict[str, tuple[str, str, bool]]:
    """``{name: (axis, summary, log)}`` of the registered metrics, for a figure's panels."""
    return {m.name: (m.axis, m.summary, m.log) for m in active_metrics()}


def metrics_field():
    """The ``metrics`` field of a record deriving :class:`WritesMetricsIfAny`: ``{name: per-layer
    tensor}``, empty by default, left out of the repr and, while empty, of the saved file."""
    return field(default_factory=dict, repr=False, metadata={WRITTEN_IF_ANY: True})


class WritesMetricsIfAny:
    """Mixin (before ``Record``): a field marked :data:`WRITTEN_IF_ANY` is written only when it holds
    something, so a result without extra metrics saves exactly as before the registry existed
    (``from_dict`` fills the field's default, an empty mapping, when it is absent)."""

    def _encode_fields(self, enc) -> dict[str, Any]:
        out = super()._encode_fields(enc)
        for f in fields(self):
            if f.metadata.get(WRITTEN_IF_ANY) and not getattr(self, f.name):
                out.pop(f.name, None)
        return out
