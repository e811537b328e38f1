"""The README's notebook example runs as written (on tiny-random instead of SmolLM2, so it is fast)."""

from __future__ import annotations

import re
from pathlib import Path

import plotly.graph_objects as go

README = Path(__file__).resolve().parents[1] / "README.md"


def _notebook_example() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## In a notebook") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_notebook_example_runs_and_every_line_shown_gives_a_figure_or_a_result():
    code = _notebook_example()
    assert "load_model()" in code
    code = code.replace("load_model()", 'load_model("tiny-random", n_ctx=512)')
    code = code.replace("n_probes=64", "n_probes=8").replace(
        'jacobian_mode="sketch"', 'jacobian_mode="sketch", n_probes=8'
    )
    namespace: dict = {}
    figures = []
    for line in code.strip().splitlines():
        statement = line.split("  #")[0].rstrip()
        if not statement:
            continue
        try:  # an expression line is what a notebook cell would display
            value = eval(compile(statement, "README", "eval"), namespace)
        except SyntaxError:
            exec(compile(statement, "README", "exec"), namespace)
            continue
        if isinstance(value, go.Figure):
            figures.append(value)
        else:
            assert hasattr(value, "_repr_html_"), statement
    assert len(figures) >= 3
    for fig in figures:
        assert fig.layout.meta and fig.layout.meta.get("caption"), fig.layout.title.text
