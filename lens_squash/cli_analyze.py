"""``lens-squash analyze``: path-sum bounds against the true Jacobian, spectral and sink analysis."""

from __future__ import annotations

from .cli_common import (
    add_model_args,
    add_prompt_args,
    check_prompt_flags,
    check_two_tokens,
    claim_out_folder,
    load,
    write_report,
)
from .cli_names import DEFAULT_VARIANTS, VARIANT_NAMES
from .core import validate

__all__ = ["add_parser", "check", "print_analysis", "report_analysis", "run"]


def add_parser(sub) -> None:
    parser = sub.add_parser("analyze", help="path-sum bounds vs the exact Jacobian, spectral and sink analysis")
    add_prompt_args(parser)
    parser.add_argument(
        "--variants",
        default=None,
        help=f"comma-separated path-sum variants, from {', '.join(VARIANT_NAMES)} (default: "
        f"{','.join(DEFAULT_VARIANTS)}, skipping those the model cannot support)",
    )
    parser.add_argument(
        "--jacobian",
        choices=["exact", "sketch", "none"],
        default="sketch",
        help="how to compute the true sensitivities (default sketch: random probes, as demo and suite; "
        "exact: the full Jacobian, minutes on SmolLM2)",
    )
    parser.add_argument("--probes", type=int, default=64, help="probes for --jacobian sketch")
    parser.add_argument("--out", default="out/analyze", help="folder for results.json and report.html")
    parser.add_argument(
        "--mixing-position",
        type=int,
        default=None,
        metavar="K",
        help="also measure over-mixing: replace token K and follow the change through every layer with and "
        "without the attention sink (a report section, as `lens-squash mixing`)",
    )
    add_model_args(parser)


def check(args) -> None:
    check_prompt_flags(args)
    if args.variants is not None:
        args.variants = validate.parse_names(args.variants, VARIANT_NAMES, "--variants", what="variant")
    validate.check_int(args.probes, "--probes", minimum=1, maximum=65_536)
    if args.mixing_position is not None:
        validate.check_int(args.mixing_position, "--mixing-position", minimum=1, hint="a token after the first")
    claim_out_folder(args, files=("results.json", "report.html"))


def check_probes(model, args) -> None:
    """The sketch's probes are orthonormal: at most d_model of them (checked once the model is loaded)."""
    if args.jacobian == "sketch" and args.probes > model.cfg.d_model:
        raise ValueError(
            f"--probes {args.probes} is more than this model's d_model={model.cfg.d_model}: the "
            f"probes are orthonormal; pass --probes 1 … {model.cfg.d_model}, or --jacobian exact"
        )


def run(args) -> int:
    from .experiments.analysis import analyze

    model = load(args)
    check_two_tokens(model, args.prompt, chat=False if args.raw else None)
    check_probes(model, args)
    chat = False if args.raw else None
    if args.mixing_position is not None:
        check_mixing_position(model, args.prompt, args.mixing_position, chat)
    mode = None if args.jacobian == "none" else args.jacobian
    analysis = analyze(
        model,
        args.prompt,
        variants=args.variants,
        jacobian_mode=mode,
        n_probes=args.probes,
        chat=False if args.raw else None,
    )
    report_analysis(
        args,
        analysis,
        args.prompt,
        args.out,
        title="lens_squash: over-squashing analysis",
        command="analyze",
        variants=list(analysis.bounds),
        jacobian=args.jacobian,
        mixing=None if args.mixing_position is None else _mixing(model, args.prompt, args.mixing_position, chat),
    )
    return 0


def check_mixing_position(model, prompt: str, position: int, chat) -> None:
    """``--mixing-position`` against the tokenized prompt and the backend, before the first analysis."""
    from .edge.prompts import as_tokens

    n = int(as_tokens(model, prompt, chat=chat).shape[0])
    validate.check_int(position, "--mixing-position", minimum=1, maximum=n - 2, hint=f"the prompt has {n} tokens")


def _mixing(model, prompt: str, position: int, chat):
    """The over-mixing result of ``--mixing-position`` (Jacobian norms estimated from 16 tangents)."""
    from .experiments.mixing import mixing

    return mixing(model, prompt, position, chat=chat, jacobian_probes=16)


def report_analysis(
    args, analysis, prompt: str, out, *, title: str, answer: str | None = None, mixing=None, **metadata
) -> None:
    """Print ``analyze``'s result (and the greedy ``answer``), then write results.json and report.html;
    a ``mixing`` result (``--mixing-position``) adds its report section and a key in results.json."""
    from .views.mixing_figures import mixing_section
    from .views.report import analysis_sections

    print(f"verdict: {analysis.verdict}")
    print(f"{analysis.trace.n_tokens} tokens; predicted next token {analysis.trace.predicted_token!r}")
    if answer is not None:
        print(f"greedy answer: {answer!r}")
    print_analysis(analysis)
    metadata = {**analysis.provenance, "prompt": prompt, **metadata}
    sections = analysis_sections(analysis, prompt=prompt)
    payload = {**analysis.to_dict(heavy=False), "metadata": metadata}
    if mixing is not None:
        sections = [*sections, mixing_section(mixing)]
        payload["mixing"] = mixing.to_dict(heavy=False)
    write_report(
        args,
        out,
        sections,
        payload,
        title=title,
        metadata=metadata,
    )


def print_analysis(analysis) -> None:
    """The summary table of ``analyze``: one row per variant, then the spectral and sink figures."""
    import pandas as pd

    table = analysis.summary()
    with pd.option_context("display.float_format", "{:.4g}".format, "display.width", 160):
        print(table.to_string(index=False, na_rep="-"))
    best = analysis.best_variant
    if best is not None:
        paper = analysis.comparisons.get("paper")
        paper_text = f"; paper: Spearman {paper.spearman:.3f}" if paper is not None else ""
        print(f"best-ranking variant: {best} (Spearman {analysis.comparisons[best].spearman:.3f}{paper_text})")
    for name, reason in analysis.skipped.items():
        print(f"skipped {name}: {reason}")
    spectral = analysis.spectral
    if spectral is not None:
        print(
            f"rollout stack: last token's mass on the first token after all layers "
            f"{float(spectral.rollout_mass[-1]):.4f}; cumulative Dobrushin "
            f"{float(spectral.cumulative_dobrushin[-1]):.3g}; depth to see only the first token "
            f"{'≈ ' if spectral.extrapolated else ''}{spectral.depth_to_first_token:.0f}"
            f"{' (extrapolated)' if spectral.extrapolated else ''}"
        )
    print("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in analysis.seconds.items()))
