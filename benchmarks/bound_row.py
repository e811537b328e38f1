"""The cost of one variant's row at n = 2048 against one forward pass of SmolLM2, measured in the same run.

Issue 25's goal: each contribution proxy's row (``alti``, ``alti_linear``, ``globenc``) ≤ 0.2 × forward.
(The paper-style rows of issue 3 are not timed here any more: at n = 2048 the trace streams its patterns,
so they come from ``stream_bounds``, timed inside ``analyze`` by ``benchmarks/long_context.py``.) Under a shared machine's load every timing is noisy,
so the forward pass and each row are timed alternately, A B A B, and the **median of the ratios** is
reported (never a ratio of times taken minutes apart).

* a contribution row needs, per layer, the patterns and the residual stream entering the layer. Its
  cost is timed as the layer matrices ``C^(l)`` from those inputs plus the ``L`` vector–matrix
  products (``--layers`` of the ``L`` layers are timed and scaled by ``L / layers``, since each layer
  costs the same); the patterns come from the streamed sweep's recompute, which is not timed here
  (it is the attention part of a forward pass, shared by every variant of a streamed analysis).

    .venv/bin/python benchmarks/bound_row.py                     # n = 2048
    .venv/bin/python benchmarks/bound_row.py --n 256 --layers 30 # quick
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lens_squash.algebra.contributions import KINDS, contribution_matrix, layer_terms, normalise_rows
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


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def contribution_row_seconds(model, traced, kind: str, patterns: dict[int, torch.Tensor]) -> float:
    """Seconds for ``kind``'s row, from the timed layers' matrices scaled to all ``L`` layers."""
    n_layers, n = model.cfg.n_layers, traced.n_tokens
    row = torch.zeros(n, dtype=torch.float64)
    row[-1] = 1.0
    started = time.perf_counter()
    for layer, layer_patterns in patterns.items():
        matrix = normalise_rows(contribution_matrix(kind, layer_patterns, layer_terms(model, traced, layer)))
        row = row @ matrix
    return (time.perf_counter() - started) * n_layers / len(patterns)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3, help="A B pairs per variant")
    parser.add_argument("--layers", type=int, default=3, help="layers whose contribution matrices are timed")
    parser.add_argument("--variants", default=",".join(KINDS))
    args = parser.parse_args()
    model = load_model(n_ctx=args.n)
    tokens = long_prompt(model, args.n)
    traced = trace(model, tokens, keep_patterns=False)  # keeps the residual streams, streams the patterns
    step = max(1, model.cfg.n_layers // args.layers)
    patterns = {layer: recompute_patterns(model, traced, layer) for layer in range(0, model.cfg.n_layers, step)}
    patterns = dict(list(patterns.items())[: args.layers])

    def forward():
        with torch.no_grad():
            model(tokens[None])

    print(f"SmolLM2-135M, n = {args.n} tokens, fp32, {torch.get_num_threads()} threads, layers timed {list(patterns)}")
    print(f"{'row':<16}{'median ratio':>14}{'ratios (row / forward, A B pairs)':>40}")
    for kind in [v for v in args.variants.split(",") if v]:
        ratios = []
        for _ in range(args.repeats):
            forward_s = timed(forward)
            ratios.append(contribution_row_seconds(model, traced, kind, patterns) / forward_s)
        median = statistics.median(ratios)
        verdict = "met" if median <= 0.2 else "NOT met"
        print(f"{kind:<16}{median:>14.3f}    {', '.join(f'{r:.3f}' for r in ratios)}   (goal ≤ 0.2: {verdict})")


if __name__ == "__main__":
    main()
