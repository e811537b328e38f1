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

**Modes.**

* ``exact``: the Jacobian of the model as it is.
* ``frozen``: attention patterns (``blocks.{l}.attn.hook_pattern``), every norm scale
  (``*.hook_scale``) and mixture-of-experts router weights (``blocks.{l}.mlp.hook_expert_weights``)
  are detached through hooks, so attention, normalisation and routing act as fixed linear maps. This
  is exactly the object the certified path-sum bound bounds (DESIGN §3).
* ``sketch``: ``k = n_probes`` probes ``u_r``, orthonormal (QR of a seeded Gaussian), estimate
  ``‖J_i‖_F² ≈ (d_out / k) Σ_r ‖u_rᵀ J_i‖²`` (unbiased: ``E[U Uᵀ] = (k / d_out) I`` for a Haar-random
  orthonormal ``U``). With ``k = d_out`` probes ``U Uᵀ = I`` and the estimate is exact. ``k`` VJPs
  instead of ``d_model``; spectral and L1 norms are not available.

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
from ..core.progress import counter
from ..core.records import provenance
from ..core.results import Result, heavy
from .allocator import steady_heap
from .backward import (
    check_chunk_size,
    check_position,
    freeze_hooks,
    input_value,
    run_until,
    without_parameter_grads,
)
from .backward import probes as make_probes
from .checkpoint import head_cotangents, input_gradient_sweep, store_block_inputs
from .jacobian_memory import (
    DEFAULT_CHUNK_SIZE,
    MEMORY_FRACTION,
    MEMORY_SLACK,
    MODES,
    available_memory,
    estimate_memory,
    memory_budget,
    memory_terms,
    plan_memory,
)
from .models import check_model
from .trace import as_tokens

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "MEMORY_FRACTION",
    "MEMORY_SLACK",
    "MODES",
    "NORM_KINDS",
    "JacobianResult",
    "available_memory",
    "estimate_memory",
    "jacobian",
]

NORM_KINDS = ("spectral", "frobenius", "l1")
#: a progress bar appears once the VJP chunks have run this many seconds
PROGRESS_DELAY_S = 2.0

# the old private names, still imported by tests and benchmarks written against them
_run_until, _probes, _input_value, _without_parameter_grads = (
    run_until,
    make_probes,
    input_value,
    without_parameter_grads,
)
_memory_terms, _freeze_hooks, _check_position = memory_terms, freeze_hooks, check_position


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
# validation
# --------------------------------------------------------------------------------------------------


def _check_layer(model, layer: str | int) -> str | int:
    if layer == "final":
        return layer
    n_layers = model.cfg.n_layers
    if isinstance(layer, bool) or not isinstance(layer, int) or not -n_layers <= layer < n_layers:
        raise ValueError(
            f"layer must be 'final' (the final norm's output) or a layer index in "
            f"[-{n_layers}, {n_layers - 1}] (that layer's hook_resid_post), got {layer!r}"
        )
    return layer % n_layers


def _last_block(model, layer: str | int) -> int:
    return model.cfg.n_layers - 1 if layer == "final" else layer


def _check_wrt(model, wrt: int, layer: str | int) -> int:
    last = _last_block(model, layer)
    if isinstance(wrt, bool) or not isinstance(wrt, int) or not 0 <= wrt <= last:
        raise ValueError(
            f"wrt must be a layer index in [0, {last}] (the input is blocks.{{wrt}}.hook_resid_pre and "
            f"must come before the output layer, {layer!r}), got {wrt!r}"
        )
    return wrt


def _check_mode(model, mode: str, n_probes: int) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {MODES}")
    d_out = model.cfg.d_model
    if mode == "sketch" and not (isinstance(n_probes, int) and 1 <= n_probes <= d_out):
        raise ValueError(
            f"n_probes must be an integer in [1, {d_out}] (orthonormal probes in d_model={d_out} "
            f"dimensions), got {n_probes!r}"
        )


def _check_checkpoint(checkpoint) -> None:
    if checkpoint is not None and not isinstance(checkpoint, bool):
        raise ValueError(f"checkpoint must be True, False or None (choose by the memory estimate), got {checkpoint!r}")


# --------------------------------------------------------------------------------------------------
# the hooked forward pass
# --------------------------------------------------------------------------------------------------


def _target_function(model, tokens: Tensor, pos: int, layer: str | int, wrt: int, frozen: bool):
    """``f(v) = y``: the forward pass with ``blocks.{wrt}.hook_resid_pre`` replaced by ``v``.

    It stops at ``blocks.{last}.hook_resid_post`` (the output layer) and, for ``layer="final"``,
    applies ``ln_final`` to the target position only: ``y`` is the final norm's output on either
    backend, never the logits.
    """
    freeze = freeze_hooks(model, wrt) if frozen else []
    last = _last_block(model, layer)
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
        y = resid[:, pos : pos + 1]
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
        gram = part @ part.transpose(1, 2) if part.shape[1] <= part.shape[2] else part.transpose(1, 2) @ part
        norms.append(torch.linalg.eigvalsh(gram)[:, -1].clamp_min(0).sqrt())
    return torch.cat(norms)


def _plain(model, used, pos, layer, wrt, mode, probes, chunk, keep_full, bar):
    """One forward pass with the whole graph kept, then the batched VJPs: ``(squares, absolute, blocks)``."""
    n, rows, d_in = used.shape[0], probes.shape[0], model.cfg.d_model
    need_buffer = mode != "sketch" or keep_full
    buffer = torch.zeros(n, rows, d_in, dtype=probes.dtype, device=probes.device) if need_buffer else None
    f = _target_function(model, used, pos, layer, wrt, frozen=mode == "frozen")
    _, vjp_fn = torch.func.vjp(f, input_value(model, used, wrt))
    squares, absolute = _accumulate(vjp_fn, probes, chunk, buffer, bar)
    del vjp_fn  # frees the retained graph before the spectral pass
    return squares, absolute, buffer


def _checkpointed(model, used, pos, layer, wrt, mode, probes, chunk, bar):
    """Block inputs kept, blocks recomputed top-down (:mod:`.checkpoint`): ``(squares, absolute, blocks)``."""
    frozen = mode == "frozen"
    freeze = freeze_hooks(model, wrt) if frozen else []
    stored = store_block_inputs(model, used, wrt, _last_block(model, layer), freeze)
    grads = head_cotangents(model, stored.top, pos, probes, final=layer == "final", frozen=frozen)
    stored.top = None
    grads = input_gradient_sweep(model, stored, grads, chunk, frozen=frozen, wrt=wrt, bar=bar)[:, 0]
    squares, absolute = _sums(grads, chunk)  # chunked like the plain path: no whole-buffer copies
    return squares, absolute, grads.transpose(0, 1)  # [pos, row, d_in]: a view of the only buffer


# --------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------


def jacobian(
    model,
    prompt: str | Tensor,
    *,
    target_pos: int = -1,
    layer: str | int = "final",
    wrt: int = 0,
    mode: str = "exact",
    n_probes: int = 64,
    chunk_size: int | None = None,
    keep_full: bool = False,
    checkpoint: bool | None = None,
    chat: bool | None = None,
    seed: int = 0,
    max_memory_bytes: int | None = None,
) -> JacobianResult:
    """Per input position ``i``, the norms of ``J_i = ∂y/∂v_i`` (see the module docstring).

    ``prompt`` is text (chat template unless ``chat=False``) or token ids. ``layer`` is ``"final"``
    (the final norm's output, gain included) or a layer ``l`` (``blocks.{l}.hook_resid_post``); ``wrt=l`` differentiates with respect to
    ``blocks.{l}.hook_resid_pre``. ``chunk_size`` cotangents go through each batched VJP (default:
    :data:`DEFAULT_CHUNK_SIZE`, shrunk to fit the memory budget). ``checkpoint`` recomputes one block
    at a time in the backward (``None``: when its memory estimate is the smaller one, or plain would not fit).
    ``max_memory_bytes`` defaults to :data:`MEMORY_FRACTION` of the free memory.
    """
    started = time.perf_counter()
    check_model(model)
    tokens = as_tokens(model, prompt, chat=chat)
    _check_mode(model, mode, n_probes)
    layer = _check_layer(model, layer)
    wrt = _check_wrt(model, wrt, layer)
    pos = check_position(target_pos, tokens.shape[0])
    check_chunk_size(chunk_size)
    _check_checkpoint(checkpoint)
    causal = model.cfg.attention_dir == "causal"
    used = tokens[: pos + 1] if causal else tokens
    n, d_out = used.shape[0], model.cfg.d_model
    rows = n_probes if mode == "sketch" else d_out
    n_layers = _last_block(model, layer) - wrt + 1

    def terms(n_tokens: int, saved: bool) -> tuple[int, int]:
        return memory_terms(
            model, n_tokens, mode, n_layers=n_layers, n_rows=rows, keep_full=keep_full, checkpoint=saved
        )

    plan = plan_memory(
        terms,
        n,
        rows,
        chunk_size,
        memory_budget(model, max_memory_bytes),
        checkpoint,
        what=f"the {mode} Jacobian",
        n_max=model.cfg.n_ctx,
        smaller=True,  # the recompute is one forward pass next to `rows` VJPs: take the smaller memory
    )
    chunk = plan.chunk
    dtype, device = model.cfg.dtype, torch.device(model.cfg.device)
    probes = make_probes(mode, d_out, n_probes, seed, dtype, device)
    n_chunks = -(-rows // chunk) * (n_layers if plan.checkpoint else 1)
    # steady_heap: without it every chunk page-faults its ~1 GB of gradients back in (allocator.py)
    with (
        steady_heap(),
        without_parameter_grads(model),
        torch.enable_grad(),
        counter(desc=f"{mode} Jacobian VJP chunks", total=n_chunks, delay=PROGRESS_DELAY_S) as bar,
    ):
        if plan.checkpoint:
            squares, absolute, blocks = _checkpointed(model, used, pos, layer, wrt, mode, probes, chunk, bar)
        else:
            squares, absolute, blocks = _plain(model, used, pos, layer, wrt, mode, probes, chunk, keep_full, bar)
        spectral = _spectral_norms(blocks) if mode != "sketch" else None
    frobenius = (squares * (d_out / rows)).sqrt()
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    str_tokens = tuple(model.to_str_tokens(used)) if model.tokenizer is not None else tuple(str(int(t)) for t in used)
    return JacobianResult(
        tokens=used.cpu(),
        str_tokens=str_tokens,
        target_pos=pos,
        layer=layer,
        wrt=wrt,
        mode=mode,
        spectral=None if spectral is None else spectral.to("cpu", out_dtype),
        frobenius=frobenius.to("cpu", out_dtype),
        l1=None if mode == "sketch" else absolute.to("cpu", out_dtype),
        full=blocks.permute(1, 0, 2).cpu() if keep_full else None,
        provenance=provenance(
            model,
            n_prompt_tokens=int(tokens.shape[0]),
            n_tokens=n,
            target_pos=pos,
            layer=layer,
            wrt=wrt,
            mode=mode,
            n_vjps=rows,
            chunk_size=chunk,
            checkpoint=plan.checkpoint,
            seed=seed,
            chat=chat,
            estimated_bytes=plan.estimated_bytes,
            max_memory_bytes=plan.budget,
        ),
        seconds=time.perf_counter() - started,
    )
