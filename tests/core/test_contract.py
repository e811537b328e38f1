"""Every record and result in lens_squash keeps one contract, checked on real instances of a tiny model.

Records (every ``core.results.Record`` subclass): a one-line repr, HTML, strict JSON whose
``from_dict`` gives back every field bit for bit (tensors with their dtype, frames with their dtypes,
nested records by class), and ``save``/``load`` through a file. Results add: every registered figure
kind draws a Figure with a caption and titled axes, ``to_frame`` is a DataFrame or a clear
``TypeError``, and ``provenance`` is a dict. A record class without an instance builder below fails
:func:`test_every_record_class_has_an_instance_builder`, so a class added later cannot skip this.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import json
import math
import pkgutil

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

import lens_squash
from lens_squash.core.display import compact_repr
from lens_squash.core.results import Record, Result, figure_kinds
from lens_squash.views.registry import HTML_KINDS
from lens_squash.views.style import caption_of

#: classes with a notebook view that are not stored records, and why
NOT_RECORDS = {
    "ReportSection": "a piece of a rendered page (figures and trusted HTML): written into a report, never stored",
    "ReportPage": "a rendered HTML page (Analysis.show / .report): written to a file, never stored as a result",
    "AttentionView": "a rendered HTML/JS view of a trace's patterns: shown or written, never stored as a result",
}
# not records either: ModelSpec and TaskSpec are recipes (ModelSpec.load() loads a model; a TaskSpec
# holds the functions that draw and render a task), not results


def _modules():
    for info in pkgutil.walk_packages(lens_squash.__path__, "lens_squash."):
        if info.ispkg or info.name.rsplit(".", 1)[1].startswith("_"):
            continue
        yield importlib.import_module(info.name)


def _classes() -> dict[str, type]:
    found = {}
    for module in _modules():
        for name, cls in vars(module).items():
            if inspect.isclass(cls) and cls.__module__ == module.__name__:
                found[name] = cls
    return found


CLASSES = _classes()
RECORDS = {name: cls for name, cls in CLASSES.items() if issubclass(cls, Record) and cls not in (Record, Result)}
RESULTS = {name: cls for name, cls in RECORDS.items() if issubclass(cls, Result)}
#: classes whose instance builder makes a HookedTransformer of its own (none left: the synthetic toy
#: decoders and the lab build a bridge on TransformerLens 4)
HOOKED_BUILDERS: frozenset[str] = frozenset()


def _names(classes: dict) -> list:
    return [pytest.param(n, marks=pytest.mark.hooked) if n in HOOKED_BUILDERS else n for n in sorted(classes)]


# --------------------------------------------------------------------------------------------------
# one real instance of every record, from one tiny model
# --------------------------------------------------------------------------------------------------


@functools.cache
def _model():
    from lens_squash.edge.models import TINY_MODEL, has_hooked_transformer, load_model, tiny_model

    if not has_hooked_transformer():  # TransformerLens 4: the bridge over SmolLM2's architecture in miniature
        return load_model(TINY_MODEL, backend="bridge", dtype=torch.float64, n_ctx=160)
    # rotary, RMSNorm and a real tokenizer, like SmolLM2: every experiment runs on it
    return tiny_model(
        tokenizer="smollm2",
        n_ctx=160,
        d_model=16,
        n_heads=2,
        n_layers=2,
        positional="rotary",
        norm="RMS",
        dtype=torch.float64,
        seed=2,
    )


_TOKENS = torch.tensor([1, 504, 2913, 314, 253, 1345, 28, 4007, 30, 28, 4007, 30])


@functools.cache
def _analysis():
    from lens_squash.experiments.analysis import analyze

    return analyze(_model(), _TOKENS, jacobian_mode="exact")


def _contribution_graph():
    from lens_squash.algebra.variants import path_bound

    return path_bound(_analysis().trace, "alti", model=_model()).graph


@functools.cache
def _flow():
    from lens_squash.edge.flow import flow

    return flow(_model(), _TOKENS, mode="exact", variants=("rollout", "certified"))


def _value_geometry():
    from lens_squash.edge.flow import value_geometry

    model, traced = _model(), _analysis().trace
    return value_geometry(
        traced.resid[0],
        model.blocks[0].attn.W_V,
        model.blocks[0].ln1.w,
        traced.ln1_scale[0],
        centred=False,
        frozen=False,
    )


def _flow_gradients():
    from lens_squash.edge.flow import flow_gradients

    return flow_gradients(_model(), _TOKENS, torch.eye(_model().cfg.d_model, dtype=torch.float64)[:2])


def _sink_rate():
    from lens_squash.algebra.sinks import sink_rate

    return sink_rate(_analysis().trace.patterns)


def _massive():
    from lens_squash.algebra.massive import massive_activations

    traced = _analysis().trace
    return massive_activations(traced.resid_norms, traced.first_token_resid, k=3)


def _ablation():
    from lens_squash.experiments.ablation import ablation_effect

    return ablation_effect(_model(), _TOKENS, 0, jacobian=True, n_probes=4)


def _mixing():
    from lens_squash.experiments.mixing import mixing

    return mixing(_model(), _TOKENS, 4, replacement=[42, 977], clamp_layer=0, bos=1)


@functools.cache
def _lab_grid():
    import tempfile

    from lens_squash.lab.grid import grid_configs, run_grid

    small = dict(d_model=16, n_heads=2, d_vocab=16, steps=4, eval_every=2, batch_size=4, eval_rows=4, mixing_prompts=1)
    return run_grid(tempfile.mkdtemp(prefix="lab-contract-"), grid_configs([16], [1], ["bos"], [0], **small))


def _collapse():
    from lens_squash.experiments.collapse import collapse_curve

    dtypes = ("float64", "bfloat16")  # a bridge is cast as a HookedTransformer is (model_in_dtype)
    return collapse_curve(_model(), "count_ones", [2, 5], dtypes, chat=False, open_ended=True, exact=False)


def _window_sweep():
    from lens_squash.experiments.collapse_windows import window_sweep

    return window_sweep(_model(), "count_ones", [3, 6], [None, 2], chat=False, open_ended=True)


def _pe_collapse():
    from lens_squash.experiments.synthetic import pe_collapse

    return pe_collapse([2, 4], seeds=2, d_model=8, d_vocab=16)


def _ratio_invariance():
    from lens_squash.experiments.synthetic import ratio_invariance

    return ratio_invariance(_model(), multiples=(1, 2))


def _tv_decay():
    from lens_squash.algebra.softmax_theory import tv_decay_experiment

    return tv_decay_experiment(n_max=40, perturbed=4, seeds=2, lengths=[8, 40])


def _copy_sensitivity():
    from lens_squash.experiments.task_theory import copy_sensitivity

    return copy_sensitivity(_model(), [2, 3], jacobian_mode="exact", variant="rollout")


def _count_collapse():
    from lens_squash.experiments.task_theory import count_collapse

    return count_collapse(_model(), [2, 3])


def _task_results():
    import itertools
    from unittest import mock

    from lens_squash.experiments import task_eval

    tokenizer = _model().tokenizer
    replies = itertools.cycle(
        [
            "The answer to your question is: 1",
            "**The answer to your question is: 0**",
            "no idea",
            "The final answer to your maths question is: 2",
            "The final answer to your maths question is: 5",
        ]
    )

    def canned(model, prompts, **kwargs):  # a tiny random model never answers; these replies parse (or not)
        return [torch.tensor(tokenizer.encode(next(replies)) + [tokenizer.eos_token_id]) for _ in prompts]

    with mock.patch.object(task_eval, "greedy_generate", canned):
        return task_eval.evaluate(
            _model(), ["copy_last", "count_ones"], [2, 3, 4], max_new_tokens=3, batch_size=2, progress=False
        )


def _many():
    from lens_squash.experiments.many import analyze_many

    return analyze_many(_model(), [_TOKENS[:8], _TOKENS], jacobian_mode="sketch", n_probes=4)


def _task_instance():
    from lens_squash.experiments.task_prompts import make_instance

    return make_instance("copy_alternating", 6, sample=1)


def _parsed():
    from lens_squash.experiments.answers import parse_answer

    return parse_answer("Sure. The answer to your question is: 1,024", "count")


def _attention_summary():
    from lens_squash.algebra.attention_stream import AttentionStream

    patterns = _analysis().trace.patterns
    stream = AttentionStream(patterns.shape[-1], spectral_atol=1e-4)
    for layer in patterns:
        stream.add(layer)
    return stream.finish()


BUILDERS = {
    "Trace": lambda: _analysis().trace,
    "TopK": lambda: _top_k(),
    "PathBound": lambda: _analysis().bounds["certified"],
    "PathGraph": lambda: _analysis().bounds["rollout"].graph,
    "ContributionGraph": lambda: _contribution_graph(),
    "JacobianResult": lambda: _analysis().jacobian,
    "Comparison": lambda: _analysis().comparisons["rollout"],
    "UShape": lambda: _analysis().comparisons["rollout"].truth_u,
    "SpectralReport": lambda: _analysis().spectral,
    "SinkReport": lambda: _analysis().sinks,
    "Analysis": _analysis,
    "BoundFlows": lambda: _analysis().bounds["rollout"].flows(),
    "BoundPath": lambda: _analysis().bounds["rollout"].top_paths(k=3)[1],
    "SinkRate": _sink_rate,
    "MassiveActivations": _massive,
    "SensitivityFlow": _flow,
    "FlowPaths": lambda: _flow().top_paths(k=2),
    "FlowPath": lambda: _flow().top_paths(k=2).selected(max_paths=3)[0],
    "FlowGradients": _flow_gradients,
    "ValueGeometry": _value_geometry,
    "AblationResult": _ablation,
    "MixingResult": _mixing,
    "LabRun": lambda: _lab_grid().runs[0],
    "LabGrid": _lab_grid,
    "CollapseResult": _collapse,
    "WindowSweepResult": _window_sweep,
    "PECollapseResult": _pe_collapse,
    "RatioInvarianceResult": _ratio_invariance,
    "TVDecayResult": _tv_decay,
    "CopySensitivity": _copy_sensitivity,
    "CountCollapse": _count_collapse,
    "TaskResults": _task_results,
    "TaskInstance": _task_instance,
    "ParsedAnswer": _parsed,
    "AttentionSummary": _attention_summary,
    "AttentionCheck": lambda: _analysis().trace.attention_check,
    "SpectralLayers": lambda: _attention_summary().spectral,
    "ManyAnalyses": _many,
    "RunComparison": lambda: _run_comparison(),
}


def _run_comparison():
    from lens_squash.experiments.compare_runs import compare

    return compare(_many()[0], _many()[1])


@functools.cache
def _top_k():
    from lens_squash.core.topk import TopK

    return TopK.of(_analysis().trace.last_logits, 5)


@functools.cache  # built once for every check below: records are frozen, and none of these tests edits one
def _instance(name: str):
    value = BUILDERS[name]()
    assert type(value) is RECORDS[name], f"the {name} builder made a {type(value).__name__}"
    return value


# --------------------------------------------------------------------------------------------------
# equality, field by field
# --------------------------------------------------------------------------------------------------


def _bits(t: torch.Tensor) -> torch.Tensor:
    if t.is_complex():
        t = torch.view_as_real(t)
    if t.dtype == torch.bool or not t.is_floating_point():
        return t
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_same(a, b, where: str, *, heavy: bool = True) -> None:
    """``b`` is ``a`` as stored and loaded: same types, tensors bit-equal (NaNs where NaNs were)."""
    if isinstance(a, Record):
        assert type(b) is type(a), f"{where}: {type(b).__name__} is not {type(a).__name__}"
        for f in dataclasses.fields(a):
            if not f.init or not f.metadata.get("serialise", True):
                continue
            if f.metadata.get("heavy") and not heavy:
                assert getattr(b, f.name) is None, f"{where}.{f.name} was left out, so it loads as None"
                continue
            if f.name == "provenance" and not heavy:
                continue  # a light load adds provenance["dropped"]
            if f.metadata.get("top_k") and not heavy:  # a light file keeps the top k, exactly
                kept, whole = getattr(b, f.name), getattr(a, f.name)
                top = torch.topk(whole, f.metadata["top_k"])
                assert kept.size == whole.shape[0] and torch.equal(kept.values, top.values), f"{where}.{f.name}"
                assert torch.equal(whole[kept.indices], kept.values), f"{where}.{f.name}"
                continue
            assert_same(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}", heavy=heavy)
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and b.dtype == a.dtype and b.shape == a.shape, (where, b)
        nan = (
            torch.isnan(torch.view_as_real(a) if a.is_complex() else a)
            if a.is_floating_point() or a.is_complex()
            else None
        )
        if nan is None or not bool(nan.any()):
            assert torch.equal(_bits(a), _bits(b)), where
        else:
            assert torch.equal(torch.isnan(torch.view_as_real(b) if b.is_complex() else b), nan), where
            assert torch.equal(_bits(a)[~nan], _bits(b)[~nan]), where
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype, where
        np.testing.assert_array_equal(a, b, err_msg=where)
    elif isinstance(a, pd.DataFrame):
        pd.testing.assert_frame_equal(a, b, check_exact=True, obj=where)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), (where, list(a), list(b))
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]", heavy=heavy)
    elif isinstance(a, (list, tuple)):
        assert type(b) is type(a) and len(b) == len(a), (where, type(b))
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]", heavy=heavy)
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert type(b) is type(a) and b == a, (where, a, b)


def _axes_drawn(fig: go.Figure) -> set[str]:
    """The visible layout axes some cartesian trace draws on (``xaxis``, ``yaxis2``, …)."""
    names = set()
    for trace in fig.data:
        for key in ("xaxis", "yaxis"):
            if key not in trace:  # not a cartesian trace (a table, a pie)
                continue
            ref = trace[key] or key[0]  # "x", "x2", ...
            name = f"{key[0]}axis{ref[1:]}"
            axis = fig.layout[name]
            if axis.visible is False or axis.matches:  # hidden, or shares a panel's titled axis
                continue
            names.add(name)
    return names


# --------------------------------------------------------------------------------------------------
# the contract
# --------------------------------------------------------------------------------------------------


def test_every_record_class_has_an_instance_builder():
    assert len(RECORDS) >= 25 and len(RESULTS) >= 18
    missing = sorted(set(RECORDS) - set(BUILDERS))
    assert not missing, f"record classes without an instance builder in {__name__}.BUILDERS: {missing}"
    assert not sorted(set(BUILDERS) - set(RECORDS)), "builders for classes that are no longer records"


def test_every_class_with_a_notebook_view_is_a_record():
    shown = {name for name, cls in CLASSES.items() if "_repr_html_" in vars(cls) and cls is not Record}
    assert shown, "no class renders in a notebook"
    assert sorted(shown - set(RECORDS) - set(NOT_RECORDS)) == []


@pytest.mark.parametrize("name", _names(RECORDS))
def test_repr_is_one_short_line_and_html_renders(name):
    record = _instance(name)
    assert vars(type(record)).get("__repr__") is compact_repr, f"{name} must set __repr__ = compact_repr"
    text = repr(record)
    assert text.startswith(f"{name}(") and "\n" not in text and len(text) < 1000 and "tensor(" not in text, text
    page = record._repr_html_()
    assert isinstance(page, str) and page.lstrip().startswith("<") and "</" in page


_HOSTILE = "<script>alert(1)</script>"


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.hooked) if n in HOOKED_BUILDERS else n
        for n in sorted(n for n, cls in RECORDS.items() if "str_tokens" in {f.name for f in dataclasses.fields(cls)})
    ],
)
def test_html_escapes_token_text(name):
    record = _instance(name)
    hostile = dataclasses.replace(record, str_tokens=(_HOSTILE,) * len(record.str_tokens))
    page = hostile._repr_html_()
    assert _HOSTILE not in page and "<script" not in page


@pytest.mark.parametrize("name", _names(RECORDS))
def test_json_round_trips_exactly_through_a_file(name, tmp_path):
    record = _instance(name)
    data = record.to_dict()
    text = json.dumps(data, allow_nan=False)  # strict JSON: no NaN or Infinity literals
    assert data["__record__"] == name
    assert_same(record, type(record).from_dict(json.loads(text)), name)
    assert_same(record, Record.from_dict(json.loads(text)), name)  # the file names its own class
    path = record.save(tmp_path / f"{name}.json")
    assert json.loads(path.read_text()) == json.loads(text)
    assert_same(record, type(record).load(path), name)


@pytest.mark.parametrize("name", _names(RECORDS))
def test_a_light_copy_leaves_out_only_the_heavy_fields(name):
    record = _instance(name)
    heavy = [f.name for f in dataclasses.fields(record) if f.metadata.get("heavy")]
    light = record.to_dict(heavy=False)
    assert sorted(n for n in heavy if n not in light) == sorted(heavy)
    back = type(record).from_dict(json.loads(json.dumps(light, allow_nan=False)))
    assert_same(record, back, name, heavy=False)
    if heavy and isinstance(record, Result):
        assert back.provenance["dropped"] == sorted(heavy)


@pytest.mark.parametrize("name", _names(RESULTS))
def test_every_figure_kind_draws_a_captioned_figure_with_titled_axes(name):
    result = _instance(name)
    kinds = figure_kinds(type(result))
    assert kinds, f"{name} registers no figure in lens_squash.views.registry"
    for kind in kinds:
        if kind in HTML_KINDS:  # a whole page or an HTML/JS view, not a plotly figure: tests/views/test_pages.py
            assert callable(getattr(result.plot(kind), "_repr_html_", None)), (name, kind)
            continue
        if (name, kind) in _NEEDS_ARGUMENTS:
            fig = result.plot(kind, **_NEEDS_ARGUMENTS[name, kind])
        else:
            fig = result.plot(kind)
        assert isinstance(fig, go.Figure) and fig.data, (name, kind)
        assert caption_of(fig), f"{name}.plot({kind!r}) has no caption"
        for axis in _axes_drawn(fig):
            assert fig.layout[axis].title.text, f"{name}.plot({kind!r}): {axis} has no title"
        shared = [
            fig.layout[a].matches for a in fig.layout if a.startswith(("xaxis", "yaxis")) and fig.layout[a].matches
        ]
        for ref in shared:
            assert fig.layout[f"{ref[0]}axis{ref[1:]}"].title.text, f"{name}.plot({kind!r}): shared {ref} has no title"
    assert type(result.plot()) is go.Figure


# kinds whose builder needs an argument to show something on a tiny result
_NEEDS_ARGUMENTS = {
    ("TaskResults", "prompt_types"): {"tasks": ["copy_last"]},
    ("TaskResults", "abs_error"): {"tasks": ["count_ones"]},
    ("TaskResults", "histogram"): {"tasks": ["count_ones"]},
}


@pytest.mark.parametrize("name", _names(RESULTS))
def test_tables_and_provenance(name):
    result = _instance(name)
    assert isinstance(result.provenance, dict)
    try:
        frame = result.to_frame()
    except TypeError as error:
        assert name in str(error) and "not a table" in str(error)
    else:
        assert isinstance(frame, pd.DataFrame) and len(frame) > 0


def test_results_of_a_run_carry_the_model_they_came_from():
    for name in (
        "Trace",
        "JacobianResult",
        "SensitivityFlow",
        "CollapseResult",
        "CopySensitivity",
        "AblationResult",
        "PathBound",
        "BoundFlows",
        "FlowPaths",
        "ManyAnalyses",
    ):
        assert _instance(name).provenance["model"]["n_layers"] == 2, name
    assert _instance("Analysis").provenance is _instance("Trace").provenance
