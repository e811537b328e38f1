"""Lemma B.1, Lemma B.2 (Fig. 9) and Proposition B.4 as tests, against direct softmax loops."""

from __future__ import annotations

import math

import pytest
import torch

import lens_squash.algebra.softmax_theory as st
from lens_squash.algebra.softmax_theory import (
    ALTERNATING_LIMIT,
    alternating_counterexample,
    alternating_distance_exact,
    last_token_weight,
    last_weight_bound,
    length_for_last_weight,
    prefix_total_variation,
    prefix_tv_bound,
    softmax_total_variation,
    tv_decay_experiment,
)

F64 = torch.float64


def _direct_prefix_tv(x, x_star, lengths):
    return torch.stack([(torch.softmax(x[:m], 0) - torch.softmax(x_star[:m], 0)).abs().sum() for m in lengths])


# --- Lemma B.1 ---------------------------------------------------------------------------------------


def test_last_token_weight_matches_direct_softmax():
    context = torch.randn(50, dtype=F64)
    c = torch.tensor(0.3, dtype=F64)
    lengths = [1, 2, 7, 30, 51]
    direct = torch.stack([torch.softmax(torch.cat([context[: m - 1], c[None]]), 0)[-1] for m in lengths])
    torch.testing.assert_close(last_token_weight(context, c, lengths), direct, atol=1e-15, rtol=1e-12)
    assert last_token_weight(context, c, [1]).item() == 1.0


def test_lemma_b1_weight_strictly_decreases_with_every_insertion():
    bound_m = 3.0
    context = (2 * torch.rand(400, dtype=F64) - 1) * bound_m
    weights = last_token_weight(context, 1.0)  # all lengths 1 … 401
    assert (weights[1:] < weights[:-1]).all()


def test_lemma_b1_bound_holds_decays_and_is_tight():
    bound_m = 2.0  # |logits| ≤ M  ⇒  Δ = 2M
    context = (2 * torch.rand(1000, dtype=F64) - 1) * bound_m
    c = 1.5
    lengths = torch.arange(1, 1002)
    weights = last_token_weight(context, c, lengths)
    for spread in (2 * bound_m, c - context.min().item()):  # the lemma's Δ and the tightest Δ
        assert (weights <= last_weight_bound(lengths, spread) + 1e-15).all()
    bound = last_weight_bound(lengths, 2 * bound_m)
    assert (bound[1:] < bound[:-1]).all() and bound[-1] < 0.06
    # every context logit at c - Δ attains the bound exactly
    worst = torch.full((300,), c - 2 * bound_m, dtype=F64)
    torch.testing.assert_close(
        last_token_weight(worst, c), last_weight_bound(torch.arange(1, 302), 2 * bound_m), atol=1e-15, rtol=1e-12
    )


@pytest.mark.parametrize("p", [0.5, 0.1, 0.01, 1.0])
@pytest.mark.parametrize("spread", [0.0, 1.0, 3.0])
def test_length_for_last_weight_is_the_first_length_below_p(p, spread):
    m = length_for_last_weight(p, spread)
    bound = last_weight_bound([m - 1, m], spread)
    assert bound[1] < p <= bound[0]
    # the worst case sequence (all logits Δ below the last) crosses p exactly at m
    worst = last_token_weight(torch.full((m,), -spread, dtype=F64), 0.0, [m - 1, m])
    assert worst[1] < p <= worst[0] + 1e-15


def test_lemma_b1_input_errors():
    with pytest.raises(ValueError, match="lengths must lie"):
        last_token_weight(torch.zeros(3), 0.0, [5])
    with pytest.raises(ValueError, match="NaN or inf"):
        last_token_weight(torch.tensor([0.0, math.inf]), 0.0)
    with pytest.raises(ValueError, match="probability"):
        length_for_last_weight(0.0, 1.0)


# --- Lemma B.2 ---------------------------------------------------------------------------------------


def test_softmax_total_variation_definition_and_halving():
    x, y = torch.randn(4, 9, dtype=F64), torch.randn(4, 9, dtype=F64)
    tv = softmax_total_variation(x, y)
    manual = (x.exp() / x.exp().sum(-1, keepdim=True) - y.exp() / y.exp().sum(-1, keepdim=True)).abs().sum(-1)
    torch.testing.assert_close(tv, manual, atol=1e-15, rtol=1e-12)
    torch.testing.assert_close(softmax_total_variation(x, y, halve=True), tv / 2)
    assert (tv <= 2).all() and softmax_total_variation(x, x + 3.0).abs().max() < 1e-15  # shift invariance
    with pytest.raises(ValueError, match="same shape"):
        softmax_total_variation(x, y[:, :3])


@pytest.mark.parametrize("n_diff", [0, 5, 60])
def test_prefix_total_variation_equals_direct_loop(n_diff, monkeypatch):
    monkeypatch.setattr(st, "_CHUNK_CELLS", 64)  # force several chunks
    x = 3 * torch.randn(60, dtype=F64)
    x_star = x.clone()
    x_star[:n_diff] += torch.randn(n_diff, dtype=F64)
    lengths = torch.tensor([1, 2, 3, 5, 17, 40, 59, 60])
    expected = _direct_prefix_tv(x, x_star, lengths)
    torch.testing.assert_close(prefix_total_variation(x, x_star, lengths), expected, atol=1e-14, rtol=1e-11)
    assert (expected <= prefix_tv_bound(x, x_star, lengths) + 1e-14).all()


def test_tv_decay_experiment_reproduces_fig9_and_decays():
    res = tv_decay_experiment()  # the paper's setting: U[0,1], first 200 + U[0,0.1], 5 seeds
    n = res.lengths.to(F64)
    assert res.tv.shape == (5, res.n_max) and res.seeds == (0, 1, 2, 3, 4)
    at_250 = res.tv[:, 249]
    assert (res.tv[:, -1] < at_250).all() and (res.tv[:, -1] < 0.1 * at_250).all()
    assert (res.tv <= res.bound + 1e-15).all()
    # independent O(1/m) bound: D_m ≤ min(m, 200)·e·(e^0.1 - 1) and Z_m ≥ m since x ∈ [0, 1]
    independent = 2 * torch.clamp(n, max=200) * math.e * math.expm1(0.1) / n
    assert (res.tv <= independent).all()
    # past the perturbed block D is frozen while max(Z, Z*) keeps growing: the bound strictly falls
    assert (res.bound[:, 200:] < res.bound[:, 199:-1]).all()
    assert "Fig. 9" in res._repr_html_() and res.to_dict()["perturbed"] == 200


def test_tv_decay_experiment_vectorised_equals_loop_on_the_documented_sampling():
    lengths = [1, 150, 200, 201, 777, 3000]
    rng_state = torch.get_rng_state()
    res = tv_decay_experiment(n_max=3000, seeds=[3, 11], lengths=lengths)
    assert torch.equal(torch.get_rng_state(), rng_state)  # private generators only
    for row, seed in enumerate(res.seeds):
        gen = torch.Generator().manual_seed(seed)
        x = torch.rand(3000, generator=gen, dtype=F64)
        x_star = x.clone()
        x_star[:200] += 0.1 * torch.rand(200, generator=gen, dtype=F64)
        torch.testing.assert_close(res.tv[row], _direct_prefix_tv(x, x_star, lengths), atol=1e-14, rtol=1e-10)


def test_tv_decay_experiment_argument_errors():
    with pytest.raises(ValueError, match="perturbed"):
        tv_decay_experiment(n_max=100, perturbed=200)
    with pytest.raises(ValueError, match="seed"):
        tv_decay_experiment(n_max=300, seeds=[])
    with pytest.raises(ValueError, match="empty"):
        tv_decay_experiment(n_max=300, lengths=[])


# --- Proposition B.4 -----------------------------------------------------------------------------------


def test_alternating_counterexample_matches_brute_force_and_closed_form():
    lengths = torch.tensor([1, 2, 3, 4, 9, 10, 101, 1000, 1001])
    got = alternating_counterexample(lengths)
    x = (torch.arange(1001) % 2 == 0).to(F64)  # [1, 0, 1, 0, …]
    torch.testing.assert_close(got, _direct_prefix_tv(x, 1 - x, lengths), atol=1e-14, rtol=1e-12)
    torch.testing.assert_close(got, alternating_distance_exact(lengths), atol=1e-14, rtol=1e-12)


def test_prop_b4_converges_to_two_tanh_half_not_zero():
    assert ALTERNATING_LIMIT == pytest.approx(2 * math.tanh(0.5), abs=1e-15)
    lengths = torch.arange(2, 2002)
    d = alternating_counterexample(lengths)
    n = lengths.to(F64)
    even = lengths % 2 == 0
    torch.testing.assert_close(d[even], torch.full_like(d[even], ALTERNATING_LIMIT), atol=1e-12, rtol=0)
    # odd n: c - d(n) = c·e / ((e+1)² (n²-1)/4 + e) ≤ 4ce / ((e+1)² (n²-1)), a tolerance that shrinks as 1/n²
    tol = 4 * ALTERNATING_LIMIT * math.e / ((math.e + 1) ** 2 * (n[~even] ** 2 - 1))
    gap = ALTERNATING_LIMIT - d[~even]
    assert (gap >= -1e-12).all() and (gap <= tol + 1e-12).all()
    assert (d[lengths >= 9] > 0.9).all()  # no decay: Lemma B.2's assumption x_i - x*_i → 0 fails here
