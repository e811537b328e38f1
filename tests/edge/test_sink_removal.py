"""Over-mixing's model side on TransformerBridges, against plain ``transformers`` computations.

References (no TransformerLens, no lens_squash code): the residual streams are HF's decoder-layer
inputs and the last layer's output; the sink removal is HF's eager attention with key 0's scores set
to −∞ for queries 1…n−1 (softmax renormalises, which is what masking and renormalising the pattern
means for a plain softmax); the Jacobian norms are ``torch.autograd.functional.jacobian`` of the HF
model with layer 0's input replaced at one position.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from lens_squash.core.support import UnsupportedModelError
from lens_squash.edge.sink_removal import (
    input_jacobian_norms,
    mask_sink_hooks,
    mask_unsupported,
    residual_streams,
)

from ..hf_families import TOKENS, boot, build_hf

pytestmark = pytest.mark.bridge

POSITION = 3
#: transformers computes RMSNorm (Llama) and BLOOM's softmax in float32 inside a float64 model (BLOOM: the
#: masked softmax runs there, the bridge renormalises in float64); GPT-2 runs in float64 throughout
RTOL = {"llama": 1e-5, "gpt2": 1e-10, "bloom": 1e-6}


def _layers(hf) -> torch.nn.ModuleList:
    n = hf.config.num_hidden_layers
    return next(m for m in hf.base_model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n)


@contextlib.contextmanager
def hf_sink_masked(active: bool):
    """Every square 4-D softmax (eager attention's) sees −∞ at key 0 for queries 1…n−1."""
    softmax = torch.nn.functional.softmax

    def masked(x, *args, **kwargs):
        if x.dim() == 4 and x.shape[-1] == x.shape[-2] > 1:
            x = x.clone()
            x[..., 1:, 0] = float("-inf")
        return softmax(x, *args, **kwargs)

    if active:
        torch.nn.functional.softmax = masked
    try:
        yield
    finally:
        torch.nn.functional.softmax = softmax


def hf_streams(hf, tokens: torch.Tensor, x0: torch.Tensor | None = None, *, masked: bool = False):
    """``[layer+1, pos, d_model]``: each decoder layer's input, then the last one's output; ``x0``
    replaces layer 0's input."""
    seen, handles = [], []
    layers = _layers(hf)
    for index, layer in enumerate(layers):

        def pre(module, args, kwargs, index=index):
            hidden = args[0] if args else kwargs["hidden_states"]
            if index == 0 and x0 is not None:
                hidden = x0[None]
                args, kwargs = ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})
            seen.append(hidden[0])
            return args, kwargs

        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
    handles.append(
        layers[-1].register_forward_hook(lambda m, a, out: seen.append((out[0] if isinstance(out, tuple) else out)[0]))
    )
    try:
        with hf_sink_masked(masked):
            hf.base_model(input_ids=tokens[None])
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(seen)


def _hf_jacobian_norms(hf, tokens: torch.Tensor, masked: bool) -> torch.Tensor:
    with torch.no_grad():
        x0 = hf_streams(hf, tokens)[0]

    def f(x_k):
        at = (torch.arange(x0.shape[0]) == POSITION)[:, None]
        return hf_streams(hf, tokens, torch.where(at, x_k[None], x0), masked=masked)

    for p in hf.parameters():
        p.requires_grad_(False)
    jac = torch.autograd.functional.jacobian(f, x0[POSITION])  # [layer+1, pos, d_model, d_model]
    return jac.pow(2).sum(dim=(-1, -2)).sqrt()


@pytest.fixture(scope="module", params=sorted(RTOL))
def pair(request):
    name = request.param
    return name, build_hf(name), boot(build_hf(name))


def _close(got, expected, rtol):
    err = float((got.double() - expected.double()).abs().max())
    assert err <= rtol * float(expected.abs().max()), err / float(expected.abs().max())


@pytest.mark.parametrize("masked", [False, True])
def test_residual_streams_equal_hf_with_and_without_the_sink(pair, masked):
    name, hf, bridge = pair
    hooks = mask_sink_hooks(bridge) if masked else []
    got = residual_streams(bridge, TOKENS[None], fwd_hooks=hooks)["resid"][0]
    with torch.no_grad():
        expected = hf_streams(hf, TOKENS, masked=masked)
    _close(got, expected, RTOL[name])
    if masked:  # the removal is not a no-op
        plain = residual_streams(bridge, TOKENS[None])["resid"][0]
        assert float((plain - got)[1:].abs().max()) > 1e-3 * float(plain.abs().max())


@pytest.mark.parametrize("masked", [False, True])
def test_jacobian_norms_equal_hf_autograd(pair, masked):
    name, hf, bridge = pair
    hooks = mask_sink_hooks(bridge) if masked else []
    got = input_jacobian_norms(bridge, TOKENS, POSITION, fwd_hooks=hooks)
    _close(got, _hf_jacobian_norms(hf, TOKENS, masked), RTOL[name])


def test_a_bridge_whose_pattern_hook_does_not_act_refuses_the_mask_in_one_line():
    bridge = boot(build_hf("opt"))
    reason = mask_unsupported(bridge)
    assert reason is not None and "hook_pattern" in reason and "\n" not in reason
    with pytest.raises(UnsupportedModelError, match="fires hook_pattern after it"):
        mask_sink_hooks(bridge)
