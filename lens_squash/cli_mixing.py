"""``lens-squash mixing``: replace one token and follow the change through every layer and position,
with the attention sink and with it removed (Barbero et al. 2025, over-mixing)."""

from __future__ import annotations

import contextlib
import json
import sys

from .cli_common import add_model_args, add_prompt_args, check_prompt_flags, check_two_tokens, load, write_report
from .cli_names import MIXING_REMOVALS
from .core import validate

__all__ = ["add_parser", "check", "print_mixing", "run"]


def add_parser(sub) -> None:
    parser = sub.add_parser("mixing", help="over-mixing: how far one replaced token spreads, with and without the sink")
    add_prompt_args(parser)
    parser.add_argument("--position", type=int, default=None, help="the token to replace (default: the middle one)")
    parser.add_argument(
        "--replacement",
        default="random",
        help="'random' (--samples seeded draws), a token id, or text of one token",
    )
    parser.add_argument("--samples", type=int, default=4, help="random replacements averaged over")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random replacements and Jacobian probes")
    parser.add_argument("--threshold", type=float, default=0.1, help="a position counts as changed above this")
    parser.add_argument(
        "--removals", default=",".join(MIXING_REMOVALS), help="sink removals: no_bos, mask, clamp (comma-separated)"
    )
    parser.add_argument(
        "--clamp-layer", type=int, default=None, help="clamp after this block (default: where it forms)"
    )
    parser.add_argument("--probes", type=int, default=16, help="Gaussian probes of the Jacobian norm (0: exact)")
    parser.add_argument("--no-jacobian", action="store_true", help="skip the Jacobian norms")
    parser.add_argument("--out", default="out/mixing", help="folder for results.json and report.html")
    parser.add_argument(
        "--json", action="store_true", help="print the per-layer table as JSON on standard output (the rest: stderr)"
    )
    add_model_args(parser)


def check(args) -> None:
    check_prompt_flags(args)
    if args.position is not None:  # its upper end needs the tokens: checked after loading
        validate.check_int(args.position, "--position", minimum=1, hint="a token after the first")
    replacement = args.replacement
    if replacement != "random" and replacement.strip().lstrip("-").isdigit():
        args.replacement = validate.check_int(int(replacement), "--replacement", minimum=0)
    elif not replacement:
        raise ValueError("--replacement is empty; pass 'random', a token id or text of one token")
    validate.check_int(args.samples, "--samples", minimum=1, maximum=256)
    validate.check_int(args.seed, "--seed", minimum=0)
    validate.check_float(args.threshold, "--threshold", low=0.0, high=float("inf"), low_open=True, high_open=True)
    args.removals = validate.parse_names(args.removals, MIXING_REMOVALS, "--removals", what="sink removal")
    if args.clamp_layer is not None:
        validate.check_int(args.clamp_layer, "--clamp-layer", minimum=0, hint="a block index counted from 0")
    validate.check_int(args.probes, "--probes", minimum=0, maximum=4096)
    validate.check_out_dir(args.out, "--out")


def print_mixing(result) -> None:
    settings = result.settings
    print(
        f"replaced position {result.position} ({result.str_tokens[result.position]!r}) by {len(result.replacements)} token(s)"
    )
    header = f"{'layer':>5}" + "".join(f" {s + ' >thr':>12} {s + ' mean':>12}" for s in settings)
    print(header + "".join(f" {'ratio ' + s:>12}" for s in settings if s != "sink"))
    for layer in range(result.n_layers + 1):
        cells = "".join(
            f" {int(result.spread(s)[layer]):>12d} {float(result.mean_change(s)[layer]):>12.4f}" for s in settings
        )
        ratios = "".join(f" {float(result.ratio(s)[layer]):>12.3f}" for s in settings if s != "sink")
        print(f"{layer:>5}{cells}{ratios}")
    for setting in settings[1:]:
        print(f"without the sink ({setting}) / with it, over depth: {result.mean_ratio(setting):.3f}")
    for setting, why in result.skipped.items():
        print(f"skipped {setting}: {why}")
    print(f"sink attention vs head spread over heads: Spearman {result.head_correlation:+.3f}")


def run(args) -> int:
    to_stdout = args.json
    with contextlib.redirect_stdout(sys.stderr) if to_stdout else contextlib.nullcontext():
        result = _mixing(args)
    if to_stdout:
        from .core.records import to_jsonable

        json.dump(to_jsonable(result.to_frame().to_dict(orient="records")), sys.stdout, allow_nan=False)
        print()
    return 0


def _mixing(args):
    from .core.records import provenance
    from .edge.prompts import as_tokens
    from .experiments.mixing import mixing
    from .views.mixing_figures import mixing_section
    from .views.report import model_section

    model = load(args)
    chat = False if args.raw else None
    check_two_tokens(model, args.prompt, chat=chat)
    n = len(as_tokens(model, args.prompt, chat=chat))
    position = n // 2 if args.position is None else args.position
    if not 1 <= position <= n - 2:
        raise ValueError(
            f"--position {position}: the prompt has {n} tokens, so pass 1 … {n - 2} (a later token must exist)"
        )
    if args.clamp_layer is not None and args.clamp_layer >= model.cfg.n_layers:
        raise ValueError(
            f"--clamp-layer {args.clamp_layer}: this model has {model.cfg.n_layers} blocks (0 … {model.cfg.n_layers - 1})"
        )
    result = mixing(
        model,
        args.prompt,
        position,
        chat=chat,
        replacement=args.replacement,
        n_samples=args.samples,
        seed=args.seed,
        threshold=args.threshold,
        removals=args.removals,
        clamp_layer=args.clamp_layer,
        jacobian=not args.no_jacobian,
        jacobian_probes=args.probes or None,
    )
    print_mixing(result)
    metadata = {**provenance(model), "command": "mixing", "prompt": args.prompt, "position": position}
    write_report(
        args,
        args.out,
        [model_section(provenance(model)), mixing_section(result)],
        {"mixing": result.to_dict(heavy=False)},
        metadata=metadata,
        title="lens_squash: over-mixing with and without the attention sink",
    )
    return result
