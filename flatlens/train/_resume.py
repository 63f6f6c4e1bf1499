"""Whether a training checkpoint may be resumed with a configuration: the same run, or not.

A resumed run must repeat the uninterrupted one exactly, so every setting that changes the
result is compared with the one stored in the checkpoint, and differences are refused
(named, one line). Only ``device`` may change, and ``epochs`` only where no schedule
depends on it (see :func:`resume_conflicts`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flatlens.core._io import CheckpointError
from flatlens.data import Dataset

__all__ = ["FREE", "check_resume", "describe_conflicts", "resume_conflicts", "resume_message"]

FREE = ("device", "checkpoint_dir", "epochs", "log_every", "tensorboard", "recipe", "num_workers")
"""Fields of :class:`~flatlens.train.TrainConfig` not compared (epochs has its own rule; the
loader's workers matter only where they augment, and are compared there)."""


def _stored_config(payload: Mapping[str, Any], path: Path) -> dict[str, Any]:
    settings = payload.get("config")
    stored = settings.get("config") if isinstance(settings, Mapping) else None
    if not isinstance(stored, Mapping):
        raise CheckpointError(
            f"checkpoint {path} records no run settings (it was not written by "
            "flatlens.train.train or `flatlens train`), so resuming it cannot be checked; "
            "start a new run"
        )
    return dict(stored)


def resume_conflicts(
    config: Any, data: Dataset, payload: Mapping[str, Any], path: str | os.PathLike
) -> list[tuple[str, Any, Any]]:
    """The settings in which ``config`` and ``data`` differ from the checkpoint's run.

    Args:
        config: The :class:`~flatlens.train.TrainConfig` of the run to resume.
        data: Its data set.
        payload: The checkpoint (:func:`~flatlens.train.load_training_checkpoint`).
        path: The checkpoint's path, for messages.

    Returns:
        ``(setting, in the checkpoint, now)`` for every difference; ``epochs`` is one when
        fewer epochs than already completed are asked for, or when a cosine schedule would
        span another number of epochs (its learning rate at every epoch after the first
        depends on the total). Without a schedule a larger ``epochs`` continues exactly as
        the longer run would have run from the start, and is no conflict.

    Raises:
        CheckpointError: the checkpoint records no run settings.
    """
    stored = _stored_config(payload, Path(path))
    now = config.to_dict()
    conflicts = []
    for f in dataclasses.fields(config):
        if f.name in FREE:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, tuple):
            default = list(default)
        before = stored.get(f.name, default)
        if _plain(before) != _plain(now[f.name]):
            conflicts.append((f.name, before, now[f.name]))
    if now.get("augment_on") == "workers" and now.get("augment", "none") != "none":
        before = stored.get("num_workers", 0)
        if before != now["num_workers"]:  # the examples' random streams follow the workers
            conflicts.append(("num_workers", before, now["num_workers"]))
    settings = payload["config"]
    if settings.get("data") not in (None, data.name):
        conflicts.append(("data", settings["data"], data.name))
    else:
        from flatlens.data import digest

        before = settings.get("data_digest")
        if before is not None and before != digest(data):
            conflicts.append(("data", f"{data.name} (digest {before})", f"digest {digest(data)}"))
    done, planned = int(payload["epoch"]), stored.get("epochs", config.epochs)
    if config.epochs < done:
        conflicts.append(("epochs", f"{done} completed", config.epochs))
    elif config.epochs != planned and stored.get("scheduler", "cosine") != "none":
        conflicts.append(("epochs", planned, config.epochs))
    return conflicts


def _plain(value: Any) -> Any:
    """Tuples as lists, so that a stored list equals a configured tuple."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def describe_conflicts(
    conflicts: list[tuple[str, Any, Any]], names: Mapping[str, str] | None = None
) -> str:
    """``lr 0.05 (checkpoint) != 0.5 (now), ...`` with settings renamed by ``names``."""
    names = names or {}
    return ", ".join(
        f"{names.get(k, k)} {old!r} (checkpoint) != {new!r} (now)" for k, old, new in conflicts
    )


def check_resume(config: Any, data: Dataset, path: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` unless ``config`` resumes the checkpoint's very run.

    Raises:
        CheckpointError: the checkpoint is unreadable, records no settings, or holds a run
            with other settings (each named); a cosine schedule asked to span other epochs.
    """
    from flatlens.train._checkpoint import load_on_main

    payload = load_on_main(path)
    conflicts = resume_conflicts(config, data, payload, path)
    if conflicts:
        raise CheckpointError(resume_message(path, payload, conflicts))


def resume_message(
    path: str | os.PathLike,
    payload: Mapping[str, Any],
    conflicts: list[tuple[str, Any, Any]],
    names: Mapping[str, str] | None = None,
    fresh: str = "start a new run",
) -> str:
    """The one-line refusal of a resume with ``conflicts``."""
    text = (
        f"cannot resume {path}: this run differs from the checkpoint's (epoch "
        f"{payload['epoch']}) in {describe_conflicts(conflicts, names)}"
    )
    if any(k == "epochs" and isinstance(before, int) for k, before, _ in conflicts):
        text += (
            "; a cosine schedule spans the epochs it was started with, so resume with the "
            "checkpoint's epochs (only a run without a schedule can be extended)"
        )
    return f"{text}. Pass the checkpoint's settings to continue it, or {fresh}"
