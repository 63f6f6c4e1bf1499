"""The ``--out`` folder of a command: one writer, never lose a run, fail before the work
when unwritable.

Each subcommand names the files it writes. Before any computation :func:`claim_out`

* takes the folder's lock (:mod:`flatlens.cli._lock`) for the rest of the command, so a
  second command writing into the same folder stops at once, naming the first (exit 2);
  :func:`release_out` (called by :func:`flatlens.cli._main.main` when the command ends)
  gives it back;
* refuses a folder that already holds one of them (a finished or interrupted run, a
  report), unless ``--resume`` continues it or ``--overwrite`` replaces it; ``--quiet``
  never changes this;
* creates the folder and writes a probe file into it, so an unwritable ``--out`` fails in
  one line before the first epoch rather than after it;
* removes the temporary files an interrupted or crashed run left behind (flatlens writes
  every file under a temporary name first; under the lock nobody else is writing them);
* with ``--overwrite``, deletes the old outputs, so the folder never mixes two runs.

Under ``torchrun`` rank 0 decides and every rank raises the same error.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

from flatlens import distributed as fd
from flatlens.cli._errors import UserError
from flatlens.cli._lock import OutLock, OutLocked
from flatlens.core._paths import kind_of
from flatlens.report._diagnose import PARTS

__all__ = ["claim_out", "outputs_of", "release_out"]

_DIAGNOSE = [
    "report.json",
    "report.html",
    "landscape_1d.npz",
    "landscape_1d.json",
    "landscape_2d.npz",
    "landscape_2d.json",
    *(f"parts/{name}{suffix}" for name in PARTS for suffix in (".json", ".started.json")),
]
_STUDY = ["study.json", "report.html", "flatness_vs_gap.png"]


def outputs_of(args: argparse.Namespace) -> list[str]:
    """The files (relative to ``--out``) the command of ``args`` writes."""
    command = args.command
    if command == "train":
        return [
            "model.pt",
            "metrics.json",
            "log.jsonl",
            "checkpoints/checkpoint.pt",
            "checkpoints/checkpoint.json",
        ]
    if command == "diagnose":
        return list(_DIAGNOSE)
    if command == "bound":
        return ["bound.json", "bound.png"]
    if command == "landscape":
        stem = "line" if args.dim == 1 else "plane"
        return [f"{stem}.npz", f"{stem}.json", f"{stem}.png", *(["plane.html"] * (args.dim == 2))]
    if command == "compare":
        return list(_STUDY)
    if command == "demo":
        return [
            "summary.json",
            *_STUDY,
            *(f"{o}/{f}" for o in ("sgd", "sam", "gam") for f in _DIAGNOSE),
        ]
    raise ValueError(f"unknown command {command!r}")


_WHAT = {
    "train": "training run",
    "diagnose": "diagnosis",
    "bound": "bound report",
    "landscape": "landscape",
    "compare": "study",
    "demo": "demo",
}


# The temporary names flatlens writes under (tempfile.mkstemp: 8 random characters): a
# file's ".NAME.XXXXXXXX.tmp" (".npz" for landscape stores), the folder probe, a new lock.
_LEFTOVER = re.compile(
    r"^(\.[^/]+\.(pt|json|npz|png|html|pdf|svg)\.[a-z0-9_]{8}\.(tmp|npz)"
    r"|\.flatlens-probe-[a-z0-9_]{8}|\.flatlens\.lock\.[a-z0-9_]{8}\.new)$"
)


def _folder_problem(out: Path) -> str | None:
    """Why ``out`` cannot be the output folder (it is a file, a device, ...), or None."""
    try:
        kind = kind_of(out)
    except OSError:  # e.g. a file where a folder above it should be: mkdir says why
        return None
    if kind in (None, "a folder"):
        return None
    return f"is {kind}, not a folder; choose a folder"


def _cannot_write(out: Path, err: OSError) -> UserError:
    reason = err.strerror or type(err).__name__
    return UserError(
        f"cannot write to --out {out} ({type(err).__name__}: {reason}); choose a folder you "
        "can write to"
    )


def _lock(args: argparse.Namespace, out: Path) -> OutLock:
    """Create ``out`` and take its lock; the lock is released by :func:`release_out`."""
    problem = _folder_problem(out)
    if problem:
        raise UserError(f"--out {out} {problem}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = OutLock(out, args.command).acquire()
    except OutLocked as err:
        raise UserError(str(err)) from None
    except OSError as err:
        raise _cannot_write(out, err) from err
    args.__dict__.setdefault("_out_locks", []).append(lock)
    return lock


def _check(args: argparse.Namespace, out: Path, names: list[str]) -> list[Path]:
    """Raise :class:`UserError` unless the command may write ``names`` into ``out`` (whose
    lock it holds); returns the existing outputs."""
    resume = bool(getattr(args, "resume", False))
    overwrite = bool(getattr(args, "overwrite", False))
    existing = [out / n for n in names if os.path.lexists(out / n)]
    if existing and not (resume or overwrite):
        shown = ", ".join(str(p.relative_to(out)) for p in existing[:3])
        more = f" and {len(existing) - 3} more" if len(existing) > 3 else ""
        how = "--resume to continue it, " if hasattr(args, "resume") else ""
        raise UserError(
            f"--out {out} already holds a {_WHAT[args.command]} ({shown}{more}); pass "
            f"{how}--overwrite to replace it, or choose another --out"
        )
    try:
        for sub in {Path(n).parent for n in names} - {Path(".")}:
            problem = _folder_problem(out / sub)
            if problem:
                raise UserError(f"--out {out} holds {out / sub}, which {problem}")
        handle, probe = tempfile.mkstemp(prefix=".flatlens-probe-", dir=out)
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        raise _cannot_write(out, err) from err
    return existing


def _leftovers(out: Path, names: list[str]) -> list[Path]:
    """The temporary files earlier runs left in ``out`` and the folders its outputs go to
    (and their ``figures/``)."""
    folders = {out} | {out / Path(n).parent for n in names}
    folders |= {f / "figures" for f in folders}
    found = []
    for folder in sorted(folders):
        if not folder.is_dir() or (folder.is_symlink() and folder != out):
            continue
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        found += [
            Path(e.path)
            for e in entries
            if _LEFTOVER.match(e.name) and e.is_file(follow_symlinks=False)
        ]
    return found


def _clean(args: argparse.Namespace, out: Path, names: list[str]) -> None:
    """Remove the temporary files an interrupted or crashed run left (see :func:`_leftovers`)."""
    removed = 0
    for path in _leftovers(out, names):
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:
            pass
        except OSError as err:
            raise _cannot_write(out, err) from err
    if removed and not getattr(args, "quiet", False):
        files = "file" if removed == 1 else "files"
        print(
            f"flatlens {args.command}: removed {removed} temporary {files} an interrupted run "
            f"left in {out}",
            file=sys.stderr,
        )


def claim_out(args: argparse.Namespace, names: list[str] | None = None) -> Path:
    """Lock ``args.out``, check it for the command's outputs and make it ready; returns it.

    The lock is held until :func:`release_out` (the command's end).

    Raises:
        UserError: another command writes into the folder; the folder holds outputs of an
            earlier run and neither ``--resume`` nor ``--overwrite`` was given; it cannot be
            written to, or it is not a folder.
    """
    out = Path(args.out)
    names = outputs_of(args) if names is None else names
    error, existing = None, []
    if fd.is_main():
        lock = None
        try:
            lock = _lock(args, out)
            existing = _check(args, out, names)
            _clean(args, out, names)
        except UserError as err:
            if lock is not None:
                lock.release()
            error = str(err)
    error = fd.broadcast_object(error)
    if error is not None:
        raise UserError(error)
    if getattr(args, "overwrite", False):
        for path in existing:
            if path.is_file() or path.is_symlink():
                path.unlink(missing_ok=True)
    return out


def release_out(args: argparse.Namespace | None) -> None:
    """Release the locks :func:`claim_out` took for ``args`` (safe to call twice)."""
    locks = [] if args is None else args.__dict__.pop("_out_locks", [])
    for lock in reversed(locks):
        lock.release()
