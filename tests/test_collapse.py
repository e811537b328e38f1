"""Representational collapse: prompt families, the prefix and batching tricks, dtypes, windows."""

from __future__ import annotations

import pytest
import torch

from lens_squash.collapse import (
    FAMILIES,
    CollapseFamily,
    collapse_curve,
    family_pairs,
    measure_pairs,
    model_in_dtype,
    window_hooks,
    window_sweep,
)
from lens_squash.models import format_prompt, tiny_model
from lens_squash.trace import trace

# Appendix C.1 of the paper, typed out independently of lens_squash.tasks (quirks included).
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
    return tiny_model(n_layers=2, n_heads=2, d_model=16, n_ctx=160, tokenizer="smollm2", positional="rotary",
                      norm="RMS", dtype=torch.float64, seed=3)


@pytest.fixture(scope="module")
def absolute():
    return tiny_model(n_layers=2, n_heads=2, d_model=16, n_ctx=160, tokenizer="smollm2", positional="standard",
                      norm="LN", dtype=torch.float64, seed=4)


def _brute(model, tokens: torch.Tensor) -> torch.Tensor:
    """Every site's last-token vector from a separate, unpadded, unhooked-by-us forward pass."""
    _, cache = model.run_with_cache(tokens[None])
    n_layers = model.cfg.n_layers
    sites = [cache[f"blocks.{layer}.hook_resid_pre"][0, -1] for layer in range(n_layers)]
    post = cache[f"blocks.{n_layers - 1}.hook_resid_post"][0, -1]
    return torch.stack(sites + [post, model.ln_final(post)]).double()


def _brute_distances(model, s, s_star):
    return torch.stack([
        torch.linalg.vector_norm(_brute(model, a) - _brute(model, b), ord=float("inf"), dim=-1)
        for a, b in zip(s, s_star, strict=True)
    ])


def test_family_texts_are_the_papers_verbatim(rotary):
    tok = rotary.tokenizer
    for name, template, seq, seq_star in [
        ("count_ones", PAPER_COUNT, "111", "1111"),
        ("random_digits", PAPER_COUNT, None, None),
        ("copy_ones", PAPER_COPY, "111", "1111"),
        ("copy_ones_commas", PAPER_COPY, "111,111,1", "111,111,11"),
    ]:
        assert FAMILIES[name].template == template.replace("{seq}", "{seq}")
        n = 7 if name == "copy_ones_commas" else 3
        s, s_star, _ = family_pairs(rotary, name, [n], chat=False)
        if seq is not None:
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
    the distances of one separate forward pass per prompt, for rotary and absolute positions."""
    model = request.getfixturevalue(model_name)
    lengths = [1, 3, 8, 20]
    result = collapse_curve(model, "count_ones", lengths, ("float64",), chat=True, open_ended=open_ended,
                            batch_tokens=200)
    s, s_star, _ = family_pairs(model, "count_ones", lengths, chat=True, open_ended=open_ended)
    expected = _brute_distances(model, s, s_star)
    torch.testing.assert_close(result.distances[0, :, :, 0], expected, atol=1e-12, rtol=1e-9)
    assert result.prefix_closed == open_ended
    if open_ended:  # one pass over the longest prompt serves all lengths
        assert result.forward_tokens["float64"] == len(s_star[-1])


def test_batching_random_digits_equals_separate_passes(absolute):
    lengths = [2, 5, 9]
    result = collapse_curve(absolute, "random_digits", lengths, ("float64",), chat=False, batch_tokens=64)
    s, s_star, _ = family_pairs(absolute, "random_digits", lengths, chat=False)
    torch.testing.assert_close(result.distances[0, :, :, 0], _brute_distances(absolute, s, s_star),
                               atol=1e-12, rtol=1e-9)
    # text follows the sequence, so no prompt is a prefix of another: every prompt is its own row
    assert result.forward_tokens["float64"] == result.naive_tokens and not result.prefix_closed


def test_bidirectional_models_get_separate_exact_passes():
    model = tiny_model(n_layers=1, n_heads=2, d_model=16, tokenizer="smollm2", causal=False, dtype=torch.float64)
    s = [torch.tensor([5, 6, 7]), torch.tensor([5, 6])]
    s_star = [torch.tensor([5, 6, 7, 7]), torch.tensor([5, 6, 6])]
    measured = measure_pairs(model, s, s_star)
    assert measured.n_rows == 4  # no prefix sharing: later tokens change earlier positions
    torch.testing.assert_close(measured.distances[:, :, 0], _brute_distances(model, s, s_star),
                               atol=1e-12, rtol=1e-9)


def test_norms_heads_and_relative_distances_match_definitions(rotary):
    result = collapse_curve(rotary, "copy_ones", [4, 9], ("float64",), chat=False, open_ended=True)
    s, s_star, _ = family_pairs(rotary, "copy_ones", [4, 9], chat=False, open_ended=True)
    for i in range(2):
        a, b = _brute(rotary, s[i]), _brute(rotary, s_star[i])
        for j, p in enumerate((float("inf"), 1.0, 2.0)):
            torch.testing.assert_close(result.distances[0, i, :, j], torch.linalg.vector_norm(a - b, ord=p, dim=-1))
            torch.testing.assert_close(result.relative()[0, i, :, j],
                                       torch.linalg.vector_norm(a - b, ord=p, dim=-1) / torch.linalg.vector_norm(a, ord=p, dim=-1))
        _, ca = rotary.run_with_cache(s[i][None])
        _, cb = rotary.run_with_cache(s_star[i][None])
        w_o = rotary.blocks[-1].attn.W_O
        ha = torch.einsum("hd,hdm->hm", ca["blocks.1.attn.hook_z"][0, -1], w_o)
        hb = torch.einsum("hd,hdm->hm", cb["blocks.1.attn.hook_z"][0, -1], w_o)
        torch.testing.assert_close(result.head_distances[0, i], (ha - hb).norm(dim=-1))
        # heads sum (plus b_O, which cancels) to the attention output difference
        torch.testing.assert_close((ha - hb).sum(0), ca["blocks.1.hook_attn_out"][0, -1] - cb["blocks.1.hook_attn_out"][0, -1])


def test_model_in_dtype_casts_parameters_and_rebuilds_buffers(rotary):
    bf16 = model_in_dtype(rotary, "bfloat16")
    assert bf16.cfg.dtype == torch.bfloat16 and rotary.cfg.dtype == torch.float64
    for (name, p), (_, q) in zip(rotary.named_parameters(), bf16.named_parameters(), strict=True):
        assert torch.equal(p.to(torch.bfloat16), q), name
    fresh = tiny_model(n_layers=2, n_heads=2, d_model=16, n_ctx=160, positional="rotary", norm="RMS",
                       dtype=torch.bfloat16, seed=3)
    assert torch.equal(bf16.blocks[0].attn.rotary_sin, fresh.blocks[0].attn.rotary_sin)
    assert model_in_dtype(rotary, torch.float64) is rotary


def test_dtype_sweep_thresholds_and_native_mode(rotary):
    lengths = list(range(1, 60, 4))
    default = collapse_curve(rotary, "count_ones", lengths, ("float64", "bfloat16"), chat=False, open_ended=True)
    native = collapse_curve(rotary, "count_ones", lengths, ("bfloat16",), chat=False, open_ended=True, native=True)
    # TransformerLens hands back residuals, y and logits already in bf16: native changes none of them
    torch.testing.assert_close(native.distances[0], default.distances[1], atol=0, rtol=0)
    th = default.thresholds()
    rel = default.final("inf")
    for d, name in enumerate(default.dtypes):
        hit = th[name]["below_resolution"]
        if hit is not None:
            i = lengths.index(hit)
            assert rel[d, i] < default.resolutions[name] and (rel[d, :i] >= default.resolutions[name]).all()
    # bf16 rounding makes the low-precision curve differ from float64
    assert not torch.equal(default.distances[0], default.distances[1])
    frame = default.summary()
    assert list(frame.index) == ["float64", "bfloat16"]
    assert default.to_dict()["thresholds"] == th
    assert "count_ones" in default._repr_html_()
    assert len(default.plot().data) >= 2 and len(default.plot("heads", "bfloat16").data) == 3


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
    result = collapse_curve(rotary, "copy_ones", [field - 1, field, field + 5], ("float64",), chat=False,
                            open_ended=True, window=w)
    d = result.final("inf")[0]
    assert d[0] > 1e-3 and (d[1:] < 1e-13).all()


@pytest.mark.slow
def test_window_sweep_reports_distance_and_bound(rotary):
    sweep = window_sweep(rotary, "count_ones", [4, 12], [None, 2, 8], chat=False, open_ended=True)
    assert sweep.distance.shape == (3, 2) and sweep.bound_first_share.shape == (3, 2)
    # full attention reproduces the plain curve
    plain = collapse_curve(rotary, "count_ones", [4, 12], ("float64",), chat=False, open_ended=True)
    torch.testing.assert_close(sweep.distance[0], plain.final("inf")[0])
    # a narrow window cuts the sink path: the rollout bound's first-token share falls at length 12
    assert sweep.bound_first_share[1, -1] < sweep.bound_first_share[0, -1]
    assert sweep.summary().shape[0] == 3 and len(sweep.plot("bound").data) >= 3
