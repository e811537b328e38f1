"""Reading the answer out of a model's free-text reply to a copying or counting prompt.

:func:`parse_answer` reads "The answer to your question is: X" (copying) and "The final answer to your
maths question is: xxxx" (counting), the answer phrases the paper's prompts ask for (Appendix C.1),
and falls back to what SmolLM2-135M-Instruct writes instead (the question echoed as a statement, a
bare number, the last integer of a chain of thought). Pure string processing: no model, no torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from ..core.display import compact_repr
from ..core.results import Record

__all__ = ["ParsedAnswer", "parse_answer"]

_SEP = r"[\s*_`~]+"  # whitespace or markdown between the words of the answer phrase
_PHRASE = re.compile(
    rf"\b(?:the{_SEP})?(?:final{_SEP})?answer{_SEP}to{_SEP}your{_SEP}(?:maths?{_SEP})?question{_SEP}is",
    re.IGNORECASE,
)
# SmolLM2-135M-Instruct tends to echo the copying question instead: "The last digit in this sequence is 1."
_ECHO = re.compile(
    rf"\b(?:last|first){_SEP}digit{_SEP}(?:in|of){_SEP}(?:this|the){_SEP}(?:following{_SEP})?sequence{_SEP}is",
    re.IGNORECASE,
)
# what may stand between "is" and the value: colons, markdown, quotes, brackets, an <ANSWER> tag
_OPENERS = r"[\s*_`~:=\"'‘’“”«»\[\(<{-]*"
_LEAD = re.compile(rf"{_OPENERS}(?:answer\s*>{_OPENERS})?", re.IGNORECASE)

_UNITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
_TEENS = ["ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
          "nineteen"]  # fmt: skip
_TENS = ["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_WORD_VALUES = {w: i for i, w in enumerate(_UNITS)} | {w: 10 + i for i, w in enumerate(_TEENS)}
_WORD_VALUES |= {w: 20 + 10 * i for i, w in enumerate(_TENS)}
_U19 = "|".join(_UNITS[1:])
_BELOW_100 = rf"(?:(?:{'|'.join(_TENS)})(?:[ \t-]+(?:{_U19}))?|{'|'.join(_TEENS)}|{'|'.join(_UNITS)})"
_NUMBER_WORDS = rf"(?:(?:{_U19}|a)[ \t-]+hundred(?:[ \t-]+(?:and[ \t-]+)?{_BELOW_100})?|{_BELOW_100})"
_NUMBER = re.compile(
    rf"(?P<digits>\d{{1,3}}(?:,\d{{3}})+(?!\d)|\d+)(?:\.(?P<frac>\d+))?(?!\d)|(?P<words>{_NUMBER_WORDS})\b",
    re.IGNORECASE,
)
_DIGIT_NUMBER = re.compile(r"(?<![\d.,])(\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.(\d+))?(?!\d)")
_TRIM = "\t\n\r *_`~\"'‘’“”«»[](){}<>.,;:!?"


@dataclass(frozen=True)
class ParsedAnswer(Record):
    """What :func:`parse_answer` read: ``value`` is None exactly when ``status`` is "unparsable"."""

    value: int | None
    status: Literal["ok", "unparsable"]
    matched: str  # the span of the output the value was read from ("" when nothing matched)
    method: Literal["phrase", "fallback", "none"] = "none"

    __repr__ = compact_repr


def _words_to_int(text: str) -> int:
    total, current = 0, 0
    for word in re.split(r"[ \t-]+", text.lower()):
        if word == "hundred":
            current = max(current, 1) * 100
        elif word == "a":
            current = 1
        elif word != "and":
            current += _WORD_VALUES[word]
    return total + current


def _number_value(match: re.Match) -> int | None:
    """The integer a :data:`_NUMBER` match spells, or None for a non-integer such as 12.5."""
    if match.group("words"):
        return _words_to_int(match.group("words"))
    if match.group("frac") and int(match.group("frac")) != 0:
        return None
    return int(match.group("digits").replace(",", ""))


def _after_phrase(text: str, phrase: re.Match) -> tuple[int | None, str]:
    start = _LEAD.match(text, phrase.end()).end()
    number = _NUMBER.match(text, start)
    if number is None:
        return None, text[phrase.start() : start].rstrip()
    return _number_value(number), text[phrase.start() : number.end()]


def _fallback_count(text: str) -> tuple[int | None, str]:
    """The last integer (digits only) on the last non-empty line."""
    lines = [line for line in text.splitlines() if line.strip()]
    hits = list(_DIGIT_NUMBER.finditer(lines[-1])) if lines else []
    if not hits:
        return None, ""
    last = hits[-1]
    if last.group(2) and int(last.group(2)) != 0:
        return None, last.group(0)
    return int(last.group(1).replace(",", "")), last.group(0)


def _last_phrase_value(text: str, phrase: re.Pattern) -> tuple[int | None, str]:
    """The number after the last occurrence of ``phrase`` that is followed by one."""
    first_span = ""
    for match in reversed(list(phrase.finditer(text))):
        value, span = _after_phrase(text, match)
        first_span = first_span or span
        if value is not None:
            return value, span
    return None, first_span


def _fallback_copy(text: str) -> tuple[int | None, str]:
    """The question echoed ("The last digit in this sequence is 1."), else a bare number ("0")."""
    value, span = _last_phrase_value(text, _ECHO)
    if value is not None:
        return value, span
    core = text.strip(_TRIM)
    number = _NUMBER.fullmatch(core) if core else None
    return (None, "") if number is None else (_number_value(number), core)


def parse_answer(text: Any, kind: Literal["copy", "count"] = "copy") -> ParsedAnswer:
    """Read the answer out of a model's reply; never raises on the text.

    Looks for the answer phrase ("The answer to your question is:" for copying, "The final answer to
    your maths question is:" for counting; case, markdown, quotes, brackets, an ``<ANSWER>`` tag, the
    colon and "math"/"maths" are all tolerated, and each phrase is accepted for either kind) and reads
    the number right after it: digits (``1,024``; ``12.0`` but not ``12.5``) or number words up to
    "nine hundred and ninety-nine". The last occurrence with a number wins; placeholders such as
    ``<ANSWER>`` or ``xxxx`` echoed from the prompt are skipped.

    Without a usable phrase: for ``kind="count"`` the last integer written in digits on the final
    non-empty line (the CoT examples end in "= 12"); for ``kind="copy"`` the question echoed as a
    statement ("The last digit in this sequence is 1.", what SmolLM2-135M-Instruct writes), else a reply
    that is nothing but a number ("0", "**one**."). These set ``method="fallback"``. Anything else is
    ``status="unparsable"``, and so is a number beyond a 64-bit integer (``"1111…1"``, 19+ digits).
    """
    if kind not in ("copy", "count"):
        raise ValueError(f"kind must be 'copy' or 'count', got {kind!r}")
    if not isinstance(text, str) or not text.strip():
        return ParsedAnswer(None, "unparsable", "", "none")
    value, last_span = _last_phrase_value(text, _PHRASE)
    if value is not None:
        return _checked(value, last_span, "phrase")
    value, span = (_fallback_count if kind == "count" else _fallback_copy)(text)
    if value is not None:
        return _checked(value, span, "fallback")
    return ParsedAnswer(None, "unparsable", last_span or span, "none")


def _checked(value: int, span: str, method: Literal["phrase", "fallback"]) -> ParsedAnswer:
    # a reply that copies the run of ones as "1111…1" is no count, and past 2⁶³ it would not even fit
    # the results table's integer column
    if not -(2**63) <= value < 2**63:
        return ParsedAnswer(None, "unparsable", span, "none")
    return ParsedAnswer(value, "ok", span, method)
