"""The command line's help: plain text, and every option that has a default (zero included) says it."""

from __future__ import annotations

import pytest

from lens_squash.cli import COMMANDS, build_parser, main


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--help"])
    assert stop.value.code == 0
    return capsys.readouterr().out


def test_top_level_help_is_plain_text(capsys):
    text = _help(capsys)
    assert ":data:" not in text and "``" not in text
    assert all(name in text for name in COMMANDS)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_option_with_a_default_shows_it(capsys, command):
    text = " ".join(_help(capsys, command).split())  # argparse wraps lines
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    for action in sub._actions:
        if not action.option_strings or action.default is None or action.default is False or action.dest == "help":
            continue
        assert action.help, f"{command} {action.option_strings[0]} has no help text"
        if "default" not in action.help:  # those that describe their default in words keep the words
            assert f"(default: {action.default})" in text, (command, action.option_strings[0])


# --------------------------------------------------------------------------------------------------
# bad input: refused before the model loads, in one line that names the flag (issue 14)

import json  # noqa: E402

import lens_squash.edge.models  # noqa: E402
from lens_squash import cli  # noqa: E402


@pytest.fixture(scope="module")
def tiny_random():
    return lens_squash.edge.models.load_model("tiny-random", n_ctx=256)


@pytest.fixture()
def loads_tiny(monkeypatch, tiny_random):
    """Commands get the cached tiny-random model; returns the list of load calls."""
    calls = []

    def load(name, **kwargs):
        calls.append(name)
        return tiny_random

    monkeypatch.setattr(lens_squash.edge.models, "load_model", load)
    return calls


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _refused(capsys, argv, flag: str, message: str) -> None:
    code, out, err = _run(capsys, *argv)
    assert code == 2 and out == "", (argv, out, err)
    assert err.count("\n") == 1 and err.startswith(f"lens-squash {argv[0]}: error: "), err
    assert flag in err and message in err, err


BAD_FLAGS = [
    (["sinks", "--clamp-layer", "-1"], "--clamp-layer", "must be >= 0"),
    (["sinks", "--eps", "nan"], "--eps", "finite number in (0, 1)"),
    (["sinks", "--eps", "1.5"], "--eps", "finite number"),
    (["demo", "--ones", "-1"], "--ones", "between 0 and 2048, got -1"),
    (["demo", "--ones", "100000"], "--ones", "got 100000"),
    (["analyze", "--variants", ","], "--variants", "is empty"),
    (["analyze", "--variants", "paper,papr"], "--variants", "unknown variant 'papr'"),
    (["analyze", "--variants", "paper,paper"], "--variants", "more than once"),
    (["analyze", "--prompt", "   "], "--prompt", "empty or only whitespace"),
    (["analyze", "--probes", "0"], "--probes", "between 1 and"),
    (["analyze", "--out", "/proc/lens_squash_x"], "--out", "is not writable"),
    (["analyze", "--out", "/dev/null/sub"], "--out", "'/dev/null' exists and is not a folder"),
    (["trace", "--prompt", "hi", "--json", "/tmp"], "--json", "is a folder"),
    (["trace", "--prompt", "hi", "--n-ctx", "-5"], "--n-ctx", "between 1 and"),
    (["trace", "--prompt", "hi", "--dtype", "int8"], "--dtype", "unknown dtype name 'int8'"),
    (["tasks", "--samples", "0"], "--samples", "got 0"),
    (["tasks", "--lengths", "5:1:1"], "--lengths", "start <= stop"),
    (["tasks", "--task", "copy_middle"], "--task", "unknown task 'copy_middle'"),
    (["tasks", "--task", "copy_last", "--styles", "cot"], "--styles", "copying tasks have only 'answer'"),
    (["tasks", "--max-new-tokens", "4096"], "--max-new-tokens", "must fit --n-ctx 2048"),
    (["tasks", "--batch-size", "0"], "--batch-size", "got 0"),
    (["collapse", "--family", "nope"], "--family", "unknown family 'nope'"),
    (["collapse", "--dtypes", "fp32,float32"], "--dtypes", "twice"),
    (["collapse", "--window", "0"], "--window", "got 0"),
]


@pytest.mark.parametrize(("argv", "flag", "message"), BAD_FLAGS, ids=[" ".join(c[0]) for c in BAD_FLAGS])
def test_bad_flags_are_refused_before_the_model_loads(capsys, no_load, argv, flag, message):
    _refused(capsys, argv, flag, message)


def test_an_existing_file_as_out_is_refused_and_left_alone(capsys, no_load, tmp_path):
    target = tmp_path / "results"
    target.write_text("previous")
    _refused(capsys, ["sinks", "--out", str(target)], "--out", "is an existing file, not a folder")
    assert target.read_text() == "previous" and [p.name for p in tmp_path.iterdir()] == ["results"]


def test_a_layer_past_the_last_block_is_refused_after_loading_and_before_any_pass(
    capsys, loads_tiny, tiny_random, monkeypatch, tmp_path
):
    def no_forward(*args, **kwargs):
        pytest.fail("a forward pass ran before --clamp-layer was checked")

    monkeypatch.setattr(type(tiny_random), "forward", no_forward)
    n_layers = tiny_random.cfg.n_layers
    code, out, err = _run(
        capsys, "sinks", "--model", "tiny-random", "--clamp-layer", str(n_layers), "--out", str(tmp_path / "s")
    )
    assert code == 2 and loads_tiny == ["tiny-random"]
    assert f"--clamp-layer {n_layers} is past this model's last block" in err and f"0 … {n_layers - 1}" in err
    assert not (tmp_path / "s").exists()


def test_sinks_prints_words_not_nan_none_or_tuples(capsys, loads_tiny, tmp_path):
    code, out, err = _run(capsys, "sinks", "--model", "tiny-random", "--out", str(tmp_path))
    assert code == 0, err
    assert "nan" not in out and "None" not in out and not any(f"({a}, {b})" in out for a in range(9) for b in range(9))
    assert "phases: " in out and "massive" in out
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["metadata"]["command"] == "sinks"


def test_trace_writes_its_json_file(capsys, loads_tiny, tmp_path):
    path = tmp_path / "deep" / "trace.json"
    code, out, err = _run(capsys, "trace", "--model", "tiny-random", "--prompt", "1 1 0", "--json", str(path))
    assert code == 0, err
    saved = json.loads(path.read_text())
    assert saved["metadata"]["prompt"] == "1 1 0" and len(saved["tokens"]) == len(saved["str_tokens"])


# --------------------------------------------------------------------------------------------------
# Ctrl-C: one line saying what was saved and how to resume, exit status 130


def test_ctrl_c_during_any_command_is_one_line_and_exit_130(capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lens_squash.edge.models, "load_model", interrupted)
    code, out, err = _run(capsys, "analyze", "--model", "tiny-random", "--out", "/tmp/lens_squash_never")
    assert code == cli.EXIT_INTERRUPTED == 130 and out == ""
    assert err == (
        "lens-squash analyze: interrupted; nothing was saved (analyze writes its results when it "
        "finishes); run the same command again\n"
    )


def _with(argv: list[str], flag: str, value: str) -> list[str]:
    """``argv`` with ``flag`` set to ``value`` (replaced where present, appended otherwise)."""
    if flag not in argv:
        return [*argv, flag, value]
    at = argv.index(flag)
    return [*argv[: at + 1], value, *argv[at + 2 :]]


TASK_ARGS = [
    "tasks",
    "--model",
    "tiny-random",
    "--task",
    "copy_last",
    "--lengths",
    "2,3,4",
    "--samples",
    "1",
    "--batch-size",
    "1",
    "--max-new-tokens",
    "4",
]


def test_tasks_interrupted_says_what_was_saved_then_resumes(capsys, loads_tiny, monkeypatch, tmp_path):
    from lens_squash.experiments import task_eval

    real, calls = task_eval.greedy_generate, []

    def flaky(model, prompts, **kwargs):
        calls.append(len(prompts))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(model, prompts, **kwargs)

    monkeypatch.setattr(task_eval, "greedy_generate", flaky)
    out_dir = tmp_path / "run"
    code, out, err = _run(capsys, *TASK_ARGS, "--out", str(out_dir))
    assert code == 130
    assert err.strip().splitlines()[-1] == (
        f"lens-squash tasks: interrupted; 1 rows are saved in {out_dir / 'results.jsonl'}; "
        "run the same command again to resume from them"
    )
    code, out, err = _run(capsys, *TASK_ARGS, "--out", str(out_dir))
    assert code == 0 and len(calls) == 4  # the saved row is not generated again
    rows = (out_dir / "results.jsonl").read_text().splitlines()
    assert len(rows) == 3 and len({json.loads(r)["fingerprint"] for r in rows}) == 1


def test_tasks_refuses_to_resume_another_run_before_loading(capsys, loads_tiny, monkeypatch, tmp_path):
    out_dir = tmp_path / "run"
    assert _run(capsys, *TASK_ARGS, "--out", str(out_dir))[0] == 0
    assert loads_tiny == ["tiny-random"]
    before = (out_dir / "results.jsonl").read_bytes()
    changed = [
        ("--max-new-tokens", "5", "generation.max_new_tokens: 4 → 5"),
        ("--dtype", "bf16", "model.dtype: 'float32' → 'bfloat16'"),
        ("--seed", "3", "tasks.seed: 0 → 3"),
        ("--model", "smollm2-135m-instruct", "model: 'tiny-random' → 'smollm2-135m-instruct'"),
    ]
    for flag, value, field in changed:
        code, out, err = _run(capsys, *_with(TASK_ARGS, flag, value), "--out", str(out_dir))
        assert code == 2 and field in err and "--overwrite" in err and "holds results of a different run" in err, err
    assert loads_tiny == ["tiny-random"]  # none of the refusals loaded a model
    assert (out_dir / "results.jsonl").read_bytes() == before
    code, out, err = _run(capsys, *_with(TASK_ARGS, "--max-new-tokens", "5"), "--out", str(out_dir), "--overwrite")
    assert code == 0, err
    rows = [json.loads(r) for r in (out_dir / "results.jsonl").read_text().splitlines()]
    record = json.loads((out_dir / "results.fingerprint.json").read_text())
    assert record["fingerprint"]["generation"]["max_new_tokens"] == 5
    assert {r["fingerprint"] for r in rows} == {record["digest"]}


@pytest.mark.slow  # a fresh interpreter imports torch and TransformerLens: about 10-20 s
def test_a_real_sigint_ends_tasks_with_one_line_and_exit_130(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    out_dir = tmp_path / "run"
    argv = [
        sys.executable,
        "-m",
        "lens_squash.cli",
        "tasks",
        "--model",
        "tiny-random",
        "--task",
        "count_ones",
        "--lengths",
        "1:300:1",
        "--samples",
        "1",
        "--batch-size",
        "1",
        "--max-new-tokens",
        "8",
        "--out",
        str(out_dir),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # SIGINT's default action in the child: a shell without job control starts background jobs with SIGINT
    # ignored, the child would inherit that, and Python installs no KeyboardInterrupt handler then
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 240
        while not (out_dir / "results.jsonl").exists():  # the first batch is saved: the run is under way
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no batch was saved in time"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    n_rows = len((out_dir / "results.jsonl").read_text().splitlines())
    assert last == (
        f"lens-squash tasks: interrupted; {n_rows} rows are saved in {out_dir / 'results.jsonl'}; "
        "run the same command again to resume from them"
    )


@pytest.mark.parametrize("command", ["analyze", "sinks"])
def test_a_single_token_prompt_is_refused_after_loading_and_before_any_pass(
    capsys, loads_tiny, tiny_random, monkeypatch, tmp_path, command
):
    def no_forward(*args, **kwargs):
        pytest.fail("a forward pass ran for a one-token prompt")

    monkeypatch.setattr(type(tiny_random), "forward", no_forward)
    code, out, err = _run(
        capsys, command, "--model", "tiny-random", "--raw", "--prompt", "a", "--out", str(tmp_path / "o")
    )
    assert code == 2 and "--prompt 'a' is 1 token" in err and "at least 2" in err, err
    assert not (tmp_path / "o").exists()


def test_a_bug_is_one_line_with_exit_1_and_debug_mode_shows_the_traceback(capsys, monkeypatch):
    def broken(args):
        raise KeyError("oops")

    original = cli.COMMANDS["trace"]
    monkeypatch.setitem(cli.COMMANDS, "trace", cli.Command(original.add_parser, original.check, broken))
    monkeypatch.delenv("LENS_SQUASH_DEBUG", raising=False)
    code, out, err = _run(capsys, "trace", "--prompt", "hi")
    assert code == cli.EXIT_INTERNAL_ERROR == 1
    assert err == (
        "lens-squash trace: internal error (KeyError: 'oops'); please report it; rerun with "
        "LENS_SQUASH_DEBUG=1 for the traceback\n"
    )
    monkeypatch.setenv("LENS_SQUASH_DEBUG", "1")
    with pytest.raises(KeyError, match="oops"):
        main(["trace", "--prompt", "hi"])


def test_device_flag_is_checked_before_the_model_loads(no_load, capsys):
    for device, words in (("gpu9", "not a torch device"), ("cuda:7", "CUDA device"), ("xla", "cpu, cuda or mps")):
        assert cli.main(["trace", "--model", "tiny-random", "--prompt", "1 1 0", "--device", device]) == 2
        err = capsys.readouterr().err
        assert "--device" in err and words in err and len(err.strip().splitlines()) == 1


def test_figures_flag_names_a_bad_format_before_the_model_loads(no_load, capsys):
    assert cli.main(["sinks", "--model", "tiny-random", "--figures", "png,bmp"]) == 2
    err = capsys.readouterr().err
    assert "--figures" in err and "bmp" in err


@pytest.mark.browser
def test_figures_flag_writes_every_report_figure_as_png(tmp_path, capsys):
    out = tmp_path / "sinks"
    assert (
        cli.main(
            [
                "sinks",
                "--model",
                "tiny-random",
                "--prompt",
                "1 1 1 0",
                "--out",
                str(out),
                "--figures",
                "png",
                "--no-jacobian",
            ]
        )
        == 0
    )
    pngs = sorted((out / "figures").glob("*.png"))
    page = (out / "report.html").read_text()
    assert pngs and len(pngs) == page.count('class="plotly-graph-div"')
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5_000


def test_trace_refuses_figures_it_would_not_draw(capsys):
    assert cli.main(["trace", "--model", "tiny-random", "--prompt", "1 1 0", "--figures", "png"]) == 2
    assert "--figures" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# a light parser: --help, COMMAND -h and refused flags import no torch (issue 17); the light name
# lists it is built from equal the real registries


_NO_TORCH = """
import sys
from lens_squash.cli import main
for argv in {argvs!r}:
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    assert code == {code}, (argv, code)
heavy = sorted(m for m in ("torch", "transformer_lens", "transformers", "pandas", "plotly") if m in sys.modules)
assert not heavy, heavy
"""


@pytest.mark.parametrize(
    ("argvs", "code"),
    [
        ([["--help"]] + [[name, "-h"] for name in COMMANDS], 0),
        (
            [
                ["sinks", "--eps", "2"],
                ["trace", "--prompt", "x", "--dtype", "int8"],
                ["tasks", "--task", "nope"],
                ["suite", "--prompts", "/nonexistent.jsonl"],
                ["collapse", "--family", "nope"],
                ["analyze", "--bogus"],
                ["trace", "--prompt", "x", "--device", "gpu9"],
                ["tasks", "--task", "copy_last", "--styles", "cot"],
            ],
            2,
        ),
    ],
)
def test_help_and_refused_flags_import_no_torch(argvs, code):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _NO_TORCH.format(argvs=argvs, code=code)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_light_name_lists_are_the_registries():
    from lens_squash import cli_names
    from lens_squash.edge.dtypes import DTYPES
    from lens_squash.edge.gguf import OFFLINE_MODELS
    from lens_squash.edge.jacobian import MODES
    from lens_squash.experiments.collapse_families import FAMILIES
    from lens_squash.experiments.task_prompts import STYLES, TASKS, copy_prompt
    from lens_squash.views.export import FORMATS

    # the variant names are the registry's own (tests/algebra/test_variant_registry.py), not a copy
    assert cli_names.COLLAPSE_FAMILIES == tuple(FAMILIES)
    assert cli_names.JACOBIAN_MODES == tuple(MODES)
    assert cli_names.FIGURE_FORMATS == tuple(FORMATS)
    assert cli_names.TASK_NAMES == tuple(TASKS) and cli_names.STYLES == STYLES
    assert cli_names.TASK_STYLES == {name: spec.styles for name, spec in TASKS.items()}
    assert cli_names.COPY_PROMPT == copy_prompt(12)
    assert set(cli_names.DTYPE_NAMES) == set(DTYPES)
    assert {name: str(DTYPES[name]).removeprefix("torch.") for name in DTYPES} == cli_names.DTYPE_NAMES
    assert set(OFFLINE_MODELS) == set(lens_squash.edge.model_names.OFFLINE_MODEL_NAMES)


@pytest.mark.slow  # a fresh interpreter per case loads torch, TransformerLens and a model
@pytest.mark.parametrize(
    "argv",
    [
        ["trace", "--prompt", "1 1 0", "--generate", "--json", "-"],
        ["suite", "--prompts", "{prompts}", "--jacobian", "sketch", "--probes", "4", "--json"],
    ],
)
def test_json_on_stdout_stays_valid_json_with_progress_bars_on(argv, tmp_path):
    """A fresh process with bars forced on (LENS_SQUASH_PROGRESS=1): stdout must parse as JSON alone."""
    import os
    import re
    import subprocess
    import sys

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a", "prompt": "1 1 1 0"}\n{"id": "b", "prompt": "one two three"}\n')
    argv = [a.format(prompts=prompts) for a in argv] + ["--model", "tiny-random", "--n-ctx", "256"]
    if argv[0] == "suite":
        argv += ["--out", str(tmp_path / "out")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LENS_SQUASH_PROGRESS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "lens_squash.cli", *argv], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    payload = json.loads(done.stdout)
    assert "loaded tiny-random" in done.stderr  # the human-readable lines went to stderr
    if argv[0] == "trace":
        assert payload["metadata"]["prompt"] == "1 1 0" and len(payload["tokens"]) == len(payload["str_tokens"])
        assert len(payload["mean_first_token_attention"]) == 2  # one per layer of tiny-random, under its one name
    else:
        assert [row["id"] for row in payload][::4] == ["a", "b"]
        assert re.search(r"prompts:\s+\d+%", done.stderr), done.stderr[-2000:]  # the bar, on stderr


def test_tasks_writes_the_page_of_figures_the_runner_no_longer_writes(capsys, loads_tiny, tmp_path):
    """The runner (experiments) writes rows, CSV and JSON; the command adds figures.html (views)."""
    out_dir = tmp_path / "run"
    argv = [
        "tasks",
        "--model",
        "tiny-random",
        "--task",
        "copy_last,count_ones",
        "--lengths",
        "2,3",
        "--samples",
        "1",
        "--max-new-tokens",
        "3",
        "--out",
        str(out_dir),
    ]
    code, out, err = _run(capsys, *argv)
    assert code == 0, err
    page = (out_dir / "figures.html").read_text()
    # copy_last draws Fig. 2, count_ones Figs. 3 and 4; Fig. 11 needs a Type 1 or Type 2 prompt
    assert page.count("Plotly.newPlot") == 3 and all(f"Fig. {n}" in page for n in (2, 3, 4)) and "Fig. 11" not in page
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "figures.html",
        "results.csv",
        "results.fingerprint.json",
        "results.json",
        "results.jsonl",
    ]
