"""The ``flatlens`` command: argument parsing, model/data/loss specs, exit codes."""

from flatlens.cli._main import main

__all__ = ["main"]
