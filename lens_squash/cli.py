"""The ``lens-squash`` command line: one sub-command per analysis, registered in :data:`COMMANDS`.

Each sub-command loads the model once, runs the pure analyses, prints a short table and writes its
results atomically (JSON with provenance; HTML figures where the command makes them).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["COMMANDS", "COPY_PROMPT", "build_parser", "copy_prompt", "main"]


def copy_prompt(n_ones: int = 50, last: str = "0") -> str:
    """The paper's copying prompt (Appendix C.1) for ``1 … 1 0`` with ``n_ones`` ones."""
    sequence = " ".join(["1"] * n_ones + [last])
    return (
        f"Consider the following sequence: {sequence}. What is the last digit in this sequence? "
        "Please answer exactly as 'The answer to your question is: <ANSWER>'"
    )


COPY_PROMPT = copy_prompt(50)


def _load(args):
    from .models import load_model

    started = time.perf_counter()
    model = load_model(args.model, dtype=args.dtype, n_ctx=args.n_ctx)
    print(f"loaded {args.model} ({args.dtype}) in {time.perf_counter() - started:.1f} s")
    return model


def _short(token: str, width: int = 12) -> str:
    text = repr(token)[1:-1]
    return text if len(text) <= width else text[: width - 1] + "…"


def print_trace(result) -> None:
    tokens = result.str_tokens
    shown = tokens if len(tokens) <= 40 else tokens[:20] + ("…",) + tokens[-19:]
    print(f"{len(tokens)} tokens: " + "|".join(_short(t) for t in shown))
    print(f"predicted next token: {result.predicted_token!r}")
    mass = result.first_token_mass()
    print(f"{'layer':>5}  {'attn→first':>10}  {'‖x_first‖':>10}  {'‖x_last‖':>10}")
    for layer in range(result.n_layers):
        norms = result.resid_norms[layer]
        print(f"{layer:>5}  {mass[layer]:>10.3f}  {norms[0]:>10.2f}  {norms[-1]:>10.2f}")
    print(f"{'final':>5}  {'':>10}  {result.resid_norms[-1, 0]:>10.2f}  {result.resid_norms[-1, -1]:>10.2f}")


def generate_answer(model, tokens, max_new_tokens: int = 24) -> str:
    """Greedy continuation of ``tokens``, decoded without the prompt and without special tokens."""
    import torch

    with torch.no_grad():
        out = model.generate(
            tokens[None].to(model.cfg.device), max_new_tokens=max_new_tokens, do_sample=False,
            stop_at_eos=True, verbose=False,
        )
    return model.tokenizer.decode(out[0, tokens.shape[0]:], skip_special_tokens=True).strip()


def cmd_trace(args) -> int:
    from .records import write_json_atomic
    from .trace import trace

    model = _load(args)
    result = trace(model, args.prompt, chat=False if args.raw else None)
    print_trace(result)
    if args.generate:
        print(f"generated answer: {generate_answer(model, result.tokens)!r}")
    if args.json:
        write_json_atomic(args.json, _trace_json(result, args))
        print(f"wrote {args.json}")
    return 0


def _trace_json(result, args) -> dict:
    return {
        "metadata": {**result.metadata, "prompt": args.prompt, "raw": args.raw},
        "tokens": result.tokens,
        "str_tokens": list(result.str_tokens),
        "predicted_token": result.predicted_token,
        "first_token_mass": result.first_token_mass(),
        "resid_norms": result.resid_norms,
    }


def cmd_demo(args) -> int:
    """The main job on the offline default model: trace and answer the paper's copying prompt."""
    args.prompt, args.raw, args.generate = COPY_PROMPT, False, True
    args.json = args.json or Path(args.out) / "trace.json"
    print("prompt: " + args.prompt)
    return cmd_trace(args)


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    from .models import DEFAULT_MODEL

    parser.add_argument("--model", default=DEFAULT_MODEL, help="model name (default: the offline SmolLM2)")
    parser.add_argument("--dtype", default="float32", help="float32, float64, bfloat16 or float16")
    parser.add_argument("--n-ctx", type=int, default=2048, help="context length to load the model with")


def _trace_parser(sub) -> None:
    parser = sub.add_parser("trace", help="one hooked forward pass: tokens, prediction, per-layer sinks")
    parser.add_argument("--prompt", required=True, help="the prompt text")
    parser.add_argument("--raw", action="store_true", help="skip the chat template")
    parser.add_argument("--generate", action="store_true", help="also print the greedy answer")
    parser.add_argument("--json", type=Path, help="write the trace summary to this JSON file")
    _add_model_args(parser)


def _demo_parser(sub) -> None:
    parser = sub.add_parser("demo", help="the main job on the offline default model")
    parser.add_argument("--out", default="out/demo", help="folder for the results")
    parser.add_argument("--json", type=Path, default=None)
    _add_model_args(parser)


#: sub-command name -> (parser builder, handler)
COMMANDS: dict[str, tuple[Callable, Callable]] = {
    "trace": (_trace_parser, cmd_trace),
    "demo": (_demo_parser, cmd_demo),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lens-squash", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add_parser, _ in COMMANDS.values():
        add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command][1](args)
    except (ValueError, RuntimeError, MemoryError) as err:
        # Bad input and refused requests: one clear line, no traceback, non-zero exit.
        print(f"lens-squash {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
