"""Sinks, massive activations and compression of one prompt: one traced forward pass → SinkReport.

The metrics are pure functions on tensors (:mod:`lens_squash.algebra.sinks`,
:mod:`~lens_squash.algebra.massive`, :mod:`~lens_squash.algebra.compression`,
:mod:`~lens_squash.algebra.phases`); this module is where a model meets them: it traces the
prompt with its residual streams kept (:func:`lens_squash.edge.trace.trace`) and hands the trace's
per-layer attention summary, residual norms and representations to
:func:`~lens_squash.algebra.sinks.sink_report`, the one builder of a report.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from ..algebra.sinks import SINK_EPS, SinkReport, sink_report
from ..edge.trace import as_tokens, trace

__all__ = ["sink_analysis"]


def sink_analysis(
    model,
    prompt: str | Tensor,
    *,
    chat: bool | None = None,
    eps: float = SINK_EPS,
    factor: float = 10.0,
    method: Literal["spearman", "pearson"] = "spearman",
    over_squashing: bool = True,
) -> SinkReport:
    """Every sink, massive-activation, compression and over-squashing curve from ONE forward pass.

    ``prompt`` is text (chat template unless ``chat=False``) or token ids, as for
    :func:`~lens_squash.edge.trace.trace`. Hooks the caller has installed (e.g.
    :func:`lens_squash.experiments.ablation.clamp_massive_activation`) stay active during the pass.
    All ``L + 1`` residual streams are used (the ones entering each layer plus the final output).
    """
    if len(as_tokens(model, prompt, chat=chat)) < 2:  # before the pass: query 0 alone says nothing
        raise ValueError(
            "the prompt is a single token; sinks compare the first token with later ones, so pass "
            "a prompt of at least 2 tokens"
        )
    tr = trace(model, prompt, chat=chat, keep_resid=True)
    call = {"analysis": "sinks", "prompt": prompt if isinstance(prompt, str) else None}
    return sink_report(
        tr.attention_summary(),
        tr.resid_norms,
        representations=tr.resid,
        first_resid=tr.first_token_resid,
        eps=eps,
        factor=factor,
        method=method,
        over_squashing=over_squashing,
        provenance={**tr.provenance, "str_tokens": list(tr.str_tokens), **call},
    )
