"""The ``flatlens`` command: argument parsing, model/data/loss specs, exit codes."""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``flatlens`` command (see :mod:`flatlens.cli._main`); returns the exit code.

    The command's modules (and torch) are imported here, so that a Ctrl-C while they load
    exits with code 130 and one line, like one during the command.
    """
    try:
        from flatlens.cli._main import main as run
    except KeyboardInterrupt:
        print("flatlens: interrupted", file=sys.stderr)
        return 130
    return run(argv)
