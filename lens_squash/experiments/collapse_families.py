"""Prompt families for representational collapse: pairs ``(s, s*)`` as token ids, checked.

The families (:data:`FAMILIES`) wrap sequences in the paper's verbatim Appendix C.1 prompts
(:mod:`lens_squash.experiments.tasks`): (a) ``count_ones`` a run of ones against one more one, (b)
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

Which pairs are prefixes of one sequence: with ``open_ended=True`` (the prompt stops right after the
sequence) ``s`` is a prefix of ``s*``, and for the runs of ones every prompt is a prefix of the
longest one. With text after the sequence no prompt is a prefix of another; but for the runs of
ones ``s*`` at length ``n`` *is* ``s`` at length ``n + 1``, so consecutive lengths share prompts.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..edge.prompts import uses_chat
from .task_prompts import TASKS

__all__ = ["FAMILIES", "CollapseFamily", "family_pairs"]


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
    if (
        model.cfg.default_prepend_bos
        and model.tokenizer.bos_token_id is not None
        and not text.startswith(model.tokenizer.bos_token or "\x00")
    ):
        ids = [model.tokenizer.bos_token_id] + ids
    return ids


def _prompt_text(model, family: CollapseFamily, seq: str, *, chat: bool, open_ended: bool) -> str:
    # chat was resolved at the boundary (uses_chat): True means the template, so one must exist
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
    ok = k == len(appended) and s_star[d + k :] == s[d:] and s_star[d : d + k] == appended
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
    """A family's prompt pairs as token ids, made once (:func:`_family_pairs`) and passed down with how
    they were made: ``chat`` is what was applied (resolved, never ``None``)."""

    s: list[list[int]]
    s_star: list[list[int]]
    exact_repeat: tuple[bool, ...]
    appended: tuple[str, ...]
    #: per length, the last token of the appended element (the repeated ``a`` of ``s* = s + [a]``):
    #: a next-token prediction equal to it just continues the run, a trivial agreement
    repeated: tuple[int, ...]
    chat: bool
    open_ended: bool
    separator: str
    seed: int


def family_pairs(
    model,
    family: str | CollapseFamily,
    lengths: Sequence[int],
    *,
    chat: bool | None = None,
    open_ended: bool = False,
    separator: str = "",
    seed: int = 0,
) -> tuple[list[Tensor], list[Tensor], tuple[bool, ...]]:
    """Token ids of ``s`` and ``s*`` for each length, checked; and whether each is an exact repeat."""
    pairs = _family_pairs(
        model,
        _family(family),
        _check_lengths(lengths),
        chat=uses_chat(model.tokenizer, chat=chat),
        open_ended=open_ended,
        separator=separator,
        seed=seed,
    )
    as_t = lambda xs: [torch.tensor(x, dtype=torch.long) for x in xs]  # noqa: E731
    return as_t(pairs.s), as_t(pairs.s_star), pairs.exact_repeat


def _family_pairs(
    model, family: CollapseFamily, lengths: list[int], *, chat: bool, open_ended: bool, separator: str, seed: int
) -> _Pairs:
    """The pairs of every length; ``chat`` already resolved by the caller (:func:`uses_chat`)."""
    if model.tokenizer is None:
        raise ValueError("prompt families need a tokenizer; use measure_pairs with token ids instead")
    s_all, star_all, exact, appended, repeated = [], [], [], [], []
    for n in lengths:
        seq, seq_star = family.sequences(n, separator, random.Random(seed))
        if not seq_star.startswith(seq):
            raise ValueError(f"family {family.name!r} gave an s* that does not extend s at length {n}")
        s = _tokenize(model, _prompt_text(model, family, seq, chat=chat, open_ended=open_ended))
        s_star = _tokenize(model, _prompt_text(model, family, seq_star, chat=chat, open_ended=open_ended))
        extra = seq_star[len(seq) :]
        extra_ids = list(model.tokenizer(extra, add_special_tokens=False)["input_ids"])
        exact.append(_check_insertion(s, s_star, extra_ids, n))
        s_all.append(s)
        star_all.append(s_star)
        appended.append(extra)
        repeated.append(extra_ids[-1])
    return _Pairs(
        s_all,
        star_all,
        tuple(exact),
        tuple(appended),
        tuple(repeated),
        chat=chat,
        open_ended=open_ended,
        separator=separator,
        seed=seed,
    )


def _check_lengths(lengths: Sequence[int]) -> list[int]:
    out = [int(n) for n in lengths]
    if not out:
        raise ValueError("lengths is empty; pass e.g. lengths=range(1, 65)")
    if any(n < 1 for n in out) or any(n != float(m) for n, m in zip(out, lengths, strict=True)):
        raise ValueError(f"lengths must be integers ≥ 1, got {list(lengths)}")
    return out
