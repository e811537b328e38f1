"""The path-sum bound row at n = 2048 against one forward pass of SmolLM2 (issue 3's ≤ 5 % goal).

Measured in one run, on the same prompt: one plain forward pass (no hooks, no grad), the traced pass
that captures the attention patterns, and then the bound row of each variant from the trace (paper
and rollout read the trace's head-mean stack, L vector–matrix products, O(L·n²); the per-head
variants L·H of them, O(L·H·n²)). The ratio row / forward is what the goal is about; the trace's
own overhead is printed too.

    .venv/bin/python benchmarks/bound_row.py            # n = 2048
    .venv/bin/python benchmarks/bound_row.py --quick    # n = 256
"""

from __future__ import annotations

import argparse
import time

import torch

from lens_squash.algebra.variants import path_bound
from lens_squash.edge.models import load_model
from lens_squash.edge.trace import trace
from lens_squash.experiments.suite import load_suite


def long_prompt(model, n_tokens: int) -> torch.Tensor:
    """``n_tokens`` ids of natural text (the suite's prose, repeated), BOS first."""
    text = " ".join(p.text for p in load_suite(kinds=["prose"]) if not p.chat)
    ids = model.to_tokens(text, prepend_bos=False, truncate=False)[0]
    reps = -(-n_tokens // ids.numel())
    bos = torch.tensor([model.tokenizer.bos_token_id])
    return torch.cat([bos, ids.repeat(reps)])[:n_tokens]


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n = 256 instead of 2048")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    n = 256 if args.quick else 2048
    model = load_model(n_ctx=n)
    tokens = long_prompt(model, n)
    with torch.no_grad():
        forward = best_of(lambda: model(tokens[None]), args.repeats)
    started = time.perf_counter()
    traced = trace(model, tokens)
    traced_s = time.perf_counter() - started
    rows = [("forward pass", forward, 1.0), ("trace (patterns etc.)", traced_s, traced_s / forward)]
    for variant in ("paper", "rollout", "value_rownorm"):
        seconds = best_of(lambda v=variant: path_bound(traced, v), args.repeats)
        rows.append((f"bound row: {variant}", seconds, seconds / forward))
    print(f"SmolLM2-135M, n = {n} tokens, fp32, {torch.get_num_threads()} threads")
    print(f"{'step':<28}{'seconds':>10}{'× forward':>12}")
    for name, seconds, ratio in rows:
        print(f"{name:<28}{seconds:>10.3f}{ratio:>12.3f}")
    paper = next(ratio for name, _, ratio in rows if name == "bound row: paper")
    print(
        f"goal: the paper's bound row ≤ 0.05 × forward: {paper:.3f} — {'met' if paper <= 0.05 else 'NOT met'} "
        "(per-head variants such as value_rownorm read all L·H·n² weights and are shown for comparison)"
    )


if __name__ == "__main__":
    main()
