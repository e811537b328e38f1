"""Tests for lens_squash.experiments.task_theory: answer positions, copying sensitivity, counting collapse."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from lens_squash.edge.backends import is_bridge
from lens_squash.edge.models import format_prompt, tiny_model
from lens_squash.experiments.task_prompts import make_instance
from lens_squash.experiments.task_theory import (
    CopySensitivity,
    CountCollapse,
    answer_position,
    copy_sensitivity,
    count_collapse,
    sequence_positions,
)


def _rtol(model, hooked: float) -> float:
    """``hooked`` on a HookedTransformer; on TransformerLens 4's bridge over a float64 Llama twin, whose
    transformers RMSNorm and softmax run in float32 inside, float32 resolution (1e-6)."""
    return 1e-6 if is_bridge(model) else hooked


@pytest.fixture(scope="module")
def chat_tiny():
    """Rotary, RMSNorm, grouped-query attention like SmolLM2, with its tokenizer and chat template."""
    return tiny_model(tokenizer="smollm2", n_ctx=160, d_model=16, n_heads=2, n_layers=2, positional="rotary",
                      norm="RMS", n_key_value_heads=1, dtype=torch.float64, seed=2)  # fmt: skip


@pytest.mark.parametrize("chat", [None, False])
@pytest.mark.parametrize(
    "task", ["copy_first", "copy_last", "copy_last_hint", "copy_alternating", "copy_type1", "copy_type2",
             "sum_ones", "count_bernoulli", "count_car"],
)  # fmt: skip
def test_sequence_positions_point_at_each_element(chat_tiny, task, chat):
    for length in (1, 4, 11):
        instance = make_instance(task, length, sample=1)
        tokens, positions = sequence_positions(chat_tiny, instance, chat=chat)
        assert torch.equal(tokens, format_prompt(chat_tiny, instance.prompt, chat=chat))
        assert len(positions) == length and positions == sorted(set(positions))
        decoded = [chat_tiny.tokenizer.decode([int(tokens[p])]).strip() for p in positions]
        assert decoded == [str(x) for x in instance.sequence]
        if instance.kind == "copy":
            _, pos = answer_position(chat_tiny, instance, chat=chat)
            assert pos == (positions[0] if task == "copy_first" else positions[-1])
            assert decoded[positions.index(pos)] == str(instance.truth)


def test_answer_position_refuses_counting_tasks(chat_tiny):
    with pytest.raises(ValueError, match="counting task"):
        answer_position(chat_tiny, make_instance("count_ones", 4))


def _brute_force_jacobian_norms(model, tokens, pos):
    """‖∂y_n/∂v_pos‖ (Frobenius, spectral) with torch.func.jacrev through a hook on resid_pre 0."""
    embed = model.embed(tokens[None]).detach()

    def y_last(v):  # rotary: resid_pre 0 is the token embedding alone
        x = v[None]
        for block in model.blocks:
            x = block(x)
        return model.ln_final(x)[0, -1]

    jac = torch.func.jacrev(y_last)(embed[0])[:, pos, :].detach()  # [d_out, d_in]
    return float(torch.linalg.matrix_norm(jac)), float(torch.linalg.matrix_norm(jac, ord=2))


def _rollout_row(patterns):
    """Prop. B.8's product Π_l ½(mean_h A^(l) + I), last row, computed directly."""
    n = patterns.shape[-1]
    product = torch.eye(n, dtype=torch.float64)
    for layer in patterns.double():
        product = 0.5 * (layer.mean(0) + torch.eye(n, dtype=torch.float64)) @ product
    return product[-1]


@pytest.fixture(scope="module")
def exact_rollout(chat_tiny):
    return copy_sensitivity(chat_tiny, [2, 7], jacobian_mode="exact", variant="rollout")


@pytest.mark.hooked  # the brute force calls HookedTransformer blocks on a tensor (a bridge block needs its rotary args)
def test_copy_sensitivity_reads_jacobian_and_bound_at_the_answer_token(chat_tiny, exact_rollout):
    from lens_squash.edge.trace import trace

    frame = exact_rollout.frame
    assert list(zip(frame.task, frame.length, strict=True)) == [
        ("copy_first", 2),
        ("copy_first", 7),
        ("copy_last", 2),
        ("copy_last", 7),
    ]
    for row in frame.itertuples():
        instance = make_instance(row.task, row.length)
        tokens, pos = answer_position(chat_tiny, instance)
        profile = exact_rollout.profiles[(row.task, row.length)]
        assert row.answer_pos == pos == profile["answer_pos"] and row.n_tokens == len(tokens)
        assert profile["jacobian"].shape == profile["bound"].shape == (len(tokens),)
        assert row.answer_token.strip() == str(instance.truth)
        frob, spectral = _brute_force_jacobian_norms(chat_tiny, tokens, pos)
        assert row.jacobian_frobenius == pytest.approx(frob, rel=1e-8)
        assert row.jacobian_spectral == pytest.approx(spectral, rel=1e-8)
        bound = _rollout_row(trace(chat_tiny, tokens).patterns)
        assert row.bound == pytest.approx(float(bound[pos]), rel=1e-10)
        assert row.bound_share == pytest.approx(float(bound[pos] / bound.sum()), rel=1e-10)
    first, last = frame[frame.task == "copy_first"], frame[frame.task == "copy_last"]
    assert (first.answer_pos.to_numpy() < last.answer_pos.to_numpy()).all()


def test_certified_bound_is_above_the_frozen_jacobian_at_the_answer(chat_tiny):
    """Theorem (DESIGN §3): the certified path sum bounds ‖∂y_n/∂v_i‖₂ of the frozen model."""
    result = copy_sensitivity(chat_tiny, [3, 9], jacobian_mode="frozen", variant="certified")
    assert (result.frame.bound >= result.frame.jacobian_spectral * (1 - 1e-9)).all()
    for profile in result.profiles.values():
        assert profile["bound"].shape == profile["jacobian"].shape


def test_sketch_with_d_model_probes_matches_the_exact_frobenius_norms(chat_tiny, exact_rollout):
    sketch = copy_sensitivity(chat_tiny, [2, 7], jacobian_mode="sketch", n_probes=10_000, variant="rollout")
    assert sketch.provenance["n_probes"] == chat_tiny.cfg.d_model  # capped: d_model orthonormal probes are exact
    for key, profile in sketch.profiles.items():
        expected = exact_rollout.profiles[key]["jacobian"]
        torch.testing.assert_close(profile["jacobian"], expected, rtol=_rtol(chat_tiny, 1e-8), atol=0)
    assert sketch.frame.jacobian_spectral.isna().all()


def test_copy_sensitivity_renders_and_serialises(exact_rollout):
    assert isinstance(exact_rollout, CopySensitivity)
    fig = exact_rollout.plot()
    shown = {(t.name, t.xaxis): list(t.y) for t in fig.data}
    frame = exact_rollout.frame
    assert shown[("copy_last", "x")] == frame[frame.task == "copy_last"].jacobian_frobenius.tolist()
    assert shown[("copy_first", "x2")] == frame[frame.task == "copy_first"].bound.tolist()
    loaded = CopySensitivity.from_dict(json.loads(json.dumps(exact_rollout.to_dict(), allow_nan=False)))
    pd.testing.assert_frame_equal(loaded.frame, frame, check_exact=True)
    first = next(iter(exact_rollout.profiles))
    assert len(loaded.profiles[first]["jacobian"]) == frame.n_tokens[0] and list(loaded.profiles) == list(
        exact_rollout.profiles
    )
    assert loaded.provenance["model"]["name"] == exact_rollout.provenance["model"]["name"]
    assert "CopySensitivity" in exact_rollout._repr_html_()


def test_copy_sensitivity_refuses_counting_tasks(chat_tiny):
    with pytest.raises(ValueError, match="not a copying task"):
        copy_sensitivity(chat_tiny, [3], tasks=["count_ones"])


def _final_representation(model, prompt):
    """y_n straight from a cached forward pass: ln_final's normalised output times its gain."""
    tokens = format_prompt(model, prompt)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens[None])
    return cache["ln_final.hook_normalized"][0, -1] * model.ln_final.w.detach(), logits[0, -1].argmax()


def test_count_collapse_measures_n_against_n_plus_one_ones(chat_tiny):
    result = count_collapse(chat_tiny, [1, 3, 6])
    rel = _rtol(chat_tiny, 1e-9)
    assert isinstance(result, CountCollapse) and result.frame.n.tolist() == [1, 3, 6]
    for row in result.frame.itertuples():
        y, top = _final_representation(chat_tiny, make_instance("count_ones", row.n).prompt)
        y_next, top_next = _final_representation(chat_tiny, make_instance("count_ones", row.n + 1).prompt)
        diff = (y - y_next).double()
        assert row.dist_2 == pytest.approx(float(diff.norm()), rel=rel)
        assert row.dist_inf == pytest.approx(float(diff.abs().max()), rel=rel)
        assert row.dist_1 == pytest.approx(float(diff.abs().sum()), rel=rel)
        assert row.dist_inf <= row.dist_2 <= row.dist_1
        assert row.same_prediction == bool(top == top_next)
        assert row.n_tokens == len(format_prompt(chat_tiny, make_instance("count_ones", row.n).prompt))
    assert result.frame.resolution.gt(0).all()
    fig = result.plot()
    assert list(fig.data[2].y) == result.frame.dist_2.tolist()
    assert json.loads(json.dumps(result.to_dict(), allow_nan=False))["provenance"]["task"] == "count_ones"
    assert "CountCollapse" in result._repr_html_()


def test_count_collapse_refuses_sequences_that_are_not_repeats(chat_tiny):
    with pytest.raises(ValueError, match="repeat one token"):
        count_collapse(chat_tiny, [3], task="count_bernoulli")
    with pytest.raises(ValueError, match="positive integers"):
        count_collapse(chat_tiny, [0])
