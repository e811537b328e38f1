"""Cost of the per-layer sink, compression and over-squashing metrics against one forward pass.

Every metric of :func:`lens_squash.experiments.sinks.sink_analysis` comes from one traced forward pass of
SmolLM2-135M-Instruct (30 layers, 9 heads, d_model 576) on an ``n``-token prompt. This script times,
in one run and on the same prompt:

* the plain forward pass (the baseline every ratio is taken against) and the trace that keeps the
  patterns and residual streams (``trace(keep_resid=True)``);
* each metric family on the traced tensors, and the whole report (``sink_report`` of the trace's summary);
* matrix entropy of the ``[31, n, 576]`` residual stack through the smaller Gram matrix against the
  SVD of the ``n × d`` matrices (``auto`` picks Gram when ``n > d``);
* Dobrushin's coefficient of ``½(A^(l) + I)`` by its causal closed form (``rollout_dobrushin``)
  against ``spectral.dobrushin(method="pairwise")``, the exact ``O(n³)`` definition, timed on
  ``--pairwise-layers`` layers and reported per layer.

    .venv/bin/python benchmarks/sinks.py            # n = 2048
    .venv/bin/python benchmarks/sinks.py --quick    # n = 256
"""

from __future__ import annotations

import argparse
import time

import torch

from lens_squash.algebra.compression import matrix_entropy
from lens_squash.algebra.massive import massive_activations
from lens_squash.algebra.paths import rollout_matrices
from lens_squash.algebra.sinks import (
    first_token_attention,
    mixing_score,
    rollout_dobrushin,
    rollout_mass,
    sink_rate,
    sink_report,
)
from lens_squash.algebra.spectral import dobrushin
from lens_squash.edge.models import load_model
from lens_squash.edge.trace import trace


def _report(tr):
    """What ``sink_analysis`` does after its pass: the per-layer summary, then the one report builder."""
    summary = tr.attention_summary()
    return sink_report(summary, tr.resid_norms, representations=tr.resid, first_resid=tr.first_token_resid)


PARAGRAPH = (
    "Consider the following sequence of digits and words. The river bends twice before the old mill, "
    "where the miller counts sacks of grain: one, two, three, four. Each evening the lamps are lit "
    "and the ledger is closed, yet nobody remembers the first entry. 1 1 1 1 1 1 1 0 1 1 0 1. "
)


def prompt_tokens(model, n: int) -> torch.Tensor:
    """The first ``n`` tokens of the paragraph repeated (raw text, no chat template)."""
    # the tokenizer directly: format_prompt refuses texts longer than n_ctx before we can cut them
    ids = model.tokenizer.encode(PARAGRAPH * (n // 20 + 2))
    if len(ids) < n:
        raise ValueError(f"the benchmark text gives only {len(ids)} tokens, fewer than n = {n}")
    return torch.tensor(ids[:n])


def timed(fn, repeat: int) -> tuple[float, object]:
    """Best wall time of ``repeat`` calls (the machine is shared), and the last result."""
    best, out = float("inf"), None
    for _ in range(repeat):
        started = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - started)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="n = 256 instead of 2048")
    parser.add_argument("--n", type=int, default=None, help="prompt length (overrides --quick)")
    parser.add_argument("--repeat", type=int, default=None, help="best of this many runs (default 3, 1 at n ≥ 1024)")
    parser.add_argument("--pairwise-layers", type=int, default=1, help="layers timed by the O(n³) Dobrushin route")
    args = parser.parse_args()
    n = args.n or (256 if args.quick else 2048)
    repeat = args.repeat or (3 if n < 1024 else 1)

    model = load_model(n_ctx=max(n, 2048))
    tokens = prompt_tokens(model, n)
    rows: list[tuple[str, float]] = []

    def forward():
        with torch.no_grad():
            return model(tokens[None])

    rows.append(("forward pass (baseline)", timed(forward, repeat)[0]))
    seconds, tr = timed(lambda: trace(model, tokens, keep_resid=True), repeat)
    rows.append(("trace(keep_resid=True)", seconds))
    patterns, resid = tr.patterns, tr.resid
    rows += [
        (
            "first-token mass + sink rate (ε = 0.3)",
            timed(lambda: (first_token_attention(patterns), sink_rate(patterns)), repeat)[0],
        ),
        ("mixing score (row entropies)", timed(lambda: mixing_score(patterns), repeat)[0]),
        ("massive activations", timed(lambda: massive_activations(tr.resid_norms, tr.first_token_resid), repeat)[0]),
    ]
    gram_s, gram = timed(lambda: matrix_entropy(resid, method="gram"), repeat)
    svd_s, svd = timed(lambda: matrix_entropy(resid, method="svd"), repeat)
    rows += [("matrix entropy via Gram (smaller side)", gram_s), ("matrix entropy via SVD (n × d)", svd_s)]
    rows.append(("rollout first-token mass (L mat-vecs)", timed(lambda: rollout_mass(patterns), repeat)[0]))
    closed_s, closed = timed(lambda: rollout_dobrushin(patterns), repeat)
    rows.append(("Dobrushin τ, causal closed form (all layers)", closed_s))

    layers = range(min(args.pairwise_layers, tr.n_layers))
    lazy = [rollout_matrices(patterns[layer].double().mean(0)) for layer in layers]
    lazy = [p / p.sum(-1, keepdim=True) for p in lazy]  # the matrices the closed form is taken on
    started = time.perf_counter()
    pairwise = [float(dobrushin(p, method="pairwise")) for p in lazy]
    pair_s = (time.perf_counter() - started) / len(lazy)
    rows.append((f"Dobrushin τ, pairwise O(n³), per layer ({len(lazy)} timed)", pair_s))
    rows.append(
        (
            "sink_report of the trace (all of it; entropy auto = Gram iff n > d)",
            timed(lambda: _report(tr), repeat)[0],
        )
    )

    agree = max(abs(a - float(b)) for a, b in zip(pairwise, closed, strict=False))
    forward_s = rows[0][1]
    print(
        f"SmolLM2-135M-Instruct, n = {n} tokens, float32 model, metrics in float64, "
        f"{torch.get_num_threads()} threads, best of {repeat}\n"
    )
    print("| step | seconds | ÷ forward pass |\n|---|---:|---:|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.3f} | {seconds / forward_s:.2f} |")
    print(f"\nGram / SVD entropy time: {gram_s / svd_s:.2f} (max |difference| {float((gram - svd).abs().max()):.1e})")
    print(
        f"pairwise per layer / closed form per layer: {pair_s / (closed_s / tr.n_layers):.0f}× "
        f"(max |difference| on the timed layers {agree:.1e})"
    )


if __name__ == "__main__":
    main()
