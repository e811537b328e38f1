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
``mallinfo2`` reports usage, not settings), so on leaving the outermost block they are set back to
the values *before* it as this module knows them: what an earlier block of this module left, else
the values the process started with (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` or
``GLIBC_TUNABLES`` from the environment glibc read at startup, ``/proc/self/environ``; else glibc's
documented defaults, 128 KiB each). Then ``malloc_trim(0)`` returns the freed memory to the kernel,
so a notebook's resident size falls back after the call. One thing cannot be restored: glibc's
*dynamic* threshold (which follows the largest freed ``mmap`` block) is switched off for good by any
``mallopt`` of a threshold, so after the first block the thresholds stay fixed at those values
instead of drifting. :func:`thresholds` says what is in force. The nesting count is guarded by a
lock: threads may enter and leave in any order, the first entry tunes and the last exit restores.

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

__all__ = ["ENV_VAR", "GLIBC_DEFAULT", "MMAP_THRESHOLD", "Thresholds", "enabled", "startup_thresholds", "steady_heap",
           "thresholds"]

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


def _tunables(env: dict[str, str]) -> dict[str, str]:
    # GLIBC_TUNABLES=glibc.malloc.mmap_threshold=N:glibc.malloc.trim_threshold=M
    items = (item.partition("=") for item in env.get("GLIBC_TUNABLES", "").split(":") if item)
    return {name: value for name, _, value in items}


def _configured(env: dict[str, str], variable: str, tunable: str) -> int:
    for text in (env.get(variable), _tunables(env).get(tunable)):  # glibc lets the variable win
        try:
            return int(text, 0)
        except (TypeError, ValueError):
            continue
    return GLIBC_DEFAULT


def startup_thresholds() -> Thresholds:
    """The thresholds this process started with: ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``
    or ``GLIBC_TUNABLES`` when set, else glibc's documented defaults (128 KiB each, mallopt(3))."""
    env = _startup_environment()
    return Thresholds(mmap=_configured(env, "MALLOC_MMAP_THRESHOLD_", "glibc.malloc.mmap_threshold"),
                      trim=_configured(env, "MALLOC_TRIM_THRESHOLD_", "glibc.malloc.trim_threshold"))


def thresholds() -> Thresholds:
    """The thresholds in force as far as this module can know: what it last set, else :func:`startup_thresholds`."""
    with _lock:
        return _set if _set is not None else startup_thresholds()


def _apply(libc: ctypes.CDLL, values: Thresholds) -> None:
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
            _before = _set if _set is not None else startup_thresholds()
            _apply(libc, Thresholds(mmap=MMAP_THRESHOLD, trim=_NEVER_TRIM))
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:  # only the last block out restores, so nesting and threads are safe
                _apply(libc, _before)
                libc.malloc_trim(0)
