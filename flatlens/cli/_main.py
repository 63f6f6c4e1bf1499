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
* 130 interrupted (Ctrl-C); 143 and 129 for SIGTERM and SIGHUP, which end a command the
  same way (one line with the resume hint, temporary files removed).

An exception raised by the user's own model, loss or data code is reported as theirs (exit
code 2, naming the spec and the exception type; :mod:`flatlens.cli._blame`), whatever its
class. Any other traceback means a bug in flatlens; ``FLATLENS_DEBUG=1`` shows it for every
error.

Every command that writes ``--out`` holds the folder's lock while it runs
(:func:`flatlens.cli._outputs.claim_out`), released here when it ends.

Under ``torchrun`` every rank runs the command and only rank 0 writes ``--out`` and prints
(see :func:`flatlens.cli._session.cli_session`).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence

import torch

from flatlens.cli._blame import blame_user_code
from flatlens.cli._errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    Terminated,
    UserError,
    signals_end_like_ctrl_c,
)
from flatlens.cli._outputs import release_out
from flatlens.cli._parser import build_parser
from flatlens.cli._session import cli_session
from flatlens.core._errors import DataChangedError
from flatlens.core._io import CheckpointError

__all__ = [
    "EXIT_FAILURE",
    "EXIT_USAGE",
    "Terminated",
    "UserError",
    "build_parser",
    "interrupted",
    "main",
]

_DEBUG_HINT = " (FLATLENS_DEBUG=1 shows the traceback)"


def _cpus() -> int:
    """The CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def _threads(args: argparse.Namespace) -> Iterator[None]:
    """Run the block with ``--threads`` torch threads (0: leave them), at most as many as
    the machine has CPUs (with a note); restore them after."""
    count = args.threads
    cpus = _cpus()
    if count > cpus:
        if not args.quiet:
            print(
                f"flatlens {args.command}: --threads {count} is more than the {cpus} CPUs "
                f"this process may use; using {cpus}",
                file=sys.stderr,
            )
        count = cpus
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


_RADII = {
    "sam_rho": "--sam-rho",
    "gam_rho": "--gam-rho",
    "gam_perturb_rho": "--gam-perturb-rho",
    "measure_rho": "--measure-rho",
    "rho_all": "--rho",
}


def _check_ranges(args: argparse.Namespace) -> None:
    """Refuse, before anything loads, a learning rate or radius the parameters' dtype cannot
    hold: a learning rate above the dtype's largest number, a radius whose square is not a
    normal number of the dtype (it underflows to zero or overflows). The dtype is ``--dtype``
    (float64, the widest, for ``auto``)."""
    given = getattr(args, "dtype", "auto")
    dtype = torch.float32 if given == "float32" else torch.float64
    info = torch.finfo(dtype)
    name = str(dtype).removeprefix("torch.")
    which = "the widest dtype; --dtype auto" if given == "auto" else "the parameters' dtype"
    lr = getattr(args, "lr", None)
    if lr is not None and lr > info.max:
        raise UserError(
            f"argument --lr: {lr:g} is more than {name} holds ({info.max:.3g}, the largest "
            f"number of {which}); use a learning rate up to {info.max:.3g}"
        )
    low, high = math.sqrt(info.tiny), math.sqrt(info.max)
    for attr, flag in _RADII.items():
        value = getattr(args, attr, None)
        values = value if isinstance(value, tuple | list) else [value]
        for rho in values:
            if rho is None or rho == 0:
                continue  # None: not given; 0 (--gam-perturb-rho): no perturbation
            if not low <= rho <= high:
                why = "underflows to zero" if rho < low else "overflows"
                raise UserError(
                    f"argument {flag}: the square of the radius {rho:g} {why} in {name} "
                    f"({which}); use radii from {low:.2g} to {high:.2g}"
                )


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def _os_line(err: OSError) -> str:
    """An operating-system error in one line, naming the file when it is known."""
    if err.filename is None:
        return _one_line(err)
    reason = err.strerror or _one_line(err)
    text = f"{err.filename}: {reason}"
    if err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        text += "; free some space or choose another --out"
    return text


def _fail(
    command: str, err: BaseException, code: int, hint: str = "", *, text: str | None = None
) -> int:
    """Print ``err`` (or ``text``) as one line on stderr and return ``code`` (re-raise under
    FLATLENS_DEBUG)."""
    if os.environ.get("FLATLENS_DEBUG"):
        raise err
    line = _one_line(err) if text is None else " ".join(text.split())
    print(f"flatlens {command}: error: {line}{hint}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command with ``argv`` (default ``sys.argv[1:]``); returns the exit code.

    SIGTERM and SIGHUP end the command as Ctrl-C does (exit codes 143 and 129).
    """
    with signals_end_like_ctrl_c():
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    command = "flatlens"
    args: argparse.Namespace | None = None
    try:
        try:
            args = build_parser().parse_args(argv)
            command = args.command
            func: Callable[[argparse.Namespace], None] = args.func
            if getattr(args, "resume", False) and getattr(args, "overwrite", False):
                raise UserError("--resume continues the run in --out and --overwrite replaces it")
            _check_ranges(args)
            if args.device != "cpu" and not _device_ok(args.device):
                raise UserError(f"--device {args.device} is not available on this machine")
            with cli_session(args), _threads(args):
                func(args)
        finally:
            release_out(args)
    except KeyboardInterrupt as err:
        resumable = command != "flatlens" and hasattr(args, "resume")
        return interrupted(command, resumable=resumable, signum=getattr(err, "signum", None))
    except Exception as err:
        return _report(command, args, err)
    return EXIT_OK


def _report(command: str, args: argparse.Namespace | None, err: Exception) -> int:
    """Print ``err`` as one line and return its exit code; re-raise a bug of flatlens.

    The order matters: the user's fixable errors first, then an error raised inside the
    user's model, loss or data code (theirs, whatever its class), then failed computations
    (a non-finite loss and a data change are exit 1 even where their classes also derive
    from ``ValueError``, which otherwise means bad input).
    """
    if isinstance(err, UserError | CheckpointError):
        return _fail(command, err, EXIT_USAGE)
    if isinstance(err, torch.OutOfMemoryError | MemoryError):
        return _fail(command, err, EXIT_FAILURE, "; try fewer --samples or a smaller model")
    theirs = blame_user_code(args, err)
    if theirs is not None:
        return _fail(command, err, EXIT_USAGE, _DEBUG_HINT, text=theirs)
    if isinstance(err, FloatingPointError | DataChangedError):
        return _fail(command, err, EXIT_FAILURE, _DEBUG_HINT)
    if isinstance(err, ImportError):  # an optional package the request needs is missing
        return _fail(command, err, EXIT_USAGE)
    if isinstance(err, ValueError | TypeError):
        return _fail(command, err, EXIT_USAGE, _DEBUG_HINT)
    if isinstance(err, OSError):
        return _fail(command, err, EXIT_FAILURE, _DEBUG_HINT, text=_os_line(err))
    raise err


def interrupted(command: str, *, resumable: bool = False, signum: int | None = None) -> int:
    """Say that the command was interrupted (one line); returns exit code 130 for Ctrl-C,
    128 + the signal's number for SIGTERM (143) and SIGHUP (129)."""
    hint = "; rerun with --resume to continue" if resumable else ""
    prefix = command if command == "flatlens" else f"flatlens {command}"
    if signum is None:
        print(f"{prefix}: interrupted{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    import signal

    name = signal.Signals(signum).name
    print(f"{prefix}: interrupted by {name}{hint}", file=sys.stderr)
    return 128 + signum


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
