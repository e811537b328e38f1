"""The steady heap changes where freed memory goes, never a number; it nests and can be turned off."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from lens_squash.edge import allocator
from lens_squash.edge.jacobian import jacobian
from lens_squash.edge.models import tiny_model

needs_glibc = pytest.mark.skipif(allocator._glibc() is None, reason="the steady heap tunes glibc only")


def _model():
    return tiny_model(n_layers=2, n_heads=2, d_model=32, d_vocab=50, dtype=torch.float32, seed=1)


def test_jacobian_is_bitwise_the_same_with_and_without_the_steady_heap(monkeypatch):
    model, tokens = _model(), torch.arange(3, 15)
    steady = jacobian(model, tokens, keep_full=True)
    monkeypatch.setenv(allocator.ENV_VAR, "0")
    assert not allocator.enabled()
    plain = jacobian(model, tokens, keep_full=True)
    assert torch.equal(steady.full, plain.full)
    assert torch.equal(steady.spectral, plain.spectral) and torch.equal(steady.frobenius, plain.frobenius)


class _FakeGlibc:
    """glibc's two thresholds as state, starting at ``start``: ``mallopt`` sets them, ``malloc_trim`` is
    counted with the thresholds in force when it ran. ``delay`` widens the window between a thread's
    check of the nesting count and its update (an unlocked count then races every time)."""

    def __init__(self, start: dict[int, int], delay: float = 0.0):
        self.state, self.delay = dict(start), delay
        self.tunings = 0
        self.trims: list[dict[int, int]] = []

    def mallopt(self, param: int, value: int) -> int:
        time.sleep(self.delay)
        self.tunings += param == MMAP and value == allocator.MMAP_THRESHOLD
        self.state[param] = value
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.trims.append(dict(self.state))
        return 1


MMAP, TRIM = -3, -1  # mallopt's M_MMAP_THRESHOLD and M_TRIM_THRESHOLD (<malloc.h>)
# the environment glibc read at startup, and the thresholds it gives (by hand: 256 KiB; 0x100000 = 1 MiB)
STARTUP_ENV = {"MALLOC_MMAP_THRESHOLD_": "262144", "GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0x100000"}
STARTUP = {MMAP: 262144, TRIM: 1048576}


@pytest.fixture()
def fake_glibc(monkeypatch):
    def install(delay: float = 0.0) -> _FakeGlibc:
        libc = _FakeGlibc(STARTUP, delay)
        monkeypatch.setattr(allocator, "_glibc", lambda: libc)
        monkeypatch.setattr(allocator, "_startup_environment", lambda: dict(STARTUP_ENV))
        monkeypatch.setattr(allocator, "_set", None)  # as in a process where no block has run yet
        monkeypatch.setattr(allocator, "_measure", lambda libc: (libc.state[MMAP], []))  # what glibc would report
        monkeypatch.delenv(allocator.ENV_VAR, raising=False)
        return libc

    return install


def _tuned(state: dict[int, int]) -> bool:
    # blocks below 32 MiB come from the heap, and the heap top is never trimmed (2³¹ - 1 bytes)
    return state[MMAP] == allocator.MMAP_THRESHOLD and state[TRIM] >= 2**31 - 1


def test_the_startup_thresholds_come_from_the_environment_glibc_read(monkeypatch):
    for env, expected in [
        ({}, (128 * 1024, 128 * 1024)),  # glibc's documented defaults
        (STARTUP_ENV, (STARTUP[MMAP], STARTUP[TRIM])),
        # the variable wins over the tunable, as in glibc; an unreadable value falls back to the default
        (
            {
                "MALLOC_TRIM_THRESHOLD_": "4096",
                "GLIBC_TUNABLES": "glibc.malloc.trim_threshold=8192:x=1",
                "MALLOC_MMAP_THRESHOLD_": "lots",
            },
            (128 * 1024, 4096),
        ),
    ]:
        monkeypatch.setattr(allocator, "_startup_environment", lambda env=env: dict(env))
        assert allocator.startup_thresholds() == allocator.Thresholds(*expected)


def test_nested_blocks_tune_once_and_restore_the_thresholds_from_before_at_the_outer_exit(fake_glibc):
    libc = fake_glibc()
    before = allocator.thresholds()
    assert before == allocator.Thresholds(mmap=STARTUP[MMAP], trim=STARTUP[TRIM])
    with allocator.steady_heap():
        with allocator.steady_heap():
            assert _tuned(libc.state)
        assert _tuned(libc.state) and not libc.trims  # the inner exit neither restores nor trims
        assert allocator.thresholds() != before
    assert libc.state == STARTUP and allocator.thresholds() == before
    assert libc.trims == [STARTUP] and libc.tunings == 1  # one trim, after the restore
    with pytest.raises(RuntimeError), allocator.steady_heap():
        assert _tuned(libc.state)
        raise RuntimeError("an error inside still restores and gives the memory back")
    assert libc.state == STARTUP and len(libc.trims) == 2 and allocator._depth == 0


def test_glibcs_dynamic_threshold_is_measured_and_restored_with_the_trim_rule(fake_glibc, monkeypatch):
    # nothing configured at startup, and torch's large frees have moved the mmap threshold to 8 MiB
    libc = fake_glibc()
    monkeypatch.setattr(allocator, "_startup_environment", lambda: {})
    libc.state = {MMAP: 8 * 2**20, TRIM: 16 * 2**20}  # glibc keeps trim at twice mmap once it moves
    with allocator.steady_heap():
        assert _tuned(libc.state)
    assert libc.state == {MMAP: 8 * 2**20, TRIM: 16 * 2**20}
    # unmoved (128 KiB) it restores both at 128 KiB; a measurement that fails falls back to the startup values
    libc = fake_glibc()
    monkeypatch.setattr(allocator, "_startup_environment", lambda: {})
    libc.state = {MMAP: 128 * 1024, TRIM: 128 * 1024}
    with allocator.steady_heap():
        pass
    assert libc.state == {MMAP: 128 * 1024, TRIM: 128 * 1024}
    libc = fake_glibc()
    monkeypatch.setattr(allocator, "_measure", lambda libc: (None, []))
    with allocator.steady_heap():
        pass
    assert libc.state == STARTUP


def test_a_block_restores_what_an_earlier_setting_left_not_the_startup_values(fake_glibc):
    libc = fake_glibc()
    with allocator.steady_heap():
        pass
    # a later block opened inside another thread's tuned block must not take the tuned values as "before"
    gate, inside = threading.Event(), threading.Event()

    def hold():
        with allocator.steady_heap():
            inside.set()
            gate.wait(5)

    thread = threading.Thread(target=hold)
    thread.start()
    inside.wait(5)
    with allocator.steady_heap():
        assert _tuned(libc.state)
    assert _tuned(libc.state)  # the other thread is still inside
    gate.set()
    thread.join(5)
    assert libc.state == STARTUP and libc.tunings == 2


def test_threads_entering_and_leaving_together_tune_once_and_restore_once(fake_glibc):
    libc = fake_glibc(delay=0.002)  # each mallopt sleeps: an unlocked count lets several threads tune
    n = 6
    all_inside = threading.Barrier(n)
    seen: list[bool] = []

    def work(i: int):
        with allocator.steady_heap():
            all_inside.wait(5)
            seen.append(_tuned(libc.state))
            time.sleep(0.001 * (n - i))  # leave in reverse order of start, overlapping

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert seen == [True] * n  # no thread ever ran with the thresholds already restored
    assert libc.tunings == 1 and libc.trims == [STARTUP] and libc.state == STARTUP
    assert allocator._depth == 0


def test_turned_off_it_touches_nothing(fake_glibc, monkeypatch):
    libc = fake_glibc()
    monkeypatch.setenv(allocator.ENV_VAR, "0")
    with allocator.steady_heap():
        assert libc.state == STARTUP
    assert libc.tunings == 0 and not libc.trims


# The real glibc, in a fresh interpreter (no torch, so no earlier large frees): mallinfo2 counts the
# blocks that got their own mmap (hblks) and the releasable memory at the heap top (keepcost). A
# 4 MiB block is mmapped under a 128 KiB mmap threshold but comes from the heap under 32 MiB; freed
# at the heap top it is trimmed away under a 128 KiB trim threshold but kept when trimming is off.
_REAL_GLIBC = """
import ctypes, json
from lens_squash.edge import allocator
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype, libc.malloc.restype = Info, ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.malloc.argtypes = [ctypes.c_size_t]
def probe(size=4 * 2**20):
    before = libc.mallinfo2().hblks
    block = libc.malloc(size)
    mmapped = libc.mallinfo2().hblks > before
    libc.free(block)
    return {"mmapped": mmapped, "kept": libc.mallinfo2().keepcost >= size}
out = {"before": probe()}
with allocator.steady_heap():
    out["inside"] = probe()
out["after"] = probe()
print(json.dumps(out))
"""


def _real_glibc(env: dict[str, str]) -> dict:
    env = {**os.environ, **env, allocator.ENV_VAR: "1"}
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", _REAL_GLIBC], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(done.stdout.split("\n")[-2])


# glibc's own tuning, nothing configured: an 8 MiB mapped block, freed, moves the mmap threshold to
# 8 MiB. Then a 4 MiB block comes from the heap and a 12 MiB one is mapped, before and after the
# block (inside, both come from the heap). The 12 MiB block is held across the block, so that its
# own free cannot move the threshold it is meant to witness.
_DYNAMIC = (
    _REAL_GLIBC.split("out = ")[0]
    + """
def mapped(size):
    block = libc.malloc(size)
    return block, allocator._is_mmapped(block)
big, _ = mapped(8 * 2**20)
libc.free(big)
held, before_12 = mapped(12 * 2**20)
out = {"before": [probe()["mmapped"], before_12]}
with allocator.steady_heap():
    inside = mapped(12 * 2**20)
    out["inside"] = [probe()["mmapped"], inside[1]]
    libc.free(inside[0])
libc.free(held)
after = mapped(12 * 2**20)
out["after"] = [probe()["mmapped"], after[1]]
print(json.dumps(out))
"""
)


@needs_glibc
def test_real_glibc_dynamic_threshold_is_measured_and_restored():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", _DYNAMIC],
        capture_output=True,
        text=True,
        env={**env, allocator.ENV_VAR: "1"},
        check=True,
    )
    seen = json.loads(done.stdout.splitlines()[-1])
    # [4 MiB mapped?, 12 MiB mapped?]: the old code left 32 MiB (12 MiB from the heap after), a
    # restore to glibc's 128 KiB default would map the 4 MiB block after
    assert seen == {"before": [False, True], "inside": [False, False], "after": [False, True]}, seen


@needs_glibc
def test_real_glibc_thresholds_after_the_block_equal_those_before():
    # mmap threshold 128 KiB: the block is mmapped before and after, from the heap inside
    small = _real_glibc({"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)})
    assert [small[k]["mmapped"] for k in ("before", "inside", "after")] == [True, False, True], small
    # heap blocks (mmap threshold 16 MiB) and a 128 KiB trim threshold: trimmed before and after, kept inside
    trim = _real_glibc({"MALLOC_MMAP_THRESHOLD_": str(16 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(128 * 1024)})
    assert not any(trim[k]["mmapped"] for k in trim), trim
    assert [trim[k]["kept"] for k in ("before", "inside", "after")] == [False, True, False], trim


# In a fresh interpreter per setting, so that earlier tests' heap cannot blur the count: the minor page
# faults of one sketched Jacobian with 8 chunks of 16 probes, after a warm-up call.
_JACOBIAN_FAULTS = """
import resource, torch
from lens_squash.edge.jacobian import jacobian
from lens_squash.edge.models import tiny_model
model = tiny_model(n_layers=2, n_heads=4, d_model=128, d_vocab=100, dtype=torch.float32, seed=0, n_ctx=128)
tokens = torch.randint(0, 100, (96,), generator=torch.Generator().manual_seed(0))
jacobian(model, tokens[:8], mode="sketch", n_probes=4)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
jacobian(model, tokens, mode="sketch", n_probes=128, chunk_size=16)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _jacobian_faults(steady: bool) -> int:
    env = {**os.environ, allocator.ENV_VAR: "1" if steady else "0"}
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", _JACOBIAN_FAULTS], capture_output=True, text=True, env=env, check=True
    )
    return int(done.stdout.split()[-1])


@pytest.mark.hooked  # the subprocess builds a tiny_model
@pytest.mark.slow  # two fresh interpreters each run a Jacobian: the slowest test of make test-fast before
@needs_glibc
def test_a_jacobian_page_faults_its_chunks_in_far_less_often_with_the_steady_heap():
    # measured 4 times each: steady 8 688–10 290 faults, plain 22 126–32 178 (glibc trims the heap
    # after every chunk, so each chunk faults its temporaries in again)
    steady, plain = _jacobian_faults(steady=True), _jacobian_faults(steady=False)
    assert steady < 0.7 * plain, (steady, plain)


def test_no_op_where_glibc_is_absent(monkeypatch):
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    assert not allocator.enabled()
    before = allocator.thresholds()
    with allocator.steady_heap():
        assert allocator._depth == 0 and allocator.thresholds() == before  # nothing opened, nothing set
