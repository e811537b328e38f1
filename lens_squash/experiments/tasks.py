"""Copying and counting tasks of Section 3, their answer parser, and a resumable evaluation loop.

The prompts are the paper's, verbatim from Appendix C.1 ("Experimental Details") and, for the two
prompt-structure ablations, Appendix C.5 (Barbero et al., *Transformers need glasses! Information
over-squashing in language tasks*, NeurIPS 2024):

- copying (Section 3.1, Figure 2): the last digit of ``1 … 1 0``, the first digit of ``0 1 … 1``, the
  same with the hint "*Hint* It’s not necessarily a 1, check carefully", with alternating ones and
  zeros, and the Type 1 / Type 2 prompt orders of Appendix C.5 (Figure 11);
- counting (Section 3.2, Figure 3): (i) the sum ``1 + 1 + … + 1``, (ii) the ones in a run of ones,
  (iii) the ones in a Bernoulli(0.7) 0/1 sequence, (iv) the times ‘car’ appears in a sentence; each
  answer-only, CoT zero-shot or CoT few-shot (the Appendix's two worked sums, and our own analogues
  "with similar strategies" for the other counting tasks).

Every instance is a pure function of ``(seed, task, length, sample)``: :func:`make_instance` derives
its random stream from a SHA-256 of those four values, never from Python's salted ``hash()``.

:func:`parse_answer` reads "The answer to your question is: X" (copying) and "The final answer to your
maths question is: xxxx" (counting) out of free text; :func:`evaluate` runs greedy, batched,
left-padded generation through the chat template, appends each finished batch to a JSONL file and
resumes from it after an interruption.

Wording kept as the paper prints it (``PAPER_QUIRKS`` lists each case):

- the sum prompt ends in a double full stop, "… is your answer..";
- the ones-counting prompt reads "following sequence:seq" (no space after the colon) and
  "where ’xxxx is your answer." (the closing quote after xxxx is missing);
- the word-counting prompt opens the sentence with ’ (a right quote) rather than ‘;
- the quotes are the paper's typographic ones (’ ‘ “ ”), not ASCII.

One normalisation: the Type 1 prompt of Appendix C.5 is printed as
“What is … <ANSWER>’ ”. Here is the sequence: {seq}; the “ ” are the paper's quotation marks around
the first sentence, not prompt text, so the prompt is "What is … <ANSWER>’. Here is the sequence: {seq}".

Our choices where the paper is silent: sequences are digits separated by single spaces ("1 1 1 0"), the
sum is "1 + 1 + 1"; the first-digit prompt swaps "last" for "first"; the hint is appended to the end
of the copying prompt; the alternating sequence strictly alternates and ends in 0 ("1 0 1 0",
"0 1 0 1 0"); answer-only mode appends "Only output the answer, without any explanation or working."
to counting prompts (copying prompts already demand the bare answer and take no suffix, and the
copying tasks have only this mode, as in the paper); CoT appends the paper's "Let’s think step by
step, showing me your reasoning." after the question, and few-shot CoT continues it with " Here are a
few examples:" and the examples, one blank line apart; 'car' is each word of task (iv) with
probability 0.25, the others drawn from :data:`FILLER_WORDS`.
"""

from __future__ import annotations

import hashlib
import html
import json
import math
import os
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch

from ..core.progress import counter
from ..core.records import atomic_write, write_jsonl_atomic

__all__ = [
    "BERNOULLI_P",
    "CAR_P",
    "FILLER_WORDS",
    "MODES",
    "PAPER_QUIRKS",
    "RESULT_COLUMNS",
    "TASKS",
    "TASK_FIGURES",
    "ParsedAnswer",
    "TaskInstance",
    "TaskResults",
    "TaskSpec",
    "check_run_folder",
    "check_single_run",
    "evaluate",
    "fingerprint_differences",
    "fingerprint_digest",
    "fingerprint_path",
    "generation_fingerprint",
    "greedy_generate",
    "load_results",
    "copy_prompt",
    "make_instance",
    "make_instances",
    "parse_answer",
    "run_fingerprint",
    "run_tasks",
    "save_results",
    "summarize_results",
    "task_figure",
    "weights_sha256",
    "write_task_figures",
]

# ----------------------------------------------------------------------------------------------
# The paper's prompt texts (Appendix C.1 and C.5), verbatim

#: probability of a one in task (iii) (Section 3.2)
BERNOULLI_P = 0.7
#: probability that a word of task (iv) is 'car' (ours: the paper does not give it)
CAR_P = 0.25

_ANSWER_FORMAT = "Please answer exactly as ‘The answer to your question is: <ANSWER>’"

_COPY_LAST = (
    "Consider the following sequence: {seq}. What is the last digit in this sequence? "
    + _ANSWER_FORMAT
)
# The Appendix gives only the last-digit prompt and says to "change appropriately"; the first-element
# task of Figure 2 (a) asks for the first digit with otherwise identical wording.
_COPY_FIRST = _COPY_LAST.replace("the last digit", "the first digit")
# Section 3.1 quotes the hint as “ *Hint* It’s not necessarily a 1, check carefully” (leading space
# included); we append it to the end of the copying prompt.
_HINT = " *Hint* It’s not necessarily a 1, check carefully"
# Appendix C.5, Type 1 (normalised: the paper's closing ” dropped, see the module docstring).
_COPY_TYPE1 = (
    "What is the last digit of the following sequence? "
    + _ANSWER_FORMAT
    + ". Here is the sequence: {seq}"
)
# Appendix C.5, Type 2, verbatim.
_COPY_TYPE2 = _ANSWER_FORMAT + ". What is the last digit of the following sequence? {seq}"

_FINAL_FORMAT = "Please give the answer on the final line exactly as ’The final answer to your maths question is: xxxx’"
# verbatim, including the double full stop at the end
_SUM = (
    "Please perform the following sum: {seq}. " + _FINAL_FORMAT + ", where ’xxxx’ is your answer.."
)
# verbatim, including "sequence:seq" with no space and the missing quote after the second xxxx
_COUNT_ONES = (
    "Please count the number of ones in the following sequence:{seq}. "
    + _FINAL_FORMAT
    + ", where ’xxxx is your answer."
)
# verbatim, including the sentence opened by ’ rather than ‘
_COUNT_CAR = (
    "Please count the number of times ‘car’ appears in the following sentence: ’{seq}’. "
    + _FINAL_FORMAT
    + ", where ’xxxx’ is your answer."
)

#: the paper's typos and oddities that the prompts above keep (or, for Type 1, normalise)
PAPER_QUIRKS: dict[str, str] = {
    "sum_ones": "ends with a double full stop: '… is your answer..'",
    "count_ones": "'following sequence:{seq}' has no space; \"where ’xxxx is\" lacks the closing quote",
    "count_bernoulli": "same prompt as count_ones, so the same two quirks",
    "count_car": "the sentence is wrapped as ’{seq}’ (two right quotes)",
    "copy_type1": "normalised: the paper's “ … ” quotation marks around the first sentence are dropped",
}

_COT = "Let’s think step by step, showing me your reasoning."
# Ours, faithful to Section 3.2's "(1) Is instructed to only output the answer".
_ANSWER_ONLY = "Only output the answer, without any explanation or working."

_SUM_EXAMPLES = (  # Appendix C.1, verbatim
    "Please perform the following sum: 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1\n"
    "We divide the sum into groups of 5.\n"
    "(1 + 1 + 1 + 1 + 1) + (1 + 1 + 1 + 1 + 1) + 1 + 1\n"
    "The answer is then 2 * 5 + 2 = 12\n"
    "The final answer to your maths question is: 12",
    "Please perform the following sum: 1 + 1 + 1 + 1 + 1 + 1\n"
    "We divide the sum into groups of 5.\n"
    "(1 + 1 + 1 + 1 + 1) + 1\n"
    "The answer is then 1 * 5 + 1 = 6\n"
    "The final answer to your maths question is: 6",
)
# Ours: the Appendix says only "With similar strategies for the experiments"; these follow the
# format of the two sums above (question, grouping, arithmetic, final line).
_ONES_EXAMPLES = (
    "Please count the number of ones in the following sequence: 1 1 1 1 1 1 1 1 1 1 1 1\n"
    "We divide the sequence into groups of 5.\n"
    "(1 1 1 1 1) (1 1 1 1 1) 1 1\n"
    "The answer is then 2 * 5 + 2 = 12\n"
    "The final answer to your maths question is: 12",
    "Please count the number of ones in the following sequence: 1 1 1 1 1 1\n"
    "We divide the sequence into groups of 5.\n"
    "(1 1 1 1 1) 1\n"
    "The answer is then 1 * 5 + 1 = 6\n"
    "The final answer to your maths question is: 6",
)
_BERNOULLI_EXAMPLES = (  # ours
    "Please count the number of ones in the following sequence: 1 0 1 1 0 1 1 1 0 1 1 1\n"
    "We divide the sequence into groups of 5 and count the ones in each group.\n"
    "(1 0 1 1 0) (1 1 1 0 1) (1 1)\n"
    "The answer is then 3 + 4 + 2 = 9\n"
    "The final answer to your maths question is: 9",
    "Please count the number of ones in the following sequence: 0 1 1 0 1 1 1\n"
    "We divide the sequence into groups of 5 and count the ones in each group.\n"
    "(0 1 1 0 1) (1 1)\n"
    "The answer is then 3 + 2 = 5\n"
    "The final answer to your maths question is: 5",
)
_CAR_EXAMPLES = (  # ours
    "Please count the number of times ‘car’ appears in the following sentence: ’the car is red and my car is fast’\n"
    "We go through the sentence word by word and number each ‘car’.\n"
    "the, car (1), is, red, and, my, car (2), is, fast\n"
    "The answer is then 2\n"
    "The final answer to your maths question is: 2",
    "Please count the number of times ‘car’ appears in the following sentence: ’a car and a bus and a car and a car’\n"
    "We go through the sentence word by word and number each ‘car’.\n"
    "a, car (1), and, a, bus, and, a, car (2), and, a, car (3)\n"
    "The answer is then 3\n"
    "The final answer to your maths question is: 3",
)

#: everyday filler words for task (iv); none contains 'car' (no scar, cart, card, carpet, …)
FILLER_WORDS: tuple[str, ...] = (
    "the", "a", "my", "his", "her", "and", "is", "was", "very", "near",
    "red", "blue", "green", "yellow", "white", "big", "small", "old", "new", "fast",
    "slow", "little", "dog", "house", "tree", "road", "street", "bus", "bike", "train",
    "garden", "window", "door", "city", "park", "bridge", "shop", "school", "went", "saw",
)  # fmt: skip

# ----------------------------------------------------------------------------------------------
# Task registry

TaskSequence = tuple[int, ...] | tuple[str, ...]
#: prompting modes of Section 3.2: answer only, CoT zero-shot, CoT few-shot
MODES: tuple[str, ...] = ("answer", "cot", "cot_few_shot")


@dataclass(frozen=True)
class TaskSpec:
    """One task: how to draw its sequence, write it into the paper's prompt and compute the truth."""

    name: str
    kind: Literal["copy", "count"]
    description: str
    template: str  # the user message with a ``{seq}`` slot
    draw: Callable[[random.Random, int], TaskSequence]
    render: Callable[[TaskSequence], str]
    truth: Callable[[TaskSequence], int]
    modes: tuple[str, ...] = ("answer",)
    examples: tuple[str, ...] = ()  # worked examples for "cot_few_shot"


def _digits(seq: TaskSequence) -> str:
    return " ".join(str(x) for x in seq)


def _plus(seq: TaskSequence) -> str:
    return " + ".join(str(x) for x in seq)


def _words(seq: TaskSequence) -> str:
    return " ".join(str(x) for x in seq)


def _ones_then_zero(rng: random.Random, n: int) -> tuple[int, ...]:
    return (1,) * (n - 1) + (0,)


def _zero_then_ones(rng: random.Random, n: int) -> tuple[int, ...]:
    return (0,) + (1,) * (n - 1)


def _alternating(rng: random.Random, n: int) -> tuple[int, ...]:
    # Strictly alternating and ending in 0 (so the answer is 0, as in Figure 2 (a)):
    # 1 0 1 0 for n = 4, 0 1 0 1 0 for n = 5.
    return tuple((n - 1 - i) % 2 for i in range(n))


def _all_ones(rng: random.Random, n: int) -> tuple[int, ...]:
    return (1,) * n


def _bernoulli(rng: random.Random, n: int) -> tuple[int, ...]:
    return tuple(int(rng.random() < BERNOULLI_P) for _ in range(n))


def _sentence(rng: random.Random, n: int) -> tuple[str, ...]:
    return tuple("car" if rng.random() < CAR_P else rng.choice(FILLER_WORDS) for _ in range(n))


def _last(seq: TaskSequence) -> int:
    return int(seq[-1])


def _first(seq: TaskSequence) -> int:
    return int(seq[0])


def _n_ones(seq: TaskSequence) -> int:
    return sum(1 for x in seq if x == 1)


def _n_car(seq: TaskSequence) -> int:
    return sum(1 for w in seq if w == "car")


def _copy(name: str, description: str, template: str, draw: Callable, truth: Callable) -> TaskSpec:
    return TaskSpec(name, "copy", description, template, draw, _digits, truth)


def _count(name: str, description: str, template: str, draw, render, truth, examples) -> TaskSpec:
    return TaskSpec(name, "count", description, template, draw, render, truth, MODES, examples)


#: every task by name; add a :class:`TaskSpec` here to register a new one
TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        _copy("copy_last", "last digit of 1 … 1 0 (Fig. 2a)", _COPY_LAST, _ones_then_zero, _last),
        _copy("copy_first", "first digit of 0 1 … 1 (Fig. 2a)", _COPY_FIRST, _zero_then_ones, _first),
        _copy("copy_last_hint", "last digit of 1 … 1 0, with the hint (Fig. 2b)", _COPY_LAST + _HINT,
              _ones_then_zero, _last),
        _copy("copy_alternating", "last digit of … 1 0 1 0 (Fig. 2c)", _COPY_LAST, _alternating, _last),
        _copy("copy_type1", "last digit of 1 … 1 0, prompt Type 1 (App. C.5)", _COPY_TYPE1,
              _ones_then_zero, _last),
        _copy("copy_type2", "last digit of 1 … 1 0, prompt Type 2 (App. C.5)", _COPY_TYPE2,
              _ones_then_zero, _last),
        _count("sum_ones", "(i) the sum 1 + 1 + … + 1", _SUM, _all_ones, _plus, _n_ones, _SUM_EXAMPLES),
        _count("count_ones", "(ii) ones in a run of ones", _COUNT_ONES, _all_ones, _digits, _n_ones,
               _ONES_EXAMPLES),
        _count("count_bernoulli", f"(iii) ones in a Bernoulli({BERNOULLI_P}) 0/1 sequence", _COUNT_ONES,
               _bernoulli, _digits, _n_ones, _BERNOULLI_EXAMPLES),
        _count("count_car", "(iv) times 'car' appears in a sentence", _COUNT_CAR, _sentence, _words,
               _n_car, _CAR_EXAMPLES),
    )
}  # fmt: skip

# ----------------------------------------------------------------------------------------------
# Instances


@dataclass(frozen=True)
class TaskInstance:
    """One prompt of one task: the user message (no chat template), its sequence and the truth."""

    task: str
    mode: str
    length: int
    sample: int
    seed: int
    prompt: str
    truth: int
    sequence: TaskSequence

    @property
    def kind(self) -> str:
        """``"copy"`` or ``"count"``: which answer phrase :func:`parse_answer` looks for."""
        return TASKS[self.task].kind

    @property
    def key(self) -> tuple[str, str, int, int]:
        """What identifies the instance in a results file: (task, mode, length, sample)."""
        return (self.task, self.mode, self.length, self.sample)


def _spec(task: str) -> TaskSpec:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks are {', '.join(TASKS)}")
    return TASKS[task]


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(
            f"{name} must be >= {minimum}, got {value}; pass e.g. {name}={max(minimum, 1)}"
        )
    return value


def _derived_seed(seed: int, task: str, length: int, sample: int) -> int:
    # SHA-256, not hash(): Python salts str hashes per process, which would break reproducibility.
    digest = hashlib.sha256(f"{seed}|{task}|{length}|{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _compose(spec: TaskSpec, mode: str, seq_text: str) -> str:
    question = spec.template.format(seq=seq_text)
    if mode == "cot":
        return f"{question} {_COT}"
    if mode == "cot_few_shot":
        return f"{question} {_COT} Here are a few examples:\n\n" + "\n\n".join(spec.examples)
    # Copying prompts already ask for the answer only ("Please answer exactly as …"): no suffix.
    return question if spec.kind == "copy" else f"{question} {_ANSWER_ONLY}"


def make_instance(
    task: str, length: int, sample: int = 0, mode: str = "answer", seed: int = 0
) -> TaskInstance:
    """The ``sample``-th prompt of ``task`` at sequence length ``length`` (digits, ones or words).

    Deterministic: the sequence depends only on ``(seed, task, length, sample)``, so the three modes
    of a counting task ask about the same sequence.
    """
    spec = _spec(task)
    _check_int("length", length, 1)
    _check_int("sample", sample, 0)
    _check_int("seed", seed, 0)
    if mode not in spec.modes:
        raise ValueError(
            f"mode {mode!r} is not available for task {task!r}; use one of: {', '.join(spec.modes)}"
        )
    rng = random.Random(_derived_seed(seed, task, length, sample))
    seq = tuple(spec.draw(rng, length))
    prompt = _compose(spec, mode, spec.render(seq))
    return TaskInstance(task, mode, length, sample, seed, prompt, spec.truth(seq), seq)


def copy_prompt(n_ones: int = 12) -> str:
    """The paper's copying prompt (Appendix C.1, verbatim) for ``1 … 1 0``: ``n_ones`` ones, then a 0."""
    _check_int("n_ones", n_ones, 0)
    return make_instance("copy_last", n_ones + 1).prompt


def _as_tuple(value: str | Iterable) -> tuple:
    """One value or many, in order, without repeats."""
    return (value,) if isinstance(value, str) else tuple(dict.fromkeys(value))


def make_instances(
    tasks: str | Iterable[str],
    lengths: Iterable[int],
    n_samples: int,
    modes: str | Iterable[str] = "answer",
    seed: int = 0,
) -> list[TaskInstance]:
    """Every (task, mode, length, sample) combination, in that nesting order (repeats dropped)."""
    tasks, modes, lengths = _as_tuple(tasks), _as_tuple(modes), _as_tuple(lengths)
    _check_int("n_samples", n_samples, 1)
    if not tasks or not modes or not lengths:
        raise ValueError("tasks, modes and lengths must each hold at least one value")
    return [
        make_instance(t, n, s, m, seed)
        for t in tasks
        for m in modes
        for n in lengths
        for s in range(n_samples)
    ]


# ----------------------------------------------------------------------------------------------
# Answer parsing

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
_BELOW_100 = (
    rf"(?:(?:{'|'.join(_TENS)})(?:[ \t-]+(?:{_U19}))?|{'|'.join(_TEENS)}|{'|'.join(_UNITS)})"
)
_NUMBER_WORDS = (
    rf"(?:(?:{_U19}|a)[ \t-]+hundred(?:[ \t-]+(?:and[ \t-]+)?{_BELOW_100})?|{_BELOW_100})"
)
_NUMBER = re.compile(
    rf"(?P<digits>\d{{1,3}}(?:,\d{{3}})+(?!\d)|\d+)(?:\.(?P<frac>\d+))?(?!\d)|(?P<words>{_NUMBER_WORDS})\b",
    re.IGNORECASE,
)
_DIGIT_NUMBER = re.compile(r"(?<![\d.,])(\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.(\d+))?(?!\d)")
_TRIM = "\t\n\r *_`~\"'‘’“”«»[](){}<>.,;:!?"


@dataclass(frozen=True)
class ParsedAnswer:
    """What :func:`parse_answer` read: ``value`` is None exactly when ``status`` is "unparsable"."""

    value: int | None
    status: Literal["ok", "unparsable"]
    matched: str  # the span of the output the value was read from ("" when nothing matched)
    method: Literal["phrase", "fallback", "none"] = "none"


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


# ----------------------------------------------------------------------------------------------
# Greedy, batched, left-padded generation


def _stop_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    for name in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
        token_id = tokenizer.convert_tokens_to_ids(name)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return sorted(i for i in ids if i is not None)


def _left_pad(
    prompts: Sequence[torch.Tensor], pad_id: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt) :] = prompt.to(device)
        mask[row, width - len(prompt) :] = 1
    return tokens, mask


def _cut_at_stop(ids: torch.Tensor, stop: torch.Tensor) -> torch.Tensor:
    hits = torch.isin(ids, stop).nonzero()
    return ids[: int(hits[0])] if len(hits) else ids


@torch.inference_mode()
def greedy_generate(
    model,
    prompts: Sequence[torch.Tensor],
    *,
    max_new_tokens: int = 64,
    stop_token_ids: Iterable[int] | None = None,
) -> list[torch.Tensor]:
    """Greedy continuations of 1-D token-id prompts, run as one left-padded batch.

    Pads on the left with an explicit attention mask (TransformerLens shifts absolute and rotary
    positions by it, so each row sees the positions it would see alone) and reuses a key–value cache.
    Returns each row's new ids, cut before its first stop token (default: the tokenizer's EOS and
    ``<|im_end|>``), so a batched run gives what one-by-one runs give.
    """
    from transformer_lens import TransformerLensKeyValueCache

    _check_int("max_new_tokens", max_new_tokens, 1)
    if not prompts or any(p.ndim != 1 or len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty 1-D token-id tensors")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > model.cfg.n_ctx:
        raise ValueError(
            f"the longest prompt ({longest} tokens) plus max_new_tokens={max_new_tokens} exceeds the "
            f"model's n_ctx={model.cfg.n_ctx}; lower max_new_tokens or the task lengths, or load the model "
            "with a larger n_ctx"
        )
    stop_list = list(stop_token_ids) if stop_token_ids is not None else _stop_ids(model.tokenizer)
    device = model.cfg.device
    stop = torch.tensor(stop_list, dtype=torch.long, device=device)
    pad_id = stop_list[0] if stop_list else 0  # masked out: its value never matters
    tokens, mask = _left_pad(prompts, pad_id, device)
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, device, len(prompts))
    logits = model(tokens, attention_mask=mask, past_kv_cache=cache)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    steps = []
    for step in range(max_new_tokens):
        next_ids = logits[:, -1].argmax(-1)
        steps.append(next_ids)
        finished |= torch.isin(next_ids, stop)
        if finished.all() or step == max_new_tokens - 1:
            break
        ones = torch.ones((len(prompts), 1), dtype=torch.long, device=device)
        logits = model(next_ids[:, None], attention_mask=ones, past_kv_cache=cache)
    generated = torch.stack(steps, dim=1).cpu()
    return [_cut_at_stop(row, stop.cpu()) for row in generated]


# ----------------------------------------------------------------------------------------------
# Results: a tidy frame, atomic files, JSONL resume

#: the columns of every results frame, in order
RESULT_COLUMNS: tuple[str, ...] = (
    "task", "mode", "length", "sample", "seed", "prompt", "raw_output", "parsed_answer", "parse_status",
    "truth", "correct", "abs_error", "n_prompt_tokens", "n_new_tokens", "fingerprint",
)  # fmt: skip
_KEY = ("task", "mode", "length", "sample")


def _frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=list(RESULT_COLUMNS))
    for column in ("length", "sample", "seed", "truth", "n_prompt_tokens", "n_new_tokens"):
        frame[column] = frame[column].astype("int64")
    for column in ("parsed_answer", "abs_error"):
        frame[column] = frame[column].astype("Int64")
    frame["correct"] = frame["correct"].astype(bool)
    # files written before rows were fingerprinted have no such field: None, not NaN
    frame["fingerprint"] = frame["fingerprint"].astype(object).where(frame["fingerprint"].notna(), None)
    return frame


def check_single_run(frame: pd.DataFrame, source: str = "these results") -> None:
    """Refuse rows made by different runs (different fingerprints), e.g. two results files merged."""
    digests = {d for d in frame.get("fingerprint", pd.Series(dtype=object)) if d is not None}
    if len(digests) > 1:
        raise ValueError(
            f"{source} mix rows of {len(digests)} different runs (fingerprints {', '.join(sorted(digests))}); "
            "summarise each run separately (filter on the fingerprint column), or pass allow_mixed=True "
            "if mixing is what you want"
        )


@dataclass(frozen=True, eq=False)
class TaskResults:
    """The tidy results of :func:`evaluate`: one row per (task, mode, length, sample)."""

    frame: pd.DataFrame
    meta: dict = field(default_factory=dict)

    def accuracy_by_length(self) -> pd.DataFrame:
        """Accuracy, mean absolute error and unparsable rate per task, mode and length."""
        frame = self.frame.assign(
            abs_error=self.frame["abs_error"].astype(
                "float64"
            ),  # NaN where unparsable, skipped by mean
            unparsable=self.frame["parse_status"] == "unparsable",
        )
        grouped = frame.groupby(["task", "mode", "length"], sort=True)
        return grouped.agg(
            n=("correct", "size"),
            accuracy=("correct", "mean"),
            mean_abs_error=("abs_error", "mean"),
            unparsable=("unparsable", "mean"),
        ).reset_index()

    def save(self, path: str | os.PathLike) -> Path:
        """Write the frame to ``.csv``, ``.json`` or ``.jsonl`` atomically (see :func:`save_results`)."""
        return save_results(self, path)

    def plot(self, kind: str = "accuracy", *, tasks: Iterable[str] | None = None):
        """The paper's figure ``kind`` (see :data:`TASK_FIGURES`) as a plotly Figure.

        ``accuracy`` is Fig. 2 (copying: first vs last, hint, alternating), ``abs_error`` Fig. 3
        (counting, per task and mode), ``histogram`` Fig. 4 (the answers given) and
        ``prompt_types`` Fig. 11 (Appendix C.5). ``tasks`` overrides which tasks are shown.
        """
        return task_figure(self, kind, tasks=tasks)

    def figures(self) -> dict[str, Any]:
        """Every figure of :data:`TASK_FIGURES` that has rows to show, by kind."""
        shown = {kind: set(_figure_tasks(self.frame, kind)) - _REFERENCE_TASKS.get(kind, set()) for kind in TASK_FIGURES}
        return {kind: task_figure(self, kind) for kind in TASK_FIGURES if shown[kind]}

    def _repr_html_(self) -> str:
        frame = self.frame
        unparsable = int((frame["parse_status"] == "unparsable").sum())
        model = self.meta.get("model", "?")
        head = (
            f"<p><b>TaskResults</b>: {len(frame)} rows, model {html.escape(str(model))}, "
            f"tasks {html.escape(', '.join(map(str, frame['task'].unique())))}; "
            f"accuracy {frame['correct'].mean():.3f}, unparsable {unparsable}</p>"
            if len(frame)
            else "<p><b>TaskResults</b>: no rows</p>"
        )
        return head + self.accuracy_by_length().to_html(
            index=False, float_format="%.3f", max_rows=30
        )

    def __repr__(self) -> str:
        return f"TaskResults({len(self.frame)} rows, meta={self.meta})"


def save_results(results: TaskResults | pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write results to ``.csv``, ``.json`` (records) or ``.jsonl``: a temp file, then ``os.replace``."""
    frame = results.frame if isinstance(results, TaskResults) else results
    path = Path(path)
    writers = {
        ".csv": lambda tmp: frame.to_csv(tmp, index=False),
        ".json": lambda tmp: frame.to_json(tmp, orient="records", indent=1, force_ascii=False),
        ".jsonl": lambda tmp: frame.to_json(tmp, orient="records", lines=True, force_ascii=False),
    }
    if path.suffix not in writers:
        raise ValueError(
            f"unknown results format {path.suffix!r} for {path}; use .csv, .json or .jsonl"
        )
    atomic_write(path, writers[path.suffix])
    return path


def load_results(path: str | os.PathLike, *, allow_mixed: bool = False) -> TaskResults:
    """Read a file written by :func:`save_results` or :func:`evaluate`'s ``out_path``.

    Rows of different runs (different fingerprints) are refused unless ``allow_mixed=True``."""
    path = Path(path)
    if path.suffix == ".csv":
        rows = pd.read_csv(
            path, keep_default_na=False, na_values={"parsed_answer": [""], "abs_error": [""]},
            dtype={"fingerprint": str},  # an all-digit hex digest must stay text
        )
        rows = rows.astype({"prompt": str, "raw_output": str}).to_dict("records")
    elif path.suffix == ".json":
        rows = json.loads(path.read_text(encoding="utf-8"))
    elif path.suffix == ".jsonl":
        rows = _jsonl_rows(path)[0]  # every row: a repeated key from another run must stay visible
    else:
        raise ValueError(
            f"unknown results format {path.suffix!r} for {path}; use .csv, .json or .jsonl"
        )
    for row in rows:  # CSV/JSON readers give NaN or float for the nullable integer columns
        row["fingerprint"] = row.get("fingerprint") or None
        for column in ("parsed_answer", "abs_error"):
            value = row.get(column)
            row[column] = (
                None
                if value is None or (isinstance(value, float) and math.isnan(value))
                else int(value)
            )
    frame = _frame(rows)
    if not allow_mixed:
        check_single_run(frame, str(path))
    return TaskResults(frame, {"source": str(path)})


def _jsonl_rows(path: Path) -> tuple[list[dict], bool]:
    """Every complete row of a results JSONL, in file order (repeats kept), and whether all lines were.

    A line cut short (no newline, or not valid JSON; files written before saves were atomic) is skipped.
    """
    if not path.exists():
        return [], True
    rows, clean = [], True
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            row = json.loads(line) if line.endswith("\n") else None
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or not set(_KEY) <= row.keys():
            clean = False
            continue
        rows.append(row)
    return rows, clean


def _read_jsonl(path: Path, *, repair: bool = True) -> dict[tuple, dict]:
    """Complete rows of a results JSONL, keyed by (task, mode, length, sample).

    A line cut short by an interruption is dropped and, with ``repair``, the file is rewritten
    without it, so that saving continues from a clean file.
    """
    listed, clean = _jsonl_rows(path)
    rows = {tuple(row[k] for k in _KEY): row for row in listed}
    if repair and not clean:
        write_jsonl_atomic(path, rows.values())
    return rows


def _row(instance: TaskInstance, raw: str, n_prompt: int, n_new: int, fingerprint: str) -> dict:
    parsed = parse_answer(raw, instance.kind)
    error = None if parsed.value is None else abs(parsed.value - instance.truth)
    return {
        "task": instance.task,
        "mode": instance.mode,
        "length": instance.length,
        "sample": instance.sample,
        "seed": instance.seed,
        "prompt": instance.prompt,
        "raw_output": raw,
        "parsed_answer": parsed.value,
        "parse_status": parsed.status,
        "truth": instance.truth,
        "correct": parsed.value == instance.truth,
        "abs_error": error,
        "n_prompt_tokens": n_prompt,
        "n_new_tokens": n_new,
        "fingerprint": fingerprint,
    }


def _check_resumable(done: dict[tuple, dict], instances: list[TaskInstance], path: Path) -> None:
    for instance in instances:
        row = done.get(instance.key)
        if row is not None and row.get("prompt") != instance.prompt:
            raise ValueError(
                f"{path} already holds {instance.key} with a different prompt (another seed or prompt "
                "version); pass a new out_path or delete the file to start over"
            )


# ----------------------------------------------------------------------------------------------
# Run fingerprints: a results folder never mixes rows made by different runs

#: the packages whose version can change a generated reply
_FINGERPRINT_PACKAGES = ("lens-squash", "torch", "transformer-lens", "transformers")
_HASH_CHUNK = 1 << 24  # bytes per hashlib update: bounded extra memory, few Python round trips


def weights_sha256(model) -> str:
    """SHA-256 of every parameter of ``model``, ALL bytes (no sampling), in ``named_parameters``
    order, each prefixed by its name, dtype and shape; the bytes are fed in 16 MB chunks.

    Buffers (rotary tables, masks) are left out: they follow from the config and ``n_ctx``, not from
    training. Costs what SHA-256 costs: 1.6 s for SmolLM2-135M in float32 (652 MB) on this project's
    2-core machine, once per :func:`run_tasks` or :func:`evaluate` call.
    """
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        flat = param.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        digest.update(f"{name}|{str(param.dtype).removeprefix('torch.')}|{tuple(param.shape)}|".encode())
        for start in range(0, flat.numel(), _HASH_CHUNK):
            digest.update(flat[start : start + _HASH_CHUNK].numpy())  # the buffer itself: no copy
    return digest.hexdigest()


def generation_fingerprint(*, max_new_tokens: int, batch_size: int, chat: bool | None, seed: int) -> dict[str, Any]:
    """The part of a run's fingerprint known without a model: decoding, batching, seed, versions."""
    from ..core.records import _version

    return {
        "generation": {"decoding": "greedy", "max_new_tokens": max_new_tokens, "batch_size": batch_size,
                       "chat": chat},
        "tasks": {"seed": seed},
        "versions": {package: _version(package) for package in _FINGERPRINT_PACKAGES},
    }  # fmt: skip


def run_fingerprint(model, *, max_new_tokens: int, batch_size: int, chat: bool | None, seed: int) -> dict[str, Any]:
    """Everything that can change a row's reply: the model (name, weights hash, dtype, device, stop
    tokens), the generation and task parameters and the library versions.

    Which rows exist (tasks, modes, lengths, samples) is not part of it: every row is keyed by those,
    so a rerun may add lengths to a folder without mixing anything.
    """
    model_part = {
        "name": getattr(model.cfg, "model_name", None),
        "weights_sha256": weights_sha256(model),
        "dtype": str(model.cfg.dtype).removeprefix("torch."),
        "device": str(model.cfg.device),
        "stop_token_ids": _stop_ids(model.tokenizer),
    }
    return {"model": model_part, **generation_fingerprint(max_new_tokens=max_new_tokens, batch_size=batch_size,
                                                          chat=chat, seed=seed)}


def fingerprint_digest(fingerprint: dict[str, Any]) -> str:
    """A short, stable id of a fingerprint (16 hex digits of the SHA-256 of its canonical JSON)."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def _flat(mapping: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def fingerprint_differences(stored: dict[str, Any], current: dict[str, Any], *, partial: bool = False) -> list[str]:
    """``"field: stored → current"`` for every field that differs. ``partial=True`` compares only the
    fields ``current`` has (a check made before the model is loaded)."""
    old, new = _flat(stored), _flat(current)
    keys = new.keys() if partial else old.keys() | new.keys()
    absent = "(absent)"  # a field one side lacks differs even from None
    return [f"{key}: {old.get(key, absent)!r} → {new.get(key, absent)!r}"
            for key in sorted(keys) if (key in old, old.get(key)) != (key in new, new.get(key))]


def fingerprint_path(out_path: str | os.PathLike) -> Path:
    """Where a results JSONL keeps the fingerprint of the run that made it: ``results.fingerprint.json``."""
    path = Path(out_path)
    return path.with_name(f"{path.stem}.fingerprint.json")


def _refuse_mix(path: Path, reason: str) -> ValueError:
    return ValueError(
        f"{path} holds results of a different run ({reason}); resuming would mix the two. Pass a new "
        "output folder (--out DIR, or out_dir= / out_path= in Python), or discard the old results with "
        "--overwrite (overwrite=True)"
    )


def check_run_folder(out_path: str | os.PathLike, fingerprint: dict[str, Any], *, partial: bool = False,
                     loaded_as: str | None = None) -> None:
    """Refuse to resume ``out_path`` (a results JSONL) when its rows were made by another run.

    ``partial=True`` compares only the fields ``fingerprint`` holds (before loading a model: dtype,
    generation, versions); ``loaded_as`` is the model name the user asked for, compared with the
    name recorded by the command line. A missing or empty file is fine.
    """
    path = Path(out_path)
    rows = _jsonl_rows(path)[0]
    if not rows:  # nothing saved yet (or no file): nothing to mix with
        return
    record_path = fingerprint_path(path)
    if not record_path.exists():
        raise _refuse_mix(path, f"it has no {record_path.name}, so what made its rows is unknown")
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        stored = record["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise _refuse_mix(path, f"{record_path.name} cannot be read: {err}") from err
    differences = fingerprint_differences(stored, fingerprint, partial=partial)
    hint = record.get("loaded_as")
    if loaded_as is not None and hint is not None and hint.lower() != loaded_as.lower():
        differences.insert(0, f"model: {hint!r} → {loaded_as!r}")
    if differences:
        raise _refuse_mix(path, "; ".join(differences))
    if not partial:
        digest = record.get("digest")
        foreign = {row.get("fingerprint") for row in rows} - {digest}
        if foreign:
            raise _refuse_mix(path, f"rows with fingerprints {sorted(map(str, foreign))} beside {digest!r}")


def _record_fingerprint(path: Path, fingerprint: dict[str, Any], loaded_as: str | None) -> None:
    """Keep the run's fingerprint beside its results (a resumed run has the same one, checked before)."""
    from ..core.records import write_json_atomic

    record_path = fingerprint_path(path)
    # a record without rows (a run stopped before its first batch) is stale: this run replaces it
    if not record_path.exists() or not _jsonl_rows(path)[0]:
        write_json_atomic(record_path, {"digest": fingerprint_digest(fingerprint), "fingerprint": fingerprint,
                                        "loaded_as": loaded_as})


def _run_batch(
    model, batch: list[TaskInstance], prompts: dict[tuple, torch.Tensor], max_new_tokens: int, fingerprint: str
) -> list[dict]:
    ids = [prompts[inst.key] for inst in batch]
    outputs = greedy_generate(model, ids, max_new_tokens=max_new_tokens)
    texts = [model.tokenizer.decode(out.tolist(), skip_special_tokens=True) for out in outputs]
    return [
        _row(i, t, len(p), len(o), fingerprint)
        for i, t, p, o in zip(batch, texts, ids, outputs, strict=True)
    ]


def _tokenized(model, todo: list[TaskInstance], chat: bool | None, max_new_tokens: int) -> dict[tuple, torch.Tensor]:
    """Every prompt still to run, tokenized up front, so that a prompt too long for the context is
    refused before the first batch is generated rather than after hours of work."""
    from lens_squash.edge.models import format_prompt

    prompts = {inst.key: format_prompt(model, inst.prompt, chat=chat) for inst in todo}
    if prompts:
        key, longest = max(prompts.items(), key=lambda item: len(item[1]))
        if len(longest) + max_new_tokens > model.cfg.n_ctx:
            raise ValueError(
                f"the prompt of {key} has {len(longest)} tokens; with max_new_tokens={max_new_tokens} "
                f"(--max-new-tokens) it exceeds the model's n_ctx={model.cfg.n_ctx}; lower max_new_tokens "
                "or the task lengths, or load the model with a larger n_ctx (--n-ctx)"
            )
    return prompts


def evaluate(
    model,
    task: str | Iterable[str],
    lengths: Iterable[int],
    n_samples: int = 1,
    *,
    mode: str | Iterable[str] = "answer",
    seed: int = 0,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    chat: bool | None = None,
    out_path: str | os.PathLike | None = None,
    overwrite: bool = False,
    loaded_as: str | None = None,
    progress: bool = True,
    on_batch: Callable[[int, list[dict]], None] | None = None,
    _fingerprint: dict[str, Any] | None = None,
) -> TaskResults:
    """Prompt ``model`` with every (task, mode, length, sample) and score its greedy replies.

    Prompts go through the chat template when the tokenizer has one (``chat=None``; see
    :func:`lens_squash.edge.models.format_prompt`), are generated ``batch_size`` at a time by
    :func:`greedy_generate`, and are parsed with :func:`parse_answer`. Every row carries the digest
    of the run's :func:`run_fingerprint`.

    With ``out_path`` (a ``.jsonl`` file) the file is rewritten atomically after each batch (a crash
    leaves the previous version), and a rerun skips the rows already there, so an interrupted run
    continues where it stopped — but only a rerun of the same run: the fingerprint is kept beside
    the file (:func:`fingerprint_path`) and a different one is refused (:func:`check_run_folder`);
    ``overwrite=True`` discards the old rows instead. ``loaded_as`` (the model name the user typed)
    is recorded so the command line can refuse a different ``--model`` before loading it.
    ``on_batch(index, rows)`` is called after each batch is saved. Copying tasks are deterministic:
    their samples repeat the same prompt. (``_fingerprint`` is :func:`run_tasks`' way of hashing the
    weights once for all its tasks; it must be ``run_fingerprint`` of these very arguments.)
    """
    from ..core.validate import check_chat

    _check_int("batch_size", batch_size, 1)
    _check_int("max_new_tokens", max_new_tokens, 1)
    check_chat(chat)
    instances = make_instances(task, lengths, n_samples, mode, seed)
    path = None if out_path is None else Path(out_path)
    if path is not None and path.suffix != ".jsonl":
        raise ValueError(f"out_path must end in .jsonl (rows are saved per batch), got {path}")
    fingerprint = _fingerprint or run_fingerprint(model, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                                  chat=chat, seed=seed)
    digest = fingerprint_digest(fingerprint)
    if path is not None:
        if overwrite:
            path.unlink(missing_ok=True)
            fingerprint_path(path).unlink(missing_ok=True)
        check_run_folder(path, fingerprint, loaded_as=loaded_as)
    done = _read_jsonl(path) if path is not None else {}
    _check_resumable(done, instances, path)
    rows = {i.key: done[i.key] for i in instances if i.key in done}
    todo = [i for i in instances if i.key not in rows]
    prompts = _tokenized(model, todo, chat, max_new_tokens)  # refuse over-long prompts before any work
    if path is not None:
        _record_fingerprint(path, fingerprint, loaded_as)
    with counter(desc="generate", total=len(instances), initial=len(rows), unit="prompt",
                 enabled=None if progress else False) as bar:
        for index, start in enumerate(range(0, len(todo), batch_size)):
            new_rows = _run_batch(model, todo[start : start + batch_size], prompts, max_new_tokens, digest)
            keyed = {tuple(r[k] for k in _KEY): r for r in new_rows}
            if path is not None:
                done.update(keyed)
                write_jsonl_atomic(path, done.values())
            rows.update(keyed)
            bar.update(len(new_rows))
            if on_batch is not None:
                on_batch(index, new_rows)
    meta = {"model": getattr(model.cfg, "model_name", "?"), "seed": seed, "max_new_tokens": max_new_tokens,
            "chat": chat, "out_path": None if path is None else str(path), "fingerprint": digest}  # fmt: skip
    return TaskResults(_frame([rows[i.key] for i in instances]), meta)


# ----------------------------------------------------------------------------------------------
# Figures like the paper's, a summary table, and a runner that writes everything to a folder

#: figure kind -> (paper figure, the tasks it shows in legend order, plotting builder name, title)
TASK_FIGURES: dict[str, tuple[str, tuple[str, ...], str, str]] = {
    "accuracy": ("Fig. 2", ("copy_first", "copy_last", "copy_last_hint", "copy_alternating"),
                 "accuracy_figure", "Copying: accuracy against sequence length (Fig. 2)"),
    "abs_error": ("Fig. 3", ("sum_ones", "count_ones", "count_bernoulli", "count_car"),
                  "abs_error_figure", "Counting: mean absolute error against length (Fig. 3)"),
    "histogram": ("Fig. 4", ("sum_ones", "count_ones", "count_bernoulli", "count_car"),
                  "answer_histogram", "Counting: distribution of the answers (Fig. 4)"),
    # copy_last is the reference prompt the two reorderings of Appendix C.5 are compared against
    "prompt_types": ("Fig. 11", ("copy_type1", "copy_type2", "copy_last"),
                     "accuracy_figure", "Copying: prompt Type 1 vs Type 2 (Fig. 11, App. C.5)"),
}  # fmt: skip
# tasks a figure shows only for comparison: alone they do not make the figure worth drawing
_REFERENCE_TASKS: dict[str, set[str]] = {"prompt_types": {"copy_last"}}


def _figure_tasks(frame: pd.DataFrame, kind: str, tasks: Iterable[str] | None = None) -> list[str]:
    """The tasks figure ``kind`` shows: ``tasks`` if given, else its default tasks present in ``frame``."""
    if kind not in TASK_FIGURES:
        raise ValueError(f"unknown figure kind {kind!r}; choose one of {', '.join(TASK_FIGURES)}")
    present = set(frame["task"])
    wanted = _as_tuple(tasks) if tasks is not None else TASK_FIGURES[kind][1]
    return [t for t in wanted if t in present]


def task_figure(results: TaskResults | pd.DataFrame, kind: str = "accuracy", *, tasks=None):
    """Figure ``kind`` of :data:`TASK_FIGURES` for the rows of its tasks (a plotly Figure)."""
    from ..views import task_figures

    frame = results.frame if isinstance(results, TaskResults) else results
    chosen = _figure_tasks(frame, kind, tasks)
    if not chosen:
        wanted = ", ".join(_as_tuple(tasks) if tasks is not None else TASK_FIGURES[kind][1])
        raise ValueError(
            f"figure {kind!r} needs rows of one of the tasks {wanted}, but the results hold only "
            f"{', '.join(map(str, frame['task'].unique())) or 'no rows'}; run those tasks or pass tasks=[...]"
        )
    # keep the figure's task order: the builders group series in order of appearance/sort
    rows = frame[frame["task"].isin(chosen)]
    _, _, builder, title = TASK_FIGURES[kind]
    return getattr(task_figures, builder)(rows, title=title)


def summarize_results(results: TaskResults | pd.DataFrame | str | os.PathLike, *,
                      allow_mixed: bool = False) -> pd.DataFrame:
    """Accuracy, mean absolute error and unparsable rate per task, mode and length.

    Takes results, their frame, or a file written by :func:`save_results` / :func:`run_tasks`.
    Rows of different runs (different fingerprints) are refused unless ``allow_mixed=True``.
    """
    if isinstance(results, (str, os.PathLike)):
        results = load_results(results, allow_mixed=allow_mixed)
    if isinstance(results, pd.DataFrame):
        results = TaskResults(results)
    if not allow_mixed:
        check_single_run(results.frame)
    return results.accuracy_by_length()


def write_task_figures(results: TaskResults, path: str | os.PathLike, *, metadata: dict | None = None) -> Path:
    """One self-contained HTML page with the summary table and every figure the results can show."""
    from ..core.records import write_text_atomic
    from ..views.report import ReportSection, build_report

    sections = [ReportSection("summary", table=summarize_results(results))]
    for kind, fig in results.figures().items():
        paper_fig, _, _, title = TASK_FIGURES[kind]
        sections.append(ReportSection(f"{kind} ({paper_fig})", figures=[fig]))
    page = build_report(sections, title="lens_squash copying and counting tasks", metadata=metadata)
    return write_text_atomic(path, page)


def _modes_for(task: str, modes: tuple[str, ...]) -> tuple[str, ...]:
    spec = _spec(task)
    usable = tuple(m for m in modes if m in spec.modes)
    if not usable:
        raise ValueError(
            f"task {task!r} offers none of the modes {', '.join(modes)}; it offers {', '.join(spec.modes)} "
            "(copying tasks have only 'answer'), so add one of those to modes"
        )
    return usable


#: what run_tasks writes once every row is there (beside results.jsonl and its fingerprint)
_FINAL_FILES = ("results.csv", "results.json", "figures.html")


def run_tasks(
    model,
    tasks: str | Iterable[str],
    lengths: Iterable[int],
    n_samples: int = 1,
    modes: str | Iterable[str] = "answer",
    out_dir: str | os.PathLike | None = None,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    seed: int = 0,
    chat: bool | None = None,
    overwrite: bool = False,
    loaded_as: str | None = None,
    progress: bool = True,
    figures: bool = True,
) -> TaskResults:
    """Evaluate several tasks, each in the requested modes it offers, and write the results to ``out_dir``.

    Into ``out_dir``: ``results.jsonl`` (rewritten atomically per batch; a rerun of the same run
    resumes from it, another run is refused unless ``overwrite=True``, see :func:`evaluate`),
    ``results.fingerprint.json`` (what made the rows), then, once every row is there,
    ``results.csv``, ``results.json`` (``{"metadata": provenance, "summary": …, "rows": …}``) and
    ``figures.html``, all atomically. A mode a task does not offer is skipped for that task (copying
    tasks are answer-only). Every argument, and the length of every prompt, is checked before the
    first reply is generated.
    """
    from ..core.records import provenance, to_jsonable, write_json_atomic

    tasks, modes = _as_tuple(tasks), _as_tuple(modes)
    lengths = _as_tuple(lengths)
    if not tasks or not modes:
        raise ValueError("pass at least one task and one mode, e.g. tasks=['copy_last'], modes='answer'")
    plan = {task: _modes_for(task, modes) for task in tasks}  # validate everything before generating
    from ..core.validate import check_chat

    check_chat(chat)
    _check_int("max_new_tokens", max_new_tokens, 1)
    _check_int("batch_size", batch_size, 1)
    everything = [i for task, task_modes in plan.items() for i in make_instances(task, lengths, n_samples, task_modes, seed)]
    _tokenized(model, everything, chat, max_new_tokens)  # no task may fail for length after another has run
    out = None if out_dir is None else Path(out_dir)
    if out is not None and overwrite:  # the old run's summaries must not outlive its rows
        for name in _FINAL_FILES:
            (out / name).unlink(missing_ok=True)
    fingerprint = run_fingerprint(model, max_new_tokens=max_new_tokens, batch_size=batch_size, chat=chat, seed=seed)
    frames, metas = [], []
    for index, (task, task_modes) in enumerate(plan.items()):
        part = evaluate(
            model, task, lengths, n_samples, mode=task_modes, seed=seed, batch_size=batch_size,
            max_new_tokens=max_new_tokens, chat=chat, progress=progress, loaded_as=loaded_as,
            out_path=None if out is None else out / "results.jsonl", overwrite=overwrite and index == 0,
            _fingerprint=fingerprint,
        )  # fmt: skip
        frames.append(part.frame)
        metas.append(part.meta)
    args = {"tasks": list(tasks), "lengths": list(lengths), "n_samples": n_samples, "modes": list(modes),
            "batch_size": batch_size, "max_new_tokens": max_new_tokens, "seed": seed, "chat": chat}  # fmt: skip
    meta = {**metas[0], "run_tasks": args, "out_dir": None if out is None else str(out)}
    args["fingerprint"] = metas[0]["fingerprint"]
    results = TaskResults(pd.concat(frames, ignore_index=True), meta)
    if out is not None:
        metadata = provenance(model, **args)
        save_results(results, out / "results.csv")
        payload = {"metadata": metadata, "summary": summarize_results(results).to_dict("records"),
                   "rows": results.frame.astype(object).where(results.frame.notna(), None).to_dict("records")}  # fmt: skip
        write_json_atomic(out / "results.json", to_jsonable(payload))
        if figures:
            write_task_figures(results, out / "figures.html", metadata=metadata)
    return results
