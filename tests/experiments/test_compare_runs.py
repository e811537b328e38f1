"""compare(a, b): two prompts, or one prompt in two dtypes, aligned from the target, with a figure."""

from __future__ import annotations

import numpy as np
import pytest

from lens_squash.edge.models import load_model
from lens_squash.experiments.analysis import analyze
from lens_squash.experiments.compare_runs import compare
from lens_squash.views.style import caption_of


@pytest.fixture(scope="module")
def pair():
    model = load_model("tiny-random", n_ctx=256)
    settings = {"jacobian_mode": "sketch", "n_probes": 4, "variants": ["rollout", "value_rownorm"]}
    return analyze(model, "Copy: 1 1 1 0", **settings), analyze(model, "Count the ones: 1 1 1 1 1", **settings)


def test_two_prompts_keep_each_sides_numbers_and_align_from_the_target(pair):
    a, b = pair
    result = compare(a, b)
    assert result.labels == ("a", "b") and not result.same_tokens
    assert result.aligned == min(a.trace.n_tokens, b.trace.n_tokens)
    summary = result.summary()
    for _, row in summary.iterrows():
        name = row["variant"]
        assert row["spearman a"] == a.comparisons[name].spearman and row["spearman b"] == b.comparisons[name].spearman
        assert row["change"] == pytest.approx(row["spearman b"] - row["spearman a"])
    np.testing.assert_array_equal(result.sinks_b.numpy(), b.sinks.mean_first_token_attention.double().numpy())
    fig = result.plot()
    assert caption_of(fig) and "aligned from the last token" in caption_of(fig)
    # every side's curves end at x = 0 (the target), whatever its length
    ends = {t.name: t.x[-1] for t in fig.data if t.yaxis in ("y", "y2")}
    assert ends and set(ends.values()) == {0}


def test_one_prompt_against_itself_is_the_same_tokens_and_no_change(pair):
    a, _ = pair
    result = compare(a, a, labels=("float32", "again"))
    assert result.same_tokens and (result.summary()["change"] == 0).all()


def test_bad_pairs_are_refused(pair):
    a, b = pair
    with pytest.raises(ValueError, match="two different names"):
        compare(a, b, labels=("x", "x"))
    only = analyze(load_model("tiny-random", n_ctx=256), "Copy: 1 0", jacobian_mode=None, variants=["paper"])
    with pytest.raises(ValueError, match="share no variant"):
        compare(a, only)
