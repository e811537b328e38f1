"""Benchmark: a prefix-closed collapse sweep in one forward pass per dtype vs one pass per length.

Family ``copy_ones`` in the chat template, open-ended (the prompt stops after the run of ones), so
every ``s`` and ``s*`` is a prefix of the longest prompt. The baseline runs one forward pass per
length over ``s*`` (which contains ``s`` as a prefix, so it is already the cheaper per-length way)
through the same :func:`lens_squash.collapse.measure_pairs`, in the same process, and checks that
both give the same distances.

    .venv/bin/python benchmarks/collapse.py            # 64 lengths up to 512 tokens, fp32 + bf16
    .venv/bin/python benchmarks/collapse.py --quick    # 16 lengths up to 128 tokens
"""

from __future__ import annotations

import argparse
import time

import torch

from lens_squash.collapse import family_pairs, measure_pairs, model_in_dtype
from lens_squash.models import load_model


def _lengths(model, n_lengths: int, max_tokens: int) -> list[int]:
    # the prompt's fixed part, measured, so the longest s* has at most max_tokens tokens
    fixed = len(family_pairs(model, "copy_ones", [1], open_ended=True)[1][0]) - 2
    top = max_tokens - fixed - 1
    return sorted({round(1 + i * (top - 1) / (n_lengths - 1)) for i in range(n_lengths)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 lengths up to 128 tokens")
    args = parser.parse_args()
    n_lengths, max_tokens = (16, 128) if args.quick else (64, 512)
    model = load_model(n_ctx=max_tokens + 8)
    lengths = _lengths(model, n_lengths, max_tokens)
    s, s_star, _ = family_pairs(model, "copy_ones", lengths, open_ended=True)
    print(f"{len(lengths)} lengths, {lengths[0]}..{lengths[-1]} ones, longest prompt {len(s_star[-1])} tokens, "
          f"torch threads {torch.get_num_threads()}")
    rows = []
    for dtype in ("float32", "bfloat16"):
        twin = model_in_dtype(model, dtype)
        start = time.perf_counter()
        shared = measure_pairs(twin, s, s_star)
        t_shared = time.perf_counter() - start
        start = time.perf_counter()
        per_length = [measure_pairs(twin, [a], [b]) for a, b in zip(s, s_star, strict=True)]
        t_base = time.perf_counter() - start
        base_tokens = sum(m.forward_tokens for m in per_length)
        base_dist = torch.cat([m.distances for m in per_length])
        gap = float((base_dist - shared.distances).abs().max() / shared.distances.abs().max())
        rows.append((dtype, shared.forward_tokens, base_tokens, t_shared, t_base, gap))
        del twin
    print(f"\n{'dtype':<9} {'shared tok':>10} {'per-len tok':>11} {'tok ratio':>9} "
          f"{'shared s':>9} {'per-len s':>9} {'speed-up':>8} {'max rel gap':>11}")
    for dtype, tok, base_tok, ts, tb, gap in rows:
        print(f"{dtype:<9} {tok:>10} {base_tok:>11} {base_tok / tok:>8.1f}x {ts:>9.2f} {tb:>9.2f} "
              f"{tb / ts:>7.1f}x {gap:>11.1e}")


if __name__ == "__main__":
    main()
