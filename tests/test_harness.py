"""benchmarks/harness.py: FLOP counts against torch's own counter, the median of pairwise ratios by
brute force, alternation order and the CPU-share flag on scripted clocks."""

from __future__ import annotations

import importlib.util
import itertools
import os
import statistics
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lens_squash.edge.models import tiny_model

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "harness.py"
_spec = importlib.util.spec_from_file_location("harness", PATH)
harness = importlib.util.module_from_spec(_spec)
sys.modules["harness"] = harness  # dataclasses look their module up there
_spec.loader.exec_module(harness)


@pytest.mark.parametrize(
    "shape",
    [dict(), dict(gated_mlp=True, act_fn="silu", norm="RMS", positional="rotary", n_key_value_heads=1, n_heads=2)],
)
def test_forward_flops_equal_torchs_flop_counter(shape):
    model = tiny_model(n_layers=3, d_model=32, d_mlp=48, **shape)
    tokens = torch.arange(1, 12)[None]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(tokens)
    assert harness.forward_flops(model.cfg, tokens.shape[1]) == counter.get_total_flops()


def _scripted(values):
    it = iter(values)
    return lambda: next(it)


def test_alternate_runs_a_then_b_and_reports_the_median_of_pairwise_ratios():
    order = []
    wall = [0, 1, 1, 3, 3, 5, 5, 11, 11, 12, 12, 13]  # A 1, B 2 | A 2, B 6 | A 1, B 1
    pair = harness.alternate(
        lambda: order.append("a"),
        lambda: order.append("b"),
        3,
        clock=_scripted(wall),
        cpu=_scripted(list(itertools.chain.from_iterable((w, w) for w in wall))[::2]),
        n_threads=1,
    )
    assert order == ["a", "b"] * 3
    assert pair.ratios == [2.0, 3.0, 1.0]
    assert pair.median_ratio == statistics.median([2.0, 3.0, 1.0]) == 2.0
    assert pair.cpu_ratios == [2.0, 3.0, 1.0]  # the scripted CPU clock ticks with the wall clock


def test_a_run_starved_of_cpu_is_flagged():
    busy = harness.Timing(seconds=10, cpu_seconds=19, threads=2, load_before=1, load_after=1)
    starved = harness.Timing(seconds=10, cpu_seconds=17, threads=2, load_before=9, load_after=9)
    assert busy.cpu_share == pytest.approx(0.95) and not busy.flagged
    assert starved.cpu_share == pytest.approx(0.85) and starved.flagged and "FLAGGED" in starved.describe()
    _, timing = harness.timed(lambda: None, clock=_scripted([0, 4]), cpu=_scripted([0, 1]), n_threads=2)
    assert timing.cpu_share == pytest.approx(1 / 8) and timing.flagged


def test_matmul_rate_is_positive_and_finite():
    rate = harness.matmul_gflops("float32", size=64, repeats=1)
    assert 0 < rate < float("inf")


def test_gram_and_quadratic_form_flops_equal_torchs_flop_counter():
    from lens_squash.algebra.symmetric_forms import quadratic_form
    from lens_squash.edge.lipschitz import _gram_blocks_from, _mlp_matrices, supports_certified

    # rotary (the flops do not depend on positions): a transformers Llama twin exists, so both backends run it
    model = tiny_model(
        n_layers=2, d_model=32, d_mlp=48, gated_mlp=True, act_fn="silu", norm="RMS", positional="rotary",
        dtype=torch.float64,
    )  # fmt: skip
    shape = supports_certified(model)
    with FlopCounterMode(display=False) as counter:
        grams = [_gram_blocks_from(block, shape, *_mlp_matrices(block)) for block in model.blocks]
    assert harness.gram_flops(model.cfg) == counter.get_total_flops()
    coeff = torch.randn(5, grams[0].size, dtype=torch.float64)
    with FlopCounterMode(display=False) as counter:
        for gram in grams:
            quadratic_form(coeff, gram)
    assert harness.quadratic_form_flops(model.cfg, 5) == counter.get_total_flops()


def _resident_bytes() -> int:
    """This process's resident set now: /proc/self/statm's second field, in pages."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_with_peak_records_each_runs_own_high_water_mark():
    """A run that touches 256 MiB peaks at least that far above what was resident; a later run that
    touches 16 MiB is not charged the first run's peak once the high-water mark is reset."""
    if not harness.reset_peak_rss():
        pytest.skip("this kernel offers no resettable high-water mark (/proc/self/clear_refs)")
    big, small = 256 * 2**20, 16 * 2**20
    peaks: list[int] = []
    resident = [0]
    resident_now: list[int] = []

    def touch(size):
        def run():
            resident[0] = harness.peak_rss()  # just after the reset: what is resident now
            resident_now.append(_resident_bytes())  # the same, read apart from the high-water mark
            buffer = torch.ones(size // 4)  # written, so every page is resident
            return float(buffer[-1])

        return run

    harness.with_peak(touch(big), peaks)()
    first_resident = resident[0]
    harness.with_peak(touch(small), peaks)()
    assert peaks[0] >= first_resident + big * 0.95
    # the big run's peak was forgotten: the small run peaks near what was resident when it began, read from
    # /proc/self/statm (not the high-water mark under test), since a long session's resident set may grow
    assert peaks[1] < resident_now[1] + small + (big - small) * 0.5
