"""Per-block activation checkpointing: the checkpointed Jacobian equals the plain one, everywhere.

The plain path is itself checked against ``torch.func.jacrev`` through a hand-written loop over the
blocks (tests/edge/test_jacobian.py, tests/test_conformance.py), so equality with it on every
architecture family, every mode and several layer/input choices is equality with an independent
reference. The memory rule is tested by what it chooses and by what it refuses: the largest prompt it
names fits, one more token does not.
"""

from __future__ import annotations

import re

import pytest
import torch

from lens_squash.edge.jacobian import jacobian
from lens_squash.edge.jacobian_memory import estimate_memory
from lens_squash.edge.models import TINY_MODEL, load_model, tiny_model

from ..families import FAMILIES, TOKENS, build, params, sweep

#: float64: the two paths run the same operations on the same numbers, in another order of blocks
TOL64 = {"atol": 1e-12, "rtol": 1e-10}
MODES = ("exact", "frozen", "sketch")


def _pair(model, tokens, **kwargs):
    plain = jacobian(model, tokens, checkpoint=False, keep_full=True, **kwargs)
    saved = jacobian(model, tokens, checkpoint=True, keep_full=True, **kwargs)
    assert plain.provenance["checkpoint"] is False and saved.provenance["checkpoint"] is True
    return plain, saved


def _assert_equal(plain, saved, tol):
    torch.testing.assert_close(saved.full, plain.full, **tol)
    for kind in ("spectral", "frobenius", "l1"):
        if getattr(plain, kind) is not None:
            torch.testing.assert_close(getattr(saved, kind), getattr(plain, kind), **tol)


#: every family (on TransformerLens 4: the bridge twins that freeze), and the tiny-random bridge; the
#: families are a conformance sweep (test-fast keeps the tiny-random bridge, and the float32 families and
#: the layer/position checks below)
@pytest.fixture(
    scope="module",
    params=[*sweep(sorted(FAMILIES), fast=()), "tiny_random_bridge"],
)
def family(request):
    if request.param == "tiny_random_bridge":
        return load_model(TINY_MODEL, backend="bridge", dtype=torch.float64, n_ctx=64)
    return build(request.param)


@pytest.mark.parametrize("mode", MODES)
def test_checkpointed_equals_plain_on_every_family(family, mode):
    # chunk 5 with 8 or 32 rows: ragged last chunks, several chunks per recomputed block
    plain, saved = _pair(family, TOKENS, mode=mode, n_probes=8, chunk_size=5)
    _assert_equal(plain, saved, TOL64)
    assert plain.full.abs().max() > 0


@pytest.mark.parametrize(("layer", "wrt", "target_pos"), [(0, 0, -1), (1, 1, 5), ("final", 1, -1), (2, 0, 7)])
@pytest.mark.parametrize("mode", ["exact", "frozen"])
def test_checkpointed_layers_inputs_and_positions(layer, wrt, target_pos, mode):
    model = build("llama_gqa")
    plain, saved = _pair(model, TOKENS, mode=mode, layer=layer, wrt=wrt, target_pos=target_pos, chunk_size=7)
    _assert_equal(plain, saved, TOL64)
    assert saved.n_tokens == (target_pos % len(TOKENS)) + 1


@pytest.mark.parametrize("name", params(["gpt2", "llama_gqa", "gemma2_post_norm", "moe_mixtral"]))
@pytest.mark.parametrize("mode", MODES)
def test_checkpointed_equals_plain_in_float32(name, mode):
    model = build(name).to(torch.float32)
    model.cfg.dtype = torch.float32
    plain, saved = _pair(model, TOKENS, mode=mode, n_probes=8)
    for kind in ("spectral", "frobenius", "l1"):
        if getattr(plain, kind) is not None:
            torch.testing.assert_close(getattr(saved, kind), getattr(plain, kind), rtol=1e-5, atol=0)


def test_auto_mode_takes_the_smaller_estimate_and_plain_when_asked():
    model = tiny_model(n_layers=4, n_heads=2, d_model=16, d_vocab=40, dtype=torch.float64, seed=3)
    tokens = torch.randint(0, 40, (24,), generator=torch.Generator().manual_seed(0))
    plain_bytes = estimate_memory(model, 24, 16)
    saved_bytes = estimate_memory(model, 24, 16, checkpoint=True)
    assert saved_bytes < plain_bytes
    roomy = jacobian(model, tokens, max_memory_bytes=plain_bytes)  # both fit: the smaller is taken
    tight = jacobian(model, tokens, max_memory_bytes=(plain_bytes + saved_bytes) // 2)
    plain = jacobian(model, tokens, max_memory_bytes=plain_bytes, checkpoint=False)
    assert roomy.provenance["checkpoint"] is True and tight.provenance["checkpoint"] is True
    assert plain.provenance["checkpoint"] is False
    assert tight.provenance["estimated_bytes"] <= (plain_bytes + saved_bytes) // 2
    torch.testing.assert_close(roomy.spectral, plain.spectral, **TOL64)
    torch.testing.assert_close(tight.spectral, plain.spectral, **TOL64)


def test_refusal_names_checkpointed_mode_and_the_largest_prompt_that_fits():
    model = tiny_model(n_layers=4, n_heads=2, d_model=16, d_vocab=40, dtype=torch.float64, seed=3, n_ctx=64)
    tokens = torch.randint(0, 40, (40,), generator=torch.Generator().manual_seed(1))
    budget = estimate_memory(model, 30, 1, checkpoint=True)  # 30 tokens fit checkpointed, 40 do not
    with pytest.raises(MemoryError) as err:
        jacobian(model, tokens, max_memory_bytes=budget)
    message = str(err.value)
    assert "\n" not in message and "even checkpointed" in message and "40 tokens" in message
    largest = int(re.search(r"the largest prompt that fits is (\d+) tokens", message).group(1))
    assert largest >= 30
    fits = jacobian(model, tokens[:largest], max_memory_bytes=budget)
    assert fits.provenance["checkpoint"] is True and fits.provenance["chunk_size"] >= 1
    with pytest.raises(MemoryError, match="even checkpointed"):
        jacobian(model, tokens[: largest + 1], max_memory_bytes=budget)
    # plain asked for explicitly: the refusal says what checkpoint=True would need
    plain_budget = estimate_memory(model, 30, 1, checkpoint=True) + 1
    with pytest.raises(MemoryError, match=r"checkpoint=True needs about [\d.]+ [KMG]iB"):
        jacobian(model, tokens[:30], max_memory_bytes=plain_budget, checkpoint=False)


def test_checkpoint_argument_is_checked():
    with pytest.raises(ValueError, match="checkpoint"):
        jacobian(build("gpt2"), TOKENS, checkpoint="yes")


@pytest.mark.parametrize("checkpoint", [False, True])
def test_vjp_chunks_show_a_progress_bar_unless_silenced(monkeypatch, capsys, checkpoint):
    from lens_squash.core.progress import silenced
    from lens_squash.edge import gradient as gradient_module

    monkeypatch.setenv("LENS_SQUASH_PROGRESS", "1")
    monkeypatch.setattr(gradient_module, "PROGRESS_DELAY_S", 0.0)
    model = build("gpt2")
    jacobian(model, TOKENS, chunk_size=8, checkpoint=checkpoint)
    assert "Jacobian backward chunks" in capsys.readouterr().err
    with silenced():
        jacobian(model, TOKENS, chunk_size=8, checkpoint=checkpoint)
    assert "Jacobian backward chunks" not in capsys.readouterr().err


def _profiled_peak_bytes(fn) -> int:
    """Peak bytes of live CPU tensors during ``fn()``, from the profiler's allocation records."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    live = peak = 0
    for event in events:
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("n", [6, 24])
def test_checkpointed_terms_count_the_tensors_the_sweep_keeps(n):
    from lens_squash.edge.backward import without_parameter_grads
    from lens_squash.edge.checkpoint import head_cotangents, run_block, store_block_inputs
    from lens_squash.edge.jacobian_memory import checkpoint_terms

    model = build("llama_gqa")
    tokens = torch.randint(0, model.cfg.d_vocab, (n,), generator=torch.Generator().manual_seed(1))
    layers, rows = model.cfg.n_layers, 8
    terms = checkpoint_terms(model.cfg, n, layers, rows)
    stored = store_block_inputs(model, tokens, 0, layers - 1)
    kept = [*stored.resid.values(), stored.top]
    assert terms["stored"] == sum(t.numel() for t in kept)
    probes = torch.randn(rows, model.cfg.d_model, dtype=model.cfg.dtype)
    grads = head_cotangents(model, stored.top, n - 1, probes, final=True, frozen=False)
    assert terms["cotangents"] == terms["norm_temporary"] == grads.numel()
    # one recomputed block's saved graph (its weight copies included) is inside the block term
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes() // t.element_size()
        return t

    v = stored.resid[1].clone().requires_grad_(True)
    with (
        without_parameter_grads(model),
        torch.enable_grad(),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
    ):
        run_block(model, 1, stored.calls[1], v)
    assert 0 < sum(saved.values()) <= terms["block"]


def test_checkpointed_estimate_covers_the_allocated_peak():
    model = build("llama_gqa")
    tokens = torch.randint(0, model.cfg.d_vocab, (24,), generator=torch.Generator().manual_seed(2))
    for chunk in (1, 4):

        def call(chunk=chunk):
            jacobian(model, tokens, mode="sketch", n_probes=8, chunk_size=chunk, checkpoint=True)

        peak = _profiled_peak_bytes(call)
        estimate = estimate_memory(model, 24, chunk, "sketch", n_probes=8, checkpoint=True)
        assert 0 < peak <= estimate
