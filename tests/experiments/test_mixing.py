"""Over-mixing: the spread against TransformerLens's own caches, the masked sink's renormalisation,
the Jacobian norms against ``torch.func.jacrev``, and the rotary no-<bos> / masked-sink identity; on
TransformerBridges, the spread against the ``transformers`` model's own residual streams."""

from __future__ import annotations

import functools

import pytest
import torch

from lens_squash.algebra.ranks import spearman
from lens_squash.core.support import UnsupportedModelError
from lens_squash.edge.backends import is_bridge
from lens_squash.edge.sink_removal import input_jacobian_norms, mask_sink_hooks, residual_hook_names
from lens_squash.edge.tiny import tiny_model
from lens_squash.experiments.ablation import clamp_hooks
from lens_squash.experiments.mixing import mixing

#: ``_model()`` is a HookedTransformer on TransformerLens 3 and a bridge over its Llama twin on 4, whose
#: float32 softmax and RMSNorm inside transformers hold numbers to float32 resolution (``_rtol``); the
#: renormalisation test is hooked: it checks rows to 1e-14

BOS = 0
TOKENS = torch.tensor([BOS, 17, 5, 33, 9, 41, 12, 7, 28, 3])
POSITION = 3
REPLACEMENTS = [50, 61]


@functools.cache
def _model(positional: str = "rotary"):
    return tiny_model(
        n_layers=2, n_heads=2, d_model=16, d_vocab=64, positional=positional, norm="RMS", dtype=torch.float64, seed=3
    )


def _cached_change(model, hooks=()) -> torch.Tensor:
    """The spread computed directly: run_with_cache on the clean prompt and each replaced one."""
    names = residual_hook_names(model)
    with model.hooks(fwd_hooks=list(hooks)):
        _, clean = model.run_with_cache(TOKENS[None])
        changes = []
        for token in REPLACEMENTS:
            perturbed = TOKENS.clone()
            perturbed[POSITION] = token
            _, cache = model.run_with_cache(perturbed[None])
            rows = [
                (cache[name][0, POSITION:] - clean[name][0, POSITION:]).norm(dim=-1)
                / clean[name][0, POSITION:].norm(dim=-1)
                for name in names
            ]
            changes.append(torch.stack(rows))
    return torch.stack(changes).mean(0)


def _scores_mask_hooks(model):
    """An independent sink removal: key 0 gets −∞ scores for queries 1…n−1, softmax renormalises."""

    def hook(scores, hook):
        scores = scores.clone()
        scores[:, :, 1:, 0] = float("-inf")
        return scores

    return [(f"blocks.{layer}.attn.hook_attn_scores", hook) for layer in range(model.cfg.n_layers)]


@functools.cache
def _result():
    return mixing(_model(), TOKENS, POSITION, replacement=REPLACEMENTS, clamp_layer=0, bos=BOS)


def _rtol(hooked: float) -> float:
    """``hooked``, or float32 resolution on a bridge (the float64 twin's softmax and RMSNorm run in float32)."""
    return 1e-6 if is_bridge(_model()) else hooked


def test_spread_equals_run_with_cache_on_the_two_prompts():
    result = _result()
    torch.testing.assert_close(result.change["sink"], _cached_change(_model()), rtol=_rtol(1e-10), atol=0)
    # the masked sink against masking the scores instead of renormalising the pattern
    torch.testing.assert_close(
        result.change["mask"], _cached_change(_model(), _scores_mask_hooks(_model())), rtol=_rtol(1e-9), atol=1e-12
    )
    torch.testing.assert_close(
        result.change["clamp"], _cached_change(_model(), clamp_hooks(_model(), 0)), rtol=_rtol(1e-10), atol=0
    )


def test_summaries_count_and_average_the_positions_after_the_replaced_one():
    result = _result()
    after = result.change["sink"][:, 1:]
    assert torch.equal(result.spread(), (after > result.threshold).sum(-1))
    torch.testing.assert_close(result.mean_change(), after.mean(-1))
    torch.testing.assert_close(
        result.ratio("mask"), result.change["mask"][:, 1:].mean(-1) / after.mean(-1), equal_nan=True
    )
    assert torch.isnan(result.ratio("mask")[0])  # 0 / 0: nothing has mixed before block 0
    assert float(result.mean_change()[0]) == 0.0  # before block 0 only the replaced token differs


@pytest.mark.hooked
def test_masked_sink_renormalises_exactly():
    model, before, after = _model(), {}, {}
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(model.cfg.n_layers)]
    # read each pattern just before and just after the mask, in the same (masked) pass
    hooks = [(name, lambda p, hook: before.__setitem__(hook.name, p.detach())) for name in names]
    hooks += mask_sink_hooks(model) + [
        (name, lambda p, hook: after.__setitem__(hook.name, p.detach())) for name in names
    ]
    model.run_with_hooks(TOKENS[None], fwd_hooks=hooks)
    for name in names:
        masked, original = after[name][0], before[name][0]
        torch.testing.assert_close(masked.sum(-1), torch.ones_like(masked.sum(-1)), rtol=0, atol=1e-14)
        assert torch.equal(masked[:, 1:, 0], torch.zeros_like(masked[:, 1:, 0]))
        assert torch.equal(masked[:, 0, 0], original[:, 0, 0])  # query 0 sees only key 0
        # renormalising is a rescaling: every other weight of a row grows by 1 / (1 − p₀)
        scale = 1 / (1 - original[:, 1:, 0:1])
        torch.testing.assert_close(masked[:, 1:, 1:], original[:, 1:, 1:] * scale, rtol=1e-12, atol=1e-15)


def test_rotary_model_without_bos_equals_the_masked_sink():
    # rotary scores depend on relative positions only, so dropping token 0 is masking key 0
    result = _result()
    torch.testing.assert_close(result.change["no_bos"], result.change["mask"], rtol=_rtol(1e-9), atol=1e-12)
    torch.testing.assert_close(result.jacobian["no_bos"], result.jacobian["mask"], rtol=_rtol(1e-9), atol=1e-12)


def _jacrev_norms(model, hooks) -> torch.Tensor:
    names, clean = residual_hook_names(model), {}
    first = names[0]  # the stream entering block 0 (hook_resid_pre, or a bridge's name for it)
    model.run_with_hooks(TOKENS[None], fwd_hooks=[(first, lambda r, hook: clean.setdefault("x", r.detach()))])

    def f(x_k):
        out = {}

        def put(resid, hook):
            at = (torch.arange(resid.shape[1]) == POSITION)[None, :, None]
            return torch.where(at, x_k[None, None], resid)

        # keyed by the name asked for: a bridge's hook.name is its own (blocks.0.hook_in for hook_resid_pre)
        keep = [(name, lambda r, hook, name=name: out.__setitem__(name, r)) for name in names]
        model.run_with_hooks(TOKENS[None], fwd_hooks=[(first, put), *hooks, *keep])
        return torch.stack([out[name][0] for name in names])

    jac = torch.func.jacrev(f)(clean["x"][0, POSITION])  # [layer+1, pos, d_model, d_model]
    return jac.pow(2).sum(dim=(-1, -2)).sqrt().detach()


@pytest.mark.parametrize("setting", ["sink", "mask", "clamp"])
def test_jacobian_norms_equal_jacrev(setting):
    model = _model()
    hooks = {"sink": [], "mask": mask_sink_hooks(model), "clamp": clamp_hooks(model, 0)}[setting]
    expected = _jacrev_norms(model, hooks)
    torch.testing.assert_close(input_jacobian_norms(model, TOKENS, POSITION, fwd_hooks=hooks, chunk=5), expected)
    torch.testing.assert_close(_result().jacobian[setting], expected[:, POSITION:])
    if setting != "clamp":  # the clamp's target is the median norm over every position: not causal
        assert torch.equal(expected[:, :POSITION], torch.zeros_like(expected[:, :POSITION]))


def test_sketched_jacobian_is_close_to_the_exact_one_with_many_probes():
    model = _model()
    exact = input_jacobian_norms(model, TOKENS, POSITION)
    sketch = input_jacobian_norms(model, TOKENS, POSITION, probes=4000, seed=1)
    torch.testing.assert_close(sketch[1:, POSITION:], exact[1:, POSITION:], rtol=0.1, atol=0)


def test_head_link_matches_the_caches():
    model, result = _model(), _result()
    _, clean = model.run_with_cache(TOKENS[None])
    for layer in range(model.cfg.n_layers):
        pattern = clean[f"blocks.{layer}.attn.hook_pattern"][0]
        torch.testing.assert_close(result.sink_attention[layer], pattern[:, 1:, 0].mean(-1))
    spreads = torch.zeros_like(result.head_spread)
    for token in REPLACEMENTS:
        perturbed = TOKENS.clone()
        perturbed[POSITION] = token
        _, cache = model.run_with_cache(perturbed[None])
        for layer in range(model.cfg.n_layers):
            name = f"blocks.{layer}.attn.hook_z"
            delta = torch.einsum("phd,hdm->phm", cache[name][0] - clean[name][0], model.blocks[layer].attn.W_O)
            read = clean[f"blocks.{layer}.hook_resid_pre"][0].norm(dim=-1)
            spreads[layer] += (delta.norm(dim=-1) / read[:, None])[POSITION + 1 :].mean(0) / len(REPLACEMENTS)
    torch.testing.assert_close(result.head_spread, spreads)
    assert result.head_correlation == spearman(result.sink_attention.flatten(), result.head_spread.flatten())
    for layer in range(model.cfg.n_layers):
        expected = spearman(result.sink_attention[layer], result.head_spread[layer])
        assert float(result.layer_correlations[layer]) == pytest.approx(expected, nan_ok=True)


def test_random_replacements_are_seeded_and_never_the_original():
    a = mixing(_model(), TOKENS, POSITION, n_samples=5, seed=4, jacobian=False, removals=("mask",), bos=BOS)
    b = mixing(_model(), TOKENS, POSITION, n_samples=5, seed=4, jacobian=False, removals=("mask",), bos=BOS)
    assert a.replacements == b.replacements and len(set(a.replacements)) == 5
    assert int(TOKENS[POSITION]) not in a.replacements and BOS not in a.replacements
    torch.testing.assert_close(a.change["mask"], b.change["mask"], rtol=0, atol=0)


def test_removals_that_cannot_apply_are_skipped_with_the_reason():
    tokens = TOKENS.clone()
    tokens[0] = 11  # no <bos> in front
    result = mixing(_model(), tokens, POSITION, replacement=50, jacobian=False, bos=BOS, massive_factor=1e6)
    assert set(result.change) == {"sink", "mask"}
    assert "<bos>" in result.skipped["no_bos"] and "massive" in result.skipped["clamp"]
    with pytest.raises(ValueError, match="no 'no_bos' setting"):
        result.ratio("no_bos")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"position": 0}, "position"),
        ({"position": len(TOKENS) - 1}, "position"),
        ({"replacement": int(TOKENS[POSITION])}, "already at position"),
        ({"replacement": 64}, "token ids"),
        ({"replacement": "hello"}, "tokenizer"),
        ({"removals": ("mask", "nope")}, "sink removal"),
        ({"threshold": 0.0}, "threshold"),
    ],
)
def test_bad_input_is_refused(kwargs, match):
    kwargs = {"position": POSITION, **kwargs}
    with pytest.raises(ValueError, match=match):
        mixing(_model(), TOKENS, kwargs.pop("position"), jacobian=False, **kwargs)


def test_learned_sink_logits_are_refused():
    model = tiny_model(n_layers=1, d_model=8, n_heads=2, d_vocab=64, seed=0)
    model.cfg.use_attention_sinks = True
    try:
        with pytest.raises(UnsupportedModelError, match="use_attention_sinks"):
            mask_sink_hooks(model)
    finally:
        model.cfg.use_attention_sinks = False


def test_result_round_trips_and_tabulates(tmp_path):
    result = _result()
    loaded = type(result).load(result.save(tmp_path / "mixing.json"))
    for setting in result.change:
        assert torch.equal(loaded.change[setting], result.change[setting])
        assert torch.equal(loaded.jacobian[setting], result.jacobian[setting])
    frame = result.to_frame()
    assert len(frame) == _model().cfg.n_layers + 1 and "ratio_mask" in frame


def test_the_clamp_acts_after_the_first_block_with_a_massive_first_token():
    from lens_squash.experiments.mixing import _clamp_layer

    resid = torch.ones(1, 4, 6, 8, dtype=torch.float64)  # [batch, layer+1, pos, d_model]
    resid[0, 2, 0] *= 9.0  # below 10× the median: not massive
    resid[0, 3, 0] *= 12.0  # the output of block 2
    assert _clamp_layer(resid, 10.0) == 2
    assert _clamp_layer(resid, 8.0) == 1
    assert _clamp_layer(resid, 20.0) is None


@pytest.mark.bridge
@pytest.mark.parametrize("name", ["gpt2", "opt"])
def test_bridges_spread_equals_the_hf_models_own_streams(name):
    """The sink and masked-sink spreads of a bridge equal the relative change of the HF model's
    residual streams (its eager softmax masked at key 0); OPT's bridge, whose hook_pattern does not
    feed its forward pass, skips the mask with the reason and still measures the rest."""
    from ..edge.test_sink_removal import hf_streams
    from ..hf_families import boot, build_hf

    hf, bridge = build_hf(name), boot(build_hf(name))
    result = mixing(bridge, TOKENS, POSITION, replacement=REPLACEMENTS, removals=("mask",), jacobian=False)
    settings = {"sink": False} if name == "opt" else {"sink": False, "mask": True}
    assert set(result.change) == set(settings)
    if name == "opt":
        assert "hook_pattern" in result.skipped["mask"]
    for setting, masked in settings.items():
        with torch.no_grad():
            clean = hf_streams(hf, TOKENS, masked=masked)[:, POSITION:]
            changes = []
            for token in REPLACEMENTS:
                perturbed = TOKENS.clone()
                perturbed[POSITION] = token
                changes.append((hf_streams(hf, perturbed, masked=masked)[:, POSITION:] - clean).norm(dim=-1))
        expected = torch.stack(changes).mean(0) / clean.norm(dim=-1)
        torch.testing.assert_close(result.change[setting].double(), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.bridge
def test_a_bridge_with_learned_sinks_is_refused():
    """GPT-OSS's bridge leaves cfg.use_attention_sinks unset; its sinks are read from the attention
    module, so key 0 is not masked as if it were the sink."""
    from ..hf_families import boot, build_hf

    bridge = boot(build_hf("gpt_oss"))
    with pytest.raises(UnsupportedModelError, match="learned sink logits") as caught:
        mask_sink_hooks(bridge)
    assert "\n" not in str(caught.value)
