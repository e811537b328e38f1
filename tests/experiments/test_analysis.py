"""analyze() end to end, and the `lens-squash analyze` command."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lens_squash import tiny_model
from lens_squash.algebra.ranks import spearman
from lens_squash.algebra.sinks import SinkReport
from lens_squash.algebra.variants import path_bound
from lens_squash.cli import main
from lens_squash.core.records import to_jsonable
from lens_squash.edge.jacobian import jacobian
from lens_squash.experiments.ablation import AblationResult
from lens_squash.experiments.analysis import Analysis, analyze
from lens_squash.experiments.collapse import CollapseResult

from ..families import ALL, FAMILIES, REFUSED, TOKENS, build, sweep


@pytest.fixture(scope="module")
def chat_model():
    return tiny_model(
        n_layers=2,
        n_heads=2,
        d_model=32,
        tokenizer="smollm2",
        dtype=torch.float64,
        n_ctx=256,
        positional="rotary",
        norm="RMS",
        seed=3,
    )


def test_analysis_matches_its_parts(chat_model):
    result = analyze(chat_model, "Copy: 1 1 1 0", variants=("paper", "certified", "value_rownorm"))
    n = result.trace.n_tokens
    truth = jacobian(chat_model, result.trace.tokens, mode="exact").spectral
    torch.testing.assert_close(torch.tensor(result.table["jacobian_spectral"].to_numpy()), truth.double())
    for name in ("paper", "certified", "value_rownorm"):
        assert result.bounds[name].bound.shape == (n,)
        expected = spearman(path_bound(result.trace, name, model=chat_model).bound, truth)
        assert result.comparisons[name].spearman == pytest.approx(expected)
    best = result.best_variant
    assert result.comparisons[best].spearman == max(c.spearman for c in result.comparisons.values())
    assert "Analysis" in result._repr_html_()
    payload = result.to_dict()
    assert payload["best_variant"] == best and len(payload["str_tokens"]) == n


def test_analysis_without_jacobian(chat_model):
    result = analyze(chat_model, "hello there", variants=("rollout",), jacobian_mode=None)
    assert result.jacobian is None and result.comparisons == {} and result.best_variant is None
    assert float(result.spectral.rollout_mass[-1]) == pytest.approx(float(result.bounds["rollout"].bound[0]))


def test_analyze_command_writes_results_and_report(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "analyze",
            "--model",
            "tiny-random",
            "--prompt",
            "The cat sat on the <b>door</b>.",
            "--jacobian",
            "sketch",
            "--probes",
            "8",
            "--variants",
            "paper,rollout,value_rownorm",
            "--n-ctx",
            "256",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "best-ranking variant" in printed and "value_rownorm" in printed
    results = json.loads((out / "results.json").read_text())
    n = len(results["str_tokens"])
    loaded = Analysis.load(out / "results.json")  # the file is Analysis.to_dict(heavy=False) + the report's metadata
    assert loaded.trace.n_tokens == n and loaded.bounds["paper"].bound.shape == (n,)
    assert loaded.jacobian.frobenius.shape == (n,) and loaded.best_variant == results["best_variant"]
    assert loaded.trace.patterns is None and "patterns" in loaded.trace.provenance["dropped"]  # heavy: left out
    assert loaded.provenance["report"]["prompt"].endswith("</b>.")
    summary = loaded.summary().set_index("variant")
    assert summary.loc[loaded.best_variant, "spearman"] == summary["spearman"].max()
    page = (out / "report.html").read_text()
    assert "<b>door</b>" not in page and "bound vs gradient" in page


def test_analyze_command_rejects_bad_input(tmp_path, capsys):
    assert main(["analyze", "--prompt", "  ", "--raw", "--out", str(tmp_path)]) == 2
    assert "empty" in capsys.readouterr().err
    assert (
        main(
            [
                "analyze",
                "--model",
                "tiny-random",
                "--prompt",
                "one two " * 200,
                "--raw",
                "--n-ctx",
                "64",
                "--out",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "n_ctx=64" in capsys.readouterr().err  # refused, never silently truncated
    assert (
        main(
            ["analyze", "--model", "tiny-random", "--prompt", "hi", "--variants", "paper,bogus", "--out", str(tmp_path)]
        )
        == 2
    )
    assert "unknown variant" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_tasks_command_runs_and_resumes(tmp_path, capsys):
    argv = [
        "tasks",
        "--model",
        "tiny-random",
        "--task",
        "copy_last,count_ones",
        "--lengths",
        "3,5",
        "--samples",
        "1",
        "--max-new-tokens",
        "4",
        "--n-ctx",
        "256",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "copy_last" in first and "count_ones" in first and (tmp_path / "results.csv").exists()
    rows = (tmp_path / "results.jsonl").read_text().splitlines()
    assert main(argv) == 0  # resumes: nothing is generated twice
    assert (tmp_path / "results.jsonl").read_text().splitlines() == rows


def test_collapse_command_writes_every_figure(tmp_path, capsys):
    argv = [
        "collapse",
        "--model",
        "tiny-random",
        "--lengths",
        "2:20:6",
        "--dtypes",
        "float32,bfloat16",
        "--open-ended",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "float32" in printed and "bfloat16" in printed and "same_prediction" in printed
    results = json.loads((tmp_path / "results.json").read_text())
    collapse = CollapseResult.from_dict(results["collapse"])  # each result in the file loads back
    assert (
        collapse.lengths.tolist() == [2, 8, 14, 20]
        and collapse.prefix_closed
        and collapse.dtypes == ("float32", "bfloat16")
    )
    assert results["collapse"]["thresholds"] == to_jsonable(
        collapse.thresholds()
    )  # shown for readers, recomputed on load
    assert {"synthetic", "tv_decay", "metadata"} <= set(results)
    page = (tmp_path / "report.html").read_text()
    assert page.count('class="plotly-graph-div"') >= 4


def test_sinks_command_with_ablation(tmp_path, capsys):
    argv = [
        "sinks",
        "--model",
        "tiny-random",
        "--prompt",
        "a b c d e f g",
        "--clamp-layer",
        "0",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "sink rate" in printed and "clamping" in printed
    results = json.loads((tmp_path / "results.json").read_text())
    sinks, ablation = SinkReport.from_dict(results["sinks"]), AblationResult.from_dict(results["ablation"])
    assert sinks.sink_rate.shape == (2,) and ablation.layer == 0
    assert torch.equal(ablation.baseline.sink_rate, sinks.sink_rate)  # the same pass, stored twice, read back equal


def _refuse_certified(monkeypatch, reason="toy blocks are not modelled by the certified bound"):
    from dataclasses import replace

    from lens_squash.algebra import variant_registry
    from lens_squash.core.support import UnsupportedModelError

    def refuse(model):
        raise UnsupportedModelError(reason)

    # every variant whose spec needs the MLP gains refuses, through the registry (no name checks)
    for name in variant_registry.variant_names():
        spec = variant_registry.get_variant(name)
        if "mlp_gains" in spec.needs:
            monkeypatch.setitem(variant_registry._REGISTRY, name, replace(spec, supports=refuse))
    return reason


def test_default_variants_skip_what_the_model_cannot_support(chat_model, monkeypatch):
    from lens_squash.experiments.analysis import DEFAULT_VARIANTS

    reason = _refuse_certified(monkeypatch)
    result = analyze(chat_model, "hello there", jacobian_mode="sketch", n_probes=4)
    assert result.skipped == {"certified": reason}
    assert set(result.bounds) == set(DEFAULT_VARIANTS) - {"certified"}
    summary = result.summary()
    skipped_rows = summary[summary["variant"] == "certified"]
    assert skipped_rows["skipped"].tolist() == [reason]
    assert json.loads(json.dumps(result.to_dict()["skipped"])) == {"certified": reason}
    # the variants that ran are the ones analyze would give when asked for them by name
    named = analyze(chat_model, "hello there", variants=tuple(result.bounds), jacobian_mode=None)
    for name, bound in result.bounds.items():
        torch.testing.assert_close(bound.bound, named.bounds[name].bound)


def test_a_variant_named_explicitly_that_cannot_apply_is_an_error(chat_model, monkeypatch):
    from lens_squash.core.support import UnsupportedModelError

    reason = _refuse_certified(monkeypatch)
    with pytest.raises(UnsupportedModelError, match=reason):
        analyze(chat_model, "hello there", variants=("rollout", "certified"), jacobian_mode=None)


@pytest.mark.parametrize(
    "variants, message",
    [
        ((), "variants is empty"),
        (("paper", "nonsense"), "unknown variant"),
        (("paper", "paper"), "twice"),
    ],
)
def test_bad_variant_lists_are_refused_before_tracing(chat_model, variants, message, monkeypatch):
    import lens_squash.experiments.analysis as analysis

    monkeypatch.setattr(analysis, "trace", lambda *a, **k: pytest.fail("traced before checking the variants"))
    with pytest.raises(ValueError, match=message):
        analyze(chat_model, "hello there", variants=variants, jacobian_mode=None)


# a per-family sweep (conformance); test-fast keeps a LayerNorm and an RMSNorm/GQA family
@pytest.mark.parametrize("family", sweep([name for name in ALL if name != "bidirectional"], fast=("gpt2", "llama_gqa")))
def test_analyze_with_defaults_runs_on_every_causal_family(family):
    from lens_squash.experiments.analysis import DEFAULT_VARIANTS

    model = build(family)
    result = analyze(model, TOKENS, jacobian_mode="sketch", n_probes=4)
    from lens_squash.algebra.variant_registry import get_variant

    certified = {name for name in DEFAULT_VARIANTS if "mlp_gains" in get_variant(name).needs}
    expected_skips = certified if family in REFUSED else set()
    # rows short of 1 by design: no Perron–Frobenius analysis. From the family's definition, not the model's
    # cfg: TransformerLens 4.3 leaves use_attention_sinks unset on a GPT-OSS bridge, whose twin has sinks
    sinks = bool(FAMILIES.get(family, {}).get("use_attention_sinks", False))
    assert set(result.skipped) == expected_skips | ({"spectral"} if sinks else set())
    assert (result.spectral is None) == sinks
    for name in expected_skips:
        assert REFUSED[family] in result.skipped[name] and "use the" in result.skipped[name]  # what to do instead
    assert set(result.bounds) == set(DEFAULT_VARIANTS) - expected_skips
    for name, bound in result.bounds.items():
        assert torch.isfinite(bound.bound).all() and (bound.bound >= 0).all(), name
        torch.testing.assert_close(bound.bound, path_bound(result.trace, name, model=model).bound)
    assert set(result.comparisons) == set(result.bounds)


@pytest.mark.hooked  # families without a transformers twin
def test_analyze_refuses_a_bidirectional_model_in_one_clear_error():
    import lens_squash.experiments.analysis as analysis
    from lens_squash.core.support import UnsupportedModelError

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(analysis, "trace", lambda *a, **k: pytest.fail("traced a bidirectional model"))
        with pytest.raises(UnsupportedModelError, match="not causal.*decoder-only"):
            analyze(build("bidirectional"), TOKENS, jacobian_mode=None)


def test_collapse_command_fast_path_says_where_its_thresholds_came_from(tmp_path, capsys):
    base = [
        "collapse",
        "--model",
        "tiny-random",
        "--lengths",
        "2:20:6",
        "--dtypes",
        "float32,bfloat16",
        "--no-theory",
        "--open-ended",
    ]
    assert main([*base, "--out", str(tmp_path / "exact")]) == 0
    assert main([*base, "--fast", "--out", str(tmp_path / "fast")]) == 0
    exact = json.loads((tmp_path / "exact" / "results.json").read_text())["collapse"]
    fast = json.loads((tmp_path / "fast" / "results.json").read_text())["collapse"]
    assert exact["paths"] == {"float32": "separate", "bfloat16": "separate"}
    assert all(value is None for value in exact["noise_floor"].values())  # nothing shared, no noise to report
    assert fast["paths"] == {"float32": "prefix", "bfloat16": "prefix"}  # open-ended: read off one pass
    assert all(value >= 0 for value in fast["noise_floor"].values())
    assert "prefix" in capsys.readouterr().out


def test_streamed_and_stored_patterns_give_the_same_analysis_bit_for_bit(chat_model):
    """One per-layer pipeline: the stored stack replays into the accumulators a streamed pass feeds,
    and the bounds come from one sweep (stored layers or recomputed ones), so every number is equal."""
    tokens = torch.arange(5, 19)
    whole = analyze(chat_model, tokens, jacobian_mode=None, keep_patterns=True)
    streamed = analyze(chat_model, tokens, jacobian_mode=None, keep_patterns=False)
    assert whole.trace.patterns is not None and streamed.trace.patterns is None
    assert set(whole.bounds) == set(streamed.bounds) and whole.skipped == streamed.skipped
    for name, bound in whole.bounds.items():
        assert torch.equal(bound.bound, streamed.bounds[name].bound), name
        # the stored sweep's bound keeps its graph's patterns: its flows add up to the row (the streamed one has none)
        assert bound.flows().total == pytest.approx(float(bound.bound.sum()), rel=1e-9, abs=0), name
        with pytest.raises(ValueError, match="keep_patterns=True"):
            streamed.bounds[name].flows()
    for name, curve in whole.sinks.curves().items():
        assert torch.equal(curve, streamed.sinks.curves()[name]), name
    for name in ("spectrum", "dobrushin", "cumulative_dobrushin", "rollout_mass", "rank_one_distance"):
        assert torch.equal(getattr(whole.spectral, name), getattr(streamed.spectral, name)), name
    # and the stored path's bounds are the direct whole-stack row of each variant, computed apart
    for name, bound in whole.bounds.items():
        assert torch.equal(bound.bound, path_bound(whole.trace, name, model=chat_model).bound), name


def test_a_loaded_reports_metadata_sits_in_the_provenance_it_was_built_with(chat_model, tmp_path):
    analysis = analyze(chat_model, torch.arange(5, 12), jacobian_mode=None)
    data = analysis.to_dict(heavy=False) | {"metadata": {"command": "analyze"}}
    (tmp_path / "results.json").write_text(json.dumps(to_jsonable(data)))
    loaded = Analysis.load(tmp_path / "results.json")
    assert loaded.provenance["report"] == {"command": "analyze"}
    assert "patterns" in loaded.trace.provenance["dropped"] and loaded.trace.patterns is None
    assert "report" not in analysis.provenance  # the analysis that was saved is untouched


def test_a_one_layer_model_is_analysed_saved_and_loaded(tmp_path):
    """One block: no across-layer correlation exists (NaN, not a crash), the certified bound still dominates the
    frozen Jacobian it bounds, and the one-element per-layer curves survive the file."""
    model = tiny_model(n_layers=1, n_heads=2, d_model=16, d_vocab=40, n_ctx=32, dtype=torch.float64, seed=5)
    frozen = jacobian(model, torch.tensor([3, 5, 7, 9, 11, 2]), mode="frozen").spectral
    analysis = analyze(model, torch.tensor([3, 5, 7, 9, 11, 2]), jacobian_mode="exact")
    values = list(analysis.sinks.correlations.values())  # pairs over one common layer: NaN; over two: defined
    assert any(math.isnan(v) for v in values) and all(math.isnan(v) or abs(v) <= 1 + 1e-12 for v in values)
    assert bool((analysis.bounds["certified"].bound >= frozen * (1 - 1e-12)).all())
    (tmp_path / "results.json").write_text(json.dumps(to_jsonable(analysis.to_dict(heavy=False))))
    loaded = Analysis.load(tmp_path / "results.json")
    assert torch.equal(loaded.bounds["certified"].bound, analysis.bounds["certified"].bound)
    assert torch.equal(loaded.spectral.dobrushin, analysis.spectral.dobrushin)
