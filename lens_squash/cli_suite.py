"""``lens-squash suite --prompts FILE.jsonl``: ``analyze`` on every prompt of a file, one table, resumable.

The file's schema is :mod:`lens_squash.experiments.prompt_file`'s (one ``{"id": …, "prompt": …}``
object per line, optional ``"chat"``); every line is checked, and the output folder's fingerprint
compared, before the model loads. What is written: :mod:`lens_squash.experiments.prompt_runs`.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

from .cli_analyze import check_probes
from .cli_common import add_model_args, claim_out_folder, load
from .cli_names import VARIANT_NAMES, canonical_dtype
from .core import validate

__all__ = ["add_parser", "check", "run", "saved"]


def add_parser(sub) -> None:
    parser = sub.add_parser("suite", help="analyze every prompt of a JSONL file into one table (resumable)")
    parser.add_argument(
        "--prompts",
        required=True,
        help='JSONL file, one object per line: {"id": "p1", "prompt": "text"} '
        '(optional "chat": true/false; ids unique)',
    )
    parser.add_argument(
        "--variants",
        default=None,
        help=f"comma-separated path-sum variants, from {', '.join(VARIANT_NAMES)} (default: "
        "analyze's defaults, skipping those the model cannot support)",
    )
    parser.add_argument(
        "--jacobian",
        choices=["exact", "sketch", "none"],
        default="sketch",
        help="how to compute the true sensitivities (sketch: random probes, much faster)",
    )
    parser.add_argument("--probes", type=int, default=64, help="probes for --jacobian sketch")
    parser.add_argument(
        "--out",
        default="out/suite",
        help="folder for the table and per-prompt results (a rerun of the same run resumes "
        "from it; another run is refused)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="discard the results already in --out instead of resuming them"
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the table as JSON on standard output (everything else goes to standard error)",
    )
    add_model_args(parser)


def _settings(args) -> dict:
    return {
        "variants": args.variants,
        "jacobian_mode": None if args.jacobian == "none" else args.jacobian,
        "n_probes": args.probes,
    }


def check(args) -> None:
    from .experiments.prompt_file import read_prompt_file

    if args.figures is not None:
        raise ValueError(
            "--figures: suite writes report.html but no figure files; run analyze on one prompt for its figures"
        )
    if args.variants is not None:
        args.variants = validate.parse_names(args.variants, VARIANT_NAMES, "--variants", what="variant")
    validate.check_int(args.probes, "--probes", minimum=1, maximum=65_536)
    args.prompt_list = read_prompt_file(args.prompts, "--prompts")  # every line, before the model loads
    claim_out_folder(args, files=written_files(args.prompt_list), folders=("analyses",))
    if not args.overwrite:
        _check_folder(args)


def written_files(prompts) -> tuple[str, ...]:
    """Every file a suite run writes under ``--out`` (each prompt's analysis file included)."""
    from .experiments.prompt_runs import analysis_file, prompt_rows_path

    rows = prompt_rows_path(".")
    return (rows.name, f"{rows.stem}.fingerprint.json", "table.csv", "table.json",
            *(analysis_file(p.id) for p in prompts))  # fmt: skip


def _check_folder(args) -> None:
    """Refuse to resume a folder made by another run before loading the model (the model name asked
    for, dtype, settings, versions); the weights are compared after the load."""
    from .experiments.prompt_runs import check_prompt_folder, settings_fingerprint

    partial = settings_fingerprint(**_settings(args))
    partial["model"] = {"dtype": canonical_dtype(args.dtype)}
    check_prompt_folder(args.out, args.prompt_list, partial, partial=True, loaded_as=args.model)


def _check_prompts_fit(model, args) -> None:
    """Every prompt must have 2+ tokens and fit the loaded context: checked before the first analysis."""
    from .edge.prompts import as_tokens

    for prompt in args.prompt_list:
        try:
            n_tokens = len(as_tokens(model, prompt.prompt, chat=prompt.chat))
        except ValueError as err:
            raise ValueError(f"--prompts line {prompt.line} (id {prompt.id!r}): {err}") from None
        if n_tokens < 2:
            raise ValueError(
                f"--prompts line {prompt.line} (id {prompt.id!r}) is {n_tokens} token; the analysis "
                "compares the first token with later ones, so it needs at least 2"
            )


def run(args) -> int:
    # with --json, standard output carries the JSON alone: every other line goes to standard error
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        table = _run(args)
    if args.json:
        from .core.records import to_jsonable

        rows = table.astype(object).where(table.notna(), None).to_dict("records")
        json.dump(to_jsonable(rows), sys.stdout, allow_nan=False)
        print()
    return 0


def _run(args):
    import pandas as pd

    from .experiments.prompt_runs import run_prompt_file

    model = load(args)
    _check_prompts_fit(model, args)
    check_probes(model, args)
    table = run_prompt_file(
        model, args.prompt_list, args.out, overwrite=args.overwrite, loaded_as=args.model, **_settings(args)
    )
    shown = [c for c in ("id", "variant", "spearman", "kendall", "top1_agree") if c in table.columns]
    with pd.option_context("display.float_format", "{:.4g}".format, "display.width", 160):
        print(table[shown].to_string(index=False))
    report = _report(args, table)
    print(f"wrote {Path(args.out) / 'table.csv'}, table.json, prompts.jsonl, analyses/ and {report}")
    return table


def _report(args, table) -> Path:
    """report.html: per-variant Spearman across prompts, prompts best to worst, each linking its analysis."""
    from .experiments.prompt_runs import ROW_KEY, prompt_rows_path
    from .experiments.runs import read_jsonl
    from .views.pages import write_suite_report

    rows = read_jsonl(prompt_rows_path(args.out), ROW_KEY, repair=False)
    ordered = [rows[(ident,)] for ident in dict.fromkeys(table["id"])]
    return write_suite_report(args.out, table, ordered)


def saved(args) -> str:
    """What an interrupted run leaves: the prompts finished so far, resumed by the same command."""
    path = Path(args.out) / "prompts.jsonl"
    from .core.jsonl import count_rows

    n_rows = count_rows(path)  # rows end at "\n" alone: a prompt holding U+2028 is one row, not two
    if not n_rows:
        return "no prompt was finished yet; run the same command again to start over"
    return f"{n_rows} prompts are saved in {path}; run the same command again to resume from them"
