"""What a path is, in words: the reasons a file flatlens should read or a folder it should
write into is not one (a named pipe, a device, a folder, a broken link, a virtual file).

Opening a named pipe blocks until someone writes into it and a device such as ``/dev/zero``
never ends, so these are found with ``stat`` before any file is opened.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["is_empty", "kind_of", "not_a_file"]

_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISREG, "a file"),
)


def kind_of(path: str | os.PathLike) -> str | None:
    """``"a file"``, ``"a folder"``, ``"a named pipe (FIFO)"``, ``"a character device"``,
    ``"a block device"``, ``"a socket"``, ``"a broken symbolic link"`` or None (nothing
    there). Symbolic links are followed.

    Raises:
        OSError: the path cannot be examined (no permission on a folder above it, a name
            too long, a loop of links).
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "a broken symbolic link" if os.path.islink(path) else None
    for test, name in _KINDS:
        if test(mode):
            return name
    return "neither a file nor a folder"


def not_a_file(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be read as a file, as the end of a sentence starting with the
    path (``"does not exist"``, ``"is a named pipe (FIFO), not a file"``, ...), or None when
    it is a regular file."""
    try:
        kind = kind_of(path)
    except OSError as err:
        return f"cannot be examined ({type(err).__name__}: {err.strerror or err})"
    if kind == "a file":
        return None
    if kind is None:
        return "does not exist"
    if kind == "a broken symbolic link":
        return f"is a broken symbolic link (to {os.readlink(path)})"
    return f"is {kind}, not a file"


def is_empty(path: str | os.PathLike) -> bool:
    """Whether reading ``path`` gives no bytes at all.

    Virtual files (``/proc``, ``/sys``) report size 0 yet hold text, so the size alone
    does not say a file is empty.
    """
    path = Path(path)
    try:
        if path.stat().st_size > 0:
            return False
        with path.open("rb") as fh:
            return not fh.read(1)
    except OSError:
        return False
