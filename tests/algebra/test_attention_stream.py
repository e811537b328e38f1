"""AttentionStream (the streamed per-layer statistics of long prompts) against the whole-stack
functions, on random causal patterns and the edge cases its row-chunked fast path must not change."""

from __future__ import annotations

import math

import pytest
import torch

from lens_squash.algebra import attention_stream
from lens_squash.algebra.attention import attention_defects
from lens_squash.algebra.attention_stream import AttentionStream
from lens_squash.algebra.paths import rollout_matrices
from lens_squash.algebra.sinks import first_token_attention, mixing_score, rollout_dobrushin, rollout_mass
from lens_squash.algebra.spectral import analyze_stack, spectral_report

ATOL = 1e-4


def _patterns(n: int, *, layers: int = 3, heads: int = 4, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scores = 3 * torch.randn(layers, heads, n, n, generator=g, dtype=torch.float64)
    scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
    if n > 3:
        scores[..., 3:, 1] = -math.inf  # exact zeros among the causal keys
    return scores.softmax(-1).to(dtype)


def _summary(patterns: torch.Tensor, atol: float | None):
    stream = AttentionStream(patterns.shape[-1], spectral_atol=atol)
    for layer in patterns:
        stream.add(layer)
    return stream.finish()


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


def _assert_whole_stack(summary, patterns: torch.Tensor, atol: float | None) -> None:
    assert summary.defects == attention_defects(patterns)
    _close(summary.rollout_mass, rollout_mass(patterns))
    _close(summary.sink_dobrushin, rollout_dobrushin(patterns))
    if patterns.shape[-1] >= 2:
        _close(summary.mixing, mixing_score(patterns))
        _close(summary.first_token_attention, first_token_attention(patterns))
    if atol is None:
        assert summary.spectral is None
        return
    whole = analyze_stack(rollout_matrices(patterns.mean(1).double()), atol=atol)
    streamed = spectral_report(summary.spectral)
    for name in ("spectrum", "dobrushin", "cumulative_dobrushin", "rollout_mass", "rank_one_distance"):
        _close(getattr(streamed, name), getattr(whole, name))
    assert torch.equal(streamed.two_nonzeros, whole.two_nonzeros)
    assert torch.equal(streamed.multiplicity, whole.multiplicity)


@pytest.mark.parametrize("n", [1, 2, 3, 17, 130])
@pytest.mark.parametrize("atol", [ATOL, None])
def test_the_summary_equals_the_whole_stack_functions(n, atol):
    patterns = _patterns(n, seed=n)
    _assert_whole_stack(_summary(patterns, atol), patterns, atol)


def test_small_row_chunks_change_no_number(monkeypatch):
    patterns = _patterns(40, dtype=torch.float64)
    monkeypatch.setattr(attention_stream, "ROW_CHUNK", 50)  # a few rows per chunk, one at the end
    _assert_whole_stack(_summary(patterns, ATOL), patterns, ATOL)


def test_point_masses_and_float64_layers():
    patterns = _patterns(20, dtype=torch.float64)
    patterns[1] = 0.0
    patterns[1, ..., 0] = 1.0  # every query on token 0: rows with one nonzero, τ = ½
    _assert_whole_stack(_summary(patterns, ATOL), patterns, ATOL)


@pytest.mark.parametrize("edit", ["above_diagonal", "negative"])
def test_layers_off_the_causal_path_take_the_whole_stack_route(edit):
    patterns = _patterns(30)
    if edit == "above_diagonal":
        patterns[1, :, 5, 7] = 1e-6  # within the spectral tolerance
    else:
        patterns[1, 0, 5, 1] = -1e-6  # an exact zero made slightly negative
    _assert_whole_stack(_summary(patterns, ATOL), patterns, ATOL)


def test_sub_stochastic_rows_keep_the_sink_curves_and_the_spectral_refusal():
    patterns = _patterns(30)
    patterns[..., 10, :] *= 0.9  # learned sinks take a share of the row
    _assert_whole_stack(_summary(patterns, None), patterns, None)
    summary = _summary(patterns, ATOL)
    assert summary.spectral is None
    with pytest.raises(ValueError) as whole:
        analyze_stack(rollout_matrices(patterns.mean(1).double()), atol=ATOL)
    assert summary.spectral_error == str(whole.value)
    # far from stochastic: τ leaves the closed form for the exact pairwise route, as rollout_dobrushin
    _close(summary.sink_dobrushin, rollout_dobrushin(patterns))


def test_a_nan_layer_poisons_the_defects_and_is_left_out_of_the_curves():
    patterns = _patterns(25)
    patterns[1, 2, 5, 0] = math.nan
    summary = _summary(patterns, ATOL)
    assert all(math.isnan(v) for v in summary.defects.values())
    kept = patterns[[0, 2]]
    _close(summary.mixing, mixing_score(kept))
    _close(summary.rollout_mass, rollout_mass(kept))
    _close(summary.sink_dobrushin, rollout_dobrushin(kept))


def test_a_summary_of_no_patterns_is_refused_in_one_line():
    from lens_squash.algebra.attention_stream import summarize_attention

    with pytest.raises(ValueError, match="no attention patterns"):
        summarize_attention(None, spectral_atol=None)
    with pytest.raises(ValueError, match=r"\[layer, head, query_pos, key_pos\]"):
        summarize_attention(torch.ones(2, 3, 3), spectral_atol=None)


@pytest.mark.parametrize("n", [2, 17, 130])
def test_a_stored_stack_replays_into_the_same_summary(n):
    """summarize_attention (the whole stack, its defects known from one scan) equals the layer-by-layer
    stream, number for number: the stored path and the streamed path are one accumulator."""
    from lens_squash.algebra.attention_stream import summarize_attention

    patterns = _patterns(n, seed=4)
    streamed = _summary(patterns, ATOL)
    replayed = summarize_attention(patterns, spectral_atol=ATOL, defects=attention_defects(patterns))
    assert replayed.defects == streamed.defects and replayed.n_tokens == streamed.n_tokens == n
    for name in ("first_token_attention", "mixing", "rollout_mass", "sink_dobrushin"):
        assert torch.equal(getattr(replayed, name), getattr(streamed, name)), name
    assert torch.equal(replayed.spectral.spectrum, streamed.spectral.spectrum)
