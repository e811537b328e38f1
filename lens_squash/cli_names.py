"""Every name the command line offers, with no torch, TransformerLens, pandas or plotly import.

``lens-squash --help``, ``COMMAND -h`` and the refusal of a mistyped name must answer at once, so the
parsers read their choices from here. Where the real registry is itself light (the model, dtype and
backend names, the paper's prompt texts, the variant registry, which reads the built-in variants'
names and defaults from the algebra's source without importing it) it is used directly; the others are copies, kept equal to their registries
by ``tests/test_cli.py`` (tasks, prompting styles, collapse families, Jacobian modes, figure formats).
"""

from __future__ import annotations

from .algebra.variant_registry import DEFAULT_VARIANTS, variant_names
from .edge.model_names import BACKENDS, DEFAULT_MODEL, DTYPE_NAMES, TINY_MODEL, canonical_dtype
from .experiments.task_texts import COPY_LAST

__all__ = [
    "BACKENDS",
    "COLLAPSE_FAMILIES",
    "COPY_PROMPT",
    "DEFAULT_MODEL",
    "DEFAULT_VARIANTS",
    "DTYPE_NAMES",
    "FIGURE_FORMATS",
    "JACOBIAN_MODES",
    "LAB_PACKINGS",
    "MIXING_REMOVALS",
    "STYLES",
    "TASK_NAMES",
    "TASK_STYLES",
    "TINY_MODEL",
    "VARIANT_NAMES",
    "canonical_dtype",
]

#: every declared or registered variant, in the registry's order (read from source: no torch)
VARIANT_NAMES: tuple[str, ...] = variant_names()
#: ``lens_squash.experiments.collapse_families.FAMILIES``, in its order
COLLAPSE_FAMILIES: tuple[str, ...] = ("count_ones", "random_digits", "copy_ones", "copy_ones_commas")
#: ``lens_squash.edge.jacobian.MODES``
JACOBIAN_MODES: tuple[str, ...] = ("exact", "frozen", "sketch", "frozen-sketch")
#: ``lens_squash.experiments.mixing.REMOVALS``: the ways ``mixing`` removes the sink
MIXING_REMOVALS: tuple[str, ...] = ("no_bos", "mask", "clamp")
#: ``lens_squash.lab.language.PACKINGS``
LAB_PACKINGS: tuple[str, ...] = ("bos", "packed")
#: ``lens_squash.views.export.FORMATS``
FIGURE_FORMATS: tuple[str, ...] = ("png", "svg", "pdf", "jpeg", "webp")
#: ``lens_squash.experiments.task_prompts.TASKS``, in its order
TASK_NAMES: tuple[str, ...] = (
    "copy_last",
    "copy_first",
    "copy_last_hint",
    "copy_alternating",
    "copy_type1",
    "copy_type2",
    "sum_ones",
    "count_ones",
    "count_bernoulli",
    "count_car",
)
#: ``lens_squash.experiments.task_prompts.STYLES``
STYLES: tuple[str, ...] = ("answer", "cot", "cot_few_shot")
#: the prompting styles each task offers (copying tasks only the bare answer, as in the paper)
TASK_STYLES: dict[str, tuple[str, ...]] = {
    name: ("answer",) if name.startswith("copy_") else STYLES for name in TASK_NAMES
}
#: the paper's copying prompt with 12 ones (``copy_prompt(12)``), the default ``--prompt``
COPY_PROMPT = COPY_LAST.format(seq=" ".join(["1"] * 12 + ["0"]))
