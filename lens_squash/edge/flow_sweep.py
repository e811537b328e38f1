"""The sensitivity flow's backward sweeps, plain and checkpointed, and their memory rule.

Both sweeps feed the same :class:`Accumulator`, one layer's gradients at a time, chunk by chunk:
probe sums of squares for each part (float64), the decomposition gap, and the value-edge sums
(:func:`lens_squash.edge.flow_edges.edge_terms`).

* :func:`plain_sweep`: one forward pass under ``vjp`` keeps every layer's activations; each probe chunk
  is one batched backward through the whole model (:class:`lens_squash.edge.flow_pass.FlowPass`).
* :func:`checkpointed_sweep`: only each block's input is kept; the blocks are recomputed top-down,
  one at a time, and every probe's cotangent passes through the block's VJP chunk by chunk
  (:mod:`lens_squash.edge.checkpoint`). The per-chunk sums are added in the same order as in the plain
  sweep, and each layer's edge norms are formed as soon as its last chunk is in, so only one layer's
  ``[head, n, n]`` accumulators are alive.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from .backward import freeze_hooks
from .checkpoint import head_cotangents, store_block_inputs
from .flow_edges import ValueGeometry, edge_norms, edge_terms, value_geometry
from .flow_gain import head_groups, ln1_gain
from .flow_pass import FlowPass, block_flow_function, layer_offsets
from .gradient import GradientRun
from .jacobian_memory import DEFAULT_CHUNK_SIZE, memory_terms

__all__ = [
    "Accumulator",
    "SweepResult",
    "checkpointed_sweep",
    "estimate_flow_memory",
    "flow_memory_terms",
    "plain_sweep",
]


def _sq(x: Tensor) -> Tensor:
    """``Σ_r ‖x_{r,k}‖²`` per position, without a squared copy of ``x``."""
    return torch.linalg.vector_norm(x, dim=(0, 2), dtype=torch.float64).square()


class Accumulator:
    """Probe sums of squares, chunk by chunk and layer by layer (float64)."""

    def __init__(self, n_layers: int):
        self.n_layers = n_layers
        self.sums: dict[str, Tensor] = {}

    def add(self, name: str, value: Tensor) -> None:
        self.sums[name] = value if name not in self.sums else self.sums[name] + value

    def take_top(self, g_top: Float[Tensor, "row pos d_model"]) -> None:
        self.add(f"total.{self.n_layers}", _sq(g_top))

    def take_layer(
        self, layer: int, g: Tensor, g_next: Tensor, parts: dict[str, Tensor], pattern: Tensor, geo: ValueGeometry
    ) -> None:
        """One layer's chunk: ``g = g^(l)``, ``g_next = g^(l+1)``, ``parts`` the gradients at v, q, k,
        mlp (``None`` without an MLP) and z, each ``[row, pos, …]``."""
        value = parts["v"]
        patt = parts["q"] + parts["k"]  # the pattern part (frozen: both are expanded zeros, not writable)
        self.add(f"total.{layer}", _sq(g))
        self.add(f"value.{layer}", _sq(value))
        self.add(f"pattern.{layer}", _sq(patt))
        summed = patt.add_(value).add_(g_next)  # reuses the pattern part's buffer
        if parts["mlp"] is not None:
            self.add(f"mlp.{layer}", _sq(parts["mlp"]))
            summed.add_(parts["mlp"])
        self.add(f"gap.{layer}", _sq(summed.sub_(g)).sum())
        for name, sums in edge_terms(parts["z"], pattern, geo).items():
            self.add(f"{name}.{layer}", sums)

    def take(self, raw: dict[str, list[Tensor]], patterns: Tensor, geometry: list[ValueGeometry]) -> None:
        """One chunk of the plain sweep: every layer's gradients from one batched backward."""
        total = raw["resid"]
        self.take_top(total[-1])
        for layer, geo in enumerate(geometry):
            parts = {name: raw[name][layer] for name in ("v", "q", "k", "z")}
            parts["mlp"] = raw["mlp"][layer] if raw["mlp"] else None
            self.take_layer(layer, total[layer], total[layer + 1], parts, patterns[layer], geo)

    def stack(self, name: str, n_layers: int | None = None) -> Tensor | None:
        n_layers = self.n_layers if n_layers is None else n_layers
        if f"{name}.0" not in self.sums:
            return None
        return torch.stack([self.sums[f"{name}.{layer}"] for layer in range(n_layers)])


@dataclass(frozen=True, eq=False)
class SweepResult:
    """What a sweep leaves: the sums, unscaled edge norms, and ln1's ``1/s_k`` and projection coefficient."""

    sums: Accumulator
    edges: Float[Tensor, "layer head query_pos key_pos"]
    inv_scale: Float[Tensor, "layer key_pos"]
    coef: Float[Tensor, "layer key_pos"]


def _layer_geometry(model, layer: int, resid: Tensor, scale: Tensor | None, *, frozen: bool) -> ValueGeometry:
    block = model.blocks[layer]
    scale = None if scale is None else scale[:, 0]
    centred = model.cfg.normalization_type in ("LN", "LNPre")
    gain = ln1_gain(model, layer, resid, scale, centred=centred)
    w_v = block.attn.W_V.detach()
    if w_v.shape[0] != model.cfg.n_heads:  # a bridge's grouped-query W_V has one matrix per value head
        w_v = w_v[head_groups(model.cfg.n_heads, w_v.shape[0])]
    return value_geometry(resid, w_v, gain, scale, centred=centred, frozen=frozen)


def plain_sweep(model, run: GradientRun, bar) -> SweepResult:
    """The whole graph kept from one forward pass; one batched backward per probe chunk."""
    n_layers, frozen, probes, chunk = model.cfg.n_layers, run.frozen, run.probes, run.chunk
    acc = Accumulator(n_layers)
    flow_pass = FlowPass(model, run.used.ids, run.target_pos, frozen=frozen)
    resid, scale = flow_pass.forward_stack("resid"), flow_pass.forward_stack("scale")
    geometry = [
        _layer_geometry(model, layer, resid[layer], None if scale is None else scale[layer], frozen=frozen)
        for layer in range(n_layers)
    ]
    patterns = flow_pass.forward_stack("pattern")
    for start in range(0, probes.shape[0], chunk):
        acc.take(flow_pass.raw(probes[start : start + chunk]), patterns, geometry)
        bar.update(1)
    del flow_pass
    inv_scale = torch.stack([g.inv_scale for g in geometry]).cpu()
    coef = torch.stack([g.coef for g in geometry]).cpu()
    t1, t2 = acc.stack("t1").cpu(), acc.stack("t2").cpu()
    edges = edge_norms(patterns.double().cpu(), inv_scale, coef, t1, t2)
    return SweepResult(acc, edges, inv_scale, coef)


def checkpointed_sweep(model, run: GradientRun, bar) -> SweepResult:
    """Block inputs kept; blocks recomputed top-down, every probe's cotangent through each block's VJP."""
    n_layers, n, frozen, chunk = model.cfg.n_layers, len(run.used), run.frozen, run.chunk
    acc = Accumulator(n_layers)
    stored = store_block_inputs(model, run.used.ids, 0, n_layers - 1, freeze_hooks(model, 0) if frozen else [])
    grads = head_cotangents(
        model, stored.top, run.target_pos, run.probes, final=True, frozen=frozen
    )  # [row, 1, pos, d]
    stored.top = None
    for start in range(0, grads.shape[0], chunk):
        acc.take_top(grads[start : start + chunk, 0])
    edges, inv_scale, coef = [None] * n_layers, [None] * n_layers, [None] * n_layers
    for layer in range(n_layers - 1, -1, -1):
        store: dict[str, Tensor] = {}
        function = block_flow_function(model, layer, stored.calls[layer], frozen=frozen, store=store)
        _, vjp_fn = torch.func.vjp(function, stored.resid[layer], layer_offsets(model, layer, n))
        batched = torch.func.vmap(vjp_fn)
        pattern = store[f"pattern.{layer}"]
        geo = _layer_geometry(model, layer, stored.resid[layer][0], store.get(f"scale.{layer}"), frozen=frozen)
        for start in range(0, grads.shape[0], chunk):
            g_next = grads[start : start + chunk]
            g, offsets = batched(g_next)
            parts = {name: offsets[name][layer][:, 0] for name in ("v", "q", "k", "z")}
            parts["mlp"] = offsets["mlp"][layer][:, 0] if offsets["mlp"] else None
            acc.take_layer(layer, g[:, 0], g_next[:, 0], parts, pattern, geo)
            grads[start : start + chunk] = g
            bar.update(1)
        del vjp_fn, batched
        stored.release(layer)
        inv_scale[layer], coef[layer] = geo.inv_scale.cpu(), geo.coef.cpu()
        t1, t2 = acc.sums.pop(f"t1.{layer}").cpu(), acc.sums.pop(f"t2.{layer}").cpu()
        edges[layer] = edge_norms(
            pattern.double().cpu()[None], inv_scale[layer][None], coef[layer][None], t1[None], t2[None]
        )[0]
    return SweepResult(acc, torch.stack(edges), torch.stack(inv_scale), torch.stack(coef))


# --------------------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------------------


def flow_memory_terms(model, n: int, rows: int, *, checkpoint: bool = False) -> tuple[int, int]:
    """jacobian's ``(fixed, per_cotangent)`` terms (sketch form: no [pos, d, d] buffer; checkpointed:
    the stored inputs, one block's graph and every row's cotangent) plus the flow's own: per cotangent
    the captured gradients (7 d_model vectors per layer and position, ∂z, three more for vmap's copies,
    and the float64 ``[row, head, n, n]`` edge product of one layer), fixed the float64 edge accumulators.
    Checkpointed, the gradients of one layer are captured at a time, and only one layer's accumulators
    are alive beside the edge norms."""
    cfg = model.cfg
    fixed, per = memory_terms(model, n, "sketch", n_rows=rows, checkpoint=checkpoint)
    size = torch.finfo(cfg.dtype).bits // 8
    L, d, heads = cfg.n_layers, cfg.d_model, cfg.n_heads
    captured = 1 if checkpoint else L
    # 11 rather than the 8 vectors captured: SmolLM2 runs (n = 89, chunk 16) peaked at 1871 and 1968 MiB in-process
    # RSS against 1755 MiB predicted with 8 and 1943 MiB with 10 (benchmarks/flow.py): the extra three cover vmap copies
    per += size * (10 * captured * n * d + captured * n * heads * cfg.d_head) + 8 * 2 * heads * n * n
    fixed += 8 * (L + 3 if checkpoint else 3 * L) * heads * n * n
    return fixed, per


def estimate_flow_memory(
    model, n_tokens: int, chunk_size: int | None = None, *, n_rows: int | None = None, checkpoint: bool = False
) -> int:
    """Predicted peak extra bytes of :func:`lens_squash.edge.flow.flow` (jacobian's estimate plus the
    captured gradients)."""
    rows = n_rows or model.cfg.d_model
    fixed, per = flow_memory_terms(model, n_tokens, rows, checkpoint=checkpoint)
    return fixed + (chunk_size or min(DEFAULT_CHUNK_SIZE, rows)) * per
