"""Tests for lens_squash.experiments.tasks: verbatim prompts (Appendix C.1/C.5), generators, parser, evaluation."""

from __future__ import annotations

import json
import math
import random
import re

import pandas as pd
import pytest
import torch

from lens_squash.edge.generation import greedy_generate
from lens_squash.experiments import runs, task_eval, task_results, task_texts, tasks
from lens_squash.experiments.answers import ParsedAnswer, parse_answer
from lens_squash.experiments.task_eval import evaluate
from lens_squash.experiments.task_prompts import STYLES, TASKS, make_instance, make_instances
from lens_squash.experiments.task_results import RESULT_COLUMNS, TaskResults, load_results, save_results
from lens_squash.experiments.task_texts import FILLER_WORDS

# ----------------------------------------------------------------------------------------------
# Prompts, verbatim (typed from Appendix C.1 and C.5, with the paper's quotes and quirks)

COPY_TAIL = "Please answer exactly as \u2018The answer to your question is: <ANSWER>\u2019"
FINAL = (
    "Please give the answer on the final line exactly as \u2019The final answer to your maths question "
    "is: xxxx\u2019, where \u2019xxxx"
)
ANSWER_ONLY = " Only output the answer, without any explanation or working."

VERBATIM = {
    "copy_last": "Consider the following sequence: 1 1 1 0. What is the last digit in this sequence? " + COPY_TAIL,
    "copy_first": "Consider the following sequence: 0 1 1 1. What is the first digit in this sequence? " + COPY_TAIL,
    "copy_last_hint": "Consider the following sequence: 1 1 1 0. What is the last digit in this sequence? "
    + COPY_TAIL
    + " *Hint* It\u2019s not necessarily a 1, check carefully",
    "copy_alternating": "Consider the following sequence: 1 0 1 0. What is the last digit in this sequence? "
    + COPY_TAIL,
    "copy_type1": "What is the last digit of the following sequence? " + COPY_TAIL + ". Here is the sequence: 1 1 1 0",
    "copy_type2": COPY_TAIL + ". What is the last digit of the following sequence? 1 1 1 0",
    "sum_ones": "Please perform the following sum: 1 + 1 + 1 + 1. " + FINAL + "\u2019 is your answer.." + ANSWER_ONLY,
    "count_ones": "Please count the number of ones in the following sequence:1 1 1 1. "
    + FINAL
    + " is your answer."
    + ANSWER_ONLY,
}

COT = " Let\u2019s think step by step, showing me your reasoning."
PAPER_SUM_EXAMPLES = """Please perform the following sum: 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1
We divide the sum into groups of 5.
(1 + 1 + 1 + 1 + 1) + (1 + 1 + 1 + 1 + 1) + 1 + 1
The answer is then 2 * 5 + 2 = 12
The final answer to your maths question is: 12

Please perform the following sum: 1 + 1 + 1 + 1 + 1 + 1
We divide the sum into groups of 5.
(1 + 1 + 1 + 1 + 1) + 1
The answer is then 1 * 5 + 1 = 6
The final answer to your maths question is: 6"""


@pytest.mark.parametrize("task", sorted(VERBATIM))
def test_prompt_is_the_papers_text(task):
    assert make_instance(task, 4).prompt == VERBATIM[task]


def test_bernoulli_and_car_prompts_wrap_the_sequence_in_the_papers_words():
    bern = make_instance("count_bernoulli", 9, 3)
    digits = " ".join(map(str, bern.sequence))
    assert bern.prompt == VERBATIM["count_ones"].replace("1 1 1 1", digits)
    car = make_instance("count_car", 7, 2)
    sentence = " ".join(car.sequence)
    assert car.prompt == (
        "Please count the number of times \u2018car\u2019 appears in the following sentence: "
        f"\u2019{sentence}\u2019. " + FINAL + "\u2019 is your answer." + ANSWER_ONLY
    )


def test_cot_styles_extend_the_question_and_few_shot_uses_the_appendix_sums():
    question = make_instance("sum_ones", 5, style="answer").prompt.removesuffix(ANSWER_ONLY)
    cot = make_instance("sum_ones", 5, style="cot").prompt
    few = make_instance("sum_ones", 5, style="cot_few_shot").prompt
    assert cot == question + COT
    assert few == cot + " Here are a few examples:\n\n" + PAPER_SUM_EXAMPLES
    for task in ("count_ones", "count_bernoulli", "count_car"):
        few = make_instance(task, 6, style="cot_few_shot").prompt
        assert few.count("The final answer to your maths question is:") == 3  # instruction + 2 examples
        assert few.startswith(make_instance(task, 6, style="cot").prompt)


def test_our_few_shot_examples_state_correct_answers():
    for task in ("count_ones", "count_bernoulli", "count_car"):
        for example in TASKS[task].examples:
            question, *_, last = example.split("\n")
            body = question.split(": ", 1)[1].strip("\u2019")
            truth = len(re.findall(r"\bcar\b", body)) if task == "count_car" else body.split().count("1")
            assert parse_answer(last, "count").value == truth


def test_every_task_of_section_3_is_registered_with_its_styles():
    assert set(TASKS) == {
        "copy_last", "copy_first", "copy_last_hint", "copy_alternating", "copy_type1", "copy_type2",
        "sum_ones", "count_ones", "count_bernoulli", "count_car",
    }  # fmt: skip
    for name, spec in TASKS.items():
        assert spec.styles == (("answer",) if spec.kind == "copy" else STYLES), name


# ----------------------------------------------------------------------------------------------
# Generators: determinism and truth (seeded property loops)


def test_instances_are_deterministic_and_the_seed_is_not_pythons_salted_hash():
    a = make_instance("count_bernoulli", 20, 4, "cot", seed=7)
    assert a == make_instance("count_bernoulli", 20, 4, "cot", seed=7)
    # pinned: the same draw in every process, whatever PYTHONHASHSEED is
    assert make_instance("count_bernoulli", 12, 0).sequence == (0, 0, 1, 1, 1, 1, 1, 0, 1, 1, 1, 0)
    assert make_instance("count_car", 4, 0).sequence == ("window", "new", "car", "small")
    assert make_instance("count_car", 5, 1, seed=3).sequence == make_instance("count_car", 5, 1, seed=3).sequence
    draws = {make_instance("count_bernoulli", 30, s).sequence for s in range(20)}
    assert len(draws) == 20  # samples differ
    assert make_instance("count_bernoulli", 30, 0, seed=1).sequence != make_instance("count_bernoulli", 30, 0).sequence
    # the three styles ask about the same sequence
    assert len({make_instance("count_car", 15, 2, m).sequence for m in STYLES}) == 1


def _sequence_text(task: str, prompt: str) -> str:
    """The sequence as the prompt shows it, cut out with the paper's surrounding words."""
    patterns = {
        "copy_type1": r"Here is the sequence: (.*)$",
        "copy_type2": r"following sequence\? (.*)$",
        "sum_ones": r"following sum: (.*?)\. Please",
        "count_ones": r"following sequence:(.*?)\. Please",
        "count_bernoulli": r"following sequence:(.*?)\. Please",
        "count_car": r"following sentence: \u2019(.*?)\u2019\. Please",
    }
    return re.search(patterns.get(task, r"following sequence: (.*?)\. What"), prompt).group(1)


def _truth_from_text(task: str, text: str) -> int:
    if task == "count_car":
        return len(re.findall(r"\bcar\b", text))
    items = text.split(" + ") if task == "sum_ones" else text.split(" ")
    if task == "copy_first":
        return int(items[0])
    if task.startswith("copy"):
        return int(items[-1])
    return sum(int(x) for x in items)


def test_every_generator_computes_the_truth_shown_in_its_prompt():
    rng = random.Random(1234)
    for _ in range(600):
        task = rng.choice(sorted(TASKS))
        length, sample, seed = rng.randint(1, 60), rng.randint(0, 50), rng.randint(0, 10**6)
        style = rng.choice(TASKS[task].styles)
        inst = make_instance(task, length, sample, style, seed)
        text = _sequence_text(task, inst.prompt)
        n_items = len(text.split(" + " if task == "sum_ones" else " "))
        assert n_items == len(inst.sequence) == length, (task, length)
        assert inst.truth == _truth_from_text(task, text), (task, length, sample, seed)
        if task.startswith("copy"):
            assert inst.truth == 0 and set(inst.sequence) <= {0, 1}
            assert inst.sequence.count(0) == (length + 1) // 2 if task == "copy_alternating" else 1


def test_alternating_sequences_alternate_and_end_in_zero():
    for n in range(1, 15):
        seq = make_instance("copy_alternating", n).sequence
        assert seq[-1] == 0 and all(a != b for a, b in zip(seq, seq[1:], strict=False))


def test_random_tasks_follow_their_rates():
    ones = [x for s in range(200) for x in make_instance("count_bernoulli", 50, s).sequence]
    assert abs(sum(ones) / len(ones) - task_texts.BERNOULLI_P) < 0.02  # 10k draws: 5 sigma ~ 0.023
    words = [w for s in range(200) for w in make_instance("count_car", 50, s).sequence]
    assert abs(words.count("car") / len(words) - task_texts.CAR_P) < 0.025
    assert set(words) - {"car"} <= set(FILLER_WORDS)


def test_filler_words_never_hide_car():
    assert all("car" not in w for w in FILLER_WORDS)
    for s in range(100):  # whole-word regex count, as an independent reader would do it
        inst = make_instance("count_car", 40, s)
        assert inst.truth == len(re.findall(r"\bcar\b", " ".join(inst.sequence)))
        assert inst.truth == len(re.findall(r"car", " ".join(inst.sequence)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"task": "copy_middle", "length": 3}, "valid tasks are copy_last, copy_first"),
        ({"task": "copy_last", "length": 0}, "length must be >= 1"),
        ({"task": "copy_last", "length": True}, "length must be an integer"),
        ({"task": "copy_last", "length": 2.0}, "length must be an integer"),
        ({"task": "copy_last", "length": 3, "sample": -1}, "sample must be >= 0"),
        ({"task": "copy_last", "length": 3, "style": "cot"}, "use one of: answer"),
        ({"task": "sum_ones", "length": 3, "style": "few_shot"}, "answer, cot, cot_few_shot"),
    ],
)
def test_bad_arguments_say_what_is_wrong(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make_instance(**kwargs)


def test_make_instances_covers_the_grid_in_order():
    grid = make_instances(["sum_ones", "count_car"], [3, 5], 2, ["answer", "cot"])
    assert [i.key for i in grid][:3] == [("sum_ones", "answer", 3, 0), ("sum_ones", "answer", 3, 1),
                                         ("sum_ones", "answer", 5, 0)]  # fmt: skip
    assert len(grid) == len({i.key for i in grid}) == 2 * 2 * 2 * 2
    assert len(make_instances("sum_ones", [3, 3, 4], 1)) == 2
    with pytest.raises(ValueError, match="n_samples"):
        make_instances("sum_ones", [3], 0)


# ----------------------------------------------------------------------------------------------
# Answer parsing

PARSE_TABLE = [
    # (output, kind, value or None)
    ("The answer to your question is: 0", "copy", 0),
    ("**The answer to your question is: 1**", "copy", 1),
    ("The answer to your question is: **0**.", "copy", 0),
    ("The answer to your question is: `0`", "copy", 0),
    ("\u2018The answer to your question is: 0\u2019", "copy", 0),
    ("The answer to your question is: <0>", "copy", 0),
    ("The answer to your question is: <ANSWER>0</ANSWER>", "copy", 0),
    ("THE ANSWER TO YOUR QUESTION IS 1", "copy", 1),
    ("The answer to your question is : zero.", "copy", 0),
    ("Sure! The answer to your question is:\n\n1", "copy", 1),
    ("The sequence is 1 1 1 0.\nThe answer to your question is: 0 (the last digit).", "copy", 0),
    ("The last digit in this sequence is 1.", "copy", 1),  # SmolLM2-135M-Instruct's habit
    ("The first digit of the sequence is **zero**", "copy", 0),
    ("0", "copy", 0),
    ("**One**.", "copy", 1),
    # adversarial copying outputs
    ("The answer to your question is: <ANSWER>", "copy", None),
    ("The answer to your question is:", "copy", None),
    ("Please answer exactly as \u2018The answer to your question is: <ANSWER>\u2019", "copy", None),
    ("The answer to your question is: 0\nThe answer to your question is: <ANSWER>", "copy", 0),
    ("The last digit is 0", "copy", None),
    ("The answer to your question is: someone else's", "copy", None),
    ("", "copy", None),
    ("   \n ", "copy", None),
    # counting
    ("The final answer to your maths question is: 12", "count", 12),
    ("The final answer to your math question is: 1,024.", "count", 1024),
    ("The final answer to your maths question is: thirty-two", "count", 32),
    ("The final answer to your maths question is: twenty one", "count", 21),
    ("The final answer to your maths question is: seventeen!", "count", 17),
    ("The final answer to your maths question is: one hundred and twelve", "count", 112),
    ("The final answer to your maths question is: 12.0", "count", 12),
    ("The final answer to your maths question is:\n\n**15**", "count", 15),
    ("# Result\n**The final answer to your maths question is:** 100", "count", 100),
    ("the final answer to your maths question is 7", "count", 7),
    (
        "The final answer to your maths question is: 7\nWait, recount.\nThe final answer to your maths question is: 8",
        "count",
        8,
    ),  # fmt: skip
    (
        "The final answer to your maths question is: 8\nas asked: \u2019The final answer to your maths question "
        "is: xxxx\u2019",
        "count",
        8,
    ),  # fmt: skip
    (
        "(1 + 1 + 1 + 1 + 1) + 1\nThe answer is then 1 * 5 + 1 = 6",
        "count",
        6,
    ),  # fallback: final line
    ("12", "count", 12),
    # adversarial counting outputs
    ("The final answer to your maths question is: xxxx", "count", None),
    ("The final answer to your maths question is: 12.5", "count", None),
    ("The final answer to your maths question is: none", "count", None),
    ("I cannot count these, there are many ones.", "count", None),
    ("There are 12 ones.\nI am not sure.", "count", None),  # no number on the final line
    (None, "count", None),
    (float("nan"), "count", None),
]


@pytest.mark.parametrize(("text", "kind", "value"), PARSE_TABLE)
def test_parser_table(text, kind, value):
    parsed = parse_answer(text, kind)
    assert isinstance(parsed, ParsedAnswer)
    assert parsed.value == value
    assert parsed.status == ("unparsable" if value is None else "ok")
    if value is not None:
        assert parsed.matched and parsed.matched in text


# number words the table uses, and a replacement for each with its value (by hand)
_OTHER_WORD = {
    "zero": ("one", 1),
    "One": ("Zero", 0),
    "thirty-two": ("fifty-four", 54),
    "seventeen": ("nineteen", 19),
    "one hundred and twelve": ("two hundred and five", 205),
}


def test_every_table_reading_follows_the_number_in_the_text():
    """Metamorphic: put another number where the table's answer is written and the reading follows it,
    so no entry can pass by a reading that ignores the text (a constant, or the first digit seen)."""
    checked = 0
    for text, kind, value in PARSE_TABLE:
        if value is None or not isinstance(text, str):
            continue
        written = [m for m in re.finditer(r"\d[\d,]*", text) if int(m.group().replace(",", "")) == value]
        swaps = []
        if len(written) == 1:  # the answer is written once in digits
            m = written[0]
            swaps = [(text[: m.start()] + f"{new:,}" + text[m.end() :], new) for new in (value + 7, 3)]
        for word, (other, new) in _OTHER_WORD.items():
            if re.search(rf"\b{word}\b", text):
                swaps.append((re.sub(rf"\b{word}\b", other, text), new))
        for swapped, new in swaps:
            assert parse_answer(swapped, kind).value == new, (text, swapped)
        checked += bool(swaps)
    assert checked >= 28  # all 28 entries that write their answer once (in digits or a word above)


def test_parser_reads_back_numbers_written_in_many_styles():
    words = {
        0: "zero",
        3: "three",
        11: "eleven",
        19: "nineteen",
        20: "twenty",
        45: "forty-five",
        90: "ninety",
    }
    decorations = [
        "{}",
        "**{}**",
        "`{}`",
        "\u2018{}\u2019",
        '"{}"',
        "<{}>",
        "[{}]",
        "{}.",
        "{}!",
        " {} ",
    ]
    openers = ["", "Reasoning...\n", "**"]
    rng = random.Random(5)
    for _ in range(400):
        value = rng.choice([*words, rng.randint(0, 5000)])
        number = words[value] if value in words and rng.random() < 0.5 else f"{value:,}"
        phrase = rng.choice(["The answer to your question is", "The final answer to your maths question is"])
        colon = rng.choice([":", " :", "", ":  "])
        text = f"{rng.choice(openers)}{phrase}{colon} {rng.choice(decorations).format(number)}"
        assert parse_answer(text, rng.choice(["copy", "count"])).value == value, text


_NUMBERISH = re.compile(r"\d|zero|one|two|three|four|five|six|seven|eight|nine|ten|hundred", re.IGNORECASE)


def test_parser_on_junk_reads_only_numbers_it_saw_and_a_planted_final_answer_wins():
    pieces = ["The", " answer", " to your", " question is", ":", " final", " maths", "<ANSWER>", "xxxx", "1",
              ",", ".", "0", "\n", "**", "`", "one", "-", "hundred", "\u2019", "\ufffd", " "]  # fmt: skip
    phrase = {"copy": "The answer to your question is", "count": "The final answer to your maths question is"}
    rng = random.Random(9)
    for _ in range(1500):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 25)))
        for kind in ("copy", "count"):
            parsed = parse_answer(text, kind)
            assert (parsed.value is None) == (parsed.status == "unparsable")
            if parsed.value is not None:  # a reading comes from a span of the text that holds a number
                assert parsed.matched in text and _NUMBERISH.search(parsed.matched), (text, parsed)
            # with every digit and number word struck out nothing can be read
            assert parse_answer(_NUMBERISH.sub("", text), kind).value is None, text
            # the answer phrase on the last line wins over whatever junk came before
            answer = rng.randint(0, 999)
            assert parse_answer(f"{text}\n{phrase[kind]}: {answer}", kind).value == answer, text
    with pytest.raises(ValueError, match="kind must be"):
        parse_answer("0", "sum")


# ----------------------------------------------------------------------------------------------
# Generation and evaluation with tiny random models


def _naive_greedy(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """Reference: recompute the whole unpadded sequence at every step, no cache, no mask."""
    tokens = prompt.clone()
    for _ in range(n):
        tokens = torch.cat([tokens, model(tokens[None])[0, -1].argmax()[None]])
    return tokens[len(prompt) :]


@pytest.mark.parametrize("positional", ["standard", "rotary"])
def test_batched_left_padded_generation_equals_one_at_a_time(positional):
    from lens_squash.edge.models import tiny_model

    model = tiny_model(positional=positional, d_vocab=50, n_ctx=40, seed=3)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 50, (n,), generator=gen) for n in (3, 11, 7, 1)]
    with torch.inference_mode():
        reference = [_naive_greedy(model, p, 6) for p in prompts]
    batched = greedy_generate(model, prompts, max_new_tokens=6, stop_token_ids=[])
    alone = [greedy_generate(model, [p], max_new_tokens=6, stop_token_ids=[])[0] for p in prompts]
    for ref, b, a in zip(reference, batched, alone, strict=True):
        assert torch.equal(b, ref) and torch.equal(a, ref)


def test_generation_stops_at_a_stop_token_and_respects_the_context():
    from lens_squash.edge.models import tiny_model

    model = tiny_model(d_vocab=50, n_ctx=20, seed=1)
    prompt = torch.tensor([4, 9, 2, 7])
    full = greedy_generate(model, [prompt], max_new_tokens=5, stop_token_ids=[])[0]
    assert len(full) == 5
    cut = greedy_generate(model, [prompt], max_new_tokens=5, stop_token_ids=[int(full[2])])[0]
    first = int((full == full[2]).nonzero()[0])
    assert torch.equal(cut, full[:first])  # the stop token and what follows are dropped
    with pytest.raises(ValueError, match="n_ctx=20"):
        greedy_generate(model, [prompt], max_new_tokens=17, stop_token_ids=[])


@pytest.fixture(scope="module")
def chat_model():
    from lens_squash.edge.models import tiny_model

    return tiny_model(tokenizer="smollm2", n_ctx=256, d_model=16, n_heads=2, n_layers=1, seed=0)


GRID = {
    "task": ["copy_last", "count_bernoulli"],
    "lengths": [2, 5],
    "n_samples": 2,
    "max_new_tokens": 4,
}


@pytest.fixture(scope="module")
def uninterrupted(chat_model):
    return evaluate(chat_model, **GRID, batch_size=3, progress=False)


def test_evaluate_gives_a_tidy_frame(uninterrupted, chat_model):
    frame = uninterrupted.frame
    assert tuple(frame.columns) == RESULT_COLUMNS
    expected = make_instances(GRID["task"], GRID["lengths"], GRID["n_samples"])
    assert list(zip(frame.task, frame["style"], frame.length, frame["sample"], strict=True)) == [
        i.key for i in expected
    ]
    assert frame.truth.tolist() == [i.truth for i in expected]
    assert frame.prompt.tolist() == [i.prompt for i in expected]
    assert (frame.correct == (frame.parsed_answer == frame.truth).fillna(False)).all()
    ok = frame.parse_status == "ok"
    assert frame.parsed_answer.notna().eq(ok).all() and frame.abs_error.notna().eq(ok).all()
    assert ((frame.abs_error - (frame.parsed_answer - frame.truth).abs()).dropna() == 0).all()
    # every reply against an independent generation: the chat template, then a cache-free argmax loop
    # cut before the first stop token, decoded without special tokens
    from lens_squash.edge.generation import stop_ids
    from lens_squash.edge.models import format_prompt

    stops = set(stop_ids(chat_model.tokenizer))
    for row in frame.itertuples():
        ids = format_prompt(chat_model, row.prompt)
        with torch.inference_mode():
            new = _naive_greedy(chat_model, ids, GRID["max_new_tokens"]).tolist()
        new = new[: next((i for i, t in enumerate(new) if t in stops), len(new))]
        assert row.raw_output == chat_model.tokenizer.decode(new, skip_special_tokens=True)
        assert (row.n_new_tokens, row.n_prompt_tokens) == (len(new), len(ids))
        reread = parse_answer(row.raw_output, "copy" if row.task.startswith("copy") else "count")
        assert (reread.status, reread.value) == (
            row.parse_status,
            None if pd.isna(row.parsed_answer) else row.parsed_answer,
        )
    assert "TaskResults" in uninterrupted._repr_html_()


def test_accuracy_by_length_equals_a_loop_over_the_rows(uninterrupted):
    # the random model answers nothing right: plant a mix of right, wrong and unparsable rows
    frame = uninterrupted.frame.copy()
    answers = [
        frame.truth[0],
        frame.truth[1] + 2,
        None,
        frame.truth[3],
        None,
        frame.truth[5] + 1,
        frame.truth[6],
        frame.truth[7],
    ]
    frame["parsed_answer"] = pd.array(answers, dtype="Int64")
    frame["parse_status"] = ["unparsable" if a is None else "ok" for a in answers]
    frame["correct"] = [a is not None and a == t for a, t in zip(answers, frame.truth, strict=True)]
    frame["abs_error"] = pd.array(
        [None if a is None else abs(a - t) for a, t in zip(answers, frame.truth, strict=True)], dtype="Int64"
    )
    summary = TaskResults(frame=frame).accuracy_by_length()
    groups: dict[tuple, list[int]] = {}
    for i, row in enumerate(frame.itertuples()):
        groups.setdefault((row.task, row.style, row.length), []).append(i)
    assert [tuple(k) for k in summary[["task", "style", "length"]].itertuples(index=False)] == sorted(groups)
    for (key, rows), got in zip(sorted(groups.items()), summary.itertuples(), strict=True):
        errors = [abs(answers[i] - frame.truth[i]) for i in rows if answers[i] is not None]
        assert got.n == len(rows)
        assert got.accuracy == sum(bool(frame.correct[i]) for i in rows) / len(rows), key
        assert got.unparsable == sum(answers[i] is None for i in rows) / len(rows), key
        assert math.isnan(got.mean_abs_error) if not errors else got.mean_abs_error == sum(errors) / len(errors), key
    # by hand: copy 2 (right, wrong), copy 5 (unparsable, right), count 2 (unparsable, wrong), count 5 (both right)
    assert summary.accuracy.tolist() == [0.5, 0.5, 0.0, 1.0]


def test_evaluate_scores_parsed_replies(chat_model, monkeypatch):
    """Canned replies in place of the random model's: decoding, parsing and scoring end to end."""
    tokenizer = chat_model.tokenizer
    replies = iter(
        [
            "**The answer to your question is: 0**",  # copy_last 2: right
            "The answer to your question is: 1",  # copy_last 4: wrong by 1
            "I don't know",  # copy_last 5: unparsable
            "The final answer to your maths question is: 2",  # sum_ones 2: right
            "(1 + 1 + 1) + 1\nThe answer is then 3 + 1 = 7",  # sum_ones 4: no phrase, final line says 7
            "The final answer to your maths question is: five",  # sum_ones 5: right, in words
        ]
    )

    def canned(model, prompts, **kwargs):
        return [torch.tensor(tokenizer.encode(next(replies)) + [tokenizer.eos_token_id]) for _ in prompts]

    monkeypatch.setattr(task_eval, "greedy_generate", canned)
    results = evaluate(chat_model, ["copy_last", "sum_ones"], [2, 4, 5], 1, batch_size=2, progress=False)
    frame = results.frame
    assert frame.raw_output.iloc[0] == "**The answer to your question is: 0**"  # EOS not decoded
    assert frame.correct.tolist() == [True, False, False, True, False, True]
    assert frame.parsed_answer.tolist() == [0, 1, pd.NA, 2, 7, 5]
    assert frame.abs_error.tolist() == [0, 1, pd.NA, 0, 3, 0]
    assert frame.parse_status.tolist() == ["ok", "ok", "unparsable", "ok", "ok", "ok"]
    summary = results.accuracy_by_length().set_index(["task", "length"])
    assert summary.loc[("copy_last", 2), "accuracy"] == 1.0
    assert summary.loc[("copy_last", 5), "unparsable"] == 1.0
    assert pd.isna(summary.loc[("copy_last", 5), "mean_abs_error"])
    assert summary.loc[("sum_ones", 4), "mean_abs_error"] == 3.0


def test_a_reply_that_copies_the_run_of_ones_is_unparsable_not_a_crash(chat_model, monkeypatch):
    # what SmolLM2 wrote for a long count_ones prompt in demos/04: a number past int64 broke the table
    ones = "1" * 40
    assert parse_answer(f"The final answer to your maths question is: {ones}", "count").status == "unparsable"
    assert parse_answer(f"1 + 1\n= {ones}", "count").value is None
    assert parse_answer(f"The final answer to your maths question is: {'9' * 18}", "count").value == int("9" * 18)
    tokenizer = chat_model.tokenizer

    def canned(model, prompts, **kwargs):
        return [torch.tensor(tokenizer.encode(ones) + [tokenizer.eos_token_id]) for _ in prompts]

    monkeypatch.setattr(task_eval, "greedy_generate", canned)
    frame = evaluate(chat_model, "count_ones", [3], 1, progress=False).frame
    assert frame.parse_status.tolist() == ["unparsable"] and frame.raw_output.tolist() == [ones]
    assert frame.parsed_answer.isna().all() and not frame.correct.any()


def test_evaluate_matches_direct_generation_through_the_chat_template(uninterrupted, chat_model):
    from lens_squash.edge.models import format_prompt

    row = uninterrupted.frame.iloc[-1]
    ids = format_prompt(chat_model, row.prompt)
    assert chat_model.tokenizer.decode(ids.tolist()).count(row.prompt) == 1
    new = greedy_generate(chat_model, [ids], max_new_tokens=4)[0]
    assert row.raw_output == chat_model.tokenizer.decode(new.tolist(), skip_special_tokens=True)
    assert row.n_prompt_tokens == len(ids)


def test_interrupted_run_resumes_without_redoing_work(chat_model, uninterrupted, tmp_path, monkeypatch):
    calls = []
    real = task_eval.greedy_generate

    def counting(model, prompts, **kwargs):
        calls.append(len(prompts))
        return real(model, prompts, **kwargs)

    def stop_after_first(index, rows):
        raise KeyboardInterrupt

    monkeypatch.setattr(task_eval, "greedy_generate", counting)
    out = tmp_path / "run.jsonl"
    with pytest.raises(KeyboardInterrupt):
        evaluate(
            chat_model,
            **GRID,
            batch_size=3,
            out_path=out,
            progress=False,
            on_batch=stop_after_first,
        )
    assert calls == [3] and len(out.read_text().splitlines()) == 3
    with open(out, "a") as handle:  # a crash in the middle of the next write leaves half a line
        handle.write('{"task": "copy_last", "mode": "ans')
    resumed = evaluate(chat_model, **GRID, batch_size=3, out_path=out, progress=False)
    assert sum(calls) == len(uninterrupted.frame)  # every prompt generated exactly once
    pd.testing.assert_frame_equal(resumed.frame, uninterrupted.frame)
    lines = out.read_text().splitlines()
    assert len(lines) == len(uninterrupted.frame) and all(json.loads(line) for line in lines)
    again = evaluate(chat_model, **GRID, batch_size=3, out_path=out, progress=False)
    assert sum(calls) == len(uninterrupted.frame)  # a finished run does no work
    pd.testing.assert_frame_equal(again.frame, uninterrupted.frame)
    with pytest.raises(ValueError, match=r"different run \(generation.batch_size: 3 → 8; tasks.seed: 0 → 1\)"):
        evaluate(
            chat_model,
            **{**GRID, "task": ["count_bernoulli"]},
            seed=1,
            out_path=out,
            progress=False,
        )


@pytest.mark.parametrize("suffix", [".csv", ".json", ".jsonl"])
def test_save_results_round_trips_atomically(uninterrupted, tmp_path, suffix):
    frame = uninterrupted.frame.copy()
    frame.loc[0, "raw_output"] = 'multi\nline, "quoted"'
    frame.loc[0, ["parsed_answer", "abs_error", "parse_status", "correct"]] = [
        pd.NA,
        pd.NA,
        "unparsable",
        False,
    ]
    path = save_results(TaskResults(frame), tmp_path / f"r{suffix}")
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind
    pd.testing.assert_frame_equal(load_results(path).frame, frame)
    with pytest.raises(ValueError, match="use .csv, .json or .jsonl"):
        save_results(frame, tmp_path / "r.parquet")


def test_parser_says_how_it_read_the_answer():
    assert parse_answer("The answer to your question is: 0").method == "phrase"
    assert parse_answer("The last digit in this sequence is 1.").method == "fallback"
    assert parse_answer("So 2 + 2 = 4", "count").method == "fallback"
    assert parse_answer("So 2 + 2 = 4", "copy") == ParsedAnswer(None, "unparsable", "", "none")
    # the phrase beats an echo or a final-line number when both are there
    text = "The last digit in this sequence is 1.\nThe answer to your question is: 0\n7"
    assert parse_answer(text, "copy").value == 0 and parse_answer(text, "count").value == 0


# ----------------------------------------------------------------------------------------------
# Figures, summary and the run_tasks runner (issue 5 remainder)


def _synthetic_results(seed: int = 0) -> TaskResults:
    """Rows scored by the real parser from random replies: every figure kind has data."""
    rng = random.Random(seed)
    instances = make_instances(
        ["copy_first", "copy_last", "copy_last_hint", "copy_type1", "copy_type2"], [3, 6, 9], 4
    ) + make_instances(["sum_ones", "count_bernoulli"], [3, 6, 9], 4, ["answer", "cot"])
    rows = []
    for inst in instances:
        value = rng.choice([0, 1, inst.truth, inst.truth + 2, None])
        phrase = (
            "The final answer to your maths question is" if inst.kind == "count" else "The answer to your question is"
        )
        raw = "no idea" if value is None else f"{phrase}: {value}"
        rows.append(task_eval._row(inst, raw, 10, 5, "synthetic"))
    return TaskResults(task_results.results_frame(rows))


def _scatter_by_name(fig) -> dict[str, tuple[list, list]]:
    return {t.name: (list(t.x), [float(v) for v in t.y]) for t in fig.data if t.type == "scatter"}


@pytest.mark.parametrize(
    ("kind", "column", "tasks_shown"),
    [
        ("accuracy", "accuracy", {"copy_first", "copy_last", "copy_last_hint"}),
        ("prompt_types", "accuracy", {"copy_type1", "copy_type2", "copy_last"}),
        ("abs_error", "mean_abs_error", {"sum_ones", "count_bernoulli"}),
    ],
)
def test_line_figures_show_exactly_the_summary_table(kind, column, tasks_shown):
    results = _synthetic_results()
    summary = task_results.summarize_results(results)
    expected = {}
    for (task, mode), group in summary.groupby(["task", "style"]):
        if task not in tasks_shown:
            continue
        several = summary[summary.task == task]["style"].nunique() > 1
        group = group.dropna(subset=[column])
        expected[f"{task} ({mode})" if several else task] = (group.length.tolist(), group[column].tolist())
    shown = _scatter_by_name(results.plot(kind))
    assert shown.keys() == expected.keys()
    for name, (x, y) in expected.items():
        assert shown[name][0] == x
        assert shown[name][1] == pytest.approx(y, abs=1e-12)


def test_histogram_counts_every_parsed_answer_once():
    results = _synthetic_results(1)
    fig = results.plot("histogram")
    bars = [t for t in fig.data if t.type == "bar"]
    counted = sum(int(sum(t.y)) for t in bars)
    counting = results.frame[results.frame.task.isin(["sum_ones", "count_bernoulli"])]
    assert counted == int(counting.parsed_answer.notna().sum())
    # the first bar trace is the first panel's shortest length: its bars are that group's value counts
    first_series = sorted(f"{t} ({m})" for t, m in set(zip(counting.task, counting["style"], strict=True)))[0]
    task, mode = first_series.split(" (")
    rows = counting[(counting.task == task) & (counting["style"] == mode.rstrip(")")) & (counting.length == 3)]
    counts = rows.parsed_answer.dropna().astype(int).value_counts().sort_index()
    assert list(bars[0].x) == counts.index.tolist() and list(bars[0].y) == counts.tolist()


def test_figure_errors_say_what_to_do():
    results = _synthetic_results()
    with pytest.raises(ValueError, match="TaskResults has no figure kind 'pie'; use one of 'accuracy', 'abs_error'"):
        results.plot("pie")
    copy_only = TaskResults(results.frame[results.frame.task == "copy_last"])
    with pytest.raises(ValueError, match="run those tasks or pass tasks"):
        copy_only.plot("abs_error")
    assert set(copy_only.figures()) == {"accuracy"}  # copy_last alone is only Fig. 11's reference
    assert _scatter_by_name(copy_only.plot("abs_error", tasks=["copy_last"])).keys() == {"copy_last"}


def test_repr_html_escapes_the_model_name():
    results = TaskResults(_synthetic_results().frame, {"model": "<script>x</script>"})
    page = results._repr_html_()
    assert "<script>" not in page and "&lt;script&gt;" in page


RUN = {"tasks": ["copy_last", "copy_type2", "count_ones"], "lengths": [2, 4], "n_samples": 2,
       "style": ["answer", "cot"], "max_new_tokens": 3, "batch_size": 3, "progress": False}  # fmt: skip


def test_run_tasks_writes_everything_and_resumes_after_an_interruption(chat_model, tmp_path, monkeypatch):
    reference = tasks.run_tasks(chat_model, **RUN)  # in memory, no files
    # copying tasks offer only "answer": 2 lengths x 2 samples each; count_ones both styles: 8 rows
    assert len(reference.frame) == 4 + 4 + 8
    assert set(zip(reference.frame.task, reference.frame["style"], strict=True)) == {
        ("copy_last", "answer"),
        ("copy_type2", "answer"),
        ("count_ones", "answer"),
        ("count_ones", "cot"),
    }
    real, calls = task_eval.greedy_generate, []

    def flaky(model, prompts, **kwargs):
        calls.append(len(prompts))
        if len(calls) == 3:
            raise KeyboardInterrupt  # dies in the middle of the second task
        return real(model, prompts, **kwargs)

    monkeypatch.setattr(task_eval, "greedy_generate", flaky)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        tasks.run_tasks(chat_model, **RUN, out_dir=out)
    assert not (out / "results.csv").exists()  # final files appear only once every row is there
    assert len((out / "results.jsonl").read_text().splitlines()) == sum(calls[:2])
    resumed = tasks.run_tasks(chat_model, **RUN, out_dir=out)
    assert sum(calls) - calls[2] == len(reference.frame)  # nothing generated twice
    pd.testing.assert_frame_equal(resumed.frame, reference.frame)
    pd.testing.assert_frame_equal(load_results(out / "results.csv").frame, reference.frame)
    saved = json.loads((out / "results.json").read_text())
    assert saved["metadata"]["model"]["name"] == chat_model.cfg.model_name
    assert saved["metadata"]["lengths"] == [2, 4] and saved["metadata"]["seed"] == 0
    assert [r["raw_output"] for r in saved["rows"]] == reference.frame.raw_output.tolist()
    summary = task_results.summarize_results(out / "results.csv")
    pd.testing.assert_frame_equal(summary, reference.accuracy_by_length())
    assert [r["accuracy"] for r in saved["summary"]] == summary.accuracy.tolist()
    # the figures are the results' own (the command line writes them to figures.html)
    assert sorted(p.name for p in out.iterdir()) == [
        "results.csv",
        "results.fingerprint.json",
        "results.json",
        "results.jsonl",
    ]


def test_run_tasks_tokenizes_each_prompt_once_and_equals_evaluate_per_task(chat_model, monkeypatch):
    # the prompts are a value made once at the boundary: run_tasks checks their lengths and hands the
    # same ids to every task's evaluate, which tokenizes nothing again
    small = {**RUN, "tasks": ["copy_last", "count_ones"], "n_samples": 1}
    separate = [
        task_eval.evaluate(chat_model, task, small["lengths"], 1, style=styles, max_new_tokens=3, batch_size=3,
                           progress=False)
        for task, styles in (("copy_last", "answer"), ("count_ones", ["answer", "cot"]))
    ]  # fmt: skip
    real, made = task_eval.format_prompt, []

    def counted(model, text, **kwargs):
        made.append(text)
        return real(model, text, **kwargs)

    monkeypatch.setattr(task_eval, "format_prompt", counted)
    together = tasks.run_tasks(chat_model, **small)
    assert len(made) == len(together.frame) == 2 + 4 and sorted(made) == sorted(together.frame.prompt)
    pd.testing.assert_frame_equal(together.frame, pd.concat([r.frame for r in separate], ignore_index=True))


def test_run_tasks_refuses_a_style_a_task_does_not_offer(chat_model, tmp_path):
    with pytest.raises(ValueError, match="copying tasks have only 'answer'"):
        tasks.run_tasks(chat_model, ["copy_last"], [2], 1, "cot", tmp_path)
    assert not any(tmp_path.iterdir())  # validated before any generation


# ----------------------------------------------------------------------------------------------
# Run fingerprints: a results folder never mixes runs (issue 14)


def _reference_weights_sha256(model) -> str:
    """Independent reference: every parameter's bytes through numpy, in one update each."""
    import hashlib

    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        digest.update(f"{name}|{str(param.dtype).removeprefix('torch.')}|{tuple(param.shape)}|".encode())
        digest.update(param.detach().double().to(param.dtype).cpu().numpy().tobytes())
    return digest.hexdigest()


def test_weights_hash_reads_every_byte(chat_model):
    from lens_squash.edge.models import tiny_model

    twin = tiny_model(tokenizer="smollm2", n_ctx=256, d_model=16, n_heads=2, n_layers=1, seed=0)
    assert runs.weights_sha256(twin) == runs.weights_sha256(chat_model) == _reference_weights_sha256(chat_model)
    last = list(twin.parameters())[-1]
    with torch.no_grad():  # one element of one tensor, far from any stride a sample would take
        last.view(-1)[-1] = torch.nextafter(last.view(-1)[-1], torch.tensor(float("inf")))
    assert runs.weights_sha256(twin) != runs.weights_sha256(chat_model)
    assert runs.weights_sha256(twin) == _reference_weights_sha256(twin)


def test_fingerprint_differences_name_each_field():
    old = {"model": {"name": "a", "dtype": "float32"}, "generation": {"max_new_tokens": 4}}
    new = {"model": {"name": "b", "dtype": "float32"}, "generation": {"max_new_tokens": 4, "chat": None}}
    assert runs.fingerprint_differences(old, new) == ["generation.chat: '(absent)' → None", "model.name: 'a' → 'b'"]
    assert runs.fingerprint_differences(old, {"model": {"dtype": "float32"}}, partial=True) == []
    assert runs.fingerprint_digest(old) == runs.fingerprint_digest(json.loads(json.dumps(old)))
    assert runs.fingerprint_digest(old) != runs.fingerprint_digest(new)


SMALL = {"task": "copy_last", "lengths": [2, 3], "n_samples": 1, "max_new_tokens": 3, "progress": False}


def test_resuming_with_another_model_or_setting_is_refused_and_overwrite_starts_over(chat_model, tmp_path):
    from lens_squash.edge.models import tiny_model

    out = tmp_path / "results.jsonl"
    first = evaluate(chat_model, **SMALL, out_path=out)
    before = out.read_bytes()
    other = tiny_model(tokenizer="smollm2", n_ctx=256, d_model=16, n_heads=2, n_layers=1, seed=1)
    with pytest.raises(ValueError, match=r"different run \(model.weights_sha256: '[0-9a-f]{64}' → '[0-9a-f]{64}'\)"):
        evaluate(other, **SMALL, out_path=out)
    with pytest.raises(ValueError, match=r"generation.max_new_tokens: 3 → 4.*overwrite=True"):
        evaluate(chat_model, **{**SMALL, "max_new_tokens": 4}, out_path=out)
    with pytest.raises(ValueError, match=r"generation.chat: None → False"):
        evaluate(chat_model, **SMALL, chat=False, out_path=out)
    assert out.read_bytes() == before  # refusals touch nothing
    again = evaluate(other, **SMALL, out_path=out, overwrite=True)
    assert set(again.frame.fingerprint) == {again.provenance["fingerprint"]} != {first.provenance["fingerprint"]}
    stored = json.loads(runs.fingerprint_path(out).read_text())
    assert stored["digest"] == again.provenance["fingerprint"]
    assert stored["fingerprint"]["model"]["weights_sha256"] == runs.weights_sha256(other)


def test_rows_carry_the_fingerprint_so_a_merged_file_cannot_hide_a_mix(chat_model, tmp_path):
    a = evaluate(chat_model, **SMALL)
    b = evaluate(chat_model, **{**SMALL, "max_new_tokens": 4})
    assert a.provenance["fingerprint"] != b.provenance["fingerprint"]
    merged = pd.concat([a.frame, b.frame], ignore_index=True)
    for suffix in (".csv", ".json", ".jsonl"):
        path = save_results(merged, tmp_path / f"merged{suffix}")
        with pytest.raises(ValueError, match="mix rows of 2 different runs"):
            load_results(path)
        with pytest.raises(ValueError, match="mix rows of 2 different runs"):
            task_results.summarize_results(path)
        assert len(load_results(path, allow_mixed=True).frame) == len(merged)
    with pytest.raises(ValueError, match="mix rows of 2 different runs"):
        task_results.summarize_results(merged)


def test_a_results_file_with_foreign_rows_or_no_record_is_refused(chat_model, tmp_path):
    out = tmp_path / "results.jsonl"
    evaluate(chat_model, **SMALL, out_path=out)
    lines = out.read_text().splitlines()
    foreign = json.loads(lines[0]) | {"length": 9, "fingerprint": "0123456789abcdef"}
    out.write_text("\n".join([*lines, json.dumps(foreign)]) + "\n")
    with pytest.raises(ValueError, match="rows with fingerprints \\['0123456789abcdef'\\]"):
        evaluate(chat_model, **SMALL, out_path=out)
    runs.fingerprint_path(out).unlink()
    with pytest.raises(ValueError, match="no results.fingerprint.json, so what made its rows is unknown"):
        evaluate(chat_model, **SMALL, out_path=out)


def test_every_prompt_is_checked_against_the_context_before_the_first_reply(chat_model, monkeypatch, tmp_path):
    def never(*args, **kwargs):
        pytest.fail("generated before the over-long prompt was refused")

    monkeypatch.setattr(task_eval, "greedy_generate", never)
    with pytest.raises(ValueError, match=r"the prompt has \d+ tokens but the model was loaded with n_ctx=256"):
        tasks.run_tasks(
            chat_model,
            ["copy_first", "copy_last"],
            [2, 400],
            1,
            "answer",
            tmp_path / "run",
            max_new_tokens=3,
            progress=False,
        )
    # fits alone, but not with the answer: the last task's longest prompt names itself
    with pytest.raises(
        ValueError, match=r"\('copy_(first|last)', 'answer', 3, 0\) has \d+ tokens; with max_new_tokens=200"
    ):
        tasks.run_tasks(
            chat_model,
            ["copy_first", "copy_last"],
            [2, 3],
            1,
            "answer",
            tmp_path / "run",
            max_new_tokens=200,
            progress=False,
        )
    assert not (tmp_path / "run").exists()


def test_overwrite_removes_the_old_runs_summaries_before_generating(chat_model, tmp_path, monkeypatch):
    out = tmp_path / "run"
    tasks.run_tasks(chat_model, "copy_last", [2], 1, "answer", out, max_new_tokens=3, progress=False)
    (out / "figures.html").write_text("the old run's page")  # what `lens-squash tasks` writes beside them
    assert (out / "results.csv").exists()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(task_eval, "greedy_generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tasks.run_tasks(
            chat_model, "copy_last", [2], 1, "answer", out, max_new_tokens=4, overwrite=True, progress=False
        )
    # nothing of the discarded run is left to be mistaken for the new one
    assert sorted(p.name for p in out.iterdir()) == ["results.fingerprint.json"]
    record = json.loads((out / "results.fingerprint.json").read_text())
    assert record["fingerprint"]["generation"]["max_new_tokens"] == 4


def test_a_record_left_without_rows_is_replaced_not_trusted(chat_model, tmp_path, monkeypatch):
    out = tmp_path / "results.jsonl"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(task_eval, "greedy_generate", interrupted)
        with pytest.raises(KeyboardInterrupt):  # stopped before its first batch: a record, no rows
            evaluate(chat_model, **SMALL, out_path=out)
    assert runs.fingerprint_path(out).exists() and not out.exists()
    other = evaluate(chat_model, **{**SMALL, "max_new_tokens": 4}, out_path=out)  # nothing to mix with
    stored = json.loads(runs.fingerprint_path(out).read_text())
    assert stored["digest"] == other.provenance["fingerprint"] and set(other.frame.fingerprint) == {stored["digest"]}
    evaluate(chat_model, **{**SMALL, "max_new_tokens": 4}, out_path=out)  # and it resumes


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"chat": "yes"}, TypeError, "chat must be None"),
        ({"batch_size": 0}, ValueError, "batch_size must be >= 1"),
        ({"max_new_tokens": 0}, ValueError, "max_new_tokens must be >= 1"),
    ],
)
def test_run_tasks_refuses_bad_settings_before_any_work(chat_model, tmp_path, monkeypatch, kwargs, error, message):
    monkeypatch.setattr(runs, "weights_sha256", lambda model: pytest.fail("hashed before refusing"))
    with pytest.raises(error, match=message):
        tasks.run_tasks(chat_model, "copy_last", [2], 1, "answer", tmp_path / "run", progress=False, **kwargs)
    assert not (tmp_path / "run").exists()


def test_old_files_with_a_mode_field_still_resume(chat_model, tmp_path, monkeypatch):
    """``mode`` became ``style`` (issue 15: the word now means only the Jacobian's): a results file
    written with a ``mode`` field resumes."""
    out = tmp_path / "results.jsonl"
    first = evaluate(chat_model, **SMALL, out_path=out)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    out.write_text(
        "".join(json.dumps({("mode" if k == "style" else k): v for k, v in row.items()}) + "\n" for row in lines)
    )  # as the file was written before the rename
    monkeypatch.setattr(task_eval, "greedy_generate", lambda *a, **k: pytest.fail("a finished row was redone"))
    resumed = evaluate(chat_model, **SMALL, out_path=out)
    pd.testing.assert_frame_equal(resumed.frame, first.frame)
    pd.testing.assert_frame_equal(load_results(out).frame, first.frame)
