"""The ``lens-squash`` command line: one sub-command per analysis, registered in :data:`COMMANDS`.

Each sub-command first checks every flag (:mod:`lens_squash.core.validate`; output paths included, so a
bad value costs no model load), then loads the model once, checks what needs the model (a layer
index against its depth, the prompt's tokens against its context) before any forward pass, runs the
pure analyses, prints a short table and writes its results atomically (JSON with provenance; HTML
figures where the command makes them). Refusals are one line naming the flag, exit status 2;
Ctrl-C is one line saying what was saved and how to resume, exit status 130.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .core import validate

__all__ = ["COMMANDS", "COPY_PROMPT", "EXIT_BAD_INPUT", "EXIT_INTERNAL_ERROR", "EXIT_INTERRUPTED", "Command", "build_parser", "copy_prompt", "main"]


def copy_prompt(n_ones: int = 12) -> str:
    """The paper's copying prompt; kept here for old notebooks, use ``lens_squash.copy_prompt``."""
    from .experiments.tasks import copy_prompt as build

    return build(n_ones)


COPY_PROMPT = copy_prompt(12)


def _load(args):
    from .edge.models import load_model

    started = time.perf_counter()
    model = load_model(args.model, dtype=args.dtype, n_ctx=args.n_ctx, device=args.device, backend=args.backend)
    where = "" if args.device == "cpu" else f" on {args.device}"
    print(f"loaded {args.model} ({args.dtype}{where}) in {time.perf_counter() - started:.1f} s")
    return model


def _write_report(args, out, sections, payload, *, title: str, metadata: dict):
    """``report.write_report`` into ``out``, then (``--figures``) every figure of the report as files."""
    from .views.report import write_report

    html_path, json_path = write_report(out, sections, payload, title=title, metadata=metadata)
    print(f"wrote {json_path} and {html_path}")
    if args.figures:
        from .views.export import write_figures

        figures = {f"{section.title}-{i}": fig for section in sections for i, fig in enumerate(section.figures)}
        written = write_figures(figures, Path(out) / "figures", args.figures)
        print(f"wrote {sum(len(paths) for paths in written.values())} figure files to {Path(out) / 'figures'}")
    return html_path, json_path


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
    from .experiments.tasks import greedy_generate

    new_ids = greedy_generate(model, [tokens], max_new_tokens=max_new_tokens)[0]
    return model.tokenizer.decode(new_ids, skip_special_tokens=True).strip()


def cmd_trace(args) -> int:
    from .core.records import write_json_atomic
    from .edge.trace import as_tokens, trace

    model = _load(args)
    chat = False if args.raw else None
    tokens = as_tokens(model, args.prompt, chat=chat)  # refuses an over-long prompt before the pass
    if args.generate:
        _check_room(model, len(tokens), _ANSWER_TOKENS, "--generate")
    result = trace(model, args.prompt, chat=chat)
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


#: the demo's collapse summary: family (a), these lengths, these dtypes
_DEMO_COLLAPSE = ("count_ones", tuple(range(8, 129, 8)), ("float32", "bfloat16"))
#: greedy tokens of the answer that demo and trace --generate print
_ANSWER_TOKENS = 24


def cmd_demo(args) -> int:
    """The main job on the offline default model: the paper's copying prompt analysed end to end
    (bounds vs the sketched or exact Jacobian, spectral, sinks), the answer, and a collapse summary."""
    from .experiments.analysis import analyze
    from .experiments.collapse import collapse_curve
    from .core.records import write_json_atomic
    from .edge.trace import as_tokens

    model = _load(args)
    prompt = copy_prompt(args.ones)
    _check_room(model, len(as_tokens(model, prompt)), _ANSWER_TOKENS, "--ones")  # before printing it
    family, lengths, dtypes = _DEMO_COLLAPSE
    _check_collapse_fits(model, family, lengths, open_ended=True, flag="the demo's collapse summary")
    print("prompt: " + prompt)
    analysis = analyze(model, prompt, jacobian_mode=args.jacobian, n_probes=64)
    out = Path(args.out)
    report_analysis(args, analysis, prompt, out / "analyze", title="lens_squash demo: the copying prompt",
                    answer=generate_answer(model, analysis.trace.tokens, _ANSWER_TOKENS), command="demo")
    # the demo's summary shares passes (one per dtype, plus a few separate ones for the noise floor it
    # prints); `lens-squash collapse` runs every prompt alone for bit-exact thresholds
    collapse = collapse_curve(model, family, list(lengths), dtypes, open_ended=True, exact=False)
    print("representational collapse, family (a) counting ones vs one more one "
          "(relative ‖y − y*‖∞ of the final representation):")
    print_collapse(collapse)
    write_json_atomic(out / "collapse.json", collapse.to_dict())
    print(f"wrote {out / 'collapse.json'}")
    return 0


def _check_room(model, n_prompt: int, n_new: int, flag: str) -> None:
    """The prompt plus ``n_new`` generated tokens must fit the loaded context (checked before any pass)."""
    if n_prompt + n_new > model.cfg.n_ctx:
        raise ValueError(f"{flag}: the prompt has {n_prompt} tokens and {n_new} more are generated, beyond the "
                         f"loaded context n_ctx={model.cfg.n_ctx}; pass a larger --n-ctx or a shorter prompt")


def _check_two_tokens(model, prompt: str, chat: bool | None) -> None:
    """Sinks and sensitivities compare the first token with later ones: one token is not enough."""
    from .edge.trace import as_tokens

    n_tokens = len(as_tokens(model, prompt, chat=chat))  # also refuses a prompt longer than n_ctx
    if n_tokens < 2:
        raise ValueError(f"--prompt {prompt!r} is {n_tokens} token; this analysis compares the first token with "
                         "later ones, so it needs at least 2: pass a longer prompt (or drop --raw)")


def _check_collapse_fits(model, family: str, lengths, *, open_ended: bool, flag: str) -> None:
    """The longest collapse prompt (``s*``, one token longer than ``s``) must fit the loaded context."""
    from .experiments.collapse import family_pairs

    _, s_star, _ = family_pairs(model, family, [max(lengths)], open_ended=open_ended)
    if len(s_star[0]) > model.cfg.n_ctx:
        raise ValueError(f"{flag}: the longest prompt has {len(s_star[0])} tokens, beyond the loaded context "
                         f"n_ctx={model.cfg.n_ctx}; pass a larger --n-ctx or shorter --lengths")


def report_analysis(args, analysis, prompt: str, out, *, title: str, answer: str | None = None, **metadata) -> None:
    """Print ``analyze``'s result (and the greedy ``answer``), then write results.json and report.html."""
    from .views.report import analysis_sections

    print(f"{analysis.trace.n_tokens} tokens; predicted next token {analysis.trace.predicted_token!r}")
    if answer is not None:
        print(f"greedy answer: {answer!r}")
    print_analysis(analysis)
    metadata = {**analysis.trace.metadata, "prompt": prompt, **metadata}
    _write_report(args, out, analysis_sections(analysis, prompt=prompt),
                  {**analysis.to_dict(), "metadata": metadata}, title=title, metadata=metadata)


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
    for name, reason in analysis.skipped.items():
        print(f"skipped {name}: {reason}")
    spectral = analysis.spectral
    if spectral is not None:
        print(
            f"rollout stack: last token's mass on the first token after all layers "
            f"{float(spectral.first_token_mass[-1]):.4f}; cumulative Dobrushin "
            f"{float(spectral.cumulative_dobrushin[-1]):.3g}; depth to see only the first token "
            f"{'≈ ' if spectral.extrapolated else ''}{spectral.depth_to_first_token:.0f}"
            f"{' (extrapolated)' if spectral.extrapolated else ''}"
        )
    print("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in analysis.seconds.items()))


def cmd_analyze(args) -> int:
    from .experiments.analysis import analyze

    model = _load(args)
    _check_two_tokens(model, args.prompt, False if args.raw else None)
    if args.jacobian == "sketch" and args.probes > model.cfg.d_model:
        raise ValueError(f"--probes {args.probes} is more than this model's d_model={model.cfg.d_model}: the "
                         f"probes are orthonormal; pass --probes 1 … {model.cfg.d_model}, or --jacobian exact")
    mode = None if args.jacobian == "none" else args.jacobian
    analysis = analyze(model, args.prompt, variants=args.variants, jacobian_mode=mode, n_probes=args.probes,
                       chat=False if args.raw else None)
    report_analysis(args, analysis, args.prompt, args.out, title="lens_squash: over-squashing analysis",
                    command="analyze", variants=list(analysis.bounds), jacobian=args.jacobian)
    return 0


def _analyze_parser(sub) -> None:
    from .experiments.analysis import DEFAULT_VARIANTS
    from .algebra.variants import VARIANTS

    parser = sub.add_parser("analyze", help="path-sum bounds vs the exact Jacobian, spectral and sink analysis")
    _add_prompt_args(parser)
    parser.add_argument("--variants", default=None,
                        help=f"comma-separated path-sum variants, from {', '.join(VARIANTS)} (default: "
                             f"{','.join(DEFAULT_VARIANTS)}, skipping those the model cannot support)")
    parser.add_argument("--jacobian", choices=["exact", "sketch", "none"], default="exact",
                        help="how to compute the true sensitivities (sketch: random probes, much faster)")
    parser.add_argument("--probes", type=int, default=64, help="probes for --jacobian sketch")
    parser.add_argument("--out", default="out/analyze", help="folder for results.json and report.html")
    _add_model_args(parser)


def cmd_tasks(args) -> int:
    import pandas as pd

    from .experiments.tasks import run_tasks, summarize_results

    model = _load(args)
    results = run_tasks(
        model, args.task, args.lengths, args.samples, args.modes, args.out, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, seed=args.seed, overwrite=args.overwrite, loaded_as=args.model,
    )
    with pd.option_context("display.float_format", "{:.3g}".format, "display.width", 160):
        print(summarize_results(results).to_string(index=False))
    print(f"wrote {Path(args.out) / 'results.csv'}, results.json and figures.html")
    if args.figures:
        from .views.export import write_figures

        figures = results.figures()
        if figures:
            written = write_figures(figures, Path(args.out) / "figures", args.figures)
            print(f"wrote {sum(len(p) for p in written.values())} figure files to {Path(args.out) / 'figures'}")
        else:
            print("no figure files: these tasks have no figure of the paper's to draw")
    return 0


def _tasks_parser(sub) -> None:
    from .experiments.tasks import MODES, TASKS

    parser = sub.add_parser("tasks", help="the paper's copying and counting experiments (Appendix C.1, C.5)")
    parser.add_argument("--task", default="copy_first,copy_last",
                        help=f"comma-separated tasks, from {', '.join(TASKS)}")
    parser.add_argument("--lengths", default="5,10,20,40", help="sequence lengths: '5,10,20' or '5:40:5'")
    parser.add_argument("--samples", type=int, default=2, help="samples per task and length")
    parser.add_argument("--modes", default="answer", help=f"comma-separated modes, from {', '.join(MODES)}")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts generated together (left-padded)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="greedy tokens per answer")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampled sequences (counting tasks)")
    parser.add_argument("--out", default="out/tasks",
                        help="folder for results (a rerun of the same run resumes from it; another run is refused)")
    parser.add_argument("--overwrite", action="store_true",
                        help="discard the results already in --out instead of resuming them")
    _add_model_args(parser)


def run_collapse(model, args):
    """The collapse curve of one family, as the command's flags ask."""
    from .experiments.collapse import collapse_curve

    return collapse_curve(model, args.family, args.lengths, args.dtypes, open_ended=args.open_ended,
                          native=args.native, window=args.window, exact=not args.fast)


def print_collapse(result) -> None:
    from .experiments.collapse import format_summary

    print(format_summary(result))


def cmd_collapse(args) -> int:
    from .core.records import provenance
    from .views.report import ReportSection, collapse_section, model_section

    model = _load(args)
    _check_collapse_fits(model, args.family, args.lengths, open_ended=args.open_ended, flag="--lengths")
    result = run_collapse(model, args)
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
    metadata = {**provenance(model), "command": "collapse", "family": args.family, "lengths": list(args.lengths),
                "dtypes": list(args.dtypes), "window": args.window, "open_ended": args.open_ended}
    _write_report(args, args.out, sections, payload, metadata=metadata,
                  title=f"lens_squash: representational collapse ({args.family})")
    return 0


def _collapse_parser(sub) -> None:
    from .experiments.collapse import FAMILIES

    parser = sub.add_parser("collapse", help="representational collapse against length, per dtype (paper §4)")
    parser.add_argument("--family", default="count_ones", help=f"prompt family, from {', '.join(FAMILIES)}")
    parser.add_argument("--lengths", default="4:128:4", help="sequence lengths: '5,10,20' or '4:128:4'")
    parser.add_argument("--dtypes", default="float32,bfloat16,float16", help="comma-separated dtypes")
    parser.add_argument("--open-ended", action="store_true",
                        help="stop the prompt right after the sequence (prefix-closed: one pass per dtype)")
    parser.add_argument("--native", action="store_true", help="difference representations in the dtype itself")
    parser.add_argument("--window", type=int, default=None, help="restrict attention to a local window")
    parser.add_argument("--fast", action="store_true",
                        help="share forward passes (prefix trick, padded batches) instead of one unpadded pass "
                             "per prompt; faster, but not bit-identical: the table then reports the measured "
                             "noise floor and which path each threshold came from")
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
    print(f"sink rate (ε = {report.eps}): {report.sink_rate_overall:.1%} of heads")
    print(f"phases: {report.phase_text()}")
    print(report.massive_text())
    for line in report.correlation_lines():
        print(f"  {line}")


def cmd_sinks(args) -> int:
    from .experiments.ablation import ablation_effect
    from .core.records import provenance
    from .views.report import ReportSection, model_section
    from .algebra.sinks import sink_analysis

    model = _load(args)
    if args.clamp_layer is not None and args.clamp_layer >= model.cfg.n_layers:
        raise ValueError(f"--clamp-layer {args.clamp_layer} is past this model's last block: it has "
                         f"{model.cfg.n_layers} blocks, so pass 0 … {model.cfg.n_layers - 1}")
    chat = False if args.raw else None
    _check_two_tokens(model, args.prompt, chat)
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
    _write_report(args, args.out, sections, payload, metadata=metadata,
                  title="lens_squash: sinks, massive activations, compression")
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
    from .edge.models import DEFAULT_MODEL

    parser.add_argument("--model", default=DEFAULT_MODEL, help="model name (default: the offline SmolLM2)")
    parser.add_argument("--dtype", default="float32", help="float32, float64, bfloat16 or float16")
    parser.add_argument("--n-ctx", type=int, default=2048, help="context length to load the model with")
    parser.add_argument("--device", default="cpu", help="torch device to load the model on: cpu, cuda, cuda:1, mps")
    parser.add_argument("--backend", choices=["hooked", "bridge"], default=None,
                        help="HookedTransformer or TransformerBridge (default: hooked where TransformerLens has it)")
    parser.add_argument("--figures", default=None,
                        help="also write every figure of the report as files, e.g. --figures png,svg,pdf "
                             "(plotly's static export through kaleido and Chromium)")


def _trace_parser(sub) -> None:
    parser = sub.add_parser("trace", help="one hooked forward pass: tokens, prediction, per-layer sinks")
    parser.add_argument("--prompt", required=True, help="the prompt text")
    parser.add_argument("--raw", action="store_true", help="skip the chat template")
    parser.add_argument("--generate", action="store_true", help="also print the greedy answer")
    parser.add_argument("--json", help="write the trace summary to this JSON file")
    _add_model_args(parser)


def _demo_parser(sub) -> None:
    parser = sub.add_parser("demo", help="the main job on the offline default model")
    parser.add_argument("--ones", type=int, default=12, help="ones before the final 0 in the copying prompt")
    parser.add_argument("--jacobian", choices=["exact", "sketch"], default="sketch",
                        help="sketch: 64 random probes (Frobenius norms, ~10 s on 2 idle cores); exact: "
                             "all 576 VJPs (spectral norms too, ~80 s)")
    parser.add_argument("--out", default="out/demo", help="folder for the results")
    _add_model_args(parser)


# --------------------------------------------------------------------------------------------------
# validation: every flag is checked before the model loads; each message names the flag typed


def _check_model_flags(args) -> None:
    from .edge.models import resolve_dtype

    if not args.model.strip() or any(not ch.isprintable() for ch in args.model):
        raise ValueError(f"--model {args.model!r} is not a model name; pass e.g. --model tiny-random")
    try:
        resolve_dtype(args.dtype)
    except ValueError as err:
        raise ValueError(f"--dtype: {err}") from err
    validate.check_int(args.n_ctx, "--n-ctx", minimum=1, maximum=validate.MAX_N_CTX,
                       hint="the number of positions to load the model with, e.g. --n-ctx 2048")
    _check_device(args.device)
    if args.figures is not None:
        args.figures = _check_figures(args.figures)


def _check_device(device: str) -> None:
    """A device torch can name and this machine has, checked before the model loads."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ValueError(f"--device {device!r} is not a torch device; pass e.g. --device cpu or --device cuda:0") from err
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (parsed.index is not None and parsed.index >= count):
            raise ValueError(f"--device {device}: this machine has {count} CUDA device(s) visible to torch; "
                             "pass --device cpu, or a cuda:N below that count")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps: Apple's MPS backend is not available here; pass --device cpu")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {device!r}: lens_squash runs on cpu, cuda or mps devices")


def _check_figures(text: str) -> tuple[str, ...]:
    """The formats of ``--figures``, and the exporter and browser they need, before any work."""
    from .views.export import FORMATS, ExportError, require_exporter

    formats = validate.parse_names(text, FORMATS, "--figures", what="figure format")
    try:
        require_exporter()
    except ExportError as err:
        raise ValueError(f"--figures: {err}") from err
    return formats


def _check_prompt_flags(args) -> None:
    validate.check_text(args.prompt, "--prompt")


def _check_trace(args) -> None:
    _check_prompt_flags(args)
    if args.figures is not None:
        raise ValueError("--figures: trace draws no figures; use analyze or sinks for a report with figures")
    if args.json is not None:
        validate.check_out_file(args.json, "--json")


def _check_demo(args) -> None:
    validate.check_int(args.ones, "--ones", minimum=0, maximum=args.n_ctx,
                       hint=f"the copying prompt holds that many ones, and must fit --n-ctx {args.n_ctx}")
    validate.check_out_dir(args.out, "--out")


def _check_analyze(args) -> None:
    from .algebra.variants import VARIANTS

    _check_prompt_flags(args)
    if args.variants is not None:
        args.variants = validate.parse_names(args.variants, VARIANTS, "--variants", what="variant")
    validate.check_int(args.probes, "--probes", minimum=1, maximum=65_536)
    validate.check_out_dir(args.out, "--out")


#: the most prompts one tasks command may ask for (each is a generation of up to --max-new-tokens)
_MAX_TASK_PROMPTS = 100_000


def _check_tasks(args) -> None:
    from .experiments.tasks import MODES, TASKS, check_run_folder, generation_fingerprint

    args.task = validate.parse_names(args.task, TASKS, "--task", what="task")
    args.modes = validate.parse_names(args.modes, MODES, "--modes", what="mode")
    for task in args.task:
        if not set(args.modes) & set(TASKS[task].modes):
            raise ValueError(f"--task {task} offers none of --modes {','.join(args.modes)}; it offers "
                             f"{','.join(TASKS[task].modes)} (copying tasks have only 'answer'): add one to --modes")
    args.lengths = validate.parse_int_list(args.lengths, "--lengths", minimum=1, maximum=args.n_ctx)
    validate.check_int(args.samples, "--samples", minimum=1, maximum=_MAX_TASK_PROMPTS)
    n_prompts = len(args.task) * len(args.modes) * len(args.lengths) * args.samples
    if n_prompts > _MAX_TASK_PROMPTS:
        raise ValueError(f"--task × --modes × --lengths × --samples asks for {n_prompts} prompts, more than "
                         f"{_MAX_TASK_PROMPTS}; run fewer at a time")
    validate.check_int(args.batch_size, "--batch-size", minimum=1, maximum=_MAX_TASK_PROMPTS)
    validate.check_int(args.max_new_tokens, "--max-new-tokens", minimum=1, maximum=args.n_ctx - 1,
                       hint=f"the prompt and the answer must fit --n-ctx {args.n_ctx}")
    validate.check_int(args.seed, "--seed", minimum=0, maximum=2**63 - 1)
    validate.check_out_dir(args.out, "--out")
    _check_tasks_folder(args, check_run_folder, generation_fingerprint)


def _check_tasks_folder(args, check_run_folder, generation_fingerprint) -> None:
    """Refuse to resume a folder made by another run before loading the model: the fields known
    without it (the --model asked for, dtype, generation, versions); weights are checked after load."""
    from .edge.models import resolve_dtype

    if args.overwrite:
        return
    partial = generation_fingerprint(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, chat=None,
                                     seed=args.seed)
    partial["model"] = {"dtype": str(resolve_dtype(args.dtype)).removeprefix("torch.")}
    check_run_folder(Path(args.out) / "results.jsonl", partial, partial=True, loaded_as=args.model)


def _check_collapse(args) -> None:
    from .experiments.collapse import FAMILIES
    from .edge.models import resolve_dtype

    validate.check_names([args.family], FAMILIES, "--family", what="family")
    args.lengths = validate.parse_int_list(args.lengths, "--lengths", minimum=1, maximum=args.n_ctx)
    names = [part.strip() for part in args.dtypes.split(",") if part.strip()]
    if not names:
        raise ValueError("--dtypes is empty; pass e.g. --dtypes float32,bfloat16")
    try:
        resolved = [str(resolve_dtype(name)).removeprefix("torch.") for name in names]
    except ValueError as err:
        raise ValueError(f"--dtypes: {err}") from err
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"--dtypes names a dtype twice ({args.dtypes!r}); list each once")
    args.dtypes = resolved
    if args.window is not None:
        validate.check_int(args.window, "--window", minimum=1, maximum=args.n_ctx,
                           hint="the number of keys each query sees, itself included")
    validate.check_out_dir(args.out, "--out")


def _check_sinks(args) -> None:
    _check_prompt_flags(args)
    validate.check_float(args.eps, "--eps", low=0.0, high=1.0, low_open=True, high_open=True)
    if args.clamp_layer is not None:  # the upper end needs the model's depth: checked right after loading
        validate.check_int(args.clamp_layer, "--clamp-layer", minimum=0,
                           hint="a block index counted from 0 (negative indices are not accepted)")
    validate.check_out_dir(args.out, "--out")


def _saved_nothing(args) -> str:
    return f"nothing was saved ({args.command} writes its results when it finishes); run the same command again"


def _saved_tasks(args) -> str:
    path = Path(args.out) / "results.jsonl"
    try:
        n_rows = sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    except OSError:
        n_rows = 0
    if not n_rows:
        return "no rows were saved yet; run the same command again to start over"
    return f"{n_rows} rows are saved in {path}; run the same command again to resume from them"


@dataclass(frozen=True)
class Command:
    """One sub-command: its parser, the checks run before the model loads, the handler, and what an
    interruption leaves behind (for the one-line Ctrl-C message)."""

    add_parser: Callable
    check: Callable
    run: Callable
    saved: Callable = _saved_nothing


#: sub-command name -> Command
COMMANDS: dict[str, Command] = {
    "trace": Command(_trace_parser, _check_trace, cmd_trace),
    "demo": Command(_demo_parser, _check_demo, cmd_demo),
    "analyze": Command(_analyze_parser, _check_analyze, cmd_analyze),
    "tasks": Command(_tasks_parser, _check_tasks, cmd_tasks, _saved_tasks),
    "collapse": Command(_collapse_parser, _check_collapse, cmd_collapse),
    "sinks": Command(_sinks_parser, _check_sinks, cmd_sinks),
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
    for command in COMMANDS.values():
        command.add_parser(sub)
    return parser


#: exit status of a command interrupted by Ctrl-C (128 + SIGINT), as shells report it
EXIT_INTERRUPTED = 130
#: exit status of refused input, as argparse uses for its own errors
EXIT_BAD_INPUT = 2
#: exit status of a bug (an exception that is not a refusal)
EXIT_INTERNAL_ERROR = 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = COMMANDS[args.command]
    try:
        _check_model_flags(args)
        command.check(args)  # before the model loads: bad input costs no load and no forward pass
        return command.run(args)
    except KeyboardInterrupt:
        print(f"lens-squash {args.command}: interrupted; {command.saved(args)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, TypeError, RuntimeError, MemoryError, OSError) as err:
        # Bad input and refused requests: one clear line, no traceback, non-zero exit.
        print(f"lens-squash {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as err:  # noqa: BLE001 - a bug, not bad input: still one line, and how to see more
        if os.environ.get("LENS_SQUASH_DEBUG"):
            raise
        print(f"lens-squash {args.command}: internal error ({type(err).__name__}: {_one_line(err)}); "
              "please report it; rerun with LENS_SQUASH_DEBUG=1 for the traceback", file=sys.stderr)
        return EXIT_INTERNAL_ERROR


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
