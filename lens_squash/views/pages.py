"""Whole pages in one call: ``a.show()`` / ``a.report(path)`` for one analysis, ``many.report(path)`` for many.

The figure registry draws them as the ``"page"`` kind of ``Analysis`` and ``ManyAnalyses`` (the
one way results reach views, so experiments never import this layer). A :class:`ReportPage` holds
one self-contained HTML document (plotly.js inline, works offline); in Jupyter it renders itself in
an ``<iframe srcdoc>`` so the report's styles and scripts stay out of the notebook's.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ..core.records import write_text_atomic
from ..core.results import register_figure
from ..core.tokens import escape_text
from ..experiments.analysis import Analysis
from ..experiments.many import ManyAnalyses
from .report import ReportSection, analysis_sections, build_report, model_section
from .result_figures import prompts_figure

__all__ = ["ReportPage", "analysis_page", "many_page", "many_summary", "write_suite_report"]


@dataclass(frozen=True)
class ReportPage:
    """One HTML document: :meth:`write` saves it, Jupyter shows it inline."""

    html: str
    title: str

    def write(self, path: str | os.PathLike) -> Path:
        """Write the page atomically (parent folders made); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_text_atomic(path, self.html)

    def _repr_html_(self) -> str:
        return (
            f'<iframe title="{html.escape(self.title)}" srcdoc="{html.escape(self.html, quote=True)}" '
            'style="width:100%;height:900px;border:1px solid #ddd" sandbox="allow-scripts"></iframe>'
        )

    def __repr__(self) -> str:
        return f"ReportPage({self.title!r}, {len(self.html) / 1e6:.1f} MB)"


@register_figure(Analysis, "page", html=True)
def analysis_page(
    analysis: Any, *, flow: Any = None, prompt: str | None = None, title: str | None = None
) -> ReportPage:
    """The analysis report (:func:`lens_squash.views.report.analysis_sections`) as one page."""
    title = title or f"lens_squash analysis: {analysis.trace.n_tokens} tokens → position {_target(analysis)}"
    sections = analysis_sections(analysis, prompt=prompt, flow=flow)
    return ReportPage(build_report(sections, title=title, metadata=analysis.provenance), title)


def _target(analysis: Any) -> int:
    bound = next(iter(analysis.bounds.values()), None)
    return analysis.trace.n_tokens - 1 if bound is None else bound.target_pos


def many_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Per variant across prompts: median, min and max Spearman, top-5 overlap, prompts below the truth."""
    rows = frame[frame.get("spearman", pd.Series(dtype=float)).notna()] if "spearman" in frame else frame.iloc[:0]
    out = []
    for variant, group in rows.groupby("variant", sort=False):
        rho = group["spearman"].astype(float)
        out.append(
            {
                "variant": variant,
                "prompts": len(group),
                "spearman_median": rho.median(),
                "spearman_min": rho.min(),
                "spearman_max": rho.max(),
                "top5_overlap_median": group["top5_overlap"].astype(float).median(),
                "prompts_below_truth": int((group["below_truth"].astype(float) > 0).sum()),
            }
        )
    return pd.DataFrame(out)


def _prompt_rows(many: Any, links: Sequence[str] | None) -> str:
    """Prompts from the best-ranked (highest best Spearman) to the worst, each linking its report."""
    rows = []
    for index, analysis in enumerate(many.analyses):
        best = analysis.best_variant
        rho = analysis.comparisons[best].spearman if best else math.nan
        rows.append((rho, index, best))
    rows.sort(key=lambda r: (-r[0] if not math.isnan(r[0]) else math.inf, r[1]))
    cells = []
    for rank, (rho, index, best) in enumerate(rows, 1):
        prompt = str(many.frame.loc[many.frame["prompt_index"] == index, "prompt"].iloc[0])
        shown = escape_text(prompt if len(prompt) <= 90 else prompt[:89] + "…")
        link = f'<a href="{html.escape(links[index], quote=True)}">report</a>' if links else "-"
        tag = "best" if rank == 1 else "worst" if rank == len(rows) else ""
        rho_text = "-" if math.isnan(rho) else f"{rho:.3f}"
        cells.append(
            f"<tr><td>{rank}{' (' + tag + ')' if tag else ''}</td><td>{index}</td><td>{shown}</td>"
            f"<td>{analysis_tokens(many, index)}</td><td>{escape_text(best or '-')}</td><td>{rho_text}</td><td>{link}</td></tr>"
        )
    head = "<tr><th>rank</th><th>prompt #</th><th>prompt</th><th>tokens</th><th>best variant</th><th>its Spearman</th><th>analysis</th></tr>"
    return f'<table class="data">{head}{"".join(cells)}</table>'


def analysis_tokens(many: Any, index: int) -> int:
    return many.analyses[index].trace.n_tokens


def _many_verdict(summary: pd.DataFrame, n: int, guarantees: dict[str, str]) -> str:
    if summary.empty:
        return f"{n} prompts; no Jacobian was computed, so no variant was checked against the truth."
    best = summary.loc[summary["spearman_median"].idxmax()]
    parts = [
        f"Across {n} prompts the best-ranking variant is `{best['variant']}` (median Spearman "
        f"{best['spearman_median']:.2f}, from {best['spearman_min']:.2f} to {best['spearman_max']:.2f})."
    ]
    for _, row in summary.iterrows():
        if row["prompts_below_truth"] and guarantees.get(row["variant"]) == "bound":
            parts.insert(0, f"⚠ VIOLATION: `{row['variant']}` is registered as a bound but sits below the truth on "
                         f"{row['prompts_below_truth']} of {row['prompts']} prompts.")  # fmt: skip
    return " ".join(parts)


@register_figure(ManyAnalyses, "page", html=True)
def many_page(many: Any, *, links: Sequence[str] | None = None, title: str | None = None) -> ReportPage:
    """Per-variant Spearman across prompts, the prompts from best to worst, a link to each analysis
    (``links[i]``: the i-th prompt's report, relative to the page)."""
    if links is not None and len(links) != len(many.analyses):
        raise ValueError(f"links must hold one address per prompt ({len(many.analyses)}), got {len(links)}")
    title = title or f"lens_squash: {len(many.analyses)} prompts"
    summary = many_summary(many.frame)
    guarantees = {}
    for analysis in many.analyses:
        guarantees.update({name: bound.guarantee_kind for name, bound in analysis.bounds.items()})
    verdict = _many_verdict(summary, len(many.analyses), guarantees)
    sections = [
        ReportSection("verdict", trusted_html=f'<p class="verdict">{escape_text(verdict)}</p>'),
        ReportSection(
            "per-variant Spearman across prompts",
            figures=[prompts_figure(many.frame)] if not summary.empty else [],
            table=summary if not summary.empty else None,
            caption="Each variant's rank agreement with the Jacobian on every prompt, and its spread.",
        ),
        ReportSection(
            "prompts, best to worst",
            trusted_html=_prompt_rows(many, links),
            caption="Ranked by the Spearman of each prompt's best variant; 'report' opens that prompt's analysis.",
        ),
    ]
    if many.analyses:
        sections.append(model_section(many.analyses[0].provenance))
    return ReportPage(build_report(sections, title=title, metadata=many.provenance), title)


def write_suite_report(out_dir: str | os.PathLike, table: pd.DataFrame, rows: Sequence[dict]) -> Path:
    """``lens-squash suite``'s ``report.html``: :func:`many_page` over the analyses the suite saved
    (``rows``: its ``prompts.jsonl`` rows in file order, each naming its ``analysis_file``), each
    prompt linking its saved analysis."""
    out = Path(out_dir)
    analyses = tuple(Analysis.load(out / row["analysis_file"]) for row in rows)
    many = ManyAnalyses(table, analyses, tuple(row["prompt"] for row in rows))
    page = many_page(
        many, links=[row["analysis_file"] for row in rows], title=f"lens_squash suite: {len(rows)} prompts"
    )
    return page.write(out / "report.html")
