"""Property-based bad input (issue 14): hostile strings, numbers, paths, token ids and wrong types, over
the command line (``cli.main`` in-process) and the public API.

Every case must end in a clear refusal — exit status 2 and ONE line naming the flag on the command line,
a ``TypeError``/``ValueError`` naming the argument in Python — or in a correct result. Never a traceback,
a hang or a silently accepted nonsense value. On the command line, bad input must be refused before any
model loads: the loader is replaced by one that fails the test.

The API entry points (``trace``, ``jacobian``, ``analyze``) run the checks of :mod:`lens_squash.core.validate`
before any forward pass.
"""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import lens_squash.edge.models
from lens_squash import cli
from lens_squash.core import validate

# few examples and no deadline: the whole file runs in seconds on two shared cores; no database, so
# nothing is written into the working tree
FAST = settings(
    max_examples=15,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

BIDI = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
CONTROLS = "".join(chr(c) for c in range(0, 32)) + "\x7f"
WHITESPACE = [c for c in map(chr, range(0x3001)) if c.isspace()]
HOSTILE_TEXT = st.text(
    alphabet=st.sampled_from(list(BIDI + CONTROLS + "<>&\"'/\\ 01aé漢") + WHITESPACE), min_size=1, max_size=40
)


# --------------------------------------------------------------------------------------------------
# the command line


@pytest.fixture(scope="module")
def tiny_random():
    return lens_squash.edge.models.load_model("tiny-random", n_ctx=128)


@pytest.fixture()
def cached_tiny(monkeypatch, tiny_random):
    monkeypatch.setattr(lens_squash.edge.models, "load_model", lambda name, **kwargs: tiny_random)
    return tiny_random


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as stop:  # argparse's own refusals (a non-integer for an int flag)
            code = stop.code
    return code, out.getvalue(), err.getvalue()


def _assert_refused(argv: list[str], flag: str) -> None:
    code, out, err = _cli(argv)
    assert code == 2, (argv, code, out, err)
    assert "Traceback" not in err and "Traceback" not in out
    lines = err.strip().splitlines()
    if lines and lines[-1].startswith(f"lens-squash {argv[0]}: error: ") and "error: argument " not in lines[-1]:
        assert len(lines) == 1 and out == "", (argv, err)  # ours: exactly one line, nothing printed before
        assert flag in lines[0], (argv, lines[0])
    else:  # argparse: its usage line, then "error: argument --flag: invalid int value"
        assert f"argument {flag}" in lines[-1], (argv, err)


#: (command, flag, smallest valid value, largest valid value accepted before the model loads)
INT_FLAGS = [
    ("demo", "--ones", 0, 2048), ("analyze", "--probes", 1, 65_536), ("tasks", "--samples", 1, 100_000),
    ("tasks", "--batch-size", 1, 100_000), ("tasks", "--max-new-tokens", 1, 2047), ("tasks", "--seed", 0, 2**63 - 1),
    ("sinks", "--clamp-layer", 0, None), ("collapse", "--window", 1, 2048), ("trace", "--n-ctx", 1, 131_072),
]  # fmt: skip
NOT_INTEGERS = st.sampled_from(["nan", "inf", "-inf", "1e3", "1.5", "", " ", "0x10", "one", "\x00", "1_0_", "--"])


def _out_of_range(low: int, high: int | None):
    below = st.integers(max_value=low - 1)
    return below if high is None else st.one_of(below, st.integers(min_value=high + 1, max_value=10**40))


def _argv(command: str, *extra: str) -> list[str]:
    base = [command, "--model", "tiny-random"]
    return base + (["--prompt", "1 1 0"] if command == "trace" else []) + list(extra)


@pytest.mark.parametrize(("command", "flag", "low", "high"), INT_FLAGS, ids=[f"{c} {f}" for c, f, *_ in INT_FLAGS])
@FAST
@given(data=st.data())
def test_integer_flags_refuse_out_of_range_and_non_integers(no_load, command, flag, low, high, data):
    value = data.draw(st.one_of(_out_of_range(low, high).map(str), NOT_INTEGERS), label="value")
    _assert_refused(_argv(command, f"{flag}={value}"), flag)


@FAST
@given(
    value=st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0), st.just(math.nan)).map(repr)
    | st.sampled_from(["nan", "-nan", "inf", "1e999", "", "x"])
)
def test_the_sink_threshold_refuses_values_outside_zero_one(no_load, value):
    _assert_refused(_argv("sinks", f"--eps={value}"), "--eps")


@FAST
@given(prompt=st.text(alphabet=st.sampled_from(WHITESPACE), max_size=30))
def test_blank_prompts_are_refused_before_loading(no_load, prompt):
    for command in ("trace", "analyze", "sinks"):
        argv = [command, "--model", "tiny-random", f"--prompt={prompt}"]
        _assert_refused(argv, "--prompt")


NAME_FLAGS = [
    ("analyze", "--variants", "paper,rollout,certified,value,value_rownorm,certified_rownorm"),
    ("tasks", "--task", ",".join(__import__("lens_squash.experiments.task_prompts", fromlist=["TASKS"]).TASKS)),
    ("tasks", "--styles", "answer,cot,cot_few_shot"),
    ("collapse", "--family", "count_ones,random_digits,copy_ones,copy_ones_commas"),
    ("collapse", "--dtypes", "float64,fp64,float32,fp32,bfloat16,bf16,float16,fp16"),
]


def _valid_names(text: str, known: set[str], *, single: bool) -> bool:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if single:
        return text in known
    return bool(parts) and set(parts) <= known and len(set(parts)) == len(parts)


@pytest.mark.parametrize(("command", "flag", "known"), NAME_FLAGS, ids=[f"{c} {f}" for c, f, _ in NAME_FLAGS])
@FAST
@given(data=st.data())
def test_name_lists_refuse_unknown_empty_and_repeated_names(no_load, command, flag, known, data):
    names = known.split(",")
    text = data.draw(
        st.one_of(
            HOSTILE_TEXT,
            st.lists(st.sampled_from(names), min_size=2).map(",".join),
            st.lists(st.sampled_from([*names, "", " ", "nope"]), max_size=4).map(",".join),
        ),
        label="text",
    )
    assume(not _valid_names(text, set(names), single=flag == "--family"))
    assume(not (flag == "--dtypes" and _distinct_dtypes(text)))
    _assert_refused(_argv(command, f"{flag}={text}"), flag)


def _distinct_dtypes(text: str) -> bool:
    aliases = {"fp64": "float64", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
    parts = [aliases.get(p.strip().lower(), p.strip().lower()) for p in text.split(",") if p.strip()]
    return bool(parts) and len(set(parts)) == len(parts) and set(parts) <= set(aliases.values())


@pytest.fixture()
def hostile_paths(tmp_path):
    existing = tmp_path / "a file"
    existing.write_text("keep")
    return tmp_path, existing


@FAST
@given(choice=st.integers(0, 6), command=st.sampled_from(["demo", "analyze", "tasks", "collapse", "sinks"]))
def test_output_folders_that_cannot_be_written_are_refused_and_nothing_is_created(
    no_load, hostile_paths, choice, command
):
    root, existing = hostile_paths
    paths = [existing, existing / "sub", "/proc/lens_squash_bad", "/dev/null/sub", "", "a\x00b", root / ("x" * 256)]
    before = sorted(p.name for p in root.iterdir())
    _assert_refused(_argv(command, f"--out={paths[choice]}"), "--out")
    assert sorted(p.name for p in root.iterdir()) == before and existing.read_text() == "keep"


@FAST
@given(choice=st.integers(0, 4))
def test_trace_json_must_be_a_writable_file(no_load, hostile_paths, choice):
    root, existing = hostile_paths
    paths = [root, "/", existing / "x.json", "/dev/null", "/proc/lens_squash_bad.json"]
    _assert_refused(_argv("trace", f"--json={paths[choice]}"), "--json")
    assert existing.read_text() == "keep"


@settings(FAST, max_examples=12)
@given(prompt=HOSTILE_TEXT.filter(str.strip))
def test_hostile_but_valid_prompts_get_a_correct_trace(cached_tiny, prompt):
    from lens_squash.edge.models import format_prompt

    code, out, err = _cli(["trace", "--model", "tiny-random", f"--prompt={prompt}"])
    assert code == 0 and "Traceback" not in err, err
    n_tokens = len(format_prompt(cached_tiny, prompt))
    assert out.splitlines()[1].startswith(f"{n_tokens} tokens: ")  # after the "loaded" line


def test_an_over_long_prompt_is_refused_after_loading_and_before_any_pass(cached_tiny, monkeypatch):
    def no_forward(*args, **kwargs):
        pytest.fail("a forward pass ran for a prompt that cannot fit")

    monkeypatch.setattr(type(cached_tiny), "forward", no_forward)
    for command in ("trace", "sinks", "analyze"):
        code, out, err = _cli(
            [command, "--model", "tiny-random", "--prompt", "1 " * 500, "--out", "/tmp/never"]
            if command != "trace"
            else [command, "--model", "tiny-random", "--prompt", "1 " * 500]
        )
        assert code == 2 and "n_ctx=128" in err and "--n-ctx" in err and len(err.strip().splitlines()) == 1, err
    assert not Path("/tmp/never").exists()


#: (command, a path the run writes under --out, what stands there instead)
BLOCKED_PATHS = [
    ("suite", "analyses", "file"), ("suite", "table.csv", "folder"), ("suite", "prompts.jsonl", "folder"),
    ("analyze", "report.html", "folder"), ("analyze", "results.json", "folder"),
    ("tasks", "results.csv", "folder"), ("tasks", "figures.html", "folder"), ("tasks", "results.jsonl", "folder"),
]  # fmt: skip


@pytest.mark.parametrize(("command", "name", "kind"), BLOCKED_PATHS, ids=[f"{c} {n}" for c, n, _ in BLOCKED_PATHS])
def test_a_path_the_run_would_create_blocked_by_the_wrong_type_is_refused_before_the_model_loads(
    no_load, tmp_path, command, name, kind
):
    import time

    out = tmp_path / "out"
    out.mkdir()
    blocker = out / name
    blocker.mkdir() if kind == "folder" else blocker.write_text("keep")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a", "prompt": "one two three"}\n')
    extra = ["--prompts", str(prompts)] if command == "suite" else []
    started = time.monotonic()
    _assert_refused(_argv(command, f"--out={out}", *extra), "--out")
    assert time.monotonic() - started < 15
    _, _, err = _cli(_argv(command, f"--out={out}", *extra))
    assert str(blocker) in err and ("not a folder" if kind == "file" else "is a folder") in err, err
    assert sorted(p.name for p in out.iterdir()) == [name]  # nothing written, no lock left behind


@pytest.mark.parametrize("command", ["suite", "tasks", "analyze", "demo", "collapse", "sinks"])
def test_a_folder_another_run_writes_into_is_refused_at_once_before_the_model_loads(no_load, tmp_path, command):
    import os
    import time

    from lens_squash.core.lock import lock_folder

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a", "prompt": "one two three"}\n')
    extra = ["--prompts", str(prompts)] if command == "suite" else []
    with lock_folder(tmp_path / "out", command="lens-squash tasks --seed 7"):
        started = time.monotonic()
        _assert_refused(_argv(command, f"--out={tmp_path / 'out'}", *extra), "--out")
        code, _, err = _cli(_argv(command, f"--out={tmp_path / 'out'}", *extra))
        assert time.monotonic() - started < 15
    assert f"PID {os.getpid()} (lens-squash tasks --seed 7)" in err, err


def test_a_nan_unembedding_column_is_refused_by_name_not_predicted(cached_tiny, tmp_path):
    with torch.no_grad():
        saved = cached_tiny.unembed.W_U[:, 7].clone()
        cached_tiny.unembed.W_U[:, 7] = math.nan  # the argmax of NaN logits would "predict" token 7
    try:
        code, out, err = _cli(["analyze", "--model", "tiny-random", "--jacobian", "none", f"--out={tmp_path / 'o'}"])
    finally:
        with torch.no_grad():
            cached_tiny.unembed.W_U[:, 7] = saved
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    # the tensor by the model's own parameter name: TransformerLens's on a HookedTransformer, HF's on a bridge
    assert ("unembed.W_U holds" in err or "lm_head.weight holds" in err) and "NaN" in err, err
    assert "low precision" not in err and not (tmp_path / "o" / "results.json").exists()


# --------------------------------------------------------------------------------------------------
# the API: validate's checks (used by the CLI, offered to analyze/trace/jacobian)


@FAST
@given(text=st.text(max_size=50))
def test_check_prompt_accepts_exactly_the_non_blank_text(text):
    if text.strip():
        assert validate.check_prompt(text) is text
    else:
        with pytest.raises(ValueError, match="prompt is empty or only whitespace"):
            validate.check_prompt(text)


@FAST
@given(
    value=st.one_of(
        st.none(),
        st.integers(),
        st.floats(),
        st.binary(),
        st.lists(st.text(), max_size=3),
        st.dictionaries(st.text(), st.text(), max_size=2),
        st.booleans(),
    )
)
def test_check_prompt_refuses_every_non_text_by_name(value):
    with pytest.raises(TypeError, match="prompt"):
        validate.check_prompt(value)


@FAST
@given(ids=st.lists(st.integers(-(2**62), 2**62), min_size=1, max_size=8), d_vocab=st.integers(1, 300))
def test_check_token_ids_agrees_with_a_brute_force_vocabulary_check(ids, d_vocab):
    tensor = torch.tensor(ids, dtype=torch.long)
    if all(0 <= i < d_vocab for i in ids):
        assert validate.check_token_ids(tensor, d_vocab).tolist() == ids
    else:
        with pytest.raises(ValueError, match=rf"outside this model's vocabulary \[0, {d_vocab}\)"):
            validate.check_token_ids(tensor, d_vocab)


@FAST
@given(pos=st.integers(-50, 50), n=st.integers(1, 20))
def test_check_position_agrees_with_python_indexing(pos, n):
    if -n <= pos < n:
        assert validate.check_position(pos, n, "target") == list(range(n))[pos]
    else:
        with pytest.raises(ValueError, match=f"target={pos} is outside a sequence of {n} tokens"):
            validate.check_position(pos, n, "target")


@FAST
@given(chat=st.one_of(st.text(), st.integers(), st.floats(), st.lists(st.booleans(), max_size=1)))
def test_check_chat_refuses_everything_but_none_and_bools(chat):
    with pytest.raises(TypeError, match="chat must be None"):
        validate.check_chat(chat)


@FAST
@given(variants=st.lists(st.sampled_from(["paper", "rollout", "papr", "", "PAPER"]), max_size=4))
def test_check_variants_accepts_only_distinct_known_names(variants):
    known = ("paper", "rollout")
    if variants and set(variants) <= set(known) and len(set(variants)) == len(variants):
        assert validate.check_variants(variants, known) == tuple(variants)
    else:
        with pytest.raises(ValueError, match="variants"):
            validate.check_variants(variants, known)


# --------------------------------------------------------------------------------------------------
# the API entry points (trace, analyze, jacobian)


def _refuses(call, error, *words: str) -> None:
    with pytest.raises(error) as err:
        call()
    assert all(word in str(err.value) for word in words), str(err.value)


def test_analyze_refuses_an_empty_variant_list(tiny_random):
    from lens_squash.experiments.analysis import analyze

    _refuses(lambda: analyze(tiny_random, "1 1 0", variants=[], jacobian_mode=None), ValueError, "variants")


@pytest.mark.parametrize("entry", ["trace", "analyze"])
def test_blank_prompts_are_refused_by_the_api(tiny_random, entry):
    from lens_squash.edge.trace import trace
    from lens_squash.experiments.analysis import analyze

    call = {"trace": lambda p: trace(tiny_random, p), "analyze": lambda p: analyze(tiny_random, p, jacobian_mode=None)}
    for prompt in ("", "  \n\t"):
        _refuses(lambda p=prompt: call[entry](p), ValueError, "prompt")


@pytest.mark.parametrize("prompt", [None, ["a", "b"], b"1 1 0"], ids=["None", "list-of-str", "bytes"])
def test_trace_refuses_a_prompt_of_the_wrong_type(tiny_random, prompt):
    from lens_squash.edge.trace import trace

    _refuses(lambda: trace(tiny_random, prompt), TypeError, "prompt")


@pytest.mark.parametrize("prompt", [None, ["a", "b"]], ids=["None", "list-of-str"])
def test_analyze_refuses_a_prompt_of_the_wrong_type(tiny_random, prompt):
    from lens_squash.experiments.analysis import analyze

    _refuses(lambda: analyze(tiny_random, prompt, jacobian_mode=None), TypeError, "prompt")


@pytest.mark.parametrize("bad", [999_999, -5])
@pytest.mark.parametrize("entry", ["trace", "jacobian"])
def test_token_ids_outside_the_vocabulary_are_refused(tiny_random, entry, bad):
    from lens_squash.edge.jacobian import jacobian
    from lens_squash.edge.trace import trace

    ids = torch.tensor([1, bad])
    call = {
        "trace": lambda: trace(tiny_random, ids),
        "jacobian": lambda: jacobian(tiny_random, ids, mode="sketch", n_probes=2),
    }[entry]
    _refuses(call, ValueError, str(bad), "vocabulary")


@pytest.mark.parametrize("entry", ["trace", "analyze"])
def test_chat_must_be_none_or_a_bool(tiny_random, entry):
    from lens_squash.edge.trace import trace
    from lens_squash.experiments.analysis import analyze

    call = {
        "trace": lambda: trace(tiny_random, "1 1 0", chat="yes"),
        "analyze": lambda: analyze(tiny_random, "1 1 0", chat="yes", jacobian_mode=None),
    }[entry]
    _refuses(call, TypeError, "chat")


def test_analyze_refuses_the_first_token_as_target(tiny_random):
    from lens_squash.experiments.analysis import analyze

    _refuses(
        lambda: analyze(tiny_random, "1 1 0", target_pos=0, jacobian_mode="sketch", n_probes=2), ValueError, "target"
    )


def test_analyze_refuses_something_that_is_not_a_transformerlens_model():
    from lens_squash.experiments.analysis import analyze

    _refuses(
        lambda: analyze(torch.nn.Linear(2, 2), "1 1 0", jacobian_mode=None),
        (TypeError, ValueError),
        "HookedTransformer",
    )
