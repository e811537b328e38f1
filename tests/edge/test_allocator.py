"""The steady heap changes where freed memory goes, never a number; it nests and can be turned off."""

from __future__ import annotations

import os
import subprocess
import sys

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


class _RecordingLibc:
    def __init__(self):
        self.calls: list[tuple] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("malloc_trim", pad))
        return 1


def test_nested_blocks_tune_once_and_give_memory_back_once_at_the_outer_exit(monkeypatch):
    libc = _RecordingLibc()
    monkeypatch.setattr(allocator, "_glibc", lambda: libc)
    monkeypatch.delenv(allocator.ENV_VAR, raising=False)
    with allocator.steady_heap():
        with allocator.steady_heap():
            pass
        assert libc.calls == [("mallopt", -3, allocator.MMAP_THRESHOLD), ("mallopt", -1, 2**31 - 1)]
    assert libc.calls[2:] == [("mallopt", -1, 2 * allocator.MMAP_THRESHOLD), ("malloc_trim", 0)]
    with pytest.raises(RuntimeError), allocator.steady_heap():
        raise RuntimeError("an error inside still gives the memory back")
    assert libc.calls[-1] == ("malloc_trim", 0) and allocator._depth == 0
    monkeypatch.setenv(allocator.ENV_VAR, "0")
    with allocator.steady_heap():
        pass
    assert len(libc.calls) == 8  # turned off: nothing more


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
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", _JACOBIAN_FAULTS], capture_output=True,
                          text=True, env=env, check=True)
    return int(done.stdout.split()[-1])


@needs_glibc
def test_a_jacobian_page_faults_its_chunks_in_far_less_often_with_the_steady_heap():
    # measured 4 times each: steady 8 688–10 290 faults, plain 22 126–32 178 (glibc trims the heap
    # after every chunk, so each chunk faults its temporaries in again)
    steady, plain = _jacobian_faults(steady=True), _jacobian_faults(steady=False)
    assert steady < 0.7 * plain, (steady, plain)


def test_no_op_where_glibc_is_absent(monkeypatch):
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    assert not allocator.enabled()
    with allocator.steady_heap():
        assert allocator._depth == 0
