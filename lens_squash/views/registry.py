"""Every result's figure kinds, discovered: importing this module imports every views module.

Each builder declares its ``(result class, kind)`` where it is defined, with the decorator
:func:`lens_squash.core.results.register_figure` (``@register_figure(Trace, "attention", default=True)``;
``html=True`` for a page or an HTML/JS view). ``Result.plot(kind)`` imports this module the first time a
figure is drawn (core code never imports the views above it), and this module imports each module of
the package, in name order, so that their decorators run. To add a figure: write its builder, decorated,
in the views module of its concept; nothing here changes.

A class's default kind is the one marked ``default=True``, else the first registered; a class whose
kinds live in several modules marks its default, so that it does not depend on the import order.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from ..core.results import html_figure_kinds

__all__ = ["FIGURE_MODULES", "HTML_KINDS"]


def _import_views() -> tuple[str, ...]:
    """Import every module of the views package but this one; their names, in import order."""
    names = sorted(info.name for info in pkgutil.iter_modules([str(Path(__file__).parent)]))
    own = __name__.rpartition(".")[2]
    return tuple(importlib.import_module(f"{__package__}.{name}").__name__ for name in names if name != own)


#: the views modules imported (and so their figure kinds registered)
FIGURE_MODULES: tuple[str, ...] = _import_views()

#: kinds that draw a whole HTML page or an HTML/JS view (``_repr_html_``, ``.write(path)``), not a plotly figure
HTML_KINDS: frozenset[str] = html_figure_kinds()
