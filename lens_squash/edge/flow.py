"""Sensitivity flow: where the true gradient travels, layer by layer, head by head and edge by edge.

For probes ``u_r`` (the identity rows for ``exact``/``frozen``, ``k`` orthonormal Gaussian-QR rows for
``sketch``: the same probes, seed convention and estimator as :mod:`lens_squash.edge.jacobian`) the
gradient of ``u_rᵀ y_n`` with respect to the residual stream entering layer ``l`` at position ``k`` is
``g^(l)_k``. Its Frobenius norm over the probes is the layer-wise sensitivity ``‖∂y_n/∂x^(l)_k‖_F``
(``l = L``: ``blocks.{L-1}.hook_resid_post``); at ``l = 0`` it is :func:`jacobian.jacobian`'s norm.

**One batched backward per probe chunk.** The forward pass adds zero-valued differentiable offsets
at every point the backward step of a block passes through, and :func:`torch.func.vjp` then returns
the gradient at all of them from one vmapped backward:

* ``blocks.{l}.hook_resid_pre`` (and the final ``hook_resid_post``): ``g^(l)``;
* ``blocks.{l}.hook_resid_mid``: ``g^(l+½)``, what the attention sends backwards;
* the three inputs of ``ln1`` (TransformerLens norms query, key and value inputs separately): the
  value part (gradient through the values, patterns held) and the pattern part (through queries and
  keys, values held);
* the input of ``ln2``: the MLP part ``(∂(MLP∘N2)_k)ᵀ g^(l+1)_k``;
* ``blocks.{l}.attn.hook_z``: ``∂z^h_j = W_O^h g^(l+½)_j`` per head, from which every value edge's norm
  follows without materialising ``[layer, head, n, n, d]``.

A pre-norm block's backward step is then exactly ::

    g^(l)_k = g^(l+1)_k                                    residual part
            + (∂(MLP∘N2)_k)ᵀ g^(l+1)_k                     MLP part
            + Σ_h Σ_j A^(l,h)_{jk} (∂N1_k)ᵀ W_V^h W_O^h g^(l+½)_j      value part, one edge per (h, j←k)
            + pattern part (through the scores)

and each part is an autograd gradient at its own node, never a remainder: their sum is compared with
``g^(l)`` in every chunk (:attr:`SensitivityFlow.decomposition_error`).

**Edge norms.** With ``x̂_k`` the normalised input and ``s_k`` the norm's scale, the value edge
``(h, j←k)`` for probe ``r`` is ``(A_jk/s_k)(z − x̂_k (x̂_k·z)/d)`` with ``z = P(γ ⊙ W_V^h ∂z^h_{rj})``
(``P`` the centring for LayerNorm, ``I`` for RMSNorm). Its squared norm is ::

    (A_jk² / s_k²) · [ ∂zᵀ G^h ∂z − (2/d − ‖x̂_k‖²/d²) (ṽ^h_k · ∂z)² ],
    G^h = W_V^hᵀ diag(γ) P diag(γ) W_V^h,    ṽ^h_k = W_V^hᵀ (γ ⊙ x̂_k),

so the first (frozen-scale) term factorises into ``A_jk / s_k`` times a per-(head, j) norm, and the
projection term needs only ``d_head``-long dot products (:mod:`lens_squash.edge.flow_edges`). ``frozen``
mode (patterns and norm scales detached, as in :mod:`lens_squash.edge.jacobian`) drops the projection
term and has no pattern part.

**Modules.** The hooked passes are in :mod:`lens_squash.edge.flow_pass`, the backward sweeps (plain,
or checkpointed: one block recomputed at a time from its stored input, chosen by the memory estimate)
in :mod:`lens_squash.edge.flow_sweep`, the edge geometry and bound rows in
:mod:`lens_squash.edge.flow_edges`; the request, memory plan and probes are the shared gradient driver's
(:mod:`lens_squash.edge.gradient`, as for :func:`jacobian.jacobian`); this module holds the result and the
front ends (:func:`flow`, :func:`flow_of`).
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..core.display import compact_repr
from ..core.results import Result, heavy
from .backward import check_position
from .flow_edges import (
    ValueGeometry,
    bound_layer_rows,
    edge_norms,
    head_value_parts,
    value_geometry,
)
from .flow_pass import FLOW_MODES, FlowGradients, check_flow_support, flow_gradients
from .flow_sweep import SweepResult, checkpointed_sweep, estimate_flow_memory, flow_memory_terms, plain_sweep
from .gradient import DEFAULT_N_PROBES, GradientMethod, GradientRequest, GradientRun, run_gradient
from .prompts import Tokens, tokenize

__all__ = [
    "FLOW_MODES",
    "FlowGradients",
    "SensitivityFlow",
    "ValueGeometry",
    "bound_layer_rows",
    "check_flow_support",
    "edge_norms",
    "estimate_flow_memory",
    "flow",
    "flow_gradients",
    "flow_of",
    "head_value_parts",
    "value_geometry",
]


# --------------------------------------------------------------------------------------------------
# the result
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SensitivityFlow(Result):
    """The true gradient's flow towards ``y`` at ``target_pos``, beside each bound's layer rows.

    Norms are Frobenius norms over the probes (sketch: scaled by ``sqrt(d_model / k)``, the unbiased
    estimator of :mod:`lens_squash.edge.jacobian`). ``sensitivity[l, k] = ‖∂y/∂x^(l)_k‖_F`` for
    ``l = 0..L`` (``L``: ``blocks.{L-1}.hook_resid_post``). Per layer ``l < L`` and position ``k``:
    ``mlp``, ``value`` and ``pattern`` parts (the residual part is ``sensitivity[l+1]``);
    ``value_heads[l, h, k]`` one head's value part; ``edges[l, h, j, k]`` the value edge ``j←k``.
    ``decomposition_error[l]`` is ``‖residual + mlp + value + pattern − g^(l)‖_F / ‖g^(l)‖_F`` over
    every probe and position, measured chunk by chunk. ``bounds[variant]`` is that variant's row at
    every layer (:func:`bound_layer_rows`).
    """

    tokens: Int[Tensor, "pos"]
    str_tokens: tuple[str, ...]
    target_pos: int
    mode: str
    n_probes: int
    sensitivity: Float[Tensor, "layers_covered pos"]
    mlp: Float[Tensor, "layer pos"] | None
    value: Float[Tensor, "layer pos"]
    pattern: Float[Tensor, "layer pos"]
    value_heads: Float[Tensor, "layer head pos"]
    edges: Float[Tensor, "layer head query_pos key_pos"] = heavy()
    decomposition_error: Float[Tensor, "layer"]
    bounds: dict[str, Tensor] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def n_layers(self) -> int:
        return self.value.shape[0]

    @property
    def n_heads(self) -> int:
        return self.edges.shape[1]

    @property
    def n_tokens(self) -> int:
        return self.sensitivity.shape[-1]

    @property
    def residual(self) -> Float[Tensor, "layer pos"]:
        """The residual part's norm at layer ``l``: ``g^(l+1)`` passes both skips unchanged."""
        return self.sensitivity[1:]

    def check_layer(self, layer: int, *, with_output: bool = True) -> int:
        """``layer`` as an index in ``0..L`` (``0..L-1`` without the output stream); ValueError otherwise."""
        top = self.n_layers if with_output else self.n_layers - 1
        if isinstance(layer, bool) or not isinstance(layer, int) or not -(top + 1) <= layer <= top:
            raise ValueError(
                f"layer={layer!r} is out of range: use 0..{top}"
                + (f" ({self.n_layers} is the final hook_resid_post)" if with_output else "")
            )
        return layer % (top + 1)

    def check_position(self, position: int) -> int:
        """``position`` as an index in ``0..n-1``; ValueError otherwise."""
        return check_position(position, self.n_tokens)

    def sink_split(self) -> dict[str, Tensor]:
        """Per layer and query position ``j``: the summed norms of the value edges ``j←0`` (sink edges,
        into position 0) and ``j←k, k ≥ 1`` (content edges), and the sink share of their sum."""
        sink = self.edges[:, :, :, 0].sum(1)
        content = self.edges[:, :, :, 1:].sum((1, 3))
        share = sink / (sink + content).clamp_min(torch.finfo(torch.float64).tiny)
        return {"sink": sink, "content": content, "sink_share": share}

    def layer_spearman(self) -> dict[str, Tensor]:
        """Per variant, Spearman's ρ between its row and the true sensitivity at every layer ``0..L-1``
        over positions ``0..target`` (NaN where either is constant)."""
        from ..algebra.ranks import spearman

        out = {}
        upto = self.target_pos + 1
        for name, rows in self.bounds.items():
            values = []
            for layer in range(self.n_layers):
                try:
                    values.append(spearman(rows[layer, :upto], self.sensitivity[layer, :upto]))
                except ValueError:
                    values.append(float("nan"))
            out[name] = torch.tensor(values, dtype=torch.float64)
        return out

    def top_paths(self, k: int = 5, *, source: int | None = None, **kwargs):
        """The ``k`` heaviest connected paths of the true flow into the target (:mod:`flow_paths`)."""
        from ..algebra.flow_paths import flow_top_paths

        found = flow_top_paths(self, k=k, source=source, **kwargs)
        return replace(found, provenance={**self.provenance, "k": k, "source": source})

    __repr__ = compact_repr

    def _repr_html_(self) -> str:
        s0 = self.sensitivity[0]
        top = torch.argsort(s0, descending=True)[:5].tolist()
        shares = self._part_shares()
        rows = [
            ("model", self.provenance.get("model", {}).get("name", "?")),
            ("mode", f"{self.mode} ({self.n_probes} probes)"),
            ("y", f"position {self.target_pos}"),
            ("layers × heads × positions", f"{self.n_layers} × {self.n_heads} × {self.n_tokens}"),
            (
                "largest ‖∂y/∂x⁽⁰⁾_k‖_F",
                ", ".join(f"{k}: {html.escape(repr(self.str_tokens[k]))} ({float(s0[k]):.3g})" for k in top),
            ),
            (
                "share of part norms (residual / MLP / value / pattern)",
                " / ".join(f"{shares[name]:.3f}" for name in ("residual", "mlp", "value", "pattern")),
            ),
            ("first-position sink share of value edges", f"{self._sink_total():.3f}"),
            ("max decomposition error (relative)", f"{float(self.decomposition_error.max()):.2e}"),
            ("bounds", ", ".join(self.bounds) or "none"),
            ("seconds", f"{self.seconds:.2f}"),
        ]
        body = "".join(
            f"<tr><td>{html.escape(str(k))}</td><td>{v if k.startswith('largest') else html.escape(str(v))}</td></tr>"
            for k, v in rows
        )
        from ..core.tokens import sensitivity_html  # the input tokens coloured by their sensitivity

        coloured = sensitivity_html(self.str_tokens, s0.tolist(), label="‖∂y/∂x⁽⁰⁾_k‖_F")
        return f"<b>lens_squash SensitivityFlow</b><table>{body}</table>{coloured}"

    def _part_shares(self) -> dict[str, float]:
        mlp = torch.zeros_like(self.value) if self.mlp is None else self.mlp
        parts = {"residual": self.residual, "mlp": mlp, "value": self.value, "pattern": self.pattern}
        total = sum(float(p.sum()) for p in parts.values()) or 1.0
        return {name: float(p.sum()) / total for name, p in parts.items()}

    def _sink_total(self) -> float:
        split = self.sink_split()
        total = float(split["sink"].sum() + split["content"].sum())
        return float(split["sink"].sum()) / total if total > 0 else float("nan")


# --------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------


def _bounds(model, used: Tensor, target_pos: int, variants: tuple[str, ...]) -> dict[str, Tensor]:
    from ..algebra.variants import build_graph
    from .trace import trace

    if not variants:
        return {}
    from ..algebra.variant_registry import variants_needing

    lipschitz = variants_needing(variants, "mlp_gains")
    traced = trace(model, used, lipschitz=lipschitz, keep_resid=variants_needing(variants, "residual"))
    return {v: bound_layer_rows(build_graph(traced, v, model=model), target_pos) for v in variants}


def _flow_variants(model, variants) -> tuple[str, ...]:
    """The variants to compare: named ones checked (an unknown or unsupported name is an error), or the
    registry's defaults less those the model cannot support."""
    from ..algebra.variant_registry import DEFAULT_VARIANTS, check_variant_names, unsupported_reason
    from ..core.support import UnsupportedModelError

    if variants is None:
        return tuple(name for name in DEFAULT_VARIANTS if unsupported_reason(name, model) is None)
    names = tuple(variants) and check_variant_names(variants)
    for name in names:
        reason = unsupported_reason(name, model)
        if reason is not None:
            raise UnsupportedModelError(f"variant {name!r} cannot apply to this model: {reason}")
    return names


@dataclass(frozen=True)
class _FlowMethod(GradientMethod):
    """The flow's sweep: every layer's parts and value edges, plain or checkpointed (:mod:`.flow_sweep`)."""

    what = "flow"

    def check(self, model, request: GradientRequest) -> None:
        check_flow_support(model)
        if request.layer != "final" or request.wrt != 0:
            raise ValueError(
                f"the flow runs from the embeddings (wrt=0) to the final norm (layer='final') through every "
                f"layer, got layer={request.layer!r}, wrt={request.wrt!r}; use jacobian_of for other layers"
            )

    def memory_terms(self, model, request, *, n_blocks, rows, n_tokens, checkpoint):
        return flow_memory_terms(model, n_tokens, rows, checkpoint=checkpoint)

    def sweep(self, model, run: GradientRun, bar) -> SweepResult:
        return (checkpointed_sweep if run.plan.checkpoint else plain_sweep)(model, run, bar)


def flow(
    model,
    prompt: str | Tensor | Tokens,
    *,
    target_pos: int = -1,
    mode: str = "exact",
    n_probes: int = DEFAULT_N_PROBES,
    seed: int = 0,
    chunk_size: int | None = None,
    checkpoint: bool | None = None,
    max_memory_bytes: int | None = None,
    variants: tuple[str, ...] | list[str] | None = None,
    chat: bool | None = None,
) -> SensitivityFlow:
    """The sensitivity flow of ``y`` (the final norm's output at ``target_pos``) through every layer,
    head and value edge, from one batched backward per probe chunk (module docstring).

    The request keywords are :func:`jacobian.jacobian`'s, with the same defaults: ``mode`` is ``exact``
    (d_model identity probes; the default), ``sketch`` (``n_probes`` orthonormal probes seeded by
    ``seed``), ``frozen`` (exact probes, patterns and norm scales detached) or ``frozen-sketch``
    (:meth:`GradientRequest.from_mode`). ``variants`` are the variants whose layer rows are computed
    beside the truth (``None``: the registry's defaults that the model supports; ``()`` for none; a
    variant that needs MLP gains traces them too). ``checkpoint`` recomputes one block at a time in the
    backward (``None``: only when the plain backward would not fit). Memory follows jacobian's
    estimate-and-refuse rule with the captured gradients added (:func:`estimate_flow_memory`).
    :func:`flow_of` takes a request instead.
    """
    request = GradientRequest.from_mode(
        mode,
        n_probes=n_probes,
        seed=seed,
        target_pos=target_pos,
        chunk_size=chunk_size,
        checkpoint=checkpoint,
        max_memory_bytes=max_memory_bytes,
    )
    return flow_of(model, prompt, request, variants=variants, chat=chat)


def flow_of(
    model,
    prompt: str | Tensor | Tokens,
    request: GradientRequest,
    *,
    variants: tuple[str, ...] | list[str] | None = None,
    chat: bool | None = None,
) -> SensitivityFlow:
    """:func:`flow` for a :class:`GradientRequest` (``layer="final"`` and ``wrt=0``, the defaults)."""
    started = time.perf_counter()
    method = _FlowMethod()
    method.check(model, request)
    tokens = tokenize(model, prompt, chat=chat)
    variants = _flow_variants(model, variants)
    run, swept = run_gradient(model, tokens, request, method)
    acc, inv_scale, coef = swept.sums, swept.inv_scale, swept.coef
    L = model.cfg.n_layers
    factor = model.cfg.d_model / run.rows  # the sketch's unbiased scaling (1 for exact probes)
    k1, k2 = acc.stack("k1", L).cpu(), acc.stack("k2", L).cpu()
    heads = inv_scale[:, None] * (k1 - coef[:, None] * k2).clamp_min(0).sqrt()
    out_dtype = torch.float64 if model.cfg.dtype == torch.float64 else torch.float32

    def norm(name, n_layers=L):
        sums = acc.stack(name, n_layers)
        return None if sums is None else (factor * sums).sqrt().cpu().to(out_dtype)

    total_sq = acc.stack("total").sum(-1).clamp_min(torch.finfo(torch.float64).tiny)
    used = run.used
    return SensitivityFlow(
        tokens=used.ids.cpu(),
        str_tokens=used.str_tokens,
        target_pos=run.target_pos,
        mode=run.request.mode,
        n_probes=run.rows,
        sensitivity=norm("total", L + 1),
        mlp=norm("mlp"),
        value=norm("value"),
        pattern=norm("pattern"),
        value_heads=(factor**0.5 * heads).to(out_dtype),
        edges=(factor**0.5 * swept.edges).to(out_dtype),
        decomposition_error=(acc.stack("gap") / total_sq).sqrt().cpu(),
        bounds=_bounds(model, used.ids, run.target_pos, variants),
        provenance=run.provenance(model, variants=list(variants)),
        seconds=time.perf_counter() - started,
    )
