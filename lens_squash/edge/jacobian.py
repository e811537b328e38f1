"""Exact, frozen and sketched Jacobians ``J_i = ∂y_n/∂v_i`` of one position's final representation.

This is the ground truth the path-sum bounds are judged against (Barbero et al. 2024, §5, Thm. 5.1 /
B.5; DESIGN §5). ``y`` is the representation of position ``target_pos`` (the last token by default):
the final norm's output (what enters the unembedding) or a ``layer``'s ``hook_resid_post``; ``v_i`` is
the residual stream entering layer ``wrt`` at position ``i`` (layer 0: the embeddings, positional
ones included). Every ``J_i`` is ``d_model × d_model``; the full object is ``[d_out, pos, d_in]``.

**Method.** Reverse mode is optimal: one vector–Jacobian product (VJP) ``uᵀ J`` gives row ``u`` of
every ``J_i`` at once, so the exact Jacobian is one forward pass plus ``d_model`` VJPs. The forward
pass runs once under ``torch.func.vjp``; the VJPs then run in batches of ``chunk_size`` cotangents
through ``torch.func.vmap`` of the returned ``vjp_fn`` (measured 2–4× faster on SmolLM2 than
``torch.autograd.grad(..., is_grads_batched=True)``, whose older vmap falls back to slow paths), and
the per-position norms are accumulated chunk by chunk. The input is made differentiable by a forward
hook that replaces ``blocks.{wrt}.hook_resid_pre`` with the tracked input ``v`` (the activation cache
of TransformerLens is detached, so it cannot be used); the forward pass stops right after the target
layer (a hook on its ``hook_resid_post`` raises, which works on a ``HookedTransformer`` and on a
``TransformerBridge`` alike, where ``stop_at_layer=n_layers`` would not stop) and never runs the
unembedding. Parameters are taken out of autograd for
the call, so the graph holds only what the input-gradient needs. For causal models, positions after
``target_pos`` cannot influence it, so they are dropped from the forward pass altogether. The whole
loop runs inside :func:`lens_squash.edge.allocator.steady_heap`, which stops glibc from handing each
batch's freed gradients back to the kernel only to page-fault them in again for the next batch.

**Requests.** A call is one :class:`~lens_squash.edge.gradient.GradientRequest`, run by the shared
driver :func:`~lens_squash.edge.gradient.run_gradient` (:func:`jacobian_of` takes one; :func:`jacobian`
builds it from its keywords, ``mode`` naming the two choices below at once). Two independent choices:

* attention live or ``frozen``: frozen detaches attention patterns (``blocks.{l}.attn.hook_pattern``),
  every norm scale (``*.hook_scale``) and mixture-of-experts router weights
  (``blocks.{l}.mlp.hook_expert_weights``) through hooks, so attention, normalisation and routing act
  as fixed linear maps. This is exactly the object the certified path-sum bound bounds (DESIGN §3).
* :class:`Exact` probes (every row of ``J``; ``mode="exact"`` or ``"frozen"``) or a
  :class:`Sketch`: ``k = n_probes`` probes ``u_r``, orthonormal (QR of a seeded Gaussian), estimate
  ``‖J_i‖_F² ≈ (d_out / k) Σ_r ‖u_rᵀ J_i‖²`` (unbiased: ``E[U Uᵀ] = (k / d_out) I`` for a Haar-random
  orthonormal ``U``). With ``k = d_out`` probes ``U Uᵀ = I`` and the estimate is exact. ``k`` VJPs
  instead of ``d_model``; spectral and L1 norms are not available (``mode="sketch"`` or
  ``"frozen-sketch"``).

**Norms per position.** Frobenius ``‖J_i‖_F`` and the entrywise L1 norm ``Σ_ab |J_i[a, b]|`` (the GNN
influence score of Xu et al. 2018, Topping et al. 2022) accumulate per chunk. The spectral norm
``‖J_i‖₂`` needs the whole ``d_out × d_in`` block of each position, so the exact and frozen modes
fill a ``[pos, d_out, d_in]`` buffer (it *is* the full Jacobian, so ``keep_full`` costs nothing more)
and take ``sqrt(λ_max(J_i J_iᵀ))`` per position at the end, a few positions at a time. Accumulating
per-position Grams ``Σ_chunks J_cᵀ J_c`` instead would need ``pos · d_in²`` numbers, no fewer when
``d_out = d_in``; the sketch mode keeps no buffer at all.

**Checkpointed mode** (``checkpoint=True``; :mod:`lens_squash.edge.checkpoint`): the forward pass keeps
only each block's input, and the backward recomputes one block at a time, pushing every row's
cotangent through it chunk by chunk. Memory grows as ``L·n·d + H·n²`` instead of ``L·H·n²``, for
about one extra forward pass; the numbers are the plain path's (tests: 1e-10 in float64).

**Memory.** :func:`estimate_memory` predicts the peak extra bytes from the config before any work is
done (formula in its docstring, :mod:`lens_squash.edge.jacobian_memory`). ``checkpoint=None`` runs
whichever of plain and checkpointed has the smaller estimate and fits (the recompute costs one
forward pass next to ``d_model`` or ``k`` VJPs; at n = 128 on SmolLM2 the checkpointed exact Jacobian
keeps one block's graph and weight copies instead of 30); a request above ``max_memory_bytes``
is refused with a ``MemoryError`` that names a ``chunk_size`` that fits, or, when even the
checkpointed mode does not fit, the estimate and the largest number of tokens that does.
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..core.display import compact_repr
from ..core.results import Result, heavy
from .backward import freeze_hooks, input_value, run_until, without_parameter_grads
from .checkpoint import head_cotangents, input_gradient_sweep, store_block_inputs
from .gradient import (
    DEFAULT_N_PROBES,
    Exact,
    GradientMethod,
    GradientRequest,
    GradientRun,
    Sketch,
    last_block,
    run_gradient,
)
from .jacobian_memory import (
    DEFAULT_CHUNK_SIZE,
    MEMORY_FRACTION,
    MEMORY_SLACK,
    MODES,
    available_memory,
    estimate_memory,
    memory_terms,
)
from .models import check_model
from .prompts import Tokens, tokenize

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "MEMORY_FRACTION",
    "MEMORY_SLACK",
    "MODES",
    "NORM_KINDS",
    "Exact",
    "GradientRequest",
    "JacobianResult",
    "Sketch",
    "available_memory",
    "estimate_memory",
    "jacobian",
    "jacobian_of",
]

NORM_KINDS = ("spectral", "frobenius", "l1")
# private names benchmarks/jacobian.py builds its jacrev baseline from
_input_value, _without_parameter_grads = input_value, without_parameter_grads


# --------------------------------------------------------------------------------------------------
# result
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class JacobianResult(Result):
    """Per-position norms of ``J_i = ∂y/∂v_i`` (and optionally ``J`` itself). Tensors are on the CPU.

    ``tokens``/``str_tokens`` are the positions analysed: for causal models the prompt up to and
    including ``target_pos`` (later positions cannot influence it). ``spectral`` and ``l1`` are
    ``None`` in sketch mode; ``full`` is ``[d_out, pos, d_in]`` when ``keep_full`` was asked for (in
    sketch mode its first axis holds the ``k`` probe rows ``u_rᵀ J``).
    """

    tokens: Int[Tensor, "pos"]
    str_tokens: tuple[str, ...]
    target_pos: int
    layer: str | int
    wrt: int
    mode: str
    spectral: Float[Tensor, "pos"] | None
    frobenius: Float[Tensor, "pos"]
    l1: Float[Tensor, "pos"] | None
    full: Float[Tensor, "d_out pos d_in"] | None = heavy()
    provenance: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def n_tokens(self) -> int:
        return self.frobenius.shape[0]

    def norms(self, kind: str = "spectral") -> Float[Tensor, "pos"]:
        """The per-position norm ``kind`` (``spectral``, ``frobenius`` or ``l1``)."""
        if kind not in NORM_KINDS:
            raise ValueError(f"unknown norm kind {kind!r}; use one of {NORM_KINDS}")
        values = {"spectral": self.spectral, "frobenius": self.frobenius, "l1": self.l1}[kind]
        if values is None:
            raise ValueError(
                f"the {kind} norm is not available in {self.mode!r} mode (a sketch estimates the "
                "Frobenius norm only); use kind='frobenius' or rerun with mode='exact'"
            )
        return values

    def best_norm(self) -> str:
        """The most informative norm this result has: spectral when exact, else Frobenius."""
        return "spectral" if self.spectral is not None else "frobenius"

    def to_frame(self):
        """One row per position: the token and each norm this result has (pandas DataFrame)."""
        import pandas as pd

        norms = {"spectral": self.spectral, "frobenius": self.frobenius, "l1": self.l1}
        columns = {kind: values.tolist() for kind, values in norms.items() if values is not None}
        return pd.DataFrame({"pos": range(self.n_tokens), "token": list(self.str_tokens), **columns})

    __repr__ = compact_repr

    def _repr_html_(self) -> str:
        kind = self.best_norm()
        values = self.norms(kind)
        top = torch.argsort(values, descending=True)[:5].tolist()
        top_text = ", ".join(f"{i}: {html.escape(repr(self.str_tokens[i]))} ({float(values[i]):.3g})" for i in top)
        rows = [
            ("model", self.provenance.get("model", {}).get("name", "?")),
            ("mode", self.mode),
            ("y", f"layer={self.layer!r} at position {self.target_pos}"),
            ("v", f"blocks.{self.wrt}.hook_resid_pre"),
            ("positions", self.n_tokens),
            (
                f"‖J_i‖ ({kind}) min / median / max",
                f"{float(values.min()):.3g} / {float(values.median()):.3g} / {float(values.max()):.3g}",
            ),
            ("seconds", f"{self.seconds:.2f}"),
        ]
        body = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
        body += f"<tr><td>largest (position: token)</td><td>{top_text}</td></tr>"
        return f"<b>lens_squash JacobianResult</b><table>{body}</table>"


# --------------------------------------------------------------------------------------------------
# the hooked forward pass
# --------------------------------------------------------------------------------------------------


def _target_function(model, tokens: Tensor, request: GradientRequest):
    """``f(v) = y``: the forward pass with ``blocks.{wrt}.hook_resid_pre`` replaced by ``v``.

    It stops at ``blocks.{last}.hook_resid_post`` (the output layer) and, for ``layer="final"``,
    applies ``ln_final`` to the target position only: ``y`` is the final norm's output on either
    backend, never the logits. ``request`` is resolved (:func:`lens_squash.edge.gradient.resolve`).
    """
    layer, wrt, target_pos = request.layer, request.wrt, request.target_pos
    freeze = freeze_hooks(model, wrt) if request.frozen else []
    last = last_block(model, layer)
    tokens = tokens[None].to(model.cfg.device)

    def f(v: Tensor) -> Float[Tensor, "d_out"]:
        replaced = []

        def replace(value: Tensor, hook) -> Tensor:
            replaced.append(True)
            return v

        hooks = [(f"blocks.{wrt}.hook_resid_pre", replace), *freeze]
        resid = run_until(model, tokens, f"blocks.{last}.hook_resid_post", hooks)
        if not replaced:  # y would not depend on v: a silent zero Jacobian
            raise ValueError(f"blocks.{wrt}.hook_resid_pre never fired, so the input could not be replaced")
        y = resid[:, target_pos : target_pos + 1]
        if layer == "final" and model.cfg.normalization_type is not None:
            with model.hooks(fwd_hooks=freeze):  # the final norm's scale is frozen too
                y = model.ln_final(y)  # per position, so norming only the target is exact
        return y[0, 0]

    return f


# --------------------------------------------------------------------------------------------------
# the VJPs
# --------------------------------------------------------------------------------------------------


def _sums(grad: Float[Tensor, "row pos d_in"], rows: int = DEFAULT_CHUNK_SIZE) -> tuple[Tensor, Tensor]:
    """Per position ``(Σ_r ‖u_rᵀ J_i‖², Σ_r |u_rᵀ J_i|₁)`` in float64, ``rows`` rows at a time: a
    float64 sum over the whole checkpointed buffer took a squared copy and a float64 copy of it
    (+480 MiB for the exact Jacobian at n = 128 on SmolLM2, above the memory estimate)."""
    squares = absolute = None
    for start in range(0, grad.shape[0], rows):
        part = grad[start : start + rows]
        part_sq = part.pow(2).sum(dim=(0, 2), dtype=torch.float64)
        part_abs = part.abs().sum(dim=(0, 2), dtype=torch.float64)
        squares = part_sq if squares is None else squares + part_sq
        absolute = part_abs if absolute is None else absolute + part_abs
    return squares, absolute


def _accumulate(vjp_fn, probes: Tensor, chunk: int, buffer: Tensor | None, bar) -> tuple[Tensor, Tensor]:
    """Run the batched VJPs; return per-position ``(Σ ‖u_rᵀ J_i‖², Σ |u_rᵀ J_i|₁)`` and fill ``buffer``."""
    batched = torch.func.vmap(vjp_fn)
    squares = absolute = None
    for start in range(0, probes.shape[0], chunk):
        rows = probes[start : start + chunk]
        (grad,) = batched(rows)
        grad = grad[:, 0]  # [row, pos, d_in]
        part_sq, part_abs = _sums(grad, grad.shape[0])  # the whole chunk at once, as before
        squares = part_sq if squares is None else squares + part_sq
        absolute = part_abs if absolute is None else absolute + part_abs
        if buffer is not None:
            buffer[:, start : start + rows.shape[0]] = grad.transpose(0, 1)
        del grad
        bar.update(1)
    return squares, absolute


def _spectral_norms(blocks: Float[Tensor, "pos d_out d_in"], group: int = 8) -> Float[Tensor, "pos"]:
    """Largest singular value per position: ``sqrt(λ_max(J_i J_iᵀ))``, a few positions at a time.

    The Gram route is ~2.5× faster than an SVD here; squaring the condition number does not matter
    for the *largest* eigenvalue, whose relative rounding error stays ~machine epsilon.
    """
    norms = []
    for i in range(0, blocks.shape[0], group):
        part = blocks[i : i + group]
        if part.dtype.itemsize < 4:  # a 16-bit model's entries, exact in float32 (eigvalsh has no 16-bit kernel)
            part = part.float()
        gram = part @ part.transpose(1, 2) if part.shape[1] <= part.shape[2] else part.transpose(1, 2) @ part
        norms.append(torch.linalg.eigvalsh(gram)[:, -1].clamp_min(0).sqrt())
    return torch.cat(norms)


def _plain(model, run: GradientRun, bar, *, keep_full: bool):
    """One forward pass with the whole graph kept, then the batched VJPs: ``(squares, absolute, blocks)``."""
    used, probes = run.used.ids, run.probes
    n, rows, d_in = used.shape[0], probes.shape[0], model.cfg.d_model
    need_buffer = not run.request.sketched or keep_full
    buffer = torch.zeros(n, rows, d_in, dtype=probes.dtype, device=probes.device) if need_buffer else None
    f = _target_function(model, used, run.request)
    _, vjp_fn = torch.func.vjp(f, input_value(model, used, run.request.wrt))
    squares, absolute = _accumulate(vjp_fn, probes, run.chunk, buffer, bar)
    del vjp_fn  # frees the retained graph before the spectral pass
    return squares, absolute, buffer


def _checkpointed(model, run: GradientRun, bar):
    """Block inputs kept, blocks recomputed top-down (:mod:`.checkpoint`): ``(squares, absolute, blocks)``."""
    request, frozen = run.request, run.frozen
    freeze = freeze_hooks(model, request.wrt) if frozen else []
    stored = store_block_inputs(model, run.used.ids, request.wrt, run.last_block, freeze)
    final = request.layer == "final"
    grads = head_cotangents(model, stored.top, run.target_pos, run.probes, final=final, frozen=frozen)
    stored.top = None
    grads = input_gradient_sweep(model, stored, grads, run.chunk, frozen=frozen, wrt=request.wrt, bar=bar)[:, 0]
    squares, absolute = _sums(grads, run.chunk)  # chunked like the plain path: no whole-buffer copies
    return squares, absolute, grads.transpose(0, 1)  # [pos, row, d_in]: a view of the only buffer


@dataclass(frozen=True)
class _JacobianMethod(GradientMethod):
    """The Jacobian's sweep: plain or checkpointed VJPs, then the spectral pass for exact probes."""

    keep_full: bool = False
    what = "Jacobian"
    smaller = True  # the recompute is one forward pass next to `rows` VJPs: take the smaller memory

    def check(self, model, request: GradientRequest) -> None:
        check_model(model)

    def memory_terms(self, model, request, *, n_blocks, rows, n_tokens, checkpoint):
        mode = "sketch" if request.sketched else "exact"
        return memory_terms(
            model, n_tokens, mode, n_layers=n_blocks, n_rows=rows, keep_full=self.keep_full, checkpoint=checkpoint
        )

    def sweep(self, model, run: GradientRun, bar):
        if run.plan.checkpoint:
            squares, absolute, blocks = _checkpointed(model, run, bar)
        else:
            squares, absolute, blocks = _plain(model, run, bar, keep_full=self.keep_full)
        spectral = None if run.request.sketched else _spectral_norms(blocks)
        return squares, absolute, blocks, spectral


# --------------------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------------------


def jacobian(
    model,
    prompt: str | Tensor | Tokens,
    *,
    target_pos: int = -1,
    layer: str | int = "final",
    wrt: int = 0,
    mode: str = "exact",
    n_probes: int = DEFAULT_N_PROBES,
    seed: int = 0,
    chunk_size: int | None = None,
    keep_full: bool = False,
    checkpoint: bool | None = None,
    max_memory_bytes: int | None = None,
    chat: bool | None = None,
) -> JacobianResult:
    """Per input position ``i``, the norms of ``J_i = ∂y/∂v_i`` (see the module docstring).

    ``prompt`` is text (chat template unless ``chat=False``), token ids or a
    :class:`~lens_squash.edge.prompts.Tokens` value. ``layer`` is ``"final"`` (the final norm's
    output, gain included) or a layer ``l`` (``blocks.{l}.hook_resid_post``); ``wrt=l`` differentiates
    with respect to ``blocks.{l}.hook_resid_pre``. ``mode`` names the request
    (:meth:`GradientRequest.from_mode`: ``exact``, ``frozen``, ``sketch`` with ``n_probes`` probes seeded
    by ``seed``, ``frozen-sketch``); the default, exact, is :func:`flow.flow`'s too. ``chunk_size``
    cotangents go through each batched VJP (default: :data:`DEFAULT_CHUNK_SIZE`, shrunk to fit the
    memory budget). ``checkpoint`` recomputes one block at a time in the backward (``None``: when its
    memory estimate is the smaller one, or plain would not fit). ``max_memory_bytes`` defaults to
    :data:`MEMORY_FRACTION` of the free memory. :func:`jacobian_of` takes a request instead.
    """
    request = GradientRequest.from_mode(
        mode,
        n_probes=n_probes,
        seed=seed,
        target_pos=target_pos,
        layer=layer,
        wrt=wrt,
        chunk_size=chunk_size,
        checkpoint=checkpoint,
        max_memory_bytes=max_memory_bytes,
    )
    return jacobian_of(model, prompt, request, keep_full=keep_full, chat=chat)


def jacobian_of(
    model, prompt: str | Tensor | Tokens, request: GradientRequest, *, keep_full: bool = False, chat: bool | None = None
) -> JacobianResult:
    """:func:`jacobian` for a :class:`GradientRequest` (``keep_full``: return ``J`` itself too)."""
    started = time.perf_counter()
    method = _JacobianMethod(keep_full=keep_full)
    method.check(model, request)
    tokens = tokenize(model, prompt, chat=chat)
    run, (squares, absolute, blocks, spectral) = run_gradient(model, tokens, request, method)
    request, used = run.request, run.used
    frobenius = (squares * (model.cfg.d_model / run.rows)).sqrt()
    out_dtype = torch.float64 if model.cfg.dtype == torch.float64 else torch.float32
    return JacobianResult(
        tokens=used.ids.cpu(),
        str_tokens=used.str_tokens,
        target_pos=run.target_pos,
        layer=request.layer,
        wrt=request.wrt,
        mode=request.mode,
        spectral=None if spectral is None else spectral.to("cpu", out_dtype),
        frobenius=frobenius.to("cpu", out_dtype),
        l1=None if request.sketched else absolute.to("cpu", out_dtype),
        full=blocks.permute(1, 0, 2).cpu() if keep_full else None,
        provenance=run.provenance(model),
        seconds=time.perf_counter() - started,
    )
