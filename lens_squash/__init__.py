"""lens_squash: over-squashing, sensitivity bounds and representational collapse for TransformerLens.

Implements and extends Barbero et al., "Transformers need glasses! Information over-squashing in
language tasks" (NeurIPS 2024). See README.md for a tour and docs/ARCHITECTURE.md for the module map.

The names a notebook needs are here: load a model, trace or analyse a prompt, bound it, take its
Jacobian norms, and the result classes those return::

    from lens_squash import analyze, copy_prompt, load_model
    a = analyze(load_model(), copy_prompt(12), jacobian_mode="sketch")

Every name is imported on first use (PEP 562), so ``import lens_squash`` and ``lens-squash --help``
do not pay for torch and TransformerLens until something needs them.
"""

from importlib import import_module

__version__ = "0.1.0"

# public name -> (module, attribute); the module is imported the first time the name is read
_EXPORTS: dict[str, tuple[str, str]] = {
    "DEFAULT_MODEL": (".edge.models", "DEFAULT_MODEL"),
    "DEFAULT_VARIANTS": (".algebra.variant_registry", "DEFAULT_VARIANTS"),
    "TINY_MODEL": (".edge.models", "TINY_MODEL"),
    "VARIANTS": (".algebra.variant_registry", "VARIANTS"),
    "VariantSpec": (".algebra.variant_registry", "VariantSpec"),
    "register_variant": (".algebra.variant_registry", "register_variant"),
    "Analysis": (".experiments.analysis", "Analysis"),
    "Comparison": (".algebra.compare", "Comparison"),
    "JacobianResult": (".edge.jacobian", "JacobianResult"),
    "ManyAnalyses": (".experiments.many", "ManyAnalyses"),
    "ModelLoadError": (".edge.models", "ModelLoadError"),
    "ModelSpec": (".experiments.many", "ModelSpec"),
    "PathBound": (".algebra.variants", "PathBound"),
    "RunComparison": (".experiments.compare_runs", "RunComparison"),
    "SensitivityFlow": (".edge.flow", "SensitivityFlow"),
    "SinkReport": (".algebra.sinks", "SinkReport"),
    "SpectralReport": (".algebra.spectral", "SpectralReport"),
    "Trace": (".edge.trace", "Trace"),
    "UnsupportedModelError": (".core.support", "UnsupportedModelError"),
    "analyze": (".experiments.analysis", "analyze"),
    "analyze_many": (".experiments.many", "analyze_many"),
    "check_model": (".edge.models", "check_model"),
    "collapse_curve": (".experiments.collapse", "collapse_curve"),
    "compare": (".experiments.compare_runs", "compare"),
    "copy_prompt": (".experiments.task_prompts", "copy_prompt"),
    "flow": (".edge.flow", "flow"),
    "format_prompt": (".edge.models", "format_prompt"),
    "from_hf_llama": (".edge.models", "from_hf_llama"),
    "jacobian_norms": (".edge.jacobian", "jacobian"),
    "load_model": (".edge.models", "load_model"),
    "path_bound": (".algebra.variants", "path_bound"),
    "pe_collapse": (".experiments.synthetic", "pe_collapse"),
    "run_tasks": (".experiments.tasks", "run_tasks"),
    "tiny_model": (".edge.models", "tiny_model"),
    "trace": (".edge.trace", "trace"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lens_squash' has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    value = getattr(import_module(module, __name__), attribute)
    globals()[name] = value  # later reads skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
