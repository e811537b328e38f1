"""``lens-squash trace``: one hooked forward pass; the tokens, the prediction and per-layer sinks."""

from __future__ import annotations

import contextlib
import json
import sys

from .cli_common import ANSWER_TOKENS, add_model_args, check_prompt_flags, check_room, load
from .core import validate

__all__ = ["add_parser", "check", "print_trace", "run"]


def add_parser(sub) -> None:
    parser = sub.add_parser("trace", help="one hooked forward pass: tokens, prediction, per-layer sinks")
    parser.add_argument("--prompt", required=True, help="the prompt text")
    parser.add_argument("--raw", action="store_true", help="skip the chat template")
    parser.add_argument("--generate", action="store_true", help="also print the greedy answer")
    parser.add_argument(
        "--json",
        help="write the trace summary to this JSON file ('-': standard output, and the table goes to standard error)",
    )
    add_model_args(parser)


def check(args) -> None:
    check_prompt_flags(args)
    if args.figures is not None:
        raise ValueError("--figures: trace draws no figures; use analyze or sinks for a report with figures")
    if args.json is not None and args.json != "-":
        validate.check_out_file(args.json, "--json")


def _short(token: str, width: int = 12) -> str:
    text = repr(token)[1:-1]
    return text if len(text) <= width else text[: width - 1] + "…"


def print_trace(result) -> None:
    tokens = result.str_tokens
    shown = tokens if len(tokens) <= 40 else tokens[:20] + ("…",) + tokens[-19:]
    print(f"{len(tokens)} tokens: " + "|".join(_short(t) for t in shown))
    print(f"predicted next token: {result.predicted_token!r}")
    mass = result.mean_first_token_attention()
    print(f"{'layer':>5}  {'attn→first':>10}  {'‖x_first‖':>10}  {'‖x_last‖':>10}")
    for layer in range(result.n_layers):
        norms = result.resid_norms[layer]
        print(f"{layer:>5}  {mass[layer]:>10.3f}  {norms[0]:>10.2f}  {norms[-1]:>10.2f}")
    print(f"{'final':>5}  {'':>10}  {result.resid_norms[-1, 0]:>10.2f}  {result.resid_norms[-1, -1]:>10.2f}")


def run(args) -> int:
    to_stdout = args.json == "-"
    # with --json -, standard output carries the JSON alone: every other line goes to standard error
    with contextlib.redirect_stdout(sys.stderr) if to_stdout else contextlib.nullcontext():
        result = _trace(args)
    if to_stdout:
        from .core.records import to_jsonable

        json.dump(to_jsonable(_trace_json(result, args)), sys.stdout, allow_nan=False)
        print()
    elif args.json:
        from .core.records import write_json_atomic

        write_json_atomic(args.json, _trace_json(result, args))
        print(f"wrote {args.json}")
    return 0


def _trace(args):
    from .edge.generation import generate_answer
    from .edge.trace import as_tokens, trace

    model = load(args)
    chat = False if args.raw else None
    tokens = as_tokens(model, args.prompt, chat=chat)  # refuses an over-long prompt before the pass
    if args.generate:
        check_room(model, len(tokens), ANSWER_TOKENS, "--generate")
    result = trace(model, args.prompt, chat=chat)
    print_trace(result)
    if args.generate:
        print(f"generated answer: {generate_answer(model, result.tokens, ANSWER_TOKENS)!r}")
    return result


def _trace_json(result, args) -> dict:
    return {
        "metadata": {**result.provenance, "prompt": args.prompt, "raw": args.raw},
        "tokens": result.tokens,
        "str_tokens": list(result.str_tokens),
        "predicted_token": result.predicted_token,
        "mean_first_token_attention": result.mean_first_token_attention(),
        "resid_norms": result.resid_norms,
    }
