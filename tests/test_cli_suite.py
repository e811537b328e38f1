"""``lens-squash suite --prompts FILE.jsonl``: bad files refused by line before any load; the table equals
``analyze`` run prompt by prompt; an interrupted run resumes to the same table; another run is refused."""

from __future__ import annotations

import json

import pandas as pd
import pytest

import lens_squash.edge.models
from lens_squash import cli
from lens_squash.experiments import many

PROMPTS = [
    {"id": "copy", "prompt": "Consider the following sequence: 1 1 1 0. What is the last digit?"},
    {"id": 7, "prompt": "The cat sat on the mat.", "chat": False},
    {"id": "words", "prompt": "one two three four five"},
]
SETTINGS = ["--jacobian", "sketch", "--probes", "8", "--variants", "paper,rollout,value_rownorm"]


def _write(path, entries) -> str:
    path.write_text("".join((e if isinstance(e, str) else json.dumps(e)) + "\n" for e in entries))
    return str(path)


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    ("lines", "where", "message"),
    [
        (['{"id": "a", "prompt": "x"}', '{"id": "b", "prompt": "y"'], "line 2", "not valid JSON"),
        (['["a", "x"]'], "line 1", "a JSON list, not an object"),
        (['{"prompt": "x"}'], "line 1", '"id" must be a non-empty string'),
        (['{"id": "a", "prompt": "  "}'], "line 1", '"prompt" must be non-empty text'),
        (['{"id": "a", "prompt": "x"}', "", '{"id": "a", "prompt": "y"}'], "line 3", "repeats line 1"),
        (['{"id": "a", "prompt": "x", "text": "y"}'], "line 1", "unknown keys ['text']"),
        (['{"id": "a", "prompt": "x", "chat": "yes"}'], "line 1", '"chat" must be true, false or null'),
        (["", "  "], "holds no prompts", "one JSON object per line"),
    ],
)
def test_a_bad_prompt_file_is_refused_by_line_before_the_model_loads(capsys, no_load, tmp_path, lines, where, message):
    path = _write(tmp_path / "p.jsonl", lines)
    code, out, err = _run(capsys, "suite", "--model", "tiny-random", "--prompts", path, "--out", str(tmp_path / "o"))
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith("lens-squash suite: error: ") and where in err and message in err, err
    assert not (tmp_path / "o").exists()


def test_a_missing_prompt_file_is_refused(capsys, no_load, tmp_path):
    code, _, err = _run(capsys, "suite", "--prompts", str(tmp_path / "none.jsonl"))
    assert code == 2 and "--prompts" in err and "does not exist" in err


@pytest.fixture(scope="module")
def tiny_random():
    return lens_squash.edge.models.load_model("tiny-random", n_ctx=256)


@pytest.fixture()
def counted(monkeypatch, tiny_random):
    """Commands get the cached tiny-random model; returns the loads and the prompts analysed."""
    calls = {"loads": [], "analysed": []}
    real = many.analyze

    def load(name, **kwargs):
        calls["loads"].append(name)
        return tiny_random

    def analyze(model, prompt, **kwargs):
        calls["analysed"].append(prompt)
        return real(model, prompt, **kwargs)

    monkeypatch.setattr(lens_squash.edge.models, "load_model", load)
    monkeypatch.setattr(many, "analyze", analyze)
    return calls


def _suite(capsys, prompts_path, out, *extra):
    return _run(
        capsys,
        "suite",
        "--model",
        "tiny-random",
        "--n-ctx",
        "256",
        "--prompts",
        prompts_path,
        "--out",
        str(out),
        *SETTINGS,
        *extra,
    )


@pytest.mark.hooked
def test_the_table_is_analyze_prompt_by_prompt_and_each_result_loads_back(capsys, counted, tiny_random, tmp_path):
    from lens_squash.experiments.analysis import Analysis, analyze

    path = _write(tmp_path / "p.jsonl", PROMPTS)
    code, out, err = _suite(capsys, path, tmp_path / "out")
    assert code == 0, err
    table = pd.read_csv(tmp_path / "out" / "table.csv")
    assert list(table["id"].astype(str).unique()) == ["copy", "7", "words"]
    rows = {json.loads(line)["id"]: json.loads(line) for line in (tmp_path / "out" / "prompts.jsonl").open()}
    for entry in PROMPTS:
        reference = analyze(
            tiny_random,
            entry["prompt"],
            variants=["paper", "rollout", "value_rownorm"],
            jacobian_mode="sketch",
            n_probes=8,
            chat=entry.get("chat"),
        ).summary()
        mine = table[table["id"].astype(str) == str(entry["id"])]
        assert list(mine["variant"]) == list(reference["variant"])
        for column in ("spearman", "kendall", "first_token_share"):  # a CSV round trip: 15+ digits kept
            assert mine[column].tolist() == pytest.approx(reference[column].tolist(), rel=1e-12, abs=0)
        loaded = Analysis.load(tmp_path / "out" / rows[str(entry["id"])]["analysis_file"])
        assert loaded.summary()["spearman"].tolist() == reference["spearman"].tolist()
    saved = json.loads((tmp_path / "out" / "table.json").read_text())
    assert saved["metadata"]["command"] == "suite" and len(saved["rows"]) == len(table) == 9


@pytest.mark.hooked
def test_an_interrupted_suite_resumes_to_the_same_table_without_redoing_a_prompt(
    capsys, counted, monkeypatch, tmp_path
):
    path = _write(tmp_path / "p.jsonl", PROMPTS)
    assert _suite(capsys, path, tmp_path / "whole")[0] == 0
    whole = pd.read_csv(tmp_path / "whole" / "table.csv")
    counted["analysed"].clear()
    real = many.analyze

    def interrupted(model, prompt, **kwargs):
        if counted["analysed"]:
            raise KeyboardInterrupt
        counted["analysed"].append(prompt)
        return real(model, prompt, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(many, "analyze", interrupted)
        code, out, err = _suite(capsys, path, tmp_path / "cut")
    assert code == 130
    assert err.strip().splitlines()[-1] == (
        f"lens-squash suite: interrupted; 1 prompts are saved in {tmp_path / 'cut' / 'prompts.jsonl'}; "
        "run the same command again to resume from them"
    )
    assert not (tmp_path / "cut" / "table.csv").exists()  # the table appears once every prompt is done
    counted["analysed"].clear()
    assert _suite(capsys, path, tmp_path / "cut")[0] == 0
    assert counted["analysed"] == [PROMPTS[1]["prompt"], PROMPTS[2]["prompt"]]  # the first is not redone
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "cut" / "table.csv"), whole)


@pytest.mark.hooked
def test_another_run_or_a_changed_prompt_is_refused_before_loading_and_overwrite_starts_over(capsys, counted, tmp_path):
    path = _write(tmp_path / "p.jsonl", PROMPTS)
    out = tmp_path / "out"
    assert _suite(capsys, path, out)[0] == 0
    assert counted["loads"] == ["tiny-random"]
    for extra, difference in (
        (["--probes", "4"], "analysis.n_probes: 8 → 4"),
        (["--dtype", "bf16"], "model.dtype: 'float32' → 'bfloat16'"),
        (["--jacobian", "exact"], "analysis.jacobian_mode: 'sketch' → 'exact'"),
    ):
        code, _, err = _suite(capsys, path, out, *extra)
        assert code == 2 and "different run" in err and difference in err, err
    changed = _write(tmp_path / "q.jsonl", [PROMPTS[0], {**PROMPTS[1], "prompt": "A dog sat on the mat."}])
    code, _, err = _suite(capsys, changed, out)
    assert code == 2 and "line 2: id '7' was run before with another prompt" in err, err
    assert counted["loads"] == ["tiny-random"]  # no refusal loaded a model
    counted["analysed"].clear()
    code, _, err = _suite(capsys, changed, out, "--probes", "4", "--overwrite")
    assert code == 0, err
    assert len(counted["analysed"]) == 2 and len(pd.read_csv(out / "table.csv")) == 6
    assert len((out / "prompts.jsonl").read_text().splitlines()) == 2  # the old run's rows are gone


@pytest.mark.hooked
def test_json_flag_puts_the_table_alone_on_stdout(capsys, counted, tmp_path):
    path = _write(tmp_path / "p.jsonl", PROMPTS[:2])
    code, out, err = _suite(capsys, path, tmp_path / "out", "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert [r["id"] for r in rows] == ["copy"] * 3 + ["7"] * 3 and "loaded tiny-random" in err
    assert rows == json.loads((tmp_path / "out" / "table.json").read_text())["rows"]
