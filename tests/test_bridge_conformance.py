"""Conformance of the TransformerBridge backend: every causal decoder family, against plain autograd on
the ``transformers`` model itself (``tests/hf_families.py``: no TransformerLens and no lens_squash code
in the references).

Per family, a random-weight float64 model with norm gains and biases drawn away from their defaults:
exact, frozen and sketched Jacobians equal ``torch.autograd.functional.jacobian`` of the HF model (the
frozen one replays HF's own softmaxes and norm scales as constants); traced patterns equal HF's
``output_attentions``; ``y_last`` equals HF's final-norm output; the certified bound is at or above
the frozen Jacobian, also with adversarial gains. Where lens_squash refuses a method it must say so in
one typed line (MoE on TransformerLens 3.9's bridge, which has no router hook). OPT's and GPT-J's bridges run transformers' own attention and fire ``hook_pattern``
after it: their frozen mode detaches the queries and keys, and must still equal HF's replayed patterns.

Families lens_squash cannot read are refused whole, in one line, by ``check_model`` (:data:`REFUSED`:
multi-head latent attention, mixture-of-attention heads, SSM hybrids, a bridge whose own forward fails,
and on TransformerLens 3.9 bridges whose attention differs from the transformers module they wrap).

Tolerance: 1e-10 relative in float64 where the HF model computes in float64. Where HF computes a step
in float32 that the bridge's hooked path computes in the model's dtype, the two agree only to float32
resolution (1e-5): RMSNorm families (``hidden_states.to(torch.float32)``), OLMo's LayerNorm, and the
softmax of NeoX and Falcon (``softmax(..., dtype=torch.float32)``, which the bridge reimplements).
MoE models run float64 too (``build_hf`` picks transformers' eager experts).
"""

from __future__ import annotations

import pytest
import torch

from lens_squash.algebra.variants import path_bound
from lens_squash.core.support import UnsupportedModelError
from lens_squash.edge.backends import has_hooked_transformer
from lens_squash.edge.jacobian import jacobian
from lens_squash.edge.models import check_model
from lens_squash.edge.trace import trace

from .hf_families import (
    ADVERSARIAL_GAINS,
    CAUSAL,
    FLOAT32_BUILT,
    NON_CAUSAL,
    TOKENS,
    boot,
    build_hf,
    hf_final,
    hf_jacobian,
    set_gains,
)

pytestmark = [pytest.mark.bridge, pytest.mark.conformance]

#: families where transformers computes a step in float32 even in a float64 model (see the docstring)
FLOAT32_INSIDE = frozenset(
    {"phi3", "llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo2", "olmo"}
    | {"qwen3_moe", "olmoe", "gpt_oss", "gpt_neox", "falcon"}
    | {"cohere", "granite", "granitemoe", "qwen2_moe", "smollm3", "olmo3", "exaone4", "hunyuan_v1_dense"}
    | {"seed_oss", "apertus", "arcee", "glm", "glm4", "ernie4_5", "gpt_bigcode", "llama4_text"}
    | {"cohere2", "ministral3", "exaone", "glm4_moe", "ernie4_5_moe"}
    | FLOAT32_BUILT  # XGLM: the whole model in float32
)
MOE = ("mixtral", "qwen3_moe", "olmoe", "gpt_oss")
#: families lens_squash refuses a method on, with the refusal's wording
REFUSES: dict[str, dict[str, str]] = {
    # residual_multiplier scales what each sublayer adds: the block is not x + attention + MLP
    "granite": {"certified": "reads .*a residual multiplier"},
    "granitemoe": {"certified": "reads .*a residual multiplier"},
    "qwen2_moe": {"certified": "a shared expert"},  # a gated shared expert beside the routed sum
    "llama4_text": {"frozen": "router has no hook_expert_weights", "certified": "hook_expert_weights"},
    # a dense first layer (no router hook there), then experts whose router fires no hook_expert_weights
    "glm4_moe": {"frozen": "no blocks.0.mlp.hook_expert_weights", "certified": "hook_expert_weights"},
    "ernie4_5_moe": {"frozen": "router has no hook_expert_weights", "certified": "hook_expert_weights"},
}
#: families lens_squash refuses whole, in one line, before any work (check_model)
REFUSED: dict[str, str] = {
    "codegen": "fails its own forward pass",  # TransformerLens 4.3's CodeGen bridge on transformers 5
    "deepseek_v3": "no attention with readable W_V",  # multi-head latent attention
    "jetmoe": "no attention with readable W_V",  # mixture of attention heads
    "falcon_h1": "has a sublayer 'mamba'",  # a Mamba-2 mixer beside attention: a hybrid
}
if has_hooked_transformer():  # TransformerLens 3.9's bridge: OPT's MLP hooks never fire, MoE has no router hook
    REFUSES["opt"] = {"certified": "did not run as a module with hooks"}
    REFUSES["xglm"] = {"certified": "did not run as a module with hooks"}
    for _moe in MOE:
        REFUSES[_moe] = {"frozen": "router has no hook_expert_weights", "certified": "hook_expert_weights"}
    for _moe in ("phimoe", "qwen2_moe", "granitemoe", "glm4_moe", "ernie4_5_moe", "llama4_text"):
        _first = REFUSES.get(_moe, {}).get(
            "certified", "hook_expert_weights"
        )  # the probe may stop at another fact first
        REFUSES[_moe] = {"frozen": "hook_expert_weights", "certified": f"{_first}|hook_expert_weights"}
    # its hooked norm path scales by w where Nemotron's LayerNorm1p scales by 1 + w
    REFUSES["nemotron"] = {"frozen": "attaching the frozen mode's hooks"}
    # TransformerLens 3.9 reimplements their attention differently from transformers (rotary layout)
    REFUSED["cohere"] = REFUSED["cohere2"] = REFUSED["hunyuan_v1_dense"] = "differs from the transformers"
FAMILIES = sorted(set(CAUSAL) - set(REFUSED))


def _rtol(name: str) -> float:
    return 1e-5 if name in FLOAT32_INSIDE else 1e-10


def _close(got: torch.Tensor, expected: torch.Tensor, rtol: float, label) -> None:
    """Entrywise within ``rtol`` of the reference's largest entry."""
    got, expected = got.double(), expected.double()
    scale = float(expected.abs().max())
    err = float((got - expected).abs().max())
    assert err <= rtol * scale, (label, err / max(scale, 1e-300))


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    """(name, reference HF model, bridge over an identical copy, trace). Two copies: booting wraps
    the HF model's submodules, and the reference must stay plain ``transformers``."""
    name = request.param
    reference = build_hf(name)
    bridge = boot(build_hf(name))
    return name, reference, bridge, trace(bridge, TOKENS, lipschitz=True)


def _refused(name: str, method: str) -> str | None:
    return REFUSES.get(name, {}).get(method)


def test_exact_and_sketched_jacobians_equal_hf_autograd(family):
    name, reference, bridge, _ = family
    rtol = _rtol(name)
    expected = hf_jacobian(reference, TOKENS, frozen=False)
    exact = jacobian(bridge, TOKENS, keep_full=True)
    _close(exact.full, expected, rtol, (name, "exact"))
    d_out = expected.shape[0]
    # a full orthonormal basis of probes makes the sketch exact (its Frobenius norms)
    sketch = jacobian(bridge, TOKENS, mode="sketch", n_probes=d_out, seed=1)
    _close(sketch.frobenius, torch.linalg.matrix_norm(expected.permute(1, 0, 2)), max(rtol, 1e-7), (name, "sketch"))


def test_frozen_jacobian_equals_hf_with_replayed_patterns_and_scales(family):
    name, reference, bridge, _ = family
    reason = _refused(name, "frozen")
    if reason is not None:
        with pytest.raises(UnsupportedModelError, match=reason):
            jacobian(bridge, TOKENS, mode="frozen")
        return
    expected = hf_jacobian(reference, TOKENS, frozen=True)
    got = jacobian(bridge, TOKENS, mode="frozen", keep_full=True)
    _close(got.full, expected, _rtol(name), (name, "frozen"))
    # freezing is not a no-op: the frozen truth differs from the exact one
    exact = hf_jacobian(reference, TOKENS, frozen=False)
    assert float((exact - expected).abs().max()) > 1e-3 * float(exact.abs().max()), name


def test_patterns_and_y_last_equal_hf(family):
    name, reference, _, traced = family
    rtol = _rtol(name)
    out = hf_final(reference, TOKENS, output_attentions=True)
    expected = torch.stack([a[0] for a in out.attentions])  # [layer, head, query, key]
    _close(traced.patterns, expected, rtol, (name, "patterns"))
    _close(traced.y_last, out.last_hidden_state[0, -1], rtol, (name, "y_last"))


def _spectral(full: torch.Tensor) -> torch.Tensor:
    return torch.linalg.matrix_norm(full.permute(1, 0, 2).double(), ord=2)


def _assert_dominates(bound: torch.Tensor, truth: torch.Tensor, rtol: float, label) -> None:
    truth = torch.cat([truth, truth.new_zeros(len(bound) - len(truth))])
    slack = rtol * float(truth.max())
    assert (bound >= truth * (1 - rtol) - slack).all(), (label, float((bound / truth.clamp_min(1e-300)).min()))


def _certified_or_refusal(name: str, bridge, traced):
    reason = _refused(name, "certified")
    if reason is not None:
        with pytest.raises(UnsupportedModelError, match=reason):
            path_bound(traced, "certified", model=bridge)
        return None
    assert "lipschitz_unsupported" not in traced.provenance, traced.provenance
    return path_bound(traced, "certified", model=bridge).bound


def test_certified_dominates_the_hf_frozen_jacobian(family):
    name, reference, bridge, traced = family
    bound = _certified_or_refusal(name, bridge, traced)
    if bound is not None:
        truth = _spectral(hf_jacobian(reference, TOKENS, frozen=True))
        _assert_dominates(bound, truth, _rtol(name), name)


@pytest.mark.parametrize("attack", sorted(ADVERSARIAL_GAINS))
@pytest.mark.parametrize("name", [n for n in FAMILIES if _refused(n, "certified") is None])
def test_certified_dominates_under_adversarial_gains(name, attack):
    reference, copy = build_hf(name, seed=3), build_hf(name, seed=3)
    for model in (reference, copy):
        set_gains(model, name, ADVERSARIAL_GAINS[attack])
    bridge = boot(copy)
    bound = path_bound(trace(bridge, TOKENS, lipschitz=True), "certified", model=bridge).bound
    truth = _spectral(hf_jacobian(reference, TOKENS, frozen=True))
    _assert_dominates(bound, truth, _rtol(name), (name, attack))


@pytest.mark.parametrize("how", ["raw", "processed"])
def test_bridges_as_users_boot_them_are_refused_in_one_line_with_the_call_that_works(how):
    """Without compatibility mode the legacy hooks are missing; with weight processing the norms are
    folded into the weights, so the final norm's output is not the model's. Both name the exact call."""
    hf = build_hf("llama")
    bridge = boot(hf, compatibility=False) if how == "raw" else boot(hf, no_processing=False)
    with pytest.raises(ValueError, match=r"enable_compatibility_mode\(no_processing=True\)") as caught:
        trace(bridge, TOKENS)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("name", sorted(NON_CAUSAL))
def test_non_causal_models_are_refused_in_one_line(name):
    try:
        bridge = boot(build_hf(name, table=NON_CAUSAL))
    except Exception as error:  # noqa: BLE001 - TransformerLens may not boot it at all
        pytest.skip(f"TransformerLens does not boot {name}: {type(error).__name__}")
    with pytest.raises((UnsupportedModelError, ValueError)) as caught:
        check_model(bridge)
        trace(bridge, TOKENS)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_families_lens_squash_cannot_read_are_refused_whole_in_one_line(name):
    """Multi-head latent attention has no per-head W_V; a bridge whose own forward fails has nothing to
    read. Both are refused by check_model, before any work, in one line that says which."""
    bridge = boot(build_hf(name))
    with pytest.raises(UnsupportedModelError, match=REFUSED[name]) as caught:
        check_model(bridge)
    assert "\n" not in str(caught.value)
