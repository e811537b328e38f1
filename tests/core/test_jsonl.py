"""JSONL by the spec: rows end at ``\\n`` alone, whatever separators the text holds, and what is written
reads back equal, through ``json`` line by line as any other JSONL reader would."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from lens_squash.core.jsonl import count_rows, jsonl_line, jsonl_lines
from lens_squash.core.records import write_jsonl_atomic

#: characters str.splitlines breaks at, and text that trips naive tools
AWKWARD = ["\u2028", "\u2029", "\x85", "\x0c", "\x0b", "\x1c", "\x1d", "\x1e", "\r", "😀", "שלום عالم", "\u202e"]


def test_only_newline_ends_a_row_and_crlf_is_tolerated():
    rows = [{"id": f"a{c}b", "prompt": f"x{c}y"} for c in AWKWARD]
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)  # raw, as other writers do
    assert len(text.splitlines()) > len(rows)  # the trap: str.splitlines cuts these rows apart
    read = [json.loads(line) for _, line, ended in jsonl_lines(text) if ended]
    assert read == rows
    crlf = text.replace("\n", "\r\n")
    assert [json.loads(line) for _, line, _ in jsonl_lines(crlf)] == rows


def test_a_last_line_without_newline_is_reported_as_cut_short():
    lines = list(jsonl_lines('{"a": 1}\n{"a": 2'))
    assert lines == [(1, '{"a": 1}', True), (2, '{"a": 2', False)]
    assert list(jsonl_lines("")) == [] and list(jsonl_lines("\n")) == [(1, "", True)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.dictionaries(st.text(max_size=8), st.text(max_size=12) | st.integers(), max_size=4), max_size=5))
def test_written_rows_read_back_equal_and_each_sits_on_one_line(rows):
    text = "".join(jsonl_line(row) for row in rows)
    assert text.count("\n") == len(rows)
    assert "\u2028" not in text and "\u2029" not in text and "\x85" not in text  # escaped for eager splitters
    assert len(text.splitlines()) == len(rows)  # so even str.splitlines reads it right
    assert [json.loads(line) for _, line, _ in jsonl_lines(text)] == rows


def test_the_atomic_writer_and_the_row_count_agree_on_awkward_text(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [{"id": c, "prompt": f"p{c}q"} for c in AWKWARD]
    write_jsonl_atomic(path, rows)
    assert count_rows(path) == len(rows)
    with path.open("a", encoding="utf-8") as handle:
        handle.write('{"id": "cut"')  # a writer killed mid-line: not a row
    assert count_rows(path) == len(rows)
    assert count_rows(tmp_path / "absent.jsonl") == 0
