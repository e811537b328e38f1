"""A prompt becomes a Tokens value once: its ids against the tokenizer's own chat template and
TransformerLens's tokenizer, its strings against per-id decoding, and a value made once is what the
gradient methods then take, with the same numbers as the text."""

from __future__ import annotations

import pytest
import torch

from lens_squash.edge.jacobian import jacobian
from lens_squash.edge.models import load_model, tiny_model
from lens_squash.edge.prompts import as_tokens, tokenize

TEXT = "The cat sat on the mat."


@pytest.fixture(scope="module")
def tiny_random():
    return load_model("tiny-random")


def _decoded(model, ids) -> tuple[str, ...]:
    return tuple(model.tokenizer.decode([int(i)], clean_up_tokenization_spaces=False) for i in ids)


def test_text_in_the_chat_template_by_default(tiny_random):
    tokens = tokenize(tiny_random, TEXT)
    expected = tiny_random.tokenizer.apply_chat_template(
        [{"role": "user", "content": TEXT}], add_generation_prompt=True, tokenize=False
    )
    ids = tiny_random.tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert tokens.ids.tolist() == ids
    assert tokens.chat is True and tokens.text == TEXT
    assert tokens.str_tokens == _decoded(tiny_random, tokens.ids)
    assert len(tokens) == len(ids) and tokens.ids.dtype == torch.long


def test_raw_text_and_ids(tiny_random):
    raw = tokenize(tiny_random, TEXT, chat=False)
    assert raw.ids.tolist() == tiny_random.to_tokens(TEXT, truncate=False)[0].tolist()
    assert raw.chat is False and raw.text == TEXT
    given = tokenize(tiny_random, raw.ids[None])  # [1, pos] is squeezed
    assert given.ids.tolist() == raw.ids.tolist() and given.str_tokens == raw.str_tokens
    assert given.chat is None and given.text is None  # nobody here knows how ids were made
    assert as_tokens(tiny_random, TEXT).tolist() == tokenize(tiny_random, TEXT).ids.tolist()


def test_a_tokens_value_passes_through_unchanged_and_is_checked(tiny_random):
    tokens = tokenize(tiny_random, TEXT)
    assert tokenize(tiny_random, tokens) is tokens
    assert tokenize(tiny_random, tokens, chat=True) is tokens
    with pytest.raises(ValueError, match="contradicts"):
        tokenize(tiny_random, tokens, chat=False)


def test_a_tokens_value_for_another_vocabulary_is_refused(tiny_random):
    tokens = tokenize(tiny_random, TEXT)
    small = tiny_model(n_layers=1, n_heads=1, d_model=8, d_vocab=16, seed=0)
    with pytest.raises(ValueError, match="vocab|d_vocab|range"):
        tokenize(small, tokens)  # SmolLM2's ids are outside a 16-token vocabulary


def test_upto_is_the_prefix(tiny_random):
    tokens = tokenize(tiny_random, TEXT)
    prefix = tokens.upto(3)
    assert prefix.ids.tolist() == tokens.ids[:4].tolist()
    assert prefix.str_tokens == _decoded(tiny_random, tokens.ids[:4])
    assert (prefix.chat, prefix.text) == (tokens.chat, tokens.text)


@pytest.mark.parametrize(("prompt", "error"), [("", ValueError), ("   ", ValueError), (["a", "b"], TypeError)])
def test_bad_prompts_are_refused(tiny_random, prompt, error):
    with pytest.raises(error):
        tokenize(tiny_random, prompt)


def test_a_tokens_value_gives_the_numbers_of_its_text(tiny_random):
    tokens = tokenize(tiny_random, TEXT)
    from_text = jacobian(tiny_random, TEXT, mode="sketch", n_probes=4)
    from_value = jacobian(tiny_random, tokens, mode="sketch", n_probes=4)
    assert torch.equal(from_text.frobenius, from_value.frobenius)
    assert from_value.str_tokens == tokens.str_tokens
    assert from_value.provenance["chat"] is True  # what was applied, not the argument's None
