"""``lens-squash collapse``: representational collapse against length, per dtype (paper §4)."""

from __future__ import annotations

from .cli_common import add_model_args, claim_out_folder, load, write_report
from .cli_names import COLLAPSE_FAMILIES, canonical_dtype
from .core import validate

__all__ = ["add_parser", "check", "check_collapse_fits", "print_collapse", "run"]


def add_parser(sub) -> None:
    parser = sub.add_parser("collapse", help="representational collapse against length, per dtype (paper §4)")
    parser.add_argument("--family", default="count_ones", help=f"prompt family, from {', '.join(COLLAPSE_FAMILIES)}")
    parser.add_argument("--lengths", default="4:128:4", help="sequence lengths: '5,10,20' or '4:128:4'")
    parser.add_argument("--dtypes", default="float32,bfloat16,float16", help="comma-separated dtypes")
    parser.add_argument(
        "--open-ended",
        action="store_true",
        help="stop the prompt right after the sequence (prefix-closed: one pass per dtype)",
    )
    parser.add_argument("--native", action="store_true", help="difference representations in the dtype itself")
    parser.add_argument("--window", type=int, default=None, help="restrict attention to a local window")
    parser.add_argument(
        "--fast",
        action="store_true",
        help="share forward passes (prefix trick, padded batches) instead of one unpadded pass "
        "per prompt; faster, but not bit-identical: the table then reports the measured "
        "noise floor and which path each threshold came from",
    )
    parser.add_argument("--no-theory", action="store_true", help="skip the toy-model and softmax panels")
    parser.add_argument("--out", default="out/collapse", help="folder for results.json and report.html")
    add_model_args(parser)


def check(args) -> None:
    validate.check_names([args.family], COLLAPSE_FAMILIES, "--family", what="family")
    args.lengths = validate.parse_int_list(args.lengths, "--lengths", minimum=1, maximum=args.n_ctx)
    names = [part.strip() for part in args.dtypes.split(",") if part.strip()]
    if not names:
        raise ValueError("--dtypes is empty; pass e.g. --dtypes float32,bfloat16")
    try:
        resolved = [canonical_dtype(name) for name in names]
    except ValueError as err:
        raise ValueError(f"--dtypes: {err}") from err
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"--dtypes names a dtype twice ({args.dtypes!r}); list each once")
    args.dtypes = resolved
    if args.window is not None:
        validate.check_int(
            args.window,
            "--window",
            minimum=1,
            maximum=args.n_ctx,
            hint="the number of keys each query sees, itself included",
        )
    claim_out_folder(args, files=("results.json", "report.html"))  # one writer per folder


def check_collapse_fits(model, family: str, lengths, *, open_ended: bool, flag: str) -> None:
    """The longest collapse prompt (``s*``, one token longer than ``s``) must fit the loaded context."""
    from .experiments.collapse import family_pairs

    _, s_star, _ = family_pairs(model, family, [max(lengths)], open_ended=open_ended)
    if len(s_star[0]) > model.cfg.n_ctx:
        raise ValueError(
            f"{flag}: the longest prompt has {len(s_star[0])} tokens, beyond the loaded context "
            f"n_ctx={model.cfg.n_ctx}; pass a larger --n-ctx or shorter --lengths"
        )


def print_collapse(result) -> None:
    from .experiments.collapse import format_summary

    print(format_summary(result))


def run(args) -> int:
    from .core.records import provenance
    from .experiments.collapse import collapse_curve
    from .views.report import ReportSection, collapse_section, model_section

    model = load(args)
    check_collapse_fits(model, args.family, args.lengths, open_ended=args.open_ended, flag="--lengths")
    result = collapse_curve(
        model,
        args.family,
        args.lengths,
        args.dtypes,
        open_ended=args.open_ended,
        native=args.native,
        window=args.window,
        exact=not args.fast,
    )
    print(f"family {args.family}: relative ‖y − y*‖∞ of the last token's final representation")
    print_collapse(result)
    sections = [model_section(provenance(model)), collapse_section(result)]
    payload = {"collapse": result.to_dict()}
    if not args.no_theory:
        from .algebra.softmax_theory import tv_decay_experiment
        from .experiments.synthetic import pe_collapse

        pe = pe_collapse([2, 4, 8, 16, 32, 64, 128], seeds=3)
        tv = tv_decay_experiment(n_max=2000, seeds=5)
        sections.append(ReportSection("synthetic positional encodings", figures=[pe.plot()], table=pe.summary()))
        sections.append(ReportSection("softmax total variation (Lemma B.2)", figures=[tv.plot()]))
        payload |= {"synthetic": pe.to_dict(), "tv_decay": tv.to_dict()}
    metadata = {
        **provenance(model),
        "command": "collapse",
        "family": args.family,
        "lengths": list(args.lengths),
        "dtypes": list(args.dtypes),
        "window": args.window,
        "open_ended": args.open_ended,
    }
    write_report(
        args,
        args.out,
        sections,
        payload,
        metadata=metadata,
        title=f"lens_squash: representational collapse ({args.family})",
    )
    return 0
