"""The shipped prompt suite: size, token lengths, kinds, and verbatim task prompts."""

from __future__ import annotations

import re

import pytest

from lens_squash.edge.models import format_prompt, tiny_model
from lens_squash.experiments.suite import KINDS, load_suite
from lens_squash.experiments.task_prompts import make_instance


@pytest.fixture(scope="module")
def tokenizer_model():
    return tiny_model(tokenizer="smollm2", n_ctx=512)


def test_suite_has_thirty_prompts_of_twenty_to_two_hundred_tokens(tokenizer_model):
    suite = load_suite()
    assert len(suite) >= 30 and len({p.name for p in suite}) == len(suite)
    assert {p.kind for p in suite} == set(KINDS)
    assert any(p.chat for p in suite) and any(not p.chat for p in suite)
    for prompt in suite:
        n = len(format_prompt(tokenizer_model, prompt.text, chat=prompt.chat))
        assert 20 <= n <= 200, (prompt.name, n)


def test_task_prompts_are_the_papers_verbatim_text():
    """Every copying/counting prompt is exactly what tasks.make_instance generates (Appendix C.1)."""
    pattern = re.compile(r"^(?P<task>[a-z_]+?)(?:_raw)?_(?P<n>\d+)$")
    checked = 0
    for prompt in load_suite(kinds=("copying", "counting")):
        match = pattern.match(prompt.name)
        task, n = match["task"], int(match["n"])
        texts = {make_instance(task, n, seed=s).prompt for s in range(3)}
        assert prompt.text in texts, prompt.name
        checked += 1
    assert checked >= 10


def test_filters_and_errors():
    assert all(p.kind == "code" for p in load_suite(kinds=["code"]))
    assert [p.name for p in load_suite(names=["prose_tide"])] == ["prose_tide"]
    assert len(load_suite(limit=2)) == 2
    with pytest.raises(ValueError, match="unknown prompt kinds"):
        load_suite(kinds=["poetry"])
    with pytest.raises(ValueError, match="no suite prompts named"):
        load_suite(names=["nope"])
