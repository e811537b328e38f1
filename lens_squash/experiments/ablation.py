"""Clamp the first token's massive activation through a hook and measure what changes.

Queipo-de-Llano, Arroyo, Barbero et al. ("Attention Sinks and Compression Valleys in LLMs are Two
Sides of the Same Coin") trace attention sinks and compression valleys to one cause: the first
token's residual norm explodes in the middle layers. Their ablations remove that massive activation
and watch both phenomena weaken. This module does the same on any TransformerLens model:

* :func:`clamp_hooks` builds a forward hook on ``blocks.{layer}.hook_resid_post`` that rescales the
  residual vector at ``position`` (the first token by default). Modes, one at a time:

  - default: rescale it to the median norm of the other tokens (the "typical" token norm);
  - ``target_norm=t``: rescale it to norm ``t``;
  - ``factor=f``: multiply it by ``f`` (``f = 1`` is the identity, handy as a control);
  - ``dims=k`` or ``dims=[i, j, …]``: set the ``k`` largest-``|x|`` coordinates (or the listed
    ones) to their median over the other tokens, leaving the rest of the vector alone.

  The hook is differentiable, so Jacobians taken under it are the ablated model's Jacobians.
* :func:`clamp_massive_activation` installs those hooks for a ``with`` block through
  ``model.hooks``; every forward pass inside (traces, Jacobians) runs the ablated model.
  ``layer=None`` installs nothing.
* :func:`ablation_effect` runs :func:`lens_squash.experiments.sinks.sink_analysis` with and without the clamp
  and, when :mod:`lens_squash.edge.jacobian` is available, the last token's sketched Jacobian sensitivity
  to every input position, and returns the differences as an :class:`AblationResult`.
"""

from __future__ import annotations

import html
import importlib.util
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..algebra.sinks import SINK_EPS, SinkReport
from ..core.display import compact_repr
from ..core.records import provenance
from ..core.results import Result
from ..edge.prompts import Tokens, tokenize
from .sinks import sink_analysis

__all__ = ["AblationResult", "ablation_effect", "clamp_hooks", "clamp_massive_activation"]

Hook = tuple[str, Callable]


def _median_other_norm(resid: Tensor, position: int) -> Tensor:
    """Per batch row, the median norm of every position but ``position`` (``[batch, 1]``)."""
    norms = resid.norm(dim=-1)
    keep = torch.ones(norms.shape[-1], dtype=torch.bool, device=norms.device)
    keep[position] = False
    # quantile (mean of the two middle values), as sinks.massive_activations
    return torch.quantile(norms[:, keep], 0.5, dim=-1, keepdim=True)


def _median_other_coords(resid: Tensor, position: int, dims: Tensor) -> Tensor:
    """Per batch row, the median over the other positions of each coordinate in ``dims``."""
    keep = torch.ones(resid.shape[1], dtype=torch.bool, device=resid.device)
    keep[position] = False
    return torch.quantile(resid[:, keep][..., dims], 0.5, dim=1)  # [batch, len(dims)]


def _check_options(model, layer: int, position: int, factor, target_norm, dims) -> None:
    n_layers = model.cfg.n_layers
    if not -n_layers <= layer < n_layers:
        raise ValueError(f"layer must index one of the model's {n_layers} blocks, got {layer}")
    if not isinstance(position, int):
        raise ValueError(f"position must be an int (0 is the first token), got {position!r}")
    chosen = [
        name for name, value in (("factor", factor), ("target_norm", target_norm), ("dims", dims)) if value is not None
    ]
    if len(chosen) > 1:
        raise ValueError(f"pass at most one of factor, target_norm and dims, got {', '.join(chosen)}")
    if target_norm is not None and target_norm < 0:
        raise ValueError(f"target_norm is a vector norm, so it must be ≥ 0, got {target_norm}")
    if isinstance(dims, int) and not 1 <= dims <= model.cfg.d_model:
        raise ValueError(f"dims=k clamps the k largest coordinates: k must be in [1, {model.cfg.d_model}], got {dims}")


def clamp_hooks(
    model,
    layer: int | None,
    *,
    position: int = 0,
    factor: float | None = None,
    target_norm: float | None = None,
    dims: int | Sequence[int] | None = None,
) -> list[Hook]:
    """Forward hooks that clamp the residual vector at ``position`` after block ``layer``.

    See the module docstring for the modes; with none given the vector is rescaled to the median
    norm of the other tokens. ``layer=None`` returns no hooks (the disabled ablation).
    """
    if layer is None:
        return []
    _check_options(model, layer, position, factor, target_norm, dims)
    layer = layer % model.cfg.n_layers

    def hook(resid: Float[Tensor, "batch pos d_model"], hook) -> Tensor:
        n = resid.shape[1]
        if not -n <= position < n or n < 2:
            raise ValueError(f"cannot clamp position {position} in a sequence of {n} tokens (need ≥ 2)")
        pos = position % n
        x = resid[:, pos]
        if dims is not None:
            index = (
                x.abs().mean(0).topk(dims).indices
                if isinstance(dims, int)
                else torch.as_tensor(list(dims), device=x.device)
            )
            x = x.index_copy(-1, index, _median_other_coords(resid, pos, index).to(x.dtype))
        elif factor is not None:
            x = x * factor
        else:
            target = _median_other_norm(resid, pos) if target_norm is None else torch.as_tensor(target_norm)
            norm = x.norm(dim=-1, keepdim=True)
            # a zero vector has no direction to rescale along: leave it
            x = torch.where(norm > 0, x * (target.to(x) / norm.clamp_min(torch.finfo(x.dtype).tiny)), x)
        # out of place: autograd keeps resid (and the view x) for the backward pass of a Jacobian
        at_pos = (torch.arange(n, device=resid.device) == pos)[None, :, None]
        return torch.where(at_pos, x[:, None, :], resid)

    return [(f"blocks.{layer}.hook_resid_post", hook)]


@contextmanager
def clamp_massive_activation(
    model,
    layer: int | None,
    *,
    position: int = 0,
    factor: float | None = None,
    target_norm: float | None = None,
    dims: int | Sequence[int] | None = None,
) -> Iterator[list[Hook]]:
    """``with clamp_massive_activation(model, 12): ...`` runs every forward pass inside ablated.

    Installs :func:`clamp_hooks` through ``model.hooks`` (removed on exit, even on error). Nested
    ``run_with_hooks`` calls (as in :func:`lens_squash.edge.trace.trace`) keep them: TransformerLens
    removes hooks by context level.
    """
    hooks = clamp_hooks(model, layer, position=position, factor=factor, target_norm=target_norm, dims=dims)
    if not hooks:
        yield hooks
        return
    with model.hooks(fwd_hooks=hooks):
        yield hooks


@dataclass(frozen=True, eq=False)
class AblationResult(Result):
    """Sink, compression and sensitivity curves with and without the clamp, and their changes.

    ``*_change`` are ablated minus baseline. ``jacobian_*`` are ``‖∂y_n/∂v_i‖_F`` per input position
    (sketched with the same probes in both runs), ``None`` when the Jacobian was not computed.
    """

    layer: int
    position: int
    settings: dict[str, Any]
    baseline: SinkReport
    ablated: SinkReport
    sink_rate_change: Float[Tensor, "layer"]
    entropy_change: Float[Tensor, "layers_covered"]
    first_token_norm_change: Float[Tensor, "layers_covered"]
    str_tokens: tuple[str, ...]
    jacobian_baseline: Float[Tensor, "pos"] | None = None
    jacobian_ablated: Float[Tensor, "pos"] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def sink_rate_overall_change(self) -> float:
        return self.ablated.sink_rate_overall - self.baseline.sink_rate_overall

    def _derived(self) -> dict[str, Any]:
        return {"sink_rate_overall_change": self.sink_rate_overall_change}

    def plot_jacobian(self, **kwargs):
        """The last token's Jacobian sensitivity per position, baseline against ablated: ``plot("jacobian")``."""
        return self.plot("jacobian", **kwargs)

    __repr__ = compact_repr

    def _repr_html_(self) -> str:
        rows = [
            ("clamp", f"position {self.position} after layer {self.layer}, {self.settings}"),
            ("sink rate (all heads)", f"{self.baseline.sink_rate_overall:.1%} → {self.ablated.sink_rate_overall:.1%}"),
            (
                "first-token norm after the clamp",
                f"{self.baseline.first_token_norm[self.layer + 1]:.3g} → {self.ablated.first_token_norm[self.layer + 1]:.3g}",
            ),
            ("mean Δ matrix entropy (layers after the clamp)", f"{self.entropy_change[self.layer + 1 :].mean():+.3f}"),
        ]
        if self.jacobian_baseline is not None:
            rows.append(
                ("Σ ‖J‖_F over positions", f"{self.jacobian_baseline.sum():.4g} → {self.jacobian_ablated.sum():.4g}")
            )
        body = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in rows)
        return f"<b>lens_squash AblationResult</b><table>{body}</table>"


def _jacobian_norms(model, tokens: Tokens, n_probes: int, seed: int) -> Tensor:
    try:
        from ..edge.jacobian import jacobian
    except ImportError as err:
        raise ValueError("jacobian=True needs lens_squash.edge.jacobian; pass jacobian=False to skip it") from err

    # the same seed in both runs gives the same probes, so differences are the ablation's
    result = jacobian(model, tokens, mode="sketch", n_probes=n_probes, target_pos=-1, seed=seed)
    return torch.as_tensor(result.frobenius).detach().cpu().double()


def ablation_effect(
    model,
    prompt: str | Tensor,
    layer: int,
    *,
    chat: bool | None = None,
    position: int = 0,
    factor: float | None = None,
    target_norm: float | None = None,
    dims: int | Sequence[int] | None = None,
    eps: float = SINK_EPS,
    jacobian: bool | None = None,
    n_probes: int = 32,
    seed: int = 0,
    over_squashing: bool = True,
) -> AblationResult:
    """Clamp the massive activation after block ``layer`` and measure the change in sink rate,
    matrix entropy per layer and (optionally) the last token's Jacobian sensitivity per position.

    Two traced forward passes (baseline and ablated). ``jacobian=None`` computes the sketched
    Jacobians when :mod:`lens_squash.edge.jacobian` is installed; ``True`` requires it; ``False`` skips.
    ``over_squashing`` also fills both reports' rollout-mass and Dobrushin curves (``O(L n²)``).
    """
    tokens = tokenize(model, prompt, chat=chat)  # once: both passes and both Jacobians take this value
    settings = {
        "factor": factor,
        "target_norm": target_norm,
        "dims": list(dims) if isinstance(dims, Sequence) else dims,
    }
    _check_options(model, layer, position, factor, target_norm, dims)
    layer = layer % model.cfg.n_layers
    clamp = dict(position=position, **settings)
    if jacobian is None:
        jacobian = importlib.util.find_spec("lens_squash.edge.jacobian") is not None
    baseline = sink_analysis(model, tokens, eps=eps, over_squashing=over_squashing)
    jac_base = _jacobian_norms(model, tokens, n_probes, seed) if jacobian else None
    with clamp_massive_activation(model, layer, **clamp):
        ablated = sink_analysis(model, tokens, eps=eps, over_squashing=over_squashing)
        jac_ablated = _jacobian_norms(model, tokens, n_probes, seed) if jacobian else None
    return AblationResult(
        layer=layer,
        position=position,
        settings=settings,
        baseline=baseline,
        ablated=ablated,
        sink_rate_change=ablated.sink_rate - baseline.sink_rate,
        entropy_change=ablated.entropy - baseline.entropy,
        first_token_norm_change=ablated.first_token_norm - baseline.first_token_norm,
        str_tokens=tuple(baseline.provenance.get("str_tokens", ())),
        jacobian_baseline=jac_base,
        jacobian_ablated=jac_ablated,
        provenance=provenance(
            model,
            analysis="ablation",
            layer=layer,
            position=position,
            eps=eps,
            n_tokens=len(tokens),
            n_probes=n_probes if jacobian else None,
            **settings,
        ),
    )
