"""Lemmas B.6–B.7, Prop. B.8 and the Dobrushin analysis against eigen-solvers, powers and loops."""

from __future__ import annotations

import math

import pytest
import torch

from lens_squash.algebra.attention import aggregate_heads
from lens_squash.algebra.causal import (
    causal_spectrum,
    check_causal_stochastic,
    eigenvalue_one_multiplicity,
    is_causal,
    is_row_stochastic,
    product_closure,
    two_nonzeros_condition,
)
from lens_squash.algebra.homogeneous import (
    asymptotic_depth,
    convergence_errors,
    depth_to_epsilon,
    second_eigenvalue,
    steady_state,
)
from lens_squash.algebra.paths import rollout_matrices as lazy
from lens_squash.algebra.paths import stack_product
from lens_squash.algebra.spectral import (
    SpectralReport,
    SpectralStream,
    analyze_stack,
    dobrushin,
    first_token_column,
    first_token_gap,
    spectral_report,
)
from lens_squash.edge.models import tiny_model
from lens_squash.edge.trace import trace

F64 = torch.float64


def random_causal(n: int, gen: torch.Generator, *, p_single: float = 0.3, p_zero: float = 0.3) -> torch.Tensor:
    """Lower-triangular row-stochastic with sparse rows: some rows are ``e_j`` (attend only to
    themselves), some a single earlier token ``e_k``, the rest random weights with random zeros."""
    m = torch.zeros(n, n, dtype=F64)
    m[0, 0] = 1.0
    for j in range(1, n):
        r = float(torch.rand((), generator=gen))
        if r < p_single / 2:
            m[j, j] = 1.0
        elif r < p_single:
            m[j, int(torch.randint(0, j, (), generator=gen))] = 1.0
        else:
            w = torch.rand(j + 1, generator=gen, dtype=F64)
            w = w * (torch.rand(j + 1, generator=gen) > p_zero)
            if w.sum() == 0:
                w[j] = 1.0
            m[j, : j + 1] = w / w.sum()
    return m


def softmax_causal(n: int, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """Dense causal attention: every row has all its causal keys non-zero."""
    scores = scale * torch.randn(n, n, generator=gen, dtype=F64)
    return torch.softmax(scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), -math.inf), -1)


def random_stochastic(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.softmax(torch.randn(n, n, generator=gen, dtype=F64) * 2, -1)


def with_diagonal(m: torch.Tensor, diagonal) -> torch.Tensor:
    """``m`` with its diagonal set to ``diagonal`` and each row's off-diagonal mass rescaled to match."""
    d = torch.as_tensor(diagonal, dtype=F64)
    off = m - torch.diag(m.diagonal())
    total = off.sum(-1, keepdim=True)
    off = torch.where(total > 0, off / total.clamp_min(1e-300), off) * (1 - d)[:, None]
    return off + torch.diag(d)


def brute_tau(p: torch.Tensor) -> float:
    n = p.shape[0]
    return max(0.5 * float((p[j] - p[k]).abs().sum()) for j in range(n) for k in range(n))


def power(m: torch.Tensor, exponent: int) -> torch.Tensor:
    return torch.linalg.matrix_power(m, exponent)


# --- checks ---------------------------------------------------------------------------------------


def test_checks_accept_causal_stochastic_and_reject_the_rest():
    gen = torch.Generator().manual_seed(1)
    a = softmax_causal(6, gen)
    assert is_causal(a) and is_row_stochastic(a)
    assert check_causal_stochastic(a) is a  # returned as it is, not a copy or a rescaled matrix
    full = random_stochastic(6, gen)
    assert not is_causal(full) and is_row_stochastic(full)
    with pytest.raises(ValueError, match="causal-only analysis.*mass above the diagonal"):
        check_causal_stochastic(full)
    with pytest.raises(ValueError, match="rows must sum to 1"):
        check_causal_stochastic(a + torch.eye(6, dtype=F64))  # the paper's Ā with β₁ = 1
    with pytest.raises(ValueError, match="negative"):
        check_causal_stochastic(torch.tensor([[1.0, 0.0], [1.2, -0.2]], dtype=F64))
    with pytest.raises(ValueError, match="square"):
        check_causal_stochastic(torch.ones(3, 4, dtype=F64) / 4)
    with pytest.raises(ValueError, match="NaN"):
        check_causal_stochastic(torch.full((2, 2), math.nan))


# --- Lemma B.6 --------------------------------------------------------------------------------------


def test_spectrum_is_the_diagonal_and_bounded_by_one():
    gen = torch.Generator().manual_seed(2)
    for n in (1, 2, 5, 9):
        for _ in range(10):
            m = random_causal(n, gen)
            eig = torch.linalg.eigvals(m)
            assert eig.imag.abs().max() < 1e-12
            torch.testing.assert_close(eig.real.sort().values, causal_spectrum(m).sort().values, atol=1e-10, rtol=0)
            assert eig.abs().max() <= 1 + 1e-12


def test_multiplicity_matches_eigvals_rank_and_absorbing_rows():
    gen = torch.Generator().manual_seed(3)
    seen = set()
    for trial in range(100):
        n = 2 + trial % 8
        m = random_causal(n, gen)
        mult = int(eigenvalue_one_multiplicity(m))
        by_eigvals = int(((torch.linalg.eigvals(m) - 1).abs() <= 1e-6).sum())
        geometric = n - int(torch.linalg.matrix_rank(m - torch.eye(n, dtype=F64)))
        absorbing = 1 + sum(bool(torch.equal(m[j], torch.eye(n, dtype=F64)[j])) for j in range(1, n))
        assert mult == by_eigvals == geometric == absorbing
        seen.add(mult)
    assert {1, 2, 3} <= seen  # both simple and repeated eigenvalue 1 were exercised


def test_multiplicity_is_batched():
    gen = torch.Generator().manual_seed(4)
    stack = torch.stack([random_causal(6, gen) for _ in range(5)])
    # independent count: row 0 plus every row that is its own unit vector (Lemma B.6's absorbing rows)
    eye = torch.eye(6, dtype=F64)
    expected = torch.tensor([1 + sum(bool(torch.equal(m[j], eye[j])) for j in range(1, 6)) for m in stack])
    assert torch.equal(eigenvalue_one_multiplicity(stack), expected)


def test_two_nonzeros_condition_implies_simple_eigenvalue_but_is_not_necessary():
    gen = torch.Generator().manual_seed(5)
    holds = fails_but_simple = 0
    for trial in range(200):
        m = random_causal(2 + trial % 7, gen)
        simple = int(((torch.linalg.eigvals(m) - 1).abs() <= 1e-6).sum()) == 1
        if bool(two_nonzeros_condition(m)):
            holds += 1
            assert simple
        elif simple:
            fails_but_simple += 1  # e.g. a row e_k with k < j: one non-zero, diagonal 0
    assert holds >= 20 and fails_but_simple >= 5
    # dense softmax attention always satisfies it
    assert bool(two_nonzeros_condition(softmax_causal(12, gen)))


# --- Lemma B.7 --------------------------------------------------------------------------------------


def test_lemma_b7_products_stay_causal_row_stochastic():
    gen = torch.Generator().manual_seed(6)
    for _ in range(30):
        a, b = random_causal(7, gen), softmax_causal(7, gen)
        closure = product_closure(a, b)
        assert closure == dict.fromkeys(closure, True)
        general = product_closure(random_stochastic(7, gen), random_stochastic(7, gen))
        assert general["factors_row_stochastic"] and general["product_row_stochastic"]
        assert not general["factors_causal"] and not general["product_causal"]
    stack = torch.stack([lazy(random_causal(6, gen)) for _ in range(4)])
    product = stack_product(stack)
    assert is_causal(product, 1e-12) and is_row_stochastic(product, 1e-12)
    torch.testing.assert_close(product, stack[3] @ stack[2] @ stack[1] @ stack[0])


# --- Prop. B.8 --------------------------------------------------------------------------------------


def test_steady_state_is_the_limit_of_powers():
    gen = torch.Generator().manual_seed(7)
    for trial in range(40):
        m = random_causal(2 + trial % 7, gen)
        limit = power(lazy(m), 2**16)
        torch.testing.assert_close(steady_state(m), limit, atol=1e-9, rtol=0)
        if int(eigenvalue_one_multiplicity(m)) == 1:
            expected = torch.zeros_like(m)
            expected[:, 0] = 1.0
            torch.testing.assert_close(steady_state(m), expected, atol=1e-12, rtol=0)


def test_limit_reached_within_1e6_at_the_predicted_rate():
    gen = torch.Generator().manual_seed(8)
    # distinct diagonal with a clear spectral gap: λ₂ = (1 + 0.8)/2 = 0.9, λ₃ = 0.75
    m = with_diagonal(softmax_causal(6, gen), [1.0, 0.3, 0.8, 0.1, 0.5, 0.2])
    lam2 = float(second_eigenvalue(m))
    assert lam2 == pytest.approx(0.9, abs=1e-15)
    errors = convergence_errors(m, 200)
    brute = torch.stack([0.5 * (power(lazy(m), L) - steady_state(m)).abs().sum(-1).max() for L in range(0, 201, 25)])
    torch.testing.assert_close(errors[::25], brute, atol=1e-14, rtol=1e-10)
    assert (errors[1:] <= errors[:-1] + 1e-15).all()  # non-increasing
    ratios = errors[1:] / errors[:-1]
    assert abs(float(ratios[150]) - lam2) < 1e-6
    assert abs(float(ratios[40]) - lam2) > abs(float(ratios[150]) - lam2)  # converging to λ₂
    depth = depth_to_epsilon(m, 1e-6)
    final = 0.5 * float((power(lazy(m), depth) - steady_state(m)).abs().sum(-1).max())
    before = 0.5 * float((power(lazy(m), depth - 1) - steady_state(m)).abs().sum(-1).max())
    assert final <= 1e-6 < before  # achieved, and the smallest such depth
    assert depth == pytest.approx(asymptotic_depth(m, 1e-6), rel=0.1)  # the rate-only estimate is close


def test_depth_to_epsilon_is_exact_beyond_the_horizon_even_with_repeated_diagonals():
    gen = torch.Generator().manual_seed(9)
    # equal diagonals: a Jordan block, E_L ~ L λ₂^L, so the rate-only estimate falls short
    m = with_diagonal(softmax_causal(5, gen), [1.0, 0.9, 0.9, 0.9, 0.9])

    def error(depth):
        return 0.5 * float((power(lazy(m), depth) - steady_state(m)).abs().sum(-1).max())

    within = depth_to_epsilon(m, 1e-6, horizon=5000)
    for horizon in (1, 8, 100):
        assert depth_to_epsilon(m, 1e-6, horizon=horizon) == within
    assert error(within) <= 1e-6 < error(within - 1)
    assert asymptotic_depth(m, 1e-6) < within
    ratios = convergence_errors(m, 3000)
    assert abs(float(ratios[-1] / ratios[-2]) - float(second_eigenvalue(m))) < 2e-3


def test_prop_b8_degenerate_cases():
    e = torch.eye(3, dtype=F64)
    absorbing = torch.stack([e[0], e[0], e[2]])  # row 2 attends only to itself
    assert depth_to_epsilon(absorbing, 1e-6) == math.inf and asymptotic_depth(absorbing, 1e-6) == math.inf
    assert depth_to_epsilon(torch.ones(1, 1, dtype=F64), 1e-6) == 0
    with pytest.raises(ValueError, match="eps"):
        depth_to_epsilon(absorbing, 0.0)


# --- Dobrushin --------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 3, 128])
def test_dobrushin_equals_double_loop(chunk):
    gen = torch.Generator().manual_seed(10)
    mats = [random_causal(9, gen), softmax_causal(11, gen), lazy(softmax_causal(7, gen)), random_stochastic(8, gen)]
    for m in mats:
        tau = float(dobrushin(m, chunk=chunk))
        assert tau == pytest.approx(brute_tau(m), abs=1e-14)
        # the O(n) closed form (auto, for causal stochastic matrices) and the pairwise route agree
        assert float(dobrushin(m, chunk=chunk, method="pairwise")) == pytest.approx(brute_tau(m), abs=1e-14)
        assert 0.0 <= tau <= 1.0 + 1e-15  # one rounding step above 1 is possible
    assert float(dobrushin(torch.eye(4, dtype=F64))) == 1.0
    assert float(dobrushin(torch.full((4, 4), 0.25, dtype=F64))) == 0.0


def test_dobrushin_is_submultiplicative():
    gen = torch.Generator().manual_seed(11)
    for trial in range(40):
        maker = random_stochastic if trial % 2 else lambda n, g: lazy(random_causal(n, g))
        p, q = maker(8, gen), maker(8, gen)
        assert float(dobrushin(p @ q)) <= float(dobrushin(p)) * float(dobrushin(q)) + 1e-12


def test_first_token_column_and_rank_one_distance_match_the_full_product():
    gen = torch.Generator().manual_seed(12)
    stack = torch.stack([lazy(softmax_causal(10, gen, scale=3.0)) for _ in range(6)])
    column, gap = first_token_column(stack), first_token_gap(stack)
    torch.testing.assert_close(column + gap, torch.ones_like(column), atol=1e-14, rtol=0)
    report = analyze_stack(stack, target_pos=-1)
    tau = dobrushin(stack)
    torch.testing.assert_close(
        report.dobrushin, torch.tensor([brute_tau(m) for m in stack], dtype=F64), atol=1e-14, rtol=0
    )
    torch.testing.assert_close(report.cumulative_dobrushin, torch.cumprod(tau, 0), atol=1e-14, rtol=0)
    for d in range(6):
        product = stack_product(stack[: d + 1])
        torch.testing.assert_close(column[d], product[:, 0], atol=1e-14, rtol=0)

        torch.testing.assert_close(gap[d], product[:, 1:].sum(-1), atol=1e-14, rtol=1e-12)
        distance = max(0.5 * float((product[j] - torch.eye(10, dtype=F64)[0]).abs().sum()) for j in range(10))
        assert float(report.rank_one_distance[d]) == pytest.approx(distance, abs=1e-13)
        tau_product = brute_tau(product)
        assert tau_product / 2 - 1e-13 <= distance <= tau_product + 1e-13
        assert distance <= float(torch.prod(tau[: d + 1])) + 1e-13
        assert float(report.rollout_mass[d]) == pytest.approx(float(product[-1, 0]), abs=1e-14)
    assert (report.rank_one_distance[1:] <= report.rank_one_distance[:-1] + 1e-15).all()


def test_float32_softmax_rows_take_the_closed_form_within_their_rounding():
    # float32 rows sum to 1 only within ~1e-7: analyze_stack's τ must still match the brute-force
    # τ of the float64 matrices they round
    gen = torch.Generator().manual_seed(13)
    exact = torch.stack([lazy(softmax_causal(12, gen, scale=3.0)) for _ in range(4)])
    rounded = exact.float().double()
    assert (rounded.sum(-1) - 1).abs().max() > 1e-9  # really off by the float32 rounding
    report = analyze_stack(rounded)
    torch.testing.assert_close(
        report.dobrushin, torch.tensor([brute_tau(m) for m in exact], dtype=F64), atol=1e-6, rtol=0
    )


def test_depth_to_first_token_within_the_stack_and_extrapolated():
    gen = torch.Generator().manual_seed(13)
    layers = torch.stack([lazy(softmax_causal(6, gen, scale=2.0)) for _ in range(4)])
    deep = layers.repeat(40, 1, 1)
    report = analyze_stack(deep, eps=1e-6)
    assert not report.extrapolated
    gaps = [1 - float(stack_product(deep[:d])[-1, 0]) for d in range(1, len(deep) + 1)]
    assert report.depth_to_first_token == next(d for d, g in enumerate(gaps, 1) if g <= 1e-6)
    shallow = analyze_stack(layers, eps=1e-6)
    assert shallow.extrapolated and shallow.depth_to_first_token > 4
    # the extrapolation bounds a periodic continuation (whose per-period Π τ is the stack's) once
    # whole periods cover the predicted depth
    periods = math.ceil(shallow.depth_to_first_token / 4)
    assert 1 - float(stack_product(layers.repeat(periods, 1, 1))[-1, 0]) <= 1e-6


def test_target_position_and_stack_shape_are_checked():
    gen = torch.Generator().manual_seed(14)
    stack = torch.stack([lazy(softmax_causal(5, gen)) for _ in range(2)])
    with pytest.raises(ValueError, match="out of range"):
        analyze_stack(stack, target_pos=5)
    with pytest.raises(ValueError, match=r"\[layer, query_pos, key_pos\]"):
        analyze_stack(stack[0])
    first = analyze_stack(stack, target_pos=0)
    assert first.depth_to_first_token == 1 and (first.rollout_mass == 1).all()


# --- on a model -------------------------------------------------------------------------------------


def _rollout(patterns: torch.Tensor) -> torch.Tensor:
    return lazy(aggregate_heads(patterns.double()))


def test_report_on_a_tiny_model_trace(tiny):
    traced = trace(tiny, torch.randint(0, 32, (12,)))
    report = analyze_stack(_rollout(traced.patterns))
    assert isinstance(report, SpectralReport)
    assert ((report.rollout_mass >= 0) & (report.rollout_mass <= 1 + 1e-12)).all()
    assert (report.rank_one_distance <= report.cumulative_dobrushin + 1e-12).all()
    assert (report.multiplicity == 1).all() and report.two_nonzeros.all()  # softmax rows are dense
    import numpy as np

    from ..reference import assert_json_carries

    assert_json_carries(report)  # strict JSON holding every value, and from_dict(to_dict()) bit-equal
    assert "SpectralReport" in report._repr_html_()
    # the figure draws the report's own arrays; its Π τ is the report's cumulative Dobrushin
    drawn = {t.name: (np.asarray(t.x, dtype=float), np.asarray(t.y, dtype=float)) for t in report.plot().data}
    L = report.dobrushin.shape[0]
    expected = {
        "eigenvalues Λ̃_ii": (np.repeat(np.arange(L), report.spectrum.shape[1]), report.spectrum.numpy().ravel()),
        "second eigenvalue": (np.arange(L), report.second_eigenvalue.numpy()),
        "τ per layer": (np.arange(L), report.dobrushin.numpy()),
        "Π τ (bound)": (np.arange(1, L + 1), report.cumulative_dobrushin.numpy()),
        "[Π Λ̃]ₙ,₀": (np.arange(1, L + 1), report.rollout_mass.numpy()),
        "distance to rank one": (np.arange(1, L + 1), report.rank_one_distance.numpy()),
    }
    assert set(drawn) == set(expected)
    for name, (x, y) in expected.items():
        np.testing.assert_array_equal(drawn[name][0], x, err_msg=name)
        np.testing.assert_allclose(drawn[name][1], y, rtol=1e-12, atol=0, err_msg=name)


@pytest.mark.hooked  # tiny_model(causal=False) has no transformers twin
def test_bidirectional_model_is_rejected():
    model = tiny_model(n_layers=2, n_heads=2, d_model=16, d_vocab=32, dtype=F64, seed=1, causal=False)
    traced = trace(model, torch.randint(0, 32, (8,)))
    with pytest.raises(ValueError, match="causal-only analysis"):
        analyze_stack(_rollout(traced.patterns))


def test_streamed_report_equals_the_whole_stack_and_refuses_what_it_refuses():
    """SpectralStream one layer at a time gives analyze_stack's report, for every target."""
    gen = torch.Generator().manual_seed(11)
    stack = torch.stack([lazy(softmax_causal(9, gen, scale=3.0)) for _ in range(5)])
    stream = SpectralStream(9, atol=1e-6)
    for layer in stack:
        stream.add(layer)
    layers = stream.finish()
    for target in (-1, 0, 4):
        whole, streamed = analyze_stack(stack, target_pos=target, atol=1e-6), spectral_report(layers, target_pos=target)
        for name in (
            "spectrum",
            "dobrushin",
            "two_nonzeros",
            "rollout_mass",
            "rank_one_distance",
            "cumulative_dobrushin",
        ):
            assert torch.equal(getattr(whole, name), getattr(streamed, name)), name
        assert whole.depth_to_first_token == streamed.depth_to_first_token
    # the brute-force product agrees with the carried column
    product = stack_product(stack)
    assert float(spectral_report(layers).rollout_mass[-1]) == pytest.approx(float(product[-1, 0]), abs=1e-14)
    bad = SpectralStream(9)
    with pytest.raises(ValueError, match="rows must sum to 1"):
        bad.add(2 * stack[0])
