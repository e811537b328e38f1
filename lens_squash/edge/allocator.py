"""A steady CPU heap for long loops of batched autograd work (glibc only; elsewhere a no-op).

**Why.** Every batched VJP of :func:`lens_squash.edge.jacobian.jacobian` allocates and frees about a
gigabyte of activation gradients on SmolLM2 at 128 tokens. With glibc's default, self-tuning
settings the freed top of the heap is handed back to the kernel as soon as more than
``M_TRIM_THRESHOLD`` bytes (by default twice the largest freed ``mmap`` block) are free, so the
next batch page-faults the same memory in again: 190 000–430 000 minor faults and 0.3–1.7 s of
system time per 16-probe batch, the first batch of a process paying the most (measured with
``getrusage`` on this project's 2-core machine). Keeping freed memory in the heap for the duration
of the loop removes nearly all of them (74 000, 8 000, then 0 faults in the first three batches) and
the first batch's ~1.5 s penalty, which matters most to the sketch mode: 4 batches instead of 36, so
a fixed cost weighs 9× more (``benchmarks/jacobian.py``: sketch 1.19×, exact 1.04× faster). It is
not a guarantee: a block that does not fit a freed hole still grows the heap.

**What it changes.** Inside :func:`steady_heap`, ``M_TRIM_THRESHOLD`` is raised so that nothing is
trimmed, and ``M_MMAP_THRESHOLD`` is pinned at 32 MiB (glibc's ceiling on 64-bit; blocks below it
come from the reusable heap). Numbers computed inside are bitwise the same as without it (tested).

**What "restore" means.** glibc has no getter for either threshold (``mallopt`` only sets;
``mallinfo2`` reports usage, not settings), and by default it tunes the mmap threshold itself: each
freed ``mmap`` block raises it to that block's size (up to 32 MiB) and the trim threshold to twice
that, so after torch's first large frees a process typically runs at 32 MiB already. On entering
the outermost block the *effective* mmap threshold is therefore measured: blocks of a binary search
of sizes are ``malloc``-ed (never touched) and each chunk header's ``IS_MMAPPED`` bit says whether
glibc mapped it, to 4 KiB. The trim threshold cannot be
measured; it is taken as what this module last set, else the startup setting (``MALLOC_TRIM_THRESHOLD_``
or ``GLIBC_TUNABLES`` in the environment glibc read, ``/proc/self/environ``), else glibc's own rule
(128 KiB until the mmap threshold has moved, then twice it). On leaving, both are set back to those
values and ``malloc_trim(0)`` returns the freed memory to the kernel, so a notebook's resident size
falls back after the call. One thing cannot be restored: any ``mallopt`` of a threshold switches
glibc's dynamic tuning off for good, so after the first block the thresholds stay fixed at the
values they had rather than drifting further. The nesting count is guarded by a lock: threads may
enter and leave in any order, the first entry tunes and the last exit restores.

Set ``LENS_SQUASH_STEADY_HEAP=0`` to turn it off (``benchmarks/jacobian.py --methods
sketch,sketch:plain`` measures its effect that way).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import platform
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ENV_VAR",
    "GLIBC_DEFAULT",
    "MMAP_THRESHOLD",
    "Thresholds",
    "enabled",
    "startup_thresholds",
    "steady_heap",
    "thresholds",
]

#: environment variable that turns the tuning off when set to ``0``
ENV_VAR = "LENS_SQUASH_STEADY_HEAP"
#: blocks at least this large still get their own ``mmap`` (glibc refuses a larger threshold)
MMAP_THRESHOLD = 32 * 2**20
#: glibc's starting value of both thresholds (DEFAULT_MMAP_THRESHOLD_MIN, DEFAULT_TRIM_THRESHOLD; mallopt(3))
GLIBC_DEFAULT = 128 * 1024
_NEVER_TRIM = 2**31 - 1
# mallopt parameter numbers from glibc's <malloc.h>
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3

_lock = threading.Lock()  # guards the three below: blocks may open and close on several threads
_depth = 0  # open steady_heap blocks
_set: Thresholds | None = None  # what this module last passed to mallopt (None: nothing yet)
_before: Thresholds | None = None  # what the outermost open block restores


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """glibc's ``libc`` when this process runs on it (Linux/glibc), else ``None``."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        libc.malloc.argtypes, libc.malloc.restype = [ctypes.c_size_t], ctypes.c_void_p
        libc.free.argtypes, libc.free.restype = [ctypes.c_void_p], None
    except (OSError, AttributeError):
        return None
    return libc


def enabled() -> bool:
    """Whether :func:`steady_heap` will tune anything here (glibc, and not turned off by ``ENV_VAR``)."""
    return os.environ.get(ENV_VAR, "1") != "0" and _glibc() is not None


@dataclass(frozen=True)
class Thresholds:
    """glibc's two heap thresholds, in bytes: ``mmap`` (blocks at least this large get their own ``mmap``)
    and ``trim`` (free memory above this at the heap top goes back to the kernel)."""

    mmap: int
    trim: int


def _startup_environment() -> dict[str, str]:
    """The environment this process started with (what glibc read), else ``os.environ``."""
    try:
        raw = Path("/proc/self/environ").read_bytes()
    except OSError:
        return dict(os.environ)
    pairs = (item.partition(b"=") for item in raw.split(b"\0") if item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, _, v in pairs}


def _configured(env: dict[str, str], variable: str, tunable: str) -> int | None:
    # GLIBC_TUNABLES=glibc.malloc.mmap_threshold=N:glibc.malloc.trim_threshold=M; the variable wins
    items = (item.partition("=") for item in env.get("GLIBC_TUNABLES", "").split(":") if item)
    tunables = {name: value for name, _, value in items}
    for text in (env.get(variable), tunables.get(tunable)):
        try:
            return int(text, 0)
        except (TypeError, ValueError):
            continue
    return None


def _startup_settings() -> tuple[int | None, int | None]:
    env = _startup_environment()
    return (
        _configured(env, "MALLOC_MMAP_THRESHOLD_", "glibc.malloc.mmap_threshold"),
        _configured(env, "MALLOC_TRIM_THRESHOLD_", "glibc.malloc.trim_threshold"),
    )


def startup_thresholds() -> Thresholds:
    """The thresholds this process started with: ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``
    or ``GLIBC_TUNABLES`` when set, else glibc's documented defaults (128 KiB each, mallopt(3))."""
    mmap, trim = _startup_settings()
    return Thresholds(mmap=GLIBC_DEFAULT if mmap is None else mmap, trim=GLIBC_DEFAULT if trim is None else trim)


def thresholds() -> Thresholds:
    """The thresholds this module knows to be set: what it last set, else :func:`startup_thresholds`
    (before the first block, glibc's dynamic tuning may have raised the mmap threshold since)."""
    with _lock:
        return _set if _set is not None else startup_thresholds()


def _is_mmapped(pointer: int) -> bool:
    # glibc's chunk header ends one size_t before the pointer malloc returns; bit 1 of the size
    # field is IS_MMAPPED (malloc/malloc.c, "chunk representations")
    return bool(ctypes.c_size_t.from_address(pointer - ctypes.sizeof(ctypes.c_size_t)).value & 0x2)


_PROBE_STEP = 4096


def _probe(libc) -> tuple[int | None, list[int]]:
    """The smallest request glibc mmaps now (to 4 KiB; ``None`` if it mmaps none up to 32 MiB), and
    the mmapped probe blocks, still held: freeing one would move a dynamic threshold mid-search."""
    held: list[int] = []

    def mmapped(size: int) -> bool:
        pointer = libc.malloc(size)
        if not pointer:
            raise MemoryError(f"malloc({size}) failed while measuring glibc's mmap threshold")
        if _is_mmapped(pointer):
            held.append(pointer)
            return True
        libc.free(pointer)  # a heap block: freeing it leaves the thresholds alone
        return False

    low, high = 0, MMAP_THRESHOLD + _PROBE_STEP  # mmapped(high) unless mmap is off altogether
    if not mmapped(high):
        return None, held
    while high - low > _PROBE_STEP:
        middle = (low + high) // 2 // _PROBE_STEP * _PROBE_STEP or _PROBE_STEP
        if middle in (low, high):
            break
        low, high = (low, middle) if mmapped(middle) else (middle, high)
    return high, held


def _previous(measured: int | None) -> Thresholds:
    """What the outermost block will restore (see the module doc)."""
    if _set is not None:  # this module set both last; glibc no longer tunes them itself
        return _set if measured is None else Thresholds(measured, _set.trim)
    mmap, trim = _startup_settings()
    if mmap is not None or trim is not None:  # configured at startup: glibc's dynamic tuning is off
        return Thresholds(
            measured if measured is not None else (mmap or GLIBC_DEFAULT), GLIBC_DEFAULT if trim is None else trim
        )
    if measured is None:
        return startup_thresholds()
    # glibc's own rule: the trim threshold follows at twice the mmap threshold once that has moved
    return Thresholds(measured, GLIBC_DEFAULT if measured <= GLIBC_DEFAULT + _PROBE_STEP else 2 * measured)


def _apply(libc, values: Thresholds) -> None:
    global _set
    libc.mallopt(_M_MMAP_THRESHOLD, values.mmap)
    libc.mallopt(_M_TRIM_THRESHOLD, values.trim)
    _set = values


@contextlib.contextmanager
def steady_heap() -> Iterator[None]:
    """Keep freed CPU memory in the heap while the block runs; restore the thresholds and give the
    memory back on leaving (see the module doc). Nests, and may be entered from several threads:
    the first entry tunes, the last exit restores."""
    global _depth, _before
    libc = _glibc() if enabled() else None
    if libc is None:
        yield
        return
    with _lock:
        if _depth == 0:
            measured, held = _measure(libc)  # the effective mmap threshold, probe blocks still held
            _before = _previous(measured)
            _apply(libc, Thresholds(mmap=MMAP_THRESHOLD, trim=_NEVER_TRIM))
            for pointer in held:  # freed after mallopt: the dynamic threshold no longer moves
                libc.free(pointer)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:  # only the last block out restores, so nesting and threads are safe
                _apply(libc, _before)
                libc.malloc_trim(0)


def _measure(libc) -> tuple[int | None, list[int]]:
    """:func:`_probe` (a seam: the tests' fake glibc has no heap to probe)."""
    return _probe(libc)
