"""Long prompts: the streamed analysis (patterns never kept whole) equals the whole-pattern one.

Every number of ``analyze(..., jacobian_mode=None)`` — each default bound row, the spectral report
and the sink curves — is computed both ways on every architecture family of ``tests/families.py``
and compared; a trace read from a TransformerLens ``ActivationCache`` equals a fresh one; bad input
(a cache without the hooks, a prompt that will not fit, a hook that changes the second pass) is
refused in one line that says what to do.
"""

from __future__ import annotations

import math

import pytest
import torch

from lens_squash.edge.backends import is_bridge
from lens_squash.edge.models import TINY_MODEL, load_model
from lens_squash.edge.stream import (
    analysis_memory,
    check_fits,
    recompute_patterns,
    softmax_after_scores,
    stream_bounds,
)
from lens_squash.edge.trace import KEEP_PATTERNS_BYTES, keeps_patterns, patterns_bytes, trace
from lens_squash.experiments.analysis import analyze

from ..families import FAMILIES, REFUSED, TOKENS, build, params, sweep

CAUSAL = [name for name in FAMILIES if name not in REFUSED]
#: every family (on TransformerLens 4: the bridge twins), and the tiny-random bridge
STREAMED = [*params(CAUSAL), "tiny_random_bridge"]


def _model(family: str):
    if family == "tiny_random_bridge":
        return load_model(TINY_MODEL, backend="bridge", dtype=torch.float64, n_ctx=64)
    return build(family)


SPECTRAL_FIELDS = (
    "spectrum",
    "second_eigenvalue",
    "multiplicity",
    "two_nonzeros",
    "dobrushin",
    "cumulative_dobrushin",
    "rollout_mass",
    "rank_one_distance",
)
SINK_CURVES = (
    "mean_first_token_attention",
    "sink_rate",
    "mixing",
    "first_token_norm",
    "norm_ratio",
    "entropy",
    "anisotropy",
    "rollout_mass",
    "dobrushin",
)


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> None:
    if a.dtype.is_floating_point:
        torch.testing.assert_close(b, a, rtol=rtol, atol=0, equal_nan=True)
    else:
        assert torch.equal(a, b)


# every causal family is a conformance sweep; test-fast keeps a LayerNorm, an RMSNorm/GQA, a sandwich-norm
# family and the tiny-random bridge
@pytest.mark.parametrize(
    "family", [*sweep(CAUSAL, fast=("gpt2", "llama_gqa", "gemma2_post_norm")), "tiny_random_bridge"]
)
def test_streamed_analysis_equals_the_whole_pattern_one(family):
    model = _model(family)
    whole = analyze(model, TOKENS, jacobian_mode=None, keep_patterns=True)
    streamed = analyze(model, TOKENS, jacobian_mode=None, keep_patterns=False)
    assert whole.trace.patterns is not None and streamed.trace.patterns is None
    assert streamed.skipped == whole.skipped and set(streamed.bounds) == set(whole.bounds)
    for name, bound in whole.bounds.items():  # the same arithmetic layer by layer: equal to rounding
        _close(bound.bound, streamed.bounds[name].bound, rtol=1e-12)
        assert streamed.bounds[name].constant == bound.constant
    if whole.spectral is None:
        assert streamed.spectral is None
    else:
        for name in SPECTRAL_FIELDS:
            _close(getattr(whole.spectral, name), getattr(streamed.spectral, name), rtol=1e-12)
        assert streamed.spectral.depth_to_first_token == whole.spectral.depth_to_first_token
    for name in SINK_CURVES:
        a, b = getattr(whole.sinks, name), getattr(streamed.sinks, name)
        assert (a is None) == (b is None)
        if a is not None:
            _close(a, b, rtol=1e-12)
    assert streamed.sinks.phases == whole.sinks.phases and streamed.sinks.massive_range == whole.sinks.massive_range
    for key, value in whole.sinks.correlations.items():
        other = streamed.sinks.correlations[key]
        assert (math.isnan(value) and math.isnan(other)) or other == pytest.approx(value, rel=1e-9, abs=1e-12)
    assert streamed.trace.attention_check.defects == whole.trace.attention_check.defects
    torch.testing.assert_close(streamed.trace.mean_first_token_attention(), whole.trace.mean_first_token_attention())


def test_stream_bounds_of_another_target_and_every_variant_match_path_bound():
    from lens_squash.algebra.variants import VARIANTS, path_bound

    model = build("llama_gqa")
    whole = trace(model, TOKENS, lipschitz=True, keep_patterns=True, keep_resid=True)
    streamed = trace(model, TOKENS, lipschitz=True, keep_patterns=False)
    rows = stream_bounds(model, streamed, list(VARIANTS), target_pos=5)
    for name in VARIANTS:
        expected = path_bound(whole, name, model=model, target_pos=5).bound
        torch.testing.assert_close(rows[name].bound, expected, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="keep_patterns=True"):
        rows["rollout"].flows()  # the streamed graph has rows, not edges
    with pytest.raises(ValueError, match="stream_bounds"):
        path_bound(streamed, "rollout")


@pytest.mark.parametrize("family", STREAMED)
def test_recomputed_patterns_are_the_traced_ones(family):
    """Bit for bit, on every family (local windows, soft caps, ALiBi, learned sinks, …), whether the
    softmax is taken after ``hook_attn_scores`` or the block runs on to ``hook_pattern``."""
    from lens_squash.edge.stream import _shortformer_embed

    model = _model(family)
    whole = trace(model, TOKENS, keep_patterns=True)
    streamed = trace(model, TOKENS, keep_patterns=False)
    embed = _shortformer_embed(model, streamed.tokens)  # shortformer adds positions inside every block
    for layer in range(model.cfg.n_layers):
        assert torch.equal(recompute_patterns(model, streamed, layer, shortformer=embed), whole.patterns[layer])


@pytest.mark.hooked  # the shortcut is TransformerLens 3's own attention; a bridge always reruns the model
def test_the_softmax_shortcut_applies_only_where_it_is_exact():
    assert softmax_after_scores(build("llama_gqa"), 0)  # TransformerLens's plain attention
    assert not softmax_after_scores(build("gpt_oss_sinks"), 0)  # learned sinks change the softmax
    model = build("gpt2")
    halve = lambda value, hook: value * 0.5  # noqa: E731 - a user's edit of the patterns
    model.add_hook("blocks.0.attn.hook_pattern", halve)
    try:
        assert not softmax_after_scores(model, 0) and softmax_after_scores(model, 1)
        edited = trace(model, TOKENS, keep_patterns=True).patterns[0]
        streamed = trace(model, TOKENS, keep_patterns=False)
        assert torch.equal(recompute_patterns(model, streamed, 0), edited)  # the user's hook ran again
    finally:
        model.reset_hooks()


@pytest.mark.hooked  # the shortcut (softmax_after_scores) is never taken on a bridge
def test_nan_patterns_are_zeroed_as_transformer_lens_does():
    """A NaN input position makes NaN scores: the shortcut zeroes the NaN entries exactly as
    TransformerLens's ``where(isnan(pattern), 0, pattern)`` does."""
    from dataclasses import replace

    from lens_squash.edge.stream import _run_until

    model = build("llama_gqa")
    streamed = trace(model, TOKENS, keep_patterns=False)
    resid = streamed.resid.clone()
    resid[1, 3] = float("nan")
    poisoned = replace(streamed, resid=resid)
    assert softmax_after_scores(model, 1)
    shortcut = recompute_patterns(model, poisoned, 1)
    through = _run_until(model, poisoned, 1, "hook_pattern", None)[0]
    assert torch.isnan(through).sum() == 0 and (through[:, 3] == 0).all()  # the poisoned query's rows
    assert torch.equal(shortcut, through)


def test_a_hook_that_changes_the_second_pass_is_refused():
    model = build("gpt2")
    calls = {"n": 0}

    def drift(value, hook):  # a stateful edit: different on every call
        calls["n"] += 1
        return value * (1.0 + 0.1 * calls["n"])

    model.add_hook("blocks.1.hook_resid_pre", drift)
    try:
        if is_bridge(model):  # the adapter's first passes over a bridge see it (not as "non-causal")
            with pytest.raises(RuntimeError, match=r"two identical forward passes .*reset_hooks\(\)"):
                trace(model, TOKENS, keep_patterns=False)
            return
        streamed = trace(model, TOKENS, keep_patterns=False)
        with pytest.raises(RuntimeError, match="different patterns"):
            stream_bounds(model, streamed, ["rollout"])
    finally:
        model.reset_hooks()


def test_trace_from_an_activation_cache_equals_a_fresh_trace():
    model = build("moe_mixtral")
    fresh = trace(model, TOKENS, lipschitz=True, keep_resid=True)
    _, cache = model.run_with_cache(TOKENS[None])
    cached = trace(model, TOKENS, lipschitz=True, keep_resid=True, cache=cache)
    for name in ("patterns", "ln1_scale", "ln2_scale", "final_scale", "resid", "value_norms", "mlp_gain", "y_last"):
        assert torch.equal(getattr(cached, name), getattr(fresh, name)), name
    torch.testing.assert_close(cached.last_logits, fresh.last_logits, rtol=0, atol=1e-12)
    assert cached.predicted_token == fresh.predicted_token
    _, partial = model.run_with_cache(TOKENS[None], names_filter=lambda name: "hook_pattern" in name)
    with pytest.raises(ValueError, match=r"lacks 15 hook\(s\) .*blocks\.0\.hook_resid_pre"):
        trace(model, TOKENS, cache=partial)
    with pytest.raises(ValueError, match="positions"):
        trace(model, TOKENS[:5], cache=cache)


def test_the_default_keeps_patterns_only_while_they_fit():
    model = build("gpt2")
    n = int(math.isqrt(KEEP_PATTERNS_BYTES // (8 * model.cfg.n_layers * (model.cfg.n_heads + 1))))
    assert patterns_bytes(model, n) <= KEEP_PATTERNS_BYTES < patterns_bytes(model, n + 1)
    assert keeps_patterns(model, n, keep_patterns=None) and not keeps_patterns(model, n + 1, keep_patterns=None)
    assert not keeps_patterns(model, 4, keep_patterns=False) and keeps_patterns(model, 10**6, keep_patterns=True)
    assert trace(model, TOKENS).patterns is not None  # a short prompt keeps them by default
    # blocks that cannot be rerun alone (a TransformerBridge's) keep their patterns whatever the length
    bridge_like = type("Bridge", (), {"cfg": model.cfg, "blocks": [torch.nn.Identity()]})()
    assert keeps_patterns(bridge_like, 10**5, keep_patterns=None) and not keeps_patterns(
        model, 10**5, keep_patterns=None
    )


def test_a_prompt_that_will_not_fit_is_refused_with_the_longest_that_does():
    model = build("gpt2")
    parts = analysis_memory(model, 4096, keep_patterns=False)
    need = sum(v for k, v in parts.items() if k != "weights")
    with pytest.raises(MemoryError) as caught:
        check_fits(model, 4096, keep_patterns=False, available=need // 4)
    message = str(caught.value)
    assert "\n" not in message and f"{need / 2**30:.1f} GiB" in message
    fits = int(message.rsplit("about ", 1)[1].split()[0])
    assert 0 < fits < 4096
    check_fits(model, fits, keep_patterns=False, available=need // 4)  # the named length does fit
    with pytest.raises(MemoryError):
        check_fits(model, fits + 1, keep_patterns=False, available=need // 4)
    # streaming grows as H·n², keeping the patterns as L·H·n²
    assert analysis_memory(model, 4096, keep_patterns=True)["patterns"] == patterns_bytes(model, 4096)


def test_a_streamed_analysis_renders_its_report_and_says_what_it_did_not_draw():
    from lens_squash.views.report import analysis_sections

    model = build("gpt2")
    streamed = analyze(model, TOKENS, jacobian_mode=None, keep_patterns=False)
    sections = {section.title: section for section in analysis_sections(streamed)}
    assert "keep_patterns=True" in sections["attention"].text and not sections["attention"].figures
    assert "keep_patterns=True" in sections["paths"].text
    assert sections["spectral"].figures and sections["sinks"].figures


def test_the_gram_cache_stays_within_its_budget_and_changes_no_gain(monkeypatch):
    import lens_squash.edge.lipschitz as lipschitz

    model = build("llama_gqa")
    lipschitz._GRAMS.clear()  # earlier tests' models (SmolLM2: 75 MB a layer) may still be cached
    first = trace(model, TOKENS, lipschitz=True).mlp_gain
    n_layers = model.cfg.n_layers
    assert len(lipschitz._GRAMS) == n_layers  # one Gram per layer, all alike in size
    one_layer = lipschitz._cached_bytes() // n_layers
    lipschitz._GRAMS.clear()
    monkeypatch.setattr(lipschitz, "GRAM_CACHE_BYTES", one_layer)  # room for one layer's Gram
    again = trace(model, TOKENS, lipschitz=True).mlp_gain
    assert lipschitz._cached_bytes() <= one_layer and len(lipschitz._GRAMS) == 1
    assert torch.equal(again, first) and torch.equal(trace(model, TOKENS, lipschitz=True).mlp_gain, first)


def test_analyze_refuses_before_any_work_when_the_estimate_exceeds_free_memory(monkeypatch):
    import lens_squash.edge.jacobian_memory as jacobian_memory
    import lens_squash.edge.trace as trace_module

    model = build("gpt2")
    monkeypatch.setattr(jacobian_memory, "available_memory", lambda device="cpu": 1000)
    monkeypatch.setattr(trace_module, "_run", lambda *a, **k: pytest.fail("the model ran for a refused length"))
    with pytest.raises(MemoryError, match=r"needs about .* GiB but .* is free on cpu; the longest prompt that fits"):
        analyze(model, TOKENS, jacobian_mode=None)
