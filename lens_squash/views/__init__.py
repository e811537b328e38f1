"""Views: plotly figures, the self-contained HTML report and static export. Figures are returned,
never shown or written (DESIGN §8); every figure titles its axes and carries a caption
(:func:`lens_squash.views.style.caption_of`). `docs/gallery.md` shows one of every kind.

| module | builders | paper |
|---|---|---|
| :mod:`.bound_figures` | ``bound_vs_jacobian``, ``comparison_figure``: Jacobian norm against each bound | §5, Thm. B.5 |
| :mod:`.attention_figures` | ``attention_heatmap``: ``A^(l,h)``, layer slider, heads as small multiples | §5 |
| :mod:`.edge_figures` | ``attention_paths``: the heaviest edges of a bound's flow decomposition | DESIGN §3 |
| :mod:`.flow_views` | the true gradient flow: truth vs bounds, layer heatmaps, head grid, connected paths | issue 16 |
| :mod:`.spectral_figures` | ``spectral_figure``, ``spectral_report_figure``: spectrum, Dobrushin τ | Prop. B.8 |
| :mod:`.collapse_figures` | ``collapse_figure``, ``head_band_figure``, ``pe_figure``, ``tv_figure`` | Thm. 4.2, Figs. 5–7, 9 |
| :mod:`.sink_figures` | ``sink_figure``, ``sink_report_figure``: per-layer sinks, Mix–Compress–Refine | Queipo-de-Llano et al. |
| :mod:`.task_figures` | ``accuracy_figure``, ``abs_error_figure``, ``answer_histogram`` | Figs. 2–4 |
| :mod:`.task_theory_figures` | the answer digit's sensitivity, counting collapse | §3, Thm. 4.2, 5.1 |
| :mod:`.result_figures` | one ``Comparison``; many prompts (``ManyAnalyses``) | |
| :mod:`.style` | shared palettes, ticks, captions (``with_caption``, ``caption_of``), ``math_text`` | |
| :mod:`.compact` | ``compact_figure``, ``rounded``: small figure data | |
| :mod:`.task_theory_figures` | ``copy_sensitivity_figure``, ``count_collapse_figure`` | §3 ↔ Thm. 4.2, 5.1 |
| :mod:`.result_figures` | ``comparison_figure_of``, ``prompts_figure``: one comparison, many prompts | |
| :mod:`.registry` | imports every module here, so each builder's ``@register_figure(cls, kind)`` runs | |
| :mod:`.report`, :mod:`.export` | the HTML + JSON report; PNG / SVG / PDF through kaleido | |

**Figure kinds.** A builder declares what it draws where it is defined:
``@register_figure(ResultClass, "kind")`` (:func:`lens_squash.core.results.register_figure`;
``default=True`` for the kind ``plot()`` draws unasked, ``html=True`` for a page or an HTML/JS view).
``Result.plot(kind)`` imports :mod:`.registry` on first use, like a plotting backend (core code never
imports the views above it), and it imports every module of this package. Adding a figure is one
decorated builder in one module, plus its example in ``scripts/gallery.py``.
"""
