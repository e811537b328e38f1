"""Run fingerprints and resumable JSONL results: a results folder never mixes rows of different runs.

A long run (the copying and counting tasks, a prompt suite) appends its rows to a JSONL file, one
row per finished unit, rewritten atomically after each batch. A rerun of the *same* run skips the
rows already there; a different run must not add to them. What "the same" means is the run's
*fingerprint*: every setting that can change a row (the model's name, weights hash, dtype and device,
the run's own settings, the library versions), kept beside the rows in ``<stem>.fingerprint.json``
and compared field by field before any work. Which rows exist is never part of it: rows are keyed by
their own fields (``key``), so a rerun may add units to a folder without mixing anything.

Reading needs neither torch nor a model, so the command line checks a folder before loading one
(``partial=True`` compares only the fields known without the model).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..core.jsonl import jsonl_lines, read_jsonl_text

__all__ = [
    "check_run_folder",
    "fingerprint_differences",
    "fingerprint_digest",
    "fingerprint_path",
    "jsonl_rows",
    "model_fingerprint",
    "package_versions",
    "read_jsonl",
    "record_fingerprint",
    "weights_sha256",
]

_HASH_CHUNK = 1 << 24  # bytes per hashlib update: bounded extra memory, few Python round trips


def package_versions(packages: Iterable[str]) -> dict[str, str | None]:
    """The installed version of each package (None when it is not installed)."""
    versions: dict[str, str | None] = {}
    for package in packages:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def weights_sha256(model) -> str:
    """SHA-256 of every parameter of ``model``, ALL bytes (no sampling), in ``named_parameters``
    order, each prefixed by its name, dtype and shape; the bytes are fed in 16 MB chunks.

    Buffers (rotary tables, masks) are left out: they follow from the config and ``n_ctx``, not from
    training. Costs what SHA-256 costs: 1.6 s for SmolLM2-135M in float32 (652 MB) on this project's
    2-core machine, once per run.
    """
    import torch  # only here: reading and comparing fingerprints needs no torch

    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        flat = param.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        digest.update(f"{name}|{str(param.dtype).removeprefix('torch.')}|{tuple(param.shape)}|".encode())
        for start in range(0, flat.numel(), _HASH_CHUNK):
            digest.update(flat[start : start + _HASH_CHUNK].numpy())  # the buffer itself: no copy
    return digest.hexdigest()


def model_fingerprint(model) -> dict[str, Any]:
    """What identifies a loaded model's numbers: its name, weights hash, dtype and device."""
    return {
        "name": getattr(model.cfg, "model_name", None),
        "weights_sha256": weights_sha256(model),
        "dtype": str(model.cfg.dtype).removeprefix("torch."),
        "device": str(model.cfg.device),
    }


def fingerprint_digest(fingerprint: dict[str, Any]) -> str:
    """A short, stable id of a fingerprint (16 hex digits of the SHA-256 of its canonical JSON)."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def _flat(mapping: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def fingerprint_differences(stored: dict[str, Any], current: dict[str, Any], *, partial: bool = False) -> list[str]:
    """``"field: stored → current"`` for every field that differs. ``partial=True`` compares only the
    fields ``current`` has (a check made before the model is loaded)."""
    old, new = _flat(stored), _flat(current)
    keys = new.keys() if partial else old.keys() | new.keys()
    absent = "(absent)"  # a field one side lacks differs even from None
    return [
        f"{key}: {old.get(key, absent)!r} → {new.get(key, absent)!r}"
        for key in sorted(keys)
        if (key in old, old.get(key)) != (key in new, new.get(key))
    ]


def fingerprint_path(out_path: str | os.PathLike) -> Path:
    """Where a results JSONL keeps the fingerprint of the run that made it: ``results.fingerprint.json``."""
    path = Path(out_path)
    return path.with_name(f"{path.stem}.fingerprint.json")


def jsonl_rows(
    path: Path, key: Sequence[str], *, renamed_fields: Mapping[str, str] | None = None
) -> tuple[list[dict], bool]:
    """Every complete row of a results JSONL, in file order (repeats kept), and whether all lines were.

    Rows end at ``\n`` alone (:mod:`lens_squash.core.jsonl`). A line cut short (no newline, or not
    valid JSON; files written before saves were atomic) or lacking a ``key`` field is skipped. ``renamed_fields`` (old name → new name) upgrades rows written
    before a field was renamed.
    """
    if not path.exists():
        return [], True
    rows, clean = [], True
    for _, line, ended in jsonl_lines(read_jsonl_text(path)):  # "\n" alone ends a row: not U+2028, NEL…
        try:
            row = json.loads(line) if ended else None
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            for old, new in (renamed_fields or {}).items():
                if old in row and new not in row:
                    row[new] = row.pop(old)
        if not isinstance(row, dict) or not set(key) <= row.keys():
            clean = False
            continue
        rows.append(row)
    return rows, clean


def read_jsonl(
    path: Path, key: Sequence[str], *, repair: bool = True, renamed_fields: Mapping[str, str] | None = None
) -> dict[tuple, dict]:
    """Complete rows of a results JSONL, keyed by their ``key`` fields (the last row of a key wins).

    A line cut short by an interruption is dropped and, with ``repair``, the file is rewritten
    without it, so that saving continues from a clean file.
    """
    from ..core.records import write_jsonl_atomic

    listed, clean = jsonl_rows(path, key, renamed_fields=renamed_fields)
    rows = {tuple(row[k] for k in key): row for row in listed}
    if repair and not clean:
        write_jsonl_atomic(path, rows.values())
    return rows


def _refuse_mix(path: Path, reason: str) -> ValueError:
    return ValueError(
        f"{path} holds results of a different run ({reason}); resuming would mix the two. Pass a new "
        "output folder (--out DIR, or out_dir= / out_path= in Python), or discard the old results with "
        "--overwrite (overwrite=True)"
    )


def check_run_folder(
    out_path: str | os.PathLike,
    fingerprint: dict[str, Any],
    *,
    key: Sequence[str],
    partial: bool = False,
    loaded_as: str | None = None,
    renamed_fields: Mapping[str, str] | None = None,
) -> None:
    """Refuse to resume ``out_path`` (a results JSONL) when its rows were made by another run.

    ``partial=True`` compares only the fields ``fingerprint`` holds (before loading a model: dtype,
    settings, versions); ``loaded_as`` is the model name the user asked for, compared with the
    name recorded by the command line. A missing or empty file is fine.
    """
    path = Path(out_path)
    rows = jsonl_rows(path, key, renamed_fields=renamed_fields)[0]
    if not rows:  # nothing saved yet (or no file): nothing to mix with
        return
    record_path = fingerprint_path(path)
    if not record_path.exists():
        raise _refuse_mix(path, f"it has no {record_path.name}, so what made its rows is unknown")
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        stored = record["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise _refuse_mix(path, f"{record_path.name} cannot be read: {err}") from err
    differences = fingerprint_differences(stored, fingerprint, partial=partial)
    hint = record.get("loaded_as")
    if loaded_as is not None and hint is not None and hint.lower() != loaded_as.lower():
        differences.insert(0, f"model: {hint!r} → {loaded_as!r}")
    if differences:
        raise _refuse_mix(path, "; ".join(differences))
    if not partial:
        digest = record.get("digest")
        foreign = {row.get("fingerprint") for row in rows} - {digest}
        if foreign:
            raise _refuse_mix(path, f"rows with fingerprints {sorted(map(str, foreign))} beside {digest!r}")


def record_fingerprint(path: Path, fingerprint: dict[str, Any], loaded_as: str | None, *, key: Sequence[str]) -> None:
    """Keep the run's fingerprint beside its results (a resumed run has the same one, checked before)."""
    from ..core.records import write_json_atomic

    record_path = fingerprint_path(path)
    # a record without rows (a run stopped before its first batch) is stale: this run replaces it
    if not record_path.exists() or not jsonl_rows(path, key)[0]:
        write_json_atomic(
            record_path, {"digest": fingerprint_digest(fingerprint), "fingerprint": fingerprint, "loaded_as": loaded_as}
        )
