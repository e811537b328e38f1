"""lens_squash: over-squashing, sensitivity bounds and representational collapse for TransformerLens.

Implements and extends Barbero et al., "Transformers need glasses! Information over-squashing in
language tasks" (NeurIPS 2024). See README.md for a tour and docs/ARCHITECTURE.md for the module map.
"""

from .models import (
    DEFAULT_MODEL,
    ModelLoadError,
    format_prompt,
    from_hf_llama,
    load_model,
    tiny_model,
)
from .trace import Trace, trace

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "ModelLoadError",
    "Trace",
    "format_prompt",
    "from_hf_llama",
    "load_model",
    "tiny_model",
    "trace",
]
