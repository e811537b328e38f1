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
come from the reusable heap). On leaving, the trim threshold goes back to 64 MiB and
``malloc_trim(0)`` returns the freed memory to the kernel, so a notebook's resident size falls back
after the call. glibc has no getter for these settings, so they are left at the values its own
dynamic tuning converges to after large frees (mmap threshold 32 MiB, trim threshold twice that)
rather than "restored". Numbers computed inside are bitwise the same as without it (tested).

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
from collections.abc import Iterator

__all__ = ["ENV_VAR", "MMAP_THRESHOLD", "enabled", "steady_heap"]

#: environment variable that turns the tuning off when set to ``0``
ENV_VAR = "LENS_SQUASH_STEADY_HEAP"
#: blocks at least this large still get their own ``mmap`` (glibc refuses a larger threshold)
MMAP_THRESHOLD = 32 * 2**20
_TRIM_AFTER = 2 * MMAP_THRESHOLD
_NEVER_TRIM = 2**31 - 1
# mallopt parameter numbers from glibc's <malloc.h>
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_depth = 0


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


@contextlib.contextmanager
def steady_heap() -> Iterator[None]:
    """Keep freed CPU memory in the heap while the block runs; give it back on leaving (see module doc)."""
    global _depth
    libc = _glibc() if enabled() else None
    if libc is None:
        yield
        return
    if _depth == 0:
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:  # only the outermost block gives memory back, so nesting is safe
            libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_AFTER)
            libc.malloc_trim(0)
