"""Tokens as safe HTML: escaping, bidi neutralisation, and tokens coloured by sensitivity."""

from __future__ import annotations

import html
import re
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

from lens_squash.core.tokens import (
    BIDI_DISPLAY,
    escape_text,
    neutralize_controls,
    sensitivity_colour,
    sensitivity_html,
    token_label,
)

HOSTILE = "</script><img src=x onerror=alert(1)>"
RLO = "\u202e"


class _Chips(HTMLParser):
    """The chips of a sensitivity_html fragment, parsed as a browser would: (title, background, text)."""

    def __init__(self):
        super().__init__()
        self.chips: list[dict] = []
        self.tags: list[str] = []
        self._open = 0

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        if tag == "bdi":
            style = dict(part.split(":", 1) for part in attrs["style"].split(";") if ":" in part)
            self.chips.append({"title": attrs["title"], "background": style["background"], "text": ""})
            self._open = 1
        elif self._open:
            self._open += 1

    def handle_endtag(self, tag):
        if self._open:
            self._open -= 1

    def handle_data(self, data):
        if self._open == 1:  # the token itself, not its position subscript
            self.chips[-1]["text"] += data


def chips(fragment: str, *, only_chips: bool = True) -> list[dict]:
    parser = _Chips()
    parser.feed(fragment)
    if only_chips:  # nothing a token could have injected
        assert set(parser.tags) <= {"div", "span", "sub", "bdi"}, parser.tags
    return parser.chips


def luminance(colour: str) -> float:
    r, g, b = (int(colour[i : i + 2], 16) for i in (1, 3, 5))
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def test_token_label_is_escaped_and_shows_whitespace():
    assert token_label("<script>") == "&lt;script&gt;"
    assert token_label(HOSTILE) == "&lt;/script&gt;&lt;img␣src=x␣onerror=alert(1)&gt;"
    assert token_label(" a\n") == "␣a\\n"
    assert token_label("&") == "&amp;"
    assert token_label("x" * 100, max_len=10) == "x" * 9 + "…"
    assert RLO not in token_label(f"a{RLO}b") and "202e" in token_label(f"a{RLO}b").lower()


def test_controls_are_shown_not_obeyed():
    for control in BIDI_DISPLAY:
        shown = neutralize_controls(f"x{control}y")
        assert control not in shown and f"⟨U+{ord(control):04X}⟩" in shown
    assert neutralize_controls("a\tb\nc") == "a\tb\nc"  # tab and newline are text, not controls
    assert escape_text(f"<b>{RLO}") == "&lt;b&gt;⟨U+202E⟩"


def test_sensitivity_chips_follow_the_values_on_a_white_to_red_scale():
    rng = np.random.default_rng(0)
    values = rng.random(12) ** 3
    values[3] = 0.0
    parsed = chips(sensitivity_html([f"t{i}" for i in range(12)], values, label="J"))
    assert [c["text"] for c in parsed] == [f"t{i}" for i in range(12)]
    # darker is larger: the chips' luminance is in the reverse order of the values
    order = np.argsort(values, kind="stable")
    shades = np.array([luminance(c["background"]) for c in parsed])
    assert (np.diff(shades[order]) <= 1e-9).all()
    assert parsed[int(values.argmax())]["background"] == "#a50026"  # the scale's top stop
    assert parsed[3]["background"] == "#ffffff"  # 0 is white
    for i, chip in enumerate(parsed):  # hover gives the value to three significant digits
        assert chip["title"] == f"position {i} · J: {values[i]:.3g}"
    assert len(parsed) == 12  # every chip is a <bdi>: a token's direction cannot leak into its neighbours


def test_the_colour_scale_hits_its_stops():
    assert sensitivity_colour(0.0) == "#ffffff" and sensitivity_colour(1.0) == "#a50026"
    assert sensitivity_colour(0.5) == "#fdae61"
    assert sensitivity_colour(2.0) == sensitivity_colour(1.0) and sensitivity_colour(-1.0) == "#ffffff"
    assert sensitivity_colour(float("nan")) == "#dddddd"


def test_log_scale_spreads_decades():
    values = [1.0, 10**-1.5, 1e-3, 1e-6]
    parsed = chips(sensitivity_html(list("abcd"), values, scale="log", decades=3))
    assert [c["background"] for c in parsed] == [sensitivity_colour(1.0), sensitivity_colour(0.5), "#ffffff", "#ffffff"]


def test_hostile_tokens_stay_text_and_cannot_reorder():
    tokens = [HOSTILE, f"abc{RLO}def", "<b>", "&amp;"]
    fragment = sensitivity_html(tokens, [1.0, 2.0, float("nan"), 0.5], label=f"<i>{RLO}")
    assert RLO not in fragment and "<b>" not in fragment and "<img" not in fragment and "<i>" not in fragment
    parsed = chips(fragment)
    assert [c["text"] for c in parsed] == [html.unescape(token_label(t, max_len=None)) for t in tokens]
    assert parsed[2]["background"] == "#dddddd" and parsed[2]["title"].endswith("n/a")  # NaN: grey, no value
    assert re.search(r"linear-gradient\(to right, #ffffff 0%.*#a50026 100%\)", fragment)  # the legend's scale
    assert "2 (linear scale" in fragment  # the legend names the largest value


def test_bad_arguments_say_what_to_pass():
    with pytest.raises(ValueError, match="one value per token"):
        sensitivity_html(["a", "b"], [1.0])
    with pytest.raises(ValueError, match="scale must be one of"):
        sensitivity_html(["a"], [1.0], scale="sqrt")
    with pytest.raises(ValueError, match="decades"):
        sensitivity_html(["a"], [1.0], scale="log", decades=0)


def test_notebook_views_colour_the_prompt_by_the_true_sensitivity():
    """Analysis and SensitivityFlow show their tokens coloured by the Jacobian norm they computed."""
    from lens_squash.edge.flow import flow
    from lens_squash.edge.models import tiny_model
    from lens_squash.experiments.analysis import analyze

    model = tiny_model(n_layers=2, n_heads=2, d_model=16, d_vocab=32, seed=1)
    tokens = torch.tensor([1, 5, 9, 2, 7, 3])
    analysis = analyze(model, tokens, jacobian_mode="exact")
    truth = analysis.table[[c for c in analysis.table.columns if str(c).startswith("jacobian_")][0]].to_numpy()
    parsed = chips(analysis._repr_html_(), only_chips=False)
    assert [c["background"] for c in parsed] == [sensitivity_colour(v / truth.max()) for v in truth]
    result = flow(model, tokens, mode="exact")
    sensitivity = result.sensitivity[0]
    parsed = chips(result._repr_html_(), only_chips=False)
    assert [c["title"].rsplit(": ", 1)[1] for c in parsed] == [f"{float(v):.3g}" for v in sensitivity]
