"""Write docs/gallery.md: one PNG of every figure kind every result can draw, with its caption.

Every ``(result class, kind)`` that :mod:`lens_squash.views.registry` registers is drawn on a real
result computed from the offline SmolLM2-135M-Instruct (sketched Jacobians, short prompts, so the
page regenerates in minutes on two cores), exported through :mod:`lens_squash.views.export`
(kaleido driving Chromium), and listed in ``docs/gallery.md`` under ``Class.plot("kind")`` with the
figure's own caption under it. The kinds that are whole pages or HTML views rather than plotly
figures (``"page"``, ``"head_view"``) are listed with how to open them. A class without an example here
is an error, so a new figure cannot be left out of the page.

    .venv/bin/python scripts/gallery.py            # several minutes on two cores
    .venv/bin/python scripts/gallery.py --out /tmp/gallery
"""

from __future__ import annotations

import argparse
import functools
import itertools
import sys
import time
from pathlib import Path
from unittest import mock

import plotly.graph_objects as go
import torch

from lens_squash.core.results import figure_kinds
from lens_squash.views import registry  # importing it registers every figure kind
from lens_squash.views.export import write_figures
from lens_squash.views.style import caption_of

ROOT = Path(__file__).resolve().parent.parent
WIDTH = 700  # pixels: every PNG is this wide, its layout drawn at its own size and scaled down
PROMPT = "Copy the digits: 1 1 1 1 1 1 1 0"


@functools.cache
def model():
    from lens_squash.edge.models import load_model

    return load_model(n_ctx=512)  # the real SmolLM2-135M-Instruct, float32, offline


@functools.cache
def tokens() -> torch.Tensor:
    from lens_squash.edge.trace import as_tokens

    return as_tokens(model(), PROMPT, chat=False)


@functools.cache
def analysis():
    from lens_squash.experiments.analysis import analyze

    return analyze(model(), tokens(), jacobian_mode="exact")  # every norm; a short prompt keeps it quick


@functools.cache
def sensitivity_flow():
    from lens_squash.edge.flow import flow

    return flow(model(), tokens(), mode="sketch", variants=("rollout", "certified"))


def task_results():
    """Copying and counting on canned replies: a random model never answers, these parse (or not)."""
    from lens_squash.experiments import task_eval

    tokenizer = model().tokenizer
    replies = itertools.cycle(
        [
            "The answer to your question is: 1",
            "The answer to your question is: 0",
            "no idea",
            "The final answer to your maths question is: 2",
            "The final answer to your maths question is: 5",
        ]
    )

    def canned(_model, prompts, **kwargs):
        return [torch.tensor(tokenizer.encode(next(replies)) + [tokenizer.eos_token_id]) for _ in prompts]

    with mock.patch.object(task_eval, "greedy_generate", canned):
        return task_eval.evaluate(
            model(),
            ["copy_first", "copy_last", "copy_type1", "copy_type2", "count_ones", "sum_ones"],
            [4, 8, 12],
            max_new_tokens=3,
            batch_size=4,
            progress=False,
        )


def _collapse():
    from lens_squash.experiments.collapse import collapse_curve

    return collapse_curve(
        model(),
        "count_ones",
        [4, 8, 16, 32, 64],
        ("float32", "bfloat16", "float16"),
        chat=False,
        open_ended=True,
        exact=False,
    )


def _window_sweep():
    from lens_squash.experiments.collapse_windows import window_sweep

    return window_sweep(model(), "count_ones", [4, 8, 16], [None, 2, 4], chat=False, open_ended=True)


def _pe_collapse():
    from lens_squash.experiments.synthetic import pe_collapse

    return pe_collapse([4, 8, 16], seeds=2, d_model=8, d_vocab=16)


def _ratio_invariance():
    from lens_squash.experiments.synthetic import ratio_invariance

    return ratio_invariance(model(), multiples=(1, 2, 4))


def _tv_decay():
    from lens_squash.algebra.softmax_theory import tv_decay_experiment

    return tv_decay_experiment(n_max=200, perturbed=4, seeds=3, lengths=[8, 20, 50, 100, 200])


def _ablation():
    from lens_squash.experiments.ablation import ablation_effect

    return ablation_effect(model(), tokens(), 0, jacobian=True, n_probes=8)


def _mixing():
    from lens_squash.experiments.mixing import mixing

    return mixing(model(), tokens(), 4, n_samples=2, clamp_layer=0)


def _lab_grid():
    import tempfile

    from lens_squash.lab.grid import grid_configs, run_grid

    small = dict(d_model=16, n_heads=2, d_vocab=16, steps=20, eval_every=5, batch_size=4, eval_rows=4, mixing_prompts=1)
    return run_grid(tempfile.mkdtemp(prefix="gallery-lab-"), grid_configs([16], [1], ["bos", "packed"], [0], **small))


def _copy_sensitivity():
    from lens_squash.experiments.task_theory import copy_sensitivity

    return copy_sensitivity(model(), [3, 6, 9], jacobian_mode="sketch", n_probes=16, variant="rollout")


def _count_collapse():
    from lens_squash.experiments.task_theory import count_collapse

    return count_collapse(model(), [3, 6, 9])


@functools.cache
def _many():
    from lens_squash.experiments.many import analyze_many

    return analyze_many(
        model(),
        [PROMPT, "Count the ones: 1 1 1 1", "The quick brown fox"],
        jacobian_mode="sketch",
        n_probes=8,
        chat=False,
    )


def _compare():
    from lens_squash.experiments.compare_runs import compare

    return compare(_many()[0], _many()[1], labels=("copy prompt", "count prompt"))


#: kinds that are whole HTML pages or views, not plotly figures: listed, not exported
HTML_NOTES = {
    "page": 'the whole report as one offline HTML page: `a.show()` in Jupyter, `a.report("x.html")` to save it',
    "head_view": "every head of a layer as thumbnails (layer slider, click to enlarge, hover a token): renders in Jupyter, "
    '`.write("heads.html")` saves it',
}


#: class name -> how to make one (each figure kind of the class is drawn on it)
EXAMPLES = {
    "Trace": lambda: analysis().trace,
    "JacobianResult": lambda: analysis().jacobian,
    "PathBound": lambda: analysis().bounds["rollout"],
    "BoundFlows": lambda: analysis().bounds["rollout"].flows(),
    "Comparison": lambda: analysis().comparisons["rollout"],
    "SpectralReport": lambda: analysis().spectral,
    "SinkReport": lambda: analysis().sinks,
    "TVDecayResult": _tv_decay,
    "SensitivityFlow": sensitivity_flow,
    "FlowPaths": lambda: sensitivity_flow().top_paths(k=3),
    "Analysis": analysis,
    "ManyAnalyses": _many,
    "RunComparison": lambda: _compare(),
    "CollapseResult": _collapse,
    "WindowSweepResult": _window_sweep,
    "PECollapseResult": _pe_collapse,
    "RatioInvarianceResult": _ratio_invariance,
    "AblationResult": _ablation,
    "MixingResult": _mixing,
    "LabRun": lambda: _lab_grid().runs[0],
    "LabGrid": _lab_grid,
    "TaskResults": task_results,
    "CopySensitivity": _copy_sensitivity,
    "CountCollapse": _count_collapse,
}


def registered_classes() -> list[type]:
    """Every class with a figure kind: the subclasses of Result the registry knows about."""
    from lens_squash.core.results import Result

    seen, todo = [], [Result]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in seen:
                seen.append(sub)
                todo.append(sub)
    return [cls for cls in seen if figure_kinds(cls)]


def export_sizes(fig: go.Figure) -> tuple[int, int, float]:
    """The figure's own layout size (export's 1000 × 600 where it sets none) and the scale that makes
    the PNG :data:`WIDTH` pixels wide: the layout is drawn as designed, only smaller."""
    width, height = fig.layout.width or 1000, fig.layout.height or 600
    return int(width), int(height), round(WIDTH / width, 4)


def write_pngs(drawn, image_dir: Path) -> None:
    """One browser session per distinct scale (write_figures takes one scale for all its figures)."""
    groups: dict[tuple[int, int, float], dict[str, go.Figure]] = {}
    for name, kind, fig in drawn:
        groups.setdefault(export_sizes(fig), {})[f"{name}-{kind}"] = fig
    for (width, height, scale), figs in groups.items():
        write_figures(figs, image_dir, ("png",), width=width, height=height, scale=scale)


def draw_all() -> list[tuple[str, str, go.Figure]]:
    if set(HTML_NOTES) != set(registry.HTML_KINDS):
        raise SystemExit(f"HTML_NOTES must describe every HTML kind: {sorted(registry.HTML_KINDS)}")
    classes = registered_classes()
    missing = sorted(cls.__name__ for cls in classes if cls.__name__ not in EXAMPLES)
    if missing:
        raise SystemExit(f"no gallery example for {', '.join(missing)}: add one to EXAMPLES in scripts/gallery.py")
    drawn = []
    for cls in sorted(classes, key=lambda c: list(EXAMPLES).index(c.__name__)):
        started = time.perf_counter()
        result = EXAMPLES[cls.__name__]()
        for kind in figure_kinds(cls):
            if kind in registry.HTML_KINDS:  # a page or an HTML view: no PNG, the page says how to open it
                continue
            drawn.append((cls.__name__, kind, result.plot(kind)))
        print(f"{cls.__name__}: {', '.join(figure_kinds(cls))} ({time.perf_counter() - started:.1f} s)", flush=True)
    return drawn


def markdown(drawn, image_dir: Path, page: Path) -> str:
    lines = [
        "# Gallery: every figure lens_squash draws",
        "",
        "One PNG of every figure kind of every result (`result.plot(kind)`), drawn on the real",
        f"SmolLM2-135M-Instruct (30 layers, 9 heads; offline) and the prompt `{PROMPT}` (no chat template),",
        "with the exact Jacobian (sketched ones for the flow and the many-prompt results). Under each image is the figure's own caption",
        "(`lens_squash.views.style.caption_of(fig)`). Regenerate it with",
        "`.venv/bin/python scripts/gallery.py`. Figures are interactive in a notebook and in the HTML report;",
        '`lens_squash.views.export.fig_to_file(fig, "fig.pdf")` writes PNG, SVG or PDF.',
        "",
    ]
    lines += ["Besides the figures, `Analysis`, `ManyAnalyses` and `Trace` draw HTML views:", ""]
    lines += [f"- `.plot({kind!r})`: {text}" for kind, text in HTML_NOTES.items()]
    lines += [""]
    current = None
    for name, kind, fig in drawn:
        if name != current:
            lines += [f"## {name}", ""]
            current = name
        image = (image_dir / f"{name}-{kind}.png").relative_to(page.parent)
        lines += [
            f"### `{name}.plot({kind!r})`",
            "",
            f"![{name} {kind}]({image.as_posix()})",
            "",
            (caption_of(fig) or "").replace("\n", " "),
            "",
        ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="folder for gallery.md and gallery/")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    drawn = draw_all()
    image_dir = args.out / "gallery"
    write_pngs(drawn, image_dir)
    page = args.out / "gallery.md"
    page.write_text(markdown(drawn, image_dir, page), encoding="utf-8")
    print(f"wrote {len(drawn)} figures to {image_dir} and {page} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
