"""Sensitivity flow on SmolLM2 (issue 16): decomposition error and cost, as ratios measured in one run.

On the paper's copy prompt (``cli.copy_prompt(12)``, 89 tokens in the chat template), float32:

* the decomposition's relative error ``‖residual + MLP + value + pattern − g^(l)‖_F / ‖g^(l)‖_F`` at
  every layer (goal ≤ 1e-5), every part an autograd gradient at its own node;
* ``flow(mode="sketch", n_probes=64)`` (all layers, heads and value edges) against
  ``jacobian(mode="sketch", n_probes=64)`` (goal ≤ 1.5×), without and with the bound rows;
* ``flow(mode="exact")`` against ``jacobian(mode="exact")`` (goal ≤ 1.5×; minutes; ``--quick`` skips it);
* the flow's layer-0 sensitivity against the Jacobian's Frobenius norms (same probes), the memory
  estimate of each call and the process's peak resident size while it ran (a 5 ms sampler).

Runs alternate (Jacobian, flow, Jacobian, flow, …) and each time is the minimum over ``--repeats``
runs, so load from other processes on the machine biases both sides alike.

    .venv/bin/python benchmarks/flow.py --quick      # sketch only, no bound rows (about a minute on 2 idle cores)
    .venv/bin/python benchmarks/flow.py              # sketch and exact (several minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time


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


def _timed(fn, name: str):
    with _Peak() as peak:
        started = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - started
    print(f"  {name}: {seconds:.1f} s", flush=True)  # progress: a full run takes minutes
    return result, seconds, peak.extra


def _compare(model, tokens, mode: str, repeats: int, with_bounds: bool) -> dict:
    from lens_squash.edge.flow import flow
    from lens_squash.edge.jacobian import jacobian

    jac_times, flow_times, bound_times = [], [], []
    for _ in range(repeats):
        j, t, j_peak = _timed(lambda: jacobian(model, tokens, mode=mode, n_probes=64), f"jacobian {mode}")
        jac_times.append(t)
        f, t, f_peak = _timed(lambda: flow(model, tokens, mode=mode, n_probes=64, variants=()), f"flow {mode}")
        flow_times.append(t)
        if with_bounds:
            _, t, _ = _timed(lambda: flow(model, tokens, mode=mode, n_probes=64), f"flow {mode} + bound rows")
            bound_times.append(t)
    rel = ((f.sensitivity[0].double() - j.frobenius.double()).abs() / j.frobenius.double()).max()
    out = {
        "mode": mode,
        "jacobian_s": min(jac_times),
        "flow_s": min(flow_times),
        "ratio": min(flow_times) / min(jac_times),
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
    if bound_times:
        out["flow_with_bounds_s"] = min(bound_times)
        out["ratio_with_bounds"] = min(bound_times) / min(jac_times)
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
    results = {"n_tokens": int(tokens.shape[0]), "runs": []}
    modes = args.modes.split(",")
    if "sketch" in modes:
        results["runs"].append(_compare(model, tokens, "sketch", args.repeats, with_bounds=not args.quick))
    if "exact" in modes and not args.quick:
        results["runs"].append(_compare(model, tokens, "exact", 1, with_bounds=False))
    for run in results["runs"]:
        print(
            f"{run['mode']:>6}: jacobian {run['jacobian_s']:.1f} s, flow {run['flow_s']:.1f} s, "
            f"ratio {run['ratio']:.2f}x (goal <= 1.5x)"
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
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
