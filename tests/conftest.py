"""Shared fixtures: seeding, tiny random models, and the real SmolLM2 model (loaded once)."""

from __future__ import annotations

import pytest
import torch

from lens_squash.edge.models import tiny_model

COPY_PROMPT_12 = (
    "Consider the following sequence: " + " ".join(["1"] * 12 + ["0"]) + ". What is the last digit in "
    "this sequence? Please answer exactly as 'The answer to your question is: <ANSWER>'"
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def tiny():
    """A two-layer LayerNorm model with learned absolute positions, float64."""
    return tiny_model(n_layers=2, n_heads=2, d_model=16, d_vocab=32, dtype=torch.float64, seed=1)


@pytest.fixture(scope="session")
def smollm2():
    """The offline SmolLM2-135M-Instruct, float32 (built from the wheel's GGUF, cached)."""
    from lens_squash.edge.models import load_model

    return load_model(n_ctx=512)


@pytest.fixture(scope="session")
def smollm2_hf():
    from lens_squash.edge.models import load_hf_reference

    return load_hf_reference()


@pytest.fixture()
def no_load(monkeypatch):
    """Fail the test if anything loads a model (bad input must be refused before the load)."""
    import lens_squash.edge.models

    def refuse(*args, **kwargs):
        pytest.fail(f"a model was loaded for bad input ({args}, {kwargs})")

    monkeypatch.setattr(lens_squash.edge.models, "load_model", refuse)
