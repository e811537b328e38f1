"""The figure builders under their 0.1 module name, ``lens_squash.plotting`` (kept importable).

New code imports each builder from its concept module (see :mod:`lens_squash.views`); this module
only re-exports them so that old notebooks keep working.
"""

from __future__ import annotations

from ..core.tokens import token_label
from .attention_figures import COLOR_SCALES, attention_heatmap
from .bound_figures import bound_vs_jacobian, comparison_figure
from .collapse_figures import (
    collapse_figure,
    head_band_figure,
    pe_figure,
    tv_decay_figure,
    tv_figure,
)
from .compact import compact_figure, rounded
from .edge_figures import attention_paths
from .sink_figures import SINK_CURVES, sink_figure, sink_report_figure
from .spectral_figures import spectral_figure, spectral_report_figure
from .style import MAX_TICKS, caption_of, math_text, with_caption
from .task_figures import abs_error_figure, accuracy_figure, answer_histogram

__all__ = [
    "COLOR_SCALES",
    "MAX_TICKS",
    "SINK_CURVES",
    "abs_error_figure",
    "accuracy_figure",
    "answer_histogram",
    "attention_heatmap",
    "attention_paths",
    "bound_vs_jacobian",
    "caption_of",
    "collapse_figure",
    "compact_figure",
    "comparison_figure",
    "head_band_figure",
    "math_text",
    "pe_figure",
    "rounded",
    "sink_figure",
    "sink_report_figure",
    "spectral_figure",
    "spectral_report_figure",
    "token_label",
    "tv_decay_figure",
    "tv_figure",
    "with_caption",
]
