"""The synthetic language: its rules hold in what it generates, and batches are a function of (seed, step)."""

from __future__ import annotations

import pytest
import torch

from lens_squash.lab.language import BOS, SEP, SyntheticLanguage, step_generator

LANGUAGE = SyntheticLanguage(d_vocab=32, seed=1)


def test_bos_rows_start_with_bos_and_packed_rows_do_not():
    bos = LANGUAGE.batch(64, 24, "bos", step_generator(0, 0))
    packed = LANGUAGE.batch(64, 24, "packed", step_generator(0, 0))
    assert bos.shape == packed.shape == (64, 24)
    assert (bos[:, 0] == BOS).all() and not (bos[:, 1:] == BOS).any()
    assert not (packed == BOS).any()
    assert len(set(packed[:, 0].tolist())) > 5  # position 0 is an arbitrary token
    assert (packed == SEP).any()  # documents are packed across row boundaries


def test_the_token_after_a_trigger_copies_the_one_before_it():
    rows = LANGUAGE.stream(32, 200, step_generator(3, 0), min_doc=50, max_doc=80)
    content = rows - 2
    checked = 0
    for row in content:
        for i in range(2, len(row)):
            if row[i - 1] >= 0 and row[i - 1] < LANGUAGE.n_triggers and row[i - 2] >= 0 and row[i] >= 0:
                assert row[i] == row[i - 2]
                checked += 1
    assert checked > 50


def test_batches_are_a_function_of_seed_and_step():
    a = LANGUAGE.batch(4, 16, "packed", step_generator(2, 7))
    assert torch.equal(a, LANGUAGE.batch(4, 16, "packed", step_generator(2, 7)))
    assert not torch.equal(a, LANGUAGE.batch(4, 16, "packed", step_generator(2, 8)))


def test_tables_are_distributions():
    tables = LANGUAGE.tables()
    torch.testing.assert_close(tables.sum(-1), torch.ones(tables.shape[:-1]))


@pytest.mark.parametrize("kwargs", [{"d_vocab": 4}, {"p_copy": 0.6, "p_trigger": 0.5}, {"n_triggers": 70}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        SyntheticLanguage(**kwargs)
