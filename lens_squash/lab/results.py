"""What the training lab records: :class:`LabRun` (one trained model) and :class:`LabGrid` (a grid)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from jaxtyping import Float
from torch import Tensor

from ..core.display import compact_repr
from ..core.results import Result
from ..experiments.mixing_result import MixingResult

__all__ = ["SINK_SHARE_EPS", "LabGrid", "LabRun"]

#: a head is a sink head when its mean attention to position 0 exceeds this (the issue's 0.3)
SINK_SHARE_EPS = 0.3


@dataclass(frozen=True, eq=False)
class LabRun(Result):
    """One tiny model trained on the synthetic language, measured along the way and at the end.

    ``steps`` are the evaluation steps (0 is the untrained model); at each, ``loss`` is the
    held-out loss and ``head_attention[e]`` ``[layer, head_index]`` each head's mean attention from
    queries ``1…n−1`` to position 0 on the held-out rows. ``spread_ratio[removal]`` is the trained
    model's over-mixing ratio (mean relative change without the sink over with it, summed over
    depth, averaged over ``mixing`` prompts); ``mixing`` is the first of those prompts' result.
    """

    config: dict[str, Any]
    steps: Float[Tensor, "evals"]
    loss: Float[Tensor, "evals"]
    train_loss: Float[Tensor, "evals"]
    head_attention: Float[Tensor, "evals layer head_index"]
    spread_ratio: dict[str, float]
    mixing: MixingResult | None
    wall_s: float
    provenance: dict[str, Any] = field(default_factory=dict)

    __repr__ = compact_repr

    @property
    def sink_share(self) -> Float[Tensor, "evals"]:
        """Per evaluation, the share of heads whose mean attention to position 0 exceeds 0.3."""
        return (self.head_attention > SINK_SHARE_EPS).double().mean(dim=(1, 2))

    @property
    def first_token_attention(self) -> Float[Tensor, "evals layer"]:
        """Per evaluation and layer, the mean attention to position 0 over heads."""
        return self.head_attention.mean(-1)

    @property
    def label(self) -> str:
        c = self.config
        return f"ctx {c['n_ctx']} · L{c['n_layers']} · {c['packing']} · seed {c['seed']}"

    def summary(self) -> dict[str, Any]:
        """The final numbers of this run, one row of :meth:`LabGrid.to_frame`."""
        c = self.config
        row = {k: c[k] for k in ("n_ctx", "n_layers", "packing", "seed", "d_model", "steps")}
        row.update(
            loss_start=float(self.loss[0]),
            loss_end=float(self.loss[-1]),
            sink_share=float(self.sink_share[-1]),
            first_token_attention=float(self.first_token_attention[-1].mean()),
            max_head_attention=float(self.head_attention[-1].max()),
            wall_s=self.wall_s,
        )
        row.update({f"spread_ratio_{k}": v for k, v in self.spread_ratio.items()})
        return row

    def _derived(self) -> dict[str, Any]:
        return {"sink_share": self.sink_share}

    def to_frame(self):
        """One row per evaluation: step, losses, sink share and each layer's first-token attention."""
        import pandas as pd

        columns: dict[str, Any] = {
            "step": self.steps.tolist(),
            "loss": self.loss.tolist(),
            "train_loss": self.train_loss.tolist(),
            "sink_share": self.sink_share.tolist(),
        }
        for layer in range(self.head_attention.shape[1]):
            columns[f"first_token_attention_L{layer}"] = self.first_token_attention[:, layer].tolist()
        return pd.DataFrame(columns)


@dataclass(frozen=True, eq=False)
class LabGrid(Result):
    """Every run of a grid over context length × depth × packing × seed."""

    runs: tuple[LabRun, ...]
    wall_s: float
    provenance: dict[str, Any] = field(default_factory=dict)

    __repr__ = compact_repr

    def to_frame(self):
        """One row per run: its configuration and :meth:`LabRun.summary`."""
        import pandas as pd

        return pd.DataFrame([run.summary() for run in self.runs])
