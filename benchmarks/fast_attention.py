"""The trace's attention: TransformerLens's forward against :mod:`lens_squash.edge.fast_attention`.

SmolLM2-135M (fp32, the offline model) on a random prompt of ``--n`` tokens: one plain forward pass
``model(tokens)`` (A) and the same pass inside ``fast_attention(model)`` (B) alternate ``--repeats``
times (:mod:`harness`: the ratio is the median of the pairwise ratios, in wall and CPU seconds; each
run's CPU share is printed and flagged below 90 % of its threads). The logits of both are checked
bit-identical before anything is timed. The FLOPs of one pass and this process's matmul rate are
printed, so either time can be read as a share of the machine's speed of light.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fast_attention.py --n 2048
"""

from __future__ import annotations

import argparse
import os


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048, help="prompt length")
    parser.add_argument("--repeats", type=int, default=3, help="A B rounds (the ratio is the pairwise median)")
    args = parser.parse_args()

    import torch
    from harness import alternate, flop_line, forward_flops, machine_line

    from lens_squash.edge.fast_attention import fast_attention, fast_layers
    from lens_squash.edge.models import load_model

    model = load_model(n_ctx=max(args.n, 2048))
    tokens = torch.randint(0, model.cfg.d_vocab, (1, args.n), generator=torch.Generator().manual_seed(0))

    def plain():
        with torch.no_grad():
            return model(tokens)

    def fast():
        with torch.no_grad(), fast_attention(model):
            return model(tokens)

    if not torch.equal(plain(), fast()):
        raise SystemExit("the fast attention's logits differ from TransformerLens's: nothing timed")
    print(f"SmolLM2-135M fp32, n = {args.n}, fast layers {len(fast_layers(model))} of {model.cfg.n_layers}")
    print(machine_line())
    pair = alternate(plain, fast, args.repeats, labels=("TransformerLens attention", "fast attention"))
    print(pair.describe("TransformerLens", "fast"))
    flops = forward_flops(model.cfg, args.n)
    print(flop_line("plain forward", flops, min(t.seconds for t in pair.a)))
    print(flop_line("fast forward", flops, min(t.seconds for t in pair.b)))
    print(f"load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
