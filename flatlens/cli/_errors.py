"""The exit codes of the ``flatlens`` command and the error a user can fix."""

from __future__ import annotations

__all__ = ["EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "UserError"]

EXIT_OK = 0
EXIT_FAILURE = 1  # a computation failed: non-finite loss, out of memory, unwritable output
EXIT_USAGE = 2  # bad input the user can fix: an option value, a checkpoint, a model spec
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """An error the user can fix; printed as one line, exit code 2."""
