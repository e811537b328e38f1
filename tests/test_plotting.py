"""Figure builders: each figure's data equals the tensors it shows, and token text stays escaped."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

from lens_squash import plotting
from lens_squash.compare import compare_variants
from lens_squash.plotting import token_label
from lens_squash.sinks import sink_report
from lens_squash.softmax_theory import tv_decay_experiment
from lens_squash.tasks import RESULT_COLUMNS, TaskResults

F64 = torch.float64
HOSTILE = "</script><img src=x onerror=alert(1)>"
ESCAPED = "&lt;/script&gt;&lt;img␣src=x␣onerror=alert(1)&gt;"


def causal_patterns(layers=2, heads=3, n=6) -> torch.Tensor:
    scores = torch.randn(layers, heads, n, n, dtype=F64)
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    return torch.softmax(scores.masked_fill(~mask, -math.inf), -1)


def random_flows(layers=2, heads=3, n=6) -> tuple[torch.Tensor, torch.Tensor]:
    return causal_patterns(layers, heads, n) * torch.rand(layers, heads, n, 1, dtype=F64), torch.rand(layers, n, dtype=F64)


def tokens(n: int) -> list[str]:
    out = [f" t{i}" for i in range(n)]
    out[1] = HOSTILE
    return out


def assert_data(actual, expected, atol=0.0):
    np.testing.assert_allclose(np.asarray(actual, dtype=float), np.asarray(expected, dtype=float), atol=atol, rtol=0)


def strings_in(fig: go.Figure) -> list[str]:
    """Every string a figure holds (data and layout), to look for unescaped user text."""
    found = []

    def walk(value):
        if isinstance(value, str):
            found.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)
        elif isinstance(value, np.ndarray) and value.dtype == object:
            for v in value.ravel():
                walk(v)

    walk(fig.to_plotly_json())
    return found


def assert_no_raw_html(fig: go.Figure):
    raw = [s for s in strings_in(fig) if "<script" in s or "<img" in s]
    assert raw == []
    assert "<" not in fig.to_json()  # plotly's encoder writes '<' as \u003c: no tag can open in a <script>


# --- tokens ----------------------------------------------------------------------------------------


def test_token_label_is_escaped_and_shows_whitespace():
    assert token_label("<script>") == "&lt;script&gt;"
    assert token_label(HOSTILE) == ESCAPED
    assert token_label(" a\n") == "␣a\\n"
    assert token_label("&") == "&amp;"
    assert token_label("x" * 100, max_len=10) == "x" * 9 + "…"


# --- bound versus Jacobian -------------------------------------------------------------------------


def test_bound_vs_jacobian_shows_each_profile_raw_and_normalised():
    n = 7
    truth, rollout, paper = torch.rand(n) + 0.1, torch.rand(n, dtype=F64) + 0.1, torch.rand(n) + 0.1
    bound_object = SimpleNamespace(bound=paper)  # a PathBound-like object
    fig = plotting.bound_vs_jacobian(tokens(n), truth, {"rollout": rollout, "paper": bound_object})
    assert len(fig.data) == 6  # three curves, two panels
    for raw, shape, values in zip(fig.data[:6:2], fig.data[1:6:2], (truth, rollout, paper), strict=True):
        assert_data(raw.x, range(n))
        assert_data(raw.y, values, atol=1e-7)
        assert_data(shape.y, values / values.sum(), atol=1e-7)
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis2.type == "log"
    assert fig.data[0].line.color == "black"
    assert fig.data[0].customdata[1] == ESCAPED
    assert ESCAPED in fig.layout.xaxis2.ticktext
    assert_no_raw_html(fig)


def test_bound_vs_jacobian_without_truth_single_panel_and_length_check():
    fig = plotting.bound_vs_jacobian(None, None, {"a": [1.0, 2.0, 3.0]}, log=False, normalised=False)
    assert len(fig.data) == 1 and fig.layout.yaxis.type == "linear"
    assert list(fig.data[0].customdata) == ["0", "1", "2"]
    with pytest.raises(ValueError, match="positions"):
        plotting.bound_vs_jacobian(None, torch.rand(3), {"a": torch.rand(4)})
    with pytest.raises(ValueError, match="nothing to plot"):
        plotting.bound_vs_jacobian(None, None, {})


def test_comparison_figure_reads_the_compare_variants_table():
    n = 8
    truth, a, b = torch.rand(n, dtype=F64) + 0.1, torch.rand(n, dtype=F64), torch.rand(n, dtype=F64)
    table, _ = compare_variants({"rollout": a, "value": b}, truth, str_tokens=tuple(tokens(n)))
    fig = plotting.comparison_figure(table, normalised=False)
    assert [t.name for t in fig.data] == ["Jacobian (spectral)", "rollout", "value"]
    for trace, values in zip(fig.data, (truth, a, b), strict=True):
        assert_data(trace.y, values)


# --- attention heatmap -----------------------------------------------------------------------------


def test_attention_heatmap_options_match_the_patterns():
    patterns = causal_patterns(layers=2, heads=3, n=5)
    fig = plotting.attention_heatmap(patterns, tokens(5))
    assert len(fig.data) == 1 + 2 + 6
    assert_data(fig.data[0].z, patterns.mean((0, 1)), atol=1e-6)
    for l in range(2):
        assert_data(fig.data[1 + l].z, patterns[l].mean(0), atol=1e-6)
        for h in range(3):
            trace = fig.data[3 + 3 * l + h]
            assert trace.name == f"layer {l}, head {h}"
            assert_data(trace.z, patterns[l, h], atol=1e-6)  # float32 in the figure
    assert [t.visible for t in fig.data] == [True] + [False] * 8
    buttons = fig.layout.updatemenus[0].buttons
    assert len(buttons) == len(fig.data)
    for i, button in enumerate(buttons):
        assert button.args[0]["visible"] == [j == i for j in range(len(fig.data))]
    assert fig.data[0].x[1] == f"1: {ESCAPED}" and fig.layout.yaxis.autorange == "reversed"
    assert_no_raw_html(fig)


def test_attention_heatmap_single_layer_head_and_size_budget():
    patterns = causal_patterns(layers=3, heads=2, n=4)
    one = plotting.attention_heatmap(patterns, layer=2, head=1)
    assert len(one.data) == 1 and not one.layout.updatemenus
    assert_data(one.data[0].z, patterns[2, 1], atol=1e-6)
    layer = plotting.attention_heatmap(patterns, layer=1)
    assert [t.name for t in layer.data] == ["layer 1, mean of heads", "layer 1, head 0", "layer 1, head 1"]
    head = plotting.attention_heatmap(patterns, head=0)
    assert_data(np.stack([t.z for t in head.data]), patterns[:, 0], atol=1e-6)
    small = plotting.attention_heatmap(patterns, max_cells=4 * 16)
    assert len(small.data) == 1 + 3 and "left out" in small.layout.title.text


def test_attention_heatmap_long_prompt_thins_labels_but_keeps_positions_apart():
    n = 130
    patterns = causal_patterns(layers=1, heads=1, n=n)
    fig = plotting.attention_heatmap(patterns, ["1"] * n)  # every token the same
    assert len(set(fig.data[0].x)) == n  # categories stay unique: "i: token"
    ticks = fig.layout.xaxis.tickvals
    assert len(ticks) <= plotting.MAX_TICKS and ticks[1] == "3: 1"


# --- attention paths -------------------------------------------------------------------------------


def edges_of(fig: go.Figure) -> list[dict]:
    return [t.meta for t in fig.data if isinstance(t.meta, dict)]


def brute_force_top(head: torch.Tensor, resid: torch.Tensor, k: int) -> list[tuple]:
    edges = [(float(head[l, h, j, i]), l, h, i, j) for l, h, j, i in np.ndindex(*head.shape)]
    edges += [(float(resid[l, j]), l, None, j, j) for l, j in np.ndindex(*resid.shape)]
    return sorted(edges, key=lambda e: -e[0])[:k]


def test_attention_paths_draws_the_heaviest_edges_with_width_by_flow():
    head, resid = random_flows()
    fig = plotting.attention_paths((head, resid), tokens(6), top_k=15)
    edges = edges_of(fig)
    assert len(edges) == 15
    got = sorted(((e["flow"], e["layer"], e["head"], e["from"], e["to"]) for e in edges), key=lambda e: -e[0])
    assert got == brute_force_top(head, resid, 15)
    w_max = max(e["flow"] for e in edges)
    for trace in fig.data:
        edge = trace.meta
        if not isinstance(edge, dict):
            continue
        assert (trace.x[0], trace.y[0], trace.x[-1], trace.y[-1]) == (edge["from"], edge["layer"], edge["to"], edge["layer"] + 1)
        assert trace.line.width == pytest.approx(0.75 + 7.25 * edge["flow"] / w_max)
        if edge["head"] is None:
            assert trace.x[0] == trace.x[-1] and trace.line.color.startswith("rgba(120")
    colours = {(t.meta["head"], t.line.color) for t in fig.data if isinstance(t.meta, dict)}
    assert len({head for head, _ in colours}) == len(colours)  # one colour per head
    hostile_target = plotting.attention_paths({1: (head, resid)}, tokens(6), title="a & b")
    assert hostile_target.layout.title.text == f"a &amp; b — target 1: {ESCAPED}"  # escaped once, not twice
    nodes = fig.data[0]
    assert len(nodes.x) == 6 * 3 and max(nodes.y) == 2  # levels 0..L
    assert any(ESCAPED in text for text in nodes.text)
    assert_no_raw_html(fig)


def test_attention_paths_menu_switches_between_targets():
    flows = {5: random_flows(), 3: SimpleNamespace(head_flows=random_flows()[0], residual_flows=torch.rand(2, 6))}
    fig = plotting.attention_paths(flows, top_k=4)
    buttons = fig.layout.updatemenus[0].buttons
    assert [b.label for b in buttons] == ["target 5: 5", "target 3: 3"]
    first, second = (b.args[0]["visible"] for b in buttons)
    assert first[0] and second[0]  # the position grid is always shown
    assert not any(a and b for a, b in zip(first[1:], second[1:], strict=True))
    assert [t.visible is not False for t in fig.data] == first
    assert sum(first) - 1 == 4 + 1 and sum(second) - 1 == 4 + 1  # edges + target star
    star = [t for t in fig.data if t.name == "target"]
    assert [(t.x[0], t.y[0]) for t in star] == [(5, 2), (3, 2)]


def test_attention_paths_accepts_path_bound_like_objects_and_infers_the_target():
    head, resid = random_flows(n=5)
    head[-1, :, :4] = 0  # only position 4 receives flow at the top layer
    resid[-1, :4] = 0
    bound = SimpleNamespace(flows=lambda: SimpleNamespace(head_flows=head, residual_flows=resid), str_tokens=tokens(5))
    fig = plotting.attention_paths(bound, top_k=3)
    assert "target 4" in fig.layout.title.text
    with pytest.raises(TypeError):
        plotting.attention_paths(torch.rand(3))
    with pytest.raises(ValueError, match="residual_flows"):
        plotting.attention_paths((head, resid[:, :3]))


def test_attention_paths_on_a_real_rollout_bound(tiny):
    from lens_squash.trace import trace
    from lens_squash.variants import path_bound

    traced = trace(tiny, torch.arange(1, 8))
    bound = path_bound(traced, "rollout", target=5)
    flows = bound.flows()
    fig = plotting.attention_paths(bound, top_k=10)
    assert f"target 5: {token_label(traced.str_tokens[5])}" in fig.layout.title.text
    everything = torch.cat([flows.head_flows.flatten(), flows.residual_flows.flatten()]).double()
    assert_data(sorted((e["flow"] for e in edges_of(fig)), reverse=True), everything.topk(10).values, atol=1e-12)
    for edge in edges_of(fig):  # each drawn edge is the flow tensor's entry at its coordinates
        expected = (flows.residual_flows[edge["layer"], edge["to"]] if edge["head"] is None
                    else flows.head_flows[edge["layer"], edge["head"], edge["to"], edge["from"]])
        assert edge["flow"] == pytest.approx(float(expected), rel=1e-12)
        assert edge["to"] <= 5  # no flow reaches past the target
    for drawn in fig.data:  # a head's self-edge bows sideways; residual and cross edges stay straight
        edge = drawn.meta
        if isinstance(edge, dict):
            bowed = edge["head"] is not None and edge["to"] == edge["from"]
            assert (drawn.x[1] != (edge["from"] + edge["to"]) / 2) == bowed
    from_two = plotting.attention_paths(bound.flows(source=2), traced.str_tokens, top_k=200)
    assert f"← source 2: {token_label(traced.str_tokens[2])}" in from_two.layout.title.text
    drawn = edges_of(from_two)
    assert drawn and all(2 <= e["from"] <= e["to"] <= 5 for e in drawn)  # causal paths from 2 to 5 only
    with pytest.raises(ValueError, match="target 5"):
        plotting.attention_paths({6: bound})


# --- spectral, collapse, bands, PE, TV, sinks -----------------------------------------------------


def test_spectral_figure_panels_hold_the_curves():
    spectrum, second, tau = torch.rand(3, 5), torch.rand(3), torch.rand(3)
    mass, dist = torch.rand(3), torch.rand(3)
    fig = plotting.spectral_figure(spectrum=spectrum, second_eigenvalue=second, dobrushin=tau,
                                   first_token_mass=mass, rank_one_distance=dist)
    by_name = {t.name: t for t in fig.data}
    assert_data(by_name["eigenvalues Λ̃_ii"].y, spectrum.flatten(), atol=1e-7)
    assert_data(by_name["eigenvalues Λ̃_ii"].x, np.repeat(np.arange(3), 5))
    assert_data(by_name["second eigenvalue"].y, second, atol=1e-7)
    assert_data(by_name["τ per layer"].y, tau, atol=1e-7)
    assert_data(by_name["Π τ (bound)"].y, torch.cumprod(tau, 0), atol=1e-6)
    assert_data(by_name["[Π Λ̃]ₙ,₀"].x, [1, 2, 3])
    assert_data(by_name["distance to rank one"].y, dist, atol=1e-7)
    assert fig.layout.yaxis4.type == "log"
    assert len(plotting.spectral_figure().data) == 0


def test_spectral_report_figure_shows_a_real_report(tiny):
    from lens_squash.attention import aggregate_heads
    from lens_squash.paths import rollout_matrices
    from lens_squash.spectral import analyze_stack
    from lens_squash.trace import trace

    traced = trace(tiny, torch.arange(1, 9))
    report = analyze_stack(rollout_matrices(aggregate_heads(traced.patterns.double())))
    fig = plotting.spectral_report_figure(report)
    by_name = {t.name: t for t in fig.data}
    assert_data(by_name["eigenvalues Λ̃_ii"].y, report.spectrum.flatten())
    assert_data(by_name["second eigenvalue"].y, report.second_eigenvalue)
    assert_data(by_name["τ per layer"].y, report.dobrushin)
    assert_data(by_name["Π τ (bound)"].y, report.cumulative_dobrushin, atol=1e-15)  # the figure's own cumprod
    assert_data(by_name["[Π Λ̃]ₙ,₀"].y, report.first_token_mass)
    assert_data(by_name["distance to rank one"].y, report.rank_one_distance)
    assert (np.asarray(by_name["distance to rank one"].y) <= np.asarray(by_name["Π τ (bound)"].y) + 1e-12).all()


def test_collapse_figure_draws_zeros_at_a_floor_below_everything():
    lengths = [2, 4, 8, 16]
    distances = {"float32": [1e-3, 1e-6, 0.0, 0.0], "bfloat16": torch.tensor([1e-2, 0.0, 0.0, 0.0])}
    resolutions = {"float32": 6e-8, "bfloat16": 3.9e-3}
    fig = plotting.collapse_figure(lengths, distances, resolutions)
    line = fig.data[0]
    assert_data(line.y[:2], [1e-3, 1e-6])
    assert np.isnan(line.y[2:]).all()
    zeros = fig.data[1]
    assert_data(zeros.x, [8, 16])
    assert zeros.marker.symbol == "x-open"
    floor = zeros.y[0]
    assert floor < 6e-8 and floor > 0 and "exactly 0" in zeros.hovertemplate
    resolution = fig.data[2]
    assert resolution.line.dash == "dash" and list(resolution.y) == [6e-8, 6e-8] and list(resolution.x) == [2, 16]
    assert resolution.line.color == line.line.color
    assert fig.layout.yaxis.type == "log"
    assert_data(fig.data[4].x, [4, 8, 16])  # bfloat16 zeros
    fixed = plotting.collapse_figure(lengths, {"a": [0.0] * 4}, floor=1e-20)
    assert list(fixed.data[1].y) == [1e-20] * 4
    with pytest.raises(ValueError, match="lengths"):
        plotting.collapse_figure([1, 2], {"a": [1.0]})


def test_head_band_and_pe_figures_hold_their_curves():
    lengths, mean, lo, hi = [1, 2, 4], [1.0, 0.5, 0.2], [0.5, 0.2, 0.1], [2.0, 1.0, 0.5]
    band = plotting.head_band_figure(lengths, mean, lo, hi)
    assert_data(band.data[0].y, hi)
    assert_data(band.data[1].y, lo)
    assert_data(band.data[2].y, mean)
    assert band.data[1].fill == "tonexty"
    pe = plotting.pe_figure(lengths, {"rope": (torch.tensor(mean, dtype=F64), torch.tensor([0.1, 0.1, 0.1], dtype=F64))}, log=False)
    assert_data(pe.data[0].y, np.add(mean, 0.1))
    assert_data(pe.data[1].y, np.subtract(mean, 0.1))
    assert_data(pe.data[2].y, mean)
    assert pe.data[2].name == "rope"
    clipped = plotting.pe_figure(lengths, {"x": (mean, [2.0, 2.0, 2.0])})  # log axis: lower band ≤ 0 clipped
    assert (np.asarray(clipped.data[1].y) > 0).all()


def test_tv_figure_matches_the_experiment():
    result = tv_decay_experiment(n_max=40, perturbed=5, seeds=2, lengths=[5, 10, 20, 40])
    fig = plotting.tv_decay_figure(result)
    assert [t.name for t in fig.data] == ["seed 0", "bound, seed 0", "seed 1", "bound, seed 1"]
    assert_data(fig.data[0].y, result.tv[0])
    assert_data(fig.data[3].y, result.bound[1])
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"
    shared = plotting.tv_figure([1, 2], torch.rand(3, 2), torch.tensor([1.0, 0.5]))
    assert [t.name for t in shared.data].count("bound") == 1


def test_sink_figure_shades_the_three_phases():
    curves = {"first token mass": torch.rand(6), "norm ratio": torch.rand(7) * 100}
    fig = plotting.sink_figure(curves, (2, 4), log=("norm ratio",))
    assert_data(fig.data[0].y, curves["first token mass"], atol=1e-7)
    assert_data(fig.data[1].y, curves["norm ratio"], atol=1e-5)
    assert fig.layout.yaxis2.type == "log"
    spans = sorted({(s.x0, s.x1) for s in fig.layout.shapes})
    assert spans == [(-0.5, 1.5), (1.5, 3.5), (3.5, 6.5)]
    assert [a.text for a in fig.layout.annotations if a.text.startswith("<i>")] == ["<i>Mix</i>", "<i>Compress</i>", "<i>Refine</i>"]
    assert not plotting.sink_figure(curves).layout.shapes


def test_sink_report_figure_reads_the_report():
    patterns = causal_patterns(layers=4, heads=2, n=6)
    report = sink_report(patterns, torch.rand(5, 6) + 1, representations=torch.randn(5, 6, 8, dtype=F64))
    fig = plotting.sink_report_figure(report)
    names = [t.name for t in fig.data]
    assert names == ["first_token_mass", "sink_rate", "mixing", "norm_ratio", "entropy", "anisotropy"]
    assert_data(fig.data[0].y, report.first_token_mass)
    assert_data(fig.data[5].y, report.anisotropy)
    assert fig.layout.yaxis4.type == "log"


# --- tasks -----------------------------------------------------------------------------------------


def task_frame() -> pd.DataFrame:
    rows = []
    answers = {("count", 5): [5, 4, None], ("count", 10): [10, 8, 8], ("copy", 5): [1, 1, 0], ("copy", 10): [1, 0, 0]}
    for (task, length), parsed in answers.items():
        truth = length if task == "count" else 1
        for sample, answer in enumerate(parsed):
            rows.append({
                "task": task, "mode": "zero-shot", "length": length, "sample": sample, "seed": 0, "prompt": HOSTILE,
                "raw_output": HOSTILE, "parsed_answer": answer, "parse_status": "ok" if answer is not None else "unparsable",
                "truth": truth, "correct": answer == truth,
                "abs_error": None if answer is None else abs(answer - truth), "n_prompt_tokens": 9, "n_new_tokens": 3,
            })
    frame = pd.DataFrame(rows, columns=list(RESULT_COLUMNS))
    return frame.astype({"parsed_answer": "Int64", "abs_error": "Int64"})


def test_accuracy_and_error_figures_average_per_task_and_length():
    frame = task_frame()
    accuracy = plotting.accuracy_figure(TaskResults(frame))
    by_name = {t.name: t for t in accuracy.data}
    assert_data(by_name["count"].x, [5, 10])
    assert_data(by_name["count"].y, [1 / 3, 1 / 3])
    assert_data(by_name["copy"].y, [2 / 3, 1 / 3])
    error = {t.name: t for t in plotting.abs_error_figure(frame).data}
    assert_data(error["count"].y, [0.5, 4 / 3])  # the unparsable answer is left out
    assert_data(error["count"].customdata, [2, 3])
    two_modes = pd.concat([frame, frame.assign(mode="few-shot", correct=True)])
    assert {t.name for t in plotting.accuracy_figure(two_modes).data} == {
        "count (zero-shot)", "count (few-shot)", "copy (zero-shot)", "copy (few-shot)"}


def test_answer_histogram_counts_parsed_answers():
    fig = plotting.answer_histogram(task_frame(), task="count")
    bars = [t for t in fig.data if isinstance(t, go.Bar)]
    assert [b.name for b in bars] == ["n = 5 (1 unparsable)", "n = 10"]
    assert dict(zip(bars[1].x, bars[1].y, strict=True)) == {8: 2, 10: 1}
    truths = [t for t in fig.data if isinstance(t, go.Scatter)]
    assert [t.x[0] for t in truths] == [5, 10]
    assert len(plotting.answer_histogram(task_frame()).layout.annotations) == 2  # one panel per task
    with pytest.raises(ValueError, match="no rows"):
        plotting.answer_histogram(task_frame(), task="nope")


# --- every builder -------------------------------------------------------------------------------


def test_every_figure_serialises_with_user_text_escaped():
    n = 6
    head, resid = random_flows(n=n)
    figures = [
        plotting.bound_vs_jacobian(tokens(n), torch.rand(n), {HOSTILE: torch.rand(n)}),
        plotting.attention_heatmap(causal_patterns(n=n), tokens(n)),
        plotting.attention_paths({n - 1: (head, resid)}, tokens(n)),
        plotting.spectral_figure(dobrushin=torch.rand(2), title=HOSTILE),
        plotting.collapse_figure([1, 2], {HOSTILE: [1.0, 0.0]}, {HOSTILE: 0.1}),
        plotting.head_band_figure([1, 2], [1, 1], [0.5, 0.5], [2, 2], name=HOSTILE),
        plotting.pe_figure([1, 2], {HOSTILE: ([1, 1], [0, 0])}),
        plotting.tv_figure([1, 2], torch.rand(2, 2)),
        plotting.sink_figure({HOSTILE: torch.rand(3)}, (1, 2)),
        plotting.accuracy_figure(task_frame().assign(task=HOSTILE)),
        plotting.abs_error_figure(task_frame()),
        plotting.answer_histogram(task_frame()),
    ]
    for fig in figures:
        assert isinstance(fig, go.Figure)
        assert_no_raw_html(fig)
        html = fig.to_html(full_html=False, include_plotlyjs=False)
        assert html.lower().count("</script") == 1
