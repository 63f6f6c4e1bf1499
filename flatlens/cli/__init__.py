"""The ``flatlens`` command: argument parsing, model/data/loss specs, exit codes."""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``flatlens`` command (see :mod:`flatlens.cli._main`); returns the exit code.

    The command's modules (and torch) are imported here, so that a Ctrl-C while they load
    exits with code 130 and one line, like one during the command (SIGTERM and SIGHUP: 143
    and 129).
    """
    from flatlens.cli._errors import signals_end_like_ctrl_c

    with signals_end_like_ctrl_c():
        try:
            from flatlens.cli._main import main as run
        except KeyboardInterrupt as err:
            signum = getattr(err, "signum", None)
            if signum is None:
                print("flatlens: interrupted", file=sys.stderr)
                return 130
            import signal

            print(f"flatlens: interrupted by {signal.Signals(signum).name}", file=sys.stderr)
            return 128 + signum
        return run(argv)
