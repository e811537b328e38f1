"""The certified bound's MLP gains: dense Gram form against its lower block columns, in one run.

On random float32 weights of one SmolLM2-135M MLP (d_model 576, d_mlp 1536, gated SiLU, so the Gram is
3072 × 3072 float64), times building the Gram and evaluating ``‖J_MLP‖_F`` at ``n`` positions both
ways — the dense ``(W_inᵀ W_in) ∘ (W_out W_outᵀ)`` with ``einsum("pa,ab,pb->p")`` (the baseline), and
:mod:`lens_squash.algebra.symmetric_forms` (what a trace runs) — and prints the ratios and the
largest relative difference of the gains. A last line does the same for a SoLU MLP's Hadamard form
``aᵀ(G_in ∘ G_M)a`` (d_mlp 1536, ungated): the dense product and einsum against per-call lower blocks.

    .venv/bin/python benchmarks/mlp_gain.py            # n = 2048
    .venv/bin/python benchmarks/mlp_gain.py --n 8192 --repeats 1
"""

from __future__ import annotations

import argparse
import time

import torch

from lens_squash.algebra.symmetric_forms import lower_blocks_from_dense, quadratic_form


def _dense_gram(w_in: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    copies = w_in.shape[1] // w_out.shape[0]
    return (w_in.T @ w_in) * (w_out @ w_out.T).repeat(copies, copies)


def _blocked_gram(w_in: torch.Tensor, w_out: torch.Tensor):
    from lens_squash.algebra.symmetric_forms import lower_blocks

    out_gram, d_mlp = w_out @ w_out.T, w_out.shape[0]
    neuron = torch.arange(w_in.shape[1]) % d_mlp
    w_in_rows = w_in.T.contiguous()
    return lower_blocks(
        w_in.shape[1],
        lambda a, b: (w_in_rows[a:] @ w_in[:, a:b]).mul_(
            out_gram.index_select(0, neuron[a:]).index_select(1, neuron[a:b])
        ),
    )


def _solu_line(w_in: torch.Tensor, w_out: torch.Tensor, coeff: torch.Tensor, repeats: int) -> str:
    from lens_squash.edge.lipschitz import _hadamard_blocks

    g_in, g_m = w_in.T @ w_in, w_out @ w_out.T
    dense, old = _best(lambda: torch.einsum("pa,ab,pb->p", coeff, g_in * g_m, coeff), repeats)
    blocks, new = _best(lambda: quadratic_form(coeff, _hadamard_blocks(g_in, g_m)), repeats)
    return (
        f"solu:  dense {dense:.3f} s, blocks {blocks:.3f} s  ({blocks / dense:.2f}×), "
        f"max relative difference {float(((new - old) / old).abs().max()):.1e}"
    )


def _best(fn, repeats: int) -> tuple[float, object]:
    times, value = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - started)
    return min(times), value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048, help="positions")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    d_model, d_mlp = 576, 1536
    w_in = (torch.randn(d_model, 2 * d_mlp, generator=g) / d_model**0.5).double()
    w_out = (torch.randn(d_mlp, d_model, generator=g) / d_mlp**0.5).double()
    coeff = torch.randn(args.n, 2 * d_mlp, generator=g, dtype=torch.float64)
    build_dense, dense = _best(lambda: _dense_gram(w_in, w_out), args.repeats)
    build_blocks, blocks = _best(lambda: _blocked_gram(w_in, w_out), args.repeats)
    form_dense, old = _best(lambda: torch.einsum("pa,ab,pb->p", coeff, dense, coeff), args.repeats)
    form_blocks, new = _best(lambda: quadratic_form(coeff, blocks), args.repeats)
    reference = lower_blocks_from_dense(dense)
    same = max(
        float((a - b).abs().max() / b.abs().max()) for a, b in zip(blocks.columns, reference.columns, strict=True)
    )
    print(f"threads {torch.get_num_threads()}, n = {args.n}, Gram {2 * d_mlp}² float64")
    print(f"build: dense {build_dense:.3f} s, blocks {build_blocks:.3f} s  ({build_blocks / build_dense:.2f}×)")
    print(f"form:  dense {form_dense:.3f} s, blocks {form_blocks:.3f} s  ({form_blocks / form_dense:.2f}×)")
    total_old, total_new = build_dense + form_dense, build_blocks + form_blocks
    print(f"both:  {total_new / total_old:.2f}× the dense path; bytes kept {blocks.nbytes / dense.nbytes:.2f}×")
    print(f"max relative difference: gains {float(((new - old) / old).abs().max()):.1e}, Gram entries {same:.1e}")
    print(_solu_line(w_in[:, :d_mlp], w_out, coeff[:, :d_mlp], args.repeats))


if __name__ == "__main__":
    main()
