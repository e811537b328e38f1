"""Estimate, then refuse: the memory rule of every input-gradient method, plain or checkpointed.

Before any work, :func:`plan_memory` predicts the peak extra bytes of a call from the config alone
and picks how to run it:

* **plain**: one forward pass keeps every layer's activations for the backward (the retained
  autograd graph, ``L · (W + per_layer)``); the VJPs then run in batches of cotangents.
* **checkpointed** (per-block activation checkpointing): the forward pass keeps only each block's
  input residual (``(L+1) · n · d``); the backward sweeps the blocks top-down, recomputing one
  block's activations from its stored input at a time, so one block's graph is alive at once. The
  cotangents of every row travel down together (``r · n · d``, the exact mode's Jacobian buffer
  anyway), so each block is recomputed once whatever the number of chunks: the cost is about one
  extra forward pass.

``checkpoint=None`` chooses plain when it fits with the default chunk, else checkpointed (the Jacobian
asks for the smaller of the two estimates instead: its recompute is one forward pass next to ``rows``
VJPs, and keeping one block's graph instead of every layer's is what brings the exact Jacobian at
n = 128 below jacrev's memory; ``plan_memory(smaller=True)``). A request
that fits in neither is refused with one line giving the checkpointed estimate and the largest
number of tokens that fits; the plain-mode refusals name what the checkpointed mode would need.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "MEMORY_FRACTION",
    "MEMORY_SLACK",
    "MODES",
    "MemoryPlan",
    "available_memory",
    "checkpoint_terms",
    "estimate_memory",
    "gib",
    "largest_fitting_tokens",
    "memory_budget",
    "memory_terms",
    "plan_memory",
]

#: the request names :meth:`lens_squash.edge.gradient.GradientRequest.from_mode` maps to a request
MODES = ("exact", "frozen", "sketch", "frozen-sketch")
#: cotangents per batched VJP when none is given: on SmolLM2 (2 CPU cores) 16 was as fast as 8, 32 or
#: 64 (within 10 %) at a quarter of 64's working memory (benchmarks/jacobian.py --chunk)
DEFAULT_CHUNK_SIZE = 16
#: share of the free memory a call may plan to use when ``max_memory_bytes`` is not given
MEMORY_FRACTION = 0.5
#: resident size of the retained graph ÷ the bytes the formula counts for it (allocator slack, forward
#: temporaries): 1.03, 1.13 and 1.11 on SmolLM2 at n = 32, 128, 256 (benchmarks/jacobian.py prints the
#: whole estimate beside the measured peak)
MEMORY_SLACK = 1.15


def available_memory(device: str | torch.device = "cpu") -> int:
    """Free bytes on ``device``: ``torch.cuda.mem_get_info`` on a GPU, ``MemAvailable`` on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:  # not Linux: psutil when it is installed
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return 8 * 2**30  # unknown: assume a modest laptop rather than refuse


def memory_budget(model, max_memory_bytes: int | None) -> int:
    """``max_memory_bytes``, or :data:`MEMORY_FRACTION` of the free memory on the model's device."""
    if max_memory_bytes is not None:
        return int(max_memory_bytes)
    return int(MEMORY_FRACTION * available_memory(model.cfg.device))


def _weights_per_layer(cfg) -> int:
    """Elements of one block's matrices: the forward pass keeps a reshaped copy of each for the backward."""
    d, d_head, heads = cfg.d_model, cfg.d_head, cfg.n_heads
    kv_heads = getattr(cfg, "n_key_value_heads", None) or heads
    attention = 2 * d * heads * d_head + 2 * d * kv_heads * d_head
    if cfg.attn_only or cfg.d_mlp is None:
        return attention
    return attention + (3 if cfg.gated_mlp else 2) * d * cfg.d_mlp


def checkpoint_terms(cfg, n_tokens: int, n_layers: int, rows: int) -> dict[str, int]:
    """Elements the checkpointed mode keeps (:mod:`.checkpoint`), by what keeps them, before slack.

    ``stored``, ``cotangents`` and ``norm_temporary`` are exact counts of tensors the code allocates;
    ``block`` and ``per_cotangent`` are upper counts fitted to the peak resident size of SmolLM2 runs
    (n = 128…1024, chunk 4…16; ``benchmarks/jacobian.py --ckpt-check``).
    """
    n, d, heads = n_tokens, cfg.d_model, cfg.n_heads
    d_mlp = 0 if cfg.attn_only or cfg.d_mlp is None else cfg.d_mlp
    saved = n * (10 * d + 3 * d_mlp + 3 * heads * n)  # one block's saved activations (≥ the measured 1–2 H n²)
    # forward temporaries of the recompute (scores, masked scores, pattern: freed, but their heap
    # holes stay while steady_heap keeps freed memory), and the einsums' weight copies with the
    # allocator's fragmentation around them: 12 W is the fit (the saved graph alone holds 1 W)
    recompute = n * (10 * d + 3 * d_mlp) + 2 * heads * n * n
    return {
        "stored": (n_layers + 1) * n * d,  # each swept block's input x^(l), and the top block's output
        "cotangents": rows * n * d,  # G^(l), [row, 1, pos, d_model], updated in place
        "norm_temporary": rows * n * d,  # _sums squares one chunk at a time now; kept whole as an upper count
        "block": 12 * _weights_per_layer(cfg) + saved + recompute,
        # per cotangent of a chunk: three [heads, pos, pos] gradients alive at once in the attention
        # backward (softmax and mask), the MLP's and the residual's gradients, and the chunk's result
        "per_cotangent": n * (2 * d_mlp + 2 * d) + 3 * heads * n * n + n * d,
    }


def memory_terms(
    model,
    n_tokens: int,
    mode: str,
    *,
    n_layers: int | None = None,
    n_rows: int | None = None,
    keep_full: bool = False,
    checkpoint: bool = False,
) -> tuple[int, int]:
    """``(fixed, per_cotangent)`` bytes of :func:`estimate_memory`'s formula, slack included."""
    cfg = model.cfg
    n, d, heads = n_tokens, cfg.d_model, cfg.n_heads
    d_mlp = 0 if cfg.attn_only or cfg.d_mlp is None else cfg.d_mlp
    layers = cfg.n_layers if n_layers is None else n_layers
    size = torch.finfo(cfg.dtype).bits // 8
    # per layer and position: resid, norms, q/k/v/z, attention out (≈ 10 d_model); MLP pre/post and
    # the gate (≈ 3 d_mlp); scores, pattern and its softmax output (≈ 3 heads · n)
    per_layer = n * (10 * d + 3 * d_mlp + 3 * heads * n)
    rows = cfg.d_model if n_rows is None else n_rows
    if checkpoint:
        parts = checkpoint_terms(cfg, n, layers, rows)
        kept = parts["stored"] + parts["cotangents"] + parts["norm_temporary"] + parts["block"]
        per_cotangent = parts["per_cotangent"]
    else:
        buffer = rows * n * d if (not _sketched(mode) or keep_full) else 0
        kept = layers * (_weights_per_layer(cfg) + per_layer) + buffer
        # a vmapped backward's temporaries per cotangent, measured on SmolLM2 for n = 32…256 (2.1–3.8 ×
        # per_layer), plus the cotangent's input gradient [pos, d_in]
        per_cotangent = 4 * per_layer + n * d
    # the spectral pass works on 8 positions' Gram matrices at a time
    spectral = 8 * d * d * 3 if not _sketched(mode) else 0
    fixed = size * (kept + spectral)
    return int(MEMORY_SLACK * fixed), int(MEMORY_SLACK * size * per_cotangent)


def _sketched(mode: str) -> bool:
    """Sketched probes keep no Jacobian buffer and take no spectral pass, frozen or not."""
    return mode.endswith("sketch")


def estimate_memory(
    model,
    n_tokens: int,
    chunk_size: int | None = None,
    mode: str = "exact",
    *,
    n_layers: int | None = None,
    n_probes: int | None = None,
    keep_full: bool = False,
    checkpoint: bool = False,
) -> int:
    """Predicted peak extra bytes of :func:`jacobian.jacobian` (model weights excluded).

    With ``n`` tokens, ``d = d_model``, ``H`` heads, ``m = d_mlp``, ``L`` layers run (``n_layers``,
    default all), ``c`` cotangents per batch, ``r`` rows (``d_model``, or ``n_probes`` in sketch
    mode) and ``b`` bytes per element of the model's dtype::

        per_layer = n · (10 d + 3 m + 3 H n)                     saved activations of one layer
        W         = 2 d H d_head + 2 d H_kv d_head + (2 or 3) d m   one block's matrices
        plain        = L · (W + per_layer)                       the retained autograd graph
                     + r · n · d   (exact, frozen, or keep_full) the Jacobian buffer
        checkpointed = (L + 1) · n · d + 2 r · n · d             stored inputs, cotangents, the norms' temporary
                     + 12 W + per_layer + n (10 d + 3 m) + 2 H n²  one block recomputed (fitted)
                     + c · (n (2 m + 3 d) + 3 H n²)              per cotangent of a chunk (fitted)
        bytes     = 1.15 · b · [ plain or checkpointed
                        + c · (4 · per_layer + n · d)   (plain)  the batched backward's working set
                        + 24 d²            (exact, frozen)       the spectral pass, 8 positions at a time ]

    The checkpointed terms (:func:`checkpoint_terms`) were fitted to SmolLM2's measured peaks: the
    estimate is 1.01–1.19× the peak at n = 256…1024 (1.6× at n = 128, where it is 0.3 GiB); the
    previous form (plain's per-cotangent term) was about 3× the peak.

    ``W`` is there because TransformerLens's einsums save a reshaped copy of every weight matrix for
    the input gradient (405 MiB on SmolLM2, whatever ``n``). The constants are upper estimates
    calibrated on SmolLM2 against the peak resident size above a trimmed heap, and
    :data:`MEMORY_SLACK` covers the allocator's slack; ``benchmarks/jacobian.py`` prints the
    prediction next to the measured peak.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {MODES}")
    rows = n_probes if _sketched(mode) else None
    fixed, per = memory_terms(
        model, n_tokens, mode, n_layers=n_layers, n_rows=rows, keep_full=keep_full, checkpoint=checkpoint
    )
    chunk = chunk_size or min(DEFAULT_CHUNK_SIZE, rows or model.cfg.d_model)
    return fixed + chunk * per


@dataclass(frozen=True)
class MemoryPlan:
    """How a call runs: ``checkpoint``ed or not, ``chunk`` cotangents per batch, and the estimate."""

    checkpoint: bool
    chunk: int
    fixed: int
    per_cotangent: int
    budget: int

    @property
    def estimated_bytes(self) -> int:
        return self.fixed + self.chunk * self.per_cotangent


class Terms(Protocol):
    """``terms(n_tokens, checkpoint=...) -> (fixed, per_cotangent)`` bytes of one request."""

    def __call__(self, n_tokens: int, *, checkpoint: bool) -> tuple[int, int]: ...


def largest_fitting_tokens(terms: Terms, budget: int, n_max: int) -> int:
    """The most tokens (≤ ``n_max``) whose checkpointed estimate at one cotangent per batch fits; 0 if none."""

    def fits(n: int) -> bool:
        fixed, per = terms(n, checkpoint=True)
        return fixed + per <= budget

    if not fits(1):
        return 0
    low, high = 1, n_max
    if fits(high):
        return high
    while high - low > 1:  # the estimate grows with n: bisect
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def plan_memory(
    terms: Terms,
    n_tokens: int,
    rows: int,
    chunk_size: int | None,
    budget: int,
    *,
    checkpoint: bool | None,
    what: str = "this request",
    n_max: int | None = None,
    smaller: bool = False,
) -> MemoryPlan:
    """Choose plain or checkpointed and the chunk, or raise MemoryError in one line saying what fits.

    ``checkpoint=None`` runs plain when it fits, else checkpointed; with ``smaller=True`` it runs
    whichever estimate is smaller (for callers whose recompute, one forward pass, is small next to
    their backward work)."""
    plain, saved = terms(n_tokens, checkpoint=False), terms(n_tokens, checkpoint=True)
    if checkpoint is None:
        chunk = min(chunk_size or DEFAULT_CHUNK_SIZE, rows)
        plain_bytes, saved_bytes = plain[0] + chunk * plain[1], saved[0] + chunk * saved[1]
        checkpoint = plain_bytes > budget or (smaller and saved_bytes < plain_bytes)
    fixed, per = saved if checkpoint else plain
    fits = (budget - fixed) // per if budget > fixed else 0
    if chunk_size is None and fits >= 1:
        return MemoryPlan(
            checkpoint=checkpoint,
            chunk=int(min(DEFAULT_CHUNK_SIZE, rows, fits)),
            fixed=fixed,
            per_cotangent=per,
            budget=budget,
        )
    if chunk_size is not None and fixed + min(chunk_size, rows) * per <= budget:
        return MemoryPlan(
            checkpoint=checkpoint, chunk=min(chunk_size, rows), fixed=fixed, per_cotangent=per, budget=budget
        )
    mode = "checkpointed (checkpoint=True)" if checkpoint else "plain (checkpoint=False)"
    if fits >= 1:  # the chunk asked for is too large, a smaller one fits
        needs = fixed + min(chunk_size, rows) * per
        raise MemoryError(
            f"{what} with chunk_size={chunk_size} needs about {gib(needs)} {mode} but only {gib(budget)} may be "
            f"used (max_memory_bytes); use chunk_size={int(min(fits, rows))} or raise max_memory_bytes"
        )
    if not checkpoint and saved[0] + saved[1] <= budget:
        raise MemoryError(
            f"{what} needs about {gib(fixed + per)} {mode} even at chunk_size=1, but only {gib(budget)} may be used "
            f"(max_memory_bytes); checkpoint=True needs about {gib(saved[0] + saved[1])}: use it, or checkpoint=None"
        )
    largest = largest_fitting_tokens(terms, budget, n_max or n_tokens)
    raise MemoryError(
        f"{what} on {n_tokens} tokens needs about {gib(saved[0] + saved[1])} even checkpointed at chunk_size=1, but "
        f"only {gib(budget)} may be used (max_memory_bytes); the largest prompt that fits is {largest} tokens"
    )


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.3g} GiB" if n_bytes >= 2**28 else f"{n_bytes / 2**20:.3g} MiB"
