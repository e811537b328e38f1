"""Which analyses run on which TransformerBridge family, against plain autograd on the HF model:
writes this TransformerLens line's section of ``docs/architectures_bridge.md``.

    .venv/bin/python scripts/architectures_bridge.py        # TransformerLens 3.9's bridge
    .venv-tl4/bin/python scripts/architectures_bridge.py    # TransformerLens 4.3's bridge

For every family in ``tests/hf_families.py`` (random weights built from a ``transformers`` config,
norm gains and biases away from their defaults) it runs what ``tests/test_bridge_conformance.py``
checks and tabulates the outcome: the trace's patterns and ``y_last`` against HF's
``output_attentions`` and final-norm output, the certified bound's smallest ratio to HF's frozen
Jacobian (base weights and the adversarial gains), over-mixing's masked-sink residual streams against
HF's eager attention masked at key 0, and the exact and frozen Jacobians' largest relative difference
from ``torch.autograd.functional.jacobian`` of the HF model.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lens_squash.algebra.variants import path_bound  # noqa: E402
from lens_squash.core.records import provenance  # noqa: E402
from lens_squash.edge.jacobian import jacobian  # noqa: E402
from lens_squash.edge.sink_removal import mask_sink_hooks, residual_streams  # noqa: E402
from lens_squash.edge.trace import trace  # noqa: E402
from tests.edge.test_sink_removal import hf_streams  # noqa: E402
from tests.hf_families import (  # noqa: E402
    ADVERSARIAL_GAINS,
    CAUSAL,
    TOKENS,
    boot,
    build_hf,
    hf_final,
    hf_jacobian,
    set_gains,
)


def _describe(error: Exception) -> str:
    text = str(error).split(";")[0].replace("|", "/").replace("\n", " ")[:100]
    kind = "refused" if type(error).__name__ == "UnsupportedModelError" else f"**{type(error).__name__}**"
    return f"{kind}: {text}"


def _cell(fn) -> str:
    try:
        return fn()
    except Exception as error:  # noqa: BLE001 - the table reports whatever happened
        return _describe(error)


def _rel(got: torch.Tensor, expected: torch.Tensor) -> str:
    return f"{float((got.double() - expected.double()).abs().max() / expected.double().abs().max()):.0e}"


def _models(name: str, seed: int = 0, attack: str | None = None):
    reference, copy = build_hf(name, seed=seed), build_hf(name, seed=seed)  # float32 where FLOAT32_BUILT
    if attack is not None:
        for model in (reference, copy):
            set_gains(model, name, ADVERSARIAL_GAINS[attack])
    return reference, boot(copy)


def _certified(name: str) -> str:
    worst = float("inf")
    for attack in (None, *sorted(ADVERSARIAL_GAINS)):
        reference, bridge = _models(name, seed=3, attack=attack)
        bound = path_bound(trace(bridge, TOKENS, lipschitz=True), "certified", model=bridge).bound
        truth = torch.linalg.matrix_norm(hf_jacobian(reference, TOKENS, frozen=True).permute(1, 0, 2), ord=2)
        real = truth > 1e-12 * truth.max()
        worst = min(worst, float((bound[: len(truth)][real] / truth[real]).min()))
    return f"ok (min ratio {worst:.3g})" if worst >= 1 - 1e-9 else f"**VIOLATED ({worst:.3g})**"


def _masked_sink(reference, bridge) -> str:
    """Over-mixing's sink removal: the residual streams with key 0 masked and renormalised against HF's eager
    attention with key 0's scores at −∞ (queries 1…n−1)."""
    got = residual_streams(bridge, TOKENS[None], fwd_hooks=mask_sink_hooks(bridge))["resid"][0]
    with torch.no_grad():
        return _rel(got, hf_streams(reference, TOKENS, masked=True))


def _row(name: str) -> list[str]:
    reference, bridge = _models(name)
    try:
        traced = trace(bridge, TOKENS, lipschitz=True)
    except Exception as error:  # noqa: BLE001 - a family refused whole (check_model) gets one cell per column
        return [_describe(error)] * 6
    out = hf_final(reference, TOKENS, output_attentions=True)
    patterns = torch.stack([a[0] for a in out.attentions])
    cells = [
        _rel(traced.patterns, patterns),
        _rel(traced.y_last, out.last_hidden_state[0, -1]),
        _cell(lambda: _certified(name)),
    ]
    cells.append(_cell(lambda: _masked_sink(reference, bridge)))
    for mode in ("exact", "frozen"):
        cells.append(
            _cell(
                lambda mode=mode: _rel(
                    jacobian(bridge, TOKENS, mode=mode, keep_full=True).full,
                    hf_jacobian(reference, TOKENS, frozen=mode == "frozen"),
                )
            )
        )
    return cells


def section(rows: dict[str, list[str]]) -> str:
    versions = provenance()["versions"]
    tl = versions.get("transformer-lens", versions.get("transformer_lens", "?"))
    header = ["family", "patterns", "y_last", "certified", "masked sink", "exact Jacobian", "frozen Jacobian"]
    lines = [
        f"<!-- tl{tl.split('.')[0]} -->",
        f"## TransformerLens {tl} (transformers {versions.get('transformers', '?')}, torch {versions.get('torch', '?')})",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *(f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows.items()),
        f"<!-- /tl{tl.split('.')[0]} -->",
    ]
    return "\n".join(lines)


HEADER = """# Architecture support on the TransformerBridge

Generated by `scripts/architectures_bridge.py` under each TransformerLens line (do not edit by hand).
One random-weight `transformers` model per family (`tests/hf_families.py`: d_model 32, 2 layers, 4 heads,
10 tokens, float64 except XGLM's float32 (its bridge overflows in float64); norm gains and biases drawn away from their defaults), booted
with `TransformerBridge.boot_transformers(..., hf_model=...)` and `enable_compatibility_mode(no_processing=True)`.
Every number is a largest difference relative to the largest reference entry, the reference being plain
autograd on the HF model (frozen: HF's own softmaxes and norm scales replayed as constants). *certified*:
the smallest bound / HF frozen-Jacobian ratio over the base weights and the adversarial gains
(small_gains, split_gains); a theorem says it is ≥ 1. *masked sink*: over-mixing's residual streams with
key 0 masked and renormalised, against HF's eager attention with key 0's scores at −∞.
A refusal raises `UnsupportedModelError` in one line; a family refused whole (multi-head latent attention,
mixture-of-attention heads, SSM hybrids, a bridge that fails or does not compute its transformers model)
shows the same refusal in every column.
Differences near 1e-7 come from steps transformers computes in float32 inside a float64 model.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Tabulate bridge support per family against HF autograd.")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "architectures_bridge.md")
    args = parser.parse_args(argv)
    rows = {}
    for name in sorted(CAUSAL):
        rows[name] = _row(name)
        print(f"{name}: {' | '.join(rows[name])}", flush=True)
    new = section(rows)
    text = args.out.read_text() if args.out.exists() else HEADER
    text = HEADER + text[text.index("<!-- tl") :] if "<!-- tl" in text else text  # the header is this script's
    marker = new.split("\n", 1)[0]
    pattern = re.escape(marker) + r".*?" + re.escape(marker.replace("<!-- ", "<!-- /"))
    text = re.sub(pattern, lambda _: new, text, flags=re.S) if marker in text else text.rstrip() + "\n\n" + new
    args.out.write_text(text.rstrip() + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
