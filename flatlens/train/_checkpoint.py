"""Training checkpoints: one ``.pt`` file of state dicts plus a ``.json`` file of metadata.

The ``.pt`` file holds only tensors and plain Python values (the model's, optimizer's and
scheduler's state dicts, the RNG states as byte tensors, the epoch, the history and the
trainer's own state: step count, the measures' warm-start vector, the GradScaler), so it
loads with ``torch.load(path, weights_only=True)``, which never runs code from the file. The
``.json`` file beside it repeats the epoch, history and configuration for people and tools.
Both are written atomically (temporary file, then :func:`os.replace`): an interrupted save
leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from flatlens import distributed as fd
from flatlens.core._io import CheckpointError, load_trusted_tensors, save_torch, write_json

__all__ = ["FORMAT", "load_on_main", "load_training_checkpoint", "save_training_checkpoint"]

FORMAT = "flatlens.train/1"
_KEYS = ("format", "epoch", "model", "optimizer", "scheduler", "rng", "history", "config")


def save_training_checkpoint(
    path: str | os.PathLike,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None,
    epoch: int,
    history: list[dict[str, Any]],
    rng: dict[str, torch.Tensor],
    config: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``path`` (torch) and ``path`` with suffix ``.json`` (metadata), atomically.

    Args:
        path: Target ``.pt`` file; its folder is created.
        model: Its ``state_dict()`` is saved.
        optimizer: Its ``state_dict()`` is saved (SAM/GAM include their settings).
        scheduler: An LR scheduler or None.
        epoch: Number of completed epochs.
        history: One dict of plain values per completed epoch.
        rng: Named RNG states (byte tensors).
        config: Plain settings of the run.
        extra: More state of the trainer (tensors and plain values: the step count, the
            measures' warm-start state, the GradScaler's state, ...), or None.

    Returns:
        The ``.pt`` path.
    """
    path = Path(path)
    payload = {
        "format": FORMAT,
        "epoch": int(epoch),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "rng": {k: v.detach().cpu() for k, v in rng.items()},
        "history": history,
        "config": config,
        "extra": extra,
    }
    save_torch(path, payload)
    write_json(
        path.with_suffix(".json"),
        {
            "format": FORMAT,
            "checkpoint": path.name,
            "epoch": int(epoch),
            "optimizer": repr(optimizer),
            "config": config,
            "history": history,
        },
    )
    return path


def load_training_checkpoint(
    path: str | os.PathLike, *, map_location: Any = "cpu"
) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_training_checkpoint` (``weights_only=True``).

    Raises:
        CheckpointError: the file is missing, corrupt, needs code to unpickle, or is not a
            flatlens training checkpoint.
    """
    path = Path(path)
    payload = load_trusted_tensors(path, map_location=map_location)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a flatlens training checkpoint (expected format {FORMAT!r})"
        )
    missing = [k for k in _KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}")
    return payload


def load_on_main(path: str | os.PathLike) -> dict[str, Any]:
    """Rank 0's :func:`load_training_checkpoint` on every rank (only rank 0 reads the file).

    Without a process group this is the plain load. When rank 0 fails, its error is raised
    on every rank, so all ranks stop at the same point.
    """
    payload: Any = None
    if fd.is_main():
        try:
            payload = load_training_checkpoint(path, map_location="cpu")
        except (OSError, ValueError) as err:
            payload = err
    payload = fd.broadcast_object(payload)
    if isinstance(payload, BaseException):
        raise payload
    return payload
