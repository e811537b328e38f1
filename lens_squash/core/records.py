"""Provenance and atomic persistence for every result lens_squash writes.

A result file must say how it was made (model, dtype, prompt, library versions) and must never be
seen half-written: each writer stages into a temporary file in the target folder and ``os.replace``s
it into place, which is atomic on POSIX file systems.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "atomic_write",
    "provenance",
    "target_mode",
    "to_jsonable",
    "write_json_atomic",
    "write_jsonl_atomic",
    "write_text_atomic",
]

_PACKAGES = ("lens-squash", "torch", "transformer-lens", "transformers", "gguf", "numpy", "plotly")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def provenance(model=None, **extra: Any) -> dict[str, Any]:
    """Metadata that lets a result be reproduced: model config, versions, host and the call's args."""
    meta: dict[str, Any] = {
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {pkg: _version(pkg) for pkg in _PACKAGES},
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
    }
    if model is not None:
        cfg = model.cfg
        meta["model"] = {
            "name": cfg.model_name,
            "dtype": str(cfg.dtype).removeprefix("torch."),
            "n_layers": cfg.n_layers,
            "n_heads": cfg.n_heads,
            "d_model": cfg.d_model,
            "n_ctx": cfg.n_ctx,
            "device": str(cfg.device),
        }
    meta.update(to_jsonable(extra))
    return meta


def to_jsonable(value: Any) -> Any:
    """Tensors, numpy arrays and dataclass-like values as plain JSON; NaN/inf become null."""
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.detach().cpu().tolist())
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return to_jsonable(value.tolist())
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (torch.dtype, Path)):
        return str(value)
    return str(value)


def _umask() -> int:
    """The process umask, read without changing it (``os.umask`` can only be read by setting it,
    which would race with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def target_mode(path: Path) -> int:
    """The permission rule of every result file: an existing file keeps its mode; a new one gets what
    ``open(path, "w")`` would give it (``0o666`` less the umask). ``mkstemp`` alone would make it 0600."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_umask()


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)``, flush it to disk, then move the file into ``path`` atomically.

    A reader, or a crash at any point, sees either the previous file or the complete new one; a
    failure removes the temporary file. The mode follows :func:`target_mode`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, target_mode(path))
        with open(tmp, "rb") as handle:  # the data must be on disk before the rename publishes it
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    # allow_nan=False: NaN is not JSON; to_jsonable already turned it into null.
    text = json.dumps(to_jsonable(obj), indent=1, allow_nan=False)
    return write_text_atomic(path, text)


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> Path:
    """One JSON object per line (:func:`.jsonl.jsonl_line`: ``\n`` ends a row and nothing else does),
    the whole file replaced atomically (no half-appended last line)."""
    from .jsonl import jsonl_line  # here: records.py also runs alone (tests load it as a single file)

    body = "".join(jsonl_line(to_jsonable(dict(row))) for row in rows)
    return write_text_atomic(path, body)
