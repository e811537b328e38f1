"""The gradient request: its mode names, its refusals, the front ends' shared defaults, and the axes
it separates (a frozen sketch over a whole orthonormal basis is the frozen Jacobian's Frobenius norm)."""

from __future__ import annotations

import inspect

import pytest
import torch

from lens_squash.edge.flow import flow, flow_of
from lens_squash.edge.gradient import Exact, GradientRequest, Sketch
from lens_squash.edge.jacobian import MODES, jacobian, jacobian_of
from lens_squash.edge.models import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(n_layers=2, n_heads=2, d_model=16, d_vocab=32, dtype=torch.float64, seed=1)


TOKENS = torch.tensor([3, 17, 5, 9, 30, 2, 11])


@pytest.mark.parametrize(
    ("mode", "frozen", "probes"),
    [
        ("exact", False, Exact()),
        ("frozen", True, Exact()),
        ("sketch", False, Sketch(8, 3)),
        ("frozen-sketch", True, Sketch(8, 3)),
    ],
)
def test_mode_names_map_to_requests_and_back(mode, frozen, probes):
    request = GradientRequest.from_mode(mode, n_probes=8, seed=3, target_pos=2)
    assert (request.frozen, request.probes, request.target_pos) == (frozen, probes, 2)
    assert request.mode == mode and mode in MODES
    assert request.seed == (3 if isinstance(probes, Sketch) else None)


@pytest.mark.parametrize(
    ("build", "pattern"),
    [
        (lambda: GradientRequest.from_mode("adjoint"), "mode"),
        (lambda: GradientRequest(frozen="yes"), "frozen"),
        (lambda: GradientRequest(probes=8), "probes"),
        (lambda: GradientRequest(checkpoint="yes"), "checkpoint"),
        (lambda: GradientRequest(chunk_size=0), "chunk_size"),
        (lambda: GradientRequest(max_memory_bytes=0), "max_memory_bytes"),
        (lambda: Sketch(0), "n_probes"),
        (lambda: Sketch(True), "n_probes"),
        (lambda: Sketch(4, seed=-1), "seed"),
    ],
)
def test_bad_requests_are_refused_when_made(build, pattern):
    with pytest.raises(ValueError, match=pattern):
        build()


def test_frozen_is_a_keyword_only_field():
    with pytest.raises(TypeError):
        GradientRequest(-1, "final", 0, True)  # noqa: FBT003 (the point: positional booleans are refused)


def test_jacobian_and_flow_share_their_request_defaults():
    jac, flo = inspect.signature(jacobian).parameters, inspect.signature(flow).parameters
    shared = set(jac) & set(flo) - {"model", "prompt"}
    assert {"target_pos", "mode", "n_probes", "seed", "chunk_size", "checkpoint", "max_memory_bytes", "chat"} <= shared
    assert {name: jac[name].default for name in shared} == {name: flo[name].default for name in shared}
    assert jac["mode"].default == "exact"
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for name, p in jac.items() if name not in ("model", "prompt"))


def test_a_frozen_sketch_over_a_whole_basis_is_the_frozen_frobenius_norm(model):
    # orthonormal probes spanning R^d: U Uᵀ = I, so the estimate is exact (module docstring of jacobian)
    d = model.cfg.d_model
    sketch = jacobian_of(model, TOKENS, GradientRequest(frozen=True, probes=Sketch(d, seed=4)))
    frozen = jacobian(model, TOKENS, mode="frozen")
    torch.testing.assert_close(sketch.frobenius, frozen.frobenius, rtol=1e-10, atol=1e-12)
    assert sketch.mode == "frozen-sketch" and sketch.spectral is None
    live = jacobian(model, TOKENS, mode="exact")
    assert not torch.allclose(live.frobenius, frozen.frobenius)  # the axis does something here


def test_flow_refuses_a_request_it_cannot_cover(model):
    for request in (GradientRequest(layer=0), GradientRequest(wrt=1)):
        with pytest.raises(ValueError, match="layer='final'"):
            flow_of(model, TOKENS, request, variants=())
