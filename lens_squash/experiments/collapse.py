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
  exactly, and the first where the next-token predictions (argmax) agree — with whether that
  agreement is *trivial* (both predict the repeated token ``a`` itself, i.e. continue the run) and
  the first length where they agree on another token.

The prompt families live in :mod:`lens_squash.experiments.collapse_families` (re-exported here).

**Bit-level thresholds need bit-level passes.** The three thresholds are bit-level criteria, and
sharing passes across prompts is exact only in exact arithmetic (:mod:`lens_squash.experiments.collapse_passes`
explains why, with measurements). By default (``exact=True``) every distinct prompt runs in its own
unpadded pass, bit for bit what separate ``model(tokens)`` calls give (path ``"separate"``).
``exact=False`` takes the fast path: causality reads every prompt that is a prefix of a longer one
off that one's pass (``open_ended=True`` stops the prompt right after the sequence, so the runs of
ones need *one* pass per dtype; path ``"prefix"``), and otherwise batches lengths with right padding
(path ``"batched"``). The fast path then measures its own **noise floor**: separate passes at
``noise_samples`` evenly spread lengths, and the largest ``‖y_fast − y_separate‖∞ / ‖y_separate‖∞``
over them and both prompts. Every threshold records the path it came from and that noise floor.
Bidirectional models never read one prompt off another's pass (later tokens change earlier positions).

**Dtypes and TransformerLens upcasts.** A model copy per dtype is built from the same parameters
(buffers such as the rotary tables recomputed at that dtype). TransformerLens computes ``RMSNorm`` /
``LayerNorm`` in float32 for 16-bit models (``hook_scale`` and ``hook_normalized`` are float32, the
result is cast back before the gain ``w``), builds rotary sin/cos in float32 (float64 for float64
models) and the ALiBi bias in float32 before casting; attention scores, softmax, matmuls and the MLP
run in the model's dtype. So every activation read here (residual streams, ``y``, ``z``, logits) is
already held in the dtype. By default differences are taken in float64 of what the model produced,
and per-head outputs ``z W_O^h`` are formed in float64; ``native=True`` casts every captured
activation to the dtype first and forms ``z W_O^h`` in the dtype — the representations as the dtype
holds them.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..algebra.attention import local_window_mask
from ..core.display import compact_repr, missing_as_nan
from ..core.records import provenance
from ..core.results import Result
from ..edge.models import resolve_dtype
from ..edge.prompts import uses_chat
from .collapse_families import (
    FAMILIES,
    CollapseFamily,
    _check_lengths,
    _family,
    _family_pairs,
    _Pairs,
    family_pairs,
)
from .collapse_passes import (
    NORMS,
    PATHS,
    PairMeasurement,
    is_prefix_closed,
    measure_pairs,
    model_in_dtype,
    relative_gap,
)

__all__ = [
    "DEFAULT_DTYPES",
    "FAMILIES",
    "NORMS",
    "PATHS",
    "CollapseFamily",
    "CollapseResult",
    "PairMeasurement",
    "collapse_curve",
    "family_pairs",
    "format_summary",
    "longest_distinguishable_run",
    "measure_pairs",
    "model_in_dtype",
    "window_hooks",
]

DEFAULT_DTYPES: tuple[str, ...] = ("float64", "float32", "bfloat16", "float16")
#: the shared-pass path's defaults (``exact=False``): tokens per padded batch, lengths rerun separately
_BATCH_TOKENS, _NOISE_SAMPLES = 8192, 3
_INF = 0  # index of the ∞-norm in NORMS, used by the resolution criterion
#: the threshold entries that are lengths (the others say how they were obtained)
_LENGTH_KEYS = ("below_resolution", "exactly_zero", "same_prediction", "same_nontrivial_prediction")


# ----------------------------------------------------------------------------------------------
# Window masks


def window_hooks(n_layers: int, window: int) -> list[tuple[str, Callable]]:
    """Hooks restricting every layer to a causal local window: keys with ``q − k ≥ window`` get −inf."""
    if window < 1:
        raise ValueError(f"window must be at least 1 (the query itself), got {window}")

    def mask(scores, hook):  # [batch, head, query_pos, key_pos]
        q, k = scores.shape[-2:]
        keep = local_window_mask(k, window)[k - q :].to(scores.device)
        return scores.masked_fill(~keep, float("-inf"))

    return [(f"blocks.{layer}.attn.hook_attn_scores", mask) for layer in range(n_layers)]


# ----------------------------------------------------------------------------------------------
# collapse_curve and its result


def _first(lengths: Sequence[int], flags: Tensor) -> int | None:
    hits = torch.nonzero(flags).flatten()
    return int(lengths[int(hits[0])]) if hits.numel() else None


@dataclass(frozen=True, eq=False)
class CollapseResult(Result):
    """Collapse distances for one family over lengths and dtypes (see the module docstring).

    ``distances[d, i, site, norm]`` is ``‖x(s) − x(s*)‖`` at length ``lengths[i]`` in dtype
    ``dtypes[d]``; ``reference`` the same norm of ``x(s)``; norms are ordered as :data:`NORMS`.
    ``repeated_token[i]`` is the token id of the repeated element ``a``; ``paths[dtype]`` the path
    (:data:`PATHS`) every number of that dtype came from, ``noise_floor[dtype]`` the fast path's
    measured largest relative change of ``y`` against separate passes at ``noise_lengths`` (``None``
    on the exact path, which *is* separate passes).
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
    repeated_token: Int[Tensor, "length"]
    prefix_closed: bool
    paths: dict[str, str]
    noise_floor: dict[str, float | None]
    noise_lengths: tuple[int, ...]
    forward_tokens: dict[str, int]
    naive_tokens: int
    native: bool
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def resolutions(self) -> dict[str, float]:
        """Machine epsilon of each dtype: the relative ∞-distance below which ``y`` and ``y*`` are
        within one spacing of the dtype's numbers around ``y``'s largest entry (up to a factor 2)."""
        return {d: float(torch.finfo(resolve_dtype(d)).eps) for d in self.dtypes}

    def relative(self) -> Float[Tensor, "dtype length site norm"]:
        return self.distances / self.reference.clamp_min(torch.finfo(torch.float64).tiny)

    def final(self, norm: str = "inf", *, relative: bool = True) -> Float[Tensor, "dtype length"]:
        """The distance of the final-norm output ``y`` against length, per dtype."""
        values = self.relative() if relative else self.distances
        return values[:, :, -1, list(NORMS).index(norm)]

    def trivial_agreement(self) -> Bool[Tensor, "dtype length"]:
        """Both prompts predict the repeated token itself: the run just continues, which says
        nothing about whether the model can tell ``s`` from ``s*``."""
        p = self.predictions
        return (p[..., 0] == p[..., 1]) & (p[..., 0] == self.repeated_token)

    def thresholds(self) -> dict[str, dict[str, Any]]:
        """Per dtype: the first length where ``y`` is below resolution, exactly equal, where the
        argmax predictions agree (and whether that agreement is trivial), and where they agree on a
        token other than the repeated one (``None``: not within the measured lengths); then the
        ``path`` they came from and its ``noise_floor`` (``None``: exact)."""
        lengths = self.lengths.tolist()
        rel, trivial = self.final("inf"), self.trivial_agreement()
        out = {}
        for d, name in enumerate(self.dtypes):
            same = self.predictions[d, :, 0] == self.predictions[d, :, 1]
            first_same = _first(lengths, same)
            out[name] = {
                "below_resolution": _first(lengths, rel[d] < self.resolutions[name]),
                "exactly_zero": _first(lengths, self.distances[d, :, -1, _INF] == 0),
                "same_prediction": first_same,
                "same_prediction_trivial": None if first_same is None else bool(trivial[d, lengths.index(first_same)]),
                "same_nontrivial_prediction": _first(lengths, same & ~trivial[d]),
                "path": self.paths[name],
                "noise_floor": self.noise_floor[name],
            }
        return out

    def summary(self) -> pd.DataFrame:
        """One row per dtype: resolution, the relative distance at the ends, the threshold lengths
        (``<NA>``: not reached within the measured lengths), the path and its noise floor."""
        rel, th = self.final("inf"), self.thresholds()
        rows = []
        for d, name in enumerate(self.dtypes):
            rows.append(
                {
                    "dtype": name,
                    "resolution": self.resolutions[name],
                    f"rel_dist@{int(self.lengths[0])}": float(rel[d, 0]),
                    f"rel_dist@{int(self.lengths[-1])}": float(rel[d, -1]),
                    **th[name],
                    "forward_tokens": self.forward_tokens.get(name),
                }
            )
        frame = pd.DataFrame(rows).set_index("dtype")
        # a threshold not reached within the measured lengths is <NA> in every column alike (pandas
        # would show None in one column and NaN in another)
        return frame.astype(
            {**{key: "Int64" for key in _LENGTH_KEYS}, "same_prediction_trivial": "boolean", "noise_floor": "Float64"}
        )

    def to_frame(self) -> pd.DataFrame:
        """:meth:`summary`: one row per dtype."""
        return self.summary()

    def _derived(self) -> dict[str, Any]:
        return {"norms": list(NORMS), "resolutions": self.resolutions, "thresholds": self.thresholds()}

    __repr__ = compact_repr

    def _repr_html_(self) -> str:
        frame = self.summary()
        head = (
            f"<b>Representational collapse</b> family <code>{html.escape(self.family)}</code>, "
            f"lengths {int(self.lengths[0])}…{int(self.lengths[-1])}; {html.escape(_path_note(self))}<br>"
        )
        return head + missing_as_nan(frame).to_html(escape=True, float_format=lambda v: f"{v:.3e}", na_rep="-")


def _path_note(result: CollapseResult) -> str:
    if set(result.paths.values()) == {"separate"}:
        return "every prompt in its own unpadded pass (bit for bit as separate passes)"
    lengths = ", ".join(str(n) for n in result.noise_lengths)
    return (
        f"shared passes (prefix: read off a longer prompt's pass; batched: right-padded rows); noise floor "
        f"= largest ‖y_shared − y_separate‖∞ / ‖y_separate‖∞ at lengths {lengths}"
    )


def format_summary(result: CollapseResult) -> str:
    """:meth:`CollapseResult.summary` as plain text for a terminal: ``-`` where a threshold was not
    reached (or a noise floor does not apply), then what the columns and the path mean."""
    table = result.summary()
    for column in table.columns:
        if str(table[column].dtype) in ("Int64", "boolean", "Float64"):  # to_string's na_rep skips <NA>
            values = table[column].astype(object)
            if str(table[column].dtype) == "Float64":
                values = values.map(lambda v: f"{v:.3g}", na_action="ignore")
            table[column] = values.where(table[column].notna(), "-")
    with pd.option_context("display.float_format", "{:.3g}".format, "display.width", 200):
        text = table.to_string()
    return "\n".join(
        [
            text,
            "(a length column is the first length where that happened; - means not within the measured lengths)",
            "(same_prediction_trivial: both prompts predict the repeated token itself, i.e. continue the run;",
            " same_nontrivial_prediction: the first length where they agree on another token)",
            f"(path: {_path_note(result)})",
        ]
    )


def collapse_curve(
    model,
    family: str | CollapseFamily,
    lengths: Sequence[int],
    dtypes: Sequence[str | torch.dtype] = DEFAULT_DTYPES,
    *,
    chat: bool | None = None,
    open_ended: bool = False,
    native: bool = False,
    separator: str = "",
    window: int | None = None,
    seed: int = 0,
    batch_tokens: int = _BATCH_TOKENS,
    exact: bool = True,
    noise_samples: int = _NOISE_SAMPLES,
) -> CollapseResult:
    """Measure representational collapse of ``family`` at each length (number of sequence elements)
    in each dtype. See the module docstring for the sites, norms, thresholds and the paths.

    ``exact=True`` runs every distinct prompt in its own unpadded pass, so the thresholds are those
    of separate passes bit for bit. ``exact=False`` shares passes (prefix trick, right-padded batches
    of ``batch_tokens``) and measures the noise floor against separate passes at ``noise_samples``
    evenly spread lengths. ``window`` restricts every layer to a causal local window of that many
    keys (Appendix C.6).
    """
    fam = _family(family)
    chat = uses_chat(model.tokenizer, chat=chat)  # resolved once: the pairs and provenance say what was done
    lengths = _check_lengths(lengths)
    _check_path_args(noise_samples, exact=exact)
    dtype_names = _dtype_names(dtypes)
    pairs = _family_pairs(model, fam, lengths, chat=chat, open_ended=open_ended, separator=separator, seed=seed)
    return _pairs_curve(
        model, fam, lengths, pairs, dtype_names, native=native, window=window, batch_tokens=batch_tokens,
        exact=exact, noise_samples=noise_samples,
    )  # fmt: skip


def _pairs_curve(
    model,
    fam: CollapseFamily,
    lengths: list[int],
    pairs: _Pairs,
    dtype_names: tuple[str, ...],
    *,
    native: bool,
    window: int | None,
    batch_tokens: int,
    exact: bool,
    noise_samples: int,
) -> CollapseResult:
    """:func:`collapse_curve` on pairs made once (:func:`~.collapse_families._family_pairs`), checked
    arguments and dtype names; :func:`~.collapse_windows.window_sweep` reuses one set of pairs."""
    hooks = window_hooks(model.cfg.n_layers, window) if window is not None else []
    sample = () if exact else _spread(len(lengths), noise_samples)
    measured, noise, tokens = {}, {}, {}
    for name in dtype_names:
        twin = model_in_dtype(model, name)
        measured[name], noise[name], tokens[name] = _measure_dtype(
            twin, pairs, sample, native=native, hooks=hooks, batch_tokens=batch_tokens, exact=exact
        )
        del twin
    first = measured[dtype_names[0]]
    stack = lambda attr: torch.stack([getattr(measured[d], attr) for d in dtype_names])  # noqa: E731
    causal = model.cfg.attention_dir == "causal"
    return CollapseResult(
        family=fam.name,
        lengths=torch.tensor(lengths),
        dtypes=dtype_names,
        sites=first.sites,
        distances=stack("distances"),
        reference=stack("reference"),
        head_distances=stack("head_distances"),
        predictions=stack("predictions"),
        logits_equal=stack("logits_equal"),
        n_tokens=torch.tensor([len(x) for x in pairs.s]),
        exact_repeat=pairs.exact_repeat,
        repeated_token=torch.tensor(pairs.repeated),
        prefix_closed=causal and is_prefix_closed(pairs.s + pairs.s_star),
        paths={d: m.path for d, m in measured.items()},
        noise_floor=noise,
        noise_lengths=tuple(lengths[i] for i in sample),
        forward_tokens=tokens,
        naive_tokens=sum(len(x) + len(y) for x, y in zip(pairs.s, pairs.s_star, strict=True)),
        native=native,
        provenance=provenance(
            model,
            family=fam.name,
            chat=pairs.chat,
            open_ended=pairs.open_ended,
            separator=pairs.separator,
            window=window,
            seed=pairs.seed,
            appended=list(pairs.appended),
            exact=exact,
        ),
    )


def _dtype_names(dtypes: Sequence[str | torch.dtype]) -> tuple[str, ...]:
    names = tuple(str(resolve_dtype(d)).removeprefix("torch.") for d in dtypes)
    if not names:
        raise ValueError("pass at least one dtype, e.g. dtypes=('float32',)")
    return names


def _check_path_args(noise_samples: int, *, exact: bool) -> None:
    if not isinstance(exact, bool):
        raise TypeError(f"exact must be True (separate passes) or False (shared passes), got {exact!r}")
    if isinstance(noise_samples, bool) or not isinstance(noise_samples, int):
        raise TypeError(
            f"noise_samples must be an int (lengths checked against separate passes), got {noise_samples!r}"
        )
    if not exact and noise_samples < 1:
        raise ValueError(f"exact=False needs noise_samples ≥ 1 to measure its noise floor, got {noise_samples}")


def _spread(n: int, k: int) -> tuple[int, ...]:
    """``k`` indices spread evenly over ``range(n)``, both ends included (fewer if ``n < k``)."""
    if k == 1 or n == 1:
        return (0,)
    return tuple(sorted({round(i * (n - 1) / (k - 1)) for i in range(k)}))


def _measure_dtype(twin, pairs, sample, *, native, hooks, batch_tokens, exact):
    """One dtype: the measurement, its noise floor (``None`` when exact) and the tokens it cost."""
    measured = measure_pairs(
        twin, pairs.s, pairs.s_star, native=native, fwd_hooks=hooks, batch_tokens=batch_tokens, separate=exact
    )
    if exact:
        return measured, None, measured.forward_tokens
    check = measure_pairs(
        twin,
        [pairs.s[i] for i in sample],
        [pairs.s_star[i] for i in sample],
        native=native,
        fwd_hooks=hooks,
        separate=True,
    )
    return measured, relative_gap(measured.y[list(sample)], check.y), measured.forward_tokens + check.forward_tokens


# ----------------------------------------------------------------------------------------------
# Counting on the real model (Cor. 6.2 / B.10)


def longest_distinguishable_run(
    model,
    dtypes: Sequence[str | torch.dtype] = DEFAULT_DTYPES,
    max_len: int = 256,
    *,
    family: str | CollapseFamily = "count_ones",
    chat: bool | None = None,
    open_ended: bool = True,
    exact: bool = True,
) -> tuple[dict[str, int], CollapseResult]:
    """Per dtype, the longest run of ones ``n ≤ max_len`` such that every run up to ``n`` gets a final
    representation different from one more one (``y(n) ≠ y(n+1)`` bit for bit); ``max_len`` means no
    collapse was seen (a lower bound). Consecutive lengths share prompts (``s*`` at ``n`` is ``s`` at
    ``n + 1``), so the exact path costs one pass per run length; ``exact=False`` reads every length
    off one open-ended pass per dtype, within the noise floor the result reports."""
    curve = collapse_curve(model, family, range(1, max_len + 1), dtypes, chat=chat, open_ended=open_ended, exact=exact)
    longest = {}
    for name, th in curve.thresholds().items():
        longest[name] = max_len if th["exactly_zero"] is None else th["exactly_zero"] - 1
    return longest, curve
