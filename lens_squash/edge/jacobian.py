"""Exact, frozen and sketched Jacobians ``J_i = ∂y_n/∂v_i`` of one position's final representation.

This is the ground truth the path-sum bounds are judged against (Barbero et al. 2024, §5, Thm. 5.1 /
B.5; DESIGN §5). ``y`` is the representation of position ``target_pos`` (the last token by default):
the final norm's output (what enters the unembedding) or any layer's ``hook_resid_post``; ``v_i`` is
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

**Memory.** :func:`estimate_memory` predicts the peak extra bytes from the config before any work is
done (formula in its docstring); a request above ``max_memory_bytes`` is refused with a
``MemoryError`` that names a ``chunk_size`` that fits.
"""

from __future__ import annotations

import contextlib
import html
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .allocator import steady_heap
from ..core.display import compact_repr
from .models import check_model
from ..core.records import provenance, to_jsonable
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

MODES = ("exact", "frozen", "sketch")
NORM_KINDS = ("spectral", "frobenius", "l1")
#: cotangents per batched VJP when none is given: on SmolLM2 (2 CPU cores) 16 was as fast as 8, 32 or
#: 64 (within 10 %) at a quarter of 64's working memory (benchmarks/jacobian.py --chunk)
DEFAULT_CHUNK_SIZE = 16
#: share of the free memory a call may plan to use when ``max_memory_bytes`` is not given
MEMORY_FRACTION = 0.5


# --------------------------------------------------------------------------------------------------
# result
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class JacobianResult:
    """Per-position norms of ``J_i = ∂y/∂v_i`` (and optionally ``J`` itself). Tensors are on the CPU.

    ``tokens``/``str_tokens`` are the positions analysed: for causal models the prompt up to and
    including ``target_pos`` (later positions cannot influence it). ``spectral`` and ``l1`` are
    ``None`` in sketch mode; ``full`` is ``[d_out, pos, d_in]`` when ``keep_full`` was asked for (in
    sketch mode its first axis holds the ``k`` probe rows ``u_rᵀ J``).
    """

    tokens: Int[Tensor, "pos"]
    str_tokens: tuple[str, ...]
    target_pos: int
    target: str | int
    wrt: int
    mode: str
    spectral: Float[Tensor, "pos"] | None
    frobenius: Float[Tensor, "pos"]
    l1: Float[Tensor, "pos"] | None
    full: Float[Tensor, "d_out pos d_in"] | None
    metadata: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def n_tokens(self) -> int:
        return self.frobenius.shape[0]

    def norms(self, kind: str = "spectral") -> Float[Tensor, "pos"]:
        """The per-position norm ``kind`` (``spectral``, ``frobenius`` or ``l1``)."""
        if kind not in NORM_KINDS:
            raise ValueError(f"unknown norm kind {kind!r}; use one of {NORM_KINDS}")
        values = getattr(self, kind)
        if values is None:
            raise ValueError(
                f"the {kind} norm is not available in {self.mode!r} mode (a sketch estimates the "
                "Frobenius norm only); use kind='frobenius' or rerun with mode='exact'"
            )
        return values

    def best_norm(self) -> str:
        """The most informative norm this result has: spectral when exact, else Frobenius."""
        return "spectral" if self.spectral is not None else "frobenius"

    def to_dict(self, *, include_full: bool = False) -> dict[str, Any]:
        """Plain-JSON form; the full tensor only with ``include_full`` (it is ``d_model² · pos`` numbers)."""
        out = {
            "tokens": to_jsonable(self.tokens),
            "str_tokens": list(self.str_tokens),
            "target_pos": self.target_pos,
            "target": self.target,
            "wrt": self.wrt,
            "mode": self.mode,
            "spectral": to_jsonable(self.spectral),
            "frobenius": to_jsonable(self.frobenius),
            "l1": to_jsonable(self.l1),
            "metadata": to_jsonable(self.metadata),
            "seconds": self.seconds,
        }
        if include_full:
            out["full"] = to_jsonable(self.full)
        return out

    __repr__ = compact_repr

    def _repr_html_(self) -> str:
        kind = self.best_norm()
        values = self.norms(kind)
        top = torch.argsort(values, descending=True)[:5].tolist()
        top_text = ", ".join(
            f"{i}: {html.escape(repr(self.str_tokens[i]))} ({float(values[i]):.3g})" for i in top
        )
        rows = [
            ("model", self.metadata.get("model", {}).get("name", "?")),
            ("mode", self.mode),
            ("y", f"target={self.target!r} at position {self.target_pos}"),
            ("v", f"blocks.{self.wrt}.hook_resid_pre"),
            ("positions", self.n_tokens),
            (f"‖J_i‖ ({kind}) min / median / max",
             f"{float(values.min()):.3g} / {float(values.median()):.3g} / {float(values.max()):.3g}"),
            ("seconds", f"{self.seconds:.2f}"),
        ]
        body = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
        body += f"<tr><td>largest (position: token)</td><td>{top_text}</td></tr>"
        return f"<b>lens_squash JacobianResult</b><table>{body}</table>"

    def plot(self, kind: str | None = None, **kwargs):
        """Per-position norm on a log axis (a plotly Figure), via ``plotting.bound_vs_jacobian``."""
        from ..views.bound_figures import bound_vs_jacobian

        kind = kind or self.best_norm()
        name = {"spectral": "‖J_i‖₂", "frobenius": "‖J_i‖_F", "l1": "‖J_i‖₁ (entrywise)"}[kind]
        kwargs.setdefault("truth_name", f"{self.mode} Jacobian {name}")
        kwargs.setdefault("normalised", False)
        kwargs.setdefault("title", f"Sensitivity of position {self.target_pos} to each input position")
        return bound_vs_jacobian(self.str_tokens, self.norms(kind), {}, **kwargs)


# --------------------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------------------


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


def _layers_run(model, target: str | int, wrt: int) -> int:
    last = model.cfg.n_layers - 1 if target == "final" else int(target) % model.cfg.n_layers
    return last - wrt + 1


#: resident size of the retained graph ÷ the bytes the formula counts for it (allocator slack, forward
#: temporaries): 1.03, 1.13 and 1.11 on SmolLM2 at n = 32, 128, 256 (benchmarks/jacobian.py prints the
#: whole estimate beside the measured peak)
MEMORY_SLACK = 1.15


def _weights_per_layer(cfg) -> int:
    """Elements of one block's matrices: the forward pass keeps a reshaped copy of each for the backward."""
    d, d_head, heads = cfg.d_model, cfg.d_head, cfg.n_heads
    kv_heads = getattr(cfg, "n_key_value_heads", None) or heads
    attention = 2 * d * heads * d_head + 2 * d * kv_heads * d_head
    if cfg.attn_only or cfg.d_mlp is None:
        return attention
    return attention + (3 if cfg.gated_mlp else 2) * d * cfg.d_mlp


def _memory_terms(model, n_tokens: int, mode: str, *, n_layers: int | None = None,
                  n_rows: int | None = None, keep_full: bool = False) -> tuple[int, int]:
    """``(fixed, per_cotangent)`` bytes of :func:`estimate_memory`'s formula, slack included."""
    cfg = model.cfg
    n, d, heads = n_tokens, cfg.d_model, cfg.n_heads
    d_mlp = 0 if cfg.attn_only or cfg.d_mlp is None else cfg.d_mlp
    layers = cfg.n_layers if n_layers is None else n_layers
    size = torch.finfo(cfg.dtype).bits // 8
    # per layer and position: resid, norms, q/k/v/z, attention out (≈ 10 d_model); MLP pre/post and
    # the gate (≈ 3 d_mlp); scores, pattern and its softmax output (≈ 3 heads · n)
    per_layer = n * (10 * d + 3 * d_mlp + 3 * heads * n)
    graph = layers * (_weights_per_layer(cfg) + per_layer)
    rows = cfg.d_model if n_rows is None else n_rows
    buffer = rows * n * d if (mode != "sketch" or keep_full) else 0
    # a vmapped backward's temporaries per cotangent, measured on SmolLM2 for n = 32…256 (2.1–3.8 ×
    # per_layer), plus the cotangent's input gradient [pos, d_in]; the spectral pass works on 8
    # positions' Gram matrices at a time
    per_cotangent = 4 * per_layer + n * d
    spectral = 8 * d * d * 3 if mode != "sketch" else 0
    fixed = size * (graph + buffer + spectral)
    return int(MEMORY_SLACK * fixed), int(MEMORY_SLACK * size * per_cotangent)


def estimate_memory(
    model, n_tokens: int, chunk_size: int | None = None, mode: str = "exact", *,
    n_layers: int | None = None, n_probes: int | None = None, keep_full: bool = False,
) -> int:
    """Predicted peak extra bytes of :func:`jacobian` (model weights excluded).

    With ``n`` tokens, ``d = d_model``, ``H`` heads, ``m = d_mlp``, ``L`` layers run (``n_layers``,
    default all), ``c`` cotangents per batch, ``r`` rows (``d_model``, or ``n_probes`` in sketch
    mode) and ``b`` bytes per element of the model's dtype::

        per_layer = n · (10 d + 3 m + 3 H n)                     saved activations of one layer
        W         = 2 d H d_head + 2 d H_kv d_head + (2 or 3) d m   one block's matrices
        bytes     = 1.15 · b · [ L · (W + per_layer)             the retained autograd graph
                        + r · n · d        (exact, frozen, or keep_full)   the Jacobian buffer
                        + c · (4 · per_layer + n · d)            the batched backward's working set
                        + 24 d²            (exact, frozen)       the spectral pass, 8 positions at a time ]

    ``W`` is there because TransformerLens's einsums save a reshaped copy of every weight matrix for
    the input gradient (405 MiB on SmolLM2, whatever ``n``). The constants are upper estimates
    calibrated on SmolLM2 against the peak resident size above a trimmed heap, and
    :data:`MEMORY_SLACK` covers the allocator's slack; ``benchmarks/jacobian.py`` prints the
    prediction next to the measured peak.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {MODES}")
    rows = n_probes if mode == "sketch" else None
    fixed, per = _memory_terms(model, n_tokens, mode, n_layers=n_layers, n_rows=rows, keep_full=keep_full)
    chunk = chunk_size or min(DEFAULT_CHUNK_SIZE, rows or model.cfg.d_model)
    return fixed + chunk * per


def _choose_chunk(fixed: int, per: int, rows: int, chunk_size: int | None, budget: int) -> int:
    """The chunk to use: the one asked for, or the default shrunk until it fits; else MemoryError."""
    fits = (budget - fixed) // per if budget > fixed else 0
    if chunk_size is not None:
        chunk = min(chunk_size, rows)
        if fixed + chunk * per <= budget:
            return chunk
        if fits >= 1:
            raise MemoryError(
                f"chunk_size={chunk_size} needs about {_gib(fixed + chunk * per)} but only "
                f"{_gib(budget)} may be used (max_memory_bytes); use chunk_size={int(min(fits, rows))} "
                "or raise max_memory_bytes"
            )
    elif fits >= 1:
        return int(min(DEFAULT_CHUNK_SIZE, rows, fits))
    raise MemoryError(
        f"even chunk_size=1 needs about {_gib(fixed + per)} but only {_gib(budget)} may be used: the "
        "autograd graph and the Jacobian buffer alone are too large. Use fewer tokens, "
        "mode='sketch' (no [pos, d, d] buffer) or a larger max_memory_bytes"
    )


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.3g} GiB" if n_bytes >= 2**28 else f"{n_bytes / 2**20:.3g} MiB"


# --------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------


def _check_target(model, target: str | int) -> str | int:
    if target == "final":
        return target
    n_layers = model.cfg.n_layers
    if isinstance(target, bool) or not isinstance(target, int) or not -n_layers <= target < n_layers:
        raise ValueError(
            f"target must be 'final' (the final norm's output) or a layer index in "
            f"[-{n_layers}, {n_layers - 1}] (that layer's hook_resid_post), got {target!r}"
        )
    return target % n_layers


def _check_wrt(model, wrt: int, target: str | int) -> int:
    last = model.cfg.n_layers - 1 if target == "final" else target
    if isinstance(wrt, bool) or not isinstance(wrt, int) or not 0 <= wrt <= last:
        raise ValueError(
            f"wrt must be a layer index in [0, {last}] (the input is blocks.{{wrt}}.hook_resid_pre and "
            f"must come before the target, {target!r}), got {wrt!r}"
        )
    return wrt


def _check_position(target_pos: int, n_tokens: int) -> int:
    if isinstance(target_pos, bool) or not isinstance(target_pos, int) or not -n_tokens <= target_pos < n_tokens:
        raise ValueError(
            f"target_pos={target_pos!r} is outside the prompt's {n_tokens} tokens; use an index in "
            f"[-{n_tokens}, {n_tokens - 1}] (-1 is the last token)"
        )
    return target_pos % n_tokens


def _check_mode(model, mode: str, n_probes: int) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {MODES}")
    d_out = model.cfg.d_model
    if mode == "sketch" and not (isinstance(n_probes, int) and 1 <= n_probes <= d_out):
        raise ValueError(
            f"n_probes must be an integer in [1, {d_out}] (orthonormal probes in d_model={d_out} "
            f"dimensions), got {n_probes!r}"
        )


# --------------------------------------------------------------------------------------------------
# the hooked forward pass
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _without_parameter_grads(model) -> Iterator[None]:
    # Only the input needs gradients: parameters that require grad would make autograd record (and
    # keep alive) the whole graph, embeddings included. Restored exactly as found.
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _detach(value: Tensor, hook) -> Tensor:
    return value.detach()


#: hooks the frozen mode detaches: attention patterns, norm scales, and mixture-of-experts router
#: weights (frozen like the patterns; the certified bound assumes all three)
_FROZEN_SUFFIXES = (".hook_scale", "attn.hook_pattern", "mlp.hook_expert_weights")


def _freeze_hooks(model, wrt: int) -> list[tuple[str, Any]]:
    """Detach every attention pattern, norm scale and MoE router weight the input can reach (``frozen`` mode)."""
    names = []
    for name in model.hook_dict:
        if not name.endswith(_FROZEN_SUFFIXES):
            continue
        match = re.match(r"blocks\.(\d+)\.", name)
        if match is None or int(match.group(1)) >= wrt:
            names.append(name)
    return [(name, _detach) for name in names]


class _ReachedHook(Exception):
    """Raised by a hook to end a forward pass once the activation it carries has been computed."""

    def __init__(self, value: Tensor):
        super().__init__("forward pass stopped by lens_squash.edge.jacobian")
        self.value = value


def _run_until(model, tokens: Tensor, hook_name: str, fwd_hooks: list | tuple = ()) -> Tensor:
    """The value of ``hook_name`` in a forward pass that stops there: no later layer runs.

    A hook that raises, not ``stop_at_layer``: a TransformerBridge ignores ``stop_at_layer=n_layers``
    (no block has that index) and returns the logits, ``ln_final`` and the unembedding applied. The
    hook works the same on both backends; an unknown name (which a bridge skips without a word) is
    an error.
    """

    def stop(value: Tensor, hook) -> None:
        raise _ReachedHook(value)

    # checked here: TransformerLens 3's bridge skips an unknown name without a word, the others raise
    # a bare KeyError
    missing = [name for name in (hook_name, *(n for n, _ in fwd_hooks)) if name not in model.hook_dict]
    if missing:
        raise ValueError(
            f"this model has no hook {missing[0]!r}; lens_squash needs a HookedTransformer or a "
            "TransformerBridge after enable_compatibility_mode(no_processing=True)"
        )
    try:
        with model.hooks(fwd_hooks=[*fwd_hooks, (hook_name, stop)]):
            model(tokens)
    except _ReachedHook as reached:
        return reached.value
    raise ValueError(
        f"{hook_name} never fired in the forward pass; lens_squash needs a HookedTransformer or a "
        "TransformerBridge after enable_compatibility_mode(no_processing=True)"
    )


def _input_value(model, tokens: Tensor, wrt: int) -> Float[Tensor, "1 pos d_in"]:
    """``blocks.{wrt}.hook_resid_pre`` from a no-grad pass that stops right there."""
    with torch.no_grad():
        return _run_until(model, tokens[None].to(model.cfg.device), f"blocks.{wrt}.hook_resid_pre").clone()


def _target_function(model, tokens: Tensor, pos: int, target: str | int, wrt: int, frozen: bool):
    """``f(v) = y``: the forward pass with ``blocks.{wrt}.hook_resid_pre`` replaced by ``v``.

    It stops at ``blocks.{last}.hook_resid_post`` (the target layer's output) and, for
    ``target="final"``, applies ``ln_final`` to the target position only: ``y`` is the final norm's
    output on either backend, never the logits.
    """
    freeze = _freeze_hooks(model, wrt) if frozen else []
    last = model.cfg.n_layers - 1 if target == "final" else target
    tokens = tokens[None].to(model.cfg.device)

    def f(v: Tensor) -> Float[Tensor, "d_out"]:
        replaced = []

        def replace(value: Tensor, hook) -> Tensor:
            replaced.append(True)
            return v

        hooks = [(f"blocks.{wrt}.hook_resid_pre", replace), *freeze]
        resid = _run_until(model, tokens, f"blocks.{last}.hook_resid_post", hooks)
        if not replaced:  # y would not depend on v: a silent zero Jacobian
            raise ValueError(f"blocks.{wrt}.hook_resid_pre never fired, so the input could not be replaced")
        y = resid[:, pos : pos + 1]
        if target == "final" and model.cfg.normalization_type is not None:
            with model.hooks(fwd_hooks=freeze):  # the final norm's scale is frozen too
                y = model.ln_final(y)  # per position, so norming only the target is exact
        return y[0, 0]

    return f


# --------------------------------------------------------------------------------------------------
# the VJPs
# --------------------------------------------------------------------------------------------------


def _probes(mode: str, d_out: int, n_probes: int, seed: int, dtype, device) -> Float[Tensor, "row d_out"]:
    """The cotangent rows: the identity (exact rows of J) or k orthonormal Gaussian-QR probes."""
    if mode != "sketch":
        return torch.eye(d_out, dtype=dtype, device=device)
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(d_out, n_probes, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    # sign fix makes Q Haar-distributed (QR alone is biased by its sign convention)
    q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))
    return q.T.to(device, dtype).contiguous()


def _accumulate(vjp_fn, probes: Tensor, chunk: int, buffer: Tensor | None) -> tuple[Tensor, Tensor]:
    """Run the batched VJPs; return per-position ``(Σ ‖u_rᵀ J_i‖², Σ |u_rᵀ J_i|₁)`` and fill ``buffer``."""
    batched = torch.func.vmap(vjp_fn)
    squares = absolute = None
    for start in range(0, probes.shape[0], chunk):
        rows = probes[start : start + chunk]
        (grad,) = batched(rows)
        grad = grad[:, 0]  # [row, pos, d_in]
        part_sq = grad.pow(2).sum(dim=(0, 2), dtype=torch.float64)
        part_abs = grad.abs().sum(dim=(0, 2), dtype=torch.float64)
        squares = part_sq if squares is None else squares + part_sq
        absolute = part_abs if absolute is None else absolute + part_abs
        if buffer is not None:
            buffer[:, start : start + rows.shape[0]] = grad.transpose(0, 1)
        del grad
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


# --------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------


def jacobian(
    model,
    prompt: str | Tensor,
    *,
    target_pos: int = -1,
    target: str | int = "final",
    wrt: int = 0,
    mode: str = "exact",
    n_probes: int = 64,
    chunk_size: int | None = None,
    keep_full: bool = False,
    chat: bool | None = None,
    seed: int = 0,
    max_memory_bytes: int | None = None,
) -> JacobianResult:
    """Per input position ``i``, the norms of ``J_i = ∂y/∂v_i`` (see the module docstring).

    ``prompt`` is text (chat template unless ``chat=False``) or token ids. ``target`` is ``"final"``
    (the final norm's output, gain included) or a layer ``l`` (``blocks.{l}.hook_resid_post``);
    ``wrt=l`` differentiates with respect to ``blocks.{l}.hook_resid_pre``. ``chunk_size`` cotangents
    go through each batched VJP (default: :data:`DEFAULT_CHUNK_SIZE`, shrunk to fit the memory
    budget). ``max_memory_bytes`` defaults to :data:`MEMORY_FRACTION` of the free memory.
    """
    started = time.perf_counter()
    check_model(model)
    tokens = as_tokens(model, prompt, chat=chat)
    _check_mode(model, mode, n_probes)
    target = _check_target(model, target)
    wrt = _check_wrt(model, wrt, target)
    pos = _check_position(target_pos, tokens.shape[0])
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    causal = model.cfg.attention_dir == "causal"
    used = tokens[: pos + 1] if causal else tokens
    n, d_out = used.shape[0], model.cfg.d_model
    rows = n_probes if mode == "sketch" else d_out
    fixed, per = _memory_terms(model, n, mode, n_layers=_layers_run(model, target, wrt), n_rows=rows, keep_full=keep_full)
    budget = max_memory_bytes if max_memory_bytes is not None else int(MEMORY_FRACTION * available_memory(model.cfg.device))
    chunk = _choose_chunk(fixed, per, rows, chunk_size, budget)

    dtype, device = model.cfg.dtype, torch.device(model.cfg.device)
    probes = _probes(mode, d_out, n_probes, seed, dtype, device)
    need_buffer = mode != "sketch" or keep_full
    buffer = torch.zeros(n, rows, d_out, dtype=dtype, device=device) if need_buffer else None
    # steady_heap: without it every chunk page-faults its ~1 GB of gradients back in (allocator.py)
    with steady_heap(), _without_parameter_grads(model), torch.enable_grad():
        f = _target_function(model, used, pos, target, wrt, frozen=mode == "frozen")
        _, vjp_fn = torch.func.vjp(f, _input_value(model, used, wrt))
        squares, absolute = _accumulate(vjp_fn, probes, chunk, buffer)
        del vjp_fn  # frees the retained graph before the spectral pass
        spectral = _spectral_norms(buffer) if mode != "sketch" else None
    frobenius = (squares * (d_out / rows)).sqrt()
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    str_tokens = tuple(model.to_str_tokens(used)) if model.tokenizer is not None else tuple(str(int(t)) for t in used)
    return JacobianResult(
        tokens=used.cpu(),
        str_tokens=str_tokens,
        target_pos=pos,
        target=target,
        wrt=wrt,
        mode=mode,
        spectral=None if spectral is None else spectral.to("cpu", out_dtype),
        frobenius=frobenius.to("cpu", out_dtype),
        l1=None if mode == "sketch" else absolute.to("cpu", out_dtype),
        full=buffer.permute(1, 0, 2).cpu() if keep_full else None,
        metadata=provenance(
            model, n_prompt_tokens=int(tokens.shape[0]), n_tokens=n, target_pos=pos, target=target,
            wrt=wrt, mode=mode, n_vjps=rows, chunk_size=chunk, seed=seed, chat=chat,
            estimated_bytes=fixed + chunk * per, max_memory_bytes=budget,
        ),
        seconds=time.perf_counter() - started,
    )
