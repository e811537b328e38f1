"""How well each path-sum variant ranks input positions like the true gradient (issue 8).

For every prompt of the shipped suite (lens_squash/data/prompts.json) and every variant, against the
Jacobian ‖∂y_n/∂v_i‖ of the last token's final representation with respect to each input embedding:

* Spearman and Kendall rank correlations against the spectral and the Frobenius norms;
* the top-5 overlap;
* for guaranteed bounds (``certified``), the violations against the Jacobian they bound (the frozen
  model's, spectral norm), which must be 0.

Exact Jacobians are used for prompts up to ``--exact-max-tokens``; longer prompts use the sketch
(``--probes`` orthonormal probes; Frobenius only), which is validated against the exact norms on the
prompts that have both (``sketch_spearman`` column). ``--markdown`` rewrites docs/bound_quality.md.
``--diagnose`` adds, per layer, each variant's backward row against :func:`flow`'s true layer map.

Long runs on a shared machine: ``--lines`` appends each prompt's rows as it finishes and ``--truths``
keeps each prompt's Jacobian norms (reused on a rerun, so new variants cost only a trace); several
processes can each take part of the suite (``--names``, covered in the order given), and
``--render`` builds the tables from their merged lines without computing anything.

    .venv/bin/python benchmarks/bound_quality.py --markdown docs/bound_quality.md
    .venv/bin/python benchmarks/bound_quality.py --quick          # two short prompts
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from lens_squash.algebra.compare import compare
from lens_squash.algebra.ranks import spearman
from lens_squash.algebra.variant_registry import guarantee_of, variants_needing
from lens_squash.algebra.variants import VARIANTS, path_bound
from lens_squash.core.records import provenance, write_json_atomic, write_text_atomic
from lens_squash.edge.flow import flow
from lens_squash.edge.jacobian import jacobian
from lens_squash.edge.models import format_prompt, load_model
from lens_squash.edge.trace import trace
from lens_squash.experiments.suite import load_suite

#: everything from this line on in the markdown file is hand-written reading, kept on regeneration
NOTES_MARKER = "<!-- notes: kept when the tables are regenerated -->"
QUICK_NAMES = ("prose_tide", "list_shopping")


def _truth(model, tokens, *, exact: bool, probes: int, frozen: bool) -> dict:
    """The Jacobian norms a prompt is scored against (lists, so they can be saved and reused)."""
    jac = jacobian(model, tokens, mode="exact" if exact else "sketch", n_probes=probes)
    truth = {"jacobian": "exact" if exact else f"sketch{probes}", "frob": jac.frobenius.tolist()}
    truth["spec"] = None if jac.spectral is None else jac.spectral.tolist()
    truth["sketch_spearman"] = None
    if exact:
        sketch = jacobian(model, tokens, mode="sketch", n_probes=probes)
        truth["sketch_spearman"] = spearman(sketch.frobenius, jac.frobenius)
    truth["frozen_spec"] = jacobian(model, tokens, mode="frozen").spectral.tolist() if frozen and exact else None
    return truth


def _usable(truth: dict | None, *, exact: bool, probes: int, frozen: bool) -> bool:
    """A stored truth is reused when it is exact (better than any sketch, whatever ``--exact-max-tokens``
    says), or the sketch asked for on a prompt too long for the exact one."""
    if truth is None or (frozen and not truth["frozen_spec"]):
        return False
    return truth["jacobian"] == "exact" or (not exact and truth["jacobian"] == f"sketch{probes}")


def read_truths(paths) -> dict:
    """Prompt name → stored truth from every ``--truths`` file; an exact one wins over a sketch."""
    truths: dict = {}
    for path in paths or []:
        for truth in read_lines(path):
            known = truths.get(truth["prompt"])
            if known is None or known["jacobian"] != "exact" or truth["jacobian"] == "exact":
                truths[truth["prompt"]] = truth
    return truths


def measure_prompt(
    model, prompt, variants, *, exact_max_tokens: int, probes: int, frozen: bool, truths: dict | None = None
) -> list[dict]:
    """One row per variant for one suite prompt. ``truths`` (prompt name → :func:`_truth`) are reused
    when they hold this prompt with the Jacobian asked for, and the new one is added to them."""
    tokens = format_prompt(model, prompt.text, chat=prompt.chat)
    n = int(tokens.shape[0])
    traced = trace(model, tokens, lipschitz=variants_needing(variants, "mlp_gains"), keep_resid=True)
    bounds = {name: path_bound(traced, name, model=model) for name in variants}
    started = time.perf_counter()
    exact = n <= exact_max_tokens
    truths = {} if truths is None else truths
    truth = truths.get(prompt.name)
    frozen = frozen and exact and any(VARIANTS[v].is_bound for v in variants)
    if not _usable(truth, exact=exact, probes=probes, frozen=frozen):
        truth = truths[prompt.name] = {"prompt": prompt.name} | _truth(
            model, tokens, exact=exact, probes=probes, frozen=frozen
        )
    jac_frob = torch.tensor(truth["frob"], dtype=torch.float64)
    jac_spec = None if truth["spec"] is None else torch.tensor(truth["spec"], dtype=torch.float64)
    frozen_spectral = (
        None if not (frozen and truth["frozen_spec"]) else torch.tensor(truth["frozen_spec"], dtype=torch.float64)
    )
    seconds = time.perf_counter() - started
    rows = []
    for name, path in bounds.items():
        bound = path.bound
        row = {
            "prompt": prompt.name,
            "kind": prompt.kind,
            "chat": prompt.chat,
            "n_tokens": n,
            "variant": name,
            "jacobian": truth["jacobian"],
            "sketch_spearman": truth["sketch_spearman"],
            "seconds": seconds,
        }
        frob = compare(bound, jac_frob, variant=name, truth_name="frobenius")
        row |= {"spearman_frob": frob.spearman, "kendall_frob": frob.kendall, "top5_frob": frob.top5_overlap}
        if jac_spec is not None:
            spec = compare(bound, jac_spec, variant=name)
            row |= {"spearman_spec": spec.spearman, "kendall_spec": spec.kendall, "top5_spec": spec.top5_overlap}
        row["first_token_share"] = path.first_token_share
        if VARIANTS[name].is_bound and frozen_spectral is not None:  # a proxy promises no inequality
            check = compare(bound, frozen_spectral, variant=name, guaranteed=True, rtol=1e-4)
            row |= {"violations": check.violations, "ratio_min": check.ratio_min}
        rows.append(row)
    return rows


def per_layer_diagnosis(model, prompt, variants, *, probes: int, exact_max_tokens: int) -> pd.DataFrame:
    """Per layer ``l``, Spearman between each variant's backward row ``e_nᵀ M^(L-1) ⋯ M^(l)`` and the true
    layer map ``‖∂y_n/∂x^(l)_k‖_F`` from :func:`flow` (exact probes where the prompt fits, the sketch
    otherwise), plus where that map's mass sits."""
    tokens = format_prompt(model, prompt.text, chat=prompt.chat)
    mode = "exact" if tokens.shape[0] <= exact_max_tokens else "sketch"
    found = flow(model, tokens, mode=mode, n_probes=probes, variants=variants)
    per_layer = found.layer_spearman()
    rows = []
    for layer in range(found.n_layers):
        truth = found.sensitivity[layer].double()
        row = {
            "prompt": prompt.name,
            "truth": mode,
            "layer": layer,
            "truth_first_share": float(truth[0] / truth.sum()),
            "truth_last_share": float(truth[-1] / truth.sum()),
        }
        rows.append(row | {name: float(values[layer]) for name, values in per_layer.items()})
    return pd.DataFrame(rows)


def held_out(model, prompts, variant: str, knob: str, values, truths: dict) -> pd.DataFrame:
    """A knob chosen on half the suite and reported on the other: the prompts alternate (suite order,
    so each half holds every kind) between ``tune`` and ``held``; per value, the median and minimum
    Spearman (Frobenius, the stored truth) on each half; ``chosen`` marks the best tune median."""
    rows = []
    for i, prompt in enumerate(prompts):
        tokens = format_prompt(model, prompt.text, chat=prompt.chat)
        traced = trace(model, tokens, keep_resid=True)
        truth = torch.tensor(truths[prompt.name]["frob"], dtype=torch.float64)
        for value in values:
            bound = path_bound(traced, variant, model=model, **{knob: value}).bound
            rows.append({"half": "held" if i % 2 else "tune", knob: value, "spearman": spearman(bound, truth)})
    table = pd.DataFrame(rows).pivot_table(index=knob, columns="half", values="spearman", aggfunc=["median", "min"])
    table.columns = [f"{half}_{stat}" for stat, half in table.columns]
    table = table.reset_index()[[knob, "tune_median", "tune_min", "held_median", "held_min"]]
    table["chosen"] = table["tune_median"] == table["tune_median"].max()
    return table


def summarise(frame: pd.DataFrame) -> pd.DataFrame:
    """Median (and min) rank agreement per variant across the prompts, with what the registry
    says the variant's numbers promise (``bound`` or ``proxy``)."""
    agg = {
        "prompts": ("prompt", "nunique"),
        "exact_prompts": ("jacobian", lambda kinds: int((kinds == "exact").sum())),
        "median_spearman_frob": ("spearman_frob", "median"),
        "min_spearman_frob": ("spearman_frob", "min"),
        "median_kendall_frob": ("kendall_frob", "median"),
        "median_top5_frob": ("top5_frob", "median"),
    }
    if "spearman_spec" in frame:
        agg |= {"median_spearman_spec": ("spearman_spec", "median"), "median_kendall_spec": ("kendall_spec", "median")}
    if "violations" in frame:  # only guaranteed variants on prompts with a frozen Jacobian are checked
        agg |= {"violations": ("violations", "sum"), "checked_prompts": ("violations", "count")}
    agg |= {"median_first_token_share": ("first_token_share", "median")}
    summary = frame.groupby("variant", sort=False).agg(**agg).reset_index()
    summary.insert(1, "guarantee", [guarantee_of(name) for name in summary["variant"]])
    return summary


def table_md(frame: pd.DataFrame, index: bool = False) -> str:
    """A GitHub markdown table (no tabulate dependency); floats to 3 decimals, missing as –."""
    frame = frame.reset_index() if index else frame

    def cell(value) -> str:
        if value is None or (isinstance(value, float) and value != value):
            return "–"
        if isinstance(value, float):
            return f"{value:.3g}" if value and not 1e-3 <= abs(value) < 1e4 else f"{value:.3f}"
        return str(value)

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def layer_table(diagnosis: pd.DataFrame, variants) -> pd.DataFrame:
    """Per layer, the median over the diagnosed prompts of each variant's Spearman against the flow."""
    columns = ["truth_first_share", "truth_last_share", *[v for v in variants if v in diagnosis]]
    return diagnosis.groupby("layer")[columns].median().reset_index()


def markdown(frame, summary, command: str, device: str, seconds: float, diagnosis=None, variants=()) -> str:
    by_kind = frame.pivot_table(index="variant", columns="kind", values="spearman_frob", aggfunc="median", sort=False)
    exact = int((frame.groupby("prompt")["jacobian"].first() == "exact").sum())
    longest = frame.loc[frame["jacobian"] == "exact", "n_tokens"].max()
    parts = [
        "# Bound quality on the prompt suite",
        "",
        f"Regenerate with `{command}` ({device}; {seconds / 60:.1f} min of compute; {frame['prompt'].nunique()} "
        f"prompts, {f'{exact} with exact Jacobians (up to {longest} tokens)' if exact else 'no exact Jacobian'}, "
        "the rest with the sketch). Truth: "
        "‖∂y_n/∂v_i‖ of the last token's final representation (SmolLM2-135M-Instruct, fp32); `spec` = spectral "
        "norm (exact Jacobians only), `frob` = Frobenius norm (exact, or the sketch for long prompts). "
        "`guarantee` is the registry's: only a `bound` promises an inequality; a `proxy` ranks. `violations` "
        "counts positions where the certified bound falls below the frozen model's Jacobian (spectral).",
        "",
        "## Per variant (median across prompts)",
        "",
        table_md(summary),
        "",
        "## Median Spearman (Frobenius) by prompt kind",
        "",
        table_md(by_kind, index=True),
        "",
    ]
    if diagnosis is not None and len(diagnosis):
        names = ", ".join(f"`{p}` ({t})" for p, t in diagnosis.groupby("prompt", sort=False)["truth"].first().items())
        parts += [
            "## Per layer, against the true flow",
            "",
            f"Spearman between each variant's backward row at layer l (`e_nᵀ M^(L-1) ⋯ M^(l)`, what "
            f"`flow(...)` puts beside the truth) and the true layer map ‖∂y_n/∂x^(l)_k‖_F, median over {names} "
            "(`truth_*_share`: the map's share on the first / last token). Layer 0 is the whole stack.",
            "",
            table_md(layer_table(diagnosis, variants)),
            "",
        ]
    parts += ["## Every prompt and variant", "", table_md(frame.drop(columns=["seconds"])), ""]
    return "\n".join(parts)


def measure_suite(model, prompts, variants, args, sink) -> list[dict]:
    """Every prompt's rows, each prompt's appended to ``sink`` (JSON lines) as soon as it is done; the
    Jacobians are read from and added to ``--truths`` (JSON lines), so a rerun scores new variants only."""
    rows = []
    truths = read_truths(args.truths)
    out = args.truths[-1] if args.truths else None  # new truths go to the last file named
    for i, prompt in enumerate(prompts):
        known = truths.get(prompt.name)
        new = measure_prompt(
            model,
            prompt,
            variants,
            exact_max_tokens=args.exact_max_tokens,
            probes=args.probes,
            frozen=not args.no_frozen,
            truths=truths,
        )
        if out is not None and truths[prompt.name] is not known:
            with out.open("a") as handle:
                handle.write(json.dumps(truths[prompt.name]) + "\n")
        rows += new
        if sink is not None:
            with sink.open("a") as handle:
                handle.writelines(json.dumps(row) + "\n" for row in new)
        print(f"[{i + 1}/{len(prompts)}] {prompt.name}: {new[-1]['n_tokens']} tokens, {new[-1]['jacobian']}, "
              f"{new[-1]['seconds']:.0f} s", file=sys.stderr, flush=True)  # fmt: skip
    return rows


def latest(rows: list[dict]) -> list[dict]:
    """One row per (prompt, variant), the last one read: a prompt rescored against a new (exact) truth
    replaces its earlier rows when the runs' lines are merged."""
    return list({(row["prompt"], row["variant"]): row for row in rows}.values())


def read_lines(path: Path | None) -> list[dict]:
    if path is None or not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run(argv=None, *, model=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK_NAMES)}")
    parser.add_argument("--names", help="comma-separated suite prompt names")
    parser.add_argument("--limit", type=int, help="first N suite prompts")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--exact-max-tokens", type=int, default=80)
    parser.add_argument("--probes", type=int, default=64)
    parser.add_argument("--no-frozen", action="store_true", help="skip the frozen Jacobian (no violation counts)")
    parser.add_argument("--markdown", type=Path, help="write the tables to this markdown file")
    parser.add_argument("--json", type=Path, help="write every row to this JSON file")
    parser.add_argument("--diagnose", help="comma-separated suite prompt names: per-layer Spearman against flow")
    parser.add_argument("--lines", type=Path, help="append each prompt's rows here (JSON lines) as it finishes")
    parser.add_argument("--diagnosis-lines", type=Path, help="append each diagnosed prompt's layer rows here")
    parser.add_argument(
        "--truths",
        type=Path,
        action="append",
        help="Jacobians per prompt (JSON lines; repeatable, an exact one wins): reused; new ones go to the last",
    )
    parser.add_argument("--render", action="store_true", help="no computing: tables from --lines/--diagnosis-lines")
    parser.add_argument("--seconds", type=float, default=0.0, help="with --render: the compute time to report")
    parser.add_argument(
        "--knob",
        help="VARIANT:NAME=V1,V2,...: choose the knob on half the prompts (stored --truths), report the other half",
    )
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    command = "python benchmarks/bound_quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    device = f"{torch.get_num_threads()} CPU threads" if not torch.cuda.is_available() else torch.cuda.get_device_name()
    started = time.perf_counter()
    if args.knob:
        variant, _, knob = args.knob.partition(":")
        name, _, values = knob.partition("=")
        table = held_out(
            model if model is not None else load_model(n_ctx=512),
            load_suite(names=args.names.split(",") if args.names else None),
            variant,
            name,
            [float(v) for v in values.split(",")],
            read_truths(args.truths),
        )
        print(table_md(table))
        return table, table
    if args.render:
        rows, diagnosis = latest(read_lines(args.lines)), pd.DataFrame(read_lines(args.diagnosis_lines))
    else:
        names = QUICK_NAMES if args.quick else (args.names.split(",") if args.names else None)
        model = model if model is not None else load_model(n_ctx=512)
        prompts = load_suite(names=names, limit=args.limit)
        if names is not None:  # in the order given, so a run cut short has covered what was asked first
            prompts.sort(key=lambda p: list(names).index(p.name))
        rows = measure_suite(model, prompts, variants, args, args.lines)
        diagnosis = pd.DataFrame()
        for name in args.diagnose.split(",") if args.diagnose else []:
            found = per_layer_diagnosis(
                model, load_suite(names=[name])[0], variants, probes=args.probes, exact_max_tokens=args.exact_max_tokens
            )
            diagnosis = pd.concat([diagnosis, found], ignore_index=True)
            if args.diagnosis_lines is not None:
                with args.diagnosis_lines.open("a") as handle:
                    handle.writelines(json.dumps(r) + "\n" for r in found.to_dict("records"))
    frame = pd.DataFrame(rows)
    variants = [v for v in variants if v in set(frame["variant"])]
    summary = summarise(frame)
    seconds = time.perf_counter() - started
    if args.render:  # what the merged runs spent on their Jacobians, unless told the whole time
        seconds = args.seconds or float(frame.groupby("prompt")["seconds"].first().sum())
    with pd.option_context("display.float_format", "{:.3f}".format, "display.width", 200):
        print(summary.to_string(index=False))
        if len(diagnosis):
            print(layer_table(diagnosis, variants).to_string(index=False))
    if args.markdown:
        text = markdown(frame, summary, command.strip(), device, seconds, diagnosis, variants)
        if args.markdown.exists() and NOTES_MARKER in (old := args.markdown.read_text()):
            text += "\n" + old[old.index(NOTES_MARKER) :]
        write_text_atomic(args.markdown, text)
    if args.json:
        metadata = {"command": command} if model is None else provenance(model, command=command)
        records = None if not len(diagnosis) else diagnosis.to_dict("records")
        write_json_atomic(args.json, {"metadata": metadata, "rows": rows, "diagnosis": records})
    return frame, summary


if __name__ == "__main__":
    run()
