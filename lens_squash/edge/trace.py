"""One hooked forward pass that captures what every over-squashing analysis needs.

``trace(model, prompt)`` runs the model once with hooks that keep only reduced quantities (never the
full activation cache): the attention patterns ``A^(l,h)`` (paper §5), the norm scales that the
certified bound freezes (DESIGN §3), the residual-stream norms that reveal massive activations, the
norm of what each head writes per unit of attention from each key (``‖v_k W_O^h‖``, for the
value-weighted variants), the last token's final representation ``y_n`` and its next-token logits.

Hook names are written out literally (``blocks.{l}.attn.hook_pattern``) so the same code runs on a
:class:`HookedTransformer` and on a ``TransformerBridge`` in compatibility mode.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..algebra.attention import attention_defects
from ..algebra.attention_check import AttentionCheck, spectral_atol
from ..algebra.attention_stream import AttentionStream, AttentionSummary, summarize_attention
from ..core.display import compact_repr
from ..core.progress import counter
from ..core.records import provenance
from ..core.results import Result, heavy, top_k
from ..core.support import UnsupportedModelError
from ..core.topk import TopK
from .adapter import functorch_ready, learned_sinks, norm_facts
from .backends import has_hooked_transformer, is_bridge
from .cache_replay import replay_cache
from .fast_attention import fast_attention
from .finite import check_finite_values, check_finite_weights
from .gain_hooks import mlp_gain_hooks, mlp_gains, stack_layers
from .hook_flags import check_fork_unhooked
from .lipschitz import supports_certified
from .prompts import as_tokens  # the one conversion of a prompt (re-exported: callers import it from here)

__all__ = ["Trace", "as_tokens", "final_representation", "required_hooks", "trace"]


@dataclass(frozen=True, eq=False)
class Trace(Result):
    """What one forward pass of ``model`` on ``tokens`` showed. Tensors are on the CPU.

    Analysis tensors are float32 (float64 when the model is float64), whatever the model's dtype.
    Norm scales are ``None`` for models without that norm; ``ln1_scale``/``ln2_scale`` are
    ``blocks.{l}.ln1/ln2.hook_scale`` wherever those norms sit (before the sublayers in pre-norm
    models, on their outputs in OLMo-2: :mod:`lens_squash.algebra.blocks` says which). ``mlp_gain`` is
    ``‖J_MLP‖_F`` with every frozen norm around the MLP included. The algebra reads the typed fields
    (``attention_check``…); ``provenance`` is written once, for a reader, and never read back.
    """

    tokens: Int[Tensor, "pos"]
    str_tokens: tuple[str, ...]
    #: ``None`` when the trace streamed them (long prompts: see ``keep_patterns`` in :func:`trace`)
    patterns: Float[Tensor, "layer head query_pos key_pos"] | None = heavy()
    ln1_scale: Float[Tensor, "layer pos"] | None
    ln2_scale: Float[Tensor, "layer pos"] | None
    final_scale: Float[Tensor, "pos"] | None
    resid_norms: Float[Tensor, "layers_covered pos"]
    first_token_resid: Float[Tensor, "layers_covered d_model"]
    value_norms: Float[Tensor, "layer head pos"] | None
    y_last: Float[Tensor, "d_model"]
    #: the last position's next-token logits; a light file (``to_dict(heavy=False)``, what the CLI
    #: writes) keeps the top 50 of them, loaded back as a :class:`~lens_squash.core.topk.TopK`
    last_logits: Float[Tensor, "d_vocab"] | TopK = top_k(50)
    predicted_token: str
    provenance: dict[str, Any] = field(default_factory=dict)
    resid: Float[Tensor, "layers_covered pos d_model"] | None = heavy(default=None)
    mlp_gain: Float[Tensor, "layer pos"] | None = None
    #: the head-mean pattern of every layer, kept so head-averaged bound rows read L·n² numbers, not L·H·n²
    mean_patterns: Float[Tensor, "layer query_pos key_pos"] | None = heavy(default=None)
    #: scales of the norms Gemma-2/3 apply to what attention and the MLP write (``ln1_post``, ``ln2_post``)
    ln1_post_scale: Float[Tensor, "layer pos"] | None = None
    ln2_post_scale: Float[Tensor, "layer pos"] | None = None
    #: ``A^(l,h)[q, 0]``: the attention every query pays to the first token (kept in both modes)
    attention_to_first: Float[Tensor, "layer head query_pos"] | None = None
    #: per-layer statistics taken during the pass when the patterns were streamed, not kept
    attention: AttentionSummary | None = None
    #: the patterns' defects and what they were checked against (``None`` only in a hand-built trace)
    attention_check: AttentionCheck | None = None
    #: why ``lipschitz=True`` could not compute MLP gains (the certified variant refuses with it), or None
    lipschitz_unsupported: str | None = None

    @property
    def _shape(self) -> tuple[int, ...]:
        return tuple(self.patterns.shape[:3]) if self.patterns is not None else tuple(self.attention_to_first.shape)

    @property
    def n_layers(self) -> int:
        return self._shape[0]

    @property
    def n_heads(self) -> int:
        return self._shape[1]

    @property
    def n_tokens(self) -> int:
        return self._shape[2]

    @property
    def streamed(self) -> bool:
        """Whether the patterns were streamed (statistics kept, patterns not): for display only."""
        return self.patterns is None

    def attention_summary(self) -> AttentionSummary:
        """Every per-layer attention statistic (:class:`AttentionSummary`): the one a streamed trace took
        during its pass, or the stored layers fed through the same accumulator now."""
        if self.attention is not None:
            return self.attention
        check = self.attention_check  # None only in a hand-built trace: no spectral summary, layers scanned
        atol, defects = (None, None) if check is None else (check.spectral_atol, check.defects)
        return summarize_attention(self.patterns, spectral_atol=atol, defects=defects)

    def mean_first_token_attention(self) -> Float[Tensor, "layer"]:
        """Mean attention (over heads, queries 1..n-1) on position 0, per layer."""
        first = self.patterns[..., 0] if self.attention_to_first is None else self.attention_to_first
        return first.mean(dim=(1, 2)) if self.n_tokens < 2 else first[:, :, 1:].mean(dim=(1, 2))

    __repr__ = compact_repr

    def _repr_html_(self) -> str:
        mass = self.mean_first_token_attention()
        rows = "".join(
            f"<tr><td>{name}</td><td>{html.escape(str(value))}</td></tr>"
            for name, value in [
                ("model", self.provenance.get("model", {}).get("name", "?")),
                ("tokens", self.n_tokens),
                ("layers × heads", f"{self.n_layers} × {self.n_heads}"),
                ("predicted next token", repr(self.predicted_token)),
                (
                    "first-token attention mass (min / mean / max over layers)",
                    f"{mass.min():.3f} / {mass.mean():.3f} / {mass.max():.3f}",
                ),
                (
                    "first-token residual norm ÷ median, last layer",
                    f"{(self.resid_norms[-1, 0] / self.resid_norms[-1].median()):.1f}",
                ),
            ]
        )
        return f"<b>lens_squash Trace</b><table>{rows}</table>"


def required_hooks(n_layers: int) -> list[str]:
    """The hooks a trace cannot do without."""
    return (
        [f"blocks.{layer}.attn.hook_pattern" for layer in range(n_layers)]
        + [f"blocks.{layer}.hook_resid_pre" for layer in range(n_layers)]
        + [f"blocks.{n_layers - 1}.hook_resid_post"]
    )


def final_representation(model, normalized: Tensor) -> Tensor:
    """``y = ln_final(x)``, from the ``ln_final.hook_normalized`` value (the hook stops before the
    learned gain and bias). The gain is the effective one (Gemma's ``1 + w``, :mod:`lens_squash.edge.adapter`)."""
    final = norm_facts(model.ln_final)
    y = normalized if final.gain is None else normalized * final.gain.to(normalized)
    return y if final.bias is None else y + final.bias.to(normalized)


def _analysis_dtype(model) -> torch.dtype:
    return torch.float64 if model.cfg.dtype == torch.float64 else torch.float32


def _head_index(n_heads: int, value_heads: int) -> Tensor:
    """For each query head, the head of ``hook_v`` it reads. Decided from hook_v's actual head axis,
    not from the config: with ``ungroup_grouped_query_attention`` hook_v already has ``n_heads`` heads
    although ``n_key_value_heads`` is set, and regrouping them would read the wrong values."""
    if value_heads == n_heads:
        return torch.arange(n_heads)
    if value_heads < 1 or n_heads % value_heads:
        raise ValueError(f"hook_v has {value_heads} heads, which does not divide the {n_heads} query heads")
    return torch.arange(n_heads) // (n_heads // value_heads)  # repeat_interleave, as TransformerLens expands


def _per_position(scale: Tensor) -> Tensor:
    """A norm's ``hook_scale`` (batch index 0 taken) as ``[pos]``. With split Q/K/V inputs (or
    ``use_attn_in``) the norm sees a copy of the residual per head, so the scale has a head axis whose
    entries are equal. OPT's bridge flattens batch and positions before its MLP norm, so that hook's
    value is ``[pos, 1]`` and the batch index already took a position: see :func:`_scale_hook`."""
    scale = scale[..., 0]
    if scale.ndim == 1:
        return scale
    if scale.ndim == 2 and (scale == scale[:, :1]).all():
        return scale[:, 0]
    raise UnsupportedModelError(
        f"a norm scale of shape {tuple(scale.shape)} differs between heads: the per-head norm inputs were "
        "edited (hook_q_input / hook_k_input / hook_v_input); trace the model without those hooks"
    )


def _scale_hook(store: dict[str, Tensor], name: str, dtype: torch.dtype, n_tokens: int):
    """Keep a norm's ``hook_scale`` as ``[pos]``: ``[batch, pos, (head,) 1]`` as usual, or, where the model
    flattened batch and positions first (OPT's bridge: ``[batch·pos, 1]``), reshaped back to batch 1."""

    def hook(value, hook):
        value = value.detach()
        if value.ndim == 2 and value.shape == (n_tokens, 1):
            value = value[None]
        store[name] = _per_position(value[0]).to("cpu", dtype)

    return hook


#: whole per-head patterns are kept by default while ``L·H·n²`` of them fit in this many bytes
#: (SmolLM2-135M: n ≤ 704 in float32); longer prompts stream them (``keep_patterns`` in :func:`trace`)
KEEP_PATTERNS_BYTES: int = 512 * 2**20


def patterns_bytes(model, n_tokens: int) -> int:
    """Bytes of a whole ``[layer, head, query_pos, key_pos]`` stack in the analysis dtype, plus its
    head mean: what ``keep_patterns=True`` costs."""
    cfg = model.cfg
    per = torch.finfo(_analysis_dtype(model)).bits // 8
    return cfg.n_layers * (cfg.n_heads + 1) * n_tokens * n_tokens * per


def keeps_patterns(model, n_tokens: int, *, keep_patterns: bool | None) -> bool:
    """``keep_patterns``, or by default whether the whole stack fits in :data:`KEEP_PATTERNS_BYTES`
    (always, for models whose blocks cannot be rerun alone to recompute patterns: :func:`streamable`)."""
    if keep_patterns is not None:
        return bool(keep_patterns)
    return patterns_bytes(model, n_tokens) <= KEEP_PATTERNS_BYTES or not streamable(model)


def streamable(model) -> bool:
    """Whether a layer's patterns can be recomputed by rerunning its block (HookedTransformer blocks, or
    a TransformerBridge's, called again as the model called them: :mod:`lens_squash.edge.stream`)."""
    if is_bridge(model):
        return True
    if not has_hooked_transformer():
        return False
    from transformer_lens.components import TransformerBlock

    return all(isinstance(block, TransformerBlock) for block in getattr(model, "blocks", ()))


def trace(
    model,
    prompt: str | Tensor,
    *,
    chat: bool | None = None,
    keep_resid: bool = False,
    lipschitz: bool = False,
    keep_patterns: bool | None = None,
    cache=None,
) -> Trace:
    """Run ``model`` once on ``prompt`` and keep what the analyses need (see :class:`Trace`).

    ``prompt`` is text (put through the chat template when the tokenizer has one, unless
    ``chat=False``) or token ids. ``keep_resid=True`` also keeps every layer's residual stream
    (``[layers_covered, pos, d_model]``), which the compression metrics need. ``lipschitz=True`` also
    computes ``‖J_{MLP∘N2}‖_F`` per layer and position (:mod:`lens_squash.edge.lipschitz`), which the
    certified bound needs.

    ``keep_patterns``: ``True`` keeps every per-head pattern (memory ``L·H·n²``); ``False`` streams
    them: each layer's statistics are taken during the pass (:class:`AttentionSummary`), the residual
    streams are kept (``L·n·d``) and the bound rows recompute one layer's patterns at a time
    (:func:`lens_squash.edge.stream.stream_bounds`). ``None`` (default) keeps them while the stack
    fits in :data:`KEEP_PATTERNS_BYTES`. ``cache``: a TransformerLens ``ActivationCache`` of this
    prompt (``model.run_with_cache``) to read instead of running the model; it must hold every hook
    the trace reads (the error names the missing ones).
    """
    tokens = as_tokens(model, prompt, chat=chat)
    check_finite_weights(model)  # a NaN weight named now, not met as NaN patterns or logits later
    n_layers, n = model.cfg.n_layers, int(tokens.shape[0])
    missing = [name for name in required_hooks(n_layers) if name not in model.hook_dict]
    if missing:
        raise ValueError(
            f"this model lacks the hooks a trace needs ({', '.join(missing[:3])}"
            f"{' …' if len(missing) > 3 else ''}); use a HookedTransformer, or a TransformerBridge "
            "after bridge.enable_compatibility_mode(no_processing=True)"
        )
    check_fork_unhooked(model)  # a bridge's per-head residual copies: ln1's scale read must be the one used
    store: dict[str, Tensor] = {}
    dtype = _analysis_dtype(model)
    keep_whole = keeps_patterns(model, n, keep_patterns=keep_patterns)
    # learned sinks take a share of every row by design (the flag ModelFacts.sinks reads)
    substochastic, stream = learned_sinks(model), None
    if not keep_whole:
        stream = AttentionStream(n, spectral_atol=spectral_atol(model.cfg.dtype, n, substochastic=substochastic))
    hooks = _capture_hooks(model, store, dtype, stream, n)
    unsupported, shape = None, None
    if lipschitz:
        try:
            shape = supports_certified(model)
        except UnsupportedModelError as error:  # the certified variant will refuse with this reason
            unsupported = str(error)
        else:
            hooks += mlp_gain_hooks(model, shape, store)
    # a bar for passes of more than ~2 s, unless bars are switched off (core.progress decides)
    with (
        torch.no_grad(),
        counter(desc="trace", total=n_layers, unit="layer", enabled=None if _slow(model, n) else False) as bar,
    ):

        def advance(value, hook) -> None:  # returns None: a hook's return value would replace the activation
            bar.update(1)

        hooks += [(f"blocks.{layer}.hook_resid_pre", advance) for layer in range(n_layers)]
        last_logits = _last_logits(model, tokens, hooks, cache)
    gains = None if shape is None else mlp_gains(store, n_layers, shape)
    summary = None if stream is None else stream.finish()
    kept = _Kept(last_logits.to("cpu", dtype), keep_resid or not keep_whole, gains, summary, unsupported, substochastic)
    return _assemble(model, tokens, store, kept, chat)


def _capture_hooks(
    model, store: dict[str, Tensor], dtype: torch.dtype, stream: AttentionStream | None, n_tokens: int
) -> list:
    """The hooks that keep what a :class:`Trace` holds; with a ``stream``, patterns go through it."""
    n_layers = model.cfg.n_layers

    def keep(name: str, fn=lambda t: t):
        def hook(value, hook):
            store[name] = fn(value[0].detach()).to("cpu", dtype)

        return hook

    def keep_pattern(layer: int):
        def hook(value, hook):
            pattern = value[0].detach()
            on_cpu = pattern.to("cpu", dtype)
            store[f"first.{layer}"] = on_cpu[:, :, 0].clone()
            if stream is not None:
                stream.add(on_cpu)  # O(n) statistics now; the bound rows recompute the layer later
                return
            store[f"pattern.{layer}"] = on_cpu
            store[f"mean_pattern.{layer}"] = pattern.to(dtype).mean(0).cpu()

        return hook

    def value_norm_hook(layer: int):
        def hook(value, hook):  # value: [batch, pos, kv_head or head, d_head]
            w_o = model.blocks[layer].attn.W_O.detach()  # [head, d_head, d_model]
            head_of = _head_index(w_o.shape[0], value.shape[2]).to(value.device)
            v = value[0].detach().to(dtype)[:, head_of]  # [pos, head, d_head]
            store[f"value_norm.{layer}"] = torch.einsum("phd,hdm->phm", v, w_o.to(v.device, dtype)).norm(dim=-1).T.cpu()

        return hook

    hooks = []
    for layer in range(n_layers):
        hooks.append((f"blocks.{layer}.attn.hook_pattern", keep_pattern(layer)))
        hooks.append((f"blocks.{layer}.hook_resid_pre", keep(f"resid.{layer}")))
        for norm in _NORM_SITES:
            if f"blocks.{layer}.{norm}.hook_scale" in model.hook_dict:
                hooks.append(
                    (f"blocks.{layer}.{norm}.hook_scale", _scale_hook(store, f"{norm}.{layer}", dtype, n_tokens))
                )
        if f"blocks.{layer}.attn.hook_v" in model.hook_dict and hasattr(model.blocks[layer].attn, "W_O"):
            hooks.append((f"blocks.{layer}.attn.hook_v", value_norm_hook(layer)))
    hooks.append((f"blocks.{n_layers - 1}.hook_resid_post", keep(f"resid.{n_layers}")))
    if "ln_final.hook_scale" in model.hook_dict:
        hooks.append(("ln_final.hook_scale", keep("final_scale", lambda t: t[..., 0])))
    if "ln_final.hook_out" in model.hook_dict:  # a bridge's final norm output, gain and bias included
        hooks.append(("ln_final.hook_out", keep("final_out")))
    elif "ln_final.hook_normalized" in model.hook_dict:
        hooks.append(("ln_final.hook_normalized", keep("final_normalized")))
    return hooks


def _slow(model, n_tokens: int) -> bool:
    """Whether a pass likely takes more than ~2 s (then the trace shows a bar): ~2·n·(12d² + 2nd)
    multiply-adds per layer at ~10 GFLOP/s on a CPU, 50× that on a GPU."""
    cfg = model.cfg
    flops = 2 * cfg.n_layers * n_tokens * (12 * cfg.d_model**2 + 2 * n_tokens * cfg.d_model)
    rate = 5e11 if str(cfg.device).startswith("cuda") else 1e10
    return flops / rate > 2.0


def _last_logits(model, tokens: Tensor, hooks: list, cache) -> Tensor:
    """The last position's logits: from the hooked pass, or from ``cache`` by replaying the hooks."""
    if cache is None:
        return _run(model, tokens[None].to(model.cfg.device), hooks + _last_position_only(model))[0, -1].detach()
    return replay_cache(model, cache, hooks, int(tokens.shape[0]))


def _last_position_only(model) -> list:
    """A hook that hands the unembedding only the last position: the trace reads no other logits,
    and ``[n, d_vocab]`` of them are 1.6 GB for SmolLM2 at n = 8192 (plus a matmul the size of one
    block's MLP). It fires last on the final norm's ``hook_normalized`` (or, without a final norm,
    the last block's output), after every hook that keeps a whole-sequence value. HookedTransformer
    only: its forward is known to read nothing after that point but the unembedding and soft cap.
    The logits are those of a one-row matmul: equal to the full pass's last row up to float32
    rounding (SmolLM2: 3.5e-5 on logits of size 32, 1e-6 relative; float64 models: within 1e-12)."""
    try:
        from transformer_lens import HookedTransformer
    except ImportError:  # TransformerLens 4 has bridges only, whose forward this does not assume
        return []
    if not isinstance(model, HookedTransformer):
        return []
    site = "ln_final.hook_normalized" if "ln_final.hook_normalized" in model.hook_dict else None
    site = site or f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    return [(site, lambda value, hook: value[:, -1:])]


#: norms whose scales a trace keeps (Gemma-2/3 add the two post norms)
_NORM_SITES = ("ln1", "ln2", "ln1_post", "ln2_post")


def _run(model, tokens: Tensor, hooks: list) -> Tensor:
    """The hooked forward pass; when it fails and the plain ``model(tokens)`` fails too, the config is
    one TransformerLens itself cannot run (e.g. ``use_attn_in`` with grouped-query attention, or
    ``parallel_attn_mlp`` with ``attn_only``): say so in one line instead of its traceback."""
    try:
        # functorch_ready: weightless bridge norms (OLMo) crash under hooks otherwise
        with functorch_ready(model), fast_attention(model):
            return model.run_with_hooks(tokens, fwd_hooks=hooks)
    except (UnsupportedModelError, torch.OutOfMemoryError):
        raise
    except Exception as error:  # noqa: BLE001 - re-raised below unless TransformerLens fails alone
        try:
            model(tokens)
        except Exception as plain:  # noqa: BLE001
            raise UnsupportedModelError(
                f"TransformerLens cannot run this model's forward pass ({type(plain).__name__}: {plain}); "
                "its config combines options TransformerLens does not support together: change the config "
                "until model(tokens) runs"
            ) from plain
        raise error


@dataclass(frozen=True)
class _Kept:
    """What the pass gave besides the hook store; ``substochastic``: rows short of 1 by design."""

    last_logits: Tensor
    keep_resid: bool
    mlp_gain: Tensor | None
    summary: AttentionSummary | None
    lipschitz_unsupported: str | None
    substochastic: bool


def _assemble(model, tokens, store, kept: _Kept, chat) -> Trace:
    n_layers, n_tokens = model.cfg.n_layers, int(tokens.shape[0])
    last_logits, mlp_gain, summary = kept.last_logits, kept.mlp_gain, kept.summary
    resid = torch.stack([store.pop(f"resid.{i}") for i in range(n_layers + 1)])  # [layers_covered, pos, d_model]
    patterns = stack_layers(store, "pattern", n_layers)
    # scanned once here (or layer by layer as they streamed), so every bound built from this trace
    # can skip the O(L·H·n²) check
    defects = attention_defects(patterns) if summary is None else summary.defects
    check = AttentionCheck.of(model.cfg.dtype, n_tokens, defects, substochastic=kept.substochastic)
    unsupported = {"lipschitz_unsupported": kept.lipschitz_unsupported} if kept.lipschitz_unsupported else {}
    # written once, for a reader: the typed fields are what the algebra reads
    made = provenance(model, chat=chat, n_tokens=n_tokens, attention_defects=defects, **unsupported)
    reported = {"attention patterns": defects["row_deviation"], "the residual stream": resid,
                "last_logits": last_logits, "final_scale": store.get("final_scale"), "mlp_gain": mlp_gain}  # fmt: skip
    check_finite_values(reported, model.cfg.dtype, what="the forward pass")  # an argmax of NaN names a token
    if "final_out" in store:
        y_last = store["final_out"][-1].to("cpu", resid.dtype)
    elif "final_normalized" in store:
        y_last = final_representation(model, store["final_normalized"][-1].to(model.cfg.device)).detach()
        y_last = y_last.to("cpu", resid.dtype)
    else:  # no final norm: y_n is the last block's output
        y_last = resid[-1, -1]
    predicted = int(last_logits.argmax())
    str_tokens = (
        tuple(model.to_str_tokens(tokens)) if model.tokenizer is not None else tuple(str(int(t)) for t in tokens)
    )
    predicted_str = model.tokenizer.decode([predicted]) if model.tokenizer is not None else str(predicted)
    return Trace(
        tokens=tokens.cpu(),
        str_tokens=str_tokens,
        patterns=patterns,
        ln1_scale=stack_layers(store, "ln1", n_layers),
        ln2_scale=stack_layers(store, "ln2", n_layers),
        final_scale=store.get("final_scale"),
        resid_norms=resid.norm(dim=-1),
        first_token_resid=resid[:, 0].clone(),
        value_norms=stack_layers(store, "value_norm", n_layers),
        y_last=y_last,
        last_logits=last_logits,
        predicted_token=predicted_str,
        provenance={**made, "attention_check": check.summary()},
        resid=resid if kept.keep_resid else None,
        mlp_gain=mlp_gain,
        mean_patterns=stack_layers(store, "mean_pattern", n_layers),
        ln1_post_scale=stack_layers(store, "ln1_post", n_layers),
        ln2_post_scale=stack_layers(store, "ln2_post", n_layers),
        attention_to_first=stack_layers(store, "first", n_layers),
        attention=summary,
        attention_check=check,
        lipschitz_unsupported=kept.lipschitz_unsupported,
    )
