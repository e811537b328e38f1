"""Facts about a TransformerBridge established by running it (see :mod:`lens_squash.edge.adapter`).

Each check compares what a module returned with what the read facts predict, in the model's own
dtype with a tolerance of ``max(1e-4, 20 eps)`` relative (float32 rounding is ~1e-7, bfloat16's
~4e-3; a wrong convention or a missing norm is off by O(1)). A check that fails records the method it rules out and why.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..algebra.blocks import INSTEAD, BlockShape
from ..core.support import UnsupportedModelError
from .adapter_guard import (
    check_against_wrapped,
    check_attention,
    check_known_sublayers,
    forward_failure,
    hooked_output,
    readable,
)
from .adapter_mlp import check_mlp, check_moe, gap
from .adapter_mlp import close as _close
from .hook_flags import per_head_norms_hooked

__all__ = ["PATTERN_FREEZE", "QK_FREEZE", "BridgeProbe", "pattern_acts", "probe_bridge", "probe_norm"]

_SITES = ("ln1", "ln2", "ln1_post", "ln2_post")
_FROZEN_INSTEAD = "use mode='exact' or mode='sketch', or a HookedTransformer (transformer-lens>=3.9,<4)"


#: hooks whose detach freezes the attention pattern: the pattern itself where the bridge computes
#: attention in TransformerLens (its hook_pattern feeds the output), else the queries and keys, which
#: enter attention only through the scores ``q·k`` (OPT's and GPT-J's bridges run transformers' own
#: attention and fire hook_pattern after the fact): with both detached the pattern is a constant and
#: the values still carry the input, which is exactly the frozen-pattern map ``z = A v``
PATTERN_FREEZE = ("attn.hook_pattern",)
QK_FREEZE = ("attn.hook_q", "attn.hook_k")


@dataclass
class BridgeProbe:
    shape: BlockShape | None
    mlp_kind: str
    unsupported: dict[str, str] = field(default_factory=dict)
    #: hook suffixes whose detach freezes the pattern (:data:`PATTERN_FREEZE` or :data:`QK_FREEZE`)
    pattern_freeze: tuple[str, ...] = PATTERN_FREEZE


def probe_norm(module) -> tuple[bool, str]:
    """``(centred, convention)`` of a bridge norm module, from its outputs on ``±x`` and ``x + c``.

    The odd part ``(N(x) − N(−x)) / 2 = n(x) ⊙ γ`` gives the effective gain γ (``n`` is the plain
    normalisation; ``|x| ≈ 100`` makes ε negligible); it must equal the module's ``w`` ("w"),
    ``1 + w`` ("1+w"), or 1 without a weight ("none")."""
    weight = getattr(module, "w", None)
    if weight is None:
        weight = getattr(getattr(module, "original_component", None), "weight", None)
    ref = weight if isinstance(weight, Tensor) else next(module.parameters(), torch.zeros(()))
    d = _width(module, weight)
    x = 100.0 * torch.randn(1, 6, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x.to(ref.device, ref.dtype if ref.is_floating_point() else torch.float32)
    with torch.no_grad():
        plus, minus, shifted = module(x), module(-x), module(x + 100.0)  # a shift as large as x itself
    centred = _close(shifted, plus)
    xc = (x - x.mean(-1, keepdim=True)) if centred else x
    n = (xc / xc.double().pow(2).mean(-1, keepdim=True).sqrt().to(xc.dtype)).double()
    odd = (plus.double() - minus.double()) / 2
    gain = (odd * n).sum((0, 1)) / (n * n).sum((0, 1))
    candidates = {"none": torch.ones_like(gain)}
    if isinstance(weight, Tensor):
        candidates = {"w": weight.detach().double(), "1+w": 1.0 + weight.detach().double(), **candidates}
    for convention, value in candidates.items():
        if _close(gain, value.reshape(gain.shape), dtype=x.dtype):
            return centred, convention
    raise UnsupportedModelError(
        f"the norm {type(module).__name__} scales by neither its weight w nor 1 + w, so its gain is unknown; {INSTEAD}"
    )


def _width(module, weight) -> int:
    if isinstance(weight, Tensor):
        return weight.shape[-1]
    shape = getattr(getattr(module, "original_component", module), "normalized_shape", None)
    if shape is not None:
        return int(shape[-1])
    raise UnsupportedModelError(f"cannot tell the width of the norm {type(module).__name__}; {INSTEAD}")


# ------------------------------------------------------------------------------------------------
# One recorded forward pass


class _Recorder:
    """Forward hooks on block 0's modules: the first tensor each one read and the tensor it returned."""

    def __init__(self, block):
        self.inputs: dict[str, Tensor] = {}
        self.extra: dict[str, Tensor | None] = {}
        self.outputs: dict[str, Tensor] = {}
        self.fallback_out: dict[str, Tensor] = {}
        self.calls: dict[str, tuple] = {}
        self.handles = []
        for name in (*_SITES, "attn", "mlp"):
            module = getattr(block, name, None)
            if isinstance(module, torch.nn.Module):
                self.handles.append(module.register_forward_hook(self._hook(name), with_kwargs=True))
                self._hook_points(module, name)
        self.handles.append(block.register_forward_hook(self._hook("block"), with_kwargs=True))

    def _hook_points(self, module, name: str) -> None:
        """The component's own ``hook_in``/``hook_out``: what it saw where the wrapped model calls the
        ``transformers`` submodules directly (OPT's MLP never runs as one module)."""
        hook_in, hook_out = getattr(module, "hook_in", None), getattr(module, "hook_out", None)
        if not (isinstance(hook_in, torch.nn.Module) and isinstance(hook_out, torch.nn.Module)):
            return

        def seen_in(mod, args, output):
            self.inputs.setdefault(name, output.detach())
            self.extra.setdefault(name, None)

        def seen_out(mod, args, output):
            self.fallback_out.setdefault(name, output.detach())

        self.handles += [hook_in.register_forward_hook(seen_in), hook_out.register_forward_hook(seen_out)]

    def _hook(self, name: str):
        def hook(module, args, kwargs, output):
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor) and a.is_floating_point()]
            if name in self.outputs or not tensors:
                return
            self.inputs[name] = tensors[0].detach()
            # BLOOM's attention and MLP take the residual and add it to what they return
            self.extra[name] = (
                tensors[1].detach() if len(tensors) > 1 and tensors[1].shape == tensors[0].shape else None
            )
            self.outputs[name] = (output[0] if isinstance(output, tuple) else output).detach()
            self.calls[name] = (args, kwargs)  # to rerun the wrapped transformers module on the same inputs

        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        for name, value in self.fallback_out.items():
            self.outputs.setdefault(name, value)


def _contribution(rec: _Recorder, name: str) -> Tensor:
    """What a sublayer module adds: its output, less the residual it was handed (BLOOM)."""
    extra = rec.extra.get(name)
    out = rec.outputs[name]
    if extra is not None and not _close(out, out - extra):
        return out - extra
    return out


def probe_bridge(
    model,
    *,
    activation: Callable,
    mlp_matrices: Callable,
    mlp_biases: Callable,
    runnable: Callable,
    experts: Callable,
    clip: float | None = None,
) -> BridgeProbe:
    """Block shape, MLP kind and frozen-hook effect of a bridge, from short forward passes.

    Every block is checked, not only the first: its residual update must be ``x + attention + MLP`` as
    read, its MLP and attention must compute what the read weights say, and its shape and MLP kind
    must be block 0's (a dense first layer before MoE ones, a layer with a multiplier). Whatever fails
    refuses the certified bound, so an architecture nobody listed is refused rather than wrong."""
    blocks = list(model.blocks)
    for block in blocks:
        if not (hasattr(block, "attn") and readable(block.attn, "W_V") and readable(block.attn, "W_O")):
            raise UnsupportedModelError(
                f"{type(block).__name__} has no attention with readable W_V / W_O (multi-head latent attention, "
                "an SSM or a hybrid layer): lens_squash analyses causal attention transformers (decoder-only) "
                "with per-head value and output matrices"
            )
        check_known_sublayers(block)
    tokens = _tokens(model)
    recs = _recorders(model, blocks)
    try:
        with torch.no_grad(), runnable(model):
            model(tokens)
    except (RuntimeError, AttributeError, NotImplementedError, TypeError, IndexError, KeyError) as error:
        raise forward_failure(model, error) from error
    finally:
        for rec in recs:
            rec.close()
    _check_causal(model, tokens)
    for layer, (rec, block) in enumerate(zip(recs, blocks, strict=True)):
        check_against_wrapped(layer, block, rec.calls.get("attn"), rec.outputs.get("attn"))
    kind = _mlp_kind(blocks[0])
    unsupported: dict[str, str] = {}
    shape = None
    try:
        shape = _block_facts(recs[0], blocks[0], kind, activation, mlp_matrices, mlp_biases, experts, clip)
        for layer in range(1, len(blocks)):
            _same_as_first(layer, shape, kind, recs[layer], blocks[layer], activation, mlp_matrices, mlp_biases,
                           experts, clip)  # fmt: skip
    except UnsupportedModelError as error:
        unsupported["certified"] = str(error)
    with runnable(model), per_head_norms_hooked(model):  # as the frozen passes run it (edge/backward.py)
        freeze = PATTERN_FREEZE if pattern_acts(model, tokens) else QK_FREEZE
        frozen = _frozen_problem(model, tokens, kind, freeze)
    if frozen is not None:
        unsupported["frozen"] = frozen
    return BridgeProbe(shape, kind, unsupported, freeze)


def _recorders(model, blocks: list) -> list[_Recorder]:
    """One recorder per block, each also keeping its router's weights and its attention pattern."""
    recs = [_Recorder(block) for block in blocks]
    for layer, rec in enumerate(recs):
        for hook, key in (("mlp.hook_expert_weights", "routing"), ("attn.hook_pattern", "pattern")):
            point = model.hook_dict.get(f"blocks.{layer}.{hook}")
            if point is not None:  # routing: the MoE's final per-expert weights, [token, expert]
                rec.handles.append(point.register_forward_hook(_keeper(rec.extra, key)))
    return recs


def _keeper(store: dict, key: str) -> Callable:
    def keep(module, args, output) -> None:
        store.setdefault(key, output.detach())

    return keep


def _block_facts(rec, block, kind, activation, mlp_matrices, mlp_biases, experts, clip) -> BlockShape:
    shape = _shape(rec, block, kind)
    if kind in ("plain", "gated"):
        check_mlp(rec.inputs["mlp"], _contribution(rec, "mlp"), block, activation, mlp_matrices, mlp_biases)
    elif kind == "moe":
        check_moe(rec.inputs["mlp"], _contribution(rec, "mlp"), rec.extra.get("routing"), block, experts)
    _check_attention(rec, block, clip)
    return shape


def _check_attention(rec: _Recorder, block, clip: float | None) -> None:
    pattern = rec.extra.get("pattern")
    if pattern is None or "attn" not in rec.inputs or "attn" not in rec.outputs:
        raise UnsupportedModelError(f"the attention of {type(block).__name__} fired no hook_pattern; {INSTEAD}")
    check_attention(block, rec.inputs["attn"], _contribution(rec, "attn"), pattern, clip)


def _same_as_first(layer, first, kind, rec, block, *readers) -> None:
    other_kind = _mlp_kind(block)
    if other_kind != kind:
        raise UnsupportedModelError(
            f"block {layer}'s MLP is {other_kind} where block 0's is {kind}; the certified bound reads one MLP kind "
            f"for every layer; {INSTEAD}"
        )
    other = _block_facts(rec, block, kind, *readers)
    if other != first:
        raise UnsupportedModelError(
            f"block {layer} ({type(block).__name__}) is shaped differently from block 0 (norms or parallel "
            f"sublayers); the certified bound reads one block shape for every layer; {INSTEAD}"
        )


def _check_causal(model, tokens: Tensor) -> None:
    """Changing the last token must leave every earlier position's output as it was."""
    other = tokens.clone()
    other[0, -1] = (other[0, -1] + 1) % max(int(model.cfg.d_vocab), 2)
    with torch.no_grad():
        a, b, again = model(tokens), model(other), model(tokens)
    if torch.isfinite(a).all() and not _close(a, again):  # else a drifting hook would read as non-causal
        raise RuntimeError(
            "two identical forward passes of this bridge gave different outputs: a hook on the model edits it "
            "differently on every call; remove it (model.reset_hooks()) or make it deterministic"
        )
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        # NaN compares unequal to itself: name the non-finite weight instead of calling the model non-causal
        from .finite import check_finite_weights

        check_finite_weights(model)
        return  # finite weights, non-finite outputs: the trace's own check names what overflowed
    if not _close(a[0, :-1], b[0, :-1]):
        raise UnsupportedModelError(
            f"{type(getattr(model, 'original_model', model)).__name__} is not causal (changing the last token changes "
            "earlier outputs): lens_squash analyses decoder-only causal attention models; bidirectional and "
            "encoder-decoder models are not supported"
        )


def _mlp_kind(block) -> str:
    mlp = getattr(block, "mlp", None)
    if mlp is None:
        return "none"
    if hasattr(mlp, "experts") or "MoE" in type(mlp).__name__:
        return "moe"
    return "plain" if getattr(mlp, "W_gate", None) is None else "gated"


def _reads(rec: _Recorder, site: str, candidates: dict[str, Tensor]) -> str | None:
    for label, value in candidates.items():
        if site in rec.inputs and _close(rec.inputs[site], value):
            return label
    return None


def _shape(rec: _Recorder, block, kind: str) -> BlockShape:
    """Where each norm sits, proven from what every module read in the recorded pass."""
    if "block" not in rec.inputs or "attn" not in rec.outputs:
        raise UnsupportedModelError(f"block 0 ({type(block).__name__}) did not run its attention; {INSTEAD}")
    x = rec.inputs["block"]
    attn_raw = _contribution(rec, "attn")
    sites = [s for s in _SITES if s in rec.inputs]
    sources = {"x": x, "attn": attn_raw}
    if "mlp" in rec.outputs:
        sources["mlp"] = _contribution(rec, "mlp")
    reads = {site: _reads(rec, site, sources) for site in sites}
    attn_out = tuple(s for s in sites if reads[s] == "attn")
    attn_write = rec.outputs[attn_out[-1]] if attn_out else attn_raw
    mid = x + attn_write
    for site in sites:  # mid where it is the closer of the two: in 16 bits, x + a small write is within 20 eps of x
        if reads[site] in (None, "x") and _close(rec.inputs[site], mid):
            if reads[site] is None or gap(rec.inputs[site], mid) < gap(rec.inputs[site], x):
                reads[site] = "mid"
    unknown = [s for s in sites if reads[s] is None]
    if unknown:
        raise UnsupportedModelError(
            f"cannot establish what the norm {unknown[0]} of {type(block).__name__} reads (not the residual x, "
            f"x + attention, or a sublayer's output: a residual multiplier?); {INSTEAD}"
        )
    attn_in = _fed_by(rec, "attn", [s for s in sites if reads[s] == "x"], x)
    if kind == "none":
        return BlockShape(attn_in, attn_out, None, (), parallel=False, attn_only=True, value_clip=False)
    if "mlp" not in rec.inputs or "mlp" not in rec.outputs:
        raise UnsupportedModelError(
            f"the MLP of {type(block).__name__} did not run as a module with hooks, so what it reads is unknown; "
            f"{INSTEAD}"
        )
    pre = [s for s in sites if reads[s] in ("x", "mid")]
    mlp_in = _fed_by(rec, "mlp", pre, None)
    parallel = (reads[mlp_in] == "x") if mlp_in is not None else _close(rec.inputs["mlp"], x)
    if mlp_in is None and not parallel and not _close(rec.inputs["mlp"], mid):
        raise UnsupportedModelError(f"cannot establish what the MLP of {type(block).__name__} reads; {INSTEAD}")
    mlp_out = tuple(s for s in sites if reads[s] == "mlp")
    mlp_write = rec.outputs[mlp_out[-1]] if mlp_out else sources["mlp"]
    if not _close(rec.outputs["block"], x + attn_write + mlp_write):
        raise UnsupportedModelError(
            f"the output of {type(block).__name__} is not x + attention + MLP as read (a residual form the "
            f"certified bound does not model); {INSTEAD}"
        )
    return BlockShape(
        attn_in, attn_out, mlp_in, mlp_out, parallel=parallel, attn_only=False, value_clip=False, moe=kind == "moe"
    )


def _fed_by(rec: _Recorder, sublayer: str, norms: list[str], raw: Tensor | None) -> str | None:
    """The norm whose output ``sublayer`` read, or None when it read ``raw`` (no norm)."""
    for site in norms:
        if _close(rec.inputs[sublayer], rec.outputs[site]):
            return site
    if raw is not None and _close(rec.inputs[sublayer], raw):
        return None
    if raw is None:
        return None
    raise UnsupportedModelError(f"cannot establish which norm the {sublayer} of block 0 reads; {INSTEAD}")


def _probed_layers(model) -> list[int]:
    return sorted({0, model.cfg.n_layers - 1})


def _acts(model, tokens: Tensor, name: str, base: Tensor) -> bool:
    """Replacing ``name``'s value changes the output (a hook fired after the fact does not)."""
    with warnings.catch_warnings():  # TransformerLens warns that a post-hoc pattern edit is discarded: we test that
        warnings.simplefilter("ignore", UserWarning)
        with model.hooks(fwd_hooks=[(name, _replacement(name))]):
            changed = model(tokens)
    return not torch.equal(changed, base)


def pattern_acts(model, tokens: Tensor | None = None) -> bool:
    """Whether replacing ``hook_pattern`` (block 0 and the last block) changes the bridge's output."""
    tokens = _tokens(model) if tokens is None else tokens
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in _probed_layers(model)]
    if any(name not in model.hook_dict for name in names):
        return False
    with torch.no_grad():
        base = model(tokens)
        return all(_acts(model, tokens, name, base) for name in names)


def _tokens(model) -> Tensor:
    return torch.arange(1, 6, device=model.cfg.device)[None] % max(int(model.cfg.d_vocab), 2)


def _frozen_problem(model, tokens: Tensor, kind: str, freeze: tuple[str, ...]) -> str | None:
    """Why the frozen mode would not freeze what it claims, or None: replacing each frozen hook's value
    (a uniform causal pattern, halved queries or keys, a doubled scale) must change the output."""
    if kind == "moe" and not any(n.endswith("mlp.hook_expert_weights") for n in model.hook_dict):
        return (
            "this TransformerBridge's mixture-of-experts router has no hook_expert_weights to freeze, so a frozen "
            f"Jacobian would keep the routing live; {_FROZEN_INSTEAD}"
        )
    names = [f"blocks.{layer}.{suffix}" for layer in _probed_layers(model) for suffix in freeze]
    names += [f"blocks.0.{site}.hook_scale" for site in _SITES if f"blocks.0.{site}.hook_scale" in model.hook_dict]
    names += ["ln_final.hook_scale"] if "ln_final.hook_scale" in model.hook_dict else []
    names += ["blocks.0.mlp.hook_expert_weights"] if kind == "moe" else []
    with torch.no_grad():
        base = model(tokens)
        for name in names:
            if name not in model.hook_dict:
                return f"this bridge has no {name}, so the frozen mode cannot freeze it; {_FROZEN_INSTEAD}"
            if not _acts(model, tokens, name, base):
                return (
                    f"replacing {name} leaves this bridge's output unchanged (its forward pass does not use the "
                    f"hooked value), so a frozen Jacobian would keep that quantity live; {_FROZEN_INSTEAD}"
                )
        suffixes = (".hook_scale", *freeze, "mlp.hook_expert_weights")
        if not _close(hooked_output(model, tokens, [n for n in model.hook_dict if n.endswith(suffixes)]), base):
            return (
                "attaching the frozen mode's hooks (each returning its value unchanged) changes this bridge's output: "
                f"its hooked path computes another model (a norm's 1 + w gain read as w?); {_FROZEN_INSTEAD}"
            )
    return None


def _replacement(name: str):
    def replace(value: Tensor, hook) -> Tensor:
        if name.endswith("hook_expert_weights"):  # [tokens, expert]: uniform routing
            return torch.full_like(value, 1.0 / value.shape[-1])
        if name.endswith("hook_pattern"):
            n = value.shape[-1]
            causal = torch.tril(torch.ones(n, n, dtype=value.dtype, device=value.device))
            return (causal / causal.sum(-1, keepdim=True)).expand_as(value).clone()
        if name.endswith(("hook_q", "hook_k")):
            return value * 0.5
        return value * 2.0

    return replace
