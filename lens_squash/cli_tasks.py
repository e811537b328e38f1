"""``lens-squash tasks``: the paper's copying and counting experiments (Appendix C.1, C.5), resumable.

The runner (:func:`lens_squash.experiments.tasks.run_tasks`) writes the rows, the CSV and the JSON;
this command adds the page of figures (``figures.html``), since pages are the views' business.
"""

from __future__ import annotations

from pathlib import Path

from .cli_common import add_model_args, claim_out_folder, load, write_figure_files
from .cli_names import STYLES, TASK_NAMES, TASK_STYLES, canonical_dtype
from .core import validate

__all__ = ["add_parser", "check", "run", "saved", "write_task_figures"]

#: the most prompts one tasks command may ask for (each is a generation of up to --max-new-tokens)
_MAX_TASK_PROMPTS = 100_000


def add_parser(sub) -> None:
    parser = sub.add_parser("tasks", help="the paper's copying and counting experiments (Appendix C.1, C.5)")
    parser.add_argument(
        "--task", default="copy_first,copy_last", help=f"comma-separated tasks, from {', '.join(TASK_NAMES)}"
    )
    parser.add_argument("--lengths", default="5,10,20,40", help="sequence lengths: '5,10,20' or '5:40:5'")
    parser.add_argument("--samples", type=int, default=2, help="samples per task and length")
    parser.add_argument(
        "--styles", dest="styles", default="answer", help=f"comma-separated prompting styles, from {', '.join(STYLES)}"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="prompts generated together (left-padded)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="greedy tokens per answer")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampled sequences (counting tasks)")
    parser.add_argument(
        "--out",
        default="out/tasks",
        help="folder for results (a rerun of the same run resumes from it; another run is refused)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="discard the results already in --out instead of resuming them"
    )
    add_model_args(parser)


def check(args) -> None:
    args.task = validate.parse_names(args.task, TASK_NAMES, "--task", what="task")
    args.styles = validate.parse_names(args.styles, STYLES, "--styles", what="style")
    for task in args.task:
        if not set(args.styles) & set(TASK_STYLES[task]):
            raise ValueError(
                f"--task {task} offers none of --styles {','.join(args.styles)}; it offers "
                f"{','.join(TASK_STYLES[task])} (copying tasks have only 'answer'): add one to --styles"
            )
    args.lengths = validate.parse_int_list(args.lengths, "--lengths", minimum=1, maximum=args.n_ctx)
    validate.check_int(args.samples, "--samples", minimum=1, maximum=_MAX_TASK_PROMPTS)
    n_prompts = len(args.task) * len(args.styles) * len(args.lengths) * args.samples
    if n_prompts > _MAX_TASK_PROMPTS:
        raise ValueError(
            f"--task × --styles × --lengths × --samples asks for {n_prompts} prompts, more than "
            f"{_MAX_TASK_PROMPTS}; run fewer at a time"
        )
    validate.check_int(args.batch_size, "--batch-size", minimum=1, maximum=_MAX_TASK_PROMPTS)
    validate.check_int(
        args.max_new_tokens,
        "--max-new-tokens",
        minimum=1,
        maximum=args.n_ctx - 1,
        hint=f"the prompt and the answer must fit --n-ctx {args.n_ctx}",
    )
    validate.check_int(args.seed, "--seed", minimum=0, maximum=2**63 - 1)
    claim_out_folder(
        args,
        files=("results.jsonl", "results.fingerprint.json", "results.csv", "results.json", "figures.html"),
    )
    _check_folder(args)


def _check_folder(args) -> None:
    """Refuse to resume a folder made by another run before loading the model: the fields known
    without it (the --model asked for, dtype, generation, versions); weights are checked after load."""
    from .experiments.task_eval import generation_fingerprint
    from .experiments.tasks import check_run_folder

    if args.overwrite:
        return
    partial = generation_fingerprint(
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, chat=None, seed=args.seed
    )
    partial["model"] = {"dtype": canonical_dtype(args.dtype)}
    check_run_folder(Path(args.out) / "results.jsonl", partial, partial=True, loaded_as=args.model)


def run(args) -> int:
    import pandas as pd

    from .experiments.task_results import summarize_results
    from .experiments.tasks import run_tasks

    model = load(args)
    results = run_tasks(
        model,
        args.task,
        args.lengths,
        args.samples,
        args.styles,
        args.out,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        overwrite=args.overwrite,
        loaded_as=args.model,
    )
    with pd.option_context("display.float_format", "{:.3g}".format, "display.width", 160):
        print(summarize_results(results).to_string(index=False))
    write_task_figures(results, Path(args.out) / "figures.html", metadata=results.provenance)
    print(f"wrote {Path(args.out) / 'results.csv'}, results.json and figures.html")
    write_figure_files(args, results.figures(), args.out)
    return 0


def write_task_figures(results, path, *, metadata: dict | None = None) -> Path:
    """One self-contained HTML page with the summary table and every figure the results can show."""
    from .core.records import write_text_atomic
    from .experiments.task_results import TASK_FIGURES, summarize_results
    from .views.report import ReportSection, build_report

    sections = [ReportSection("summary", table=summarize_results(results))]
    for kind, fig in results.figures().items():
        sections.append(ReportSection(f"{kind} ({TASK_FIGURES[kind].paper_figure})", figures=[fig]))
    page = build_report(sections, title="lens_squash copying and counting tasks", metadata=metadata)
    return write_text_atomic(path, page)


def saved(args) -> str:
    """What an interrupted run leaves: the rows saved so far, resumed by the same command."""
    path = Path(args.out) / "results.jsonl"
    from .core.jsonl import count_rows

    n_rows = count_rows(path)  # rows end at "\n" alone: a prompt holding U+2028 is one row, not two
    if not n_rows:
        return "no rows were saved yet; run the same command again to start over"
    return f"{n_rows} rows are saved in {path}; run the same command again to resume from them"
