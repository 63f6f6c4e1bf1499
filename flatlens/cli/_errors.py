"""The exit codes of the ``flatlens`` command, the error a user can fix, and the signals
that end a command like Ctrl-C."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

__all__ = [
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "Terminated",
    "UserError",
    "signals_end_like_ctrl_c",
]

EXIT_OK = 0
EXIT_FAILURE = 1  # a computation failed: non-finite loss, out of memory, unwritable output
EXIT_USAGE = 2  # bad input the user can fix: an option value, a checkpoint, a model spec
EXIT_INTERRUPTED = 130  # Ctrl-C; SIGTERM and SIGHUP give 128 + their number (143, 129)


class UserError(Exception):
    """An error the user can fix; printed as one line, exit code 2."""


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived: the command ends as after Ctrl-C (its cleanup runs, no
    temporary file is left), with exit code 128 + the signal's number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def signals_end_like_ctrl_c() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise :class:`Terminated` (once: a repeated
    signal while the command winds down is ignored, so its cleanup completes); the previous
    handlers come back after it. A no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum: int, frame: object) -> None:
        if fired:
            return
        fired.append(signum)
        raise Terminated(signum)

    previous = {}
    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is None:
            continue
        try:
            previous[sig] = signal.signal(sig, handler)
        except (OSError, ValueError):
            pass
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
