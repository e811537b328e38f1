"""``lens-squash lab``: train a grid of tiny transformers on a synthetic language and measure when
attention sinks form and how much they hold back over-mixing (context length × depth × packing × seed)."""

from __future__ import annotations

from .cli_common import write_figure_files
from .cli_names import LAB_PACKINGS
from .core import validate

__all__ = ["add_parser", "check", "print_grid", "run", "saved"]


def add_parser(sub) -> None:
    parser = sub.add_parser("lab", help="train tiny models on synthetic data: what makes sinks form")
    parser.add_argument("--contexts", default="32,128", help="context lengths, comma-separated")
    parser.add_argument("--depths", default="2,4", help="numbers of layers, comma-separated")
    parser.add_argument("--packings", default="bos,packed", help="bos (<bos> at position 0), packed (random offsets)")
    parser.add_argument("--seeds", default="0,1", help="seeds, comma-separated")
    parser.add_argument("--steps", type=int, default=400, help="training steps per run")
    parser.add_argument("--d-model", type=int, default=64, help="residual width (64 … 128 in the issue)")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per step")
    parser.add_argument("--lr", type=float, default=1e-2, help="peak AdamW learning rate")
    parser.add_argument("--eval-every", type=int, default=50, help="measure the sinks every this many steps")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once (worker processes)")
    parser.add_argument("--out", default="out/lab", help="folder for checkpoints, run.json files and grid.json")
    parser.add_argument("--figures", default=None, help="also write the figures as files, e.g. --figures png,svg")


def check(args) -> None:
    args.contexts = validate.parse_int_list(args.contexts, "--contexts", minimum=8, maximum=4096)
    args.depths = validate.parse_int_list(args.depths, "--depths", minimum=1, maximum=12)
    args.packings = validate.parse_names(args.packings, LAB_PACKINGS, "--packings", what="packing")
    args.seeds = validate.parse_int_list(args.seeds, "--seeds", minimum=0, maximum=2**31 - 1)
    validate.check_int(args.steps, "--steps", minimum=1)
    validate.check_int(args.d_model, "--d-model", minimum=8, maximum=1024)
    if args.d_model % 4:
        raise ValueError(f"--d-model {args.d_model}: the lab's models have 4 heads, so pass a multiple of 4")
    validate.check_int(args.batch_size, "--batch-size", minimum=1)
    validate.check_int(args.eval_every, "--eval-every", minimum=1)
    validate.check_float(args.lr, "--lr", low=0.0, high=1.0, low_open=True)
    validate.check_int(args.jobs, "--jobs", minimum=1, maximum=64)
    validate.check_out_dir(args.out, "--out")
    if args.figures is not None:
        from .cli_common import _check_figures

        args.figures = _check_figures(args.figures)


def print_grid(grid) -> None:
    frame = grid.to_frame()
    ratio_columns = [c for c in frame.columns if c.startswith("spread_ratio")]
    head = f"{'ctx':>5} {'L':>2} {'packing':>7} {'seed':>4} {'loss':>6} {'sink share':>10} {'attn→0':>7}"
    print(head + "".join(f" {c.removeprefix('spread_ratio_'):>8}" for c in ratio_columns) + f" {'wall s':>7}")
    for _, row in frame.iterrows():
        ratios = "".join(f" {row[c]:>8.3f}" if row[c] == row[c] else f" {'—':>8}" for c in ratio_columns)
        print(
            f"{row.n_ctx:>5} {row.n_layers:>2} {row.packing:>7} {row.seed:>4} {row.loss_end:>6.3f} "
            f"{row.sink_share:>10.2f} {row.first_token_attention:>7.3f}{ratios} {row.wall_s:>7.0f}"
        )
    print(f"grid: {len(frame)} runs in {grid.wall_s:.0f} s of wall time (finished runs are read back, not retrained)")


def run(args) -> int:
    from pathlib import Path

    from .lab.grid import grid_configs, run_grid

    configs = grid_configs(
        args.contexts,
        args.depths,
        args.packings,
        args.seeds,
        steps=args.steps,
        d_model=args.d_model,
        batch_size=args.batch_size,
        eval_every=args.eval_every,
        lr=args.lr,
    )
    print(f"training {len(configs)} runs into {args.out} ({args.jobs} at a time)", flush=True)
    grid = run_grid(args.out, configs, jobs=args.jobs, log=lambda line: print(line, flush=True))
    print_grid(grid)
    print(f"wrote {Path(args.out) / 'grid.json'}")
    if args.figures:
        write_figure_files(args, {"sink_share": grid.plot("sink_share"), "spread": grid.plot("spread")}, args.out)
    return 0


def saved(args) -> str:
    """What an interrupted grid leaves: finished runs and checkpoints, resumed by the same command."""
    from pathlib import Path

    out = Path(args.out)
    finished = len(list(out.glob("*/run.json")))
    started = len(list(out.glob("*/checkpoint.pt"))) - finished
    return (
        f"{finished} finished runs and {max(started, 0)} checkpoints of unfinished ones are saved in {out}; "
        "run the same command again to resume from them"
    )
