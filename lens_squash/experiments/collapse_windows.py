"""Attention windows against collapse: every layer restricted to a causal local window (paper §4).

With :func:`~lens_squash.experiments.collapse.window_hooks` masking the scores outside a window,
:func:`window_sweep` measures, for
each window, the collapse distances of :func:`~lens_squash.experiments.collapse.collapse_curve` and
the share of the rollout path bound that reaches the first and the last token.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..core.display import compact_repr
from ..core.records import provenance
from ..core.results import Result
from ..edge.prompts import uses_chat
from .collapse import (
    _BATCH_TOKENS,
    _NOISE_SAMPLES,
    CollapseFamily,
    CollapseResult,
    _check_path_args,
    _dtype_names,
    _pairs_curve,
    window_hooks,
)
from .collapse_families import _check_lengths, _family, _family_pairs

__all__ = ["WindowSweepResult", "window_sweep"]


# ----------------------------------------------------------------------------------------------
# Sliding-window mitigation (Appendix C.6)


@dataclass(frozen=True, eq=False)
class WindowSweepResult(Result):
    """Collapse distance and rollout path bound per local window ``w`` (``None``: full attention)."""

    family: str
    windows: tuple[int | None, ...]
    lengths: Int[Tensor, "length"]
    distance: Float[Tensor, "window length"]
    bound_first_share: Float[Tensor, "window length"]
    bound_last_share: Float[Tensor, "window length"]
    curves: tuple[CollapseResult, ...]
    provenance: dict[str, Any] = field(default_factory=dict)

    def _labels(self) -> list[str]:
        return ["full" if w is None else f"w={w}" for w in self.windows]

    def summary(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "window": self._labels(),
                f"rel_dist@{int(self.lengths[-1])}": self.distance[:, -1].tolist(),
                "bound_first_share": self.bound_first_share[:, -1].tolist(),
                "bound_last_share": self.bound_last_share[:, -1].tolist(),
            }
        ).set_index("window")

    def to_frame(self) -> pd.DataFrame:
        """:meth:`summary`: one row per window."""
        return self.summary()

    __repr__ = compact_repr

    def _repr_html_(self) -> str:
        return (
            f"<b>Sliding-window sweep</b> family <code>{html.escape(self.family)}</code>, longest length "
            f"{int(self.lengths[-1])}<br>" + self.summary().to_html(escape=True)
        )


def window_sweep(
    model,
    family: str | CollapseFamily,
    lengths: Sequence[int],
    windows: Sequence[int | None],
    *,
    chat: bool | None = None,
    open_ended: bool = False,
    separator: str = "",
    bound: bool = True,
    seed: int = 0,
    exact: bool = True,
) -> WindowSweepResult:
    """Rerun :func:`collapse_curve` (model dtype, ``exact`` as there) with every layer restricted to
    each window ``w``, and the rollout path bound (``variants.path_bound(trace, "rollout")``) of ``s``
    traced under the same mask: its share on the first token and on the last one, per length."""
    from ..edge.trace import trace as run_trace

    fam, lengths = _family(family), _check_lengths(lengths)
    _check_path_args(_NOISE_SAMPLES, exact=exact)
    chat = uses_chat(model.tokenizer, chat=chat)  # resolved once; every window measures the same pairs
    pairs = _family_pairs(model, fam, lengths, chat=chat, open_ended=open_ended, separator=separator, seed=seed)
    s_tokens = [torch.tensor(s, dtype=torch.long) for s in pairs.s]
    curves, first, last = [], [], []
    for w in windows:
        curves.append(
            _pairs_curve(
                model,
                fam,
                lengths,
                pairs,
                _dtype_names((model.cfg.dtype,)),
                native=False,
                window=w,
                batch_tokens=_BATCH_TOKENS,
                exact=exact,
                noise_samples=_NOISE_SAMPLES,
            )  # fmt: skip
        )
        shares = [_bound_shares(model, run_trace, toks, w) for toks in s_tokens] if bound else []
        first.append([f for f, _ in shares] or [float("nan")] * len(lengths))
        last.append([v for _, v in shares] or [float("nan")] * len(lengths))
    return WindowSweepResult(
        family=fam.name,
        windows=tuple(windows),
        lengths=torch.tensor(lengths),
        distance=torch.stack([c.final("inf")[0] for c in curves]),
        bound_first_share=torch.tensor(first, dtype=torch.float64),
        bound_last_share=torch.tensor(last, dtype=torch.float64),
        curves=tuple(curves),
        provenance=provenance(model, family=fam.name, windows=list(windows), chat=chat, open_ended=open_ended),
    )


def _bound_shares(model, run_trace, tokens: Tensor, window: int | None) -> tuple[float, float]:
    from ..algebra.variants import path_bound

    hooks = window_hooks(model.cfg.n_layers, window) if window is not None else []
    with model.hooks(fwd_hooks=hooks):
        tr = run_trace(model, tokens)
    row = path_bound(tr, "rollout").bound
    total = float(row.sum())
    return float(row[0]) / total, float(row[-1]) / total
