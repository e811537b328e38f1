"""Cost of the streamed per-layer attention statistics against producing the layer.

A long prompt's trace calls :meth:`lens_squash.algebra.attention_stream.AttentionStream.add` once per
layer on that layer's ``[head, query_pos, key_pos]`` softmax patterns. This script times ``add`` on
random causal patterns of SmolLM2's shape (9 heads) against, in the same run, one ``torch.softmax``
over the same ``[head, n, n]`` masked scores (what producing the layer costs), and prints the ratio.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/attention_stream.py            # n = 1024, 2048
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/attention_stream.py 4096 --heads 9
"""

from __future__ import annotations

import argparse
import time

import torch

from lens_squash.algebra.attention_stream import AttentionStream


def _best_ms(fn, repeats: int) -> float:
    """The fastest of ``repeats`` calls after one warm-up (the least disturbed by other work)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def _scores(n: int, heads: int) -> torch.Tensor:
    scores = torch.randn(heads, n, n, generator=torch.Generator().manual_seed(0))
    return scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))


def run(n: int, heads: int, repeats: int) -> None:
    scores = _scores(n, heads)
    layer = scores.softmax(-1)
    stream = AttentionStream(n, spectral_atol=1e-4)  # one stream: each add is one more layer
    softmax = _best_ms(lambda: scores.softmax(-1), repeats)
    add = _best_ms(lambda: stream.add(layer), repeats)
    print(f"n = {n:5d}  softmax {softmax:8.1f} ms  add {add:8.1f} ms  add/softmax {add / softmax:5.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("n", nargs="*", type=int, default=[1024, 2048], help="prompt lengths")
    parser.add_argument("--heads", type=int, default=9, help="heads per layer (SmolLM2: 9)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (best kept)")
    args = parser.parse_args()
    print(f"threads {torch.get_num_threads()}, heads {args.heads}")
    for n in args.n:
        run(n, args.heads, args.repeats)


if __name__ == "__main__":
    main()
