"""Write the measured part of docs/over_mixing.md: the SmolLM2 spread table and the lab grid's table and figures.

The numbers come from two runs (both resumable, both written under ``out/``)::

    lens-squash mixing --out out/mixing_smollm2 --probes 16
    lens-squash lab --contexts 32,64 --depths 2,4 --packings bos,packed --seeds 0,1 --steps 400 \\
        --batch-size 8 --lr 0.01 --eval-every 50 --d-model 64 --jobs 2 --out out/lab_grid
    .venv/bin/python scripts/over_mixing.py        # rewrites the block between the markers

Only the text between ``<!-- generated:start -->`` and ``<!-- generated:end -->`` is replaced; the
prose around it (what the numbers say) is written by hand. A grid that is still training is read
from the ``run.json`` files that exist, and the page says how many runs it holds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- generated:start -->", "<!-- generated:end -->"


def _mixing_table(path: Path) -> tuple[str, object]:
    from lens_squash.experiments.mixing_result import MixingResult

    data = json.loads(path.read_text(encoding="utf-8"))
    result = MixingResult.from_dict(data["mixing"])
    settings = result.settings
    head = "| layer | " + " | ".join(f"{s}: > {result.threshold:g} | {s}: mean" for s in settings)
    head += " | " + " | ".join(f"ratio {s}" for s in settings if s != "sink") + " |"
    rule = "|" + "---|" * (1 + 2 * len(settings) + len(settings) - 1)
    rows = [head, rule]
    for layer in range(result.n_layers + 1):
        cells = [f"{int(result.spread(s)[layer])} | {float(result.mean_change(s)[layer]):.4f}" for s in settings]
        ratios = [f"{float(result.ratio(s)[layer]):.3f}" for s in settings if s != "sink"]
        rows.append(f"| {layer} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    n_after = len(result.str_tokens) - result.position - 1
    lines = [
        f"Prompt: {len(result.str_tokens)} tokens (the default copy prompt, chat template); token {result.position} "
        f"({result.str_tokens[result.position]!r}) replaced by {len(result.replacements)} random tokens (seed 0), "
        f"{n_after} positions after it. Row `l` is the residual stream entering block `l` (the last row: the "
        "final block's output); `> thr` counts positions after the replaced one whose relative change exceeds "
        f"{result.threshold:g}; `mean` is the mean relative change over them; `ratio` is mean without / mean with the sink.",
        "",
        *rows,
        "",
        "Over the whole depth (summed mean changes, without / with the sink): "
        + ", ".join(f"{s} {result.mean_ratio(s):.3f}" for s in settings if s != "sink")
        + f". Spearman over all heads, sink attention vs head spread: {result.head_correlation:+.3f}; within "
        f"each layer (mean over layers): {float(result.layer_correlations.nanmean()):+.3f}, negative in "
        f"{int((result.layer_correlations < 0).sum())} of {result.n_layers} layers.",
    ]
    lines += [f"Skipped {s}: {why}." for s, why in result.skipped.items()]
    if result.clamp_layer is not None:
        lines.append(
            f"The clamp acts after block {result.clamp_layer} (the first whose first-token norm is ≥ 10× the median)."
        )
    if result.jacobian is not None:
        jac = "| layer | " + " | ".join(f"‖J‖ {s}" for s in result.jacobian) + " |"
        lines += [
            "",
            f"Jacobian ‖∂h_l,i / ∂x_k‖_F, mean over positions after k ({result.jacobian_probes} Gaussian probes):",
            "",
            jac,
        ]
        lines.append("|" + "---|" * (1 + len(result.jacobian)))
        for layer in range(1, result.n_layers + 1):
            lines.append(
                f"| {layer} | "
                + " | ".join(f"{float(result.jacobian_mean(s)[layer]):.4g}" for s in result.jacobian)
                + " |"
            )
    return "\n".join(lines), result


def _grid(folder: Path):
    from lens_squash.lab.results import LabGrid, LabRun

    if (folder / "grid.json").exists():
        return LabGrid.load(folder / "grid.json"), True
    runs = tuple(LabRun.load(p) for p in sorted(folder.glob("*/run.json")))
    return LabGrid(runs=runs, wall_s=float("nan")), False


def _grid_table(grid) -> str:
    frame = grid.to_frame()
    ratio_columns = [c for c in frame.columns if c.startswith("spread_ratio")]
    cols = ["n_ctx", "n_layers", "packing", "seed", "loss_start", "loss_end", "sink_share", "first_token_attention"]
    head = "| ctx | layers | packing | seed | loss start | loss end | sink share | attn → 0 | max head → 0 | "
    head += " | ".join(f"ratio {c.removeprefix('spread_ratio_')}" for c in ratio_columns) + " | wall s |"
    rows = [head, "|" + "---|" * (len(cols) + len(ratio_columns) + 2)]
    for row in frame.itertuples():
        ratios = [f"{getattr(row, c):.3f}" if getattr(row, c) == getattr(row, c) else "—" for c in ratio_columns]
        rows.append(
            f"| {row.n_ctx} | {row.n_layers} | {row.packing} | {row.seed} | {row.loss_start:.3f} | {row.loss_end:.3f} | "
            f"{row.sink_share:.3f} | {row.first_token_attention:.3f} | {row.max_head_attention:.3f} | "
            + " | ".join(ratios)
            + f" | {row.wall_s:.0f} |"
        )
    return "\n".join(rows)


def _uniform_line(grid) -> str:
    """What ``attn → 0`` would be with uniform causal attention: the mean over queries of 1/(i+1)."""
    contexts = sorted({run.config["n_ctx"] for run in grid.runs})
    values = [f"{sum(1 / (i + 1) for i in range(1, n)) / (n - 1):.3f} at ctx {n}" for n in contexts]
    return "For scale, uniform causal attention would give `attn → 0` = " + ", ".join(values) + "."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mixing", type=Path, default=ROOT / "out/mixing_smollm2/results.json")
    parser.add_argument("--grid", type=Path, default=ROOT / "out/lab_grid")
    parser.add_argument("--page", type=Path, default=ROOT / "docs/over_mixing.md")
    args = parser.parse_args()

    from lens_squash.views.export import write_figures

    table, result = _mixing_table(args.mixing)
    grid, complete = _grid(args.grid)
    figures = {
        "smollm2_spread": result.plot("spread"),
        "smollm2_heads": result.plot("heads"),
        "lab_sink_share": grid.plot("sink_share"),
        "lab_spread_ratio": grid.plot("spread"),
        "lab_training": grid.plot("training"),
    }
    if result.jacobian is not None:
        figures["smollm2_jacobian"] = result.plot("jacobian")
    folder = args.page.parent / "over_mixing"
    write_figures(figures, folder, ("png",), width=1100, height=500)
    status = f"{len(grid.runs)} runs" + ("" if complete else " (the grid had not finished: the runs written so far)")
    block = [
        START,
        "### SmolLM2-135M-Instruct: spread per layer with and without the sink",
        "",
        table,
        "",
        *[f"![{name}](over_mixing/{name}.png)" for name in figures if name.startswith("smollm2")],
        "",
        f"### The lab grid: {status}",
        "",
        _grid_table(grid),
        "",
        _uniform_line(grid),
        "",
        *[f"![{name}](over_mixing/{name}.png)" for name in figures if name.startswith("lab")],
        END,
    ]
    page = args.page.read_text(encoding="utf-8")
    before, _, rest = page.partition(START)
    _, _, after = rest.partition(END)
    args.page.write_text(before + "\n".join(block) + after, encoding="utf-8")
    print(f"wrote {args.page} and {len(figures)} figures under {folder}")


if __name__ == "__main__":
    main()
