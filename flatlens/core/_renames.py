"""Old parameter names that keep working for one release, with a warning naming the new one.

A renamed parameter disappears from the signature (``inspect.signature`` shows only the new
names) but the old keyword is still accepted: :func:`renamed` maps it to the new name and
warns with a ``FutureWarning``, which Python shows by default. Every rename is recorded in
:data:`RENAMES`, the list ``CHANGELOG.md`` and ``tests/test_vocabulary.py`` check.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["REMOVED_IN", "RENAMES", "renamed", "renamed_attribute", "warn_renamed"]

F = TypeVar("F", bound=Callable[..., Any])

REMOVED_IN = "0.3"
"""The release in which the old names stop working."""

RENAMES: dict[tuple[str, str], str] = {}
"""``{(owner, old name): new name}`` for every renamed keyword of the public API."""


def warn_renamed(owner: str, old: str, new: str, *, stacklevel: int = 3) -> None:
    """Warn that ``owner``'s ``old`` is now called ``new`` (a ``FutureWarning``)."""
    warnings.warn(
        f"{owner}: {old} is deprecated and stops working in flatlens {REMOVED_IN}; "
        f"use {new} instead",
        FutureWarning,
        stacklevel=stacklevel,
    )


def renamed(owner: str | None = None, **old_to_new: str) -> Callable[[F], F]:
    """Decorator: accept each old keyword in ``old_to_new`` as its new name, with a warning.

    Args:
        owner: The name shown in the warning (default: the function's ``__qualname__``).
        **old_to_new: ``old="new"`` pairs.

    Raises (from the decorated call):
        TypeError: both the old and the new name were passed.
    """

    def decorate(fn: F) -> F:
        name = owner or fn.__qualname__.replace(".__init__", "")
        for old, new in old_to_new.items():
            RENAMES[(name, old)] = new

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in old_to_new.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(
                            f"{name}() got both {old}= and {new}=; {old} is the deprecated "
                            f"name of {new}, pass {new} only"
                        )
                    warn_renamed(name, old, new)
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        wrapper.__renamed__ = dict(old_to_new)  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate


def renamed_attribute(owner: str, old: str, new: str) -> property:
    """A read-only property ``old`` that warns and returns ``self.<new>``."""
    RENAMES[(owner, old)] = new

    def get(self: Any) -> Any:
        warn_renamed(owner, old, new, stacklevel=3)
        return getattr(self, new)

    return property(get, doc=f"Deprecated name of ``{new}``.")
