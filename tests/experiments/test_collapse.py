"""Representational collapse: prompt families, the prefix and batching tricks, dtypes, windows."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest
import torch

from lens_squash.edge.models import format_prompt, is_bridge, tiny_model
from lens_squash.edge.trace import trace
from lens_squash.experiments.collapse import (
    FAMILIES,
    CollapseFamily,
    collapse_curve,
    family_pairs,
    format_summary,
    measure_pairs,
    model_in_dtype,
    window_hooks,
)
from lens_squash.experiments.collapse_windows import window_sweep

# Appendix C.1 of the paper, typed out independently of lens_squash.experiments.tasks (quirks included).
PAPER_COUNT = (
    "Please count the number of ones in the following sequence:{seq}. Please give the answer on the final "
    "line exactly as ’The final answer to your maths question is: xxxx’, where ’xxxx is your answer."
)
PAPER_COPY = (
    "Consider the following sequence: {seq}. What is the last digit in this sequence? Please answer exactly "
    "as ‘The answer to your question is: <ANSWER>’"
)


@pytest.fixture(scope="module")
def rotary():
    return tiny_model(
        n_layers=2,
        n_heads=2,
        d_model=16,
        n_ctx=160,
        tokenizer="smollm2",
        positional="rotary",
        norm="RMS",
        dtype=torch.float64,
        seed=3,
    )


@pytest.fixture(scope="module")
def absolute():
    return tiny_model(
        n_layers=2,
        n_heads=2,
        d_model=16,
        n_ctx=160,
        tokenizer="smollm2",
        positional="standard",
        norm="LN",
        dtype=torch.float64,
        seed=4,
    )


def _brute(model, tokens: torch.Tensor) -> torch.Tensor:
    """Every site's last-token vector from a separate, unpadded, unhooked-by-us forward pass."""
    _, cache = model.run_with_cache(tokens[None])
    n_layers = model.cfg.n_layers
    sites = [cache[f"blocks.{layer}.hook_resid_pre"][0, -1] for layer in range(n_layers)]
    post = cache[f"blocks.{n_layers - 1}.hook_resid_post"][0, -1]
    return torch.stack(sites + [post, model.ln_final(post)]).double()


def _brute_distances(model, s, s_star):
    return torch.stack(
        [
            torch.linalg.vector_norm(_brute(model, a) - _brute(model, b), ord=float("inf"), dim=-1)
            for a, b in zip(s, s_star, strict=True)
        ]
    )


def test_family_texts_are_the_papers_verbatim(rotary):
    tok = rotary.tokenizer
    for name, template, seq, seq_star in [
        ("count_ones", PAPER_COUNT, "111", "1111"),
        ("random_digits", PAPER_COUNT, None, None),
        ("copy_ones", PAPER_COPY, "111", "1111"),
        ("copy_ones_commas", PAPER_COPY, "111,111,1", "111,111,11"),
    ]:
        assert FAMILIES[name].template == template and template.count("{seq}") == 1
        n = 7 if name == "copy_ones_commas" else 3
        s, s_star, _ = family_pairs(rotary, name, [n], chat=False)
        if seq is None:  # random digits: the paper's text around n digits ending in 1, and s* adds a 1
            before, after = template.split("{seq}")
            text, text_star = tok.decode(s[0]), tok.decode(s_star[0])
            seq, seq_star = (
                text[len(before) : len(text) - len(after)],
                text_star[len(before) : len(text_star) - len(after)],
            )
            assert len(seq) == n and seq.isdigit() and seq.endswith("1") and seq_star == seq + "1"
        assert tok.decode(s[0]) == template.format(seq=seq)
        assert tok.decode(s_star[0]) == template.format(seq=seq_star)
        # With the chat template the tokens are exactly what format_prompt gives the model.
        s_chat, _, _ = family_pairs(rotary, name, [n], chat=True)
        assert s_chat[0].tolist() == format_prompt(rotary, tok.decode(s[0]), chat=True).tolist()


def test_random_digits_end_in_one_then_one_one(rotary):
    s, s_star, exact = family_pairs(rotary, "random_digits", [12], chat=False, open_ended=True)
    text, text_star = rotary.tokenizer.decode(s[0]), rotary.tokenizer.decode(s_star[0])
    digits = text.split("sequence:")[1]
    assert len(digits) == 12 and digits.isdigit() and digits.endswith("1")
    assert text_star == text + "1" and exact == (True,)


def test_comma_family_marks_which_pairs_are_exact_repeats(rotary):
    _, _, exact = family_pairs(rotary, "copy_ones_commas", [4, 5, 6], chat=False)
    assert exact == (True, True, False)  # 6 -> 7 ones adds ",1"


@pytest.mark.parametrize("model_name", ["rotary", "absolute"])
@pytest.mark.parametrize("open_ended", [True, False])
def test_shared_passes_equal_separate_passes(model_name, open_ended, request):
    """The prefix trick (open_ended) and right-padded batching (text after the sequence) both give
    the distances of one separate forward pass per prompt (in float64, to rounding), for rotary and
    absolute positions; the exact path runs each distinct prompt once."""
    model = request.getfixturevalue(model_name)
    lengths = [1, 3, 8, 20]
    s, s_star, _ = family_pairs(model, "count_ones", lengths, chat=True, open_ended=open_ended)
    expected = _brute_distances(model, s, s_star)
    for exact in (True, False):
        result = collapse_curve(
            model,
            "count_ones",
            lengths,
            ("float64",),
            chat=True,
            open_ended=open_ended,
            batch_tokens=200,
            exact=exact,
            noise_samples=2,
        )
        torch.testing.assert_close(result.distances[0, :, :, 0], expected, atol=1e-12, rtol=1e-9)
        assert result.prefix_closed == open_ended
    # separate passes: one per distinct prompt (s* at length 1 is s at length 2: no sharing here)
    exact = collapse_curve(model, "count_ones", lengths, ("float64",), chat=True, open_ended=open_ended)
    assert exact.forward_tokens["float64"] == exact.naive_tokens and exact.paths == {"float64": "separate"}
    if open_ended:  # one pass over the longest prompt serves all lengths, plus the two noise lengths alone
        noise = {tuple(x.tolist()) for i in (0, len(lengths) - 1) for x in (s[i], s_star[i])}
        assert result.forward_tokens["float64"] == len(s_star[-1]) + sum(map(len, noise))
        assert result.paths == {"float64": "prefix"} and result.noise_lengths == (1, 20)


def test_batching_random_digits_equals_separate_passes(absolute):
    lengths = [2, 5, 9]
    result = collapse_curve(absolute, "random_digits", lengths, ("float64",), chat=False, batch_tokens=64, exact=False)
    s, s_star, _ = family_pairs(absolute, "random_digits", lengths, chat=False)
    torch.testing.assert_close(
        result.distances[0, :, :, 0], _brute_distances(absolute, s, s_star), atol=1e-12, rtol=1e-9
    )
    # text follows the sequence, so no prompt is a prefix of another: every prompt is its own row
    assert not result.prefix_closed and result.paths == {"float64": "separate"}  # one row per pass
    batched = collapse_curve(absolute, "random_digits", lengths, ("float64",), chat=False, exact=False)
    torch.testing.assert_close(batched.distances, result.distances, atol=1e-12, rtol=1e-9)
    assert batched.paths == {"float64": "batched"}


@pytest.mark.hooked  # tiny_model(causal=False) has no transformers twin
def test_bidirectional_models_get_separate_exact_passes():
    model = tiny_model(n_layers=1, n_heads=2, d_model=16, tokenizer="smollm2", causal=False, dtype=torch.float64)
    s = [torch.tensor([5, 6, 7]), torch.tensor([5, 6])]
    s_star = [torch.tensor([5, 6, 7, 7]), torch.tensor([5, 6, 6])]
    measured = measure_pairs(model, s, s_star)
    assert measured.n_rows == 4  # no prefix sharing: later tokens change earlier positions
    torch.testing.assert_close(measured.distances[:, :, 0], _brute_distances(model, s, s_star), atol=1e-12, rtol=1e-9)


def test_norms_heads_and_relative_distances_match_definitions(rotary):
    result = collapse_curve(rotary, "copy_ones", [4, 9], ("float64",), chat=False, open_ended=True)
    s, s_star, _ = family_pairs(rotary, "copy_ones", [4, 9], chat=False, open_ended=True)
    for i in range(2):
        a, b = _brute(rotary, s[i]), _brute(rotary, s_star[i])
        for j, p in enumerate((float("inf"), 1.0, 2.0)):
            torch.testing.assert_close(result.distances[0, i, :, j], torch.linalg.vector_norm(a - b, ord=p, dim=-1))
            torch.testing.assert_close(
                result.relative()[0, i, :, j],
                torch.linalg.vector_norm(a - b, ord=p, dim=-1) / torch.linalg.vector_norm(a, ord=p, dim=-1),
            )
        _, ca = rotary.run_with_cache(s[i][None])
        _, cb = rotary.run_with_cache(s_star[i][None])
        w_o = rotary.blocks[-1].attn.W_O
        ha = torch.einsum("hd,hdm->hm", ca["blocks.1.attn.hook_z"][0, -1], w_o)
        hb = torch.einsum("hd,hdm->hm", cb["blocks.1.attn.hook_z"][0, -1], w_o)
        torch.testing.assert_close(result.head_distances[0, i], (ha - hb).norm(dim=-1))
        # heads sum (plus b_O, which cancels) to the attention output difference
        torch.testing.assert_close(
            (ha - hb).sum(0), ca["blocks.1.hook_attn_out"][0, -1] - cb["blocks.1.hook_attn_out"][0, -1]
        )


def test_model_in_dtype_casts_parameters_and_rebuilds_buffers(rotary):
    bf16 = model_in_dtype(rotary, "bfloat16")
    assert bf16.cfg.dtype == torch.bfloat16 and rotary.cfg.dtype == torch.float64
    for (name, p), (_, q) in zip(rotary.named_parameters(), bf16.named_parameters(), strict=True):
        assert torch.equal(p.to(torch.bfloat16), q), name
    fresh = tiny_model(
        n_layers=2, n_heads=2, d_model=16, n_ctx=160, tokenizer="smollm2", positional="rotary", norm="RMS",
        dtype=torch.bfloat16, seed=3,
    )  # fmt: skip
    # every buffer (rotary tables, masks) is the one a model loaded in bfloat16 has
    buffers = dict(fresh.named_buffers())
    assert any("rotary" in name for name in buffers) or any("inv_freq" in name for name in buffers)
    for name, buffer in bf16.named_buffers():
        assert buffer.dtype == buffers[name].dtype and torch.equal(buffer, buffers[name]), name
    assert model_in_dtype(rotary, torch.float64) is rotary


def test_dtype_sweep_thresholds_and_native_mode(rotary):
    lengths = list(range(1, 60, 4))
    default = collapse_curve(
        rotary, "count_ones", lengths, ("float64", "bfloat16"), chat=False, open_ended=True, exact=False
    )
    native = collapse_curve(
        rotary, "count_ones", lengths, ("bfloat16",), chat=False, open_ended=True, native=True, exact=False
    )
    # TransformerLens hands back residuals, y and logits already in bf16: native changes none of them
    torch.testing.assert_close(native.distances[0], default.distances[1], atol=0, rtol=0)
    th = default.thresholds()
    rel = default.final("inf")
    for d, name in enumerate(default.dtypes):
        hit, resolution = th[name]["below_resolution"], default.resolutions[name]
        i = len(lengths) if hit is None else lengths.index(hit)  # None: no measured length is below
        assert (rel[d, :i] >= resolution).all(), name  # nothing before the threshold is below it
        assert hit is None or rel[d, i] < resolution, name
    # neither dtype collapses within these lengths on this model, so plant a collapse in bf16's curve
    # (tiny at lengths[7], exactly 0 at lengths[10]) and check the thresholds find exactly those lengths
    planted = default.distances.clone()
    planted[1, 7, -1, :] *= 1e-6
    planted[1, 10, -1, :] = 0
    moved = dataclasses.replace(default, distances=planted).thresholds()["bfloat16"]
    assert (moved["below_resolution"], moved["exactly_zero"]) == (lengths[7], lengths[10])
    assert (th["bfloat16"]["exactly_zero"], th["float64"]["below_resolution"]) == (None, None)
    # bf16 rounding makes the low-precision curve differ from float64
    assert not torch.equal(default.distances[0], default.distances[1])
    frame = default.summary()
    assert list(frame.index) == ["float64", "bfloat16"]
    assert default.to_dict()["thresholds"] == th
    assert "count_ones" in default._repr_html_()
    import numpy as np

    # the figures draw the result's own numbers: each dtype's distances (0 as a gap on the log axis)
    # and its resolution, and the bf16 heads' max, min and mean over heads
    fig = default.plot()
    drawn = {t.name: np.asarray(t.y, dtype=float) for t in fig.data}
    named = " ".join(a.text for a in fig.layout.annotations)
    for d, name in enumerate(default.dtypes):
        values = rel[d].double().numpy()
        np.testing.assert_array_equal(drawn[name], np.where(values == 0, np.nan, values))
        if f"{name} resolution" in drawn:  # drawn where the axis reaches it ...
            np.testing.assert_array_equal(drawn[f"{name} resolution"], [default.resolutions[name]] * 2)
        else:  # ... else named with its value (float64's 1e-16 would stretch the axis over empty decades)
            assert f"{name} {default.resolutions[name]:.1e}" in named, name
    heads = default.head_distances[1].double()
    band = [np.asarray(t.y, dtype=float) for t in default.plot("heads", "bfloat16").data]
    for got, want in zip(band, (heads.max(-1).values, heads.min(-1).values, heads.mean(-1)), strict=True):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=0)


def test_bad_inputs_get_clear_errors(rotary):
    with pytest.raises(ValueError, match="n_ctx"):
        collapse_curve(rotary, "count_ones", [200], ("float64",), chat=False)
    letters = CollapseFamily("letters", "merging BPE", "{seq}", lambda n, sep, rng: ("a" * n, "a" * (n + 1)), "-")
    with pytest.raises(ValueError, match="tokenises differently in context"):
        collapse_curve(rotary, letters, list(range(1, 12)), ("float64",), chat=False)
    with pytest.raises(ValueError, match="unknown collapse family"):
        collapse_curve(rotary, "nope", [3])
    with pytest.raises(ValueError, match="lengths"):
        collapse_curve(rotary, "count_ones", [0])


def test_window_masks_attention_and_makes_long_runs_identical(rotary):
    tokens = family_pairs(rotary, "copy_ones", [30], chat=False, open_ended=True)[0][0]
    with rotary.hooks(fwd_hooks=window_hooks(rotary.cfg.n_layers, 3)):
        tr = trace(rotary, tokens)
    q, k = torch.meshgrid(torch.arange(tr.n_tokens), torch.arange(tr.n_tokens), indexing="ij")
    assert (tr.patterns[:, :, (q - k) >= 3] == 0).all()
    torch.testing.assert_close(tr.patterns.sum(-1), torch.ones_like(tr.patterns.sum(-1)))
    # Relative positions + window w + L layers: the last token sees L(w-1)+1 tokens. Once that field
    # lies inside the run of ones, s and s* look the same to it: zero distance up to the rounding of
    # the rotary tables at different absolute positions.
    w, n_layers = 3, rotary.cfg.n_layers
    field = n_layers * (w - 1) + 1
    result = collapse_curve(
        rotary, "copy_ones", [field - 1, field, field + 5], ("float64",), chat=False, open_ended=True, window=w
    )
    d = result.final("inf")[0]
    # the rounding of the rotary tables: float64 on a HookedTransformer; a bridge's transformers twin
    # builds them in float32 even in a float64 model (measured: 1.4e-7, one float32 epsilon)
    rounding = 10 * torch.finfo(torch.float32).eps if is_bridge(rotary) else 1e-13
    assert d[0] > 1e-3 and (d[1:] < rounding).all()


@pytest.mark.slow
def test_window_sweep_reports_distance_and_bound(rotary):
    sweep = window_sweep(rotary, "count_ones", [4, 12], [None, 2, 8], chat=False, open_ended=True)
    assert sweep.distance.shape == (3, 2) and sweep.bound_first_share.shape == (3, 2)
    # full attention reproduces the plain curve
    plain = collapse_curve(rotary, "count_ones", [4, 12], ("float64",), chat=False, open_ended=True)
    torch.testing.assert_close(sweep.distance[0], plain.final("inf")[0])
    # a narrow window cuts the sink path: the rollout bound's first-token share falls at length 12
    assert sweep.bound_first_share[1, -1] < sweep.bound_first_share[0, -1]
    assert sweep.summary().shape[0] == 3
    import numpy as np

    # one curve per window, each the sweep's own bound shares
    traces = sweep.plot("bound").data
    drawn = {t.name: np.asarray(t.y, dtype=float) for t in traces}
    zeros = {t.legendgroup: np.asarray(t.x) for t in traces if "exactly 0" in t.name}
    for label, want in zip(sweep._labels(), sweep.bound_first_share.double().numpy(), strict=True):
        # a share of exactly 0 is a gap in the line and an x marker at its length
        np.testing.assert_array_equal(drawn[label], np.where(want == 0, np.nan, want))
        np.testing.assert_array_equal(zeros.get(label, np.array([], dtype=int)), np.array([4, 12])[want == 0])


# ----------------------------------------------------------------------------------------------
# Bit-level thresholds: the exact path against separate single-prompt passes


@pytest.fixture(scope="module")
def wide_heads():
    """d_head = 64 like SmolLM2: on this CPU the prefix trick is already off by float32 ulps here."""
    return tiny_model(
        n_layers=2,
        n_heads=1,
        d_model=64,
        d_head=64,
        n_ctx=200,
        tokenizer="smollm2",
        positional="rotary",
        norm="RMS",
        gated_mlp=True,
        act_fn="silu",
        dtype=torch.float32,
        seed=3,
    )


def _alone(model, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sites, y and logits of the last token from this one prompt run by itself, unpadded."""
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens[None])
        n_layers = model.cfg.n_layers
        post = cache[f"blocks.{n_layers - 1}.hook_resid_post"]
        y = model.ln_final(post)[0, -1]  # the final norm over the whole sequence, as the forward pass applies it
    sites = [cache[f"blocks.{layer}.hook_resid_pre"][0, -1] for layer in range(n_layers)] + [post[0, -1], y]
    return torch.stack(sites).double(), y, logits[0, -1]


def _first_length(lengths, flags):
    return next((n for n, f in zip(lengths, flags.tolist(), strict=True) if f), None)


def _other_dtype(family: str, open_ended: bool, dtype: str):
    return pytest.param(family, open_ended, dtype)


@pytest.mark.parametrize(
    ("family", "open_ended", "dtype"),
    [
        _other_dtype("count_ones", False, "float32"),
        _other_dtype("count_ones", False, "bfloat16"),
        _other_dtype("count_ones", False, "float16"),
        _other_dtype("count_ones", True, "bfloat16"),
        _other_dtype("random_digits", True, "float32"),
        _other_dtype("random_digits", True, "bfloat16"),
        _other_dtype("count_ones", True, "float32"),
    ],
)
def test_exact_path_equals_separate_passes_bit_for_bit(wide_heads, dtype, family, open_ended):
    """Every site's distance, the predictions and the thresholds equal those of each prompt run by
    itself — bit for bit. (On the 2-core development machine the prefix trick is off by float32 ulps
    on this model at length 90 read off the 196-token prompt of length 160: see collapse_passes.)"""
    lengths = [1, 4, 11] if not open_ended or dtype != "float32" else [1, 90, 160]
    result = collapse_curve(wide_heads, family, lengths, (dtype,), chat=True, open_ended=open_ended)
    twin = model_in_dtype(wide_heads, dtype)
    s, s_star, _ = family_pairs(wide_heads, family, lengths, chat=True, open_ended=open_ended)
    alone = [(_alone(twin, a), _alone(twin, b)) for a, b in zip(s, s_star, strict=True)]
    for i, ((sites_a, _, logits_a), (sites_b, _, logits_b)) in enumerate(alone):
        assert torch.equal(result.distances[0, i, :, 0], (sites_a - sites_b).abs().amax(-1))
        assert torch.equal(result.reference[0, i, :, 0], sites_a.abs().amax(-1))
        assert result.predictions[0, i].tolist() == [int(logits_a.argmax()), int(logits_b.argmax())]
        assert bool(result.logits_equal[0, i]) == torch.equal(logits_a, logits_b)
    eps = torch.finfo(getattr(torch, dtype)).eps
    rel = torch.tensor(
        [float((ya.double() - yb.double()).abs().max() / ya.double().abs().max()) for (_, ya, _), (_, yb, _) in alone],
        dtype=torch.float64,
    )
    zero = torch.tensor([torch.equal(ya, yb) for (_, ya, _), (_, yb, _) in alone])
    same = torch.tensor([int(la.argmax()) == int(lb.argmax()) for (_, _, la), (_, _, lb) in alone])
    th = result.thresholds()[dtype]
    assert th["below_resolution"] == _first_length(lengths, rel < eps)
    assert th["exactly_zero"] == _first_length(lengths, zero)
    assert th["same_prediction"] == _first_length(lengths, same)
    assert th["path"] == "separate" and th["noise_floor"] is None


def test_fast_path_reports_its_noise_floor_against_separate_passes(wide_heads):
    lengths = [1, 4, 90, 120, 160]  # on the development machine the prefix trick drifts at 90 here
    s, s_star, _ = family_pairs(wide_heads, "count_ones", lengths, chat=True, open_ended=True)
    for dtype in ("float32",):
        result = collapse_curve(
            wide_heads, "count_ones", lengths, (dtype,), open_ended=True, exact=False, noise_samples=3
        )
        assert result.noise_lengths == (1, 90, 160) and result.paths[dtype] == "prefix"
        twin = model_in_dtype(wide_heads, dtype)
        fast = measure_pairs(twin, s, s_star)
        gaps = []
        for i in (0, 2, 4):
            for tokens, y_fast in ((s[i], fast.y[i, 0]), (s_star[i], fast.y[i, 1])):
                y_alone = _alone(twin, tokens)[1].double()
                gaps.append(float((y_fast - y_alone).abs().max() / y_alone.abs().max()))
        assert result.noise_floor[dtype] == max(gaps)
        assert result.thresholds()[dtype]["noise_floor"] == max(gaps)
        assert result.summary().loc[dtype, "path"] == "prefix"


def _rigged(token: str):
    """A tiny model whose unembedding bias makes ``token`` the prediction after every prompt."""
    model = tiny_model(
        n_layers=1,
        n_heads=2,
        d_model=16,
        n_ctx=160,
        tokenizer="smollm2",
        positional="rotary",
        norm="RMS",
        dtype=torch.float32,
        seed=5,
    )
    with torch.no_grad():
        model.unembed.b_U[model.tokenizer.convert_tokens_to_ids(token)] = 1e4
    return model


def test_same_prediction_says_when_the_agreement_is_the_repeated_token():
    lengths = [2, 5, 9]
    trivial = collapse_curve(_rigged("1"), "count_ones", lengths, ("float32",), chat=False, open_ended=True)
    th = trivial.thresholds()["float32"]
    assert trivial.repeated_token.tolist() == [trivial.predictions[0, 0, 0].item()] * 3
    assert th["same_prediction"] == 2 and th["same_prediction_trivial"] is True
    assert th["same_nontrivial_prediction"] is None and trivial.trivial_agreement().all()
    other = collapse_curve(_rigged("7"), "count_ones", lengths, ("float32",), chat=False, open_ended=True)
    th = other.thresholds()["float32"]
    assert th["same_prediction"] == 2 and th["same_prediction_trivial"] is False
    assert th["same_nontrivial_prediction"] == 2 and not other.trivial_agreement().any()
    row = trivial.summary().loc["float32"]
    assert bool(row["same_prediction_trivial"]) and row["same_nontrivial_prediction"] is pd.NA


def test_format_summary_shows_paths_noise_and_unreached_thresholds(rotary):
    exact = collapse_curve(rotary, "count_ones", [2, 4], ("float64",), chat=False, open_ended=True)
    text = format_summary(exact)
    assert "separate" in text and "bit for bit" in text
    # float64 on a random model never collapses at length 4: the unreached lengths print as '-'
    assert exact.thresholds()["float64"]["exactly_zero"] is None
    row = next(line for line in text.splitlines() if line.startswith("float64"))
    assert " - " in row + " "
    fast = collapse_curve(rotary, "count_ones", [2, 4], ("float64",), chat=False, open_ended=True, exact=False)
    text = format_summary(fast)
    assert "prefix" in text and "noise floor" in text and "lengths 2, 4" in text
    assert exact.to_dict()["paths"] == {"float64": "separate"} and fast.to_dict()["noise_floor"]["float64"] >= 0


def test_path_arguments_are_checked(rotary):
    with pytest.raises(TypeError, match="exact must be True"):
        collapse_curve(rotary, "count_ones", [2], ("float64",), exact="yes")
    with pytest.raises(ValueError, match="noise_samples"):
        collapse_curve(rotary, "count_ones", [2], ("float64",), exact=False, noise_samples=0)


@pytest.mark.slow
def test_smollm2_bfloat16_thresholds_equal_separate_passes(smollm2):
    """The default family (count_ones, text after the run, chat template) in bfloat16: every
    threshold equals the one separate model(tokens) calls give. Consecutive lengths share prompts."""
    lengths = [30, 31, 32]
    result = collapse_curve(smollm2, "count_ones", lengths, ("bfloat16",))
    twin = model_in_dtype(smollm2, "bfloat16")
    s, s_star, _ = family_pairs(smollm2, "count_ones", lengths)
    runs = {}
    for x in list(s) + list(s_star):
        key = tuple(x.tolist())
        if key not in runs:
            with torch.no_grad():
                runs[key] = _alone(twin, x)[1:]
    pairs = [(runs[tuple(a.tolist())], runs[tuple(b.tolist())]) for a, b in zip(s, s_star, strict=True)]
    rel = torch.tensor(
        [float((ya.double() - yb.double()).abs().max() / ya.double().abs().max()) for (ya, _), (yb, _) in pairs],
        dtype=torch.float64,
    )
    torch.testing.assert_close(result.final("inf")[0], rel, rtol=0, atol=0)
    th = result.thresholds()["bfloat16"]
    eps = torch.finfo(torch.bfloat16).eps
    assert th["below_resolution"] == _first_length(lengths, rel < eps)
    assert th["exactly_zero"] == _first_length(lengths, torch.tensor([torch.equal(a[0], b[0]) for a, b in pairs]))
    same = torch.tensor([int(la.argmax()) == int(lb.argmax()) for (_, la), (_, lb) in pairs])
    assert th["same_prediction"] == _first_length(lengths, same)
    assert th["path"] == "separate" and result.forward_tokens["bfloat16"] == sum(map(len, runs))


def test_chat_none_means_the_template_when_the_tokenizer_has_one(monkeypatch):
    """One meaning of ``chat`` everywhere (issue 15): ``None`` is ``True`` with a chat template, and
    ``False`` (raw text) without one; the provenance records which was used."""
    from lens_squash.edge.models import tiny_model
    from lens_squash.experiments.collapse import collapse_curve, family_pairs

    model = tiny_model(tokenizer="smollm2", n_ctx=256, d_model=16, n_heads=2, n_layers=1, seed=0)

    def ids(**kwargs):
        return [x.tolist() for x in family_pairs(model, "count_ones", [3, 5], **kwargs)[0]]

    assert ids() == ids(chat=True) != ids(chat=False)
    assert collapse_curve(model, "count_ones", [2], ("float32",)).provenance["chat"] is True
    monkeypatch.setattr(model.tokenizer, "chat_template", None)
    assert ids() == ids(chat=False)
    assert collapse_curve(model, "count_ones", [2], ("float32",)).provenance["chat"] is False
    with pytest.raises(TypeError, match="chat must be None"):
        family_pairs(model, "count_ones", [3], chat="yes")
