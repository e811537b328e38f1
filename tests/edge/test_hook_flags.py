"""The hook flags users switch on a ``TransformerBridge`` (``set_use_split_qkv_input``, ``set_use_attn_in``,
``set_use_attn_result``, ``set_use_hook_mlp_in``): each only adds hooks, so every method must give the
numbers of the same bridge with the flag off, or refuse in one line naming the flag and the call that
switches it off. The frozen and exact Jacobians are also checked against plain autograd on an untouched
``transformers`` copy of the weights (``hf_families.hf_jacobian``: no TransformerLens, no lens_squash).
Bridges on both lines (TransformerLens 3.9 has the bridge too); GPT-2 (a joint QKV attention) and Llama
(rotary, grouped-query attention), the two attention bridges that honour the split flags; the collapse
curve on the tiny-random bridge, whose tokenizer turns the family's texts into ids it knows.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import pytest
import torch

from lens_squash.core.support import UnsupportedModelError
from lens_squash.edge import adapter
from lens_squash.edge.flow import flow
from lens_squash.edge.hook_flags import HOOK_FLAGS, hook_flags
from lens_squash.edge.jacobian import jacobian
from lens_squash.edge.models import TINY_MODEL, load_model
from lens_squash.edge.trace import trace
from lens_squash.experiments.analysis import analyze
from lens_squash.experiments.collapse import collapse_curve
from lens_squash.experiments.sinks import sink_analysis

from ..hf_families import TOKENS, boot, build_hf, hf_jacobian
from ..test_bridge_conformance import FAMILIES as READ_FAMILIES
from ..test_bridge_conformance import FLOAT32_INSIDE

FAMILIES = ("gpt2", "llama")
#: flags that fork the residual into per-head copies before ln1 (TransformerLens recomputes attention itself)
FORKS = ("use_split_qkv_input", "use_attn_in")
#: the sensitivity flow refuses per-head inputs (as on a HookedTransformer with the same config field)
FLOW_REFUSES = FORKS

CALLS = {
    "trace": lambda m: trace(m, TOKENS, lipschitz=True, keep_resid=True),
    "analyze": lambda m: analyze(m, TOKENS),
    "analyze_streamed": lambda m: analyze(m, TOKENS, keep_patterns=False, jacobian_mode=None),
    "exact": lambda m: jacobian(m, TOKENS, mode="exact"),
    "frozen": lambda m: jacobian(m, TOKENS, mode="frozen"),
    "sketch": lambda m: jacobian(m, TOKENS, mode="sketch", n_probes=8),
    "frozen_layer": lambda m: jacobian(m, TOKENS, mode="frozen", wrt=1, layer=1),
    "flow": lambda m: flow(m, TOKENS, mode="exact"),
    "sinks": lambda m: sink_analysis(m, TOKENS),
}


def _bridge(family: str, flag: str | None = None):
    bridge = boot(build_hf(family))
    if flag is not None:
        getattr(bridge, f"set_{flag}")(True)
    return bridge


def _tolerance(family: str, flag: str | None) -> float:
    """Relative to each tensor's largest entry. transformers' Llama normalises and takes its softmax in
    float32 inside a float64 model; with a fork flag TransformerLens recomputes attention itself in
    float64, so the two paths meet at float32 resolution only (both within it of HF autograd)."""
    return 1e-5 if family == "llama" and flag in FORKS else 1e-10


@functools.cache
def _results(family: str, flag: str | None) -> dict:
    model = _bridge(family, flag)
    out = {}
    for name, call in CALLS.items():
        try:
            out[name] = call(model)
        except UnsupportedModelError as error:
            out[name] = error
    out["model"] = model
    return out


def _tensors(value, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor (and number) inside a result, by path; timings and provenance left out."""
    if isinstance(value, torch.Tensor):
        return {prefix: value}
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return {}
    if isinstance(value, (int, float)):
        return {prefix: torch.tensor(float(value))}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        items = [(f.name, getattr(value, f.name)) for f in dataclasses.fields(value)]
        items = [(k, v) for k, v in items if k not in ("provenance", "seconds")]
    elif isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, (list, tuple)):
        items = list(enumerate(value))
    else:
        return {}
    found = {}
    for key, item in items:
        found.update(_tensors(item, f"{prefix}.{key}"))
    return found


def _assert_same(got, expected, tol: float, what) -> None:
    """Every number equal to ``tol`` of its tensor's largest entry (at least of 1: a defect of 4e-16 is 0)."""
    a, b = _tensors(got), _tensors(expected)
    assert a.keys() == b.keys(), (what, a.keys() ^ b.keys())
    assert a, what  # a result with no numbers would pass vacuously
    for key, x in a.items():
        y = b[key]
        assert x.shape == y.shape, (what, key)
        if not x.is_floating_point():
            assert torch.equal(x, y), (what, key)
            continue
        scale = float(y.double().abs().nan_to_num(0).max()) if y.numel() else 0.0
        torch.testing.assert_close(x.double(), y.double(), rtol=0, atol=tol * max(scale, 1.0), equal_nan=True)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("flag", HOOK_FLAGS)
def test_every_method_gives_the_flags_off_numbers_or_names_the_call_that_switches_it_off(family, flag):
    off, on = _results(family, None), _results(family, flag)
    for name in CALLS:
        assert not isinstance(off[name], Exception), (name, off[name])  # the plain bridge runs everything
        if name == "flow" and flag in FLOW_REFUSES:
            assert isinstance(on[name], UnsupportedModelError), on[name]
            message = str(on[name])
            assert "\n" not in message and f"cfg.{flag}" in message, message
            assert re.search(re.escape(f"bridge.set_{flag}(False)"), message), message
            continue
        assert not isinstance(on[name], Exception), (name, on[name])
        _assert_same(on[name], off[name], _tolerance(family, flag), (family, flag, name))
    assert on["analyze"].skipped == off["analyze"].skipped


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("flag", HOOK_FLAGS)
def test_jacobians_with_a_flag_on_equal_plain_autograd_on_the_transformers_model(family, flag):
    """Independent of the flags-off run: the frozen Jacobian replays HF's own patterns and norm scales."""
    on = _results(family, flag)
    hf = build_hf(family)  # the same seed: the same weights, never wrapped by a bridge
    for mode in ("exact", "frozen"):
        truth = hf_jacobian(hf, TOKENS, frozen=mode == "frozen").norm(dim=(0, 2))
        got = on[mode].frobenius.to(truth.dtype)
        tol = 1e-5 if family == "llama" else 1e-10  # transformers' float32 steps inside Llama
        torch.testing.assert_close(got, truth, rtol=0, atol=tol * float(truth.max()))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("flag", FORKS)
def test_freezing_acts_on_the_per_head_norms_and_leaves_the_bridge_as_found(family, flag):
    """With the residual forked per head, the frozen Jacobian differs from the exact one (its norm scales
    are held, not live), and after every call the bridge computes as before with no patch left on it."""
    on = _results(family, flag)
    model = on["model"]
    assert not torch.allclose(on["frozen"].frobenius, on["exact"].frobenius, rtol=1e-3)
    assert hook_flags(model)[HOOK_FLAGS.index(flag)]
    assert all("_apply_ln1_per_head" not in vars(block.attn) for block in model.blocks)
    with torch.no_grad():
        logits = model(TOKENS[None])
    reference = build_hf(family)
    with torch.no_grad():
        expected = reference(input_ids=TOKENS[None]).logits
    torch.testing.assert_close(logits.to(expected.dtype), expected, rtol=0, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_flag_switched_after_a_first_analysis_is_seen(family):
    """The adapter caches what it probed per model: switching split inputs on afterwards re-probes (the cached
    findings are those of the flags as set now), and the frozen Jacobian still equals HF autograd."""
    model = _bridge(family)
    before = jacobian(model, TOKENS, mode="frozen").frobenius
    model.set_use_split_qkv_input(True)
    after = jacobian(model, TOKENS, mode="frozen").frobenius
    assert adapter._STRUCTURES[model][0] == hook_flags(model) != (False,) * len(HOOK_FLAGS)
    truth = hf_jacobian(build_hf(family), TOKENS, frozen=True).norm(dim=(0, 2))
    tol = 1e-5 if family == "llama" else 1e-10
    for got in (before, after):
        torch.testing.assert_close(got.to(truth.dtype), truth, rtol=0, atol=tol * float(truth.max()))


@functools.cache
def _collapse(flag: str | None):
    """collapse_curve on the tiny-random bridge (SmolLM2's tokenizer: the family's texts tokenize)."""
    model = load_model(TINY_MODEL, backend="bridge", dtype=torch.float64, n_ctx=64)
    if flag is not None:
        getattr(model, f"set_{flag}")(True)
    return collapse_curve(model, "count_ones", [1, 3, 8], ("float64",), chat=False)


@pytest.mark.parametrize("flag", HOOK_FLAGS)
def test_collapse_with_a_flag_on_equals_flags_off(flag):
    on, off = _collapse(flag), _collapse(None)
    assert float(off.distances.max()) > 0  # distinct prompts: a comparison of zeros would prove nothing
    _assert_same(on, off, 1e-10, ("collapse", flag))


@pytest.mark.parametrize("flag, point", [("use_split_qkv_input", "hook_k_input"), ("use_attn_in", "hook_attn_in")])
def test_a_trace_refuses_a_hook_on_the_per_head_copies(flag, point):
    """The trace reads ln1's main-path scale; an edit of the per-head copies would make it one the model does
    not use, so it is refused in one line naming the hook (and the traced numbers are not returned)."""
    model = _bridge("gpt2", flag)
    model.blocks[1].attn.get_submodule(point).add_hook(lambda x, hook: 2.0 * x)
    try:
        with pytest.raises(UnsupportedModelError, match=re.escape(f"blocks.1.attn.{point}")):
            trace(model, TOKENS)
    finally:
        model.reset_hooks()
    assert trace(model, TOKENS).ln1_scale.shape == (2, len(TOKENS))


def _outcome(call):
    try:
        return call()
    except UnsupportedModelError as error:
        return error


#: every family the bridge conformance suite reads (tests/hf_families.py's causal ones less those refused whole)
#: with each flag; GPT-2 in the fast set, the others conformance
SWEEP = [
    pytest.param(family, flag, marks=[] if family == "gpt2" else [pytest.mark.conformance])
    for family in READ_FAMILIES
    for flag in HOOK_FLAGS
]
#: flags that fork the residual into per-head copies: TransformerLens then recomputes the attention and the
#: gradient passes normalise each copy through the block's hooked ln1, in the model's dtype (edge/hook_flags.py).
#: Cohere's transformers module computes steps in float32, so with these flags its trace and Jacobians agree with
#: the flags-off bridge and HF autograd to float32 resolution only (flags off, the bridge runs that module)
ROUTED = frozenset({"use_split_qkv_input", "use_attn_in"})
NORM_IN_FLOAT32 = frozenset({"cohere", "cohere2"})


@pytest.mark.parametrize(("family", "flag"), SWEEP)
def test_every_family_with_a_flag_gives_hf_autograd_or_the_flags_off_refusal(family, flag):
    """Exact and frozen Jacobians against plain autograd on the transformers model (float32 resolution where
    transformers computes a step in float32: tests/test_bridge_conformance.py's FLOAT32_INSIDE), the trace
    against the flags-off one; where the flags-off bridge refuses a method, the flagged one refuses the same."""
    model = _bridge(family)
    try:
        getattr(model, f"set_{flag}")(True)
    except NotImplementedError as error:  # TransformerLens refuses the flag on this attention: nothing runs
        assert flag in str(error)
        return
    reference = _flags_off(family)
    float32_inside = family in FLOAT32_INSIDE or (flag in ROUTED and family in NORM_IN_FLOAT32)
    tol = 1e-5 if float32_inside else 1e-10
    for mode in ("exact", "frozen"):
        got, plain = _outcome(lambda mode=mode: jacobian(model, TOKENS, mode=mode)), reference[mode]
        if isinstance(plain, UnsupportedModelError):
            assert isinstance(got, UnsupportedModelError) and str(got) == str(plain), (mode, got)
            continue
        truth = reference[f"hf_{mode}"]
        torch.testing.assert_close(got.frobenius.to(truth.dtype), truth, rtol=0, atol=tol * float(truth.max()))
    # float32 inside: the forking flags' own attention recompute rounds where transformers' module does not
    tol_trace = tol if float32_inside else 1e-10
    _assert_same(trace(model, TOKENS), reference["trace"], tol_trace, (family, flag, "trace"))


@functools.cache
def _flags_off(family: str) -> dict:
    """What the sweep compares every flag of ``family`` with, computed once: the flags-off bridge's Jacobians
    (or refusals) and trace, and plain autograd on the transformers model (flag-independent)."""
    off, hf = _bridge(family), build_hf(family)
    out = {mode: _outcome(lambda mode=mode: jacobian(off, TOKENS, mode=mode)) for mode in ("exact", "frozen")}
    for mode in ("exact", "frozen"):
        if not isinstance(out[mode], UnsupportedModelError):
            out[f"hf_{mode}"] = hf_jacobian(hf, TOKENS, frozen=mode == "frozen").norm(dim=(0, 2))
    return out | {"trace": trace(off, TOKENS)}
