""":class:`MixingResult`: how far one replaced token spreads, with the sink and with it removed.

The numbers come from :func:`lens_squash.experiments.mixing.mixing`; this module holds the result
and its summaries (Barbero et al. 2025: a sink lets a head do nothing, so a perturbation should
spread less with the sink than without it).
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..algebra.ranks import spearman
from ..core.display import compact_repr
from ..core.results import Result

__all__ = ["SETTING_LABELS", "MixingResult", "relative_change"]

#: setting name -> what it does to the sink
SETTING_LABELS: dict[str, str] = {
    "sink": "with the sink (the model as it is)",
    "no_bos": "no <bos>: the first token dropped",
    "mask": "attention to position 0 masked, rows renormalised",
    "clamp": "the first token's massive activation clamped",
}


@dataclass(frozen=True, eq=False)
class MixingResult(Result):
    """Relative residual change per layer and position after replacing the token at ``position``.

    ``change[setting]`` is ``[layer + 1, pos − position]``: row ``l`` is the residual entering block
    ``l`` (the last row: the final block's output), column ``j`` is position ``position + j``, and the
    value is ``‖h_l,i(x′) − h_l,i(x)‖ / ‖h_l,i(x)‖`` averaged over the replacement tokens. ``"sink"`` is
    the model as it is; the others remove the sink (:data:`SETTING_LABELS`); a removal that could not
    apply is in ``skipped`` with the reason. ``jacobian[setting]`` is ``‖∂h_l,i / ∂x_k‖_F`` on the
    same grid (``None``: not computed; estimated from ``jacobian_probes`` Gaussian tangents when
    that is set). ``sink_attention`` and ``head_spread`` are ``[layer, head_index]`` for the model as
    it is: a head's mean attention from queries ``1…n−1`` to position 0, and the mean over positions
    ``i > position`` of ``‖Δ(z_h W_O^h)_i‖ / ‖h_l,i‖`` (what the head writes differently, relative
    to the stream it reads). Summaries count positions ``i > position`` only: the replaced token
    itself always changes.
    """

    tokens: Int[Tensor, "pos"]
    str_tokens: tuple[str, ...]
    position: int
    replacements: tuple[int, ...]
    threshold: float
    change: dict[str, Tensor]
    skipped: dict[str, str]
    clamp_layer: int | None
    sink_attention: Float[Tensor, "layer head_index"]
    head_spread: Float[Tensor, "layer head_index"]
    jacobian: dict[str, Tensor] | None = None
    jacobian_probes: int | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    __repr__ = compact_repr

    @property
    def settings(self) -> tuple[str, ...]:
        return tuple(self.change)

    @property
    def n_layers(self) -> int:
        return int(self.sink_attention.shape[0])

    def spread(self, setting: str = "sink") -> Int[Tensor, "layer_plus_one"]:
        """Per residual stream, how many positions after ``position`` changed by more than ``threshold``."""
        return (self._after(setting) > self.threshold).sum(-1)

    def mean_change(self, setting: str = "sink") -> Float[Tensor, "layer_plus_one"]:
        """Per residual stream, the mean relative change over the positions after ``position``."""
        return self._after(setting).mean(-1)

    def ratio(self, setting: str) -> Float[Tensor, "layer_plus_one"]:
        """Mean change without the sink over mean change with it, per residual stream (> 1: the
        sink held the perturbation back)."""
        return self.mean_change(setting) / self.mean_change("sink")

    def mean_ratio(self, setting: str) -> float:
        """:meth:`ratio` over the whole depth: the summed mean changes, without over with the sink."""
        return float(self.mean_change(setting)[1:].sum() / self.mean_change("sink")[1:].sum())

    def jacobian_mean(self, setting: str = "sink") -> Float[Tensor, "layer_plus_one"]:
        """Per residual stream, the mean ``‖∂h_l,i / ∂x_k‖_F`` over the positions after ``position``."""
        if self.jacobian is None:
            raise ValueError("this result holds no Jacobian; run mixing(..., jacobian=True)")
        return self.jacobian[setting][:, 1:].mean(-1)

    @property
    def head_correlation(self) -> float:
        """Spearman rank correlation over heads between sink attention and head spread."""
        return spearman(self.sink_attention.flatten(), self.head_spread.flatten())

    @property
    def layer_correlations(self) -> Float[Tensor, "layer"]:
        """Spearman between sink attention and head spread over the heads of each layer: the
        relation without the depth trend (later layers both attend more to the sink and see a
        perturbation that has already spread), which :attr:`head_correlation` mixes in."""
        return torch.tensor(
            [spearman(a, b) for a, b in zip(self.sink_attention, self.head_spread, strict=True)], dtype=torch.float64
        )

    def _after(self, setting: str) -> Tensor:
        if setting not in self.change:
            reason = self.skipped.get(setting, "it was not asked for")
            raise ValueError(f"no {setting!r} setting in this result ({reason}); it holds {list(self.change)}")
        return self.change[setting][:, 1:]

    def _derived(self) -> dict[str, Any]:
        removed = [s for s in self.change if s != "sink"]
        return {
            "mean_ratio": {s: self.mean_ratio(s) for s in removed},
            "head_correlation": self.head_correlation,
            "layer_correlations": self.layer_correlations,
        }

    def to_frame(self):
        """One row per residual stream: spread and mean change per setting, and the ratios."""
        import pandas as pd

        columns: dict[str, Any] = {"layer": list(range(self.n_layers + 1))}
        for setting in self.change:
            columns[f"spread_{setting}"] = self.spread(setting).tolist()
            columns[f"mean_{setting}"] = self.mean_change(setting).tolist()
            if setting != "sink":
                columns[f"ratio_{setting}"] = self.ratio(setting).tolist()
        if self.jacobian is not None:
            for setting in self.jacobian:
                columns[f"jacobian_{setting}"] = self.jacobian_mean(setting).tolist()
        return pd.DataFrame(columns)

    def _repr_html_(self) -> str:
        rows = [
            (
                "replaced",
                f"position {self.position} ({self.str_tokens[self.position]!r}), {len(self.replacements)} tokens",
            ),
            ("threshold", f"{self.threshold:g}"),
            ("head correlation (Spearman)", f"{self.head_correlation:+.3f}"),
        ]
        rows += [(f"ratio without/with sink: {s}", f"{self.mean_ratio(s):.3f}") for s in self.change if s != "sink"]
        rows += [(f"skipped: {s}", why) for s, why in self.skipped.items()]
        body = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in rows)
        return f"<b>lens_squash MixingResult</b><table>{body}</table>"


def relative_change(
    perturbed: Float[Tensor, "*batch pos d_model"], clean: Float[Tensor, "*batch pos d_model"]
) -> Float[Tensor, "*batch pos"]:
    """``‖h′ − h‖ / ‖h‖`` per position, in float64 (a zero ``h`` gives inf or nan, never a silent 0)."""
    clean, perturbed = clean.double(), perturbed.double()
    return (perturbed - clean).norm(dim=-1) / clean.norm(dim=-1)
