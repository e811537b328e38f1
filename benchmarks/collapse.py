"""Benchmark: the exact collapse path (separate passes) against the shared fast path, same run.

Per dtype, :func:`lens_squash.experiments.collapse.collapse_curve` runs twice on SmolLM2: ``exact=True`` (every
distinct prompt in its own unpadded pass, what the thresholds are judged on) and ``exact=False`` (the
prefix trick and right-padded batches, with its noise floor measured at three lengths). It prints the
cost of the exact path as a ratio to the fast one, the noise floor, and both paths' thresholds.

Both paths alternate (fast, exact, fast, exact, … ``--repeats`` rounds, :mod:`harness`): the ratio is
the median of the pairwise ratios, each run records its CPU share (flagged below 90 % of the threads)
and the load. Forward tokens count every token either path pushed through the model, the fast path's
noise-floor passes included (``CollapseCurves.forward_tokens``); FLOPs are those tokens' weight-matmul
FLOPs (:func:`harness.linear_flops_per_token`; a lower count, see ``_flops``).

``--reference`` adds a third, independent computation: every distinct prompt through a plain
``run_with_cache`` call (no lens_squash code), from which the thresholds are recomputed and compared
with both paths' — the issue's question "do the thresholds equal those of separate passes?".

    .venv/bin/python benchmarks/collapse.py --quick                 # 6 lengths, float32 + bfloat16
    .venv/bin/python benchmarks/collapse.py                         # the CLI's defaults: count_ones, 4:128:4
    .venv/bin/python benchmarks/collapse.py --reference --dtypes bfloat16,float32,float16   # threshold equality
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from harness import alternate, linear_flops_per_token, machine_line

from lens_squash.edge.models import load_model
from lens_squash.experiments.collapse import collapse_curve, family_pairs, model_in_dtype

_KEYS = ("below_resolution", "exactly_zero", "same_prediction")


def _lengths(text: str) -> list[int]:
    if ":" in text:
        start, stop, step = (int(v) for v in text.split(":"))
        return list(range(start, stop + 1, step))
    return [int(v) for v in text.split(",")]


def _first(lengths, flags) -> int | None:
    return next((n for n, f in zip(lengths, flags, strict=True) if f), None)


def reference_thresholds(model, dtype: str, family: str, lengths: list[int], open_ended: bool) -> dict:
    """The three thresholds from one plain ``run_with_cache`` call per distinct prompt."""
    twin = model_in_dtype(model, dtype)
    s, s_star, _ = family_pairs(model, family, lengths, open_ended=open_ended)
    post = f"blocks.{twin.cfg.n_layers - 1}.hook_resid_post"
    runs: dict[tuple[int, ...], tuple[torch.Tensor, int]] = {}
    for tokens in list(s) + list(s_star):
        key = tuple(tokens.tolist())
        if key not in runs:
            with torch.no_grad():
                logits, cache = twin.run_with_cache(tokens[None], names_filter=post)
                y = twin.ln_final(cache[post])[0, -1].double()
            runs[key] = (y, int(logits[0, -1].argmax()))
    pairs = [(runs[tuple(a.tolist())], runs[tuple(b.tolist())]) for a, b in zip(s, s_star, strict=True)]
    eps = torch.finfo(getattr(torch, dtype)).eps
    rel = [float((ya - yb).abs().max() / ya.abs().max()) for (ya, _), (yb, _) in pairs]
    return {
        "below_resolution": _first(lengths, [r < eps for r in rel]),
        "exactly_zero": _first(lengths, [torch.equal(ya, yb) for (ya, _), (yb, _) in pairs]),
        "same_prediction": _first(lengths, [pa == pb for (_, pa), (_, pb) in pairs]),
    }


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def _flops(model, tokens: int) -> float:
    """The blocks' weight-matmul FLOPs of ``tokens`` forward tokens: a lower count (the attention's
    length-dependent term and the unembedding are left out; at these lengths the weights dominate)."""
    return tokens * model.cfg.n_layers * linear_flops_per_token(model.cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="6 lengths (4:24:4), float32 and bfloat16")
    parser.add_argument("--family", default="count_ones", help="prompt family (the CLI's default)")
    parser.add_argument("--lengths", default=None, help="'4:128:4' (the CLI's default) or '5,10,20'")
    parser.add_argument("--dtypes", default=None, help="comma-separated (default float32,bfloat16)")
    parser.add_argument("--open-ended", action="store_true", help="stop the prompt after the sequence")
    parser.add_argument("--reference", action="store_true", help="recompute thresholds from plain passes")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of fast, exact (ratios: pairwise medians)")
    args = parser.parse_args()
    lengths = _lengths(args.lengths or ("4:24:4" if args.quick else "4:128:4"))
    dtypes = (args.dtypes or "float32,bfloat16").split(",")
    model = load_model(n_ctx=512)
    print(
        f"family {args.family}{' (open-ended)' if args.open_ended else ''}, lengths {lengths[0]}..{lengths[-1]} "
        f"({len(lengths)}), torch threads {torch.get_num_threads()}",
        flush=True,
    )
    print(machine_line(), flush=True)
    rows = []
    for dtype in dtypes:
        common = (model, args.family, lengths, (dtype,))
        pair = alternate(
            lambda: collapse_curve(*common, open_ended=args.open_ended, exact=False),  # noqa: B023
            lambda: collapse_curve(*common, open_ended=args.open_ended, exact=True),  # noqa: B023
            args.repeats,
            labels=("fast", "exact"),
        )
        fast, exact = pair.results_a[0], pair.results_b[0]
        t_fast = statistics.median(t.seconds for t in pair.a)
        t_exact = statistics.median(t.seconds for t in pair.b)
        print(pair.describe("fast", "exact"), flush=True)
        row = {
            "dtype": dtype,
            "exact_s": t_exact,
            "fast_s": t_fast,
            "ratio": pair.median_ratio,
            "flagged_runs": len(pair.flagged),
            "exact_tokens": exact.forward_tokens[dtype],
            "fast_tokens": fast.forward_tokens[dtype],
            "exact_gflop": _flops(model, exact.forward_tokens[dtype]) / 1e9,
            "fast_gflop": _flops(model, fast.forward_tokens[dtype]) / 1e9,
            "fast_path": fast.paths[dtype],
            "noise_floor": fast.noise_floor[dtype],
            "noise_lengths": list(fast.noise_lengths),
            "exact": {k: exact.thresholds()[dtype][k] for k in _KEYS},
            "fast": {k: fast.thresholds()[dtype][k] for k in _KEYS},
            "max_rel_dist_gap": float((fast.final("inf") - exact.final("inf")).abs().max()),
        }
        if args.reference:
            row["reference"], row["reference_s"] = _timed(
                reference_thresholds, model, dtype, args.family, lengths, args.open_ended
            )
            row["exact_equals_reference"] = row["exact"] == row["reference"]
            row["fast_equals_reference"] = row["fast"] == row["reference"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(
        f"\n{'dtype':<9} {'exact s':>8} {'fast s':>7} {'exact/fast':>10} {'fast path':>9} {'noise floor':>11} "
        f"{'max |Δ rel dist|':>16}  thresholds exact | fast (below_res, zero, same_pred)"
    )
    for r in rows:
        print(
            f"{r['dtype']}: forward tokens exact {r['exact_tokens']}, fast {r['fast_tokens']} (noise-floor passes "
            f"included): exact ÷ fast {r['exact_tokens'] / r['fast_tokens']:.2f}; about {r['exact_gflop']:.0f} vs "
            f"{r['fast_gflop']:.0f} GFLOP ({r['exact_gflop'] / r['exact_s']:.1f} / {r['fast_gflop'] / r['fast_s']:.1f} "
            f"GFLOP/s achieved); {r['flagged_runs']} run(s) flagged"
        )
    for r in rows:
        th = lambda d: ", ".join("-" if d[k] is None else str(d[k]) for k in _KEYS)  # noqa: E731
        print(
            f"{r['dtype']:<9} {r['exact_s']:>8.1f} {r['fast_s']:>7.1f} {r['ratio']:>9.2f}x {r['fast_path']:>9} "
            f"{r['noise_floor']:>11.2e} {r['max_rel_dist_gap']:>16.2e}  {th(r['exact'])} | {th(r['fast'])}"
            + (
                f"  reference {th(r['reference'])}: exact {'==' if r['exact_equals_reference'] else '!='}, "
                f"fast {'==' if r['fast_equals_reference'] else '!='}"
                if "reference" in r
                else ""
            )
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
