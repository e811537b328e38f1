"""Exact and sketched Jacobians on SmolLM2: time and peak extra memory, as ratios measured in one run.

Each method runs in a fresh Python process (so one method's freed-but-kept heap cannot hide
another's peak) on the same random prompt. Peak extra memory is the largest resident set size seen
by a 2 ms sampling thread during the method, minus the resident size just before it (model loaded,
warmed up, and the heap trimmed with glibc's ``malloc_trim(0)``: loading the model frees hundreds of
MiB that would otherwise stay resident and hide part of every method's peak). Methods:

* ``exact``: ``lens_squash.edge.jacobian.jacobian(mode="exact")`` with its default chunk size, norms included;
* ``jacrev``: ``torch.func.jacrev(f, chunk_size=64)`` of the same function (blocks run by hand, then
  ``ln_final``; parameters frozen as in ``exact``), the Jacobian only, no norms;
* ``vjp``: one forward pass with graph, then single VJPs (the median of 3, times ``d_model``);
* ``sketch``: ``mode="sketch", n_probes=64``;
* ``exact``, ``sketch``: the library's default, ``checkpoint=None`` (whichever of the plain and the
  checkpointed backward has the smaller memory estimate: checkpointed on SmolLM2 at every n);
* ``exact-ckpt``, ``sketch-ckpt``: per-block activation checkpointing forced (``checkpoint=True``);
  ``exact-graph``, ``sketch-graph``: the plain backward forced (``checkpoint=False``, every layer's
  graph kept: what ``exact`` measured before issue 28, 1.21× jacrev's memory at n = 128);
* ``METHOD:plain`` (e.g. ``sketch:plain``, not run by default): ``METHOD`` with the library's
  steady heap turned off (``LENS_SQUASH_STEADY_HEAP=0``, see ``lens_squash/allocator.py``), to
  measure what keeping freed memory in the heap saves;
* ``autograd`` (not run by default): the same VJPs batched by ``torch.autograd.grad(...,
  is_grads_batched=True)`` instead of ``torch.func.vmap``, the alternative the library rejected.

The methods run in rounds (``--repeats``, default 2: A B A B …, :mod:`harness`); every ratio is the
median of the pairwise ratios of the rounds. Each worker reports its CPU seconds and threads (a run
whose CPU share fell below 90 % of its threads is flagged: its time says more about the other jobs
on the machine than about the method) and this machine's fp32 matmul rate measured in that process;
the table gives each method's FLOPs (:func:`harness.jacobian_flops`) and achieved GFLOP/s. Memory
ratios hold under load; time ratios only between runs that were not flagged.

Measured 2026-12-06 (issue 28; n = 128, one thread, each method a fresh worker of ``run``, not
alternated: the session ran out before a full A B A B pair fitted): ``exact`` (now checkpointed by
default) peak extra 422 MiB, estimate 693 MiB, 264 CPU s (82 % CPU share, load 3.9 → 2.3, flagged);
``jacrev`` 988 MiB, 507 CPU s (46 % share, load 14.3 → 3.2, flagged): memory 0.43×, CPU seconds
0.52×. Before the chunked norm sums the checkpointed exact run peaked at 855 MiB (0.87×; the whole
buffer's float64 sum), and the plain path measured 1.21× in issue 28.

Targets (issue 3): exact ≤ 1.0× jacrev in time and ≤ 0.6× in memory, ≤ 1.1× d_model × one VJP;
sketch ≥ 8× faster than exact with Spearman ≥ 0.95 against the exact Frobenius norms.

Targets (issue 18, ``--long``): at n = 1024 the checkpointed sketch (k = 64) costs ≤ 1.5× the plain one
and gives the same norms (≤ 1e-5 relative); at n = 4096 the checkpointed sketch peaks below 16 GiB
resident (model included). The machine's load average is printed beside each run.
Measured 2026-12-02 on the shared 2-core machine at load average 6-9 (``--long --long-n 512 --long-probes 16
--peak-n 4096 --peak-wrt 29 --max-memory-gib 12``): n = 512, k = 16: checkpointed 250 s vs plain 305 s (0.82x),
peak extra 0.98 vs 2.99 GiB, norms bit-equal; n = 4096, k = 64, top block swept: peak RSS 4.77 GiB (+0.25 GiB of
stored inputs for the other 29 blocks = 5.03 GiB) against an estimate of 11.3 GiB. The n = 1024 pair and a full
30-block sweep at n = 4096 did not fit in the session on that load (the plain n = 1024 worker was killed).

Measured 2026-12-02 (``--ckpt-check``-style runs, peaks from the kernel's high-water mark reset after warm-up):
checkpointed sketch k = 64 peak extra 0.20 / 0.50 GiB at n = 128 / 256 (all 30 blocks, chunk 16), 0.54 / 0.92 GiB
at n = 512 (top block, chunk 4 / 16), 1.76 GiB at n = 1024 (2 blocks, chunk 8); the new estimate is 1.01-1.19x
these at n >= 256 (1.57x at n = 128). n = 1024, k = 64, chunk 8, wrt = 28, one process, nothing else of ours
running: plain 108.5 s, checkpointed 63.3 s (0.58x), norms bit-equal (a first try beside other jobs: 1.64x).
Measured 2026-12-02 later, after the new estimate: n = 4096, k = 64, wrt = 29, max_memory 12 GiB: chunk 3,
peak extra 7.86 GiB (estimate 11.17), peak RSS 9.00 GiB + 0.25 GiB of unswept stored inputs = 9.26 GiB, 419 s.

    .venv/bin/python benchmarks/jacobian.py --ckpt-check --pair-wrt 28 --pair-chunk 8   # issue 18 check
    .venv/bin/python benchmarks/jacobian.py            # n = 128 tokens (several minutes on 2 cores)
    .venv/bin/python benchmarks/jacobian.py --quick    # n = 32
    .venv/bin/python benchmarks/jacobian.py --long     # n = 1024 plain vs checkpointed, then n = 4096 (long)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap

from harness import Timing, flop_line, jacobian_flops

WORKER = textwrap.dedent(
    """
    import json, resource, sys, threading, time, gc
    import psutil, torch
    from lens_squash.edge.models import load_model
    from lens_squash.edge import allocator
    from lens_squash.edge import jacobian as jac

    method, n, chunk, threads = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    budget = None if sys.argv[5] == "none" else int(float(sys.argv[5]) * 2**30)
    wrt, n_probes = int(sys.argv[6]), int(sys.argv[7])
    method, checkpoint = method.rsplit("-", 1)[0], {"ckpt": True, "graph": False}.get(method.rsplit("-", 1)[-1])
    if threads > 0:
        torch.set_num_threads(threads)
    chunk = None if chunk == "none" else int(chunk)
    model = load_model(n_ctx=max(n, 16))
    tokens = torch.randint(100, 20000, (n,), generator=torch.Generator().manual_seed(0))
    jac.jacobian(model, tokens[:4], mode="sketch", n_probes=4, checkpoint=checkpoint)  # warm-up: allocator, kernels
    gc.collect()
    if allocator._glibc() is not None:
        allocator._glibc().malloc_trim(0)  # the baseline must not hold freed memory a method could reuse
    try:  # reset the kernel's high-water mark (VmHWM, what ru_maxrss reads): loading the model peaked higher
        open("/proc/self/clear_refs", "w").write("5")
    except OSError:
        pass
    process = psutil.Process()
    peak = [process.memory_info().rss]
    base = peak[0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.002)

    def by_hand(v):
        x = v
        for block in model.blocks:
            x = block(x)
        return model.ln_final(x[:, -1:])[0, 0]

    out = {"method": method, "n": n}
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started, cpu_started = time.perf_counter(), time.process_time()
    if method in ("exact", "sketch"):
        result = jac.jacobian(model, tokens, mode=method, n_probes=n_probes, chunk_size=chunk, checkpoint=checkpoint,
                              max_memory_bytes=budget, wrt=wrt)
        out["frobenius"] = result.frobenius.tolist()
        out["chunk"] = result.provenance["chunk_size"]
        out["checkpoint"] = result.provenance["checkpoint"]
        out["estimated_bytes"] = result.provenance["estimated_bytes"]
    elif method == "jacrev":
        v0 = jac._input_value(model, tokens, 0)  # the embeddings only, as exact's set-up: no extra forward
        with jac._without_parameter_grads(model):
            full = torch.func.jacrev(by_hand, chunk_size=chunk or 64)(v0)
        out["chunk"] = chunk or 64
    elif method == "vjp":
        with jac._without_parameter_grads(model), torch.enable_grad():
            v = jac._input_value(model, tokens, 0).requires_grad_(True)
            y = jac._target_function(model, tokens, jac.GradientRequest(target_pos=n - 1))(v)
            forward = time.perf_counter() - started
            times = []
            for row in range(3):
                cotangent = torch.zeros_like(y)
                cotangent[row] = 1
                t0 = time.perf_counter()
                torch.autograd.grad(y, v, grad_outputs=cotangent, retain_graph=True)
                times.append(time.perf_counter() - t0)
        out["forward"] = forward
        out["one_vjp"] = sorted(times)[1]
    elif method == "autograd":  # the alternative batching: torch.autograd.grad(is_grads_batched=True)
        with jac._without_parameter_grads(model), torch.enable_grad():
            v = jac._input_value(model, tokens, 0).requires_grad_(True)
            y = jac._target_function(model, tokens, jac.GradientRequest(target_pos=n - 1))(v)
            eye = torch.eye(y.shape[0])
            for start in range(0, y.shape[0], chunk or 16):
                torch.autograd.grad(y, v, grad_outputs=eye[start : start + (chunk or 16)],
                                    is_grads_batched=True, retain_graph=True)
        out["chunk"] = chunk or 16
    else:
        raise SystemExit(f"unknown method {method}")
    out["seconds"], out["cpu_seconds"] = time.perf_counter() - started, time.process_time() - cpu_started
    out["threads"] = torch.get_num_threads()
    done.set()
    sampler.join()
    out["peak_extra_bytes"] = peak[0] - base
    out["hwm_extra_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    out["peak_rss_bytes"] = peak[0]
    out["base_rss_bytes"] = base
    sys.path.insert(0, BENCHMARKS)
    import harness
    out["matmul_gflops"] = harness.matmul_gflops("float32")  # this process's speed of light, after the peak
    print("RESULT " + json.dumps(out))
    """
).replace("BENCHMARKS", repr(os.path.dirname(os.path.abspath(__file__))))


#: issue 18: plain then checkpointed sketch in one process (same heap, same load), the kernel's
#: high-water mark reset before each so each peak is its own
PAIR_WORKER = textwrap.dedent(
    """
    import gc, json, sys, time
    import torch
    from lens_squash.edge.models import load_model
    from lens_squash.edge import allocator
    from lens_squash.edge import jacobian as jac

    n, k, chunk, wrt = (int(a) for a in sys.argv[1:5])
    model = load_model(n_ctx=max(n, 16))
    tokens = torch.randint(100, 20000, (n,), generator=torch.Generator().manual_seed(0))
    for checkpoint in (False, True):  # warm-up: allocator, kernels
        jac.jacobian(model, tokens[:4], mode="sketch", n_probes=4, checkpoint=checkpoint)

    def status(key):
        with open("/proc/self/status") as handle:
            return next(int(line.split()[1]) * 1024 for line in handle if line.startswith(key))

    out = {}
    for checkpoint in (False, True):
        gc.collect()
        if allocator._glibc() is not None:
            allocator._glibc().malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # VmHWM (ru_maxrss's counter) restarts from the resident size
        base = status("VmRSS:")
        started = time.perf_counter()
        result = jac.jacobian(model, tokens, mode="sketch", n_probes=k, chunk_size=chunk, wrt=wrt,
                              checkpoint=checkpoint, max_memory_bytes=2**50)
        out["ckpt" if checkpoint else "plain"] = {
            "seconds": time.perf_counter() - started,
            "estimated_bytes": result.provenance["estimated_bytes"],
            "peak_extra_bytes": status("VmHWM:") - base,
            "frobenius": result.frobenius.tolist(),
        }
    print("RESULT " + json.dumps(out))
    """
)


def run(
    method: str,
    n: int,
    chunk: int | None,
    threads: int,
    budget_gib: float | None = None,
    wrt: int = 0,
    n_probes: int = 64,
) -> dict:
    name, _, heap = method.partition(":")
    env = dict(os.environ, LENS_SQUASH_STEADY_HEAP="0" if heap == "plain" else "1", LENS_SQUASH_PROGRESS="0")
    args = [
        sys.executable,
        "-W",
        "ignore",
        "-c",
        WORKER,
        name,
        str(n),
        str(chunk or "none"),
        str(threads),
        str(budget_gib or "none"),
        str(wrt),
        str(n_probes),
    ]
    load = os.getloadavg()
    done = subprocess.run(args, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(
            f"the {method} worker failed (exit status {done.returncode}; -9: killed, e.g. out of memory):\n"
            f"{done.stderr[-3000:]}"
        )
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    out = json.loads(line.removeprefix("RESULT ")) | {
        "method": method,
        "load_before": load,
        "load_after": os.getloadavg(),
    }
    if "cpu_seconds" in out:
        out["timing"] = Timing(
            out["seconds"], out["cpu_seconds"], out["threads"], load[0], out["load_after"][0], method
        )
    return out


def spearman(a: list[float], b: list[float]) -> float:
    import torch

    from lens_squash.algebra.ranks import spearman as rank_correlation

    return rank_correlation(torch.tensor(a), torch.tensor(b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n = 32 tokens instead of 128")
    parser.add_argument("--n", type=int, default=None, help="number of tokens (overrides --quick)")
    parser.add_argument("--chunk", type=int, default=None, help="chunk size for exact (default: the library's)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default)")
    parser.add_argument("--methods", default="vjp,exact,jacrev,sketch")
    parser.add_argument(
        "--repeats", type=int, default=2, help="rounds of the methods in turn (A B A B …); ratios are pairwise medians"
    )
    parser.add_argument(
        "--long",
        action="store_true",
        help="issue 18: sketch plain vs checkpointed at --long-n (1024), then checkpointed at --peak-n (4096)",
    )
    parser.add_argument("--long-n", type=int, default=1024)
    parser.add_argument(
        "--long-probes",
        type=int,
        default=64,
        help="sketch probes of the plain-vs-checkpointed pair (fewer probes make the ratio harder: "
        "the recompute is one extra forward pass whatever k, the rest grows with k)",
    )
    parser.add_argument("--peak-n", type=int, default=4096, help="0 skips the peak run")
    parser.add_argument(
        "--peak-wrt",
        type=int,
        default=0,
        help="the peak run differentiates w.r.t. blocks.{this}.hook_resid_pre: with 29 only the top "
        "block is swept (one block's recompute and k=64 backward, the per-block peak, 1/30 of "
        "the time); the other blocks' stored inputs, (29 - 0)·n·d floats, are then added by count",
    )
    parser.add_argument(
        "--max-memory-gib",
        type=float,
        default=None,
        help="max_memory_bytes for the library's runs (default: half the free memory)",
    )
    parser.add_argument(
        "--ckpt-check",
        action="store_true",
        help="issue 18: checkpointed estimate vs measured peak at --ckpt-n (fresh process each), then plain "
        "and checkpointed sketch at --long-n in one process (time ratio, both peaks)",
    )
    parser.add_argument("--ckpt-n", default="128,256,512", help="token counts of the estimate check")
    parser.add_argument("--ckpt-wrt", type=int, default=0, help="wrt of the estimate check (29: top block only)")
    parser.add_argument("--pair-wrt", type=int, default=0, help="wrt of the plain/checkpointed pair")
    parser.add_argument("--pair-chunk", type=int, default=16, help="chunk size of both runs of the pair")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.long:
        return long_contexts(args)
    if args.ckpt_check:
        return checkpoint_check(args)
    n = args.n or (32 if args.quick else 128)
    methods = args.methods.split(",")
    runs: dict[str, list[dict]] = {method: [] for method in methods}
    for _ in range(args.repeats):  # A B A B …: each pair ran close together, under about the same load
        for method in methods:
            chunk = args.chunk if method.partition(":")[0] in ("exact", "autograd") else None
            r = run(method, n, chunk, args.threads, args.max_memory_gib)
            runs[method].append(r)
            print(f"# {r['timing'].describe()}, {r['peak_extra_bytes'] / 2**20:.0f} MiB", file=sys.stderr, flush=True)
    report(runs, n)


def long_contexts(args) -> None:
    """Issue 18's goals in one run: checkpointed ÷ plain at ``long_n``, and the peak at ``peak_n``."""
    gib = 2**30
    runs = {}
    if args.peak_n:  # first: the headline number, on a machine whose other load changes over the run
        runs[f"sketch-ckpt@{args.peak_n}"] = run(
            "sketch-ckpt", args.peak_n, None, args.threads, args.max_memory_gib, args.peak_wrt
        )
        _progress(f"sketch-ckpt@{args.peak_n}", runs[f"sketch-ckpt@{args.peak_n}"])
    for method in ("sketch-graph", "sketch-ckpt"):
        runs[f"{method}@{args.long_n}"] = run(
            method, args.long_n, None, args.threads, args.max_memory_gib, n_probes=args.long_probes
        )
        _progress(f"{method}@{args.long_n}", runs[f"{method}@{args.long_n}"])
    print(
        f"\nSmolLM2-135M-Instruct, fp32, sketch (k = {args.long_probes} at n = {args.long_n}, k = 64 at "
        f"n = {args.peak_n}), random tokens; each run a fresh process\n"
    )
    print(
        "| run | seconds | chunk | checkpoint | estimate GiB | peak extra GiB | peak RSS GiB | load avg (1 min) before/after |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in runs.items():
        print(
            f"| {name} | {r['seconds']:.1f} | {r['chunk']} | {r['checkpoint']} | {r['estimated_bytes'] / gib:.2f} | "
            f"{r['peak_extra_bytes'] / gib:.2f} | {r['peak_rss_bytes'] / gib:.2f} | "
            f"{r['load_before'][0]:.1f} / {r['load_after'][0]:.1f} |"
        )
    plain, saved = runs[f"sketch-graph@{args.long_n}"], runs[f"sketch-ckpt@{args.long_n}"]
    import torch

    a, b = torch.tensor(plain["frobenius"], dtype=torch.float64), torch.tensor(saved["frobenius"], dtype=torch.float64)
    print("\n| goal | measured | target |\n|---|---|---|")
    print(f"| n = {args.long_n}: checkpointed time ÷ plain time | {saved['seconds'] / plain['seconds']:.2f} | ≤ 1.5 |")
    print(
        f"| n = {args.long_n}: checkpointed peak extra ÷ plain peak extra | "
        f"{saved['peak_extra_bytes'] / max(plain['peak_extra_bytes'], 1):.2f} | (no target) |"
    )
    print(
        f"| n = {args.long_n}: max relative difference of ‖J_i‖_F | {float(((a - b).abs() / a).max()):.1e} | ≤ 1e-5 |"
    )
    if args.peak_n:
        peak = runs[f"sketch-ckpt@{args.peak_n}"]
        # the blocks below wrt would each keep one stored input, [n, d_model] in float32
        unswept = args.peak_wrt * args.peak_n * 576 * 4
        label = (
            ""
            if not args.peak_wrt
            else f" (blocks {args.peak_wrt}.. swept; + {unswept / gib:.2f} GiB of stored inputs for the rest, counted)"
        )
        print(
            f"| n = {args.peak_n}: checkpointed peak resident size (model included){label} | "
            f"{(peak['peak_rss_bytes'] + unswept) / gib:.2f} GiB | < 16 GiB |"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {k: {key: v for key, v in r.items() if key != "frobenius"} for k, r in runs.items()}, handle, indent=1
            )


def checkpoint_check(args) -> None:
    """The checkpointed estimate against the measured peak, and checkpointed ÷ plain in one process."""
    gib = 2**30
    print("| n | wrt | chunk | estimate GiB | peak extra GiB (ru_maxrss) | estimate ÷ peak | seconds |")
    print("|---|---|---|---|---|---|---|")
    for n in (int(x) for x in args.ckpt_n.split(",") if x):
        r = run("sketch-ckpt", n, None, args.threads, args.max_memory_gib, args.ckpt_wrt, args.long_probes)
        peak = max(r["hwm_extra_bytes"], r["peak_extra_bytes"])
        print(
            f"| {n} | {args.ckpt_wrt} | {r['chunk']} | {r['estimated_bytes'] / gib:.3f} | {peak / gib:.3f} | "
            f"{r['estimated_bytes'] / peak:.2f} | {r['seconds']:.1f} |",
            flush=True,
        )
    if not args.long_n:
        return
    worker = [str(v) for v in (args.long_n, args.long_probes, args.pair_chunk, args.pair_wrt)]
    env = dict(os.environ, LENS_SQUASH_PROGRESS="0")
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", PAIR_WORKER, *worker], capture_output=True, text=True, env=env
    )
    if done.returncode != 0:
        raise SystemExit(f"the pair worker failed (exit status {done.returncode}):\n{done.stderr[-3000:]}")
    out = json.loads(next(x for x in done.stdout.splitlines() if x.startswith("RESULT ")).removeprefix("RESULT "))
    plain, saved = out["plain"], out["ckpt"]
    import torch

    a, b = torch.tensor(plain["frobenius"], dtype=torch.float64), torch.tensor(saved["frobenius"], dtype=torch.float64)
    print(
        f"\nsketch k = {args.long_probes}, n = {args.long_n}, wrt = {args.pair_wrt}, chunk {args.pair_chunk}, one process"
    )
    print("| run | seconds | estimate GiB | peak extra GiB |\n|---|---|---|---|")
    for name, r in out.items():
        print(f"| {name} | {r['seconds']:.1f} | {r['estimated_bytes'] / gib:.3f} | {r['peak_extra_bytes'] / gib:.3f} |")
    print(f"| checkpointed ÷ plain time | {saved['seconds'] / plain['seconds']:.2f} (target ≤ 1.5) | | |")
    print(f"| max relative difference of ‖J_i‖_F | {float(((a - b).abs() / a).max()):.1e} | | |")


def _progress(name: str, r: dict) -> None:
    print(
        f"# {name}: {r['seconds']:.1f} s, peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB, "
        f"load {r['load_before'][0]:.1f}",
        file=sys.stderr,
        flush=True,
    )


SMOLLM2 = argparse.Namespace(
    n_layers=30, d_model=576, n_heads=9, n_key_value_heads=3, d_head=64, d_mlp=1536, gated_mlp=True, d_vocab=49152
)


def _median_ratio(runs: dict, a: str, b: str, key: str) -> float:
    """Median over rounds of ``b[key] / a[key]`` (each round ran a then b, close together)."""
    return statistics.median(rb[key] / max(ra[key], 1) for ra, rb in zip(runs[a], runs[b], strict=True))


def report(runs: dict, n: int) -> None:
    mib = 2**20
    print(f"\nSmolLM2-135M-Instruct, fp32, n = {n} tokens, d_model = 576; {len(next(iter(runs.values())))} round(s)\n")
    print("| method | seconds (median) | peak extra MiB (median) | CPU share (min) | flagged | FLOPs, GFLOP/s | note |")
    print("|---|---|---|---|---|---|---|")
    for name, rs in runs.items():
        r, base = rs[0], name.partition(":")[0].removesuffix("-ckpt").removesuffix("-graph")
        seconds = statistics.median(x["seconds"] for x in rs)
        flops = {"exact": jacobian_flops(SMOLLM2, n, 576, recompute=r.get("checkpoint", False))}.get(base)
        flops = jacobian_flops(SMOLLM2, n, 576) if base == "jacrev" else flops
        if base == "sketch":
            flops = jacobian_flops(SMOLLM2, n, 64, recompute=r.get("checkpoint", False))
        rate = flop_line("", flops, seconds).removeprefix(": ") if flops else "-"
        note = (
            f"forward {r['forward']:.2f} s, one VJP {r['one_vjp']:.3f} s"
            if base == "vjp"
            else f"chunk {r.get('chunk')}"
        )
        if "estimated_bytes" in r:
            note += f", estimate_memory {r['estimated_bytes'] / mib:.0f} MiB"
        flagged = sum(x["timing"].flagged for x in rs)
        print(
            f"| {name} | {seconds:.1f} | {statistics.median(x['peak_extra_bytes'] for x in rs) / mib:.0f} | "
            f"{min(x['timing'].cpu_share for x in rs):.0%} | {flagged}/{len(rs)} | {rate} | {note} |"
        )
    print(
        f"\nmatmul fp32 measured in the workers: {min(x['matmul_gflops'] for rs in runs.values() for x in rs):.0f}-"
        f"{max(x['matmul_gflops'] for rs in runs.values() for x in rs):.0f} GFLOP/s; "
        f"load average {min(x['load_before'][0] for rs in runs.values() for x in rs):.1f}-"
        f"{max(x['load_after'][0] for rs in runs.values() for x in rs):.1f}; a run is flagged when its CPU share "
        "fell below 90 % of its threads"
    )
    print("\n| ratio (median of pairwise ratios) | measured | target |\n|---|---|---|")
    if "exact" in runs and "jacrev" in runs:
        print(
            f"| exact time ÷ jacrev(chunk 64) time | {_median_ratio(runs, 'jacrev', 'exact', 'seconds'):.2f} | ≤ 1.0 |"
        )
        print(
            f"| exact memory ÷ jacrev memory | {_median_ratio(runs, 'jacrev', 'exact', 'peak_extra_bytes'):.2f} | ≤ 0.6 |"
        )
    if "exact" in runs and "vjp" in runs:
        floor = 576 * statistics.median(r["one_vjp"] for r in runs["vjp"])
        exact = statistics.median(r["seconds"] for r in runs["exact"])
        print(f"| exact time ÷ (d_model × one VJP = {floor:.1f} s) | {exact / floor:.2f} | ≤ 1.1 |")
    if "exact" in runs and "sketch" in runs:
        print(
            f"| sketch(k=64) speed-up over exact | {1 / _median_ratio(runs, 'exact', 'sketch', 'seconds'):.1f}× | ≥ 8× |"
        )
        rho = spearman(runs["sketch"][0]["frobenius"], runs["exact"][0]["frobenius"])
        print(f"| Spearman(sketch ‖J_i‖_F, exact ‖J_i‖_F) over positions | {rho:.3f} | ≥ 0.95 |")
    for name in ("exact", "sketch"):
        if name in runs and f"{name}:plain" in runs:
            saved = _median_ratio(runs, name, f"{name}:plain", "seconds")
            print(f"| {name}: plain heap time ÷ steady heap time | {saved:.2f} | (no target) |")


if __name__ == "__main__":
    main()
