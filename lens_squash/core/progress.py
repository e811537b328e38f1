"""Progress bars for long work, one switch to silence them all.

Every step that can take more than a second or two (model load, the trace, Jacobian chunks, collapse
lengths, generation batches, prompt suites) reports through :func:`progress`. It uses ``tqdm.auto``:
a widget in Jupyter (with ``ipywidgets``, in the ``notebook`` extra), text on a terminal. Bars go to
standard error, so ``--json`` output on standard output stays clean.

Silencing, most specific first: ``progress(..., enabled=False)``; the :func:`silenced` context
manager (restores the previous setting on exit, per thread); ``LENS_SQUASH_PROGRESS=0`` in the
environment. When standard error is not a terminal and we are not in a notebook (a CI log, a
pipe), bars are off unless ``LENS_SQUASH_PROGRESS=1`` asks for them.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

__all__ = ["bars_enabled", "counter", "progress", "silenced"]

T = TypeVar("T")

_state = threading.local()


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    ip = shell.get_ipython() if hasattr(shell, "get_ipython") else None
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell"


def bars_enabled() -> bool:
    """Whether progress bars are shown here and now (see the module docstring for the rules)."""
    if getattr(_state, "silenced", 0):
        return False
    setting = os.environ.get("LENS_SQUASH_PROGRESS", "").strip().lower()
    if setting in ("0", "false", "no", "off"):
        return False
    if setting in ("1", "true", "yes", "on"):
        return True
    stream = sys.stderr
    return _in_notebook() or bool(stream is not None and hasattr(stream, "isatty") and stream.isatty())


@contextlib.contextmanager
def silenced() -> Iterator[None]:
    """No progress bars inside this block (nestable; the previous setting comes back on exit)."""
    _state.silenced = getattr(_state, "silenced", 0) + 1
    try:
        yield
    finally:
        _state.silenced -= 1


def progress(
    iterable: Iterable[T], *, desc: str, total: int | None = None, unit: str = "it", enabled: bool | None = None
) -> Iterable[T]:
    """``iterable`` wrapped in a ``tqdm.auto`` bar on standard error, or unchanged when bars are off."""
    if not (bars_enabled() if enabled is None else enabled):
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True)


class _NoBar:
    """What :func:`counter` gives when bars are off: the same calls, doing nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc) -> None:
        pass


def counter(
    *, desc: str, total: int | None, initial: int = 0, unit: str = "it", enabled: bool | None = None, delay: float = 0.0
):
    """A bar advanced by hand (``with counter(...) as bar: bar.update(k)``), for work that is not one
    loop over an iterable (batches of uneven size, resumed runs that start at ``initial``). ``delay``:
    seconds before the bar appears (work that ends sooner shows none)."""
    if not (bars_enabled() if enabled is None else enabled):
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(
        desc=desc,
        total=total,
        initial=initial,
        unit=unit,
        file=sys.stderr,
        leave=False,
        dynamic_ncols=True,
        delay=delay,
    )
