"""Weight-only factors (the certified bound's Gram matrices) computed once: in memory and on disk.

A factor that depends on the weights alone (an MLP's float64 Gram, seconds per model on 2 cores)
should not be rebuilt by every trace, nor by every fresh CLI process.

**In memory**, per owner module (weakly held, so a dropped model frees its factors): ``owner →
(key, value)``. The key holds each weight's identity, version and checksum
(:func:`lens_squash.algebra.blocks.weight_signature`), so an in-place edit makes it stale. The room is
sized to the machine, not to a count of layers: :func:`memory_budget` is :data:`MEMORY_SHARE` of the
free memory plus what the cache already holds (``budget`` overrides it with a fixed number of bytes).
A factor that does not fit is used once and not kept.

**On disk**, under ``$LENS_SQUASH_CACHE/factors`` (default ``~/.cache/lens_squash``, beside the
converted models), one file per factor named by its kind and a SHA-1 of the bytes of every weight it
reads (plus its shape and format version): an edited model looks up another file. Files are written
to a temporary name and renamed into place (a reader never sees half a file), and verified on read:
magic, header, exact length and a CRC-32 of the payload; a file that fails any check is ignored and
rebuilt (then overwritten), never trusted. CRC-32 catches truncation and corruption, not a forger
with write access to the cache (who could equally edit the weights). Factors under
:data:`DISK_MIN_BYTES` are not written: rebuilding them is cheaper than hashing and reading.
``LENS_SQUASH_FACTOR_CACHE=0`` turns the disk cache off.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import weakref
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..algebra.symmetric_forms import LowerBlocks
from .jacobian_memory import available_memory

__all__ = [
    "DISK_ENV",
    "DISK_MIN_BYTES",
    "FORMAT",
    "MEMORY_SHARE",
    "FactorCache",
    "factor_dir",
    "nbytes",
    "read_factor",
    "weights_digest",
    "write_factor",
]

#: share of the free memory the in-memory cache may hold (SmolLM2's 30 Grams: 1.3 GB as lower blocks)
MEMORY_SHARE = 0.25
#: factors smaller than this stay off the disk (a tiny model's Gram rebuilds faster than it hashes)
DISK_MIN_BYTES = 4 * 2**20
#: ``0`` turns the disk cache off
DISK_ENV = "LENS_SQUASH_FACTOR_CACHE"
#: bumped whenever what a factor means or how it is stored changes: old files are then not found
FORMAT = 1
_MAGIC = b"LSQFACT1"
_ALIGN = 64

Value = Tensor | tuple[Tensor, ...] | LowerBlocks


def nbytes(value: Value) -> int:
    if isinstance(value, LowerBlocks):
        return value.nbytes
    return sum(t.numel() * t.element_size() for t in (value if isinstance(value, tuple) else (value,)))


def factor_dir() -> Path:
    """``$LENS_SQUASH_CACHE/factors`` (default ``~/.cache/lens_squash/factors``)."""
    return Path(os.environ.get("LENS_SQUASH_CACHE", Path.home() / ".cache" / "lens_squash")) / "factors"


def weights_digest(tensors: Sequence[Tensor | None], *labels: object) -> str:
    """SHA-1 of the weights' bytes, shapes and dtypes, and ``labels`` (what is built from them)."""
    digest = hashlib.sha1(json.dumps([FORMAT, *map(str, labels)]).encode())
    for t in tensors:
        if t is None:
            digest.update(b"none")
            continue
        flat = t.detach().to("cpu").contiguous()
        digest.update(f"{flat.dtype}{tuple(flat.shape)}".encode())
        digest.update(flat.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# the file format: magic, header length, JSON header, payload (each tensor 64-byte aligned)
# --------------------------------------------------------------------------------------------------


def _layout(value: Value) -> tuple[dict[str, Any], list[Tensor]]:
    if isinstance(value, LowerBlocks):
        return {"type": "lower", "size": value.size, "starts": list(value.starts)}, list(value.columns)
    if isinstance(value, tuple):
        return {"type": "tuple"}, list(value)
    return {"type": "tensor"}, [value]


def _rebuild(layout: dict[str, Any], tensors: list[Tensor]) -> Value:
    if layout["type"] == "lower":
        return LowerBlocks(int(layout["size"]), tuple(int(s) for s in layout["starts"]), tuple(tensors))
    return tuple(tensors) if layout["type"] == "tuple" else tensors[0]


def _padded(size: int) -> int:
    return -(-size // _ALIGN) * _ALIGN


def write_factor(path: Path, value: Value, digest: str) -> None:
    """Write ``value`` atomically (temporary file in the same folder, then ``os.replace``)."""
    layout, tensors = _layout(value)
    tensors = [t.detach().to("cpu").contiguous() for t in tensors]
    crc, specs, offset = 0, [], 0
    for t in tensors:
        size = t.numel() * t.element_size()
        crc = zlib.crc32(t.reshape(-1).view(torch.uint8).numpy().data, crc)
        specs.append({"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "offset": offset})
        offset += _padded(size)
    header = json.dumps({"digest": digest, "layout": layout, "tensors": specs, "crc32": crc, "payload": offset})
    head = _MAGIC + struct.pack("<Q", len(header)) + header.encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False)
    try:
        with handle:
            handle.write(head + b"\0" * (_padded(len(head)) - len(head)))
            for t in tensors:
                size = t.numel() * t.element_size()
                handle.write(t.reshape(-1).view(torch.uint8).numpy().data)
                handle.write(b"\0" * (_padded(size) - size))
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def read_factor(path: Path, digest: str) -> Value | None:
    """The factor stored at ``path`` for ``digest``, or ``None`` when it is missing or fails any check."""
    try:
        with open(path, "rb") as handle:
            magic, (length,) = handle.read(len(_MAGIC)), struct.unpack("<Q", handle.read(8))
            if magic != _MAGIC or length > 2**24:
                return None
            header = json.loads(handle.read(length))
            start = _padded(len(_MAGIC) + 8 + length)
            if header["digest"] != digest or os.fstat(handle.fileno()).st_size != start + header["payload"]:
                return None
            handle.seek(start)
            payload = torch.empty(header["payload"], dtype=torch.uint8)
            if handle.readinto(payload.numpy().data) != header["payload"]:
                return None
        tensors, crc = [], 0
        for spec in header["tensors"]:
            dtype = getattr(torch, spec["dtype"])
            count = int(torch.Size(spec["shape"]).numel())
            size = count * torch.empty((), dtype=dtype).element_size()
            raw = payload[spec["offset"] : spec["offset"] + size]
            crc = zlib.crc32(raw.numpy().data, crc)
            tensors.append(raw.view(dtype).reshape(spec["shape"]))
        return _rebuild(header["layout"], tensors) if crc == header["crc32"] else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError, struct.error):
        return None  # unreadable, truncated or malformed: rebuild


# --------------------------------------------------------------------------------------------------
# the cache
# --------------------------------------------------------------------------------------------------


class FactorCache:
    """``owner → (key, value)`` within a memory budget, backed by the disk (see the module doc).

    ``budget()``: bytes the memory side may hold, read at each insertion (``None``: :data:`MEMORY_SHARE`
    of the free memory).
    """

    def __init__(self, budget: Callable[[], int | None] = lambda: None):
        self.budget = budget
        self.entries: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def cached_bytes(self) -> int:
        return sum(nbytes(value) for _, value in list(self.entries.values()))

    def memory_budget(self, device: str | torch.device = "cpu") -> int:
        """Bytes the memory side may hold now: ``budget``, else a share of ``device``'s free memory plus
        what it holds (a GPU model's factors live on the GPU)."""
        fixed = self.budget()
        if fixed is not None:
            return int(fixed)
        return int(MEMORY_SHARE * (available_memory(device) + self.cached_bytes()))

    def clear(self) -> None:
        self.entries.clear()

    def get(
        self,
        owner,
        key: tuple,
        build: Callable[[], Value],
        *,
        weights: Callable[[], Sequence[Tensor | None]],
        label: str,
    ) -> Value:
        """``owner``'s factor under ``key``: from memory, else from disk (verified), else ``build()``.

        ``weights()`` gives every tensor the factor reads (hashed for the file name only on a memory miss).
        """
        hit = self.entries.get(owner)
        if hit is not None and hit[0] == key:
            return hit[1]
        self.entries.pop(owner, None)  # a stale entry for edited weights frees its room first
        value = self._from_disk_or_build(key, build, weights, label)
        if self.cached_bytes() + nbytes(value) <= self.memory_budget(_layout(value)[1][0].device):
            self.entries[owner] = (key, value)
        return value

    def _from_disk_or_build(self, key: tuple, build, weights, label: str) -> Value:
        if os.environ.get(DISK_ENV, "1") == "0":
            return build()
        tensors = list(weights())
        digest = weights_digest(tensors, label, *key[:-1])  # key[-1]: the in-memory signature
        path = factor_dir() / f"{label}-{digest}.bin"
        value = read_factor(path, digest) if path.exists() else None
        if value is not None:
            return _on(value, next(t.device for t in tensors if t is not None))
        value = build()
        if nbytes(value) >= DISK_MIN_BYTES:
            try:
                write_factor(path, value, digest)
            except OSError:  # a read-only or full disk costs the next process a rebuild, nothing more
                pass
        return value


def _on(value: Value, device: torch.device) -> Value:
    """``value`` on the device of the weights it was built from (the file is read to the CPU)."""
    if device.type == "cpu":
        return value
    layout, tensors = _layout(value)
    return _rebuild(layout, [t.to(device) for t in tensors])
