"""Untrained toy transformers for the paper's theory checks (Appendix C.3, C.4 and B.3).

**Toy decoders** (Fig. 8, Fig. 10). One attention layer, ``d = 64``, one head, untrained, built
with :func:`lens_squash.edge.models.tiny_model` so they run through the same TransformerLens code as real
models (on TransformerLens 4, a bridge over an equivalent ``transformers`` model, :func:`toy_weights`
written into it; GPT-NeoX's RoPE angles and MPT's ALiBi softmax are float32 inside, ~1e-8 off in
float64). Token embeddings are standard Gaussian; the (pre-)LayerNorm makes each input unit-variance,
and ``W_Q, W_K, W_V ~ N(0, 1/d²)`` then give queries, keys and values of variance ``1/d`` per
coordinate, the paper's setting; ``W_O ~ N(0, 1/d)``. Positional encodings (:data:`ENCODINGS`):
sinusoidal APE (Vaswani et al.), learned-style APE (Gaussian ``W_pos``, as embeddings), RoPE, ALiBi
and NoPE. :func:`pe_collapse` measures ``‖y_n(s) − y_{n+1}(s*)‖`` for random token sequences ``s``
and ``s* = s + [s_n]`` at the layer output (``site``), over seeds, with
:func:`lens_squash.experiments.collapse.measure_pairs` (one shared pass for all ``s``, batched ``s*``).

Note on absolute encodings: the last token of ``s*`` carries position ``n+1``'s embedding, the
last of ``s`` position ``n``'s, and the residual stream passes that difference straight to the
output; it does not decay with ``n`` (Theorem B.3 assumes positional information that decays). The
attention output (``site="attn_out"``) is what the softmax argument controls and decays for every
encoding.

**Counting** (Prop. 6.1 / B.9). Without a causal mask and without positional encodings every
position attends to the *multiset* of tokens: the softmax weights of ``k`` copies of each token
are ``k e^{s}/(k Σ e^{s'})``, so ``10``, ``1100``, ``111000`` get identical representations,
exactly up to float rounding. :func:`ratio_invariance` measures it; a causal mask or a positional
encoding breaks it.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..core.display import compact_repr
from ..core.results import Result
from ..edge.models import resolve_dtype, tiny_model
from ..edge.trace import final_representation
from .collapse import measure_pairs

__all__ = [
    "ENCODINGS",
    "PECollapseResult",
    "RatioInvarianceResult",
    "pe_collapse",
    "ratio_invariance",
    "sinusoidal_table",
    "toy_decoder",
    "toy_weights",
]


def sinusoidal_table(n_ctx: int, d_model: int) -> Float[Tensor, "pos d_model"]:
    """Vaswani et al.'s ``PE[p, 2i] = sin(p / 10000^{2i/d})``, ``PE[p, 2i+1] = cos(…)``."""
    pos = torch.arange(n_ctx, dtype=torch.float64)[:, None]
    freq = 10000.0 ** (-torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
    table = torch.zeros(n_ctx, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)
    return table


def _no_pos(n_ctx, d_model, gen):
    return None


def _sinusoidal(n_ctx, d_model, gen):
    return sinusoidal_table(n_ctx, d_model)


def _learned(n_ctx, d_model, gen):
    return torch.randn(n_ctx, d_model, generator=gen, dtype=torch.float64)


#: encoding name → (tiny_model ``positional``, builder of ``W_pos`` or None)
ENCODINGS: dict[str, tuple[str, Callable]] = {
    "sinusoidal": ("standard", _sinusoidal),
    "learned": ("standard", _learned),
    "rotary": ("rotary", _no_pos),
    "alibi": ("alibi", _no_pos),
    "nope": ("none", _no_pos),
}


def toy_weights(encoding: str, *, d_model: int, n_layers: int, d_vocab: int, n_ctx: int, seed: int):
    """The toy decoder's draws in TransformerLens layout (one head, ``d_head = d_model``), in a fixed
    order from one seeded generator, so both TransformerLens lines build the same function from them:
    ``W_E ~ N(0, 1)``, ``W_Q, W_K, W_V ~ N(0, 1/d²)``, ``W_O ~ N(0, 1/d)``, ``W_pos`` per encoding,
    ``W_U ~ N(0, 1/d)``."""
    gen, d = torch.Generator().manual_seed(10_000 + seed), d_model
    weights = {"embed.W_E": torch.randn(d_vocab, d, generator=gen, dtype=torch.float64)}
    for l in range(n_layers):
        for w in ("W_Q", "W_K", "W_V"):
            weights[f"blocks.{l}.attn.{w}"] = torch.randn(1, d, d, generator=gen, dtype=torch.float64) / d
        weights[f"blocks.{l}.attn.W_O"] = torch.randn(1, d, d, generator=gen, dtype=torch.float64) / math.sqrt(d)
    table = ENCODINGS[encoding][1](n_ctx, d, gen)
    if table is not None:
        weights["pos_embed.W_pos"] = table
    weights["unembed.W_U"] = torch.randn(d, d_vocab, generator=gen, dtype=torch.float64) / math.sqrt(d)
    return weights


def toy_decoder(
    encoding: str = "nope",
    *,
    d_model: int = 64,
    n_layers: int = 1,
    d_vocab: int = 512,
    n_ctx: int = 1024,
    causal: bool = True,
    seed: int = 0,
    dtype: torch.dtype | str = torch.float64,
):
    """The paper's untrained one-layer, one-head decoder (see the module docstring): a HookedTransformer,
    or on TransformerLens 4 a bridge over its ``transformers`` twin (GPT-2, GPT-NeoX for RoPE, MPT for
    ALiBi, each with its MLP's output held at 0), carrying the same :func:`toy_weights`."""
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown positional encoding {encoding!r}; use one of {', '.join(ENCODINGS)}")
    sizes = dict(d_model=d_model, n_layers=n_layers, d_vocab=d_vocab, n_ctx=n_ctx)
    return tiny_model(
        **sizes,
        n_heads=1,
        positional=ENCODINGS[encoding][0],
        norm="LN",
        causal=causal,
        attn_only=True,
        dtype=dtype,
        seed=seed,
        weights=toy_weights(encoding, **sizes, seed=seed),
    )


_SITES = ("attn_out", "resid_post", "ln_final")


@dataclass(frozen=True, eq=False)
class PECollapseResult(Result):
    """``distances[e, seed, i]``: ``‖y_n(s) − y_{n+1}(s*)‖₂`` for encoding ``encodings[e]``."""

    encodings: tuple[str, ...]
    seeds: tuple[int, ...]
    lengths: Int[Tensor, "length"]
    site: str
    distances: Float[Tensor, "encoding seed length"]
    provenance: dict[str, Any] = field(default_factory=dict)

    def mean_std(self) -> dict[str, tuple[Tensor, Tensor]]:
        return {
            e: (self.distances[i].mean(0), self.distances[i].std(0, unbiased=False))
            for i, e in enumerate(self.encodings)
        }

    def summary(self) -> pd.DataFrame:
        stats = self.mean_std()
        first, last = int(self.lengths[0]), int(self.lengths[-1])
        return pd.DataFrame(
            {
                "encoding": list(self.encodings),
                f"mean@{first}": [float(m[0]) for m, _ in stats.values()],
                f"mean@{last}": [float(m[-1]) for m, _ in stats.values()],
            }
        ).set_index("encoding")

    def to_frame(self) -> pd.DataFrame:
        """:meth:`summary`: one row per positional encoding."""
        return self.summary()

    __repr__ = compact_repr

    def _repr_html_(self) -> str:
        return (
            f"<b>Collapse by positional encoding</b> (site <code>{html.escape(self.site)}</code>, "
            f"{len(self.seeds)} seeds)<br>" + self.summary().to_html(escape=True, float_format=lambda v: f"{v:.3e}")
        )


def _distances_at(model, s, s_star, site: str) -> Tensor:
    if site == "attn_out":  # the attention output at the last token, W_O included
        return measure_pairs(model, s, s_star).head_distances[:, 0]
    index = {"resid_post": -2, "ln_final": -1}[site]
    return measure_pairs(model, s, s_star).distances[:, index, 2]


def pe_collapse(
    lengths: Sequence[int],
    encodings: Sequence[str] = tuple(ENCODINGS),
    seeds: int | Sequence[int] = 5,
    *,
    site: str = "resid_post",
    d_model: int = 64,
    d_vocab: int = 512,
    dtype: torch.dtype | str = torch.float64,
) -> PECollapseResult:
    """Collapse distance against length per positional encoding, one toy model and sequence per seed."""
    if site not in _SITES:
        raise ValueError(f"site must be one of {_SITES}, got {site!r}")
    lengths = [int(n) for n in lengths]
    if not lengths or min(lengths) < 1:
        raise ValueError("lengths must be a non-empty list of integers ≥ 1")
    seed_list = tuple(range(seeds)) if isinstance(seeds, int) else tuple(int(s) for s in seeds)
    n_ctx = max(lengths) + 1
    table = torch.zeros(len(encodings), len(seed_list), len(lengths), dtype=torch.float64)
    models = {}  # which model each encoding ran on (a HookedTransformer, or a bridge's transformers twin)
    for e, enc in enumerate(encodings):
        for j, seed in enumerate(seed_list):
            model = toy_decoder(enc, d_model=d_model, d_vocab=d_vocab, n_ctx=n_ctx, seed=seed, dtype=dtype)
            gen = torch.Generator().manual_seed(seed)
            tokens = torch.randint(d_vocab, (max(lengths),), generator=gen)
            s = [tokens[:n] for n in lengths]
            s_star = [torch.cat([tokens[:n], tokens[n - 1 : n]]) for n in lengths]
            table[e, j] = _distances_at(model, s, s_star, site)
            models[enc] = model.cfg.model_name
    return PECollapseResult(
        encodings=tuple(encodings),
        seeds=seed_list,
        lengths=torch.tensor(lengths),
        site=site,
        distances=table,
        provenance={
            "d_model": d_model,
            "d_vocab": d_vocab,
            "dtype": str(resolve_dtype(dtype)),
            "n_heads": 1,
            "n_layers": 1,
            "qkv_variance": f"1/{d_model}",
            "models": models,
        },
    )


# ----------------------------------------------------------------------------------------------
# Counting: Prop. 6.1 / B.9


@dataclass(frozen=True, eq=False)
class RatioInvarianceResult(Result):
    """Last-token final representations of ``unit`` with every token repeated ``k`` times."""

    multiples: tuple[int, ...]
    unit: tuple[int, ...]
    representations: Float[Tensor, "multiple d_model"]
    causal: bool
    positional: str
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def distances(self) -> Float[Tensor, "multiple"]:
        """Relative 2-distance of each representation from the first multiple's."""
        ref = self.representations[0]
        return (self.representations - ref).norm(dim=-1) / ref.norm()

    def invariant(self, rtol: float | None = None) -> bool:
        """All equal within ``rtol`` (default: 100 × the dtype's epsilon)."""
        eps = torch.finfo(self.representations.dtype).eps
        return bool((self.distances <= (100 * eps if rtol is None else rtol)).all())

    def _derived(self) -> dict[str, Any]:
        return {"distances": self.distances}

    __repr__ = compact_repr

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td>{k}</td><td>{float(d):.3e}</td></tr>" for k, d in zip(self.multiples, self.distances, strict=True)
        )
        return (
            f"<b>Ratio invariance (Prop. B.9)</b> {'causal' if self.causal else 'bidirectional'}, "
            f"positional <code>{html.escape(self.positional)}</code><table>"
            f"<tr><th>k</th><th>relative distance to k={self.multiples[0]}</th></tr>{rows}</table>"
        )


def ratio_invariance(
    model,
    multiples: Sequence[int] = (1, 2, 3, 4),
    unit: Sequence[int] = (1, 0),
) -> RatioInvarianceResult:
    """Run ``unit`` with each token repeated ``k`` times (``10``, ``1100``, ``111000`` for
    ``unit=(1, 0)``) and keep the last token's final representation for each ``k``."""
    multiples, unit = tuple(int(k) for k in multiples), tuple(int(t) for t in unit)
    if not multiples or min(multiples) < 1 or not unit:
        raise ValueError("need multiples ≥ 1 and a non-empty unit of token ids")
    reps = []
    for k in multiples:
        tokens = torch.tensor([t for t in unit for _ in range(k)])
        if tokens.numel() > model.cfg.n_ctx:
            raise ValueError(f"multiple {k} needs {tokens.numel()} tokens, over n_ctx={model.cfg.n_ctx}")
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens[None], names_filter=lambda name: name == "ln_final.hook_normalized")
        reps.append(final_representation(model, cache["ln_final.hook_normalized"][0, -1]).detach().cpu())
    return RatioInvarianceResult(
        multiples=multiples,
        unit=unit,
        representations=torch.stack(reps),
        causal=model.cfg.attention_dir == "causal",
        positional=model.cfg.positional_embedding_type,
        provenance={"model": model.cfg.model_name},
    )
