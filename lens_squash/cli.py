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


def copy_prompt(n_ones: int = 12) -> str:
    """The paper's copying prompt (Appendix C.1, verbatim) for ``1 … 1 0`` with ``n_ones`` ones."""
    from .tasks import make_instance

    return make_instance("copy_last", n_ones + 1).prompt


COPY_PROMPT = copy_prompt(12)


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
    from .tasks import greedy_generate

    new_ids = greedy_generate(model, [tokens], max_new_tokens=max_new_tokens)[0]
    return model.tokenizer.decode(new_ids, skip_special_tokens=True).strip()


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
    """The main job on the offline default model: the paper's copying prompt analysed end to end
    (bounds vs the sketched or exact Jacobian, spectral, sinks), the answer, and a collapse summary."""
    from .analysis import analyze

    model = _load(args)
    prompt = copy_prompt(args.ones)
    print("prompt: " + prompt)
    analysis = analyze(model, prompt, jacobian_mode=args.jacobian, n_probes=64)
    out = Path(args.out)
    report_analysis(analysis, prompt, out / "analyze", title="lens_squash demo: the copying prompt",
                    answer=generate_answer(model, analysis.trace.tokens), command="demo")
    from .collapse import collapse_curve
    from .records import write_json_atomic

    collapse = collapse_curve(model, "count_ones", list(range(8, 129, 8)), ("float32", "bfloat16"),
                              open_ended=True)
    print("representational collapse, family (a) counting ones vs one more one "
          "(relative ‖y − y*‖∞ of the final representation):")
    print_collapse(collapse)
    write_json_atomic(out / "collapse.json", collapse.to_dict())
    print(f"wrote {out / 'collapse.json'}")
    return 0


def report_analysis(analysis, prompt: str, out, *, title: str, answer: str | None = None, **metadata) -> None:
    """Print ``analyze``'s result (and the greedy ``answer``), then write results.json and report.html."""
    from .report import analysis_sections, write_report

    print(f"{analysis.trace.n_tokens} tokens; predicted next token {analysis.trace.predicted_token!r}")
    if answer is not None:
        print(f"greedy answer: {answer!r}")
    print_analysis(analysis)
    metadata = {**analysis.trace.metadata, "prompt": prompt, **metadata}
    html_path, json_path = write_report(out, analysis_sections(analysis, prompt=prompt),
                                        {**analysis.to_dict(), "metadata": metadata}, title=title, metadata=metadata)
    print(f"wrote {json_path} and {html_path}")


def print_analysis(analysis) -> None:
    """The summary table of ``analyze``: one row per variant, then the spectral and sink figures."""
    import pandas as pd

    table = analysis.summary()
    with pd.option_context("display.float_format", "{:.4g}".format, "display.width", 160):
        print(table.to_string(index=False))
    best = analysis.best_variant
    if best is not None:
        paper = analysis.comparisons.get("paper")
        paper_text = f"; paper: Spearman {paper.spearman:.3f}" if paper is not None else ""
        print(f"best-ranking variant: {best} (Spearman {analysis.comparisons[best].spearman:.3f}{paper_text})")
    spectral = analysis.spectral
    print(
        f"rollout stack: last token's mass on the first token after all layers "
        f"{float(spectral.first_token_mass[-1]):.4f}; cumulative Dobrushin "
        f"{float(spectral.cumulative_dobrushin[-1]):.3g}; depth to see only the first token "
        f"{'≈ ' if spectral.extrapolated else ''}{spectral.depth_to_first_token:.0f}"
        f"{' (extrapolated)' if spectral.extrapolated else ''}"
    )
    print("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in analysis.seconds.items()))


def cmd_analyze(args) -> int:
    from .analysis import analyze

    if not args.prompt.strip():
        raise ValueError("the prompt is empty; pass the text to analyse with --prompt TEXT")
    model = _load(args)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    mode = None if args.jacobian == "none" else args.jacobian
    analysis = analyze(model, args.prompt, variants=variants, jacobian_mode=mode, n_probes=args.probes,
                       chat=False if args.raw else None)
    report_analysis(analysis, args.prompt, args.out, title="lens_squash: over-squashing analysis",
                    command="analyze", variants=variants, jacobian=args.jacobian)
    return 0


def _analyze_parser(sub) -> None:
    from .analysis import DEFAULT_VARIANTS
    from .variants import VARIANTS

    parser = sub.add_parser("analyze", help="path-sum bounds vs the exact Jacobian, spectral and sink analysis")
    _add_prompt_args(parser)
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma-separated path-sum variants, from {', '.join(VARIANTS)}")
    parser.add_argument("--jacobian", choices=["exact", "sketch", "none"], default="exact",
                        help="how to compute the true sensitivities (sketch: random probes, much faster)")
    parser.add_argument("--probes", type=int, default=64, help="probes for --jacobian sketch")
    parser.add_argument("--out", default="out/analyze", help="folder for results.json and report.html")
    _add_model_args(parser)


def _ints(text: str) -> list[int]:
    """``"5,10,20"`` or ``"5:40:5"`` (start:stop:step, stop included) as a list of ints."""
    try:
        if ":" in text:
            start, stop, step = (int(v) for v in text.split(":"))
            return list(range(start, stop + 1, step))
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise ValueError(f"lengths must look like '5,10,20' or '5:40:5', got {text!r}") from err


def cmd_tasks(args) -> int:
    import pandas as pd

    from .tasks import run_tasks, summarize_results

    model = _load(args)
    results = run_tasks(
        model, args.task.split(","), _ints(args.lengths), args.samples, args.modes.split(","), args.out,
        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, seed=args.seed,
    )
    with pd.option_context("display.float_format", "{:.3g}".format, "display.width", 160):
        print(summarize_results(results).to_string(index=False))
    print(f"wrote {Path(args.out) / 'results.csv'}, results.json and figures.html")
    return 0


def _tasks_parser(sub) -> None:
    from .tasks import MODES, TASKS

    parser = sub.add_parser("tasks", help="the paper's copying and counting experiments (Appendix C.1, C.5)")
    parser.add_argument("--task", default="copy_first,copy_last",
                        help=f"comma-separated tasks, from {', '.join(TASKS)}")
    parser.add_argument("--lengths", default="5,10,20,40", help="sequence lengths: '5,10,20' or '5:40:5'")
    parser.add_argument("--samples", type=int, default=2, help="samples per task and length")
    parser.add_argument("--modes", default="answer", help=f"comma-separated modes, from {', '.join(MODES)}")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts generated together (left-padded)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="greedy tokens per answer")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampled sequences (counting tasks)")
    parser.add_argument("--out", default="out/tasks", help="folder for results (a rerun resumes from it)")
    _add_model_args(parser)


def run_collapse(model, args):
    """The collapse curve of one family, as the command's flags ask."""
    from .collapse import collapse_curve

    return collapse_curve(model, args.family, _ints(args.lengths), [d for d in args.dtypes.split(",") if d],
                          open_ended=args.open_ended, native=args.native, window=args.window)


def print_collapse(result) -> None:
    import pandas as pd

    table = result.summary()
    for column in table.columns[table.dtypes == "Int64"]:  # to_string's na_rep skips pandas' <NA>
        table[column] = table[column].astype(object).where(table[column].notna(), "-")
    with pd.option_context("display.float_format", "{:.3g}".format, "display.width", 160):
        print(table.to_string())
    print("(a length column is the first length where that happened; - means not within the measured lengths)")


def cmd_collapse(args) -> int:
    from .records import provenance
    from .report import ReportSection, collapse_section, model_section, write_report

    model = _load(args)
    result = run_collapse(model, args)
    print(f"family {args.family}: relative ‖y − y*‖∞ of the last token's final representation")
    print_collapse(result)
    sections = [model_section(provenance(model)), collapse_section(result)]
    payload = {"collapse": result.to_dict()}
    if not args.no_theory:
        from .softmax_theory import tv_decay_experiment
        from .synthetic import pe_collapse

        pe = pe_collapse([2, 4, 8, 16, 32, 64, 128], seeds=3)
        tv = tv_decay_experiment(n_max=2000, seeds=5)
        sections.append(ReportSection("synthetic positional encodings", figures=[pe.plot()], table=pe.summary()))
        sections.append(ReportSection("softmax total variation (Lemma B.2)", figures=[tv.plot()]))
        payload |= {"synthetic": pe.to_dict(), "tv_decay": tv.to_dict()}
    metadata = {**provenance(model), "command": "collapse", "family": args.family, "lengths": args.lengths,
                "dtypes": args.dtypes, "window": args.window, "open_ended": args.open_ended}
    html_path, json_path = write_report(args.out, sections, payload, metadata=metadata,
                                        title=f"lens_squash: representational collapse ({args.family})")
    print(f"wrote {json_path} and {html_path}")
    return 0


def _collapse_parser(sub) -> None:
    from .collapse import FAMILIES

    parser = sub.add_parser("collapse", help="representational collapse against length, per dtype (paper §4)")
    parser.add_argument("--family", default="count_ones", help=f"prompt family, from {', '.join(FAMILIES)}")
    parser.add_argument("--lengths", default="4:128:4", help="sequence lengths: '5,10,20' or '4:128:4'")
    parser.add_argument("--dtypes", default="float32,bfloat16,float16", help="comma-separated dtypes")
    parser.add_argument("--open-ended", action="store_true",
                        help="stop the prompt right after the sequence (prefix-closed: one pass per dtype)")
    parser.add_argument("--native", action="store_true", help="difference representations in the dtype itself")
    parser.add_argument("--window", type=int, default=None, help="restrict attention to a local window")
    parser.add_argument("--no-theory", action="store_true", help="skip the toy-model and softmax panels")
    parser.add_argument("--out", default="out/collapse", help="folder for results.json and report.html")
    _add_model_args(parser)


def print_sinks(report) -> None:
    print(f"{'layer':>5}  {'attn→first':>10}  {'sink rate':>9}  {'‖x₀‖/median':>11}  {'entropy':>8}  "
          f"{'Dobrushin':>9}  {'rollout→first':>13}")
    for layer in range(report.n_layers):
        entropy = "" if report.entropy is None else f"{float(report.entropy[layer]):.3f}"
        tau = "" if report.dobrushin is None else f"{float(report.dobrushin[layer]):.3f}"
        mass = "" if report.rollout_mass is None else f"{float(report.rollout_mass[layer]):.4f}"
        print(f"{layer:>5}  {float(report.first_token_mass[layer]):>10.3f}  {float(report.sink_rate[layer]):>9.2f}  "
              f"{float(report.norm_ratio[layer]):>11.1f}  {entropy:>8}  {tau:>9}  {mass:>13}")
    print(f"sink rate (ε = {report.eps}): {report.sink_rate_overall:.1%} of heads; phases (layers) "
          f"{report.phases}; massive activation in layers {report.massive_range}")
    for name, value in report.correlations.items():
        print(f"  corr {name}: {value:.3f}")


def cmd_sinks(args) -> int:
    from .ablation import ablation_effect
    from .records import provenance
    from .report import ReportSection, model_section, write_report
    from .sinks import sink_analysis

    model = _load(args)
    chat = False if args.raw else None
    ablation = None
    if args.clamp_layer is not None:  # its baseline is the plain sink report: one traced pass, not two
        ablation = ablation_effect(model, args.prompt, args.clamp_layer, chat=chat, eps=args.eps,
                                   jacobian=not args.no_jacobian)
    report = sink_analysis(model, args.prompt, chat=chat, eps=args.eps) if ablation is None else ablation.baseline
    print_sinks(report)
    sections = [model_section(provenance(model)), ReportSection("sinks", figures=[report.plot()])]
    payload = {"sinks": report.to_dict()}
    if ablation is not None:
        print(f"clamping the first token's residual after block {args.clamp_layer}: sink rate "
              f"{ablation.baseline.sink_rate_overall:.1%} → {ablation.ablated.sink_rate_overall:.1%}; "
              f"peak norm ratio {float(ablation.baseline.norm_ratio.max()):.1f} → "
              f"{float(ablation.ablated.norm_ratio.max()):.1f}")
        figures = [ablation.plot()] + ([] if ablation.jacobian_baseline is None else [ablation.plot_jacobian()])
        sections.append(ReportSection("massive-activation ablation", figures=figures))
        payload["ablation"] = ablation.to_dict()
    metadata = {**provenance(model), "command": "sinks", "prompt": args.prompt, "clamp_layer": args.clamp_layer}
    html_path, json_path = write_report(args.out, sections, payload, metadata=metadata,
                                        title="lens_squash: sinks, massive activations, compression")
    print(f"wrote {json_path} and {html_path}")
    return 0


def _sinks_parser(sub) -> None:
    parser = sub.add_parser("sinks", help="attention sinks, massive activations, compression per layer")
    _add_prompt_args(parser)
    parser.add_argument("--eps", type=float, default=0.3, help="sink threshold ε (0.3 or 0.8 in the literature)")
    parser.add_argument("--clamp-layer", type=int, default=None,
                        help="also clamp the first token's residual after this block and measure the change")
    parser.add_argument("--no-jacobian", action="store_true", help="skip the sketched Jacobian in the ablation")
    parser.add_argument("--out", default="out/sinks", help="folder for results.json and report.html")
    _add_model_args(parser)


def _add_prompt_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", default=COPY_PROMPT, help="prompt text (default: the paper's copy prompt)")
    parser.add_argument("--raw", action="store_true", help="skip the chat template")


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
    parser.add_argument("--ones", type=int, default=12, help="ones before the final 0 in the copying prompt")
    parser.add_argument("--jacobian", choices=["exact", "sketch"], default="sketch",
                        help="sketch: 64 random probes (Frobenius norms, ~10 s on 2 idle cores); exact: "
                             "all 576 VJPs (spectral norms too, ~80 s)")
    parser.add_argument("--out", default="out/demo", help="folder for the results")
    _add_model_args(parser)


#: sub-command name -> (parser builder, handler)
COMMANDS: dict[str, tuple[Callable, Callable]] = {
    "trace": (_trace_parser, cmd_trace),
    "demo": (_demo_parser, cmd_demo),
    "analyze": (_analyze_parser, cmd_analyze),
    "tasks": (_tasks_parser, cmd_tasks),
    "collapse": (_collapse_parser, cmd_collapse),
    "sinks": (_sinks_parser, cmd_sinks),
}


class _DefaultsFormatter(argparse.HelpFormatter):
    """Appends ``(default: …)`` to an option's help unless the help already names it or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        unset = default is None or default is False or default == argparse.SUPPRESS  # 0 is a real default
        if "default" in text or unset or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


class _CommandParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lens-squash",
        description="Information over-squashing in TransformerLens models (Barbero et al., NeurIPS 2024). "
        "Every command works offline on the default model, SmolLM2-135M-Instruct; "
        "`lens-squash COMMAND -h` lists a command's options.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_CommandParser)
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
