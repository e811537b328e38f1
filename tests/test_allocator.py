"""The steady heap changes where freed memory goes, never a number; it nests and can be turned off."""

from __future__ import annotations

import resource

import pytest
import torch

from lens_squash import allocator
from lens_squash.jacobian import jacobian
from lens_squash.models import tiny_model

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


@needs_glibc
def test_freed_memory_is_reused_inside_nesting_keeps_it_and_leaving_gives_it_back(monkeypatch):
    monkeypatch.delenv(allocator.ENV_VAR, raising=False)
    size = 24 * 2**20  # below the pinned mmap threshold: served from the heap

    def faults_of_a_fresh_block() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(size // 4)  # written once, then freed
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    with allocator.steady_heap():
        faults_of_a_fresh_block()  # the heap grows once
        with allocator.steady_heap():
            pass  # leaving an inner block must not trim the heap
        reused = faults_of_a_fresh_block()
    pages = size // resource.getpagesize()
    # memory kept in the heap is written without faulting it in again (allow a little noise)
    assert reused < pages // 10, (reused, pages)
    assert allocator._depth == 0
    # leaving the outer block hands the freed memory back to the kernel: the same block faults again
    assert faults_of_a_fresh_block() > pages // 2


def test_no_op_where_glibc_is_absent(monkeypatch):
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    assert not allocator.enabled()
    with allocator.steady_heap():
        assert allocator._depth == 0
