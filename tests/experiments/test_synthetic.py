"""Toy decoders of Appendix C.3/C.4 and the counting invariance of Prop. 6.1 / B.9."""

from __future__ import annotations

import math

import pytest
import torch

from lens_squash.edge.models import tiny_model
from lens_squash.experiments.collapse import longest_distinguishable_run
from lens_squash.experiments.synthetic import (
    ENCODINGS,
    pe_collapse,
    ratio_invariance,
    sinusoidal_table,
    toy_decoder,
    toy_weights,
)


def test_toy_decoder_matches_the_papers_setting():
    # a HookedTransformer on TransformerLens 3, a bridge over its transformers twin on TransformerLens 4
    model = toy_decoder("sinusoidal", n_ctx=64, seed=1).requires_grad_(False)
    assert (model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_model, model.cfg.d_head) == (1, 1, 64, 64)
    # Vaswani's table, independently: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(...)
    p, i = 7, 5
    assert math.isclose(float(model.pos_embed.W_pos[p, 2 * i]), math.sin(p / 10000 ** (2 * i / 64)), rel_tol=1e-12)
    assert math.isclose(float(model.pos_embed.W_pos[p, 2 * i + 1]), math.cos(p / 10000 ** (2 * i / 64)), rel_tol=1e-12)
    assert sinusoidal_table(4, 8).shape == (4, 8)
    # queries of LayerNorm-ed inputs have variance ≈ 1/d
    tokens = torch.randint(512, (1, 64), generator=torch.Generator().manual_seed(0))
    _, cache = model.run_with_cache(tokens)
    assert 0.5 / 64 < float(cache["blocks.0.attn.hook_q"].var()) < 2.0 / 64
    # attention only: the block adds the attention output and nothing else (the twin's MLP adds exactly 0)
    resid = cache["blocks.0.hook_resid_pre"] + cache["blocks.0.hook_attn_out"]
    assert torch.equal(cache["blocks.0.hook_resid_post"], resid)
    assert float(toy_decoder("nope", n_ctx=8).pos_embed.W_pos.abs().max()) == 0.0
    with pytest.raises(ValueError, match="unknown positional encoding"):
        toy_decoder("xpos")


def _layer_norm(x):
    x = x - x.mean(-1, keepdim=True)
    return x / (x.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()


def _rotate(x, positions):
    """RoPE over all of d_head, NeoX's halves: angle p · 10000^(-2i/d) on coordinates (i, i + d/2)."""
    half = x.shape[-1] // 2
    angles = positions[:, None] * 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
    cos, sin = angles.cos().repeat(1, 2), angles.sin().repeat(1, 2)
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def _reference_toy(encoding, weights, tokens):
    """The paper's one-layer, one-head, attention-only decoder written out in plain float64 torch."""
    n = tokens.shape[-1]
    positions = torch.arange(n, dtype=torch.float64)
    x = weights["embed.W_E"][tokens] + weights.get("pos_embed.W_pos", torch.zeros(n, 1))[:n]
    h = _layer_norm(x)
    q, k, v = (h @ weights[f"blocks.0.attn.{w}"][0] for w in ("W_Q", "W_K", "W_V"))
    if encoding == "rotary":
        q, k = _rotate(q, positions), _rotate(k, positions)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if encoding == "alibi":  # one head: slope 2^-8, a linear penalty on the distance to the key
        scores = scores - 2.0**-8 * (positions[:, None] - positions[None, :])
    scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
    y = _layer_norm(x + scores.softmax(-1) @ v @ weights["blocks.0.attn.W_O"][0])
    return y, y @ weights["unembed.W_U"]


#: float64 on the transformers twins: NeoX computes its RoPE frequencies in float32 and MPT (like TL 4.3's
#: MPT bridge) its softmax in float32; every other path agrees to float64 rounding
_TOLERANCE = {"rotary": 1e-7, "alibi": 1e-6}


@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_toy_decoder_computes_the_one_layer_model_written_out(encoding):
    """Both TransformerLens lines build, from the same seeded draws, the function written out by hand."""
    tokens = torch.randint(32, (2, 30), generator=torch.Generator().manual_seed(3))
    model = toy_decoder(encoding, d_model=16, d_vocab=32, n_ctx=40, seed=1)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    weights = toy_weights(encoding, d_model=16, n_layers=1, d_vocab=32, n_ctx=40, seed=1)
    y, ref_logits = _reference_toy(encoding, weights, tokens)
    tol = _TOLERANCE.get(encoding, 1e-12)
    torch.testing.assert_close(cache["ln_final.hook_normalized"], y, rtol=0, atol=tol)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=10 * tol)
    assert float((y[0, 1:] - y[1, 1:]).abs().max()) > 1e-2  # the tokens matter: not a constant function


@pytest.mark.hooked  # both kinds of model in one process: TransformerLens 3 has the bridge too
@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_toy_decoder_is_one_function_on_both_backends(monkeypatch, encoding):
    """The HookedTransformer and the bridge over its transformers twin, built from the same draws, agree."""
    from lens_squash.edge import tiny

    tokens = torch.randint(32, (2, 30), generator=torch.Generator().manual_seed(4))
    names = ("ln_final.hook_normalized", "blocks.0.attn.hook_pattern", "blocks.0.hook_attn_out")
    outputs = []
    for hooked in (True, False):
        monkeypatch.setattr(tiny, "has_hooked_transformer", lambda hooked=hooked: hooked)
        model = toy_decoder(encoding, d_model=16, d_vocab=32, n_ctx=40, seed=2)
        assert type(model).__name__ == ("HookedTransformer" if hooked else "TransformerBridge")
        with torch.no_grad():
            logits, cache = model.run_with_cache(tokens)
        outputs.append([logits, *(cache[n] for n in names)])
    tol = _TOLERANCE.get(encoding, 1e-12)
    for ours, theirs in zip(*outputs, strict=True):
        torch.testing.assert_close(theirs, ours, rtol=0, atol=10 * tol)


@pytest.mark.slow
def test_synthetic_collapse_distance_falls_with_length_averaged_over_seeds():
    lengths = [2, 16, 128]
    result = pe_collapse(lengths, seeds=3, site="attn_out", d_model=32)
    means = result.distances.mean(1)  # [encoding, length]
    # Lemma B.2 / Thm B.3: the attention output of the last token collapses for every encoding
    assert (means[:, -1] < means[:, 0] / 10).all(), result.summary()
    # residual stream: relative encodings collapse too; absolute ones keep p_{n+1} − p_n (no decay)
    resid = pe_collapse(lengths, ("nope", "rotary", "sinusoidal"), seeds=2, site="resid_post", d_model=32)
    m = resid.distances.mean(1)
    assert (m[:2, -1] < m[:2, 0] / 10).all() and m[2, -1] > m[2, 0] / 3
    import numpy as np

    # per encoding the figure draws the mean over seeds and its ±1 std band (the band's foot clipped
    # to stay on the log axis)
    drawn = {t.name: np.asarray(t.y, dtype=float) for t in result.plot().data}
    assert len(drawn) == 3 * len(ENCODINGS)
    for i, name in enumerate(result.encodings):
        runs = result.distances[i].double().numpy()  # [seed, length]
        mean, std = runs.mean(0), runs.std(0)
        np.testing.assert_allclose(drawn[name], mean, rtol=1e-6)
        np.testing.assert_allclose(drawn[f"{name} +std"], mean + std, rtol=1e-5)
        lower = mean - std
        np.testing.assert_allclose(drawn[f"{name} −std"][lower > 0], lower[lower > 0], rtol=1e-4)
    assert set(result.to_dict()) >= {"encodings", "distances", "lengths"}
    with pytest.raises(ValueError, match="site"):
        pe_collapse([2], site="logits")


@pytest.mark.hooked
def test_ratio_invariance_exact_for_bidirectional_nope():
    model = tiny_model(
        n_layers=2, n_heads=2, d_model=16, d_vocab=8, causal=False, positional="none", dtype=torch.float64, seed=2
    )
    result = ratio_invariance(model, multiples=(1, 2, 3, 5))
    assert result.invariant() and result.distances.max() < 1e-14  # float rounding only


@pytest.mark.parametrize(
    "causal, positional",
    [
        (True, "none"),  # a GPT-2 twin with zero position embeddings on TransformerLens 4
        pytest.param(False, "standard", marks=pytest.mark.hooked),  # bidirectional: no transformers twin
        pytest.param(False, "rotary", marks=pytest.mark.hooked),
    ],
)
def test_ratio_invariance_broken_by_causal_mask_or_positions(causal, positional):
    model = tiny_model(
        n_layers=2, n_heads=2, d_model=16, d_vocab=8, causal=causal, positional=positional, dtype=torch.float64, seed=2
    )
    result = ratio_invariance(model, multiples=(1, 2, 3))
    assert not result.invariant() and result.distances[1:].min() > 1e-4
    assert "Prop. B.9" in result._repr_html_()


@pytest.mark.slow
@pytest.mark.parametrize(
    "shape",
    [
        pytest.param({"norm": "RMS", "attn_only": True}, marks=pytest.mark.hooked, id="attn_only-RMS"),  # no twin
        pytest.param({"norm": "LN"}, id="LN-with-MLP"),  # a GPT-2 twin with zero positions on TransformerLens 4
    ],
)
def test_longest_distinguishable_run_is_where_equality_starts(shape):
    model = tiny_model(
        n_layers=1, n_heads=1, d_model=16, n_ctx=320, tokenizer="smollm2", positional="none", dtype=torch.float32,
        seed=0, **shape,
    )  # fmt: skip
    longest, curve = longest_distinguishable_run(model, ("float32", "bfloat16"), max_len=300, chat=False)
    for d, name in enumerate(curve.dtypes):
        n = longest[name]
        equal = curve.distances[d, :, -1, 0] == 0
        assert not equal[:n].any()  # every run up to n is told apart from one more one
        assert n == 300 or equal[n]  # and n + 1 ones get the same y as n + 2
    assert longest["bfloat16"] < 300 and longest["bfloat16"] < longest["float32"]
