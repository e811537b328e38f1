"""The bound-quality benchmark (benchmarks/bound_quality.py) on a two-prompt subset of the suite."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from lens_squash.algebra.ranks import spearman
from lens_squash.algebra.variants import VARIANTS, path_bound
from lens_squash.edge.jacobian import jacobian
from lens_squash.edge.models import format_prompt
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
