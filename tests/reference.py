"""Independent references for the conformance suite and ``scripts/architectures.py``.

``reference_jacobian`` differentiates ``y_n`` with ``torch.func.jacrev`` through a plain hooked pass
of the *whole* model (no ``stop_at_layer``, no lens_squash code). Its frozen mode replays, as
constants, every attention pattern and norm scale recorded in a clean pass, in call order (a norm
with split Q/K/V inputs fires three times, with different head counts), instead of detaching them.
``adversarial`` makes the weight edits that broke the bound before: post norms renormalising shrunk
sublayers, gains that amplify what a sublayer writes, sharp patterns, heavy sinks.

On a ``TransformerBridge`` (TransformerLens 4) the reference is not taken through the bridge: it is
plain autograd on an untouched ``transformers`` copy of its weights (``families.hf_reference``,
``hf_families.hf_jacobian``), which replays HF's own softmaxes and norm scales when frozen.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
from torch import Tensor

__all__ = ["ADVERSARIAL", "adversarial", "edit_in_place", "frozen_names", "hf_layer_jacobian", "reference_jacobian"]


def frozen_names(model) -> list[str]:
    """The hooks the frozen Jacobian holds fixed: every attention pattern, norm scale and MoE router weight."""
    return [n for n in model.hook_dict if n.endswith(("attn.hook_pattern", ".hook_scale", "mlp.hook_expert_weights"))]


def _recorded(model, tokens: Tensor, names: list[str]) -> tuple[Tensor, dict[str, list[Tensor]]]:
    values: dict[str, list[Tensor]] = defaultdict(list)
    hooks = [(n, lambda x, hook: values[hook.name].append(x.detach().clone())) for n in names]
    hooks.append(("blocks.0.hook_resid_pre", lambda x, hook: values["v0"].append(x.detach().clone())))
    with torch.no_grad():
        model.run_with_hooks(tokens[None], fwd_hooks=hooks)
    return values.pop("v0")[0][0], values


def reference_jacobian(model, tokens: Tensor, *, frozen: bool) -> Tensor:
    """``∂y_n/∂v_i`` for every position i, ``[d_out, pos, d_in]``, by ``jacrev`` of the full model."""
    from lens_squash.edge.backends import is_bridge

    if is_bridge(model):
        from .families import hf_reference
        from .hf_families import hf_jacobian

        return hf_jacobian(hf_reference(model), tokens, frozen=frozen)
    names = frozen_names(model) if frozen else []
    v0, values = _recorded(model, tokens, names)
    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"

    def f(v: Tensor) -> Tensor:
        seen: dict[str, Tensor] = {}
        calls: dict[str, int] = defaultdict(int)

        def replay(x, hook):
            value = values[hook.name][calls[hook.name]]
            calls[hook.name] += 1
            return value

        def keep(x, hook):
            seen["resid"] = x

        # y_n inside the one full pass, so the final norm's scale is replayed like every other
        out = "ln_final.hook_normalized" if "ln_final.hook_normalized" in model.hook_dict else last
        hooks = [("blocks.0.hook_resid_pre", lambda x, hook: v[None]), *[(n, replay) for n in names], (out, keep)]
        model.run_with_hooks(tokens[None], fwd_hooks=hooks)
        y = seen["resid"][0, -1]
        if out != last:
            ln = model.ln_final
            y = y * ln.w if hasattr(ln, "w") else y
            y = y + ln.b if hasattr(ln, "b") else y
        return y

    return torch.func.jacrev(f)(v0).detach()


def hf_layer_jacobian(bridge, tokens: Tensor, *, layer="final", wrt: int = 0, target_pos: int = -1) -> Tensor:
    """``∂y/∂x`` ``[d_out, pos, d_in]`` of a bridge ``families.build`` made, by plain autograd on its
    untouched transformers copy: ``x`` decoder layer ``wrt``'s input, ``y`` layer ``layer``'s output at
    ``target_pos`` (``"final"``: the final norm's output). No TransformerLens, no lens_squash code."""
    from .families import hf_reference
    from .hf_families import _decoder_layers

    hf = hf_reference(bridge)
    layers = _decoder_layers(hf)
    seen: dict[str, Tensor] = {}

    def keep_input(module, args, kwargs) -> None:
        seen.setdefault("x", (args[0] if args else kwargs["hidden_states"]).detach()[0])

    handle = layers[wrt].register_forward_pre_hook(keep_input, with_kwargs=True)
    try:
        with torch.no_grad():
            hf(input_ids=tokens[None])
    finally:
        handle.remove()

    def f(x: Tensor) -> Tensor:
        def swap(module, args, kwargs):
            return ((x[None], *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x[None]})

        def keep_output(module, args, output) -> None:
            seen["y"] = (output[0] if isinstance(output, tuple) else output)[0, target_pos]

        handles = [layers[wrt].register_forward_pre_hook(swap, with_kwargs=True)]
        if layer != "final":
            handles.append(layers[layer].register_forward_hook(keep_output))
        try:
            out = hf.base_model(input_ids=tokens[None]).last_hidden_state[0, target_pos]
        finally:
            for h in handles:
                h.remove()
        return out if layer == "final" else seen["y"]

    with input_grad_only(hf):
        return torch.autograd.functional.jacobian(f, seen["x"])


def _norms(model):
    for block in model.blocks:
        for name in ("ln1", "ln2", "ln1_post", "ln2_post"):
            gain = getattr(getattr(block, name, None), "w", None)
            if gain is not None:
                yield name, block, gain


def _experts(mlp) -> list:
    """A HookedTransformer's expert modules; a bridge's fused ``transformers`` experts as one
    ``(gate_up_proj [expert, 2·d_mlp, d_model], down_proj [expert, d_model, d_mlp])`` pair."""
    experts = getattr(mlp, "experts", None)
    if experts is None or isinstance(experts, torch.nn.ModuleList):
        return list(experts or [])
    if getattr(experts, "is_transposed", False):  # GPT-OSS stores [expert, in, out]: edit through [out, in] views
        return [(experts.gate_up_proj.transpose(-1, -2), experts.down_proj.transpose(-1, -2))]
    return [(experts.gate_up_proj, experts.down_proj)]


def _expert_outs(mlp) -> list[Tensor]:
    """Every expert's output weights (``[d_model, d_mlp]`` or fused ``[expert, d_model, d_mlp]``)."""
    return [_expert_outs_of(e) for e in _experts(mlp)]


def _expert_outs_of(expert) -> Tensor:
    return expert[1] if isinstance(expert, tuple) else expert.W_out.weight


def _shrink(factor: float):
    def edit(model):
        for block in model.blocks:
            block.attn.W_O.mul_(factor)
            if hasattr(getattr(block, "mlp", None), "W_out"):
                block.mlp.W_out.mul_(factor)
            for weight in _expert_outs(getattr(block, "mlp", None)):
                weight.mul_(factor)

    return edit


def _amplifying_gains(model):
    """Gains that amplify the coordinates a sublayer writes most (hurts output norms, OLMo-2 and Gemma-2)."""
    for _, block, gain in _norms(model):
        writes = block.attn.W_O.detach().double().pow(2).sum(dim=(0, 1)).sqrt()  # [d_model]
        gain.copy_((1 + 30 * writes / writes.max()).to(gain.dtype))


def _large_random_gains(model):
    generator = torch.Generator().manual_seed(11)
    for _, _, gain in _norms(model):
        gain.copy_((10 ** (2.3 * torch.rand(gain.shape, generator=generator, dtype=torch.float64) - 1)).to(gain.dtype))


def _split_gains(model):
    """Sublayers that read one half of the coordinates and write the other, with tiny gains on the half
    they read and large ones on the half they write: a gain counted on the wrong side of W_OV (or of
    the MLP) is off by 64× per layer."""
    d = model.cfg.d_model
    read, write = torch.arange(d) < d // 2, torch.arange(d) >= d // 2
    for block in model.blocks:
        attn = block.attn
        (attn._W_V if hasattr(attn, "_W_V") else attn.W_V)[:, write, :] = 0
        attn.W_O[:, :, read] = 0
        mlp = getattr(block, "mlp", None)
        for name in ("W_in", "W_gate"):
            if isinstance(getattr(mlp, name, None), torch.nn.Parameter):
                getattr(mlp, name)[write, :] = 0
        if isinstance(getattr(mlp, "W_out", None), torch.nn.Parameter):
            mlp.W_out[:, read] = 0
        for expert in _experts(mlp):  # nn.Linear weights are [out, in]; fused ones [expert, out, in]
            inputs = list(expert[:1]) if isinstance(expert, tuple) else [expert.W_gate.weight, expert.W_in.weight]
            for weight in inputs:
                weight[..., write] = 0
            _expert_outs_of(expert)[..., read, :] = 0
    for _, _, gain in _norms(model):
        gain.copy_(torch.where(write, 8.0, 0.125).to(gain.dtype))


def _cancelling_values(model):
    """Two value dimensions whose contributions to W_V W_O cancel, one of them pushed into saturation by
    its bias: under ``clip_qkv`` the clamp kills one and the head writes what ‖W_V W_O‖ says is zero.
    Without a value bias (most ``transformers`` twins) the first dimension saturates by its weights
    (×30), the second is a copy scaled down by 300 whose ``W_O`` row is scaled up by 300, and the other
    dimensions stay (a head writing nothing at all leaves a bridge's pattern hooks nothing to act on)."""
    for block in model.blocks:
        attn = block.attn
        w_v = attn._W_V if hasattr(attn, "_W_V") else attn.W_V
        b_v = attn._b_V if hasattr(attn, "_b_V") else attn.b_V
        if b_v is None:
            w_v[..., 0] *= 30.0
            w_v[..., 1] = w_v[..., 0] / 300.0
            attn.W_O[:, 1, :] = -300.0 * attn.W_O[:, 0, :]
            continue
        w_v[..., 1] = w_v[..., 0]
        attn.W_O[:, 1, :] = -attn.W_O[:, 0, :]
        attn.W_O[:, 2:, :] = 0  # so W_V W_O = 0 exactly
        b_v[:, 0] = 10.0


def _sharp(model):
    """Sharp patterns and heavy learned sinks."""
    for block in model.blocks:
        block.attn.W_Q.mul_(6)
        if hasattr(block.attn, "sinks"):
            block.attn.sinks.add_(3.0)


#: name -> in-place edit (run under no_grad)
ADVERSARIAL = {
    "shrink_0.3": _shrink(0.3),
    "shrink_0.1": _shrink(0.1),
    "shrink_0.01": _shrink(0.01),
    "split_gains": _split_gains,
    "cancelling_values": _cancelling_values,
    "amplifying_gains": _amplifying_gains,
    "large_random_gains": _large_random_gains,
    "sharp_patterns": _sharp,
}


def adversarial(model, name: str):
    from lens_squash.edge.backends import is_bridge

    before = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        ADVERSARIAL[name](model)
    # a bridge exposes some weights as copies: an edit that never reached the model is no attack
    if is_bridge(model) and all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)):
        raise AssertionError(f"the {name} edit did not reach this bridge's weights")
    return model


def edit_in_place(model, factor: float = 1.7) -> None:
    """Scale block 1's W_O and MLP output weights in place, the way ablation and steering edit models."""
    block = model.blocks[1]
    with torch.no_grad():
        block.attn.W_O.mul_(factor)
        mlp = getattr(block, "mlp", None)
        if mlp is None:
            return
        if hasattr(mlp, "W_out"):
            mlp.W_out.mul_(factor)
        for weight in _expert_outs(mlp):
            weight.mul_(factor)


@contextlib.contextmanager
def input_grad_only(module):
    """Parameters out of autograd for the block: jacrev would otherwise build per-cotangent weight
    gradients (~20 GB on SmolLM2); the input gradient is all a Jacobian needs."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


_NON_FINITE = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), None: float("nan")}


def _json_numbers(node):
    """The numbers a JSON node holds for a tensor, flat: a tagged ``{"__type__": "tensor"}`` (non-finite
    values as strings) or a plain nested list (non-finite values as null)."""
    import numpy as np

    if isinstance(node, dict):
        assert node.get("__type__") == "tensor", node
        flat, shape = node["data"], node["shape"]
        if isinstance(flat, str):  # typed base64: the little-endian bytes of the dtype numpy names the same
            import base64

            little = np.dtype(node["dtype"].replace("bool", "bool_")).newbyteorder("<")
            return np.frombuffer(base64.b64decode(flat), dtype=little).astype(float), shape
    else:
        flat = np.ravel(np.array(node, dtype=object)).tolist()
        shape = None
    return np.array([_NON_FINITE[v] if v is None or isinstance(v, str) else v for v in flat], dtype=float), shape


def _untag(node, tag):
    return node["items"] if isinstance(node, dict) and node.get("__type__") == tag else node


def assert_json_carries(result) -> dict:
    """``result.to_dict()`` survives strict ``json.dumps``/``loads`` (no NaN literals) and holds every
    field's *value*: tensors element by element against numpy (NaN where the file says null/"nan"),
    floats exactly, tuples and dicts item by item, nested results recursively. When the class has
    ``from_dict`` (the result contract), what it loads back must equal the original, bit for bit."""
    import dataclasses
    import json
    import math

    import numpy as np

    loaded = json.loads(json.dumps(result.to_dict(), allow_nan=False))

    def same(expected, got, where):
        if dataclasses.is_dataclass(expected):
            assert isinstance(got, dict), where
            for f in dataclasses.fields(expected):
                if f.metadata.get("written_if_any") and f.name not in got and not getattr(expected, f.name):
                    continue  # an empty field written only when it holds something (metrics_field)
                if f.init and f.name not in got.get("__dropped__", {}):
                    assert f.name in got, f"{where}.{f.name} missing from to_dict()"
                    same(getattr(expected, f.name), got[f.name], f"{where}.{f.name}")
        elif isinstance(expected, torch.Tensor):
            if isinstance(got, dict) and got.get("__type__") == "ref":
                return  # a tensor written once already; the from_dict check below covers it
            have, shape = _json_numbers(got)
            assert shape is None or shape == list(expected.shape), (where, shape, tuple(expected.shape))
            want = expected.detach().cpu().to(torch.float64).numpy().ravel()
            np.testing.assert_array_equal(have, want, err_msg=where)  # NaN == NaN here
        elif isinstance(expected, dict):
            got = dict(map(tuple, got["items"])) if isinstance(got, dict) and got.get("__type__") == "dict" else got
            assert set(map(str, expected)) <= set(map(str, got)), (where, sorted(expected), sorted(got))
            for key, value in expected.items():
                same(value, got[key] if key in got else got[str(key)], f"{where}[{key!r}]")
        elif isinstance(expected, (list, tuple)):
            got = _untag(got, "tuple")
            assert len(expected) == len(got), where
            for i, (a, b) in enumerate(zip(expected, got, strict=True)):
                same(a, b, f"{where}[{i}]")
        elif isinstance(expected, float) and not math.isfinite(expected):
            value = got["value"] if isinstance(got, dict) and got.get("__type__") == "float" else got
            assert (math.isnan(expected) and value in (None, "nan")) or value == str(expected), (where, got)
        elif isinstance(expected, (bool, int, float, str)) or expected is None:
            assert got == expected and (type(got) is type(expected) or (type(expected), type(got)) == (float, int)), (
                where,
                expected,
                got,
            )
        else:
            assert got == str(expected) or isinstance(got, dict), (where, expected, got)

    def equal(a, b, where):
        if dataclasses.is_dataclass(a):
            assert type(a) is type(b), where
            for f in dataclasses.fields(a):
                if f.init and f.name not in loaded.get("__dropped__", {}):
                    equal(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
        elif isinstance(a, torch.Tensor):
            assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
            assert torch.equal(a.nan_to_num(), b.nan_to_num()) and torch.equal(a.isnan(), b.isnan()), where
        elif isinstance(a, dict):
            assert set(a) == set(b), where
            for key in a:
                equal(a[key], b[key], f"{where}[{key!r}]")
        elif isinstance(a, (list, tuple)):
            assert type(a) is type(b) and len(a) == len(b), where
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                equal(x, y, f"{where}[{i}]")
        elif isinstance(a, float) and math.isnan(a):
            assert isinstance(b, float) and math.isnan(b), where
        else:
            assert a == b, (where, a, b)

    same(result, loaded, type(result).__name__)
    from_dict = getattr(type(result), "from_dict", None)
    if from_dict is not None:  # the contract's loader, once a result has one
        equal(result, from_dict(loaded), f"{type(result).__name__}.from_dict")
    return loaded
