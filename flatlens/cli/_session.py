"""One ``flatlens`` command under ``torchrun``: every rank computes, rank 0 alone writes.

This adapts the parsed arguments of a command to a multi-process run; the library side of
:mod:`torch.distributed` (ranks, shards, reductions) lives in :mod:`flatlens.distributed`.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from flatlens import distributed as fd

__all__ = ["cli_session"]


def _read_tree(root: Path) -> dict[str, bytes]:
    """Every regular file under ``root`` (symlinks skipped), by relative path."""
    if not root.is_dir():
        return {}
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def _write_tree(root: Path, files: dict[str, bytes]) -> None:
    """Write the files :func:`_read_tree` returned below ``root``."""
    for rel, data in files.items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


@contextlib.contextmanager
def cli_session(args: argparse.Namespace) -> Iterator[argparse.Namespace]:
    """Run one ``flatlens`` command under ``torchrun``; a no-op in a plain process.

    Under ``torchrun`` the default process group is created (NCCL for ``--device cuda``,
    each rank taking GPU ``LOCAL_RANK``; Gloo otherwise) and destroyed on exit. Every rank
    runs the command, but ranks other than 0 run quietly into a private temporary
    ``--out``; with ``--resume`` they first get a copy of rank 0's ``--out`` files, so that
    every rank takes the same decisions about what to reuse.

    Args:
        args: The parsed arguments; ``out``, ``quiet``, ``json``, ``device`` and ``resume``
            are read and, on ranks other than 0, rewritten.
    """
    if not fd.launched_by_torchrun() and not fd.is_distributed():
        yield args
        return
    device = str(getattr(args, "device", "cpu"))
    if device.startswith("cuda"):
        args.device = f"cuda:{fd.local_rank()}"
    created = fd.init_from_env(args.device)
    try:
        resume = bool(getattr(args, "resume", False))
        out = getattr(args, "out", None)
        files = fd.broadcast_object(
            _read_tree(Path(out)) if resume and fd.is_main() and out else {}
        )
        if fd.is_main():
            yield args
            return
        args.quiet = True
        if hasattr(args, "json"):
            args.json = False
        with tempfile.TemporaryDirectory(prefix=f"flatlens-rank{fd.rank()}-") as tmp:
            if out is not None:
                _write_tree(Path(tmp), files)
                args.out = tmp
            yield args
    finally:
        if created and fd.is_distributed():
            import torch.distributed as dist

            dist.destroy_process_group()
