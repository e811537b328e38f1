"""The bound-quality benchmark (benchmarks/bound_quality.py) on a two-prompt subset of the suite."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from lens_squash.algebra.ranks import spearman
from lens_squash.algebra.variants import VARIANTS, path_bound
from lens_squash.edge.jacobian import jacobian
from lens_squash.edge.models import format_prompt, load_model
from lens_squash.edge.trace import trace
from lens_squash.experiments.suite import load_suite

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "bound_quality.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("bound_quality_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_benchmark_runs_on_a_two_prompt_subset(smollm2, tmp_path):
    bench = load_benchmark()
    markdown = tmp_path / "bound_quality.md"
    # sketched Jacobians only (8 probes): the exact route is what the full benchmark adds
    frame, summary = bench.run(
        ["--quick", "--exact-max-tokens", "0", "--probes", "8", "--markdown", str(markdown)], model=smollm2
    )
    assert set(frame["prompt"]) == set(bench.QUICK_NAMES)
    assert len(frame) == 2 * len(VARIANTS) and set(summary["variant"]) == set(VARIANTS)
    assert frame["spearman_frob"].between(-1, 1).all() and frame["top5_frob"].between(0, 1).all()
    assert (frame["first_token_share"] > 0).all()
    # one row recomputed from the library directly: the table reports what the functions give
    (prompt,) = load_suite(names=[bench.QUICK_NAMES[0]])
    tokens = format_prompt(smollm2, prompt.text, chat=prompt.chat)
    bound = path_bound(trace(smollm2, tokens), "paper", model=smollm2).bound
    truth = jacobian(smollm2, tokens, mode="sketch", n_probes=8).frobenius
    row = frame[(frame["prompt"] == prompt.name) & (frame["variant"] == "paper")].iloc[0]
    assert row["spearman_frob"] == pytest.approx(spearman(bound, truth), abs=1e-12)
    assert row["first_token_share"] == pytest.approx(float(bound[0] / bound.sum()), abs=1e-12)
    text = markdown.read_text()
    assert "Regenerate with `python benchmarks/bound_quality.py --quick" in text
    assert all(name in text for name in VARIANTS)


CONTRIBUTIONS = ["alti", "globenc", "alti_linear", "alti_resid", "rollout"]


def test_contribution_proxies_rows_layers_and_render(tmp_path):
    """On the seeded tiny-random model: each proxy's row is the library's, the per-layer table is
    flow's layer_spearman, and --render rebuilds the same tables from the saved lines."""
    bench = load_benchmark()
    model = load_model("tiny-random", n_ctx=512)
    lines, layers = tmp_path / "rows.jsonl", tmp_path / "layers.jsonl"
    names = "list_shopping,prose_tide"
    common = ["--variants", ",".join(CONTRIBUTIONS), "--lines", str(lines), "--diagnosis-lines", str(layers)]
    frame, summary = bench.run(
        ["--names", names, "--exact-max-tokens", "0", "--probes", "8", "--diagnose", "prose_tide", *common], model=model
    )
    assert list(summary["guarantee"]) == ["proxy"] * len(CONTRIBUTIONS)
    (prompt,) = load_suite(names=["prose_tide"])
    tokens = format_prompt(model, prompt.text, chat=prompt.chat)
    truth = jacobian(model, tokens, mode="sketch", n_probes=8).frobenius
    for name in ("alti", "globenc"):
        bound = path_bound(trace(model, tokens, keep_resid=True), name, model=model).bound
        row = frame[(frame["prompt"] == prompt.name) & (frame["variant"] == name)].iloc[0]
        assert row["spearman_frob"] == pytest.approx(spearman(bound, truth), abs=1e-12)
    diagnosis = bench.pd.DataFrame(bench.read_lines(layers))
    assert len(diagnosis) == model.cfg.n_layers and set(CONTRIBUTIONS) <= set(diagnosis.columns)
    markdown = tmp_path / "bound_quality.md"
    again, summary_again = bench.run(["--render", "--markdown", str(markdown), *common])
    bench.pd.testing.assert_frame_equal(summary_again, summary)
    text = markdown.read_text()
    assert "## Per layer, against the true flow" in text and "| proxy |" in text
    assert torch.isfinite(torch.tensor(again["spearman_frob"].to_numpy())).all()


def test_stored_exact_truths_win_over_sketches_and_are_reused(tmp_path):
    """An exact Jacobian stored by one run is what a later sketch-only run scores against (it is the
    better truth), whichever ``--truths`` file holds it; only missing truths are computed and appended."""
    bench = load_benchmark()
    model = load_model("tiny-random", n_ctx=512)
    exact, sketch = tmp_path / "exact.jsonl", tmp_path / "sketch.jsonl"
    common = ["--variants", "alti_resid", "--probes", "8"]
    bench.run(["--names", "prose_tide", "--exact-max-tokens", "200", "--truths", str(exact), *common], model=model)
    bench.run(["--names", "prose_tide,list_shopping", "--exact-max-tokens", "0", "--truths", str(sketch), *common],
              model=model)  # fmt: skip
    before = exact.read_text(), sketch.read_text()
    frame, _ = bench.run(
        ["--names", "prose_tide,list_shopping", "--exact-max-tokens", "0", "--truths", str(exact), "--truths",
         str(sketch), *common], model=model,
    )  # fmt: skip
    assert (exact.read_text(), sketch.read_text()) == before  # nothing recomputed
    kinds = dict(zip(frame["prompt"], frame["jacobian"], strict=True))
    assert kinds == {"prose_tide": "exact", "list_shopping": "sketch8"}
    (prompt,) = load_suite(names=["prose_tide"])
    tokens = format_prompt(model, prompt.text, chat=prompt.chat)
    truth = jacobian(model, tokens, mode="exact").frobenius
    bound = path_bound(trace(model, tokens, keep_resid=True), "alti_resid", model=model).bound
    assert frame.iloc[0]["spearman_frob"] == pytest.approx(spearman(bound, truth), abs=1e-9)
    assert bench.read_truths([sketch, exact])["prose_tide"]["jacobian"] == "exact"  # in either order


def test_a_knob_is_chosen_on_one_half_and_reported_on_the_other(tmp_path):
    """``--knob``: the prompts alternate between the halves; each cell is the Spearman of the variant
    built with that value against the stored truth, and ``chosen`` is the best tune median."""
    bench = load_benchmark()
    model = load_model("tiny-random", n_ctx=512)
    truths = tmp_path / "truths.jsonl"
    names = "prose_tide,list_shopping"
    bench.run(["--names", names, "--variants", "alti_skip", "--probes", "8", "--truths", str(truths)], model=model)
    table, _ = bench.run(["--names", names, "--knob", "alti_skip:skip=0.5,1", "--truths", str(truths)], model=model)
    stored = bench.read_truths([truths])
    for half, prompt in zip(("tune", "held"), load_suite(names=names.split(",")), strict=True):
        tokens = format_prompt(model, prompt.text, chat=prompt.chat)
        traced = trace(model, tokens, keep_resid=True)
        for value, cell in zip(table["skip"], table[f"{half}_median"], strict=True):
            bound = path_bound(traced, "alti_skip", model=model, skip=value).bound
            assert cell == pytest.approx(spearman(bound, torch.tensor(stored[prompt.name]["frob"])), abs=1e-9)
    assert list(table["chosen"]) == list(table["tune_median"] == table["tune_median"].max())


def test_merged_lines_keep_the_latest_row_per_prompt_and_variant():
    rows = [{"prompt": "a", "variant": "v", "x": 1}, {"prompt": "b", "variant": "v", "x": 2}]
    assert load_benchmark().latest([*rows, {"prompt": "a", "variant": "v", "x": 3}]) == [
        {"prompt": "a", "variant": "v", "x": 3},
        rows[1],
    ]
