"""The ``flatlens`` command (also ``python -m flatlens``): run one subcommand, map its outcome
to an exit code.

Subcommands: ``diagnose``, ``train``, ``compare``, ``bound``, ``landscape``, ``demo``
(``flatlens SUBCOMMAND --help`` lists the options; docs/cli.md describes them all).

Exit codes, each with one line on stderr and no traceback:

* 0 success;
* 1 the computation failed: a non-finite loss or non-finite weights
  (:class:`~flatlens.core.NonFiniteLossError`, any ``FloatingPointError``), two passes
  over the same data that disagree (:class:`~flatlens.core.DataChangedError`: the model
  or data is random, found only by computing), out of memory, a failed write mid-run;
* 2 an error in what the user gave: a file (checkpoint, landscape store), a module
  (model, data or loss factory), a setting, a folder (``--out`` holding another run, or
  unwritable);
* 130 interrupted (Ctrl-C).

A traceback means a bug in flatlens; ``FLATLENS_DEBUG=1`` shows it for every error.

Under ``torchrun`` every rank runs the command and only rank 0 writes ``--out`` and prints
(see :func:`flatlens.cli._session.cli_session`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence

import torch

from flatlens.cli._errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, UserError
from flatlens.cli._parser import build_parser
from flatlens.cli._session import cli_session
from flatlens.core._errors import DataChangedError
from flatlens.core._io import CheckpointError

__all__ = ["EXIT_FAILURE", "EXIT_USAGE", "UserError", "build_parser", "interrupted", "main"]

_DEBUG_HINT = " (FLATLENS_DEBUG=1 shows the traceback)"


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` torch threads (0: leave them); restore them after."""
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _device_ok(device: str) -> bool:
    """Whether torch can place a tensor on ``device`` on this machine."""
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, ValueError):
        return False
    return True


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def _fail(command: str, err: BaseException, code: int, hint: str = "") -> int:
    """Print ``err`` as one line on stderr and return ``code`` (re-raise under FLATLENS_DEBUG)."""
    if os.environ.get("FLATLENS_DEBUG"):
        raise err
    print(f"flatlens {command}: error: {_one_line(err)}{hint}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command with ``argv`` (default ``sys.argv[1:]``); returns the exit code.

    The order of the handlers matters: a non-finite loss and a data change are failed
    computations (exit 1) even where their classes also derive from ``ValueError``, which
    otherwise means bad input.
    """
    command = "flatlens"
    try:
        args = build_parser().parse_args(argv)
        command = args.command
        func: Callable[[argparse.Namespace], None] = args.func
        if getattr(args, "resume", False) and getattr(args, "overwrite", False):
            raise UserError("--resume continues the run in --out and --overwrite replaces it")
        if args.device != "cpu" and not _device_ok(args.device):
            raise UserError(f"--device {args.device} is not available on this machine")
        with cli_session(args), _threads(args.threads):
            func(args)
    except (FloatingPointError, DataChangedError) as err:
        return _fail(command, err, EXIT_FAILURE, _DEBUG_HINT)
    except (UserError, CheckpointError) as err:
        return _fail(command, err, EXIT_USAGE)
    except ImportError as err:  # an optional package the request needs is missing
        return _fail(command, err, EXIT_USAGE)
    except (ValueError, TypeError) as err:
        return _fail(command, err, EXIT_USAGE, _DEBUG_HINT)
    except torch.OutOfMemoryError as err:
        return _fail(command, err, EXIT_FAILURE, "; try fewer --samples or a smaller model")
    except OSError as err:
        return _fail(command, err, EXIT_FAILURE, _DEBUG_HINT)
    except KeyboardInterrupt:
        return interrupted(command, resumable=command != "flatlens" and hasattr(args, "resume"))
    return EXIT_OK


def interrupted(command: str, *, resumable: bool = False) -> int:
    """Say that the command was interrupted (one line); returns exit code 130."""
    hint = "; rerun with --resume to continue" if resumable else ""
    prefix = command if command == "flatlens" else f"flatlens {command}"
    print(f"{prefix}: interrupted{hint}", file=sys.stderr)
    return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
