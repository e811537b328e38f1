"""Which analyses run on which TransformerLens architecture family: writes ``docs/architectures.md``.

    .venv/bin/python scripts/architectures.py [--out docs/architectures.md]

For every family in ``tests/families.py`` (random float64 weights, d_model 32, 3 layers, 12 tokens)
it runs the conformance suite's checks and tabulates the outcome: the trace (patterns equal to
``run_with_cache``), each path-sum variant (ok, or the refusal's reason), the certified bound's
smallest bound / frozen-Jacobian ratio over the base weights and every adversarial edit of
``tests/reference.py`` (it must be ≥ 1), and the exact and frozen Jacobians' largest difference from
an independent ``torch.func.jacrev`` of the whole model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lens_squash.algebra.variants import VARIANTS, path_bound  # noqa: E402
from lens_squash.core.records import provenance  # noqa: E402
from lens_squash.core.support import UnsupportedModelError  # noqa: E402
from lens_squash.edge.jacobian import jacobian  # noqa: E402
from lens_squash.edge.trace import trace  # noqa: E402
from tests.families import FAMILIES, TOKENS, build  # noqa: E402
from tests.reference import ADVERSARIAL, adversarial, reference_jacobian  # noqa: E402

JACOBIAN_TOLERANCE = 1e-10


def _clip(text: str, width: int) -> str:
    """``text`` cut at a word boundary within ``width`` characters, with an ellipsis when cut."""
    if len(text) <= width:
        return text
    return text[:width].rsplit(" ", 1)[0].rstrip(",:(") + " …"


def _short(error: Exception) -> str:
    text = str(error).split(";")[0].replace("|", "/").replace("\n", " ")
    if isinstance(error, UnsupportedModelError):
        return f"refused: {_clip(text, 110)}"
    return f"**error**: {type(error).__name__}: {_clip(text, 90)}"


def _trace_cell(model) -> str:
    t = trace(model, TOKENS, lipschitz=True)
    _, cache = model.run_with_cache(TOKENS[None])
    expected = torch.stack([cache[f"blocks.{l}.attn.hook_pattern"][0] for l in range(model.cfg.n_layers)])
    return "ok" if torch.equal(t.patterns, expected) else "**patterns differ from run_with_cache**"


def _bound_ratio(name: str, variant: str) -> float:
    """Smallest bound / frozen-Jacobian ratio of ``variant`` over the base weights and every adversarial edit."""
    worst = float("inf")
    for attack in [None, *sorted(ADVERSARIAL)]:
        model = build(name, seed=3)
        if attack is not None:
            adversarial(model, attack)
        t = trace(model, TOKENS, lipschitz=True)
        bound = path_bound(t, variant, model=model).bound
        truth = jacobian(model, TOKENS, mode="frozen").spectral
        bound = bound[: len(truth)]
        slack = 1e-12 * float(truth.max())  # entries that are 0 up to float64 rounding
        if not (bound >= truth * (1 - 1e-9) - slack).all():
            return float((bound / truth.clamp_min(1e-300)).min())
        real = truth > slack
        worst = min(worst, float((bound[real] / truth[real]).min()))
    return worst


def _variant_cell(name: str, model, t, variant: str) -> str:
    try:
        bound = path_bound(t, variant, model=model).bound
    except Exception as error:  # noqa: BLE001 - the table reports whatever happened
        return _short(error)
    if not (torch.isfinite(bound).all() and (bound >= 0).all()):
        return "**non-finite or negative**"
    if not VARIANTS[variant].is_bound:  # a proxy promises no inequality to check
        return "ok"
    ratio = _bound_ratio(name, variant)
    return f"ok (min ratio {ratio:.3g})" if ratio >= 1 - 1e-9 else f"**VIOLATED (min ratio {ratio:.3g})**"


def _jacobian_cell(model, mode: str) -> str:
    got = jacobian(model, TOKENS, mode=mode, keep_full=True)
    expected = reference_jacobian(model, TOKENS, frozen=mode == "frozen")[:, : got.n_tokens]
    error = float((got.full - expected).abs().max())
    return f"ok ({error:.0e})" if error <= JACOBIAN_TOLERANCE else f"**mismatch {error:.1e}**"


def _row(name: str) -> list[str]:
    model = build(name)
    try:
        cells = [_trace_cell(model)]
    except Exception as error:  # noqa: BLE001
        return [_short(error)] * (3 + len(VARIANTS))
    t = trace(model, TOKENS, lipschitz=True)
    cells += [_variant_cell(name, model, t, variant) for variant in VARIANTS]
    for mode in ("exact", "frozen"):
        try:
            cells.append(_jacobian_cell(model, mode))
        except Exception as error:  # noqa: BLE001
            cells.append(_short(error))
    return cells


def _family_note(name: str) -> str:
    knobs = ", ".join(f"{k}={v!r}" for k, v in FAMILIES[name].items() if k not in ("attn_types",))
    return knobs or "defaults (LayerNorm, learned positions, gelu_new)"


def render(rows: dict[str, list[str]]) -> str:
    versions = provenance()["versions"]
    header = ["family", "trace", *VARIANTS, "exact Jacobian", "frozen Jacobian"]
    lines = [
        "# Architecture support",
        "",
        "Generated by `.venv/bin/python scripts/architectures.py` (do not edit by hand). "
        f"TransformerLens {versions.get('transformer-lens', versions.get('transformer_lens', '?'))}, "
        f"torch {versions.get('torch', '?')}.",
        "",
        "One random-weight float64 model per family (`tests/families.py`: d_model 32, 3 layers, 4 heads, "
        "12 tokens, random norm gains, biases and sink logits). *trace*: patterns equal `run_with_cache`. "
        "*certified*: the smallest bound / frozen-Jacobian spectral norm over every position (where the "
        "Jacobian is not 0 up to rounding), the base "
        f"weights and {len(ADVERSARIAL)} adversarial edits ({', '.join(sorted(ADVERSARIAL))}); "
        "a theorem says it is ≥ 1. *Jacobians*: the largest entry difference from `torch.func.jacrev` "
        f"of the whole model (frozen: with replayed constant patterns and norm scales), tolerance "
        f"{JACOBIAN_TOLERANCE:.0e}. A refusal raises `lens_squash.core.support.UnsupportedModelError` and says "
        "what to use instead.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows.items()]
    lines += [
        "",
        "**TransformerBridge.** Every analysis reads the same hook names on a bridge in compatibility mode "
        "(`enable_compatibility_mode(no_processing=True)`); `lens_squash.edge.adapter` establishes each "
        "bridge's norm gains and block shape by probing its modules, and checks on every block that the "
        "attention, MLP and residual update it reads reproduce what the bridge computed and what the wrapped "
        "`transformers` attention computes (else it refuses, in one line). Fifty-three causal decoder families "
        "(and six SSM, hybrid or bidirectional ones, refused), each against plain autograd on the `transformers` "
        "model, on TransformerLens 3.9 and 4.3: "
        "[architectures_bridge.md](architectures_bridge.md) (`scripts/architectures_bridge.py`, "
        "`tests/test_bridge_conformance.py`).",
    ]
    lines += ["", "Family configurations (on top of the shared base):", ""]
    lines += [f"- **{name}**: {_family_note(name)}" for name in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Tabulate analysis support per architecture family.")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "architectures.md", help="markdown file to write")
    args = parser.parse_args(argv)
    rows = {}
    for name in FAMILIES:
        rows[name] = _row(name)
        print(f"{name}: {' | '.join(rows[name])}", flush=True)
    args.out.write_text(render(rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
