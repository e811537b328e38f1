"""Clamping the massive activation: what it changes (one position, one layer) and what it leaves alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lens_squash.experiments.ablation import ablation_effect, clamp_hooks, clamp_massive_activation
from lens_squash.experiments.sinks import sink_analysis

from ..reference import assert_json_carries

F64 = torch.float64


def test_disabled_clamp_changes_nothing(tiny):
    tokens = torch.randint(0, tiny.cfg.d_vocab, (10,))[None]
    reference = tiny(tokens)
    for layer, factor in [(None, None), (0, 1.0), (1, 1.0)]:
        with clamp_massive_activation(tiny, layer, factor=factor) as hooks:
            assert torch.equal(tiny(tokens), reference)
        assert len(hooks) == (0 if layer is None else 1)
    assert not tiny.list_hooks()  # removed on exit
    with clamp_massive_activation(tiny, 0):  # the default clamp does change the output
        assert not torch.equal(tiny(tokens), reference)


def test_clamp_rescales_the_first_token_at_that_layer_only(tiny):
    tokens = torch.randint(0, tiny.cfg.d_vocab, (11,))[None]
    _, clean = tiny.run_with_cache(tokens)
    with clamp_massive_activation(tiny, 0):
        _, cache = tiny.run_with_cache(tokens)
    before, after = clean["resid_post", 0][0], cache["resid_post", 0][0]
    median = float(np.median(before[1:].norm(dim=-1).numpy()))
    assert after[0].norm().item() == pytest.approx(median, rel=1e-12)  # the typical token norm
    torch.testing.assert_close(after[0] / after[0].norm(), before[0] / before[0].norm())  # direction kept
    assert torch.equal(after[1:], before[1:])
    torch.testing.assert_close(cache["resid_pre", 1], cache["resid_post", 0])  # the next layer reads it
    with clamp_massive_activation(tiny, -1, target_norm=0.5):
        _, cache = tiny.run_with_cache(tokens)
    assert cache["resid_post", 1][0, 0].norm().item() == pytest.approx(0.5, rel=1e-12)


def test_clamp_top_dims_sets_them_to_their_median(tiny):
    tokens = torch.randint(0, tiny.cfg.d_vocab, (9,))[None]
    _, clean = tiny.run_with_cache(tokens)
    x = clean["resid_post", 0][0]
    top = x[0].abs().topk(3).indices
    with clamp_massive_activation(tiny, 0, dims=3):
        _, cache = tiny.run_with_cache(tokens)
    after = cache["resid_post", 0][0, 0]
    expected = x[0].clone()
    expected[top] = torch.tensor(np.median(x[1:, top].numpy(), axis=0))
    torch.testing.assert_close(after, expected, atol=1e-14, rtol=0)


def test_clamp_option_errors(tiny):
    for kwargs, match in [
        ({"factor": 2.0, "dims": 1}, "at most one"),
        ({"target_norm": -1.0}, "≥ 0"),
        ({"dims": 0}, "k largest"),
    ]:
        with pytest.raises(ValueError, match=match):
            clamp_hooks(tiny, 0, **kwargs)
    with pytest.raises(ValueError, match="blocks"):
        clamp_hooks(tiny, 5)


def test_ablation_effect_measures_the_clamped_model(tiny):
    tokens = torch.randint(0, tiny.cfg.d_vocab, (10,))
    result = ablation_effect(tiny, tokens, 0, jacobian=False)
    with clamp_massive_activation(tiny, 0):
        ablated = sink_analysis(tiny, tokens)
    baseline = sink_analysis(tiny, tokens)
    torch.testing.assert_close(result.sink_rate_change, ablated.sink_rate - baseline.sink_rate)
    torch.testing.assert_close(result.entropy_change, ablated.entropy - baseline.entropy)
    torch.testing.assert_close(result.entropy_change[:1], torch.zeros(1, dtype=F64))  # before the clamp
    # the stream entering layer 1 is the clamped one: its first token now has the median norm
    others = tiny.run_with_cache(tokens[None])[1]["resid_post", 0][0, 1:].norm(dim=-1)
    assert result.ablated.first_token_norm[1].item() == pytest.approx(float(np.median(others.numpy())), rel=1e-12)
    loaded = assert_json_carries(result)  # both reports nested, every change curve by value
    assert loaded["sink_rate_overall_change"] == result.ablated.sink_rate_overall - result.baseline.sink_rate_overall
    assert "AblationResult" in result._repr_html_()
    drawn = [np.asarray(t.y, dtype=float) for t in result.plot().data]
    expected = [result.sink_rate_change, result.entropy_change, result.baseline.norm_ratio, result.ablated.norm_ratio]
    assert len(drawn) == len(expected)
    for y, values in zip(drawn, expected, strict=True):
        np.testing.assert_allclose(y, values.numpy(), rtol=1e-6, atol=1e-12)
    with pytest.raises(ValueError, match="no Jacobians"):
        result.plot_jacobian()


def test_jacobian_pass_honours_the_clamp(tiny):
    from lens_squash.edge.jacobian import jacobian

    tokens = torch.randint(0, tiny.cfg.d_vocab, (6,))
    # factor 0 on the last token after the last block makes y_n = ln_final(0): constant in every input
    with clamp_massive_activation(tiny, -1, position=-1, factor=0.0):
        zeroed = jacobian(tiny, tokens, mode="sketch", n_probes=4).frobenius
    assert torch.equal(zeroed, torch.zeros(6, dtype=F64))
    identity = ablation_effect(tiny, tokens, 0, factor=1.0, jacobian=True, n_probes=16)
    assert (identity.jacobian_baseline > 0).all()
    assert torch.equal(identity.jacobian_ablated, identity.jacobian_baseline)  # same probes, same model
    # 16 orthonormal probes in d_model = 16 recover the exact Frobenius norms of the clean model
    torch.testing.assert_close(identity.jacobian_baseline, jacobian(tiny, tokens, mode="exact").frobenius)
    # raw and normalised profiles, baseline then ablated: the figure holds the two Jacobians' values
    raw_base, shape_base, raw_ablated, shape_ablated = identity.plot_jacobian().data
    for trace, values in [
        (raw_base, identity.jacobian_baseline),
        (raw_ablated, identity.jacobian_ablated),
        (shape_base, identity.jacobian_baseline / identity.jacobian_baseline.sum()),
        (shape_ablated, identity.jacobian_ablated / identity.jacobian_ablated.sum()),
    ]:
        np.testing.assert_allclose(np.asarray(trace.y, dtype=float), values.numpy(), rtol=1e-6)
