"""HTML/JSON reports: every section and figure present, plotly.js inline once, user text escaped,
files written atomically."""

from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.offline
import pytest
import torch

from lens_squash.core.records import provenance
from lens_squash.views.attention_figures import attention_heatmap
from lens_squash.views.bound_figures import bound_vs_jacobian
from lens_squash.views.collapse_figures import collapse_figure
from lens_squash.views.compact import SMALL_ARRAY
from lens_squash.views.edge_figures import attention_paths
from lens_squash.views.report import (
    SECTION_ORDER,
    ReportSection,
    analysis_sections,
    build_report,
    collapse_section,
    model_section,
    prompt_section,
    tasks_section,
    write_report,
)
from lens_squash.views.sink_figures import sink_figure
from lens_squash.views.spectral_figures import spectral_figure, spectral_report_figure
from lens_squash.views.style import caption_of

PAYLOADS = (
    "<script>window.__pwned=1</script>",
    "</script><img src=x onerror=alert(1)>",
    "<!--<script>",
    '"><svg onload=alert(1)>',
)


def small_figure(name: str = "curve") -> go.Figure:
    return bound_vs_jacobian(None, torch.rand(4) + 0.1, {name: torch.rand(4) + 0.1}, normalised=False)


def standard_sections() -> list[ReportSection]:
    n = 5
    patterns = torch.eye(n).expand(1, 2, n, n)
    return [
        model_section(provenance(None, note="test")),
        prompt_section("the prompt", ["a", "b", "c", "d", "e"], predicted="f"),
        ReportSection(
            "bound vs gradient",
            figures=[small_figure()],
            table=pd.DataFrame({"variant": ["rollout"], "spearman": [0.5]}),
        ),
        ReportSection("paths", figures=[attention_paths((patterns, torch.rand(1, n))), attention_heatmap(patterns)]),
        ReportSection("spectral", figures=[spectral_figure(dobrushin=torch.rand(3))]),
        ReportSection("sinks", figures=[sink_figure({"mass": torch.rand(3)}, (1, 2))]),
        ReportSection("collapse", figures=[collapse_figure([1, 2], {"float32": [1e-3, 0.0]})]),
    ]


def script_tags(page: str) -> tuple[int, int]:
    lower = page.lower()
    return lower.count("<script"), lower.count("</script")


def test_report_has_every_section_and_figure_and_plotly_once():
    sections = standard_sections()
    page = build_report(sections, title="my report")
    n_figures = sum(len(s.figures) for s in sections)
    for i, section in enumerate(sections):
        assert f'<section id="section-{i}"><h2>{section.title}</h2>' in page
        assert f'<a href="#section-{i}">{section.title}</a>' in page
    assert {s.title for s in sections} <= set(SECTION_ORDER)
    assert page.count('class="plotly-graph-div"') == n_figures
    assert page.count("Plotly.newPlot(") == n_figures
    assert page.count(plotly.offline.get_plotlyjs()[:500]) == 1  # plotly.js inline, exactly once
    ours = page.replace(plotly.offline.get_plotlyjs(), "")
    assert not re.search(r"<(script|link|img|iframe)[^>]*\b(src|href)=", ours)  # offline: nothing fetched
    assert script_tags(page) == (2 + n_figures, 2 + n_figures)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "<title>my report</title>" in page and f"{n_figures} figures" in page
    assert "<td>rollout</td>" in page  # the DataFrame table


def test_sections_as_a_dict_accept_figures_lists_and_pairs():
    fig = small_figure()
    page = build_report(
        {
            "one": fig,
            "two": [fig, fig],
            "three": ([fig], "some text"),
            "four": (fig, pd.DataFrame({"x": [1]})),
            "five": ReportSection("five", text="plain"),
        }
    )
    assert page.count('class="plotly-graph-div"') == 5
    assert '<p class="text">some text</p>' in page and '<p class="text">plain</p>' in page
    ids = [f"lens-squash-figure-{i}" for i in range(5)]
    assert all(page.count(f'id="{i}"') == 1 for i in ids)  # figure ids are unique across sections
    with pytest.raises(TypeError, match="section"):
        build_report({"bad": 3})
    with pytest.raises(TypeError, match="Figure"):
        build_report([ReportSection("bad", figures=["not a figure"])])
    with pytest.raises(TypeError, match="ReportSection"):
        build_report(["not a section"])


def test_hostile_user_text_is_escaped_everywhere():
    hostile_tokens = list(PAYLOADS) + ["ok"]
    fig = bound_vs_jacobian(hostile_tokens, torch.rand(5) + 0.1, {PAYLOADS[0]: torch.rand(5) + 0.1})
    sections = [
        prompt_section(" ".join(PAYLOADS), hostile_tokens, predicted=PAYLOADS[1]),
        ReportSection(
            PAYLOADS[1],
            figures=[fig, attention_heatmap(torch.eye(5).expand(1, 1, 5, 5), hostile_tokens)],
            text=PAYLOADS[0],
            table={PAYLOADS[2]: PAYLOADS[3], "nested": {"k": PAYLOADS[1]}},
            notes=(PAYLOADS[0],),
        ),
        ReportSection("frame", table=pd.DataFrame({PAYLOADS[0]: [PAYLOADS[1]]})),
    ]
    page = build_report(sections, title=PAYLOADS[0], metadata={"prompt": PAYLOADS[1], PAYLOADS[3]: 1})
    for payload in PAYLOADS:
        assert payload not in page
    body = page.split("</head>", 1)[1]  # plotly.js itself (in <head>) mentions <svg
    assert "<img" not in body and "<svg" not in body
    assert html.escape(" ".join(PAYLOADS)) in page  # the prompt is shown, escaped
    assert f"<title>{html.escape(PAYLOADS[0])}</title>" in page
    assert script_tags(page) == (4, 4)  # two in <head>, one per figure: nothing injected
    assert "<!--" not in page


def test_a_figure_that_would_break_out_of_its_script_is_refused(monkeypatch):
    fig = small_figure()
    monkeypatch.setattr(
        go.Figure, "to_html", lambda self, **kw: "<div></div><script>x('</script><script>alert(1)')</script>"
    )
    with pytest.raises(ValueError, match="refusing"):
        build_report([ReportSection("s", figures=[fig])])


def test_write_report_writes_html_and_json(tmp_path):
    results = {"bound": torch.tensor([1.0, 2.0]), "ratio": math.nan, "name": PAYLOADS[0]}
    meta = {"model": {"name": "tiny"}}
    html_path, json_path = write_report(tmp_path / "out", standard_sections(), results, title="t", metadata=meta)
    assert html_path == tmp_path / "out" / "report.html" and json_path == tmp_path / "out" / "results.json"
    n_figures = sum(len(s.figures) for s in standard_sections())
    assert html_path.read_text(encoding="utf-8").count('class="plotly-graph-div"') == n_figures
    data = json.loads(json_path.read_text(encoding="utf-8"))
    assert data == {"bound": [1.0, 2.0], "ratio": None, "name": PAYLOADS[0], "metadata": meta}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.html", "results.json"]


def test_a_failed_write_leaves_the_previous_files_intact(tmp_path, monkeypatch):
    html_path, json_path = write_report(tmp_path, standard_sections()[:1], {"run": 1})
    old_html, old_json = html_path.read_text(), json_path.read_text()
    real_write_text = Path.write_text
    for failing_call in (1, 2):  # the first file's write fails, or the second's after the first succeeded
        calls = []

        def half_then_fail(self, text, *args, failing_call=failing_call, calls=calls, **kwargs):
            calls.append(self)
            if len(calls) < failing_call:
                return real_write_text(self, text, *args, **kwargs)
            real_write_text(self, text[: len(text) // 2], *args, **kwargs)  # a partial file on disk...
            raise OSError("disk full")  # ...then the write fails

        monkeypatch.setattr(Path, "write_text", half_then_fail)
        with pytest.raises(OSError, match="disk full"):
            write_report(tmp_path, standard_sections(), {"run": 2})
        monkeypatch.undo()
        assert len(calls) == failing_call
        assert html_path.read_text() == old_html and json_path.read_text() == old_json
        assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "results.json"]  # no temp files left


def test_an_error_while_rendering_writes_nothing(tmp_path):
    html_path, json_path = write_report(tmp_path, standard_sections()[:1], {"run": 1})
    before = html_path.read_text(), json_path.read_text()
    with pytest.raises(TypeError):
        write_report(tmp_path, [ReportSection("bad", figures=[None])], {"run": 2})
    assert (html_path.read_text(), json_path.read_text()) == before


def test_prompt_and_model_sections(tiny):
    section = prompt_section("hi <b>", [" a", "<b>", "\n"], predicted=" c")
    assert section.trusted_html.count('class="tok"') == 3
    assert "␣a" in section.trusted_html and "&lt;b&gt;" in section.trusted_html and "\\n" in section.trusted_html
    assert "<b>" not in section.trusted_html and "<code>␣c</code>" in section.trusted_html
    page = build_report([section])
    assert "hi &lt;b&gt;" in page
    model = model_section(provenance(tiny, chat=False))
    assert model.table["model.n_layers"] == 2 and "versions" in model.table
    assert "<th>model.name</th>" in build_report([model])


def test_analysis_sections_cover_an_analysis_like_object(tiny):
    from types import SimpleNamespace

    from lens_squash.algebra.attention import aggregate_heads
    from lens_squash.algebra.compare import compare_variants
    from lens_squash.algebra.paths import rollout_matrices
    from lens_squash.algebra.sinks import sink_report
    from lens_squash.algebra.spectral import analyze_stack
    from lens_squash.algebra.variants import path_bound
    from lens_squash.edge.trace import trace

    traced = trace(tiny, torch.arange(1, 9))
    n = traced.n_tokens
    rollout = path_bound(traced, "rollout")
    table, _ = compare_variants(
        {"rollout": rollout}, torch.rand(n, dtype=torch.float64) + 0.1, str_tokens=traced.str_tokens
    )
    analysis = SimpleNamespace(
        trace=traced,
        bounds={"rollout": rollout},
        table=table,
        best_variant="rollout",
        summary=lambda: pd.DataFrame({"variant": ["rollout"], "spearman": [0.3]}),
        spectral=analyze_stack(rollout_matrices(aggregate_heads(traced.patterns.double()))),
        sinks=sink_report(traced.attention_summary(), traced.resid_norms),
    )
    sections = analysis_sections(analysis, prompt=PAYLOADS[0])
    assert [s.title for s in sections] == [
        "model",
        "prompt",
        "bound vs gradient",
        "paths",
        "attention",
        "spectral",
        "sinks",
    ]
    page = build_report(sections)
    assert page.count('class="plotly-graph-div"') == 5 and PAYLOADS[0] not in page
    spectral = sections[5].figures[0]
    assert {t.name for t in spectral.data} == {
        "eigenvalues Λ̃_ii",
        "second eigenvalue",
        "τ per layer",
        "Π τ (bound)",
        "[Π Λ̃]ₙ,₀",
        "distance to rank one",
    }
    # a field under another name (as an older SpectralReport had it) is refused, not silently dropped
    fields = {
        name: getattr(analysis.spectral, name)
        for name in ("spectrum", "second_eigenvalue", "dobrushin", "rollout_mass")
    }
    with pytest.raises(ValueError, match="no spectral field 'rank_one_distance'"):
        spectral_report_figure(SimpleNamespace(**fields, distance_to_rank_one=analysis.spectral.rank_one_distance))
    with pytest.raises(ValueError, match=r"\['dobrushin'\].*None"):
        spectral_report_figure(
            SimpleNamespace(**{**fields, "dobrushin": None}, rank_one_distance=analysis.spectral.rank_one_distance)
        )


def test_collapse_and_tasks_sections_show_the_results():
    from lens_squash.edge.models import tiny_model
    from lens_squash.experiments.collapse import collapse_curve
    from lens_squash.experiments.task_results import RESULT_COLUMNS, TaskResults

    model = tiny_model(
        n_layers=2, n_heads=2, d_model=16, positional="rotary", norm="RMS", tokenizer="smollm2", n_ctx=128
    )
    result = collapse_curve(model, "count_ones", [2, 4, 8], ("float64", "float32"), open_ended=True)
    section = collapse_section(result, head_dtype="float32")
    dtypes_fig, heads_fig = section.figures
    lines = {t.name: t for t in dtypes_fig.data}
    for d, name in enumerate(result.dtypes):  # y per dtype: the relative ∞-distance, zeros drawn at the floor
        rel = result.distances[d, :, -1, 0] / result.reference[d, :, -1, 0]
        shown = torch.where(rel == 0, torch.nan, rel)
        torch.testing.assert_close(
            torch.as_tensor(lines[name].y, dtype=torch.float64), shown, equal_nan=True, rtol=1e-12, atol=0
        )
        eps = torch.finfo(getattr(torch, name)).eps
        smallest = float(rel[rel > 0].min())
        if eps >= smallest / 1e3:  # a resolution near the distances is a line
            assert list(lines[f"{name} resolution"].y) == [eps] * 2
        else:  # one far below every distance is named, not drawn (it would stretch the axis)
            assert f"{name} resolution" not in lines
            assert any(f"{name} {eps:.1e}" in a.text for a in dtypes_fig.layout.annotations)
    heads = result.head_distances[1]
    torch.testing.assert_close(torch.as_tensor(heads_fig.data[0].y), heads.max(-1).values)
    torch.testing.assert_close(torch.as_tensor(heads_fig.data[1].y), heads.min(-1).values)
    torch.testing.assert_close(torch.as_tensor(heads_fig.data[2].y), heads.mean(-1))
    assert list(section.table["dtype"]) == ["float64", "float32"]

    frame = pd.DataFrame(
        [
            {c: None for c in RESULT_COLUMNS}
            | {
                "task": "count_ones",
                "style": "answer",
                "length": n,
                "sample": 0,
                "truth": n,
                "parsed_answer": a,
                "correct": a == n,
                "abs_error": abs(a - n),
                "parse_status": "ok",
            }
            for n, a in ((4, 4), (8, 5))
        ]
    )
    tasks = tasks_section(TaskResults(frame))
    # Figs. 3 and 4 only: Fig. 2 (accuracy) is drawn for copying tasks, and these rows are counting
    assert [f.layout.title.text[:8] for f in tasks.figures] == ["Counting", "Counting"]
    assert [len(f.data) for f in tasks.figures] == [1, 4]
    assert list(tasks.figures[0].data[0].y) == [0.0, 3.0] and list(tasks.table["accuracy"]) == [1.0, 0.0]
    page = build_report([section, tasks])
    assert page.count('class="plotly-graph-div"') == 4


# --------------------------------------------------------------------------------------------------
# bidirectional overrides and control characters never reach the reader as themselves (issue 14)

from lens_squash.views.report import BIDI_DISPLAY, escape_text, neutralize_controls  # noqa: E402

_REQUIRED_BIDI = [chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))]


def _body(page: str) -> str:
    return page[page.index("</head>") :]  # plotly.js itself is not user text


def test_every_required_bidi_control_is_shown_as_its_code_point():
    assert set(_REQUIRED_BIDI) <= BIDI_DISPLAY
    for ch in _REQUIRED_BIDI:
        assert neutralize_controls(f"a{ch}b") == f"a⟨U+{ord(ch):04X}⟩b"
    assert neutralize_controls("tab\tnew\nline") == "tab\tnew\nline"  # layout characters stay
    assert escape_text("\x00<b>\u202e") == "⟨U+0000⟩&lt;b&gt;⟨U+202E⟩"


def test_a_trojan_source_prompt_displays_in_reading_order_everywhere(tmp_path):
    evil = "access = 'user\u202e \u2066# admin only\u2069 \u2066'  <script>alert(1)</script>"
    fig = go.Figure(go.Scatter(x=[0, 1], y=[1, 2], name=evil), layout={"title": {"text": evil}})
    sections = [
        prompt_section(evil, ["<s>", "user\u202e", " x"], predicted="\u2067y"),
        ReportSection(evil, figures=[fig], table=pd.DataFrame({evil: [evil]}), notes=[evil]),
        ReportSection("kv", table={evil: evil, "nested": {"p": evil}}),
    ]
    html_path, json_path = write_report(tmp_path, sections, {"prompt": evil}, title=evil, metadata={"prompt": evil})
    body = _body(html_path.read_text(encoding="utf-8"))
    raw_bidi = [hex(ord(c)) for c in body if c in BIDI_DISPLAY]
    scripts = "".join(re.findall(r"<script[^>]*>(.*?)</script>", body, flags=re.S))  # the figures' JSON
    escaped_bidi = re.findall(r"(?<!\\)(?:\\\\)*\\u(?:202[a-eA-E]|206[6-9])", scripts)
    assert raw_bidi == [] and escaped_bidi == [] and "⟨U+202E⟩" in scripts
    assert "user\\u202e" in body  # a token chip shows the control as its repr, as text
    assert body.count("⟨U+202E⟩") >= 8 and "<script>alert(1)" not in body
    # the JSON twin keeps the user's text exactly: neutralising is for display only
    assert json.loads(json_path.read_text(encoding="utf-8"))["prompt"] == evil


def test_a_literal_backslash_u_typed_by_the_user_is_left_alone_in_figures(tmp_path):
    typed = "C:\\u202e\\dir"  # a backslash, then the letters u202e: not a control character
    fig = go.Figure(go.Scatter(x=[0], y=[0], name=typed))
    page = build_report([ReportSection("f", figures=[fig])])
    assert "⟨U+202E⟩" not in _body(page)
    assert typed.replace("\\", "\\\\") in page  # still valid JSON for the same string


def test_every_standard_section_and_every_analysis_figure_has_a_caption(tmp_path):
    import re

    from lens_squash.edge.models import load_model
    from lens_squash.experiments.analysis import analyze
    from lens_squash.views.report import (
        SECTION_CAPTIONS,
        SECTION_ORDER,
        analysis_sections,
        write_report,
    )

    assert set(SECTION_ORDER) == set(SECTION_CAPTIONS)
    model = load_model("tiny-random", n_ctx=256)
    analysis = analyze(model, "Copy: 1 1 1 0", jacobian_mode="sketch", n_probes=4)
    sections = analysis_sections(analysis)
    for section in sections:
        for fig in section.figures:
            assert caption_of(fig), (section.title, fig.layout.title.text)
    html_path, _ = write_report(tmp_path, sections, {}, metadata=analysis.trace.provenance)
    page = html_path.read_text()
    n_figures = sum(len(s.figures) for s in sections)
    # one caption under each section title, one under each figure
    assert len(re.findall(r'<p class="caption">', page)) == len(sections) + n_figures


def test_skipped_default_variants_are_named_in_the_report(monkeypatch):
    from dataclasses import replace

    from lens_squash.algebra import variant_registry
    from lens_squash.core.support import UnsupportedModelError
    from lens_squash.edge.models import load_model
    from lens_squash.experiments.analysis import analyze
    from lens_squash.views.report import analysis_sections

    def refuse(model):
        raise UnsupportedModelError("toy blocks are not modelled")

    spec = variant_registry.get_variant("certified")
    monkeypatch.setitem(variant_registry._REGISTRY, "certified", replace(spec, supports=refuse))
    analysis = analyze(load_model("tiny-random", n_ctx=256), "Copy: 1 1 1 0", jacobian_mode=None)
    section = next(s for s in analysis_sections(analysis) if s.title == "bound vs gradient")
    assert "certified skipped: toy blocks are not modelled" in section.notes


# --------------------------------------------------------------------------------------------------
# size: typed arrays rounded to the digits shown
# --------------------------------------------------------------------------------------------------

_TYPED = {
    "f8": "<f8",
    "f4": "<f4",
    "i4": "<i4",
    "u4": "<u4",
    "i2": "<i2",
    "u2": "<u2",
    "i1": "i1",
    "u1": "u1",
    "u1c": "u1",
}


def _figures_in(page: str) -> list[dict]:
    """Every figure's traces as the page sends them to Plotly.newPlot (JSON, typed arrays still encoded)."""
    decoder = json.JSONDecoder()
    return [decoder.raw_decode(page, m.end())[0] for m in re.finditer(r'Plotly\.newPlot\(\s*"[^"]+",\s*', page)]


def _decoded(value):
    """A typed-array spec ``{"dtype", "bdata", "shape"}`` as numpy, the way plotly.js reads it."""
    import base64

    arr = np.frombuffer(base64.b64decode(value["bdata"]), dtype=_TYPED[value["dtype"]])
    shape = value.get("shape")
    return arr.reshape([int(s) for s in str(shape).split(",")]) if shape else arr


def _long_number_lists(node, found: list) -> list:
    """Decimal lists of at least SMALL_ARRAY numbers anywhere in ``node`` (what typed arrays replace)."""
    if isinstance(node, dict):
        for value in node.values():
            _long_number_lists(value, found)
    elif isinstance(node, list):
        numbers = [v for v in node if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if len(numbers) >= SMALL_ARRAY and len(numbers) == len(node):
            found.append(node)
        for value in node:
            _long_number_lists(value, found)
    return found


def test_the_report_sends_typed_arrays_rounded_to_the_digits_shown(tmp_path):
    from lens_squash.edge.models import load_model
    from lens_squash.experiments.analysis import analyze
    from lens_squash.views.report import analysis_sections

    model = load_model("tiny-random", n_ctx=256)
    analysis = analyze(model, "Copy: " + "1 " * 20 + "0", jacobian_mode="sketch", n_probes=4)
    sections = analysis_sections(analysis)
    figures = [fig for s in sections for fig in s.figures]
    page = build_report(sections)
    sent = _figures_in(page)
    assert len(sent) == len(figures)
    checked = 0
    for fig, traces in zip(figures, sent, strict=True):
        assert not _long_number_lists(traces, []), fig.layout.title.text
        for original, trace in zip(fig.data, traces, strict=True):
            for name in ("x", "y", "z", "customdata"):
                value = trace.get(name)
                if not (isinstance(value, dict) and "bdata" in value):
                    continue
                want = np.asarray(original[name], dtype=np.float64)
                got = _decoded(value).astype(np.float64)
                assert got.shape == want.shape, (fig.layout.title.text, name)
                # four significant digits, as the hovers show them: |error| ≤ half a unit in the 4th digit
                np.testing.assert_allclose(got, want, rtol=5.01e-4, atol=0, equal_nan=True)
                if value["dtype"] in ("f4", "f8"):  # and nothing finer was sent: each value is its 4-digit decimal
                    sent_values = _decoded(value).ravel()
                    finite = sent_values[np.isfinite(sent_values)]
                    decimal = np.array([float(f"{v:.4g}") for v in finite.tolist()], dtype=finite.dtype)
                    np.testing.assert_array_equal(finite, decimal)
                checked += 1
    assert checked >= len(figures)  # every figure sent at least one typed array
    # float64 only where float32 cannot hold a value (beyond its normal range): everything else is 4 bytes
    tiny, huge = np.finfo(np.float32).tiny, np.finfo(np.float32).max
    for traces in sent:
        for trace in traces:
            for value in trace.values():
                if isinstance(value, dict) and value.get("dtype") == "f8":
                    magnitudes = np.abs(_decoded(value))
                    magnitudes = magnitudes[np.isfinite(magnitudes) & (magnitudes > 0)]
                    assert ((magnitudes < tiny) | (magnitudes > huge)).any(), trace.get("name")
    beyond = len(page.encode()) - len(plotly.offline.get_plotlyjs())
    full = sum(len(fig.to_json()) for fig in figures)
    print(
        f"tiny-random report ({analysis.trace.n_tokens} tokens): {beyond / 1e3:.1f} kB beyond plotly.js; "
        f"the figures at full precision {full / 1e3:.1f} kB"
    )
    assert beyond <= 1_000_000  # issue 17's budget for the demo report holds for this smaller one


def test_a_table_keeps_its_row_labels_and_writes_missing_values_as_a_dash():
    """A summary indexed by its rows' names (PECollapseResult's encodings, CollapseResult's dtypes) shows
    them as its first column, and nullable dtypes' missing values (pandas' <NA>) are '-'."""
    frame = pd.DataFrame(
        {
            "mean@4": [0.5, 0.25],
            "threshold": pd.array([8, None], dtype="Int64"),
            "trivial": pd.array([True, None], dtype="boolean"),
            "noise": pd.array([None, 1e-7], dtype="Float64"),
        },
        index=pd.Index(["rotary", "none"], name="encoding"),
    )
    page = build_report([ReportSection("synthetic positional encodings", table=frame)], title="t")
    table = page[page.index('<table class="dataframe data">') :]
    table = table[: table.index("</table>")]
    headers = re.findall(r"<th>(.*?)</th>", table)
    assert headers == ["encoding", "mean@4", "threshold", "trivial", "noise"]
    cells = [re.findall(r"<td>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", table, re.S)]
    assert cells == [["rotary", "0.5", "8", "True", "-"], ["none", "0.25", "-", "-", "1e-07"]]
    assert "NA" not in table
    wide = build_report([ReportSection("t", table=pd.DataFrame({"same_nontrivial_prediction": [1]}))], title="t")
    assert "<th>same_<wbr>nontrivial_<wbr>prediction</th>" in wide  # a long header may wrap at its underscores
    plain = build_report([ReportSection("t", table=pd.DataFrame({"a": [1, 2]}))], title="t")
    assert "<th>index</th>" not in plain  # an unnamed (default) index stays out
