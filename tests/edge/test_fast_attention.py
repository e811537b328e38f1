"""The in-place attention forward is bit-identical to TransformerLens's own, and takes over only
where it can be.

Reference: TransformerLens's ``AbstractAttention.forward`` itself, run on the same model and input.
Every hook value (scores, patterns, z), every layer's attention output and the logits are compared
with ``torch.equal`` on every architecture family of ``tests/families.py`` (float64, and float32),
on SmolLM2's shape (tiny-random) and on the real SmolLM2; NaN rows, hooks that keep the scores,
autograd and the families it must leave alone are checked too.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from lens_squash.edge import fast_attention as fast
from lens_squash.edge.fast_attention import fast_attention, fast_layers
from lens_squash.edge.models import TINY_MODEL, load_model
from lens_squash.edge.stream import recompute_patterns
from lens_squash.edge.trace import trace

from ..families import FAMILIES, TOKENS, build, sweep

pytestmark = pytest.mark.hooked

#: families whose attention TransformerLens computes in a way this module does not reproduce
KEPT = {"bloom_alibi", "olmo2_output_norms", "olmo_clip_qkv", "gpt_oss_sinks", "gpt_oss_moe_sinks"}
SITES = ("attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z", "hook_attn_out")


def _run(model, tokens, *, fast_path: bool, cache: bool = False) -> dict[str, torch.Tensor]:
    """Logits and every layer's hook values, with or without the fast forward."""
    seen: dict[str, torch.Tensor] = {}
    sites = [f"blocks.{layer}.{site}" for layer in range(model.cfg.n_layers) for site in SITES]
    sites = [s for s in sites if s in model.hook_dict and (cache or "attn_scores" not in s)]

    def keep(value, hook):
        seen[hook.name] = value.detach().clone()

    with torch.no_grad(), fast_attention(model) if fast_path else contextlib.nullcontext():
        if cache:
            logits, stored = model.run_with_cache(tokens[None])
            seen.update({name: stored[name] for name in sites})
        else:
            logits = model.run_with_hooks(tokens[None], fwd_hooks=[(s, keep) for s in sites])
    seen["logits"] = logits
    return seen


def _assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), f"{name} differs by {(a[name] - b[name]).abs().max():.3g}"


# a per-family sweep (conformance); test-fast keeps two fast-path families and two the fast path leaves alone
@pytest.mark.parametrize("family", sweep(sorted(FAMILIES), fast=("gpt2", "llama_gqa", "bloom_alibi", "olmo_clip_qkv")))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_bit_identical_on_every_family(family, dtype):
    model = build(family).to(dtype)
    tokens = TOKENS.clone()
    expected_fast = family not in KEPT
    assert bool(fast_layers(model)) == expected_fast, fast_layers(model)
    reference = _run(model, tokens, fast_path=False)
    _assert_identical(reference, _run(model, tokens, fast_path=True))
    # a hook that keeps the scores (run_with_cache) makes the softmax out of place: the cache still holds them
    _assert_identical(_run(model, tokens, fast_path=False, cache=True), _run(model, tokens, fast_path=True, cache=True))


def test_swapped_only_inside_the_block_and_restored():
    model = build("llama_gqa")
    class_forward = type(model.blocks[0].attn).forward
    with fast_attention(model) as layers:
        assert layers == [0, 1, 2]
        assert all(model.blocks[i].attn.forward.__func__ is fast._forward for i in layers)
    assert all("forward" not in vars(block.attn) for block in model.blocks)
    with pytest.raises(RuntimeError, match="boom"), fast_attention(model):
        raise RuntimeError("boom")
    assert all(
        type(block.attn).forward is class_forward and "forward" not in vars(block.attn) for block in model.blocks
    )


def test_the_fast_forward_runs_where_it_says(monkeypatch):
    """It is the fast forward that produced the equal numbers above, not a silent fallback."""
    model = build("gpt2")
    calls = []
    original = fast._masked
    monkeypatch.setattr(fast, "_masked", lambda self, scores: calls.append(1) or original(self, scores))
    _run(model, TOKENS, fast_path=True)
    assert len(calls) == model.cfg.n_layers


def test_nan_rows_are_zeroed_as_transformer_lens_does():
    model = build("gpt2")
    with torch.no_grad():
        model.blocks[1].attn.W_Q[0, 0, 0] = float("inf")  # head 0's scores become inf - inf = NaN
    reference = _run(model, TOKENS, fast_path=False)
    pattern = reference["blocks.1.attn.hook_pattern"]
    assert (pattern[0, 0] == 0).all() and not torch.isnan(pattern).any()  # TransformerLens's clean-up ran
    ours = _run(model, TOKENS, fast_path=True)
    for name in reference:
        torch.testing.assert_close(ours[name], reference[name], rtol=0, atol=0, equal_nan=True)


def test_autograd_keeps_transformer_lens_forward():
    model = build("gpt2")
    embed = model.embed(TOKENS[None]).detach().requires_grad_(True)
    with fast_attention(model):
        out = model.blocks[0](embed)
    out.sum().backward()
    reference = embed.detach().requires_grad_(True)
    model.blocks[0](reference).sum().backward()
    assert torch.equal(embed.grad, reference.grad)


def test_bridges_and_foreign_forwards_are_left_alone():
    model = build("gpt2")
    model.blocks[1].attn.forward = model.blocks[1].attn.forward  # an instance's own forward
    assert fast_layers(model) == [0, 2]
    bridge = load_model(TINY_MODEL, backend="bridge", dtype=torch.float64, n_ctx=64)
    assert fast_layers(bridge) == []


def test_smollm2_shape_and_trace_identical(monkeypatch):
    """SmolLM2's shape (tiny-random: grouped-query, rotary, RMS) in float32, and the trace read from it."""
    model = load_model(TINY_MODEL, n_ctx=256)
    tokens = torch.randint(0, model.cfg.d_vocab, (200,), generator=torch.Generator().manual_seed(0))
    assert fast_layers(model) == list(range(model.cfg.n_layers))
    _assert_identical(_run(model, tokens, fast_path=False), _run(model, tokens, fast_path=True))
    ours = trace(model, tokens, keep_patterns=True, lipschitz=True)
    monkeypatch.setattr(fast, "fast_layers", lambda model: [])
    reference = trace(model, tokens, keep_patterns=True, lipschitz=True)
    for name in ("patterns", "mean_patterns", "resid_norms", "value_norms", "mlp_gain", "last_logits", "ln1_scale"):
        assert torch.equal(getattr(ours, name), getattr(reference, name)), name


@pytest.mark.slow
def test_smollm2_bit_identical(smollm2):
    tokens = torch.randint(0, smollm2.cfg.d_vocab, (300,), generator=torch.Generator().manual_seed(1))
    assert fast_layers(smollm2) == list(range(smollm2.cfg.n_layers))
    _assert_identical(_run(smollm2, tokens, fast_path=False), _run(smollm2, tokens, fast_path=True))


def test_the_sweeps_recompute_is_bit_identical(monkeypatch):
    """The long-prompt sweep reruns each block to its scores inside ``fast_attention``: its patterns
    are the whole-pattern trace's, bit for bit, with and without the fast forward."""
    model = load_model(TINY_MODEL, n_ctx=256)
    tokens = torch.randint(0, model.cfg.d_vocab, (150,), generator=torch.Generator().manual_seed(2))
    kept = trace(model, tokens, keep_patterns=True)
    streamed = trace(model, tokens, keep_patterns=False)
    calls = []
    original = fast._masked
    monkeypatch.setattr(fast, "_masked", lambda self, scores: calls.append(1) or original(self, scores))
    ours = [recompute_patterns(model, streamed, layer) for layer in range(model.cfg.n_layers)]
    assert len(calls) == model.cfg.n_layers  # the sweep went through the fast forward
    monkeypatch.setattr(fast, "fast_layers", lambda model: [])
    reference = [recompute_patterns(model, streamed, layer) for layer in range(model.cfg.n_layers)]
    for layer in range(model.cfg.n_layers):
        assert torch.equal(ours[layer], reference[layer])
        assert torch.equal(ours[layer], kept.patterns[layer])


def test_a_hook_that_keeps_the_scores_sees_them_unchanged():
    """A forward pre-hook on ``hook_attn_scores`` holds the scores tensor itself: the softmax must not
    be written over it."""
    model = build("gpt2")
    kept = {}

    def keep(module, args):
        kept[len(kept)] = args[0]

    handles = [block.attn.hook_attn_scores.register_forward_pre_hook(keep) for block in model.blocks]
    try:
        with torch.no_grad(), fast_attention(model):
            model(TOKENS[None])
        ours, kept = dict(kept), {}
        with torch.no_grad():
            model(TOKENS[None])
    finally:
        for handle in handles:
            handle.remove()
    assert all(torch.equal(ours[i], kept[i]) for i in kept) and len(kept) == model.cfg.n_layers
