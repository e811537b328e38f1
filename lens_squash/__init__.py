"""lens_squash: over-squashing, sensitivity bounds and representational collapse for TransformerLens.

Implements and extends Barbero et al., "Transformers need glasses! Information over-squashing in
language tasks" (NeurIPS 2024). See README.md for a tour and docs/ARCHITECTURE.md for the module map.

The names a notebook needs are here: load a model, trace or analyse a prompt, bound it, take its
Jacobian norms, and the result classes those return::

    from lens_squash import analyze, copy_prompt, load_model
    a = analyze(load_model(), copy_prompt(12), jacobian_mode="sketch")
"""

from .analysis import DEFAULT_VARIANTS, Analysis, analyze
from .compare import Comparison
from .flow import SensitivityFlow, flow
from .jacobian import JacobianResult
from .jacobian import jacobian as jacobian_norms
from .many import ManyAnalyses, ModelSpec, analyze_many
from .models import (
    DEFAULT_MODEL,
    TINY_MODEL,
    ModelLoadError,
    check_model,
    format_prompt,
    from_hf_llama,
    load_model,
    tiny_model,
)
from .sinks import SinkReport
from .spectral import SpectralReport
from .support import UnsupportedModelError
from .tasks import copy_prompt
from .trace import Trace, trace
from .variants import VARIANTS, PathBound, path_bound

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_VARIANTS",
    "TINY_MODEL",
    "VARIANTS",
    "Analysis",
    "Comparison",
    "JacobianResult",
    "ManyAnalyses",
    "ModelLoadError",
    "ModelSpec",
    "PathBound",
    "SensitivityFlow",
    "SinkReport",
    "SpectralReport",
    "Trace",
    "UnsupportedModelError",
    "analyze",
    "analyze_many",
    "check_model",
    "copy_prompt",
    "flow",
    "format_prompt",
    "from_hf_llama",
    "jacobian_norms",
    "load_model",
    "path_bound",
    "tiny_model",
    "trace",
]
