"""validate.py: each check accepts exactly what it should (brute force over small domains), refuses the
rest with a TypeError/ValueError naming the argument, and the path checks create nothing."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch

from lens_squash.core import validate


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# --------------------------------------------------------------------------------------------------
# numbers


def test_check_int_accepts_exactly_the_integers_in_range():
    for value in range(-5, 8):
        inside = 0 <= value <= 3
        if inside:
            assert validate.check_int(value, "--x", minimum=0, maximum=3) == value
        else:
            with pytest.raises(ValueError, match=r"^--x must be between 0 and 3, got -?\d"):
                validate.check_int(value, "--x", minimum=0, maximum=3)


@pytest.mark.parametrize("value", [True, False, 1.0, "3", None, [1]])
def test_check_int_refuses_non_integers_by_name(value):
    with pytest.raises(TypeError, match="^n_samples must be an integer"):
        validate.check_int(value, "n_samples", minimum=1)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 0.0, 1.0, -0.1, 1.5])
def test_check_float_refuses_non_finite_and_out_of_interval(value):
    with pytest.raises(ValueError, match=r"--eps must be a finite number in \(0, 1\)"):
        validate.check_float(value, "--eps", low=0.0, high=1.0, low_open=True, high_open=True)


def test_check_float_accepts_the_open_interval_and_refuses_bool():
    assert validate.check_float(0.3, "--eps", low=0.0, high=1.0, low_open=True, high_open=True) == 0.3
    assert validate.check_float(1, "x", low=0.0, high=1.0) == 1.0  # a closed end is inside
    with pytest.raises(TypeError, match="must be a number"):
        validate.check_float(True, "x", low=0.0, high=1.0)


def test_parse_int_list_matches_range_for_every_small_spec():
    for start in range(1, 5):
        for stop in range(start, 9):
            for step in range(1, 4):
                expected = list(range(start, stop + 1, step))
                assert validate.parse_int_list(f"{start}:{stop}:{step}", "--lengths") == expected
    assert validate.parse_int_list("5, 10,20,", "--lengths") == [5, 10, 20]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (",", "no numbers"), ("", "no numbers"), ("a,b", "must look like"), ("1:2", "must look like"),
        ("5:1:1", "start <= stop"), ("1:5:0", "step >= 1"), ("1:5:-1", "step >= 1"), ("0,1", ">= 1, got 0"),
        ("3,3", "repeats a value"), ("1:10000000:1", "more than 10000 lengths"), ("1.5", "must look like"),
    ],
)  # fmt: skip
def test_parse_int_list_refuses_bad_specs_naming_the_flag(text, message):
    with pytest.raises(ValueError, match="--lengths") as err:
        validate.parse_int_list(text, "--lengths")
    assert message in str(err.value)


def test_parse_int_list_caps_each_value():
    with pytest.raises(ValueError, match="between 1 and 64, got 65"):
        validate.parse_int_list("8,65", "--lengths", maximum=64)


# --------------------------------------------------------------------------------------------------
# names


KNOWN = ("paper", "rollout", "certified")


def test_check_names_keeps_order_and_refuses_empty_unknown_repeated_and_bare_strings():
    assert validate.check_variants(["rollout", "paper"], KNOWN) == ("rollout", "paper")
    with pytest.raises(ValueError, match="variants is empty"):
        validate.check_variants([], KNOWN)
    with pytest.raises(ValueError, match="unknown variant 'papr' in variants; choose from paper, rollout"):
        validate.check_variants(["papr"], KNOWN)
    with pytest.raises(ValueError, match="'paper' more than once"):
        validate.check_variants(["paper", "rollout", "paper"], KNOWN)
    with pytest.raises(TypeError, match=r"single string 'paper'; pass \['paper'\]"):
        validate.check_variants("paper", KNOWN)
    with pytest.raises(TypeError, match="must be a string"):
        validate.check_variants(["paper", 3], KNOWN)


def test_parse_names_splits_commas_and_names_the_flag():
    assert validate.parse_names(" paper , rollout", KNOWN, "--variants") == ("paper", "rollout")
    with pytest.raises(ValueError, match="--variants is empty"):
        validate.parse_names(",", KNOWN, "--variants")


@pytest.mark.parametrize("chat", [None, True, False])
def test_check_chat_accepts_none_and_bools(chat):
    assert validate.check_chat(chat) is chat


@pytest.mark.parametrize("chat", ["yes", "False", 1, 0, 1.0, []])
def test_check_chat_refuses_everything_else(chat):
    with pytest.raises(TypeError, match="chat must be None .* True or False"):
        validate.check_chat(chat)


# --------------------------------------------------------------------------------------------------
# prompts and token ids


@pytest.mark.parametrize(
    ("prompt", "error", "message"),
    [
        (None, TypeError, "prompt is None"),
        (["a", "b"], TypeError, "2 strings, but one prompt is analysed per call"),
        ([1, 2], TypeError, "torch.tensor"),
        (b"hi", TypeError, "decode it first"),
        (3, TypeError, "must be a str"),
        ("", ValueError, "empty or only whitespace"),
        (" \t\n\u3000", ValueError, "empty or only whitespace"),
        ("a\udc80b", ValueError, "unpaired surrogate at index 1"),
        (torch.tensor([1.0, 2.0]), TypeError, "integer token ids"),
        (torch.tensor([True]), TypeError, "integer token ids"),
        (torch.zeros(2, 3, dtype=torch.long), ValueError, r"shape \[pos\] or \[1, pos\]"),
        (torch.zeros(0, dtype=torch.long), ValueError, "no tokens"),
    ],
)
def test_check_prompt_refuses_with_the_fix(prompt, error, message):
    with pytest.raises(error, match=message):
        validate.check_prompt(prompt)


def test_check_prompt_passes_hostile_but_valid_text_and_id_tensors_through():
    for text in ["\u202eevil", "a\x00b", "x" * 10_000, "<script>", "\x1b[31mred"]:
        assert validate.check_prompt(text) is text
    ids = torch.tensor([[3, 4, 5]])
    assert validate.check_prompt(ids).tolist() == [3, 4, 5]


def test_check_token_ids_accepts_exactly_the_vocabulary():
    d_vocab = 7
    for token in range(-3, 10):
        ids = torch.tensor([0, token], dtype=torch.int32)
        if 0 <= token < d_vocab:
            out = validate.check_token_ids(ids, d_vocab)
            assert out.dtype == torch.int64 and out.tolist() == [0, token]
        else:
            with pytest.raises(ValueError, match=rf"token id {token}, outside this model's vocabulary \[0, 7\)"):
                validate.check_token_ids(ids, d_vocab)
    with pytest.raises(TypeError, match="torch.tensor"):
        validate.check_token_ids([1, 2], d_vocab)


def test_check_position_agrees_with_python_indexing():
    for n in range(1, 5):
        for pos in range(-n - 2, n + 2):
            if -n <= pos < n:
                assert validate.check_position(pos, n, "target_pos") == range(n)[pos]
            else:
                with pytest.raises(ValueError, match=rf"target_pos={pos} is outside a sequence of {n} tokens"):
                    validate.check_position(pos, n, "target_pos")
    with pytest.raises(TypeError, match="target_pos must be an integer"):
        validate.check_position(1.0, 3, "target_pos")


def test_check_target_needs_a_position_before_it():
    assert validate.check_target(-1, 5) == 4
    for target in (0, -5):
        with pytest.raises(ValueError, match="first token: only one position"):
            validate.check_target(target, 5)


# --------------------------------------------------------------------------------------------------
# output paths


def test_out_dir_accepts_new_nested_folders_and_creates_nothing(tmp_path):
    before = _listing(tmp_path)
    assert validate.check_out_dir(tmp_path / "a" / "b", "--out") == tmp_path / "a" / "b"
    assert validate.check_out_dir(tmp_path, "--out") == tmp_path
    assert validate.check_out_file(tmp_path / "new" / "t.json", "--json") == tmp_path / "new" / "t.json"
    assert _listing(tmp_path) == before  # the probe file is gone and no folder was made


def test_out_paths_refuse_files_folders_and_impossible_parents(tmp_path):
    existing = tmp_path / "results.txt"
    existing.write_text("keep me")
    before = _listing(tmp_path)
    cases = [
        (validate.check_out_dir, existing, "is an existing file, not a folder"),
        (validate.check_out_dir, existing / "sub", "exists and is not a folder"),
        (validate.check_out_file, tmp_path, "is a folder; pass a file path inside it"),
        (validate.check_out_file, existing / "x.json", "exists and is not a folder"),
        (validate.check_out_dir, "", "is empty"),
        (validate.check_out_dir, "a\x00b", "NUL"),
        (validate.check_out_dir, tmp_path / ("x" * 300), "file systems allow 255 bytes"),
    ]
    for check, path, message in cases:
        with pytest.raises(ValueError, match="--out") as err:
            check(path, "--out")
        assert message in str(err.value), (path, str(err.value))
    with pytest.raises(TypeError, match="--out must be a path"):
        validate.check_out_dir(3, "--out")
    assert _listing(tmp_path) == before and existing.read_text() == "keep me"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and /dev/null are Linux paths")
def test_out_paths_refuse_proc_and_dev_null_even_as_root():
    with pytest.raises(ValueError, match="is not writable"):
        validate.check_out_dir("/proc/lens_squash_x", "--out")
    with pytest.raises(ValueError, match="'/dev/null' exists and is not a folder"):
        validate.check_out_dir("/dev/null/sub", "--out")
    with pytest.raises(ValueError, match="not a regular file"):
        validate.check_out_file("/dev/null", "--json")
    assert not os.path.exists("/proc/lens_squash_x")
