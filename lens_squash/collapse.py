"""Representational collapse: how close ``y_n(s)`` and ``y_{n+1}(s*)`` get as the prompt grows.

Theorem 4.2 / B.3 of Barbero et al. (2024): for a sequence ``s`` ending in token ``a`` and
``s* = s + [a]``, the last token's final representations converge as ``n`` grows, so in finite
precision they eventually become *identical* and the model must answer both prompts the same way
(the mechanism behind wrong counts, Cor. 6.2 / B.10). :func:`collapse_curve` measures it on any
TransformerLens model (DESIGN §6):

- distances at every *site* — ``blocks.{l}.hook_resid_pre`` for each layer, the last block's
  ``hook_resid_post`` and the final-norm output ``y`` — in the ∞-, 1- and 2-norms, absolute and
  relative to the same norm of the representation of ``s``;
- per head at the last layer (paper Fig. 5): ``‖(z_n W_O^h) − (z*_{n+1} W_O^h)‖₂`` from
  ``blocks.{L-1}.attn.hook_z``, summarised as mean / min / max over heads;
- per dtype three lengths: the first where the relative ∞-distance of ``y`` falls below the dtype's
  machine epsilon (``‖y − y*‖∞ < eps · ‖y‖∞``: the two vectors differ by less than the spacing of
  the dtype's numbers around ``y``'s largest entry, up to a factor 2), the first where ``y = y*``
  exactly, and the first where the next-token predictions (argmax) agree.

**Families** (:data:`FAMILIES`) wrap sequences in the paper's verbatim Appendix C.1 prompts
(:mod:`lens_squash.tasks`): (a) ``count_ones`` a run of ones against one more one, (b)
``random_digits`` uniform random digits ending in ``1`` against ``1 1`` (Fig. 5 a, b), (c)
``copy_ones`` copying a run of ones without commas and (d) ``copy_ones_commas`` the same with a comma
every third digit (Fig. 5 c, d, the paper's mitigation). Our choice where the paper is silent:
elements are written with no separator (``separator=""``, e.g. ``"1111"``). SmolLM2's tokenizer
splits digits one per token, so each element is exactly one token and ``s* = s + [a]`` holds at the
token level, the theorem's setting; pass ``separator=" "`` for tokenizers where ``" 1"`` is one token.
For (d) the pair is ``n`` against ``n + 1`` ones in the comma format: when ``n`` is a multiple of
three, ``s*`` gains ``",1"`` (two tokens) rather than a repeated ``1``; ``exact_repeat`` records which
lengths are exact repeats. Every pair is checked at the token level: ``s*`` must be ``s`` with the
tokens of the appended text inserted at the end of the sequence, else a ``ValueError`` explains the
tokenisation problem.

**Causality makes it cheap.** In a causal model position ``t``'s representation depends only on
tokens ``≤ t``, so every prompt that is a prefix of another is read off that one's forward pass.
``open_ended=True`` stops the prompt right after the sequence (the chat template's header is kept,
the user turn left open): the family is then prefix-closed and *one* forward pass per dtype covers
all lengths. Otherwise (text after the sequence) the prompts are batched across lengths with
right padding: a causal mask makes right padding exact (real positions never see the pads) while
keeping absolute positions right, which left padding would not. Bidirectional models get neither
trick: one exact-length pass per prompt.

**Dtypes and TransformerLens (3.9) upcasts.** A model copy per dtype is built from the same
parameters (buffers such as the rotary tables recomputed at that dtype). TransformerLens computes
``RMSNorm`` / ``LayerNorm`` in float32 for 16-bit models (``hook_scale`` and ``hook_normalized`` are
float32, the result is cast back before the gain ``w``), builds rotary sin/cos in float32 (float64
for float64 models) and the ALiBi bias in float32 before casting; attention scores, softmax,
matmuls and the MLP run in the model's dtype. So every activation read here (residual streams,
``y``, ``z``, logits) is already held in the dtype. By default differences are taken in float64 of
what the model produced, and per-head outputs ``z W_O^h`` are formed in float64; ``native=True``
casts every captured activation to the dtype first and forms ``z W_O^h`` in the dtype — the
representations as the dtype holds them.
"""

from __future__ import annotations

import copy
import html
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from .attention import local_window_mask
from .display import compact_repr
from .models import resolve_dtype
from .records import provenance, to_jsonable
from .tasks import TASKS

__all__ = [
    "DEFAULT_DTYPES",
    "FAMILIES",
    "NORMS",
    "CollapseFamily",
    "CollapseResult",
    "PairMeasurement",
    "WindowSweepResult",
    "collapse_curve",
    "family_pairs",
    "longest_distinguishable_run",
    "measure_pairs",
    "model_in_dtype",
    "window_hooks",
    "window_sweep",
]

DEFAULT_DTYPES: tuple[str, ...] = ("float64", "float32", "bfloat16", "float16")
#: the vector norms every distance is reported in, as ``torch.linalg.vector_norm`` orders
NORMS: dict[str, float] = {"inf": float("inf"), "1": 1.0, "2": 2.0}
_INF = 0  # index of the ∞-norm in NORMS, used by the resolution criterion


# ----------------------------------------------------------------------------------------------
# Families


@dataclass(frozen=True)
class CollapseFamily:
    """Prompt pairs ``(s, s*)``: ``sequences(n, separator, rng)`` gives the two sequence texts,
    ``s*``'s text extending ``s``'s; ``template`` (with a ``{seq}`` slot) is the paper's prompt."""

    name: str
    description: str
    template: str
    sequences: Callable[[int, str, random.Random], tuple[str, str]]
    paper: str


def _ones(n: int, sep: str, rng: random.Random) -> tuple[str, str]:
    return sep.join("1" * n), sep.join("1" * (n + 1))


def _random_then_one(n: int, sep: str, rng: random.Random) -> tuple[str, str]:
    # One seeded draw shared by all lengths (prefixes of it), so lengths are comparable.
    digits = [str(rng.randrange(10)) for _ in range(n - 1)] + ["1"]
    s = sep.join(digits)
    return s, s + sep + "1"


def _grouped(n: int, sep: str) -> str:
    groups = [sep.join("1" * min(3, n - i)) for i in range(0, n, 3)]
    return ",".join(groups)


def _comma_ones(n: int, sep: str, rng: random.Random) -> tuple[str, str]:
    return _grouped(n, sep), _grouped(n + 1, sep)


#: the four prompt families of paper Fig. 5, by name
FAMILIES: dict[str, CollapseFamily] = {
    f.name: f
    for f in (
        CollapseFamily("count_ones", "(a) count a run of n ones vs n + 1 ones", TASKS["count_ones"].template,
                       _ones, "Fig. 5a"),
        CollapseFamily("random_digits", "(b) count ones in uniform random digits ending in 1 vs 1 1",
                       TASKS["count_ones"].template, _random_then_one, "Fig. 5b"),
        CollapseFamily("copy_ones", "(c) copy the last digit of a run of ones, no commas",
                       TASKS["copy_last"].template, _ones, "Fig. 5c"),
        CollapseFamily("copy_ones_commas", "(d) the same with a comma every third digit",
                       TASKS["copy_last"].template, _comma_ones, "Fig. 5d"),
    )
}  # fmt: skip


def _family(family: str | CollapseFamily) -> CollapseFamily:
    if isinstance(family, CollapseFamily):
        return family
    if family not in FAMILIES:
        raise ValueError(f"unknown collapse family {family!r}; use one of {', '.join(FAMILIES)}")
    return FAMILIES[family]


def _chat_frame(tokenizer) -> tuple[str, str]:
    """The chat template's text before and after the user message."""
    sentinel = "\x00LENS_SQUASH_MESSAGE\x00"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": sentinel}], add_generation_prompt=True, tokenize=False
    )
    head, _, tail = text.partition(sentinel)
    return head, tail


def _tokenize(model, text: str) -> list[int]:
    ids = list(model.tokenizer(text, add_special_tokens=False)["input_ids"])
    if model.cfg.default_prepend_bos and model.tokenizer.bos_token_id is not None and not text.startswith(
        model.tokenizer.bos_token or "\x00"
    ):
        ids = [model.tokenizer.bos_token_id] + ids
    return ids


def _prompt_text(model, family: CollapseFamily, seq: str, chat: bool, open_ended: bool) -> str:
    before, _, after = family.template.partition("{seq}")
    message = before + seq + ("" if open_ended else after)
    if not chat:
        return message
    if not getattr(model.tokenizer, "chat_template", None):
        raise ValueError("this tokenizer has no chat template; call with chat=False")
    head, tail = _chat_frame(model.tokenizer)
    return head + message + ("" if open_ended else tail)


def _check_insertion(s: list[int], s_star: list[int], appended: list[int], n: int) -> bool:
    """``s*`` must be ``s`` with ``appended`` inserted once; returns whether it is a repeat of the
    token before it (the theorem's exact ``s* = s + [a]``)."""
    k = len(s_star) - len(s)
    d = next((i for i, (a, b) in enumerate(zip(s, s_star, strict=False)) if a != b), len(s))
    # With repeats the first difference is the end of a run, which is where the element goes.
    ok = k == len(appended) and s_star[d + k:] == s[d:] and s_star[d:d + k] == appended
    if not ok:
        raise ValueError(
            f"at length {n} the prompt s* is not s plus the appended element's tokens {appended}: the "
            "repeated element tokenises differently in context (e.g. '1' vs ' 1', or digits merged into "
            "multi-digit tokens). Pass a separator under which every element is its own token "
            "(separator=' ' for GPT-2-style tokenizers, '' for digit-splitting ones like SmolLM2's)"
        )
    return k == 1 and d >= 1 and s_star[d] == s_star[d - 1]


@dataclass(frozen=True, eq=False)
class _Pairs:
    s: list[list[int]]
    s_star: list[list[int]]
    exact_repeat: tuple[bool, ...]
    appended: tuple[str, ...]


def family_pairs(
    model,
    family: str | CollapseFamily,
    lengths: Sequence[int],
    *,
    chat: bool = True,
    open_ended: bool = False,
    separator: str = "",
    seed: int = 0,
) -> tuple[list[Tensor], list[Tensor], tuple[bool, ...]]:
    """Token ids of ``s`` and ``s*`` for each length, checked; and whether each is an exact repeat."""
    pairs = _family_pairs(model, _family(family), _check_lengths(lengths), chat, open_ended, separator, seed)
    as_t = lambda xs: [torch.tensor(x, dtype=torch.long) for x in xs]  # noqa: E731
    return as_t(pairs.s), as_t(pairs.s_star), pairs.exact_repeat


def _family_pairs(model, family, lengths, chat, open_ended, separator, seed) -> _Pairs:
    if model.tokenizer is None:
        raise ValueError("prompt families need a tokenizer; use measure_pairs with token ids instead")
    s_all, star_all, exact, appended = [], [], [], []
    for n in lengths:
        seq, seq_star = family.sequences(n, separator, random.Random(seed))
        if not seq_star.startswith(seq):
            raise ValueError(f"family {family.name!r} gave an s* that does not extend s at length {n}")
        s = _tokenize(model, _prompt_text(model, family, seq, chat, open_ended))
        s_star = _tokenize(model, _prompt_text(model, family, seq_star, chat, open_ended))
        extra = seq_star[len(seq):]
        exact.append(_check_insertion(s, s_star, list(model.tokenizer(extra, add_special_tokens=False)["input_ids"]), n))
        s_all.append(s)
        star_all.append(s_star)
        appended.append(extra)
    return _Pairs(s_all, star_all, tuple(exact), tuple(appended))


def _check_lengths(lengths: Sequence[int]) -> list[int]:
    out = [int(n) for n in lengths]
    if not out:
        raise ValueError("lengths is empty; pass e.g. lengths=range(1, 65)")
    if any(n < 1 for n in out) or any(n != float(m) for n, m in zip(out, lengths, strict=True)):
        raise ValueError(f"lengths must be integers ≥ 1, got {list(lengths)}")
    return out


# ----------------------------------------------------------------------------------------------
# Model copies per dtype and window masks


def model_in_dtype(model, dtype: torch.dtype | str):
    """``model`` itself if it already has ``dtype``, else a fresh copy with its parameters cast.

    The copy is rebuilt from the config (not ``.to(dtype)``) so buffers — rotary tables, masks —
    are computed at the new dtype exactly as TransformerLens would for a model loaded in it.
    """
    from transformer_lens import HookedTransformer

    dtype = resolve_dtype(dtype)
    if model.cfg.dtype == dtype:
        return model
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


def window_hooks(n_layers: int, window: int) -> list[tuple[str, Callable]]:
    """Hooks restricting every layer to a causal local window: keys with ``q − k ≥ window`` get −inf."""
    if window < 1:
        raise ValueError(f"window must be at least 1 (the query itself), got {window}")

    def mask(scores, hook):  # [batch, head, query_pos, key_pos]
        q, k = scores.shape[-2:]
        keep = local_window_mask(k, window)[k - q:].to(scores.device)
        return scores.masked_fill(~keep, float("-inf"))

    return [(f"blocks.{layer}.attn.hook_attn_scores", mask) for layer in range(n_layers)]


# ----------------------------------------------------------------------------------------------
# The measurement core: token pairs in, distances out


@dataclass(frozen=True, eq=False)
class PairMeasurement:
    """Distances between ``s`` and ``s*`` for one dtype (see :func:`measure_pairs`)."""

    sites: tuple[str, ...]
    distances: Float[Tensor, "length site norm"]
    reference: Float[Tensor, "length site norm"]
    head_distances: Float[Tensor, "length head"]
    predictions: Int[Tensor, "length 2"]
    logits_equal: Bool[Tensor, "length"]
    forward_tokens: int
    n_passes: int
    n_rows: int


def _plan_rows(seqs: list[list[int]], causal: bool) -> tuple[list[list[int]], list[tuple[int, int]]]:
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


def _batches(rows: list[list[int]], causal: bool, batch_tokens: int) -> list[list[int]]:
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


def _capture_hooks(model, store: dict, rows_idx: Tensor, pos_idx: Tensor) -> list:
    def grab(name):
        def hook(value, hook):
            store[name] = value[rows_idx, pos_idx].detach()
        return hook

    n_layers = model.cfg.n_layers
    hooks = [(f"blocks.{layer}.hook_resid_pre", grab(f"resid.{layer}")) for layer in range(n_layers)]
    return hooks + [(f"blocks.{n_layers - 1}.attn.hook_z", grab("z"))]


def _run_batch(model, rows: list[list[int]], rows_idx: Tensor, pos_idx: Tensor, extra_hooks, native: bool):
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
    hooks = _capture_hooks(model, store, rows_idx, pos_idx) + list(extra_hooks)
    with torch.no_grad():
        resid = model.run_with_hooks(
            tokens.to(model.cfg.device), fwd_hooks=hooks, stop_at_layer=model.cfg.n_layers, **kwargs
        )
        post = resid[rows_idx, pos_idx]
        final = model.ln_final(post) if hasattr(model, "ln_final") else post
        logits = model.unembed(final[:, None])[:, 0]
        w_o = model.blocks[-1].attn.W_O.detach()  # [head, d_head, d_model]
        z = store["z"]  # [item, head, d_head]
        heads = torch.einsum("ihd,hdm->ihm", z, w_o) if native else torch.einsum(
            "ihd,hdm->ihm", z.double(), w_o.double()
        )
    sites = [store[f"resid.{layer}"] for layer in range(model.cfg.n_layers)] + [post, final]
    cast = (lambda t: t.to(model.cfg.dtype).double()) if native else (lambda t: t.double())
    return torch.stack([cast(s) for s in sites]).cpu(), cast(heads).cpu(), logits.cpu()


def _site_names(n_layers: int) -> tuple[str, ...]:
    return tuple(f"blocks.{layer}.hook_resid_pre" for layer in range(n_layers)) + (
        f"blocks.{n_layers - 1}.hook_resid_post",
        "ln_final",
    )


def _norms(x: Tensor) -> Tensor:
    return torch.stack([torch.linalg.vector_norm(x, ord=p, dim=-1) for p in NORMS.values()], dim=-1)


def measure_pairs(
    model,
    s: Sequence[Tensor | list[int]],
    s_star: Sequence[Tensor | list[int]],
    *,
    native: bool = False,
    fwd_hooks: Sequence = (),
    batch_tokens: int = 8192,
) -> PairMeasurement:
    """Distances between the last token of each ``s[i]`` and of ``s_star[i]`` at every site.

    Causal models run the fewest rows that contain every sequence as a prefix (one row for a
    prefix-closed family), right-padded and batched up to ``batch_tokens`` tokens per pass.
    """
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
    causal = model.cfg.attention_dir == "causal"
    rows, where = _plan_rows(seqs, causal)
    n_items = len(seqs)
    resid = heads = logits = None
    batches = _batches(rows, causal, batch_tokens)
    for group in batches:
        local = {r: i for i, r in enumerate(group)}
        items = [i for i in range(n_items) if where[i][0] in local]
        rows_idx = torch.tensor([local[where[i][0]] for i in items])
        pos_idx = torch.tensor([where[i][1] for i in items])
        out_sites, out_heads, out_logits = _run_batch(
            model, [rows[r] for r in group], rows_idx, pos_idx, fwd_hooks, native
        )
        if resid is None:
            resid = torch.zeros(out_sites.shape[0], n_items, out_sites.shape[-1], dtype=torch.float64)
            heads = torch.zeros(n_items, *out_heads.shape[1:], dtype=torch.float64)
            logits = torch.zeros(n_items, out_logits.shape[-1], dtype=out_logits.dtype)
        idx = torch.tensor(items)
        resid[:, idx], heads[idx], logits[idx] = out_sites, out_heads, out_logits
    n = len(s)
    sites = _site_names(model.cfg.n_layers)
    a, b = resid[:, :n], resid[:, n:]
    return PairMeasurement(
        sites=sites,
        distances=_norms(a - b).permute(1, 0, 2),
        reference=_norms(a).permute(1, 0, 2),
        head_distances=torch.linalg.vector_norm(heads[:n] - heads[n:], dim=-1),
        predictions=torch.stack([logits[:n].argmax(-1), logits[n:].argmax(-1)], dim=-1),
        logits_equal=(logits[:n] == logits[n:]).all(-1),
        forward_tokens=sum(len(rows[r]) for g in batches for r in g),
        n_passes=len(batches),
        n_rows=len(rows),
    )


# ----------------------------------------------------------------------------------------------
# collapse_curve and its result


def _first(lengths: Sequence[int], flags: Tensor) -> int | None:
    hits = torch.nonzero(flags).flatten()
    return int(lengths[int(hits[0])]) if hits.numel() else None


@dataclass(frozen=True, eq=False)
class CollapseResult:
    """Collapse distances for one family over lengths and dtypes (see the module docstring).

    ``distances[d, i, site, norm]`` is ``‖x(s) − x(s*)‖`` at length ``lengths[i]`` in dtype
    ``dtypes[d]``; ``reference`` the same norm of ``x(s)``; norms are ordered as :data:`NORMS`.
    """

    family: str
    lengths: Int[Tensor, "length"]
    dtypes: tuple[str, ...]
    sites: tuple[str, ...]
    distances: Float[Tensor, "dtype length site norm"]
    reference: Float[Tensor, "dtype length site norm"]
    head_distances: Float[Tensor, "dtype length head"]
    predictions: Int[Tensor, "dtype length 2"]
    logits_equal: Bool[Tensor, "dtype length"]
    n_tokens: Int[Tensor, "length"]
    exact_repeat: tuple[bool, ...]
    prefix_closed: bool
    forward_tokens: dict[str, int]
    naive_tokens: int
    native: bool
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def resolutions(self) -> dict[str, float]:
        """Machine epsilon of each dtype: the relative ∞-distance below which ``y`` and ``y*`` are
        within one spacing of the dtype's numbers around ``y``'s largest entry (up to a factor 2)."""
        return {d: float(torch.finfo(resolve_dtype(d)).eps) for d in self.dtypes}

    def relative(self) -> Float[Tensor, "dtype length site norm"]:
        return self.distances / self.reference.clamp_min(torch.finfo(torch.float64).tiny)

    def final(self, norm: str = "inf", relative: bool = True) -> Float[Tensor, "dtype length"]:
        """The distance of the final-norm output ``y`` against length, per dtype."""
        values = self.relative() if relative else self.distances
        return values[:, :, -1, list(NORMS).index(norm)]

    def thresholds(self) -> dict[str, dict[str, int | None]]:
        """Per dtype, the first length where ``y`` is below resolution, exactly equal, and where the
        argmax predictions agree (``None``: not within the measured lengths)."""
        lengths = self.lengths.tolist()
        rel = self.final("inf")
        out = {}
        for d, name in enumerate(self.dtypes):
            out[name] = {
                "below_resolution": _first(lengths, rel[d] < self.resolutions[name]),
                "exactly_zero": _first(lengths, self.distances[d, :, -1, _INF] == 0),
                "same_prediction": _first(lengths, self.predictions[d, :, 0] == self.predictions[d, :, 1]),
            }
        return out

    def summary(self) -> pd.DataFrame:
        """One row per dtype: resolution, the three lengths (``<NA>``: not reached within the measured
        lengths), and the relative distance at the ends."""
        rel, th = self.final("inf"), self.thresholds()
        rows = []
        for d, name in enumerate(self.dtypes):
            rows.append({
                "dtype": name,
                "resolution": self.resolutions[name],
                f"rel_dist@{int(self.lengths[0])}": float(rel[d, 0]),
                f"rel_dist@{int(self.lengths[-1])}": float(rel[d, -1]),
                **th[name],
                "forward_tokens": self.forward_tokens.get(name),
            })
        frame = pd.DataFrame(rows).set_index("dtype")
        # a threshold not reached within the measured lengths is <NA> in every column alike (pandas
        # would show None in one column and NaN in another)
        return frame.astype({name: "Int64" for name in th[self.dtypes[0]]})

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable({
            "family": self.family, "lengths": self.lengths, "dtypes": list(self.dtypes),
            "sites": list(self.sites), "norms": list(NORMS), "distances": self.distances,
            "reference": self.reference, "head_distances": self.head_distances,
            "predictions": self.predictions, "logits_equal": self.logits_equal, "n_tokens": self.n_tokens,
            "exact_repeat": list(self.exact_repeat), "prefix_closed": self.prefix_closed,
            "forward_tokens": self.forward_tokens, "naive_tokens": self.naive_tokens, "native": self.native,
            "resolutions": self.resolutions, "thresholds": self.thresholds(), "metadata": self.metadata,
        })

    __repr__ = compact_repr

    def _repr_html_(self) -> str:
        frame = self.summary()
        head = (
            f"<b>Representational collapse</b> family <code>{html.escape(self.family)}</code>, "
            f"lengths {int(self.lengths[0])}…{int(self.lengths[-1])}, "
            f"{'one pass per dtype (prefix-closed)' if self.prefix_closed else 'batched passes'}<br>"
        )
        return head + frame.to_html(escape=True, float_format=lambda v: f"{v:.3e}")

    def plot(self, kind: str = "dtypes", dtype: str | None = None):
        """``kind="dtypes"``: relative ∞-distance of ``y`` per dtype with each resolution dashed;
        ``kind="heads"``: mean / min–max over last-layer heads for one dtype (Fig. 5)."""
        from .plotting import collapse_figure, head_band_figure

        if kind == "dtypes":
            curves = dict(zip(self.dtypes, self.final("inf"), strict=True))
            return collapse_figure(
                self.lengths, curves, self.resolutions, y_title="‖y − y*‖∞ / ‖y‖∞",
                title=f"Representational collapse: {self.family}",
            )
        if kind == "heads":
            d = self.dtypes.index(dtype) if dtype is not None else 0
            h = self.head_distances[d]
            return head_band_figure(
                self.lengths, h.mean(-1), h.min(-1).values, h.max(-1).values,
                name=f"last-layer heads ({self.dtypes[d]})", title=f"Collapse per head: {self.family}",
            )
        raise ValueError(f"kind must be 'dtypes' or 'heads', got {kind!r}")


def collapse_curve(
    model,
    family: str | CollapseFamily,
    lengths: Sequence[int],
    dtypes: Sequence[str | torch.dtype] = DEFAULT_DTYPES,
    *,
    chat: bool = True,
    open_ended: bool = False,
    native: bool = False,
    separator: str = "",
    window: int | None = None,
    seed: int = 0,
    batch_tokens: int = 8192,
) -> CollapseResult:
    """Measure representational collapse of ``family`` at each length (number of sequence elements)
    in each dtype. See the module docstring for the sites, norms, thresholds and the two tricks.

    ``window`` restricts every layer to a causal local window of that many keys (Appendix C.6).
    """
    fam = _family(family)
    lengths = _check_lengths(lengths)
    dtype_names = tuple(str(resolve_dtype(d)).removeprefix("torch.") for d in dtypes)
    if not dtype_names:
        raise ValueError("pass at least one dtype, e.g. dtypes=('float32',)")
    pairs = _family_pairs(model, fam, lengths, chat, open_ended, separator, seed)
    hooks = window_hooks(model.cfg.n_layers, window) if window is not None else []
    measured = {}
    for name in dtype_names:
        twin = model_in_dtype(model, name)
        measured[name] = measure_pairs(twin, pairs.s, pairs.s_star, native=native, fwd_hooks=hooks,
                                       batch_tokens=batch_tokens)
        del twin
    first = measured[dtype_names[0]]
    stack = lambda attr: torch.stack([getattr(measured[d], attr) for d in dtype_names])  # noqa: E731
    return CollapseResult(
        family=fam.name, lengths=torch.tensor(lengths), dtypes=dtype_names, sites=first.sites,
        distances=stack("distances"), reference=stack("reference"), head_distances=stack("head_distances"),
        predictions=stack("predictions"), logits_equal=stack("logits_equal"),
        n_tokens=torch.tensor([len(x) for x in pairs.s]), exact_repeat=pairs.exact_repeat,
        prefix_closed=first.n_rows == 1,
        forward_tokens={d: m.forward_tokens for d, m in measured.items()},
        naive_tokens=sum(len(x) + len(y) for x, y in zip(pairs.s, pairs.s_star, strict=True)),
        native=native,
        metadata=provenance(model, family=fam.name, chat=chat, open_ended=open_ended, separator=separator,
                            window=window, seed=seed, appended=list(pairs.appended)),
    )


# ----------------------------------------------------------------------------------------------
# Sliding-window mitigation (Appendix C.6)


@dataclass(frozen=True, eq=False)
class WindowSweepResult:
    """Collapse distance and rollout path bound per local window ``w`` (``None``: full attention)."""

    family: str
    windows: tuple[int | None, ...]
    lengths: Int[Tensor, "length"]
    distance: Float[Tensor, "window length"]
    bound_first_share: Float[Tensor, "window length"]
    bound_last_share: Float[Tensor, "window length"]
    curves: tuple[CollapseResult, ...]
    metadata: dict[str, Any] = field(default_factory=dict)

    def _labels(self) -> list[str]:
        return ["full" if w is None else f"w={w}" for w in self.windows]

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable({
            "family": self.family, "windows": list(self.windows), "lengths": self.lengths,
            "distance": self.distance, "bound_first_share": self.bound_first_share,
            "bound_last_share": self.bound_last_share, "metadata": self.metadata,
        })

    def summary(self) -> pd.DataFrame:
        return pd.DataFrame({
            "window": self._labels(),
            f"rel_dist@{int(self.lengths[-1])}": self.distance[:, -1].tolist(),
            "bound_first_share": self.bound_first_share[:, -1].tolist(),
            "bound_last_share": self.bound_last_share[:, -1].tolist(),
        }).set_index("window")

    __repr__ = compact_repr

    def _repr_html_(self) -> str:
        return (f"<b>Sliding-window sweep</b> family <code>{html.escape(self.family)}</code>, longest length "
                f"{int(self.lengths[-1])}<br>" + self.summary().to_html(escape=True))

    def plot(self, what: str = "distance"):
        """``"distance"``: relative ∞-distance of ``y`` per window; ``"bound"``: the rollout bound's
        share on the first token (the sink) per window."""
        from .plotting import collapse_figure

        if what not in ("distance", "bound"):
            raise ValueError(f"what must be 'distance' or 'bound', got {what!r}")
        values = self.distance if what == "distance" else self.bound_first_share
        y_title = "‖y − y*‖∞ / ‖y‖∞" if what == "distance" else "rollout bound share on token 0"
        return collapse_figure(self.lengths, dict(zip(self._labels(), values, strict=True)), y_title=y_title,
                               title=f"Sliding-window attention (App. C.6): {self.family}")


def window_sweep(
    model,
    family: str | CollapseFamily,
    lengths: Sequence[int],
    windows: Sequence[int | None],
    *,
    chat: bool = True,
    open_ended: bool = False,
    separator: str = "",
    bound: bool = True,
    seed: int = 0,
) -> WindowSweepResult:
    """Rerun :func:`collapse_curve` (model dtype) with every layer restricted to each window ``w``,
    and the rollout path bound (``variants.path_bound(trace, "rollout")``) of ``s`` traced under the
    same mask: its share on the first token and on the last one, per length."""
    from .trace import trace as run_trace

    fam, lengths = _family(family), _check_lengths(lengths)
    curves, first, last = [], [], []
    s_tokens = family_pairs(model, fam, lengths, chat=chat, open_ended=open_ended, separator=separator, seed=seed)[0]
    for w in windows:
        curves.append(collapse_curve(model, fam, lengths, (model.cfg.dtype,), chat=chat, open_ended=open_ended,
                                     separator=separator, window=w, seed=seed))
        shares = [_bound_shares(model, run_trace, toks, w) for toks in s_tokens] if bound else []
        first.append([f for f, _ in shares] or [float("nan")] * len(lengths))
        last.append([v for _, v in shares] or [float("nan")] * len(lengths))
    return WindowSweepResult(
        family=fam.name, windows=tuple(windows), lengths=torch.tensor(lengths),
        distance=torch.stack([c.final("inf")[0] for c in curves]),
        bound_first_share=torch.tensor(first, dtype=torch.float64),
        bound_last_share=torch.tensor(last, dtype=torch.float64), curves=tuple(curves),
        metadata=provenance(model, family=fam.name, windows=list(windows), chat=chat, open_ended=open_ended),
    )


def _bound_shares(model, run_trace, tokens: Tensor, window: int | None) -> tuple[float, float]:
    from .variants import path_bound

    hooks = window_hooks(model.cfg.n_layers, window) if window is not None else []
    with model.hooks(fwd_hooks=hooks):
        tr = run_trace(model, tokens)
    row = path_bound(tr, "rollout").bound
    total = float(row.sum())
    return float(row[0]) / total, float(row[-1]) / total


# ----------------------------------------------------------------------------------------------
# Counting on the real model (Cor. 6.2 / B.10)


def longest_distinguishable_run(
    model,
    dtypes: Sequence[str | torch.dtype] = DEFAULT_DTYPES,
    max_len: int = 256,
    *,
    family: str | CollapseFamily = "count_ones",
    chat: bool = True,
    open_ended: bool = True,
) -> tuple[dict[str, int], CollapseResult]:
    """Per dtype, the longest run of ones ``n ≤ max_len`` such that every run up to ``n`` gets a final
    representation different from one more one (``y(n) ≠ y(n+1)`` bit for bit); ``max_len`` means no
    collapse was seen (a lower bound). Open-ended prompts by default: one forward pass per dtype."""
    curve = collapse_curve(model, family, range(1, max_len + 1), dtypes, chat=chat, open_ended=open_ended)
    longest = {}
    for name, th in curve.thresholds().items():
        longest[name] = max_len if th["exactly_zero"] is None else th["exactly_zero"] - 1
    return longest, curve
