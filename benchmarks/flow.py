"""Sensitivity flow on SmolLM2 (issue 16): decomposition error and cost, as ratios measured in one run.

On the paper's copy prompt (``cli.copy_prompt(12)``, 89 tokens in the chat template), float32:

* the decomposition's relative error ``‖residual + MLP + value + pattern − g^(l)‖_F / ‖g^(l)‖_F`` at
  every layer (goal ≤ 1e-5), every part an autograd gradient at its own node;
* ``flow(mode="sketch", n_probes=64)`` (all layers, heads and value edges) against
  ``jacobian(mode="sketch", n_probes=64)`` (goal ≤ 1.5×), without and with the bound rows;
* ``flow(mode="exact")`` against ``jacobian(mode="exact")`` (goal ≤ 1.5×; minutes; ``--quick`` skips it);
* the flow's layer-0 sensitivity against the Jacobian's Frobenius norms (same probes), the memory
  estimate of each call and the process's peak resident size while it ran (a 5 ms sampler).

Runs alternate (Jacobian, flow, Jacobian, flow, …, :mod:`harness`) and each ratio is the median of
the pairwise ratios over ``--repeats`` rounds, so load from other processes biases both sides of a
pair alike; each run records its CPU share (flagged below 90 % of the threads), and the Jacobian's
FLOPs and the machine's matmul rate are printed beside the times.

    .venv/bin/python benchmarks/flow.py --quick      # sketch only, no bound rows (about a minute on 2 idle cores)
    .venv/bin/python benchmarks/flow.py              # sketch and exact (several minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time

from harness import alternate, flop_line, jacobian_flops, machine_line


class _Peak:
    """Peak resident set size above the level at entry, sampled every 5 ms."""

    def __enter__(self):
        import psutil

        self.process = psutil.Process()
        self.base = self.peak = self.process.memory_info().rss
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.done.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.extra = self.peak - self.base


def _peaked(fn):
    """``fn`` with the peak resident size above its start recorded beside its result."""

    def run():
        with _Peak() as peak:
            result = fn()
        return result, peak.extra

    return run


def _compare(model, tokens, mode: str, repeats: int, with_bounds: bool) -> dict:
    from lens_squash.edge.flow import flow
    from lens_squash.edge.jacobian import jacobian

    pair = alternate(
        _peaked(lambda: jacobian(model, tokens, mode=mode, n_probes=64)),
        _peaked(lambda: flow(model, tokens, mode=mode, n_probes=64, variants=())),
        repeats,
        labels=(f"jacobian {mode}", f"flow {mode}"),
    )
    print(pair.describe(f"jacobian {mode}", f"flow {mode}"), flush=True)
    (j, j_peak), (f, f_peak) = pair.results_a[-1], pair.results_b[-1]
    rel = ((f.sensitivity[0].double() - j.frobenius.double()).abs() / j.frobenius.double()).max()
    rows = 576 if mode == "exact" else 64
    out = {
        "mode": mode,
        "jacobian_s": statistics.median(t.seconds for t in pair.a),
        "flow_s": statistics.median(t.seconds for t in pair.b),
        "ratio": pair.median_ratio,
        "pairwise_ratios": pair.ratios,
        "cpu_share_min": min(t.cpu_share for t in (*pair.a, *pair.b)),
        "flagged_runs": len(pair.flagged),
        "jacobian_gflop": jacobian_flops(model.cfg, tokens.shape[0], rows) / 1e9,
        "decomposition_error_per_layer": f.decomposition_error.tolist(),
        "decomposition_error_max": float(f.decomposition_error.max()),
        "layer0_vs_jacobian_max_rel": float(rel),
        "jacobian_estimated_MiB": j.provenance["estimated_bytes"] / 2**20,
        "jacobian_peak_MiB": j_peak / 2**20,
        "flow_estimated_MiB": f.provenance["estimated_bytes"] / 2**20,
        "flow_peak_MiB": f_peak / 2**20,
        "flow_chunk": f.provenance["chunk_size"],
        "jacobian_chunk": j.provenance["chunk_size"],
        "flow_checkpoint": f.provenance["checkpoint"],
        "jacobian_checkpoint": j.provenance["checkpoint"],
        "load_average": os.getloadavg(),
    }
    if with_bounds:
        bounds = alternate(
            _peaked(lambda: jacobian(model, tokens, mode=mode, n_probes=64)),
            _peaked(lambda: flow(model, tokens, mode=mode, n_probes=64)),
            repeats,
            labels=(f"jacobian {mode}", f"flow {mode} + bound rows"),
        )
        print(bounds.describe(f"jacobian {mode}", f"flow {mode} + bound rows"), flush=True)
        out["flow_with_bounds_s"] = statistics.median(t.seconds for t in bounds.b)
        out["ratio_with_bounds"] = bounds.median_ratio
        out["flagged_runs"] += len(bounds.flagged)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="sketch only, without the run that adds the bound rows (skips the exact comparison)",
    )
    parser.add_argument("--repeats", type=int, default=2, help="runs per method; the minimum time is kept (default 2)")
    parser.add_argument(
        "--modes", default="sketch,exact", help="comparisons to run (default both; --quick runs sketch only)"
    )
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    from lens_squash.cli import copy_prompt
    from lens_squash.edge.flow import flow
    from lens_squash.edge.models import load_model
    from lens_squash.edge.trace import as_tokens

    model = load_model()
    tokens = as_tokens(model, copy_prompt(12))
    flow(model, tokens[:8], mode="sketch", n_probes=4, variants=())  # warm-up: allocator, kernels
    print(machine_line(), flush=True)
    results = {"n_tokens": int(tokens.shape[0]), "runs": []}
    modes = args.modes.split(",")
    if "sketch" in modes:
        results["runs"].append(_compare(model, tokens, "sketch", args.repeats, with_bounds=not args.quick))
    if "exact" in modes and not args.quick:
        results["runs"].append(_compare(model, tokens, "exact", 1, with_bounds=False))
    for run in results["runs"]:
        print(
            f"{run['mode']:>6}: jacobian {run['jacobian_s']:.1f} s, flow {run['flow_s']:.1f} s, "
            f"ratio {run['ratio']:.2f}x (median of pairwise ratios; goal <= 1.5x)"
            + (
                f"; with bound rows {run['flow_with_bounds_s']:.1f} s = {run['ratio_with_bounds']:.2f}x"
                if "ratio_with_bounds" in run
                else ""
            )
        )
        print(
            f"        decomposition error max over layers {run['decomposition_error_max']:.2e} (goal <= 1e-5); "
            f"layer-0 sensitivity vs jacobian max rel {run['layer0_vs_jacobian_max_rel']:.1e}"
        )
        print(
            f"        memory: jacobian est {run['jacobian_estimated_MiB']:.0f} MiB / peak {run['jacobian_peak_MiB']:.0f} MiB; "
            f"flow est {run['flow_estimated_MiB']:.0f} MiB / peak {run['flow_peak_MiB']:.0f} MiB "
            f"(chunks {run['jacobian_chunk']} / {run['flow_chunk']}, checkpointed {run['jacobian_checkpoint']} / "
            f"{run['flow_checkpoint']}; load average {run['load_average'][0]:.1f})"
        )
        print("        per-layer error: " + " ".join(f"{e:.1e}" for e in run["decomposition_error_per_layer"]))
        print(
            f"        {flop_line('jacobian', run['jacobian_gflop'] * 1e9, run['jacobian_s'])}; "
            f"CPU share min {run['cpu_share_min']:.0%}, {run['flagged_runs']} run(s) flagged (< 90 %)"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
