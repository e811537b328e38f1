"""The shared measuring rules of the benchmarks: alternation, load, CPU share and FLOP accounting.

On a shared machine a ratio whose two sides ran at different loads means little (issue 28 saw one
swing from 0.46× to 3.56×). So:

* **A and B alternate** (A B A B …) and the ratio reported is the **median of the pairwise ratios**
  ``B_i / A_i``: each pair ran close together in time, under about the same load
  (:func:`alternate`).
* Every timing records the **load average** before and after and the **CPU share**: the CPU seconds
  the measured process (or child process) got ÷ (wall seconds × its threads). A run whose share fell
  below :data:`MIN_CPU_SHARE` of its threads is **flagged**: other jobs took its cores, and its time
  says more about them than about the code (:class:`Timing`).
* **FLOP accounting**: the matrix-multiply FLOPs of what ran (:func:`forward_flops` and friends,
  counted from the config; ``tests/test_harness.py`` checks them against
  ``torch.utils.flop_counter``), the achieved GFLOP/s, and this machine's dense matmul GFLOP/s
  measured in the same process (:func:`matmul_gflops`), so a time can be read as a share of the
  machine's speed of light. FLOP counts do not depend on the load; achieved rates do.

Every benchmark imports this module as ``harness`` (its folder is on ``sys.path`` when it runs as
``python benchmarks/NAME.py``).
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "MIN_CPU_SHARE",
    "Pair",
    "Timing",
    "alternate",
    "analysis_flops",
    "attention_flops",
    "child_cpu_seconds",
    "flop_line",
    "forward_flops",
    "gram_flops",
    "jacobian_flops",
    "linear_flops_per_token",
    "machine_line",
    "matmul_gflops",
    "pattern_recompute_flops",
    "peak_rss",
    "quadratic_form_flops",
    "reset_peak_rss",
    "threads",
    "timed",
    "with_peak",
]

#: a run whose CPU share fell below this fraction of its threads is flagged
MIN_CPU_SHARE = 0.9


def threads() -> int:
    """Threads torch computes with in this process (the CPU share's denominator)."""
    import torch

    return torch.get_num_threads()


def child_cpu_seconds() -> float:
    """CPU seconds (user + system) of every child process this one has waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class Timing:
    """One measured run: wall and CPU seconds, the threads it could use, the load around it."""

    seconds: float
    cpu_seconds: float
    threads: int
    load_before: float
    load_after: float
    label: str = ""

    @property
    def cpu_share(self) -> float:
        """CPU seconds ÷ (wall seconds × threads): 1.0 when every thread ran all the time."""
        return self.cpu_seconds / max(self.seconds * self.threads, 1e-12)

    @property
    def flagged(self) -> bool:
        return self.cpu_share < MIN_CPU_SHARE

    def describe(self) -> str:
        flag = f"  FLAGGED: CPU share below {MIN_CPU_SHARE:.0%}" if self.flagged else ""
        return (
            f"{self.label or 'run'}: {self.seconds:.2f} s wall, {self.cpu_seconds:.2f} s CPU on {self.threads} "
            f"thread(s) = {self.cpu_share:.0%} share, load {self.load_before:.1f} -> {self.load_after:.1f}{flag}"
        )


def timed(
    fn: Callable[[], Any],
    *,
    label: str = "",
    n_threads: int | None = None,
    cpu: Callable[[], float] = time.process_time,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[Any, Timing]:
    """``fn()`` and its :class:`Timing`. ``cpu`` is this process's CPU clock; pass
    :func:`child_cpu_seconds` (and the child's thread count) when ``fn`` runs a child process."""
    load_before = os.getloadavg()[0]
    cpu_start, start = cpu(), clock()
    result = fn()
    seconds, cpu_seconds = clock() - start, cpu() - cpu_start
    n = threads() if n_threads is None else n_threads
    return result, Timing(seconds, cpu_seconds, n, load_before, os.getloadavg()[0], label)


@dataclass(frozen=True)
class Pair:
    """Alternating runs of A and B: ``ratios[i] = b[i].seconds / a[i].seconds``."""

    a: tuple[Timing, ...]
    b: tuple[Timing, ...]
    results_a: list = field(default_factory=list, repr=False)
    results_b: list = field(default_factory=list, repr=False)

    @property
    def ratios(self) -> list[float]:
        return [b.seconds / a.seconds for a, b in zip(self.a, self.b, strict=True)]

    @property
    def median_ratio(self) -> float:
        return statistics.median(self.ratios)

    @property
    def cpu_ratios(self) -> list[float]:
        """``B`` CPU seconds ÷ ``A`` CPU seconds per pair: steadier than wall time when runs are flagged
        (a starved process waits, it does not compute), though cache and memory contention still leak in."""
        return [b.cpu_seconds / max(a.cpu_seconds, 1e-12) for a, b in zip(self.a, self.b, strict=True)]

    @property
    def flagged(self) -> list[Timing]:
        return [t for t in (*self.a, *self.b) if t.flagged]

    def describe(self, name_a: str = "A", name_b: str = "B") -> str:
        lines = [t.describe() for pair in zip(self.a, self.b, strict=True) for t in pair]
        ratios = ", ".join(f"{r:.2f}" for r in self.ratios)
        lines.append(f"{name_b} ÷ {name_a}: median of pairwise ratios {self.median_ratio:.2f} (pairs: {ratios})")
        cpu = ", ".join(f"{r:.2f}" for r in self.cpu_ratios)
        lines.append(
            f"{name_b} ÷ {name_a} in CPU seconds: median {statistics.median(self.cpu_ratios):.2f} (pairs: {cpu})"
        )
        if self.flagged:
            lines.append(f"{len(self.flagged)} of {2 * len(self.a)} runs FLAGGED (CPU share < {MIN_CPU_SHARE:.0%})")
        return "\n".join(lines)


def alternate(
    a: Callable[[], Any],
    b: Callable[[], Any],
    repeats: int,
    *,
    labels: tuple[str, str] = ("A", "B"),
    **timing: Any,
) -> Pair:
    """Run A B A B … ``repeats`` times each; ``timing`` goes to :func:`timed` (clocks, threads)."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    out: dict[str, list] = {"a": [], "b": [], "ra": [], "rb": []}
    for index in range(repeats):
        for side, fn, label in (("a", a, labels[0]), ("b", b, labels[1])):
            result, timing_ = timed(fn, label=f"{label} #{index + 1}", **timing)
            out[side].append(timing_)
            out["r" + side].append(result)
    return Pair(tuple(out["a"]), tuple(out["b"]), out["ra"], out["rb"])


# --------------------------------------------------------------------------------------------------
# peak memory of one run (Linux: the resident high-water mark can be reset)
# --------------------------------------------------------------------------------------------------


def reset_peak_rss() -> bool:
    """Reset this process's resident high-water mark (``VmHWM``, and so ``ru_maxrss``) to what is
    resident now; ``False`` where the kernel does not offer it (then peaks are the process's so far)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Bytes: the resident high-water mark since the process started or :func:`reset_peak_rss`."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def with_peak(fn: Callable[[], Any], peaks: list[int]) -> Callable[[], Any]:
    """``fn`` that appends the peak resident bytes of each of its calls to ``peaks`` (the high-water mark
    is reset first, so one run's peak is not another's: the benchmarks alternate a plain forward pass
    with the analysis, and each has its own)."""

    def run():
        reset_peak_rss()
        result = fn()
        peaks.append(peak_rss())
        return result

    return run


# --------------------------------------------------------------------------------------------------
# FLOP accounting (multiply-adds of matrix products count 2; elementwise work is not counted)
# --------------------------------------------------------------------------------------------------


def _heads(cfg) -> tuple[int, int, int]:
    kv = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
    return cfg.n_heads, kv, cfg.d_head


def linear_flops_per_token(cfg) -> int:
    """One block's weight matmuls for one token: Q, K, V, O and the MLP."""
    heads, kv, d_head = _heads(cfg)
    d = cfg.d_model
    attention = 2 * d * (heads + 2 * kv) * d_head + 2 * heads * d_head * d
    if getattr(cfg, "attn_only", False) or not cfg.d_mlp:
        return attention
    return attention + (3 if getattr(cfg, "gated_mlp", False) else 2) * 2 * d * cfg.d_mlp


def attention_flops(cfg, n: int) -> int:
    """One block's ``QKᵀ`` and ``pattern·V`` over all ``n × n`` query-key pairs (TransformerLens
    computes the masked half too)."""
    heads, _, d_head = _heads(cfg)
    return 2 * 2 * heads * n * n * d_head


def forward_flops(cfg, n: int, *, unembed_rows: int | None = None, n_layers: int | None = None) -> int:
    """A forward pass over ``n`` tokens: every block, and the unembedding of ``unembed_rows`` rows
    (default all ``n``; the trace unembeds one row, the Jacobian none)."""
    layers = cfg.n_layers if n_layers is None else n_layers
    rows = n if unembed_rows is None else unembed_rows
    return layers * (n * linear_flops_per_token(cfg) + attention_flops(cfg, n)) + 2 * rows * cfg.d_model * cfg.d_vocab


def jacobian_flops(cfg, n: int, rows: int, *, recompute: bool = False) -> int:
    """Forward pass (no unembedding) plus ``rows`` input-gradient VJPs: each VJP multiplies by every
    weight once (no weight gradients) and by the attention twice (scores and values), so
    ``n · linear + 2 · attention`` per block; ``recompute`` adds the checkpointed sweep's second forward."""
    blocks = cfg.n_layers * (n * linear_flops_per_token(cfg) + attention_flops(cfg, n))
    vjp = cfg.n_layers * (n * linear_flops_per_token(cfg) + 2 * attention_flops(cfg, n))
    return blocks * (2 if recompute else 1) + rows * vjp


def _gram_size(cfg) -> int:
    return (2 if getattr(cfg, "gated_mlp", False) else 1) * cfg.d_mlp


def gram_flops(cfg, n_blocks: int = 8) -> int:
    """The certified bound's Grams, all layers, as lower block columns: ``W'_inᵀ W'_in`` on
    ``(B + 1) / 2B`` of its entries and ``W'_out W'_outᵀ`` once."""
    size = _gram_size(cfg)
    lower = 2 * cfg.d_model * size * size * (n_blocks + 1) // (2 * n_blocks)
    return cfg.n_layers * (lower + 2 * cfg.d_mlp * cfg.d_mlp * cfg.d_model)


def quadratic_form_flops(cfg, n: int, n_blocks: int = 8) -> int:
    """``c_pᵀ G c_p`` for every position and layer from the lower block columns (float64)."""
    size = _gram_size(cfg)
    return cfg.n_layers * n * size * size * (n_blocks + 1) // n_blocks  # 2 · (B + 1)/2B of the dense form


def pattern_recompute_flops(cfg, n: int) -> int:
    """The bound rows' recompute of every layer's patterns: Q, K and V projections and ``QKᵀ``."""
    heads, kv, d_head = _heads(cfg)
    return cfg.n_layers * (2 * n * cfg.d_model * (heads + 2 * kv) * d_head + 2 * heads * n * n * d_head)


def analysis_flops(cfg, n: int, *, grams: bool) -> dict[str, int]:
    """``analyze(jacobian_mode=None)``'s matmul FLOPs by part (``grams``: the Grams are built, not cached)."""
    parts = {
        "trace": forward_flops(cfg, n, unembed_rows=1),
        "pattern recompute": pattern_recompute_flops(cfg, n),
        "quadratic forms (fp64)": quadratic_form_flops(cfg, n),
    }
    if grams:
        parts["Grams (fp64)"] = gram_flops(cfg)
    return parts


def matmul_gflops(dtype: str = "float32", size: int = 1024, repeats: int = 3) -> float:
    """This process's dense ``size × size`` matmul rate in GFLOP/s (best of ``repeats``), the speed of light."""
    import torch

    a = torch.randn(size, size, dtype=getattr(torch, dtype))
    b = torch.randn(size, size, dtype=getattr(torch, dtype))
    a @ b  # warm-up: threads, kernels
    best = min(_seconds(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def _seconds(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def machine_line() -> str:
    """Threads, load and the fp32/fp64 matmul rates measured now, in this process."""
    return (
        f"machine: {threads()} torch thread(s), {os.cpu_count()} CPUs, load average "
        f"{' / '.join(f'{x:.1f}' for x in os.getloadavg())}; matmul now: "
        f"fp32 {matmul_gflops('float32'):.0f} GFLOP/s, fp64 {matmul_gflops('float64'):.0f} GFLOP/s"
    )


def flop_line(label: str, flops: float, seconds: float) -> str:
    """``label``: FLOPs and the achieved rate."""
    return f"{label}: {flops / 1e9:.1f} GFLOP in {seconds:.2f} s = {flops / 1e9 / max(seconds, 1e-12):.1f} GFLOP/s"
