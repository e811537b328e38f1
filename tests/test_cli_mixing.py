"""``lens-squash mixing`` and ``lens-squash lab``: flags refused before any work, the names kept
equal to their registries, and one end-to-end run of each on tiny models."""

from __future__ import annotations

import json

import pytest
import torch

import lens_squash.edge.models
from lens_squash.cli import main
from lens_squash.cli_names import LAB_PACKINGS, MIXING_REMOVALS
from lens_squash.experiments.mixing import REMOVALS
from lens_squash.lab.language import PACKINGS


def test_names_match_their_registries():
    assert MIXING_REMOVALS == REMOVALS and LAB_PACKINGS == PACKINGS


BAD_FLAGS = [
    (["mixing", "--position", "0"], "--position", "got 0"),
    (["mixing", "--samples", "0"], "--samples", "got 0"),
    (["mixing", "--threshold", "0"], "--threshold", "finite number"),
    (["mixing", "--removals", "mask,nope"], "--removals", "unknown sink removal 'nope'"),
    (["mixing", "--clamp-layer", "-2"], "--clamp-layer", "must be >= 0"),
    (["mixing", "--probes", "-1"], "--probes", "got -1"),
    (["lab", "--contexts", "4"], "--contexts", "got 4"),
    (["lab", "--packings", "bos,zip"], "--packings", "unknown packing 'zip'"),
    (["lab", "--d-model", "66"], "--d-model", "multiple of 4"),
    (["lab", "--steps", "0"], "--steps", "got 0"),
    (["lab", "--lr", "0"], "--lr", "finite number"),
]


@pytest.mark.parametrize(("argv", "flag", "message"), BAD_FLAGS, ids=[" ".join(c[0]) for c in BAD_FLAGS])
def test_bad_flags_are_refused_before_any_work(capsys, no_load, argv, flag, message):
    code = main(argv + (["--out", "/tmp/lens-squash-never-written"] if argv[0] == "lab" else []))
    captured = capsys.readouterr()
    assert code == 2 and captured.out == "", captured
    assert (
        captured.err.startswith(f"lens-squash {argv[0]}: error: ") and flag in captured.err and message in captured.err
    )


@pytest.fixture(scope="module")
def tiny_random():
    return lens_squash.edge.models.load_model("tiny-random", n_ctx=256)


def test_mixing_prints_json_and_writes_a_report(capsys, monkeypatch, tiny_random, tmp_path):
    monkeypatch.setattr(lens_squash.edge.models, "load_model", lambda name, **kwargs: tiny_random)
    code = main(
        ["mixing", "--prompt", "one two three four five six", "--removals", "mask", "--json", "--out", str(tmp_path)]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rows = json.loads(captured.out)
    assert len(rows) == tiny_random.cfg.n_layers + 1 and "ratio_mask" in rows[1]
    assert (tmp_path / "report.html").exists() and "over-mixing" in (tmp_path / "report.html").read_text()
    code = main(["mixing", "--prompt", "one two", "--raw", "--position", "5", "--out", str(tmp_path)])
    assert code == 2 and "--position 5" in capsys.readouterr().err


def test_lab_trains_a_grid_and_reads_it_back(capsys, tmp_path):
    argv = ["lab", "--contexts", "16", "--depths", "1", "--seeds", "0", "--steps", "4", "--eval-every", "2"]
    argv += ["--d-model", "16", "--batch-size", "4", "--out", str(tmp_path)]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "16  1     bos" in first and "16  1  packed" in first and (tmp_path / "grid.json").exists()
    assert main(argv) == 0  # every run is read back: the same table
    table = lambda out: [line for line in out.splitlines() if line.strip().startswith("16")]  # noqa: E731
    assert table(capsys.readouterr().out) == table(first)


@pytest.mark.bridge
def test_mixing_runs_on_a_bridge():
    """Bridges are measured (tests/edge/test_sink_removal.py checks them against the HF model's own streams)."""
    from lens_squash.edge.models import TINY_MODEL, load_model
    from lens_squash.experiments.mixing import mixing

    bridge = load_model(TINY_MODEL, backend="bridge", n_ctx=64)
    result = mixing(bridge, "one two three four", 2, n_samples=1, jacobian=False, removals=("mask",))
    assert set(result.change) == {"sink", "mask"} and not result.skipped
    assert bool(torch.isfinite(result.change["mask"]).all())


def test_analyze_adds_an_over_mixing_section_when_asked(capsys, monkeypatch, tiny_random, tmp_path):
    from lens_squash.experiments.mixing_result import MixingResult

    monkeypatch.setattr(lens_squash.edge.models, "load_model", lambda name, **kwargs: tiny_random)
    prompt = "one two three four five six"
    argv = ["analyze", "--prompt", prompt, "--raw", "--jacobian", "none", "--mixing-position", "2"]
    assert main([*argv, "--out", str(tmp_path)]) == 0, capsys.readouterr().err
    stored = MixingResult.from_dict(json.loads((tmp_path / "results.json").read_text())["mixing"])
    assert stored.position == 2 and "over-mixing" in (tmp_path / "report.html").read_text()
    # the position is checked against the tokenized prompt before any analysis
    code = main([*argv[:-1], "40", "--out", str(tmp_path / "far")])
    err = capsys.readouterr().err
    assert code == 2 and "--mixing-position" in err and len(err.strip().splitlines()) == 1
