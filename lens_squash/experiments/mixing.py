"""Over-mixing: replace one token and follow the change through every layer, with and without the sink.

Barbero et al. (2025, "Why do LLMs attend to the first token?") argue that a head attending to the
first token does nothing, so sinks keep a perturbation of one token from spreading through the
layers. :func:`mixing` measures that on one prompt: the relative residual change per layer and
position when the token at ``position`` is replaced, on the model as it is and with the sink
removed three ways (``<bos>`` dropped, key 0 masked and renormalised, the massive activation
clamped by :mod:`lens_squash.experiments.ablation`), the linear picture ``‖∂h_l,i / ∂x_k‖`` beside
it, and per head its attention to the sink against how much it spreads the change.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..core import validate
from ..core.records import provenance
from ..edge.sink_removal import (
    bos_token_id,
    input_jacobian_norms,
    mask_sink_hooks,
    mask_unsupported,
    residual_streams,
)
from ..edge.trace import as_tokens
from .ablation import clamp_hooks
from .mixing_result import SETTING_LABELS, MixingResult, relative_change

__all__ = ["REMOVALS", "mixing", "pick_replacements"]

#: the ways to remove the sink, in the order they are run
REMOVALS: tuple[str, ...] = ("no_bos", "mask", "clamp")


def pick_replacements(
    model, tokens: Tensor, position: int, replacement, *, n_samples: int, seed: int, bos: int | None
) -> tuple[int, ...]:
    """The replacement token ids: ``"random"`` draws ``n_samples`` (seeded, never the original token
    nor ``<bos>``); an int or a one-token string is that token; a sequence of ints is those."""
    original, d_vocab = int(tokens[position]), model.cfg.d_vocab
    if isinstance(replacement, str) and replacement == "random":
        validate.check_int(n_samples, "n_samples", minimum=1)
        allowed = torch.ones(d_vocab, dtype=torch.bool)
        allowed[original] = False
        if bos is not None and bos < d_vocab:
            allowed[bos] = False
        pool = allowed.nonzero().flatten()
        generator = torch.Generator().manual_seed(seed)
        picks = pool[torch.randperm(len(pool), generator=generator)[:n_samples]]
        return tuple(int(t) for t in picks)
    if isinstance(replacement, str):
        if getattr(model, "tokenizer", None) is None:
            raise ValueError("a replacement given as text needs the model's tokenizer; pass a token id")
        ids = model.to_tokens(replacement, prepend_bos=False)[0]
        if len(ids) != 1:
            raise ValueError(f"replacement {replacement!r} is {len(ids)} tokens; pass text that is one token, or an id")
        replacement = int(ids[0])
    ids = [replacement] if isinstance(replacement, int) else list(replacement)
    if not ids or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < d_vocab for t in ids):
        raise ValueError(
            f"replacement must be 'random', text of one token, or token ids in [0, {d_vocab}); got {replacement!r}"
        )
    if original in ids:
        raise ValueError(f"replacement {original} is the token already at position {position}: nothing would change")
    return tuple(ids)


def _changes(model, batch: Tensor, start: int, hooks, *, heads: bool) -> tuple[Tensor, dict[str, Tensor]]:
    """Row 0 of ``batch`` is clean, the others perturbed: the mean relative change ``[layer+1, pos−start]``."""
    out = residual_streams(model, batch, fwd_hooks=hooks, heads=heads)
    resid = out["resid"][:, :, start:]
    return relative_change(resid[1:], resid[:1]).mean(0), out


def _head_link(model, out: dict[str, Tensor], position: int) -> tuple[Tensor, Tensor]:
    """Per head: mean attention of queries 1…n−1 to key 0 (clean run), and the change it writes at
    positions after ``position`` relative to the stream it reads, averaged over replacements."""
    pattern = out["pattern"][0].double()  # [layer, head, query, key]
    sink = pattern[:, :, 1:, 0].mean(-1)
    W_O = torch.stack([block.attn.W_O.detach() for block in model.blocks]).double()  # [layer, head, d_head, d_model]
    z = out["z"][:, :, position + 1 :].double()  # [batch, layer, pos, head, d_head]
    written = torch.einsum("blpha,lhad->blphd", z, W_O)
    delta = (written[1:] - written[:1]).norm(dim=-1)  # [sample, layer, pos, head]
    read = out["resid"][:1, :-1, position + 1 :].double().norm(dim=-1)  # [1, layer, pos]
    spread = (delta / read[..., None]).mean(dim=(0, 2))  # [layer, head]
    return sink, spread


def _clamp_layer(resid: Tensor, factor: float) -> int | None:
    """The first block after which the first token's norm is ``factor`` × the median of the others."""
    norms = resid[0, 1:].double().norm(dim=-1)  # [layer, pos]: the output of each block
    ratio = norms[:, 0] / norms[:, 1:].median(dim=-1).values
    above = (ratio >= factor).nonzero().flatten()
    return None if len(above) == 0 else int(above[0])


def mixing(
    model,
    prompt: str | Tensor,
    position: int,
    *,
    replacement: str | int | Sequence[int] = "random",
    n_samples: int = 4,
    seed: int = 0,
    chat: bool | None = None,
    threshold: float = 0.1,
    removals: Sequence[str] = REMOVALS,
    clamp_layer: int | None = None,
    massive_factor: float = 10.0,
    jacobian: bool = True,
    jacobian_probes: int | None = None,
    bos: int | None = None,
) -> MixingResult:
    """Replace the token at ``position`` and measure the relative residual change per layer and
    position, with the sink and with each removal in ``removals`` (see :class:`MixingResult`).

    ``bos`` is the ``<bos>`` id the ``no_bos`` removal drops (default: the tokenizer's); that removal
    is skipped, with the reason stored, when the prompt does not start with it. ``clamp_layer=None``
    clamps after the first block whose first-token norm reaches ``massive_factor`` × the median
    (skipped when no block does). ``jacobian_probes=None`` takes the exact Jacobian norms; an int
    estimates them from that many Gaussian tangents (for wide models).
    """
    tokens = as_tokens(model, prompt, chat=chat)
    n = int(tokens.shape[0])
    validate.check_int(
        position, "position", minimum=1, maximum=n - 2, hint="a token after the first and before the last"
    )
    validate.check_float(threshold, "threshold", low=0.0, high=float("inf"), low_open=True, high_open=True)
    validate.check_names(list(removals), REMOVALS, "removals", what="sink removal")
    bos = bos_token_id(model) if bos is None else bos
    ids = pick_replacements(model, tokens, position, replacement, n_samples=n_samples, seed=seed, bos=bos)
    batch = tokens.repeat(len(ids) + 1, 1)
    batch[1:, position] = torch.tensor(ids)

    change, skipped = {}, {}
    change["sink"], clean = _changes(model, batch, position, (), heads=True)
    sink_attention, head_spread = _head_link(model, clean, position)
    hooks: dict[str, list] = {"sink": []}
    if "no_bos" in removals:
        if bos is None or int(tokens[0]) != bos:
            skipped["no_bos"] = "the prompt does not start with a <bos> token (or the model has none)"
        else:  # the same sequence one position earlier: column j is still position `position + j`
            change["no_bos"], _ = _changes(model, batch[:, 1:], position - 1, (), heads=False)
            hooks["no_bos"] = []
    mask_reason = mask_unsupported(model) if "mask" in removals else None  # also refuses a non-causal model
    if mask_reason is not None:  # a bridge whose hook_pattern does not feed its forward pass (OPT, GPT-J)
        skipped["mask"] = mask_reason
    elif "mask" in removals:
        hooks["mask"] = mask_sink_hooks(model)
        change["mask"], _ = _changes(model, batch, position, hooks["mask"], heads=False)
    if "clamp" in removals:
        layer = _clamp_layer(clean["resid"], massive_factor) if clamp_layer is None else clamp_layer
        if layer is None:
            skipped["clamp"] = (
                f"no massive activation: the first token's norm never reaches {massive_factor:g}× the median"
            )
        else:
            clamp_layer = layer
            hooks["clamp"] = clamp_hooks(model, layer)
            change["clamp"], _ = _changes(model, batch, position, hooks["clamp"], heads=False)
    jac = None
    if jacobian:
        jac = {}
        for setting in change:
            rows, k = (tokens[1:], position - 1) if setting == "no_bos" else (tokens, position)
            norms = input_jacobian_norms(model, rows, k, fwd_hooks=hooks[setting], probes=jacobian_probes, seed=seed)
            jac[setting] = norms[:, k:]
    return MixingResult(
        tokens=tokens.cpu(),
        str_tokens=_str_tokens(model, tokens),
        position=position,
        replacements=ids,
        threshold=float(threshold),
        change=change,
        skipped=skipped,
        clamp_layer=clamp_layer if "clamp" in change else None,
        sink_attention=sink_attention,
        head_spread=head_spread,
        jacobian=jac,
        jacobian_probes=jacobian_probes if jacobian else None,
        provenance=provenance(
            model,
            analysis="mixing",
            position=position,
            n_tokens=n,
            replacement=replacement if isinstance(replacement, str | int) else list(replacement),
            n_samples=len(ids),
            seed=seed,
            settings={s: SETTING_LABELS[s] for s in change},
        ),
    )


def _str_tokens(model, tokens: Tensor) -> tuple[str, ...]:
    if getattr(model, "tokenizer", None) is None:
        return tuple(f"#{int(t)}" for t in tokens)
    return tuple(model.to_str_tokens(tokens.reshape(1, -1)))
