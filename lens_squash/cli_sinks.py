"""``lens-squash sinks``: attention sinks, massive activations and compression per layer, and the
first token's residual clamped after a block (``--clamp-layer``)."""

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
from .core import validate

__all__ = ["add_parser", "check", "print_sinks", "run"]


def add_parser(sub) -> None:
    parser = sub.add_parser("sinks", help="attention sinks, massive activations, compression per layer")
    add_prompt_args(parser)
    parser.add_argument("--eps", type=float, default=0.3, help="sink threshold ε (0.3 or 0.8 in the literature)")
    parser.add_argument(
        "--clamp-layer",
        type=int,
        default=None,
        help="also clamp the first token's residual after this block and measure the change",
    )
    parser.add_argument("--no-jacobian", action="store_true", help="skip the sketched Jacobian in the ablation")
    parser.add_argument("--out", default="out/sinks", help="folder for results.json and report.html")
    add_model_args(parser)


def check(args) -> None:
    check_prompt_flags(args)
    validate.check_float(args.eps, "--eps", low=0.0, high=1.0, low_open=True, high_open=True)
    if args.clamp_layer is not None:  # the upper end needs the model's depth: checked right after loading
        validate.check_int(
            args.clamp_layer,
            "--clamp-layer",
            minimum=0,
            hint="a block index counted from 0 (negative indices are not accepted)",
        )
    claim_out_folder(args, files=("results.json", "report.html"))  # one writer per folder


def print_sinks(report) -> None:
    print(
        f"{'layer':>5}  {'attn→first':>10}  {'sink rate':>9}  {'‖x₀‖/median':>11}  {'entropy':>8}  "
        f"{'Dobrushin':>9}  {'rollout→first':>13}"
    )
    for layer in range(report.n_layers):
        entropy = "" if report.entropy is None else f"{float(report.entropy[layer]):.3f}"
        tau = "" if report.dobrushin is None else f"{float(report.dobrushin[layer]):.3f}"
        mass = "" if report.rollout_mass is None else f"{float(report.rollout_mass[layer]):.4f}"
        print(
            f"{layer:>5}  {float(report.mean_first_token_attention[layer]):>10.3f}  "
            f"{float(report.sink_rate[layer]):>9.2f}  {float(report.norm_ratio[layer]):>11.1f}  {entropy:>8}  "
            f"{tau:>9}  {mass:>13}"
        )
    print(f"sink rate (ε = {report.eps}): {report.sink_rate_overall:.1%} of heads")
    print(f"phases: {report.phase_text()}")
    print(report.massive_text())
    for line in report.correlation_lines():
        print(f"  {line}")


def run(args) -> int:
    from .core.records import provenance
    from .experiments.ablation import ablation_effect
    from .experiments.sinks import sink_analysis
    from .views.report import ReportSection, model_section

    model = load(args)
    if args.clamp_layer is not None and args.clamp_layer >= model.cfg.n_layers:
        raise ValueError(
            f"--clamp-layer {args.clamp_layer} is past this model's last block: it has "
            f"{model.cfg.n_layers} blocks, so pass 0 … {model.cfg.n_layers - 1}"
        )
    chat = False if args.raw else None
    check_two_tokens(model, args.prompt, chat=chat)
    ablation = None
    if args.clamp_layer is not None:  # its baseline is the plain sink report: one traced pass, not two
        ablation = ablation_effect(
            model, args.prompt, args.clamp_layer, chat=chat, eps=args.eps, jacobian=not args.no_jacobian
        )
    report = sink_analysis(model, args.prompt, chat=chat, eps=args.eps) if ablation is None else ablation.baseline
    print_sinks(report)
    sections = [model_section(provenance(model)), ReportSection("sinks", figures=[report.plot()])]
    payload = {"sinks": report.to_dict()}
    if ablation is not None:
        print(
            f"clamping the first token's residual after block {args.clamp_layer}: sink rate "
            f"{ablation.baseline.sink_rate_overall:.1%} → {ablation.ablated.sink_rate_overall:.1%}; "
            f"peak norm ratio {float(ablation.baseline.norm_ratio.max()):.1f} → "
            f"{float(ablation.ablated.norm_ratio.max()):.1f}"
        )
        figures = [ablation.plot()] + ([] if ablation.jacobian_baseline is None else [ablation.plot_jacobian()])
        sections.append(ReportSection("massive-activation ablation", figures=figures))
        payload["ablation"] = ablation.to_dict()
    metadata = {**provenance(model), "command": "sinks", "prompt": args.prompt, "clamp_layer": args.clamp_layer}
    write_report(
        args,
        args.out,
        sections,
        payload,
        metadata=metadata,
        title="lens_squash: sinks, massive activations, compression",
    )
    return 0
