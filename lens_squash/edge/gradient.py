"""One gradient driver for every input-gradient method (:func:`jacobian.jacobian`, :func:`flow.flow`).

A :class:`GradientRequest` says what to differentiate and how, each choice on its own axis:

* ``target_pos``: the position whose representation ``y`` is differentiated (last by default);
* ``layer``: ``"final"`` (the final norm's output) or a layer index (its ``hook_resid_post``);
* ``wrt``: the input is ``blocks.{wrt}.hook_resid_pre``;
* ``frozen``: attention patterns, norm scales and router weights detached (the object the certified
  bound bounds, DESIGN §3) or live (the model as it is);
* ``probes``: :class:`Exact` (``d_model`` identity rows: every row of ``J``) or :class:`Sketch`
  (``n_probes`` seeded orthonormal rows, an unbiased Frobenius estimate);
* ``chunk_size``, ``checkpoint`` (``None``: planned from the memory estimate) and
  ``max_memory_bytes`` (the budget).

:func:`run_gradient` runs one request on one :class:`~lens_squash.edge.prompts.Tokens` value with a
:class:`GradientMethod` (what is swept and how much memory it needs): validate → plan memory →
probes → sweep, and :meth:`GradientRun.provenance` records what ran. The front ends build their
result from the sweep. The ``mode`` strings (``"exact"``, ``"frozen"``, ``"sketch"``,
``"frozen-sketch"``) are a convenience: :meth:`GradientRequest.from_mode` maps one to a request.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from ..core.progress import counter
from ..core.records import provenance
from .allocator import steady_heap
from .backward import check_chunk_size, check_position, without_parameter_grads
from .backward import probes as make_probes
from .jacobian_memory import MODES, MemoryPlan, memory_budget, plan_memory
from .prompts import Tokens

__all__ = [
    "DEFAULT_N_PROBES",
    "Exact",
    "GradientMethod",
    "GradientRequest",
    "GradientRun",
    "Sketch",
    "last_block",
    "resolve",
    "run_gradient",
]

#: probes of a sketch when none are named (the CLI's ``--probes`` default too)
DEFAULT_N_PROBES = 64
#: a progress bar appears once the backward chunks have run this many seconds
PROGRESS_DELAY_S = 2.0


@dataclass(frozen=True)
class Exact:
    """Every row of the Jacobian: ``d_model`` identity cotangents (spectral and L1 norms available)."""


@dataclass(frozen=True)
class Sketch:
    """``n_probes`` orthonormal probes (QR of a Gaussian seeded by ``seed``): an unbiased estimate of
    each ``‖J_i‖_F²``; exact when ``n_probes = d_model``."""

    n_probes: int = DEFAULT_N_PROBES
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_probes", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "n_probes" else 0):
                raise ValueError(f"Sketch.{name} must be an integer ≥ {1 if name == 'n_probes' else 0}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class GradientRequest:
    """What to differentiate and how (module docstring); every field has the front ends' default."""

    target_pos: int = -1
    layer: str | int = "final"
    wrt: int = 0
    frozen: bool = False
    probes: Exact | Sketch = field(default_factory=Exact)
    chunk_size: int | None = None
    checkpoint: bool | None = None
    max_memory_bytes: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.frozen, bool):
            raise ValueError(f"frozen must be True or False, got {self.frozen!r}")
        if not isinstance(self.probes, Exact | Sketch):
            raise ValueError(f"probes must be Exact() or Sketch(n_probes, seed), got {self.probes!r}")
        if self.checkpoint is not None and not isinstance(self.checkpoint, bool):
            raise ValueError(
                f"checkpoint must be True, False or None (choose by the memory estimate), got {self.checkpoint!r}"
            )
        check_chunk_size(self.chunk_size)
        budget = self.max_memory_bytes
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
            raise ValueError(
                f"max_memory_bytes must be a positive integer or None (half the free memory), got {budget!r}"
            )

    @classmethod
    def from_mode(cls, mode: str, *, n_probes: int = DEFAULT_N_PROBES, seed: int = 0, **fields: Any) -> GradientRequest:
        """The request a ``mode`` string names: ``exact``, ``frozen`` (exact probes, frozen attention),
        ``sketch`` (``Sketch(n_probes, seed)``) or ``frozen-sketch``; ``fields`` are the other fields."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; use one of {MODES}")
        probes = Sketch(n_probes, seed) if mode.endswith("sketch") else Exact()
        return cls(frozen=mode.startswith("frozen"), probes=probes, **fields)

    @property
    def sketched(self) -> bool:
        return isinstance(self.probes, Sketch)

    @property
    def mode(self) -> str:
        """The request's name in :data:`MODES` (how results and provenance label it)."""
        if self.sketched:
            return "frozen-sketch" if self.frozen else "sketch"
        return "frozen" if self.frozen else "exact"

    @property
    def seed(self) -> int | None:
        return self.probes.seed if self.sketched else None


@dataclass(frozen=True, eq=False)
class GradientRun:
    """A request checked against one model and prompt, planned and ready to sweep.

    ``request`` has ``target_pos``, ``layer`` and ``wrt`` resolved to non-negative indices; ``used``
    are the positions that can reach the target (causal models: ``0..target_pos``); ``n_blocks`` the
    blocks the backward passes (``wrt`` to the output layer); ``rows`` the cotangents per block.
    """

    request: GradientRequest
    tokens: Tokens
    used: Tokens
    last_block: int
    rows: int
    plan: MemoryPlan
    probes: Tensor

    @property
    def target_pos(self) -> int:
        return self.request.target_pos

    @property
    def frozen(self) -> bool:
        return self.request.frozen

    @property
    def n_blocks(self) -> int:
        return self.last_block - self.request.wrt + 1

    @property
    def chunk(self) -> int:
        return self.plan.chunk

    def provenance(self, model, **extra: Any) -> dict[str, Any]:
        """The record every gradient result carries: the request as run, its plan, and ``extra``."""
        request = self.request
        return provenance(
            model,
            n_prompt_tokens=len(self.tokens),
            n_tokens=len(self.used),
            target_pos=request.target_pos,
            layer=request.layer,
            wrt=request.wrt,
            mode=request.mode,
            n_vjps=self.rows,
            chunk_size=self.chunk,
            checkpoint=self.plan.checkpoint,
            seed=request.seed,
            chat=self.tokens.chat,
            estimated_bytes=self.plan.estimated_bytes,
            max_memory_bytes=self.plan.budget,
            **extra,
        )


class GradientMethod:
    """What a front end sweeps: subclasses name it (``what``), say its memory terms and sweep it."""

    #: the name in messages and progress bars ("Jacobian", "flow")
    what = "gradient"
    #: plan_memory(smaller=...): take the smaller estimate even when plain fits (the recompute is cheap)
    smaller = False

    def check(self, model, request: GradientRequest) -> None:
        """Refuse a model or request this method cannot run (before the prompt is tokenized)."""

    def memory_terms(
        self, model, request: GradientRequest, *, n_blocks: int, rows: int, n_tokens: int, checkpoint: bool
    ) -> tuple[int, int]:
        """``(fixed, per_cotangent)`` bytes for ``n_tokens`` tokens (``n_blocks`` blocks, ``rows``
        cotangents), checkpointed when ``checkpoint``."""
        raise NotImplementedError

    def sweep(self, model, run: GradientRun, bar) -> Any:
        """The backward sweep, inside :func:`run_gradient`'s memory and autograd settings."""
        raise NotImplementedError


def resolve(model, request: GradientRequest, n_tokens: int) -> GradientRequest:
    """``request`` with ``layer``, ``wrt`` and ``target_pos`` checked against the model and prompt and
    made non-negative; a sketch with more probes than ``d_model`` is refused."""
    d_out, n_layers = model.cfg.d_model, model.cfg.n_layers
    if request.sketched and request.probes.n_probes > d_out:
        raise ValueError(
            f"n_probes must be an integer in [1, {d_out}] (orthonormal probes in d_model={d_out} "
            f"dimensions), got {request.probes.n_probes!r}"
        )
    layer = request.layer
    if layer != "final":
        if isinstance(layer, bool) or not isinstance(layer, int) or not -n_layers <= layer < n_layers:
            raise ValueError(
                f"layer must be 'final' (the final norm's output) or a layer index in "
                f"[-{n_layers}, {n_layers - 1}] (that layer's hook_resid_post), got {layer!r}"
            )
        layer = layer % n_layers
    last, wrt = last_block(model, layer), request.wrt
    if isinstance(wrt, bool) or not isinstance(wrt, int) or not 0 <= wrt <= last:
        raise ValueError(
            f"wrt must be a layer index in [0, {last}] (the input is blocks.{{wrt}}.hook_resid_pre and "
            f"must come before the output layer, {layer!r}), got {wrt!r}"
        )
    return replace(request, layer=layer, target_pos=check_position(request.target_pos, n_tokens))


def last_block(model, layer: str | int) -> int:
    """The last block a target ``layer`` needs: the top one for ``"final"``."""
    return model.cfg.n_layers - 1 if layer == "final" else layer


def run_gradient(model, tokens: Tokens, request: GradientRequest, method: GradientMethod) -> tuple[GradientRun, Any]:
    """Validate → plan memory → probes → sweep; returns the run (for provenance) and the sweep's output.

    A request above the memory budget is refused with :func:`plan_memory`'s ``MemoryError`` before
    any work, naming a ``chunk_size`` or prompt length that fits.
    """
    request = resolve(model, request, len(tokens))
    used = tokens.upto(request.target_pos) if model.cfg.attention_dir == "causal" else tokens
    d_out, last = model.cfg.d_model, last_block(model, request.layer)
    rows = request.probes.n_probes if request.sketched else d_out
    n_blocks = last - request.wrt + 1

    def terms(n_tokens: int, *, checkpoint: bool) -> tuple[int, int]:
        return method.memory_terms(
            model, request, n_blocks=n_blocks, rows=rows, n_tokens=n_tokens, checkpoint=checkpoint
        )

    plan = plan_memory(
        terms,
        len(used),
        rows,
        request.chunk_size,
        memory_budget(model, request.max_memory_bytes),
        checkpoint=request.checkpoint,
        what=f"the {request.mode} {method.what}",
        n_max=model.cfg.n_ctx,
        smaller=method.smaller,
    )
    n_probes, seed = (request.probes.n_probes, request.probes.seed) if request.sketched else (0, 0)
    kind = "sketch" if request.sketched else "exact"
    probes = make_probes(kind, d_out, n_probes, seed, model.cfg.dtype, torch.device(model.cfg.device))
    run = GradientRun(request, tokens, used, last, rows, plan, probes)
    n_chunks = -(-rows // plan.chunk) * (n_blocks if plan.checkpoint else 1)
    with _sweeping(model, f"{request.mode} {method.what} backward chunks", n_chunks) as bar:
        return run, method.sweep(model, run, bar)


@contextmanager
def _sweeping(model, desc: str, n_chunks: int) -> Iterator[Any]:
    # steady_heap: without it every chunk page-faults its ~1 GB of gradients back in (allocator.py)
    with (
        steady_heap(),
        without_parameter_grads(model),
        torch.enable_grad(),
        counter(desc=desc, total=n_chunks, delay=PROGRESS_DELAY_S) as bar,
    ):
        yield bar
