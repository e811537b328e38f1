"""``lens-squash demo``: the main job on the offline default model, the paper's copying prompt analysed
end to end (bounds vs the sketched or exact Jacobian, spectral, sinks), its answer, and a collapse
summary."""

from __future__ import annotations

from pathlib import Path

from .cli_analyze import report_analysis
from .cli_collapse import check_collapse_fits, print_collapse
from .cli_common import ANSWER_TOKENS, add_model_args, check_room, claim_out_folder, load
from .core import validate

__all__ = ["add_parser", "check", "run"]

#: the demo's collapse summary: family (a), these lengths, these dtypes
_DEMO_COLLAPSE = ("count_ones", tuple(range(8, 129, 8)), ("float32", "bfloat16"))


def add_parser(sub) -> None:
    parser = sub.add_parser("demo", help="the main job on the offline default model")
    parser.add_argument("--ones", type=int, default=12, help="ones before the final 0 in the copying prompt")
    parser.add_argument(
        "--jacobian",
        choices=["exact", "sketch"],
        default="sketch",
        help="sketch: 64 random probes (Frobenius norms, ~10 s on 2 idle cores); exact: "
        "all 576 VJPs (spectral norms too, ~80 s)",
    )
    parser.add_argument("--out", default="out/demo", help="folder for the results")
    add_model_args(parser)


def check(args) -> None:
    validate.check_int(
        args.ones,
        "--ones",
        minimum=0,
        maximum=args.n_ctx,
        hint=f"the copying prompt holds that many ones, and must fit --n-ctx {args.n_ctx}",
    )
    claim_out_folder(args, files=("results.json", "report.html"))  # one writer per folder


def run(args) -> int:
    from .core.records import write_json_atomic
    from .edge.generation import generate_answer
    from .edge.prompts import as_tokens
    from .experiments.analysis import analyze
    from .experiments.collapse import collapse_curve
    from .experiments.task_prompts import copy_prompt

    model = load(args)
    prompt = copy_prompt(args.ones)
    check_room(model, len(as_tokens(model, prompt)), ANSWER_TOKENS, "--ones")  # before printing it
    family, lengths, dtypes = _DEMO_COLLAPSE
    check_collapse_fits(model, family, lengths, open_ended=True, flag="the demo's collapse summary")
    print("prompt: " + prompt)
    analysis = analyze(model, prompt, jacobian_mode=args.jacobian, n_probes=64)
    out = Path(args.out)
    report_analysis(
        args,
        analysis,
        prompt,
        out / "analyze",
        title="lens_squash demo: the copying prompt",
        answer=generate_answer(model, analysis.trace.tokens, ANSWER_TOKENS),
        command="demo",
    )
    # the demo's summary shares passes (one per dtype, plus a few separate ones for the noise floor it
    # prints); `lens-squash collapse` runs every prompt alone for bit-exact thresholds
    collapse = collapse_curve(model, family, list(lengths), dtypes, open_ended=True, exact=False)
    print(
        "representational collapse, family (a) counting ones vs one more one "
        "(relative ‖y − y*‖∞ of the final representation):"
    )
    print_collapse(collapse)
    write_json_atomic(out / "collapse.json", collapse.to_dict())
    print(f"wrote {out / 'collapse.json'}")
    return 0
