"""Path-sum algebra against brute-force enumeration of every causal path (float64)."""

from __future__ import annotations

import itertools

import pytest
import torch

from lens_squash.algebra import paths


def random_graph(n_layers: int, n_heads: int, n: int, *, seed: int, left: bool = False):
    gen = torch.Generator().manual_seed(seed)
    causal = torch.tril(torch.ones(n, n, dtype=torch.float64))
    edges = torch.rand(n_layers, n_heads, n, n, generator=gen, dtype=torch.float64) * causal
    edges[edges < 0.2] = 0.0  # sparse rows, as real attention often is
    residual = torch.rand(n_layers, n, generator=gen, dtype=torch.float64) + 0.1
    left_scale = torch.rand(n_layers, n, generator=gen, dtype=torch.float64) + 0.5 if left else None
    return residual, edges, left_scale


def enumerate_paths(residual, edges, left_scale, target):
    """Every causal path i = k_0 ≤ … ≤ k_L = target with its per-layer edge choice, and its weight."""
    n_layers, n_heads, n, _ = edges.shape
    out = []
    for positions in itertools.product(range(n), repeat=n_layers):
        chain = (*positions, target)
        if any(chain[i] > chain[i + 1] for i in range(n_layers)):
            continue
        options = []
        for layer in range(n_layers):
            k, j = chain[layer], chain[layer + 1]
            s = 1.0 if left_scale is None else float(left_scale[layer, j])
            opts = [(h, s * float(edges[layer, h, j, k])) for h in range(n_heads)]
            if j == k:
                opts.append((None, s * float(residual[layer, j])))
            options.append(opts)
        for choice in itertools.product(*options):
            weight = 1.0
            for _, w in choice:
                weight *= w
            out.append((weight, chain, tuple(h for h, _ in choice)))
    return out


@pytest.mark.parametrize(("n_layers", "n", "left"), [(1, 4, False), (2, 5, False), (3, 4, True), (4, 3, True)])
def test_row_and_matrix_equal_path_enumeration(n_layers, n, left):
    residual, edges, left_scale = random_graph(n_layers, 2, n, seed=n_layers * 10 + n, left=left)
    mats = paths.layer_matrices(residual, edges, left_scale=left_scale)
    product = paths.stack_product(mats)
    for target in range(n):
        enumerated = torch.zeros(n, dtype=torch.float64)
        for weight, chain, _ in enumerate_paths(residual, edges, left_scale, target):
            enumerated[chain[0]] += weight
        torch.testing.assert_close(paths.bound_row(mats, target), enumerated, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(
            paths.graph_row(residual, edges, target, left_scale=left_scale), enumerated, rtol=1e-12, atol=1e-14
        )
        torch.testing.assert_close(product[target], enumerated, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("source", [None, 0, 2])
@pytest.mark.parametrize("left", [False, True])
def test_flows_sum_to_the_bound_at_every_layer(source, left):
    residual, edges, left_scale = random_graph(3, 3, 6, seed=7, left=left)
    row = paths.graph_row(residual, edges, 5, left_scale=left_scale)
    flows = paths.flow_decomposition(residual, edges, 5, source=source, left_scale=left_scale)
    expected = float(row.sum() if source is None else row[source])
    assert flows.total == pytest.approx(expected, rel=1e-12)
    torch.testing.assert_close(flows.layer_totals, torch.full((3,), expected, dtype=torch.float64), rtol=1e-12, atol=0)
    assert (flows.head_flows >= 0).all() and (flows.residual_flows >= 0).all()


def test_head_flow_equals_the_mass_of_paths_through_that_edge():
    residual, edges, _ = random_graph(3, 2, 4, seed=3)
    flows = paths.flow_decomposition(residual, edges, 3, source=None)
    expected = torch.zeros_like(flows.head_flows)
    for weight, chain, heads in enumerate_paths(residual, edges, None, 3):
        for layer, head in enumerate(heads):
            if head is not None:
                expected[layer, head, chain[layer + 1], chain[layer]] += weight
    torch.testing.assert_close(flows.head_flows, expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("source", [None, 1])
def test_top_paths_match_brute_force(source):
    residual, edges, left_scale = random_graph(3, 2, 5, seed=11, left=True)
    found = paths.top_paths(residual, edges, 4, k=7, source=source, left_scale=left_scale)
    brute = [p for p in enumerate_paths(residual, edges, left_scale, 4) if source is None or p[1][0] == source]
    brute.sort(key=lambda p: -p[0])
    assert [r.weight for r in found] == pytest.approx([w for w, _, _ in brute[:7]], rel=1e-12)
    for record in found:  # each returned path really has the weight it claims
        match = [w for w, chain, heads in brute if chain == record.positions and heads == record.heads]
        assert match and match[0] == pytest.approx(record.weight, rel=1e-12)


def test_rollout_matrices_are_half_attention_plus_half_identity_and_rows_sum_to_one():
    attention = torch.softmax(
        torch.randn(4, 6, 6, dtype=torch.float64).masked_fill(
            ~torch.tril(torch.ones(6, 6, dtype=torch.bool)), float("-inf")
        ),
        dim=-1,
    )
    rollout = paths.rollout_matrices(attention)
    for layer in range(4):  # Prop. B.8, entry by entry: ½ on the diagonal plus ½ of the attention
        for j in range(6):
            for k in range(6):
                expected = 0.5 * float(attention[layer, j, k]) + (0.5 if j == k else 0.0)
                assert float(rollout[layer, j, k]) == pytest.approx(expected, abs=1e-15)
    assert (rollout.diagonal(dim1=-2, dim2=-1) >= 0.5).all()  # the residual's half: never the bare attention
    torch.testing.assert_close(rollout.sum(-1), torch.ones(4, 6, dtype=torch.float64))
    torch.testing.assert_close(paths.stack_product(rollout).sum(-1), torch.ones(6, dtype=torch.float64))


def test_paper_constant_and_residual_augmentation():
    assert paths.paper_constant(3, beta2=2.0, beta3=4.0, sigma_psi=1.0) == pytest.approx(1.5**3 / 4)
    a = torch.rand(2, 3, 3, dtype=torch.float64)
    aug = paths.residual_augmented(a, beta1=torch.tensor([2.0, 4.0], dtype=torch.float64))
    torch.testing.assert_close(aug[1], a[1] / 4 + torch.eye(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="positive"):
        paths.paper_constant(2, beta2=0.0)


def test_bad_inputs_have_clear_errors():
    residual, edges, _ = random_graph(2, 2, 4, seed=0)
    with pytest.raises(ValueError, match="out of range"):
        paths.graph_row(residual, edges, 4)
    with pytest.raises(ValueError, match="residual must be"):
        paths.graph_row(residual[:, :3], edges, 0)
    with pytest.raises(ValueError, match="top_paths"):
        old, paths.MAX_FLOW_ELEMENTS = paths.MAX_FLOW_ELEMENTS, 10
        try:
            paths.flow_decomposition(residual, edges, 0)
        finally:
            paths.MAX_FLOW_ELEMENTS = old


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_factored_row_equals_the_materialised_graph(dtype):
    residual, edges, left_scale = random_graph(3, 2, 7, seed=21, left=True)
    patterns = edges / edges.sum(-1, keepdim=True).clamp_min(1e-12)
    gen = torch.Generator().manual_seed(5)
    key_scale = torch.rand(3, 2, 7, generator=gen, dtype=torch.float64)
    query_scale = torch.rand(3, 7, generator=gen, dtype=torch.float64)
    materialised = query_scale[:, None, :, None] * patterns * key_scale[:, :, None, :]
    expected = paths.graph_row(residual, materialised, 5, left_scale=left_scale)
    row = paths.factored_row(residual, patterns.to(dtype), key_scale, 5, query_scale=query_scale, left_scale=left_scale)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(row, expected, rtol=tol, atol=0)


def test_factored_row_keeps_huge_float32_rows_finite():
    """Certified rows exceed float32's range on deep models; the float64 row must hold them."""
    n_layers, n = 40, 5
    patterns = torch.softmax(
        torch.randn(n_layers, 2, n, n).masked_fill(~torch.tril(torch.ones(n, n, dtype=torch.bool)), float("-inf")),
        dim=-1,
    )
    key_scale = torch.full((n_layers, 2, n), 1e3, dtype=torch.float64)
    residual = torch.ones(n_layers, n, dtype=torch.float64)
    row32 = paths.factored_row(residual, patterns, key_scale, -1)
    row64 = paths.factored_row(residual, patterns.double(), key_scale, -1)
    assert torch.isfinite(row32).all() and row64.max() > 1e100
    torch.testing.assert_close(row32, row64, rtol=1e-5, atol=0)
