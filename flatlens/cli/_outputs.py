"""The ``--out`` folder of a command: never lose a run, fail before the work when unwritable.

Each subcommand names the files it writes. Before any computation :func:`claim_out`

* refuses a folder that already holds one of them (a finished or interrupted run, a
  report), unless ``--resume`` continues it or ``--overwrite`` replaces it; ``--quiet``
  never changes this;
* creates the folder and writes a probe file into it, so an unwritable ``--out`` fails in
  one line before the first epoch rather than after it;
* with ``--overwrite``, deletes the old outputs, so the folder never mixes two runs.

Under ``torchrun`` rank 0 decides and every rank raises the same error.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from flatlens import distributed as fd
from flatlens.cli._errors import UserError
from flatlens.report._diagnose import PARTS

__all__ = ["claim_out", "outputs_of"]

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


def _check(args: argparse.Namespace, out: Path, names: list[str]) -> list[Path]:
    """Raise :class:`UserError` unless the command may write ``names`` into ``out``;
    returns the existing outputs."""
    resume = bool(getattr(args, "resume", False))
    overwrite = bool(getattr(args, "overwrite", False))
    existing = [out / n for n in names if (out / n).exists()]
    if existing and not (resume or overwrite):
        shown = ", ".join(str(p.relative_to(out)) for p in existing[:3])
        more = f" and {len(existing) - 3} more" if len(existing) > 3 else ""
        how = "--resume to continue it, " if hasattr(args, "resume") else ""
        raise UserError(
            f"--out {out} already holds a {_WHAT[args.command]} ({shown}{more}); pass "
            f"{how}--overwrite to replace it, or choose another --out"
        )
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder; choose a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        for sub in {Path(n).parent for n in names} - {Path(".")}:
            if (out / sub).exists() and not (out / sub).is_dir():
                raise UserError(f"--out {out} holds a file {sub} where a folder must go")
        handle, probe = tempfile.mkstemp(prefix=".flatlens-probe-", dir=out)
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise UserError(
            f"cannot write to --out {out} ({type(err).__name__}: {reason}); choose a folder "
            "you can write to"
        ) from err
    return existing


def claim_out(args: argparse.Namespace, names: list[str] | None = None) -> Path:
    """Check ``args.out`` for the command's outputs and make it ready; returns it.

    Raises:
        UserError: the folder holds outputs of an earlier run and neither ``--resume`` nor
            ``--overwrite`` was given, or it cannot be written to.
    """
    out = Path(args.out)
    names = outputs_of(args) if names is None else names
    error, existing = None, []
    if fd.is_main():
        try:
            existing = _check(args, out, names)
        except UserError as err:
            error = str(err)
    error = fd.broadcast_object(error)
    if error is not None:
        raise UserError(error)
    if getattr(args, "overwrite", False):
        for path in existing:
            if path.is_file() or path.is_symlink():
                path.unlink(missing_ok=True)
    return out
