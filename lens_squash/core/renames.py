"""Keyword arguments that changed name: the old name still works for a while, with a DeprecationWarning.

One name per concept across the package (positions are ``pos`` / ``target_pos``, layers ``layer``);
:func:`renamed` keeps notebooks written against the old names running while they move over.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["renamed"]

F = TypeVar("F", bound=Callable[..., Any])


def renamed(**old_to_new: str) -> Callable[[F], F]:
    """Accept each old keyword as its new name, warning once per call; both at once is an error."""

    def decorate(function: F) -> F:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in old_to_new.items():
                if old not in kwargs:
                    continue
                if new in kwargs:
                    raise TypeError(
                        f"{function.__name__}() got {old}= and {new}=; {old} is the old name of {new}, pass only {new}"
                    )
                warnings.warn(
                    f"{function.__name__}({old}=...) is now {function.__name__}({new}=...)",
                    DeprecationWarning,
                    stacklevel=2,
                )
                kwargs[new] = kwargs.pop(old)
            return function(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
