"""analyze_many on a Dask LocalCluster: 2 workers × 1 thread against 1 worker × 1 thread, same prompts.

In one run and on the same prompts (the chat-template prompts of the shipped suite), this script

* runs ``analyze_many`` in this process with one torch thread: the reference;
* starts a ``LocalCluster(n_workers=1, threads_per_worker=1)``, loads the model on its worker and
  analyses the first prompt there once (timed apart: each worker loads once, and the first analysis
  pays for lazy imports), then times ``analyze_many(..., executor=client)``;
* does the same with two workers;
* checks that both clusters' results equal the reference to the last bit (``torch.equal`` on every
  variant's bound and on the Jacobian's spectral and Frobenius norms, exact equality of the table)
  and prints the wall-time ratio 1×1 / 2×1 (the speed-up from the second worker).

On a machine whose cores are busy with other work the ratio says so: it is measured, not assumed.

    .venv/bin/python benchmarks/many.py            # SmolLM2-135M, 8 prompts, sketched Jacobian
    .venv/bin/python benchmarks/many.py --quick    # tiny-random, 8 prompts, exact Jacobian
"""

from __future__ import annotations

import argparse
import time

import pandas as pd
import torch

from lens_squash.experiments.analysis import analyze
from lens_squash.experiments.many import ManyAnalyses, ModelSpec, analyze_many, cached_model
from lens_squash.experiments.suite import load_suite


def equal_to_the_last_bit(a: ManyAnalyses, b: ManyAnalyses) -> bool:
    for x, y in zip(a.analyses, b.analyses, strict=True):
        if x.bounds.keys() != y.bounds.keys() or not all(
            torch.equal(x.bounds[k].bound, y.bounds[k].bound) for k in x.bounds
        ):
            return False
        if not (_same(x.jacobian.spectral, y.jacobian.spectral) and _same(x.jacobian.frobenius, y.jacobian.frobenius)):
            return False
    try:
        pd.testing.assert_frame_equal(a.frame, b.frame, check_exact=True)
    except AssertionError:
        return False
    return True


def _same(a, b) -> bool:
    """Both absent (a sketch has no spectral norms) or equal to the last bit."""
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


def on_cluster(n_workers: int, spec: ModelSpec, prompts, kwargs) -> tuple[ManyAnalyses, float, float]:
    """(results, seconds to load the model and warm up every worker, seconds for analyze_many)."""
    from dask.distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        started = time.perf_counter()
        client.run(cached_model, spec)  # the one load per worker, timed apart from the prompts
        client.run(_warm_up, spec, prompts[0], kwargs)  # lazy imports and first-call costs, on every worker
        loaded = time.perf_counter() - started
        started = time.perf_counter()
        result = analyze_many(spec, prompts, executor=client, **kwargs)
        return result, loaded, time.perf_counter() - started


def _warm_up(spec: ModelSpec, prompt: str, kwargs: dict) -> None:
    analyze(cached_model(spec), prompt, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny-random with exact Jacobians instead of SmolLM2")
    parser.add_argument("--prompts", type=int, default=8, help="how many suite prompts (chat template ones)")
    args = parser.parse_args()
    if args.quick:
        spec, kwargs = ModelSpec(name="tiny-random", n_ctx=256), {"jacobian_mode": "exact"}
    else:
        spec, kwargs = ModelSpec(n_ctx=512), {"jacobian_mode": "sketch", "n_probes": 64}
    prompts = [p.text for p in load_suite() if p.chat][: args.prompts]
    print(f"{len(prompts)} prompts, model {spec.name} ({spec.dtype}), {kwargs}")

    torch.set_num_threads(1)  # the workers' setting, so the reference rounds as they do
    _warm_up(spec, prompts[0], kwargs)
    started = time.perf_counter()
    reference = analyze_many(spec, prompts, **kwargs)
    in_process = time.perf_counter() - started
    print(f"in process, 1 thread:       {in_process:7.1f} s")

    timings = {}
    for n_workers in (1, 2):
        result, loaded, seconds = on_cluster(n_workers, spec, prompts, kwargs)
        timings[n_workers] = seconds
        same = equal_to_the_last_bit(reference, result)
        print(
            f"LocalCluster {n_workers} × 1 thread: {seconds:7.1f} s (model load and warm-up on the workers {loaded:.1f} s), "
            f"equal to the in-process results to the last bit: {same}"
        )
        if not same:
            raise SystemExit(f"the {n_workers}-worker results differ from the in-process ones")
    print(f"speed-up of 2 × 1 over 1 × 1: {timings[1] / timings[2]:.2f}×")


if __name__ == "__main__":
    main()
