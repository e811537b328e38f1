"""Batched greedy generation against one prompt at a time on SmolLM2, measured in the same run.

The same task prompts (copying and counting, through the chat template, of different lengths so that
left padding is exercised) are generated with the same ``max_new_tokens``: once in batches of
``--batch-size`` by :func:`lens_squash.edge.generation.greedy_generate`, once one prompt per call. The goal
(issue 5) is batched throughput ≥ 3× one-at-a-time. The batched outputs must equal the one-at-a-time
outputs token for token (left padding must not change a greedy answer); any mismatch is printed.

    .venv/bin/python benchmarks/generation.py            # 32 prompts, batches of 16, 24 new tokens
    .venv/bin/python benchmarks/generation.py --quick    # 8 prompts, batches of 8, 8 new tokens
"""

from __future__ import annotations

import argparse
import time

import torch

from lens_squash.edge.generation import greedy_generate
from lens_squash.edge.models import format_prompt, load_model
from lens_squash.experiments.task_prompts import make_instances


def prompts_for(model, n_prompts: int) -> list[torch.Tensor]:
    """Copying and counting prompts of varied lengths, cycled until there are ``n_prompts``."""
    lengths = [3, 7, 12, 20]
    instances = make_instances(["copy_last", "copy_first", "count_ones", "sum_ones"], lengths, 1)
    ids = [format_prompt(model, inst.prompt) for inst in instances]
    return [ids[i % len(ids)] for i in range(n_prompts)]


def timed(fn) -> tuple[float, list[torch.Tensor]]:
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small setting (8 prompts, 8 new tokens)")
    parser.add_argument("--prompts", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    n_prompts = args.prompts or (8 if args.quick else 32)
    batch_size = args.batch_size or (8 if args.quick else 16)
    new_tokens = args.max_new_tokens or (8 if args.quick else 24)

    model = load_model(device=args.device)
    prompts = prompts_for(model, n_prompts)
    greedy_generate(model, prompts[:2], max_new_tokens=2)  # warm-up: first-call allocations

    def batched():
        return [
            out
            for start in range(0, n_prompts, batch_size)
            for out in greedy_generate(model, prompts[start : start + batch_size], max_new_tokens=new_tokens)
        ]

    def one_at_a_time():
        return [greedy_generate(model, [p], max_new_tokens=new_tokens)[0] for p in prompts]

    t_single, single = timed(one_at_a_time)
    t_batched, batch = timed(batched)
    tokens = sum(len(o) for o in single)
    mismatches = [i for i, (a, b) in enumerate(zip(batch, single, strict=True)) if not torch.equal(a, b)]

    widths = sorted({len(p) for p in prompts})
    print(
        f"SmolLM2-135M-Instruct on {args.device} ({torch.get_num_threads()} threads), {n_prompts} prompts of "
        f"{widths[0]}–{widths[-1]} tokens, max_new_tokens={new_tokens}, {tokens} tokens generated\n"
    )
    print("| run | seconds | prompts/s | new tokens/s |\n|---|---|---|---|")
    print(f"| one prompt at a time | {t_single:.2f} | {n_prompts / t_single:.2f} | {tokens / t_single:.1f} |")
    print(
        f"| batched (batch_size={batch_size}) | {t_batched:.2f} | {n_prompts / t_batched:.2f} | "
        f"{tokens / t_batched:.1f} |"
    )
    ratio = t_single / t_batched
    print(f"| **speed-up** | {ratio:.2f}× | goal ≥ 3× | {'met' if ratio >= 3 else 'NOT met'} |")
    print(f"\noutputs identical to one-at-a-time: {n_prompts - len(mismatches)}/{n_prompts}")
    for i in mismatches:
        decode = model.tokenizer.decode
        print(
            f"  mismatch at prompt {i} ({len(prompts[i])} tokens): batched {decode(batch[i].tolist())!r} "
            f"vs alone {decode(single[i].tolist())!r}"
        )


if __name__ == "__main__":
    main()
