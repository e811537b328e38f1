"""The cost of each contribution proxy's row at n = 2048 against one forward pass of SmolLM2, in the same run.

Issue 25's goal: each contribution proxy's row (every registered ``guarantee="proxy"`` variant built by
``algebra/contributions.py``) ≤ 0.2 × forward. Under a shared machine's load every timing is noisy, so the
forward pass (A) and the row (B) alternate through :func:`harness.alternate`, and the **median of the
pairwise ratios** is reported, with each run's load and CPU share (a run starved of its thread is
flagged, and the CPU-second ratio printed beside the wall one).

* a streamed row (a long prompt) moves through each layer with the graph's own ``step``, which
  :func:`lens_squash.edge.stream.stream_bounds` calls: one block of queries at a time, ``C^(l)`` never
  formed. Its cost is timed as those steps from the patterns and the residual stream entering each
  layer (``--layers`` of the ``L`` layers are timed and scaled by ``L / layers``, since each layer
  costs the same); the patterns come from the streamed sweep's recompute, which is not timed here (it
  is the attention part of a forward pass, shared by every variant of a streamed analysis).

    .venv/bin/python benchmarks/bound_row.py                     # n = 2048
    .venv/bin/python benchmarks/bound_row.py --n 256 --layers 30 # quick
"""

from __future__ import annotations

import argparse
import statistics

import harness
import torch

from lens_squash.algebra.contributions import PROXIES
from lens_squash.algebra.variant_registry import get_variant
from lens_squash.edge.models import load_model
from lens_squash.edge.stream import recompute_patterns
from lens_squash.edge.trace import trace
from lens_squash.experiments.suite import load_suite


def long_prompt(model, n_tokens: int) -> torch.Tensor:
    """``n_tokens`` ids of natural text (the suite's prose, repeated), BOS first."""
    text = " ".join(p.text for p in load_suite(kinds=["prose"]) if not p.chat)
    ids = model.to_tokens(text, prepend_bos=False, truncate=False)[0]
    reps = -(-n_tokens // ids.numel())
    bos = torch.tensor([model.tokenizer.bos_token_id])
    return torch.cat([bos, ids.repeat(reps)])[:n_tokens]


def streamed_row(graph, patterns: dict[int, torch.Tensor], n_layers: int) -> torch.Tensor:
    """The target's row through the timed layers, top layer first, as ``stream_bounds`` steps it."""
    row = torch.zeros(graph.residual.shape[-1], dtype=torch.float64)
    row[-1] = 1.0
    for layer in sorted(patterns, reverse=True):
        row = graph.step(row, layer, patterns[layer])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3, help="A B pairs per variant")
    parser.add_argument("--layers", type=int, default=3, help="layers whose row steps are timed")
    parser.add_argument("--variants", default=",".join(PROXIES))
    args = parser.parse_args()
    model = load_model(n_ctx=args.n)
    tokens = long_prompt(model, args.n)
    traced = trace(model, tokens, keep_patterns=False)  # keeps the residual streams, streams the patterns
    n_layers = model.cfg.n_layers
    step = max(1, n_layers // args.layers)
    patterns = {layer: recompute_patterns(model, traced, layer) for layer in range(0, n_layers, step)}
    patterns = dict(list(patterns.items())[: args.layers])
    scale = n_layers / len(patterns)

    def forward():
        with torch.no_grad():
            model(tokens[None])

    print(f"SmolLM2-135M, n = {args.n} tokens, fp32, layers timed {list(patterns)} (× {scale:g} for all {n_layers})")
    print(harness.machine_line())
    for name in [v for v in args.variants.split(",") if v]:
        graph = get_variant(name).build(traced, model=model)
        pair = harness.alternate(forward, lambda g=graph: streamed_row(g, patterns, n_layers), args.repeats)
        ratios = [r * scale for r in pair.ratios]
        cpu = [r * scale for r in pair.cpu_ratios]
        median = statistics.median(ratios)
        verdict = "met" if median <= 0.2 else "NOT met"
        print(f"\n{name}: row ÷ forward, median of pairs {median:.3f} (pairs {', '.join(f'{r:.3f}' for r in ratios)}; "
              f"CPU seconds {', '.join(f'{r:.3f}' for r in cpu)})   goal ≤ 0.2: {verdict}")  # fmt: skip
        print(pair.describe("forward", f"{name} ({len(patterns)} layers)"))


if __name__ == "__main__":
    main()
