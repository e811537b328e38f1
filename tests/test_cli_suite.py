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
        (['{"id": "\\ud800", "prompt": "x"}'], "line 1", '"id" holds an unpaired surrogate (U+D800'),
        (['{"id": "a", "prompt": "x"}', '{"id": "b", "prompt": "y \\udfff"}'], "line 2", '"prompt" holds an unpaired'),
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


def test_json_flag_puts_the_table_alone_on_stdout(capsys, counted, tmp_path):
    path = _write(tmp_path / "p.jsonl", PROMPTS[:2])
    code, out, err = _suite(capsys, path, tmp_path / "out", "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert [r["id"] for r in rows] == ["copy"] * 3 + ["7"] * 3 and "loaded tiny-random" in err
    assert rows == json.loads((tmp_path / "out" / "table.json").read_text())["rows"]


#: ids and prompts holding what str.splitlines breaks at, emoji and right-to-left text
AWKWARD = [
    {"id": "line\u2028sep", "prompt": "one\u2028two three four"},
    {"id": "para\u2029", "prompt": "alpha\u2029beta gamma delta"},
    {"id": "nel\x85", "prompt": "x\x85y z w and more"},
    {"id": "ff\x0c", "prompt": "page\x0cbreak here now"},
    {"id": "😀", "prompt": "an emoji 😀 in a prompt"},
    {"id": "שלום", "prompt": "مرحبا بالعالم and some more text"},
]


def test_awkward_ids_and_prompts_run_and_resume_without_redoing_a_prompt(capsys, counted, monkeypatch, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in AWKWARD), encoding="utf-8")  # raw
    real = many.analyze

    def interrupted(model, prompt, **kwargs):
        if len(counted["analysed"]) == 2:
            raise KeyboardInterrupt
        counted["analysed"].append(prompt)
        return real(model, prompt, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(many, "analyze", interrupted)
        code, _, err = _suite(capsys, str(path), tmp_path / "out")
    rows_path = tmp_path / "out" / "prompts.jsonl"
    rows = [json.loads(line) for line in rows_path.read_text(encoding="utf-8").split("\n") if line]
    assert rows and code == 130 and f"interrupted; {len(rows)} prompts are saved" in err, err  # each row once
    assert [(r["id"], r["prompt"]) for r in rows] == [(e["id"], e["prompt"]) for e in AWKWARD[: len(rows)]]
    # rows written raw by another JSONL writer resume just as well
    rows_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    counted["analysed"].clear()
    code, _, err = _suite(capsys, str(path), tmp_path / "out")
    assert code == 0, err
    assert counted["analysed"] == [e["prompt"] for e in AWKWARD[len(rows) :]]  # none saved is redone
    table = pd.read_csv(tmp_path / "out" / "table.csv", keep_default_na=False)
    assert list(table["id"].unique()) == [e["id"] for e in AWKWARD]
    assert list(table["prompt"].unique()) == [e["prompt"] for e in AWKWARD]


def test_a_folder_in_use_is_refused_at_once_naming_the_holder_before_the_model_loads(capsys, no_load, tmp_path):
    import os
    import time

    from lens_squash.core.lock import lock_folder

    path = _write(tmp_path / "p.jsonl", PROMPTS)
    with lock_folder(tmp_path / "out", command="lens-squash suite --probes 48"):
        started = time.monotonic()
        code, out, err = _suite(capsys, path, tmp_path / "out")
        assert time.monotonic() - started < 15
        assert [p.name for p in (tmp_path / "out").iterdir()] == [".lens_squash.lock"]  # the refused run wrote nothing
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert "in use by another run" in err and f"PID {os.getpid()}" in err and "--probes 48" in err, err


_CONCURRENT = ["--jacobian", "sketch", "--variants", "paper,rollout", "--n-ctx", "128"]


@pytest.mark.slow
def test_two_suites_started_together_into_one_folder_one_proceeds_and_the_folder_is_all_its(tmp_path):
    """The issue's case: --probes 32 and --probes 48 into one --out at once. Exactly one may proceed,
    and the fingerprint, rows, table and analysis files must all come from it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from lens_squash.experiments.analysis import Analysis

    path = _write(tmp_path / "p.jsonl", PROMPTS[:2])
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "lens_squash.cli", "suite", "--model", "tiny-random", "--prompts", path]
    runs = {
        probes: subprocess.Popen(
            [*argv, "--out", str(out), "--probes", str(probes), *_CONCURRENT],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for probes in (32, 48)
    }
    done = {probes: (proc.wait(timeout=600), proc.stderr.read()) for probes, proc in runs.items()}
    winners = [probes for probes, (code, _) in done.items() if code == 0]
    assert len(winners) == 1, done
    loser = 80 - winners[0]
    code, err = done[loser]
    assert code == 2 and ("in use by another run" in err or "different run" in err), err
    record = json.loads((out / "prompts.fingerprint.json").read_text())
    assert record["fingerprint"]["analysis"]["n_probes"] == winners[0]
    rows = [json.loads(line) for line in (out / "prompts.jsonl").read_text().split("\n") if line]
    assert {r["fingerprint"] for r in rows} == {record["digest"]}
    assert json.loads((out / "table.json").read_text())["metadata"]["n_probes"] == winners[0]
    assert sorted(f"analyses/{p.name}" for p in (out / "analyses").iterdir()) == sorted(
        r["analysis_file"] for r in rows
    )
    for row in rows:
        analysis = Analysis.load(out / row["analysis_file"])
        spearman = {s["variant"]: s["spearman"] for s in row["summary"]}
        assert {name: c.spearman for name, c in analysis.comparisons.items()} == pytest.approx(spearman, rel=1e-12)
    assert not (out / ".lens_squash.lock").exists()
