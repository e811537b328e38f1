"""Static figures for papers: PNG, SVG, PDF (and JPEG, WebP) through plotly's own export engine.

Plotly exports through ``kaleido`` (version 1 or later), which drives an installed Chrome or
Chromium over the DevTools protocol. This module finds the browser (``$LENS_SQUASH_CHROMIUM``, the
variable the browser tests read; then kaleido's own ``$BROWSER_PATH``; then Debian's
``/usr/bin/chromium`` and the usual names on ``PATH``), hands it to kaleido explicitly (no global
``plotly.io`` defaults are changed), and turns MathJax off: the figures use Unicode, not LaTeX, and
kaleido's default MathJax comes from a CDN that an offline machine cannot reach.

:func:`write_figures` renders every figure and format in one browser session (starting Chromium
takes seconds; rendering one figure, a fraction of that). Files are rendered into a staging folder
beside the target and moved into place (``os.replace``, atomic on POSIX), so a failed export never
leaves a half-written image under the final name (the rule of :mod:`lens_squash.core.records`).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import plotly.graph_objects as go

__all__ = [
    "DEFAULT_SCALE",
    "FORMATS",
    "ExportError",
    "chromium_path",
    "fig_to_file",
    "require_exporter",
    "write_figures",
]

#: the formats kaleido writes (EPS is gone from kaleido 1)
FORMATS: tuple[str, ...] = ("png", "svg", "pdf", "jpeg", "webp")
_ALIASES = {"jpg": "jpeg"}
_DEFAULT_WIDTH, _DEFAULT_HEIGHT = 1000, 600  # used where the figure's layout sets no size
_BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
_INSTALL_BROWSER = (
    "install Chromium (Debian/Ubuntu: `apt-get install -y chromium`; `make test` does it) or run "
    "`kaleido_get_chrome`, or point $LENS_SQUASH_CHROMIUM at a Chrome/Chromium binary"
)


class ExportError(RuntimeError):
    """A figure could not be exported; the message says what is missing and how to install it."""


def chromium_path() -> str | None:
    """The Chrome/Chromium binary kaleido will drive, or ``None`` when none is found."""
    for variable in ("LENS_SQUASH_CHROMIUM", "BROWSER_PATH"):
        chosen = os.environ.get(variable)
        if chosen:  # an explicit choice wins, and a wrong one is an error, not a silent fallback
            found = shutil.which(chosen) or (chosen if Path(chosen).is_file() else None)
            if found is None:
                raise ExportError(
                    f"${variable}={chosen!r} is not an executable file; fix the variable or {_INSTALL_BROWSER}"
                )
            return found
    if Path("/usr/bin/chromium").is_file():
        return "/usr/bin/chromium"
    return next((path for path in map(shutil.which, _BROWSER_NAMES) if path), None)


def _kaleido():
    try:
        import kaleido
    except ImportError:
        raise ExportError(
            'static export needs kaleido 1 or later: pip install "kaleido>=1" (it is in lens_squash\'s dev extras)'
        ) from None
    if not hasattr(kaleido, "write_fig_from_object_sync"):  # kaleido 0.x: a bundled, retired Chromium
        raise ExportError(f'kaleido {getattr(kaleido, "__version__", "<1")} is too old; pip install -U "kaleido>=1"')
    return kaleido


def require_exporter() -> str:
    """The browser static export will drive, after checking kaleido is there too; else ExportError.

    Call it before long work whose figures are to be exported, so a missing piece is found first."""
    _kaleido()
    browser = chromium_path()
    if browser is None:
        raise ExportError(f"static export drives Chrome or Chromium, and none was found; {_INSTALL_BROWSER}")
    return browser


def _format(path: Path, format: str | None) -> str:
    name = format if format is not None else path.suffix.lstrip(".")
    if not name:
        raise ValueError(f"cannot tell the image format of {str(path)!r}: add an extension or pass format=")
    name = _ALIASES.get(name.lower(), name.lower())
    if name not in FORMATS:
        raise ValueError(f"unknown image format {name!r}; choose from {', '.join(FORMATS)}")
    return name


#: pixels per layout pixel of a raster export: 2× by default, sharp on high-density screens
DEFAULT_SCALE = 2.0


def _size(fig: go.Figure, width, height, scale) -> dict:
    width = width if width is not None else fig.layout.width or _DEFAULT_WIDTH
    height = height if height is not None else fig.layout.height or _DEFAULT_HEIGHT
    for label, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 10:
            raise ValueError(f"{label} must be a number of layout pixels ≥ 10, got {value!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"scale must be a positive number (2 doubles the pixels), got {scale!r}")
    return {"width": int(round(width)), "height": int(round(height)), "scale": float(scale)}


def _checked_figure(fig, name: str = "fig") -> go.Figure:
    if not isinstance(fig, go.Figure):
        raise TypeError(f"{name} must be a plotly go.Figure, got {type(fig).__name__}")
    return fig


def _render(jobs: list[tuple[go.Figure, Path, dict]]) -> None:
    """Render every ``(figure, final path, opts)`` in one browser session, then move each into place."""
    kaleido = _kaleido()
    browser = chromium_path()
    if browser is None:
        raise ExportError(f"static export drives Chrome/Chromium, and none was found: {_INSTALL_BROWSER}")
    folders = {path.parent for _, path, _ in jobs}
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    staging = {folder: Path(tempfile.mkdtemp(prefix=".lens-squash-export.", dir=folder)) for folder in folders}
    try:
        specs = [
            {"fig": fig.to_dict(), "path": staging[path.parent] / path.name, "opts": opts} for fig, path, opts in jobs
        ]
        try:
            kaleido.write_fig_from_object_sync(specs, kopts={"path": browser, "mathjax": False})
        except Exception as err:  # kaleido's errors name its own fixes; ours names the browser it drove
            if type(err).__name__ == "ChromeNotFoundError":
                raise ExportError(f"kaleido could not start {browser!r}: {_INSTALL_BROWSER}") from err
            raise
        for spec, (_, path, _) in zip(specs, jobs, strict=True):
            os.replace(spec["path"], path)
    finally:
        for folder in staging.values():
            shutil.rmtree(folder, ignore_errors=True)


def fig_to_file(
    fig: go.Figure,
    path: str | os.PathLike,
    *,
    format: str | None = None,
    width: int | None = None,
    height: int | None = None,
    scale: float = DEFAULT_SCALE,
) -> Path:
    """Write ``fig`` as a static image at ``path`` and return the path.

    ``format`` defaults to the extension (``png``, ``svg``, ``pdf``, ``jpeg``/``jpg``, ``webp``).
    ``width`` and ``height`` are layout pixels (default: the figure's own size, else 1000 × 600); a
    PNG has ``scale ×`` as many pixels each way (default 2: sharp on high-density screens and in print). Raises :class:`ExportError` when kaleido or a
    Chromium is missing, naming the fix.
    """
    fig, path = _checked_figure(fig), Path(path)
    opts = {"format": _format(path, format), **_size(fig, width, height, scale)}
    _render([(fig, path, opts)])
    return path


def _stem(name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._")
    if not stem:
        raise ValueError(f"figure name {name!r} gives an empty file name; use letters or digits")
    return stem


def write_figures(
    figs: Mapping[str, go.Figure],
    folder: str | os.PathLike,
    formats: Iterable[str] = ("png", "svg", "pdf"),
    *,
    width: int | None = None,
    height: int | None = None,
    scale: float = DEFAULT_SCALE,
) -> dict[str, list[Path]]:
    """Write every figure in every format into ``folder`` (``<name>.<format>``), in one browser session.

    Names become file names with anything but letters, digits, ``.``, ``_`` and ``-`` replaced by
    ``_``; two names that would give the same file are refused. Returns ``{name: [paths]}``.
    """
    if not isinstance(figs, Mapping) or not figs:
        raise ValueError("figs must be a non-empty mapping of names to plotly Figures")
    formats = (formats,) if isinstance(formats, str) else tuple(formats)
    if not formats:
        raise ValueError(f"formats is empty; choose some of {', '.join(FORMATS)}")
    formats = tuple(dict.fromkeys(_format(Path("x"), f) for f in formats))
    stems: dict[str, str] = {}
    for name in figs:
        stem = _stem(name)
        if stem in stems:
            raise ValueError(f"figures {stems[stem]!r} and {name!r} would both be written as {stem!r}; rename one")
        stems[stem] = name
    folder, jobs, written = Path(folder), [], {}
    for stem, name in stems.items():
        fig = _checked_figure(figs[name], f"figs[{name!r}]")
        size = _size(fig, width, height, scale)
        paths = [folder / f"{stem}.{fmt}" for fmt in formats]
        jobs += [(fig, path, {"format": fmt, **size}) for fmt, path in zip(formats, paths, strict=True)]
        written[name] = paths
    _render(jobs)
    return written
