"""Time and peak memory of the non-Jacobian analysis against prompt length, on SmolLM2 (issue 18).

For each n (512 … 8192) a fresh subprocess loads SmolLM2-135M (fp32), times a plain forward pass
and ``analyze(model, tokens, jacobian_mode=None)`` in turn (forward, analysis, forward, analysis …
``--repeats`` rounds, :mod:`harness`: the ratio is the median of the pairwise ratios; each run's CPU
share is recorded and flagged below 90 % of its threads; FLOP counts of both sides and the matmul
rate of that process are printed) (trace, the default bound rows, spectral,
sinks; patterns streamed beyond ``KEEP_PATTERNS_BYTES``), and reports its peak resident memory
(``ru_maxrss``: one process per n, so each peak is honest). ``--jacobian`` adds the sketched
Jacobian (k = 64, checkpointed when the plain backward would not fit) in its own subprocess.

The parent prints a table, the fitted growth exponents (least squares on log–log), the memory
model of :func:`lens_squash.edge.stream.memory_model` against the measured peaks, and what that model
says fits for a Llama-3-8B-shaped model (32 layers × 32 heads, d 4096, d_mlp 14336, bf16) on one
80 GB GPU. ``--out`` writes the rows as JSON and a log–log SVG figure.

    .venv/bin/python benchmarks/long_context.py --quick              # n = 512, 1024
    .venv/bin/python benchmarks/long_context.py                      # n = 512 … 8192 (slow)
    .venv/bin/python benchmarks/long_context.py --sizes 2048 --json  # one n, machine-readable
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

SIZES = (512, 1024, 2048, 4096, 8192)
GIB = 2**30


def _child(n: int, jacobian: bool, repeats: int, variants: list[str] | None = None) -> dict:
    """One measurement, in this (fresh) process: forward and the analysis alternate ``repeats`` times."""
    import torch
    from harness import alternate, analysis_flops, forward_flops, jacobian_flops, matmul_gflops, with_peak

    from lens_squash.core.progress import silenced
    from lens_squash.edge.models import load_model
    from lens_squash.edge.stream import analysis_memory
    from lens_squash.experiments.analysis import analyze

    model = load_model(n_ctx=max(n, 2048))
    tokens = torch.randint(0, model.cfg.d_vocab, (n,), generator=torch.Generator().manual_seed(0))
    tokens[0] = model.tokenizer.bos_token_id
    baseline = _rss_peak()

    def forward():
        with torch.no_grad():
            model(tokens[None])

    def analysis():
        with silenced():
            if jacobian:
                from lens_squash.edge.jacobian import jacobian as jac

                return jac(model, tokens, mode="sketch", n_probes=64)
            return analyze(model, tokens, jacobian_mode=None, variants=variants)

    peaks: dict[str, list[int]] = {"forward": [], "analysis": []}
    pair = alternate(
        with_peak(forward, peaks["forward"]), with_peak(analysis, peaks["analysis"]), repeats,
        labels=("forward", "analysis"),
    )  # fmt: skip
    out = {
        "n": n,
        "variants": variants or "default",
        "forward_s": pair.a[0].seconds,
        "threads": torch.get_num_threads(),
        "rss_before_gib": baseline / GIB,
        "model": analysis_memory(model, n),
        "ratio_median": pair.median_ratio,
        "pairwise_ratios": pair.ratios,
        "pairwise_cpu_ratios": pair.cpu_ratios,
        "runs": [t.describe() for pair_ in zip(pair.a, pair.b, strict=True) for t in pair_],
        "cpu_share_min": min(t.cpu_share for t in (*pair.a, *pair.b)),
        "flagged_runs": len(pair.flagged),
        "matmul_gflops": {"fp32": matmul_gflops("float32"), "fp64": matmul_gflops("float64")},
        "forward_gflop": forward_flops(model.cfg, n) / 1e9,
    }
    if jacobian:
        out["jacobian_s"] = pair.b[0].seconds
        out["analysis_gflop"] = jacobian_flops(model.cfg, n, 64) / 1e9
    else:
        result = pair.results_b[0]
        out["analysis_s"] = pair.b[0].seconds
        out["analysis_warm_s"] = [t.seconds for t in pair.b[1:]]
        out["parts_s"] = dict(result.seconds)
        out["streamed"] = result.trace.streamed
        out["first_token_share"] = {k: b.first_token_share for k, b in result.bounds.items()}
        parts = analysis_flops(model.cfg, n, grams=True)
        if variants is not None and "certified" not in variants:  # no MLP gains: no Grams, no quadratic forms
            parts = {k: v for k, v in parts.items() if "fp64" not in k}
        out["analysis_parts_gflop"] = {k: v / 1e9 for k, v in parts.items()}
        out["analysis_gflop"] = sum(out["analysis_parts_gflop"].values())
    # the process's peak (as before: the plain forward passes included, which run with the analysis's
    # Gram cache resident), and each side's own (the high-water mark is reset before every run)
    out["peak_gib"] = max(baseline, *peaks["forward"], *peaks["analysis"]) / GIB
    out["analysis_peak_gib"] = [p / GIB for p in peaks["analysis"]]
    out["forward_peak_gib"] = [p / GIB for p in peaks["forward"]]
    return out


def _rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def _measure(n: int, jacobian: bool, timeout: float, repeats: int, variants: list[str] | None = None) -> dict:
    env = dict(os.environ, LENS_SQUASH_PROGRESS="0")
    cmd = [sys.executable, __file__, "--child", str(n), "--repeats", str(repeats)] + (
        ["--jacobian"] if jacobian else []
    )
    cmd += ["--variants", ",".join(variants)] if variants else []
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if done.returncode != 0:
        return {"n": n, "error": (done.stderr.strip().splitlines() or ["killed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def fit_exponent(ns: list[float], values: list[float]) -> float:
    """Slope of log(value) against log(n) by least squares."""
    xs, ys = [math.log(n) for n in ns], [math.log(v) for v in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


LLAMA3_8B = SimpleNamespace(n_layers=32, n_heads=32, d_model=4096, d_mlp=14336, gated_mlp=True, dtype=None)


def llama_fit(budget_gib: float = 80.0) -> list[tuple[int, float, float]]:
    """``(n, streamed GiB, kept GiB)`` of the memory model for Llama-3-8B shapes in bf16."""
    import torch

    from lens_squash.edge.stream import memory_model

    cfg = SimpleNamespace(**vars(LLAMA3_8B))
    cfg.dtype = torch.bfloat16
    weights = 8.03e9 * 2
    rows = []
    for n in (2048, 4096, 8192, 16384, 32768, 65536, 131072):
        streamed = sum(memory_model(cfg, n, kept=False, weights=weights).values()) / GIB
        kept = sum(memory_model(cfg, n, kept=True, weights=weights).values()) / GIB
        rows.append((n, streamed, kept))
    return rows


def longest_fit(kept: bool, budget_gib: float = 80.0) -> int:
    import torch

    from lens_squash.edge.stream import memory_model

    cfg = SimpleNamespace(**vars(LLAMA3_8B))
    cfg.dtype = torch.bfloat16
    low, high = 1, 1 << 20
    while low < high:
        mid = (low + high + 1) // 2
        fits = sum(memory_model(cfg, mid, kept=kept, weights=8.03e9 * 2).values()) <= budget_gib * GIB
        low, high = (mid, high) if fits else (low, mid - 1)
    return low


def svg_figure(rows: list[dict]) -> str:
    """A small log–log figure of analysis time ÷ forward and peak memory against n (hand-written SVG)."""
    ok = sorted((r for r in rows if "error" not in r and "analysis_s" in r), key=lambda r: r["n"])
    if len(ok) < 2:
        return ""
    w, h, pad = 640, 360, 60
    xs = [math.log2(r["n"]) for r in ok]
    series = {
        "peak GiB": [r["peak_gib"] for r in ok],
        "analysis s": [r["analysis_s"] for r in ok],
        "forward s": [r["forward_s"] for r in ok],
    }
    lo = min(math.log2(v) for vs in series.values() for v in vs)
    hi = max(math.log2(v) for vs in series.values() for v in vs)

    def px(x):
        return pad + (x - xs[0]) / max(xs[-1] - xs[0], 1e-9) * (w - 2 * pad)

    def py(y):
        return h - pad - (math.log2(y) - lo) / max(hi - lo, 1e-9) * (h - 2 * pad)

    colours = {"peak GiB": "#d62728", "analysis s": "#1f77b4", "forward s": "#7f7f7f"}
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
        f'<text x="{w / 2}" y="20" text-anchor="middle">SmolLM2-135M: analyze(jacobian_mode=None) vs prompt length (log–log)</text>',
        f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/>',
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>',
    ]
    for r, x in zip(ok, xs, strict=True):
        parts.append(f'<text x="{px(x)}" y="{h - pad + 18}" text-anchor="middle">{r["n"]}</text>')
    for i, (name, values) in enumerate(series.items()):
        points = " ".join(f"{px(x):.1f},{py(v):.1f}" for x, v in zip(xs, values, strict=True))
        parts.append(f'<polyline points="{points}" fill="none" stroke="{colours[name]}" stroke-width="2"/>')
        slope = fit_exponent([r["n"] for r in ok], values)
        parts.append(
            f'<text x="{w - pad - 150}" y="{pad + 16 * i}" fill="{colours[name]}">{name} ∝ n^{slope:.2f}</text>'
        )
    parts.append(f'<text x="{w / 2}" y="{h - 15}" text-anchor="middle">prompt length n (tokens)</text></svg>')
    return "\n".join(parts)


def report(rows: list[dict]) -> str:
    lines = [f"{'n':>6} {'forward s':>10} {'analysis s':>11} {'× fwd':>7} {'peak GiB':>9} {'model GiB':>10}  streamed"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['n']:>6}  failed: {r['error']}")
            continue
        model = sum(r["model"].values()) / GIB + r["rss_before_gib"] - r["model"]["weights"] / GIB
        took = r.get("analysis_s", r.get("jacobian_s", math.nan))
        lines.append(
            f"{r['n']:>6} {r['forward_s']:>10.1f} {took:>11.1f} {took / r['forward_s']:>7.2f} "
            f"{r['peak_gib']:>9.2f} {model:>10.2f}  {r.get('streamed', '-')}"
        )
    for r in rows:
        if "error" in r or "ratio_median" not in r:
            continue
        rates = r["matmul_gflops"]
        lines.append(
            f"n = {r['n']}: analysis ÷ forward, median of pairwise ratios {r['ratio_median']:.2f} "
            f"(pairs {', '.join(f'{x:.2f}' for x in r['pairwise_ratios'])}; the first analysis builds or reads the "
            f"Grams, later ones find them in memory; in CPU seconds "
            f"{', '.join(f'{x:.2f}' for x in r.get('pairwise_cpu_ratios', []))}); CPU share min {r['cpu_share_min']:.0%}, "
            f"{r['flagged_runs']} run(s) flagged (< 90 % of {r['threads']} threads)"
        )
        lines.append(
            f"  FLOPs: forward {r['forward_gflop']:.0f} GFLOP ({r['forward_gflop'] / r['forward_s']:.0f} GFLOP/s "
            f"achieved), analysis {r['analysis_gflop']:.0f} GFLOP "
            + (", ".join(f"{k} {v:.0f}" for k, v in r.get("analysis_parts_gflop", {}).items()))
            + f"; matmul now fp32 {rates['fp32']:.0f}, fp64 {rates['fp64']:.0f} GFLOP/s"
        )
        if "analysis_peak_gib" in r:
            lines.append(
                f"  peak GiB: process {r['peak_gib']:.2f}; each analysis "
                f"{', '.join(f'{p:.2f}' for p in r['analysis_peak_gib'])}; each plain forward "
                f"{', '.join(f'{p:.2f}' for p in r['forward_peak_gib'])} (resident before: {r['rss_before_gib']:.2f})"
            )
        lines.extend(f"  {line}" for line in r["runs"])
    ok = [r for r in rows if "error" not in r and "analysis_s" in r]
    if len(ok) >= 2:
        ns = [r["n"] for r in ok]
        lines.append(
            f"growth exponents: forward n^{fit_exponent(ns, [r['forward_s'] for r in ok]):.2f}, "
            f"analysis n^{fit_exponent(ns, [r['analysis_s'] for r in ok]):.2f}, "
            f"peak memory n^{fit_exponent(ns, [r['peak_gib'] for r in ok]):.2f}"
        )
    lines.append("model GiB = resident before the analysis + memory_model(residual, attention, patterns, gains)")
    lines.append("Llama-3-8B shapes (bf16, 32 × 32 heads) on one 80 GB GPU, by the same memory model:")
    for n, streamed, kept in llama_fit():
        lines.append(f"  n = {n:>6}: streamed {streamed:8.1f} GiB, patterns kept {kept:10.1f} GiB")
    lines.append(
        f"  longest that fits in 80 GB: streamed n ≈ {longest_fit(False)}, patterns kept n ≈ {longest_fit(True)}"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n = 512 and 1024 only")
    parser.add_argument("--sizes", type=int, nargs="*", help="prompt lengths (default 512 … 8192)")
    parser.add_argument("--jacobian", action="store_true", help="time the sketched Jacobian (k = 64) instead")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--out", type=Path, help="folder for long_context.json and long_context.svg")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per n")
    parser.add_argument("--from-json", type=Path, nargs="*", help="report (and --out) rows saved by earlier runs")
    parser.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="forward/analysis rounds per n (A B A B; the ratio is the pairwise median)",
    )
    parser.add_argument(
        "--variants",
        type=lambda text: [name for name in text.split(",") if name],
        help="bound rows to compute, comma-separated (default: the library's defaults; e.g. "
        "paper,rollout,value_rownorm for the defaults without certified)",
    )
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(_child(args.child, args.jacobian, args.repeats, args.variants)))
        return
    sizes = args.sizes or ((512, 1024) if args.quick else SIZES)
    rows = []
    if args.from_json:
        rows = sorted((r for path in args.from_json for r in json.loads(path.read_text())), key=lambda r: r["n"])
        sizes = []
    for n in sizes:
        rows.append(_measure(n, args.jacobian, args.timeout, args.repeats, args.variants))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps(rows, indent=1) if args.json else report(rows))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "long_context.json").write_text(json.dumps(rows, indent=1))
        figure = svg_figure(rows)
        if figure:
            (args.out / "long_context.svg").write_text(figure)


if __name__ == "__main__":
    main()
