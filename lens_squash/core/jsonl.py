"""JSON Lines by the spec: records end at ``\\n`` alone (a ``\\r\\n`` ending is tolerated).

``str.splitlines`` also breaks at U+2028, U+2029, NEL (U+0085), form feed and other separators
that JSON strings may hold raw, so it cuts valid rows in two. Every JSONL file lens_squash reads
(prompt files, ``prompts.jsonl``, the tasks' ``results.jsonl``) goes through :func:`jsonl_lines`;
every one it writes goes through :func:`jsonl_line`, which also escapes those separators so that
other tools that split lines too eagerly read the file right. Pure: no torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["count_rows", "jsonl_line", "jsonl_lines", "read_jsonl_text", "read_utf8_text"]

# valid raw inside a JSON string, but line breaks to str.splitlines, JavaScript and many editors
_ESCAPED = {"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"}


def jsonl_line(row: Any) -> str:
    """One JSONL record of ``row``: strict JSON (no NaN), non-ASCII text kept, the ending ``\\n``."""
    text = json.dumps(row, ensure_ascii=False, allow_nan=False)
    for raw, escaped in _ESCAPED.items():
        text = text.replace(raw, escaped)
    return text + "\n"


def jsonl_lines(text: str) -> Iterator[tuple[int, str, bool]]:
    """``(line number from 1, line without its ending, whether it ended with a newline)`` per line.

    Lines split at ``\\n`` only; one ``\\r`` before it is dropped. The last line without a newline is
    reported with ``False`` (a writer cut short) unless it is empty.
    """
    parts = text.split("\n")
    for number, line in enumerate(parts, start=1):
        ended = number < len(parts)
        if not ended and not line:
            return
        yield number, line.removesuffix("\r") if ended else line, ended


def read_utf8_text(path: str | os.PathLike, *, expected: str, folder: str | None = None, prefix: str = "") -> str:
    """The UTF-8 text of ``path``; otherwise a one-line ``ValueError`` naming the file (after ``prefix``)
    and what to pass instead: ``expected`` (and ``folder`` when the path is a folder)."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{prefix}{path} does not exist; {expected}") from None
    except IsADirectoryError:
        raise ValueError(f"{prefix}{path} is a folder; {folder or expected}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{prefix}{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None


def read_jsonl_text(path: str | os.PathLike, name: str | None = None) -> str:
    """The UTF-8 text of a JSONL file; a refusal that names the file (and ``name``, the flag) otherwise."""
    return read_utf8_text(path, expected="pass a JSONL file", prefix=f"{name}: " if name else "")


def count_rows(path: str | os.PathLike) -> int:
    """How many complete JSON objects a JSONL file holds (0 when it cannot be read)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return 0
    count = 0
    for _, line, ended in jsonl_lines(text):
        try:
            count += ended and isinstance(json.loads(line), dict)
        except ValueError:
            continue
    return count
