"""records.py's writers: a writer killed mid-write leaves the previous file intact, and every result
file (results.jsonl included) gets the same permission rule."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lens_squash.core import records

RECORDS_PY = Path(records.__file__)

# A writer that stages half of a new file, tells the parent, then blocks until it is killed. It loads
# records.py alone (not the whole package) so the subprocess starts in about the time torch imports.
_WRITER = textwrap.dedent(
    """
    import importlib.util, sys, time
    spec = importlib.util.spec_from_file_location("records", sys.argv[1])
    records = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(records)
    target, ready = sys.argv[2], sys.argv[3]

    def write(tmp):
        with open(tmp, "w") as handle:
            handle.write('{"task": "copy_last", "half": ')
            handle.flush()
            open(ready, "w").close()
            time.sleep(120)

    records.atomic_write(target, write)
    """
)


def _kill_mid_write(target: Path, tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(RECORDS_PY), str(target), str(ready)])
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None, "the writer died before it started writing"
            assert time.monotonic() < deadline, "the writer never started writing"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # no cleanup handler can run: the hardest crash
    finally:
        proc.wait(timeout=30)


def test_a_writer_killed_mid_write_leaves_the_previous_file_intact(tmp_path):
    # one file kind is enough: every result file goes through the same atomic_write
    name = "results.jsonl"
    target = tmp_path / name
    rows = [{"task": "copy_last", "length": n, "raw_output": "The answer is 0"} for n in range(3)]
    records.write_jsonl_atomic(target, rows)
    before = target.read_bytes()
    _kill_mid_write(target, tmp_path)
    assert target.read_bytes() == before
    assert [json.loads(line) for line in target.read_text().splitlines()] == rows
    # what the killed writer left is a hidden temp file beside it, never the target itself
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in (name, "ready")]
    assert all(p.startswith(f".{name}.") and p.endswith(".tmp") for p in leftovers)


def test_a_failing_writer_leaves_the_previous_file_and_no_temp_file(tmp_path):
    target = records.write_text_atomic(tmp_path / "report.html", "old")

    def broken(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        records.atomic_write(target, broken)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.html"]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_every_writer_gives_a_new_file_the_mode_open_would(tmp_path):
    expected = 0o666 & ~_umask()
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what open(path, "w") gives: the reference
    assert plain.stat().st_mode & 0o777 == expected
    written = [
        records.write_text_atomic(tmp_path / "a.html", "x"),
        records.write_json_atomic(tmp_path / "b.json", {"a": 1}),
        records.write_jsonl_atomic(tmp_path / "c.jsonl", [{"a": 1}]),
    ]
    for path in written:
        assert path.stat().st_mode & 0o777 == expected, path.name


def test_rewriting_a_file_keeps_its_mode(tmp_path):
    path = records.write_jsonl_atomic(tmp_path / "results.jsonl", [{"a": 1}])
    path.chmod(0o640)
    records.write_jsonl_atomic(path, [{"a": 1}, {"a": 2}])
    assert path.stat().st_mode & 0o777 == 0o640 and len(path.read_text().splitlines()) == 2


def test_jsonl_rows_are_one_valid_json_object_per_line(tmp_path):
    rows = [{"text": "multi\nline \u202e", "nan": float("nan")}, {"text": "", "nan": 1.5}]
    path = records.write_jsonl_atomic(tmp_path / "r.jsonl", rows)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [
        {"text": "multi\nline \u202e", "nan": None},
        {"text": "", "nan": 1.5},
    ]


def test_the_report_pair_follows_the_same_rule(tmp_path):
    from lens_squash.views.report import ReportSection, write_report

    html_path, json_path = write_report(tmp_path, [ReportSection("s", text="x")], {"a": 1})
    expected = 0o666 & ~_umask()
    assert {html_path.stat().st_mode & 0o777, json_path.stat().st_mode & 0o777} == {expected}
    html_path.chmod(0o640)
    write_report(tmp_path, [ReportSection("s", text="y")], {"a": 2})
    assert html_path.stat().st_mode & 0o777 == 0o640 and json.loads(json_path.read_text()) == {"a": 2}
