"""The link from the behavioural experiments (paper §3) to the theory (§4–5), measured on the same prompts.

**Copying (§3.1 ↔ §5).** The model copies the first digit of ``0 1 … 1`` but not the last digit of
``1 … 1 0``. Theorem 5.1 / B.5 says the last token's final representation ``y_n`` is sensitive to the
input at position ``i`` through the causal paths ``i → … → n``, which favour early positions (Prop. B.8).
:func:`copy_sensitivity` puts the paper's copying prompts through the chat template, finds the token
that holds the answer digit (the first digit for ``copy_first``, the last for the other copying tasks),
and reports, per task and length, the exact (or sketched) Jacobian norm ``‖∂y_n/∂v_i^(0)‖`` and a
path-sum bound at that position (:func:`lens_squash.edge.jacobian.jacobian`,
:func:`lens_squash.algebra.variants.path_bound`), so both are read at the same token of the same prompt.

**Counting (§3.2 ↔ §4).** Theorem 4.2 / B.3: the final representations of two prompts that differ by one
more repeated token converge as the prompt grows, until the model cannot tell them apart.
:func:`count_collapse` measures ``‖y(n ones) − y(n+1 ones)‖`` (in float64, from each prompt's own
forward pass) for the paper's counting prompt against ``n``, together with the model dtype's resolution
and whether the next-token predictions agree. :mod:`lens_squash.experiments.collapse` (when present) has the
richer per-layer, per-head and dtype-sweep measurements; this is the direct counting-prompt version.
"""

from __future__ import annotations

import html
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor

from ..core.display import compact_repr
from ..core.records import provenance
from ..core.results import Result
from ..core.tokens import token_label
from ..edge.prompts import Tokens, tokenize, uses_chat
from .task_prompts import TASKS, TaskInstance, make_instance

__all__ = [
    "ANSWER_ELEMENT",
    "CopySensitivity",
    "CountCollapse",
    "answer_position",
    "copy_sensitivity",
    "count_collapse",
    "sequence_positions",
]

#: which element of a copying task's sequence holds the answer (index into the sequence); every
#: copying task not listed asks for the last digit
ANSWER_ELEMENT: dict[str, int] = {"copy_first": 0}


# ----------------------------------------------------------------------------------------------
# Where the sequence sits among the tokens


def _formatted_text(model, tokens: Tokens) -> str:
    """The text the model's tokens were made from: the prompt inside the chat template when it was applied."""
    if not tokens.chat:
        return tokens.text
    return model.tokenizer.apply_chat_template(
        [{"role": "user", "content": tokens.text}], add_generation_prompt=True, tokenize=False
    )


def _element_chars(instance: TaskInstance, text: str) -> list[int]:
    """Character offset in ``text`` of every sequence element, found left to right in the rendered seq."""
    spec = TASKS[instance.task]
    rendered = spec.render(instance.sequence)
    before = spec.template.split("{seq}")[0]
    start = text.find(instance.prompt)
    if start < 0 or not instance.prompt[len(before) :].startswith(rendered):
        raise ValueError(f"could not find the sequence of {instance.key} in the formatted prompt")
    cursor, offsets = start + len(before), []
    for element in map(str, instance.sequence):
        cursor = text.index(element, cursor)  # elements are rendered in order, separated
        offsets.append(cursor)
        cursor += len(element)
    return offsets


def sequence_positions(
    model, instance: TaskInstance, *, chat: bool | None = None
) -> tuple[Int[Tensor, "pos"], list[int]]:
    """The prompt's token ids (as :func:`~lens_squash.edge.models.format_prompt` gives them) and the token
    position of each element of its sequence (the token whose characters hold the element's first).

    Uses the fast tokenizer's offset mapping, checked against the ids the model actually sees.
    """
    prompt = tokenize(model, instance.prompt, chat=chat)
    return prompt.ids, _positions(model, instance, prompt)


def _positions(model, instance: TaskInstance, prompt: Tokens) -> list[int]:
    """:func:`sequence_positions` of a prompt tokenized once, at the boundary."""
    tokens, text = prompt.ids, _formatted_text(model, prompt)
    encoded = model.tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    ids, spans = list(encoded["input_ids"]), list(encoded["offset_mapping"])
    shift = len(tokens) - len(ids)  # a BOS the model prepends to raw text
    if shift not in (0, 1) or tokens[shift:].tolist() != ids:
        raise ValueError(
            "the tokenizer's offsets do not match the prompt's token ids (a slow tokenizer or an unusual "
            "chat template); pass chat=False or use a model with a fast tokenizer"
        )
    positions = []
    for char in _element_chars(instance, text):
        hits = [i for i, (a, b) in enumerate(spans) if a <= char < b]
        if not hits:
            raise ValueError(f"no token covers character {char} of the formatted prompt of {instance.key}")
        positions.append(hits[0] + shift)
    return positions


def answer_position(model, instance: TaskInstance, *, chat: bool | None = None) -> tuple[Int[Tensor, "pos"], int]:
    """The prompt's token ids and the position of the token that holds a copying task's answer digit."""
    if instance.kind != "copy":
        raise ValueError(
            f"{instance.task!r} is a counting task: its answer is a count, not a token of the prompt; "
            "use a copying task (copy_first, copy_last, …)"
        )
    tokens, positions = sequence_positions(model, instance, chat=chat)
    return tokens, _answer(instance, positions)


def _answer(instance: TaskInstance, positions: list[int]) -> int:
    return positions[ANSWER_ELEMENT.get(instance.task, -1)]


# ----------------------------------------------------------------------------------------------
# Copying: Jacobian and path bound at the answer position


@dataclass(frozen=True, eq=False)
class CopySensitivity(Result):
    """Per copying task and length, the sensitivity of ``y_n`` to the answer digit's token.

    ``frame`` columns: task, length, n_tokens, answer_pos, answer_token, jacobian_frobenius,
    jacobian_spectral (NaN in sketch mode), jacobian_share (the answer position's share of the
    Frobenius norms summed over positions), bound, bound_share. ``profiles[(task, length)]`` keeps the
    whole per-position vectors (``jacobian``, ``bound``), the tokens and the sequence positions.
    """

    frame: pd.DataFrame
    profiles: dict[tuple[str, int], dict[str, Any]]
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        """:attr:`frame`, one row per task and length (or per ``n``)."""
        return self.frame

    __repr__ = compact_repr

    def _repr_html_(self) -> str:
        shown = self.frame.drop(columns=["answer_token"]).assign(
            answer_token=[html.escape(token_label(t)) for t in self.frame["answer_token"]]
        )
        return (
            f"<b>CopySensitivity</b>: Jacobian mode {html.escape(str(self.provenance.get('jacobian_mode')))}, "
            f"bound {html.escape(str(self.provenance.get('variant')))}<br>"
            + shown.to_html(index=False, float_format="%.4g", escape=False, max_rows=40)
        )


def _copy_row(
    model, instance: TaskInstance, prompt: Tokens, *, jacobian_mode, n_probes, variant, seed
) -> tuple[dict, dict]:
    from ..algebra.variants import path_bound
    from ..edge.jacobian import jacobian
    from ..edge.trace import trace

    tokens, seq_pos = prompt.ids, _positions(model, instance, prompt)
    pos = _answer(instance, seq_pos)
    jac = jacobian(model, prompt, mode=jacobian_mode, n_probes=n_probes, target_pos=-1, seed=seed)
    # MLP gains are needed only by the certified variants, and cost a pass per layer
    from ..algebra.variant_registry import variants_needing

    traced = trace(model, prompt, lipschitz=variants_needing((variant,), "mlp_gains"))
    bound = path_bound(traced, variant, model=model).bound.double()
    frob = jac.frobenius.double()
    spectral = float("nan") if jac.spectral is None else float(jac.spectral[pos])
    row = {
        "task": instance.task, "length": instance.length, "n_tokens": len(tokens), "answer_pos": pos,
        "answer_token": traced.str_tokens[pos], "jacobian_frobenius": float(frob[pos]),
        "jacobian_spectral": spectral, "jacobian_share": float(frob[pos] / frob.sum()),
        "bound": float(bound[pos]), "bound_share": float(bound[pos] / bound.sum()),
    }  # fmt: skip
    profile = {"jacobian": frob, "bound": bound, "tokens": tokens, "str_tokens": traced.str_tokens,
               "answer_pos": pos, "sequence_positions": seq_pos}  # fmt: skip
    return row, profile


def copy_sensitivity(
    model,
    lengths: Iterable[int],
    *,
    tasks: Iterable[str] = ("copy_first", "copy_last"),
    jacobian_mode: str = "sketch",
    n_probes: int = 64,
    variant: str = "paper",
    chat: bool | None = None,
    seed: int = 0,
) -> CopySensitivity:
    """Sensitivity of the last token to the answer digit, per copying task and length (see module doc).

    ``jacobian_mode`` is ``"sketch"`` (``n_probes`` VJPs, Frobenius only; capped at ``d_model``, where it
    is exact), ``"exact"`` or ``"frozen"`` (``d_model`` VJPs, spectral norms too); ``variant`` is any
    :data:`lens_squash.algebra.variant_registry.VARIANTS` name.
    """
    tasks, lengths = tuple(tasks), tuple(lengths)
    for task in tasks:
        if task not in TASKS or TASKS[task].kind != "copy":
            copying = [t for t, s in TASKS.items() if s.kind == "copy"]
            raise ValueError(f"{task!r} is not a copying task; choose from {', '.join(copying)}")
    if not tasks or not lengths:
        raise ValueError("pass at least one copying task and one length, e.g. lengths=[5, 10, 20]")
    n_probes = min(n_probes, model.cfg.d_model)
    chat = uses_chat(model.tokenizer, chat=chat)  # resolved once: what every prompt gets, and what provenance says
    rows, profiles = [], {}
    for task in tasks:
        for length in lengths:
            instance = make_instance(task, length)
            prompt = tokenize(model, instance.prompt, chat=chat)  # once: positions, Jacobian and trace read it
            row, profile = _copy_row(model, instance, prompt, jacobian_mode=jacobian_mode, n_probes=n_probes,
                                     variant=variant, seed=seed)  # fmt: skip
            rows.append(row)
            profiles[(task, length)] = profile
    meta = provenance(model, tasks=list(tasks), lengths=list(lengths), jacobian_mode=jacobian_mode,
                      n_probes=n_probes, variant=variant, chat=chat, seed=seed)  # fmt: skip
    return CopySensitivity(pd.DataFrame(rows), profiles, meta)


# ----------------------------------------------------------------------------------------------
# Counting: collapse between n and n + 1 ones


@dataclass(frozen=True, eq=False)
class CountCollapse(Result):
    """Per ``n``, the distance between the final representations of the counting prompt with ``n`` and
    ``n + 1`` ones. ``frame`` columns: n, n_tokens, dist_inf, dist_1, dist_2, rel_2 (``dist_2 / ‖y(n)‖₂``),
    resolution (the model dtype's machine epsilon times ``‖y(n)‖∞``), below_resolution, prediction,
    prediction_next, same_prediction."""

    frame: pd.DataFrame
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        """:attr:`frame`, one row per task and length (or per ``n``)."""
        return self.frame

    __repr__ = compact_repr

    def _repr_html_(self) -> str:
        shown = self.frame.assign(
            prediction=[html.escape(token_label(t)) for t in self.frame["prediction"]],
            prediction_next=[html.escape(token_label(t)) for t in self.frame["prediction_next"]],
        )
        return f"<b>CountCollapse</b> on {html.escape(str(self.provenance.get('task')))}<br>" + shown.to_html(
            index=False, float_format="%.4g", escape=False, max_rows=40
        )


def count_collapse(
    model,
    ns: Iterable[int],
    *,
    task: str = "count_ones",
    style: str = "answer",
    chat: bool | None = None,
) -> CountCollapse:
    """``‖y(n ones) − y(n+1 ones)‖`` for the paper's counting prompt ``task``, per ``n`` in ``ns``.

    ``task`` must repeat one token (``count_ones`` or ``sum_ones``): the two prompts then differ only
    by one more repetition. Each prompt has its own forward pass (through the chat template, so the
    last token is the assistant turn's opening, not the last one); the difference is taken in float64.
    """
    from ..edge.trace import trace

    ns = tuple(ns)
    if not ns or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in ns):
        raise ValueError(f"ns must be positive integers, e.g. range(2, 40, 4); got {ns!r}")
    if task not in TASKS or set(make_instance(task, 3, style=style).sequence) != {1}:
        raise ValueError(f"task must repeat one token (count_ones or sum_ones), got {task!r}")
    chat = uses_chat(model.tokenizer, chat=chat)  # resolved once, for every prompt and the provenance
    cache: dict[int, Any] = {}

    def traced(n: int):
        if n not in cache:
            cache[n] = trace(model, make_instance(task, n, style=style).prompt, chat=chat)
        return cache[n]

    eps = torch.finfo(model.cfg.dtype).eps
    rows = []
    for n in ns:
        a, b = traced(n), traced(n + 1)
        y, y_next = a.y_last.double(), b.y_last.double()
        diff = y - y_next
        rows.append({
            "n": n, "n_tokens": a.n_tokens, "dist_inf": float(diff.abs().max()), "dist_1": float(diff.abs().sum()),
            "dist_2": float(diff.norm()), "rel_2": float(diff.norm() / y.norm()),
            "resolution": eps * float(y.abs().max()), "below_resolution": bool(diff.abs().max() < eps * y.abs().max()),
            "prediction": a.predicted_token, "prediction_next": b.predicted_token,
            "same_prediction": a.predicted_token == b.predicted_token,
        })  # fmt: skip
    meta = provenance(model, task=task, style=style, ns=list(ns), chat=chat)
    return CountCollapse(pd.DataFrame(rows), meta)
