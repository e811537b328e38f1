"""The copying and counting tasks of Section 3: a registry of tasks, and each prompt as a pure function.

- copying (Section 3.1, Figure 2): the last digit of ``1 … 1 0``, the first digit of ``0 1 … 1``, the
  same with the hint "*Hint* It’s not necessarily a 1, check carefully", with alternating ones and
  zeros, and the Type 1 / Type 2 prompt orders of Appendix C.5 (Figure 11);
- counting (Section 3.2, Figure 3): (i) the sum ``1 + 1 + … + 1``, (ii) the ones in a run of ones,
  (iii) the ones in a Bernoulli(0.7) 0/1 sequence, (iv) the times ‘car’ appears in a sentence; each
  in one of three prompting *styles*: answer-only, CoT zero-shot or CoT few-shot (the Appendix's two
  worked sums, and our own analogues "with similar strategies" for the other counting tasks).

The texts themselves, verbatim with the paper's quirks, are in :mod:`.task_texts`. Every instance is
a pure function of ``(seed, task, length, sample)``: :func:`make_instance` derives its random stream
from a SHA-256 of those four values, never from Python's salted ``hash()``.

Our choices where the paper is silent: sequences are digits separated by single spaces ("1 1 1 0"), the
sum is "1 + 1 + 1"; the first-digit prompt swaps "last" for "first"; the hint is appended to the end
of the copying prompt; the alternating sequence strictly alternates and ends in 0 ("1 0 1 0",
"0 1 0 1 0"); the answer-only style appends "Only output the answer, without any explanation or
working." to counting prompts (copying prompts already demand the bare answer and take no suffix,
and the copying tasks have only this style, as in the paper); CoT appends the paper's "Let’s think
step by step, showing me your reasoning." after the question, and few-shot CoT continues it with
" Here are a few examples:" and the examples, one blank line apart; 'car' is each word of task (iv)
with probability 0.25, the others drawn from :data:`FILLER_WORDS`.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from ..core.display import compact_repr
from ..core.results import Record
from .task_texts import (
    ANSWER_ONLY,
    BERNOULLI_EXAMPLES,
    BERNOULLI_P,
    CAR_EXAMPLES,
    CAR_P,
    COPY_FIRST,
    COPY_LAST,
    COPY_TYPE1,
    COPY_TYPE2,
    COT,
    COUNT_CAR,
    COUNT_ONES,
    FILLER_WORDS,
    HINT,
    ONES_EXAMPLES,
    SUM,
    SUM_EXAMPLES,
)

__all__ = [
    "STYLES",
    "TASKS",
    "TaskInstance",
    "TaskSpec",
    "as_tuple",
    "check_int",
    "copy_prompt",
    "make_instance",
    "make_instances",
    "task_spec",
]


TaskSequence = tuple[int, ...] | tuple[str, ...]
#: prompting styles of Section 3.2: answer only, CoT zero-shot, CoT few-shot (``mode`` before; the
#: word now means only the Jacobian's exact / frozen / sketch)
STYLES: tuple[str, ...] = ("answer", "cot", "cot_few_shot")


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
    styles: tuple[str, ...] = ("answer",)
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
    return TaskSpec(name, "count", description, template, draw, render, truth, STYLES, examples)


#: every task by name; add a :class:`TaskSpec` here to register a new one
TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        _copy("copy_last", "last digit of 1 … 1 0 (Fig. 2a)", COPY_LAST, _ones_then_zero, _last),
        _copy("copy_first", "first digit of 0 1 … 1 (Fig. 2a)", COPY_FIRST, _zero_then_ones, _first),
        _copy("copy_last_hint", "last digit of 1 … 1 0, with the hint (Fig. 2b)", COPY_LAST + HINT,
              _ones_then_zero, _last),
        _copy("copy_alternating", "last digit of … 1 0 1 0 (Fig. 2c)", COPY_LAST, _alternating, _last),
        _copy("copy_type1", "last digit of 1 … 1 0, prompt Type 1 (App. C.5)", COPY_TYPE1,
              _ones_then_zero, _last),
        _copy("copy_type2", "last digit of 1 … 1 0, prompt Type 2 (App. C.5)", COPY_TYPE2,
              _ones_then_zero, _last),
        _count("sum_ones", "(i) the sum 1 + 1 + … + 1", SUM, _all_ones, _plus, _n_ones, SUM_EXAMPLES),
        _count("count_ones", "(ii) ones in a run of ones", COUNT_ONES, _all_ones, _digits, _n_ones,
               ONES_EXAMPLES),
        _count("count_bernoulli", f"(iii) ones in a Bernoulli({BERNOULLI_P}) 0/1 sequence", COUNT_ONES,
               _bernoulli, _digits, _n_ones, BERNOULLI_EXAMPLES),
        _count("count_car", "(iv) times 'car' appears in a sentence", COUNT_CAR, _sentence, _words,
               _n_car, CAR_EXAMPLES),
    )
}  # fmt: skip


@dataclass(frozen=True)
class TaskInstance(Record):
    """One prompt of one task: the user message (no chat template), its sequence and the truth."""

    task: str
    style: str
    length: int
    sample: int
    seed: int
    prompt: str
    truth: int
    sequence: TaskSequence

    __repr__ = compact_repr

    @property
    def kind(self) -> str:
        """``"copy"`` or ``"count"``: which answer phrase :func:`parse_answer` looks for."""
        return TASKS[self.task].kind

    @property
    def key(self) -> tuple[str, str, int, int]:
        """What identifies the instance in a results file: (task, style, length, sample)."""
        return (self.task, self.style, self.length, self.sample)


def task_spec(task: str) -> TaskSpec:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks are {', '.join(TASKS)}")
    return TASKS[task]


def check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}; pass e.g. {name}={max(minimum, 1)}")
    return value


def _derived_seed(seed: int, task: str, length: int, sample: int) -> int:
    # SHA-256, not hash(): Python salts str hashes per process, which would break reproducibility.
    digest = hashlib.sha256(f"{seed}|{task}|{length}|{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _compose(spec: TaskSpec, style: str, seq_text: str) -> str:
    question = spec.template.format(seq=seq_text)
    if style == "cot":
        return f"{question} {COT}"
    if style == "cot_few_shot":
        return f"{question} {COT} Here are a few examples:\n\n" + "\n\n".join(spec.examples)
    # Copying prompts already ask for the answer only ("Please answer exactly as …"): no suffix.
    return question if spec.kind == "copy" else f"{question} {ANSWER_ONLY}"


def make_instance(task: str, length: int, sample: int = 0, style: str = "answer", seed: int = 0) -> TaskInstance:
    """The ``sample``-th prompt of ``task`` at sequence length ``length`` (digits, ones or words).

    Deterministic: the sequence depends only on ``(seed, task, length, sample)``, so the three styles
    of a counting task ask about the same sequence.
    """
    spec = task_spec(task)
    check_int("length", length, 1)
    check_int("sample", sample, 0)
    check_int("seed", seed, 0)
    if style not in spec.styles:
        raise ValueError(f"style {style!r} is not available for task {task!r}; use one of: {', '.join(spec.styles)}")
    rng = random.Random(_derived_seed(seed, task, length, sample))
    seq = tuple(spec.draw(rng, length))
    prompt = _compose(spec, style, spec.render(seq))
    return TaskInstance(task, style, length, sample, seed, prompt, spec.truth(seq), seq)


def copy_prompt(n_ones: int = 12) -> str:
    """The paper's copying prompt (Appendix C.1, verbatim) for ``1 … 1 0``: ``n_ones`` ones, then a 0."""
    check_int("n_ones", n_ones, 0)
    return make_instance("copy_last", n_ones + 1).prompt


def as_tuple(value: str | Iterable) -> tuple:
    """One value or many, in order, without repeats."""
    return (value,) if isinstance(value, str) else tuple(dict.fromkeys(value))


def make_instances(
    tasks: str | Iterable[str],
    lengths: Iterable[int],
    n_samples: int,
    style: str | Iterable[str] = "answer",
    seed: int = 0,
) -> list[TaskInstance]:
    """Every (task, style, length, sample) combination, in that nesting order (repeats dropped)."""
    tasks, styles, lengths = as_tuple(tasks), as_tuple(style), as_tuple(lengths)
    check_int("n_samples", n_samples, 1)
    if not tasks or not styles or not lengths:
        raise ValueError("tasks, styles and lengths must each hold at least one value")
    return [make_instance(t, n, s, m, seed) for t in tasks for m in styles for n in lengths for s in range(n_samples)]
