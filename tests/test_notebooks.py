"""The demo notebooks: committed clean or, for those in SAVED_WITH_OUTPUTS, with their outputs (a PNG beside every
figure, no warning, no widget state); each one executes top to bottom.

Each notebook runs in a fresh kernel of *this* interpreter (a kernelspec written to the test's
temporary folder, so a user-level ``python3`` kernelspec pointing elsewhere cannot take over, and a
fresh clone needs no ``ipykernel install``), with ``LENS_SQUASH_SMALL=1`` so it picks its small
setting (tiny models or a short SmolLM2 prompt), inside a temporary working folder.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

DEMOS = Path(__file__).resolve().parent.parent / "demos"
NOTEBOOKS = (
    "01_quickstart",
    "02_bound_vs_gradient",
    "03_representational_collapse",
    "04_copying_and_counting",
)
KERNEL = "lens-squash-test"
FIGURE_MIME = "application/vnd.plotly.v1+json"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


def _read(name: str) -> nbformat.NotebookNode:
    path = DEMOS / f"{name}.ipynb"
    assert path.is_file(), f"missing demo notebook {path}"
    return nbformat.read(path, as_version=4)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_clean(name):
    notebook = _read(name)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code, "a demo without code"
    if name in SAVED_WITH_OUTPUTS:  # run top to bottom on SmolLM2, saved so GitHub and nbviewer show the figures
        assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1))
        _check_outputs(name, [o for cell in code for o in cell.outputs])
    else:
        assert all(not cell.outputs and cell.execution_count is None for cell in code), (
            f"{name}.ipynb holds outputs; clear them before committing (Kernel → Restart & Clear Output)"
        )
    assert "widgets" not in notebook.metadata, f"{name}.ipynb saves widget state"
    assert len(notebook.cells) <= 14
    assert any(cell.cell_type == "markdown" for cell in notebook.cells)


def _kernel_manager(tmp_path: Path) -> KernelManager:
    """A kernel of the running interpreter, from a kernelspec only this test can see."""
    spec_dir = tmp_path / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "lens_squash test kernel",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")], ensure_native_kernel=False)
    return KernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)


def _figures(notebook: nbformat.NotebookNode) -> int:
    return sum(
        FIGURE_MIME in output.get("data", {})
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )


@pytest.mark.slow
@pytest.mark.hooked  # the small settings build tiny HookedTransformer models
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes(name, tmp_path, monkeypatch):
    notebook = _read(name)
    workdir = tmp_path / "work"
    workdir.mkdir()
    monkeypatch.setenv("LENS_SQUASH_SMALL", "1")
    monkeypatch.setenv("PLOTLY_RENDERER", "plotly_mimetype")  # figures as JSON outputs, no plotly.js copy
    client = NotebookClient(
        notebook,
        km=_kernel_manager(tmp_path),
        timeout=300,
        allow_errors=False,
        resources={"metadata": {"path": str(workdir)}},
    )
    client.execute()  # raises CellExecutionError, naming the cell, on the first failing cell
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code)
    errors = [o for cell in code for o in cell.outputs if o.output_type == "error"]
    assert errors == []
    assert _figures(notebook) >= 1, f"{name} displayed no plotly figure"
    _check_outputs(name, [o for cell in code for o in cell.outputs])


def _check_outputs(name: str, outputs: list) -> None:
    """No error, no warning, no widget state; on the public-API notebooks a PNG beside every figure."""
    assert not [o for o in outputs if o.output_type == "error"], f"{name} holds an error"
    warned = [o.text for o in outputs if o.output_type == "stream" and o.name == "stderr" and "Warning" in o.text]
    assert warned == [], f"{name} printed warnings: {warned}"
    assert not any(WIDGET_MIME in o.get("data", {}) for o in outputs), f"{name} saves widget state (progress bars)"
    tables = ["".join(o.get("data", {}).get("text/html", "")) for o in outputs]
    assert not any("&lt;NA&gt;" in t for t in tables), f"{name} shows <NA> in a table (missing values are '-')"
    if name in PUBLIC_API:  # every interactive figure also carries a static PNG (GitHub and nbviewer show it)
        figures = [o for o in outputs if FIGURE_MIME in o.get("data", {})]
        assert figures and all("image/png" in o["data"] for o in figures), f"{name}: a figure without its PNG"


#: the notebooks committed with their outputs (run on SmolLM2); the others are committed clean
SAVED_WITH_OUTPUTS = NOTEBOOKS

#: the notebooks rewritten on the README's public API (``import lens_squash as ls``, ``analyze``, ``.plot``)
PUBLIC_API = NOTEBOOKS


@pytest.mark.parametrize("name", PUBLIC_API)
def test_notebook_uses_only_the_public_api(name):
    code = "\n".join(cell.source for cell in _read(name).cells if cell.cell_type == "code")
    assert "import lens_squash as ls" in code
    internal = [line for line in code.splitlines() if "from lens_squash." in line or "import lens_squash." in line]
    assert internal == [], f"{name} imports internal modules: {internal}"
