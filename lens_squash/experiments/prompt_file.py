"""Prompt files: one JSON object per line, read and checked before any model work.

The schema (``lens-squash suite --prompts FILE.jsonl``)::

    {"id": "copy-12", "prompt": "Consider the following sequence: 1 1 … 0. …"}
    {"id": "prose-1", "prompt": "The cat sat on the mat.", "chat": false}

- ``id`` (required): a non-empty string (an integer is taken as its decimal string), unique in the
  file. It names the prompt's row in the results, so a rerun recognises what is done.
- ``prompt`` (required): the text, non-empty.
- ``chat`` (optional): ``true`` for the chat template, ``false`` for raw text; absent or ``null``
  means the template when the tokenizer has one (as everywhere in lens_squash).

Lines end at ``\n`` alone (``\r\n`` tolerated): U+2028, U+2029, NEL and form feed are text
(:mod:`lens_squash.core.jsonl`). Blank lines are skipped. Anything else (a line that is not JSON, not an object, a missing or empty
field, a duplicate id, an unknown key) is refused in one line that names the line number and says
how to fix it. Pure: no torch, no model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..core.jsonl import jsonl_lines, read_jsonl_text

__all__ = ["PROMPT_FIELDS", "FilePrompt", "read_prompt_file"]

#: the keys a line may have
PROMPT_FIELDS = ("id", "prompt", "chat")


@dataclass(frozen=True)
class FilePrompt:
    """One line of a prompt file."""

    id: str
    prompt: str
    chat: bool | None
    line: int  # 1-based, for messages


def _refuse(path: Path, line: int, problem: str) -> ValueError:
    return ValueError(
        f"{path}, line {line}: {problem}; each line must be one JSON object such as "
        '{"id": "p1", "prompt": "some text"} (optional "chat": true or false)'
    )


def _check_encodable(path: Path, line: int, key: str, value: str) -> None:
    """A lone surrogate (``"\\ud800"`` in the file) is valid JSON but no text: no file name, no tokens."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise _refuse(
            path, line, f'"{key}" holds an unpaired surrogate (U+{ord(value[err.start]):04X} at index {err.start})'
        ) from None


def _prompt(path: Path, line: int, text: str) -> FilePrompt:
    try:
        entry = json.loads(text)
    except json.JSONDecodeError as err:
        raise _refuse(path, line, f"not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(entry, dict):
        raise _refuse(path, line, f"a JSON {type(entry).__name__}, not an object")
    unknown = sorted(set(entry) - set(PROMPT_FIELDS))
    if unknown:
        raise _refuse(path, line, f"unknown keys {unknown} (the keys are {', '.join(PROMPT_FIELDS)})")
    ident = entry.get("id")
    if isinstance(ident, int) and not isinstance(ident, bool):
        ident = str(ident)
    if not isinstance(ident, str) or not ident.strip():
        raise _refuse(path, line, f'"id" must be a non-empty string, got {entry.get("id")!r}')
    prompt = entry.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise _refuse(path, line, f'"prompt" must be non-empty text, got {prompt!r}')
    for key, value in (("id", ident), ("prompt", prompt)):
        _check_encodable(path, line, key, value)
    chat = entry.get("chat")
    if chat is not None and not isinstance(chat, bool):
        raise _refuse(path, line, f'"chat" must be true, false or null, got {chat!r}')
    return FilePrompt(ident, prompt, chat, line)


def read_prompt_file(path: str | os.PathLike, name: str = "prompts") -> tuple[FilePrompt, ...]:
    """Every prompt of a JSONL prompt file, in file order, each line checked (see the module docstring)."""
    path = Path(path)
    text = read_jsonl_text(path, name)
    prompts, seen = [], {}
    for number, line, _ in jsonl_lines(text):  # "\n" ends a line; U+2028, NEL, form feed do not
        if not line.strip():
            continue
        prompt = _prompt(path, number, line)
        if prompt.id in seen:
            raise _refuse(path, number, f'"id" {prompt.id!r} repeats line {seen[prompt.id]}; ids must be unique')
        seen[prompt.id] = number
        prompts.append(prompt)
    if not prompts:
        raise ValueError(
            f"{name}: {path} holds no prompts; write one JSON object per line, e.g. "
            '{"id": "p1", "prompt": "some text"}'
        )
    return tuple(prompts)
