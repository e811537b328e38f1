"""The per-head attention view: the bytes it carries decode to the patterns (to the quantisation step), token text
cannot escape its script, long stacks keep evenly spread layers, and bad input is refused."""

from __future__ import annotations

import base64
import json
import re
import zlib

import numpy as np
import pytest
import torch

from lens_squash.views.attention_view import attention_view


def _data(view) -> dict:
    script = re.search(r"document\.getElementById\(\"[^\"]+\"\), (\{.*\})\);</script>", view.html, re.S).group(1)
    return json.loads(script)


def _decoded(data: dict, layers: int, heads: int, n: int) -> np.ndarray:
    """The weights the page carries, inflated and (causal ones) put back into full square maps."""
    raw = np.frombuffer(zlib.decompress(base64.b64decode(data["weights"])), dtype=np.uint8)
    if not data["causal"]:
        return raw.reshape(layers, heads, n, n)
    full = np.zeros((layers, heads, n, n), dtype=np.uint8)
    rows, keys = np.tril_indices(n)
    full[:, :, rows, keys] = raw.reshape(layers, heads, -1)
    return full


def _patterns(layers=3, heads=2, n=5, seed=0):
    torch.manual_seed(seed)
    scores = torch.randn(layers, heads, n, n).masked_fill(torch.triu(torch.ones(n, n, dtype=torch.bool), 1), -torch.inf)
    return scores.softmax(-1)


def test_the_bytes_decode_to_the_patterns_within_one_quantisation_step():
    patterns = _patterns()
    data = _data(attention_view(patterns, [f"t{i}" for i in range(5)], {"truth": np.arange(5.0)}))
    assert data["causal"]
    decoded = (_decoded(data, 3, 2, 5) / 255.0) ** 2
    # √a is rounded to 1/255: the error in a is at most (2√a + 1/510) / 510
    bound = (2 * np.sqrt(patterns.numpy()) + 1 / 510) / 510
    assert (np.abs(decoded - patterns.numpy()) <= bound + 1e-12).all()
    assert data["profiles"]["truth"] == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])


def test_hostile_tokens_stay_inside_the_script():
    tokens = ["</script><script>alert(1)</script>", "a&b", "\u202eevil", "x", "y"]
    view = attention_view(_patterns(), tokens)
    assert view.html.lower().count("</script") == 1 and "<script>alert" not in view.html
    shown = _data(view)["tokens"]
    assert shown[0].startswith("</script><script>alert(") and shown[1] == "a&b"  # textContent shows them as text
    assert "\u202e" not in "".join(shown) and shown[2] == "\\u202eevil"  # the control shown as its escape


def test_a_stack_over_budget_keeps_evenly_spread_layers_and_says_so():
    view = attention_view(_patterns(layers=10), list("abcde"), max_weights=2 * 25 * 4)
    assert view.layers == (0, 3, 6, 9)
    data = _data(view)
    assert data["dropped"] == 6 and _decoded(data, 4, 2, 5).shape == (4, 2, 5, 5)


def test_non_causal_patterns_travel_whole():
    """A map with weight above the diagonal (an encoder's) is not cut to its lower triangle."""
    patterns = torch.rand(2, 2, 4, 4).softmax(-1)
    data = _data(attention_view(patterns, list("abcd")))
    assert not data["causal"]
    bound = (2 * np.sqrt(patterns.numpy()) + 1 / 510) / 510
    assert (np.abs((_decoded(data, 2, 2, 4) / 255.0) ** 2 - patterns.numpy()) <= bound + 1e-12).all()


def test_a_causal_stack_is_much_smaller_than_one_byte_per_weight():
    """Deflated lower triangles: a mostly-sink stack (as trained models' are) costs far less than n² bytes a head."""
    n, base = 64, torch.full((8, 4, 64, 64), -8.0)
    base[..., 0] = 4.0  # every query puts almost all its weight on the first token
    scores = base + 0.5 * torch.randn(8, 4, n, n)
    patterns = scores.masked_fill(torch.triu(torch.ones(n, n, dtype=torch.bool), 1), -torch.inf).softmax(-1)
    data = _data(attention_view(patterns, [f"t{i}" for i in range(n)]))
    assert len(data["weights"]) < 0.25 * 8 * 4 * n * n


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="4 dimension"):
        attention_view(torch.ones(5, 5), list("abcde"))
    with pytest.raises(ValueError, match="patterns must be"):
        attention_view(_patterns(), list("abc"))
    with pytest.raises(ValueError, match="colouring 'x' has 3 values"):
        attention_view(_patterns(), list("abcde"), {"x": [1, 2, 3]})
    with pytest.raises(ValueError, match="non-negative"):
        attention_view(-_patterns(), list("abcde"))
