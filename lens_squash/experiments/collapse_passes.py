"""How collapse runs its forward passes: separately (exact), by prefix, or in padded batches.

:func:`measure_pairs` reads the last token of every ``s`` and ``s*`` at every site. Three *paths*
(:data:`PATHS`) run the passes, and only the first is bit-level evidence:

- ``"separate"`` — every distinct prompt in its own unpadded, single-prompt pass, run exactly as
  ``model(tokens)`` runs it (full forward, final norm and unembedding over the whole sequence). The
  numbers equal separate passes bit for bit by construction; identical prompts (``s*`` at length
  ``n`` is ``s`` at ``n + 1`` for runs of ones) share one pass.
- ``"prefix"`` — causality: a prompt that is a prefix of a longer one is read off that one's pass
  (one pass per dtype for a prefix-closed family). Exact in exact arithmetic, not bit for bit: the
  pattern–value product ``z = A v`` then sums over more (zero-weighted) keys, and the CPU kernels'
  blocking depends on those lengths. Measured on the 2-core development machine (torch 2.13 CPU):
  SmolLM2 in bfloat16, runs of 4 and 16 ones read off the 100-token prompt of 64 ones differ from
  their own passes first at layer 20's ``hook_z`` (every earlier activation equal), while 32 and 64
  match; a float32 model with ``d_head = 64`` matches up to a 136-token pass but drifts by float32
  ulps once the shared pass has about 200 tokens. So no dtype is safe.
- ``"batched"`` — rows of different lengths right-padded into one pass (the causal mask makes right
  padding exact in exact arithmetic; left padding would shift absolute positions). A batch of two
  *identical* SmolLM2 bfloat16 rows already differs from the single row: kernels depend on the batch
  shape.

So a bit-level criterion (``y = y*`` exactly, below the dtype's spacing, same argmax) is judged on
``"separate"`` passes; the fast paths draw curves and come with a measured noise floor (see
:func:`lens_squash.experiments.collapse.collapse_curve`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..core.progress import progress
from ..edge.backward import ReachedHook, stop_at
from ..edge.bridge_dtype import bridge_in_dtype
from ..edge.models import is_bridge, resolve_dtype

__all__ = ["NORMS", "PATHS", "PairMeasurement", "is_prefix_closed", "measure_pairs", "model_in_dtype", "relative_gap"]

#: the three ways passes are run, from exact to fastest (see the module docstring)
PATHS: tuple[str, ...] = ("separate", "prefix", "batched")
#: the vector norms every distance is reported in, as ``torch.linalg.vector_norm`` orders
NORMS: dict[str, float] = {"inf": float("inf"), "1": 1.0, "2": 2.0}


def model_in_dtype(model, dtype: torch.dtype | str):
    """``model`` itself if it already has ``dtype``, else a fresh copy with its parameters cast.

    A ``HookedTransformer`` copy is rebuilt from the config (not ``.to(dtype)``) so buffers — rotary
    tables, masks — are computed at the new dtype exactly as TransformerLens would for a model loaded
    in it. A bridge is cast as :func:`~lens_squash.edge.backends.boot_bridge` casts the model it boots
    (:func:`~lens_squash.edge.bridge_dtype.bridge_in_dtype`).
    """
    dtype = resolve_dtype(dtype)
    if model.cfg.dtype == dtype:
        return model
    if is_bridge(model):
        return bridge_in_dtype(model, dtype)
    from transformer_lens import HookedTransformer

    cfg = copy.deepcopy(model.cfg)
    cfg.dtype = dtype
    cfg.init_weights = False
    twin = HookedTransformer(cfg, tokenizer=model.tokenizer, move_to_device=False)
    params = {name: p.detach().to(dtype) for name, p in model.named_parameters()}
    missing, unexpected = twin.load_state_dict(params, strict=False)
    buffers = {name for name, _ in twin.named_buffers()}
    if unexpected or set(missing) - buffers:
        raise ValueError(f"could not copy the model to {dtype}: missing {missing}, unexpected {unexpected}")
    return twin.to(model.cfg.device, print_details=False).eval()


@dataclass(frozen=True, eq=False)
class PairMeasurement:
    """Distances between ``s`` and ``s*`` for one dtype (see :func:`measure_pairs`).

    ``y[i, 0]`` and ``y[i, 1]`` are the final-site vectors of ``s[i]`` and ``s*[i]`` (float64 of what
    the model produced), kept so that two paths can be compared; ``path`` is one of :data:`PATHS`.
    """

    sites: tuple[str, ...]
    distances: Float[Tensor, "length site norm"]
    reference: Float[Tensor, "length site norm"]
    head_distances: Float[Tensor, "length head"]
    predictions: Int[Tensor, "length 2"]
    logits_equal: Bool[Tensor, "length"]
    y: Float[Tensor, "length 2 d_model"]
    path: str
    forward_tokens: int
    n_passes: int
    n_rows: int


def relative_gap(a: Float[Tensor, "*batch d"], b: Float[Tensor, "*batch d"]) -> float:
    """``max ‖a − b‖∞ / ‖b‖∞`` over the leading dimensions: how far ``a`` moved from the reference ``b``."""
    a, b = a.double(), b.double()
    scale = torch.linalg.vector_norm(b, ord=float("inf"), dim=-1).clamp_min(torch.finfo(torch.float64).tiny)
    return float((torch.linalg.vector_norm(a - b, ord=float("inf"), dim=-1) / scale).max())


def _plan_rows(seqs: list[list[int]], *, causal: bool) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """Rows to run and, per sequence, ``(row, position of its last token)``.

    In a causal model a sequence that is a prefix of a row is read off that row (longest first)."""
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    rows: list[list[int]] = []
    where: list[tuple[int, int]] = [(0, 0)] * len(seqs)
    for i in order:
        seq = seqs[i]
        hit = next((r for r, row in enumerate(rows) if causal and row[: len(seq)] == seq), None)
        if hit is None:
            rows.append(seq)
            hit = len(rows) - 1
        where[i] = (hit, len(seq) - 1)
    return rows, where


def is_prefix_closed(seqs: Sequence[Sequence[int]]) -> bool:
    """Whether every sequence is a prefix of the longest one (one causal pass reads them all)."""
    rows, _ = _plan_rows([list(map(int, x)) for x in seqs], causal=True)
    return len(rows) == 1


def _batches(rows: list[list[int]], batch_tokens: int, *, causal: bool) -> list[list[int]]:
    """Group row indices; bidirectional models only batch rows of equal length (no padding)."""
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r]))
    groups: list[list[int]] = []
    for r in order:
        if groups:
            g = groups[-1]
            width = len(rows[g[0]])
            fits = (len(g) + 1) * width <= batch_tokens and (causal or len(rows[r]) == width)
            if fits:
                g.append(r)
                continue
        groups.append([r])
    return groups


def _capture_hooks(model, store: dict, rows_idx: Tensor, pos_idx: Tensor, *, post: bool = False) -> list:
    def grab(name):
        def hook(value, hook):
            store[name] = value[rows_idx, pos_idx].detach()

        return hook

    n_layers = model.cfg.n_layers
    hooks = [(f"blocks.{layer}.hook_resid_pre", grab(f"resid.{layer}")) for layer in range(n_layers)]
    if post:
        hooks.append((f"blocks.{n_layers - 1}.hook_resid_post", grab("post")))
    return hooks + [(f"blocks.{n_layers - 1}.attn.hook_z", grab("z"))]


def _head_outputs(model, z: Tensor, *, native: bool) -> Tensor:
    """``z W_O^h`` per head, ``[item, head, d_model]``: in the dtype (native) or in float64."""
    w_o = model.blocks[-1].attn.W_O.detach()  # [head, d_head, d_model]
    if native:
        return torch.einsum("ihd,hdm->ihm", z, w_o)
    return torch.einsum("ihd,hdm->ihm", z.double(), w_o.double())


def _finish(model, sites: list[Tensor], heads: Tensor, *, native: bool) -> tuple[Tensor, Tensor]:
    cast = (lambda t: t.to(model.cfg.dtype).double()) if native else (lambda t: t.double())
    return torch.stack([cast(s) for s in sites]).cpu(), cast(heads).cpu()


def _run_batch(model, rows: list[list[int]], rows_idx: Tensor, pos_idx: Tensor, extra_hooks, *, native: bool):
    """One padded forward pass; returns ``[site, item, d_model]``, per-head outputs, logits."""
    width = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    padded = bool((mask == 0).any())
    left = model.tokenizer is not None and getattr(model.tokenizer, "padding_side", "right") == "left"
    kwargs = {"attention_mask": mask.to(model.cfg.device)} if padded or left else {}
    store: dict[str, Tensor] = {}

    # the last block's output read by a hook that then ends the pass (a TransformerBridge ignores
    # stop_at_layer and would return the logits); extra hooks run before it, as they would have
    def keep_and_stop(value, hook) -> None:
        store["post"] = value[rows_idx, pos_idx]
        stop_at(value, hook)

    hooks = _capture_hooks(model, store, rows_idx, pos_idx) + list(extra_hooks)
    hooks.append((f"blocks.{model.cfg.n_layers - 1}.hook_resid_post", keep_and_stop))
    with torch.no_grad():
        try:
            model.run_with_hooks(tokens.to(model.cfg.device), fwd_hooks=hooks, **kwargs)
        except ReachedHook:
            pass
        post = store["post"]
        final = model.ln_final(post) if hasattr(model, "ln_final") else post
        logits = model.unembed(final[:, None])[:, 0]
        heads = _head_outputs(model, store["z"], native=native)
    sites, heads = _finish(
        model, [store[f"resid.{layer}"] for layer in range(model.cfg.n_layers)] + [post, final], heads, native=native
    )
    return sites, heads, logits.cpu()


def _run_alone(model, seq: list[int], positions: Tensor, extra_hooks, *, native: bool):
    """One unpadded single-prompt pass, exactly ``model(tokens)``: same call, same shapes, so the
    same kernels. Reads ``positions`` (the last one: the prompt itself; earlier ones: its prefixes).
    Returns ``[site, item, d_model]``, per-head outputs ``[item, head, d_model]``, logits."""
    store: dict[str, Tensor] = {}
    hooks = _capture_hooks(model, store, torch.zeros_like(positions), positions, post=True) + list(extra_hooks)
    norm = getattr(model, "ln_final", None)
    # the final norm's own output, read where model(tokens) computes it (over the whole sequence)
    handle = (
        None
        if norm is None
        else norm.register_forward_hook(
            lambda _module, _inputs, out: store.__setitem__("y", out[0, positions].detach())
        )
    )
    try:
        with torch.no_grad():
            logits = model.run_with_hooks(torch.tensor([seq], device=model.cfg.device), fwd_hooks=hooks)
            heads = _head_outputs(model, store["z"], native=native)
    finally:
        if handle is not None:
            handle.remove()
    layers = [store[f"resid.{layer}"] for layer in range(model.cfg.n_layers)]
    sites, heads = _finish(model, layers + [store["post"], store.get("y", store["post"])], heads, native=native)
    return sites, heads, logits[0, positions].cpu()


def _site_names(n_layers: int) -> tuple[str, ...]:
    return tuple(f"blocks.{layer}.hook_resid_pre" for layer in range(n_layers)) + (
        f"blocks.{n_layers - 1}.hook_resid_post",
        "ln_final",
    )


def _norms(x: Tensor) -> Tensor:
    return torch.stack([torch.linalg.vector_norm(x, ord=p, dim=-1) for p in NORMS.values()], dim=-1)


def _check_pairs(model, s, s_star) -> list[list[int]]:
    if len(s) != len(s_star) or not s:
        raise ValueError(f"pass one s* per s (got {len(s)} and {len(s_star)}), at least one pair")
    seqs = [[int(t) for t in x] for x in list(s) + list(s_star)]
    longest = max(len(x) for x in seqs)
    if longest > model.cfg.n_ctx:
        too_long = [i % len(s) for i, x in enumerate(seqs) if len(x) > model.cfg.n_ctx]
        raise ValueError(
            f"a prompt has {longest} tokens but the model's n_ctx is {model.cfg.n_ctx} (pair index "
            f"{too_long[0]}); drop the longer lengths or load the model with a larger n_ctx"
        )
    if min(len(x) for x in seqs) == 0:
        raise ValueError("a prompt has no tokens; every s and s* needs at least one token")
    return seqs


def measure_pairs(
    model,
    s: Sequence[Tensor | list[int]],
    s_star: Sequence[Tensor | list[int]],
    *,
    native: bool = False,
    fwd_hooks: Sequence = (),
    batch_tokens: int = 8192,
    separate: bool = False,
) -> PairMeasurement:
    """Distances between the last token of each ``s[i]`` and of ``s_star[i]`` at every site.

    ``separate=True``: every distinct prompt in its own unpadded pass (path ``"separate"``, bit for
    bit what separate passes give). Otherwise causal models run the fewest rows that contain every
    sequence as a prefix (one row for a prefix-closed family), right-padded and batched up to
    ``batch_tokens`` tokens per pass: path ``"batched"`` when a pass held several rows, else
    ``"prefix"`` when a prompt was read off a longer one, else ``"separate"`` (nothing was shared).
    """
    seqs = _check_pairs(model, s, s_star)
    if separate:
        return _measure_separately(model, seqs, len(s), fwd_hooks, native=native)
    causal = model.cfg.attention_dir == "causal"
    rows, where = _plan_rows(seqs, causal=causal)
    n_items = len(seqs)
    resid = heads = logits = None
    batches = _batches(rows, batch_tokens, causal=causal)
    for group in progress(batches, desc=f"collapse passes ({_dtype_name(model)})", unit="pass"):
        local = {r: i for i, r in enumerate(group)}
        items = [i for i in range(n_items) if where[i][0] in local]
        rows_idx = torch.tensor([local[where[i][0]] for i in items])
        pos_idx = torch.tensor([where[i][1] for i in items])
        if len(group) == 1:  # a row alone runs as model(tokens) does: its own prompt is then exact
            out_sites, out_heads, out_logits = _run_alone(model, rows[group[0]], pos_idx, fwd_hooks, native=native)
        else:
            out_sites, out_heads, out_logits = _run_batch(
                model, [rows[r] for r in group], rows_idx, pos_idx, fwd_hooks, native=native
            )
        if resid is None:
            resid = torch.zeros(out_sites.shape[0], n_items, out_sites.shape[-1], dtype=torch.float64)
            heads = torch.zeros(n_items, *out_heads.shape[1:], dtype=torch.float64)
            logits = torch.zeros(n_items, out_logits.shape[-1], dtype=out_logits.dtype)
        idx = torch.tensor(items)
        resid[:, idx], heads[idx], logits[idx] = out_sites, out_heads, out_logits
    read_off = any(pos != len(rows[row]) - 1 for row, pos in where)
    path = "batched" if any(len(g) > 1 for g in batches) else "prefix" if read_off else "separate"
    tokens = sum(len(rows[r]) for g in batches for r in g)
    return _assemble(model, resid, heads, logits, len(s), path, tokens, len(batches), len(rows))


def _measure_separately(model, seqs: list[list[int]], n_pairs: int, fwd_hooks, *, native: bool) -> PairMeasurement:
    distinct = list(dict.fromkeys(tuple(x) for x in seqs))
    runs = {
        seq: _run_alone(model, list(seq), torch.tensor([len(seq) - 1]), fwd_hooks, native=native)
        for seq in progress(distinct, desc=f"collapse passes ({_dtype_name(model)})", unit="pass")
    }
    per_item = [runs[tuple(x)] for x in seqs]
    resid = torch.cat([sites for sites, _, _ in per_item], dim=1)
    heads = torch.cat([h for _, h, _ in per_item])
    logits = torch.cat([lg for _, _, lg in per_item])
    tokens = sum(len(x) for x in distinct)
    return _assemble(model, resid, heads, logits, n_pairs, "separate", tokens, len(distinct), len(distinct))


def _dtype_name(model) -> str:
    return str(model.cfg.dtype).removeprefix("torch.")


def _assemble(model, resid, heads, logits, n, path, tokens, n_passes, n_rows) -> PairMeasurement:
    a, b = resid[:, :n], resid[:, n:]
    return PairMeasurement(
        sites=_site_names(model.cfg.n_layers),
        distances=_norms(a - b).permute(1, 0, 2),
        reference=_norms(a).permute(1, 0, 2),
        head_distances=torch.linalg.vector_norm(heads[:n] - heads[n:], dim=-1),
        predictions=torch.stack([logits[:n].argmax(-1), logits[n:].argmax(-1)], dim=-1),
        logits_equal=(logits[:n] == logits[n:]).all(-1),
        y=torch.stack([a[-1], b[-1]], dim=1),
        path=path,
        forward_tokens=tokens,
        n_passes=n_passes,
        n_rows=n_rows,
    )
